"""How many encryptions each AES-GCM key version has made: random 96-bit IVs are safe for at
most 2^32 encryptions under one key (NIST SP 800-38D, section 8.3), so a version refuses to
encrypt past that, and the key must rotate to go on.

Counting every encryption in the database would cost a write per request. Instead each process
reserves uses in blocks (:data:`BLOCK`, 65,536) in the table ``key_version_uses`` and counts in
memory within its block; a block is reserved in one short write transaction every 65,536
encryptions per version and process. The count in the database is therefore an upper bound of
the encryptions made (a process that stops leaves the rest of its block unused), never less:
the limit holds across workers, nodes and crashes. Restoring an older copy of the database
rolls the counts back with it (docs/security.md).

Table (migrated by the database layer's runner as component ``key_uses``)::

    key_version_uses  key_id, version (PK), reserved (uses handed out in blocks so far)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    select,
)

from hsmkms.db import Component, Database, ErrorMessages, Migration, migrate
from hsmkms.db.forks import FORKS
from hsmkms.types import Clock, utc_now

__all__ = ["BLOCK", "COMPONENT", "LIMIT", "KeyVersionUses", "VersionExhausted"]

log = structlog.get_logger(__name__)

LIMIT: Final = 2**32
"""Encryptions one AES-GCM key version makes with random 96-bit IVs (NIST SP 800-38D 8.3)."""
BLOCK: Final = 65_536
"""Uses a process reserves at a time."""
_LOCK: Final = 0x68736D6B6D7355  # "hsmkmsU": writers of the table take turns (PostgreSQL)
_ERRORS = ErrorMessages(
    busy="The metadata store is busy.",
    failed="The metadata store failed.",
    unavailable="The metadata store is unavailable.",
)

metadata = MetaData()
key_version_uses = Table(
    "key_version_uses",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("reserved", BigInteger, nullable=False),
)
_U = key_version_uses
# Built once: each process reserves a block per version it meets (every key's first use).
_WHERE = (_U.c.key_id == bindparam("k")) & (_U.c.version == bindparam("v"))
_RESERVED = select(_U.c.reserved).where(_WHERE)
_INSERT = _U.insert()
_UPDATE = _U.update().where(_WHERE).values(reserved=bindparam("end"))


def _v1_initial(conn: Connection) -> None:
    key_version_uses.create(conn, checkfirst=True)


COMPONENT: Final = Component("key_uses", [Migration(1, "key_version_uses", _v1_initial)])


class VersionExhausted(Exception):
    """The key version has made its :data:`LIMIT` encryptions."""


class KeyVersionUses:
    """The use counter of AES-GCM key versions. Thread-safe; one per process.

    ``block`` and ``limit`` are :data:`BLOCK` and :data:`LIMIT` but in tests, which cannot make
    2^32 encryptions."""

    def __init__(
        self,
        database: Database,
        *,
        block: int = BLOCK,
        limit: int = LIMIT,
        clock: Clock = utc_now,
        on_half: Callable[[str, int], None] | None = None,
    ) -> None:
        if not 0 < block <= limit:
            raise ValueError("block must be positive and at most the limit")
        self._db = database
        self._block = block
        self._limit = limit
        self._on_half = on_half
        self._lock = threading.Lock()
        # (key id, version) -> [next use, end of the block]; dropped in a forked child, which
        # must not use the blocks its parent (or a sibling) holds.
        self._blocks: dict[tuple[str, int], list[int]] = {}
        self._forks = FORKS.count
        with self._db.write(_ERRORS, cached=False) as conn:
            migrate(conn, COMPONENT, clock)

    @property
    def limit(self) -> int:
        """Encryptions one version may make."""
        return self._limit

    def take(self, key_id: str, version: int) -> None:
        """Count one encryption under ``version`` of ``key_id``; :class:`VersionExhausted` when
        it has made :attr:`limit` already (nothing counted)."""
        where = (key_id, version)
        with self._lock:
            if self._forks != FORKS.count:
                self._blocks.clear()
                self._forks = FORKS.count
            held = self._blocks.get(where)
            if held is not None and held[0] < held[1]:
                held[0] += 1
                return
        start, end = self._reserve(key_id, version)
        with self._lock:
            held = self._blocks.get(where)
            if held is None or held[0] >= held[1]:
                held = self._blocks[where] = [start, end]
            held[0] += 1  # a block reserved by another thread meanwhile is used first

    def reserved(self, key_id: str, version: int) -> int:
        """Uses handed out so far for the version, by every process (an upper bound of the
        encryptions made)."""
        with self._db.read(_ERRORS) as conn:
            found = conn.execute(_RESERVED, {"k": key_id, "v": version}).scalar()
        return int(found or 0)

    def _reserve(self, key_id: str, version: int) -> tuple[int, int]:
        """Reserve the next block of the version: ``(first use, end)``."""
        # The write lock orders reservations (SQLite's one writer, PostgreSQL's advisory lock),
        # so the read-then-write below is atomic across processes and nodes.
        with self._db.write(_ERRORS, lock=_LOCK, cached=False) as conn:
            found = conn.execute(_RESERVED, {"k": key_id, "v": version}).scalar()
            start = int(found or 0)
            if start >= self._limit:
                raise VersionExhausted(f"{key_id} version {version}")
            end = min(start + self._block, self._limit)
            if found is None:
                conn.execute(_INSERT, {"key_id": key_id, "version": version, "reserved": end})
            else:
                conn.execute(_UPDATE, {"k": key_id, "v": version, "end": end})
        if start < self._limit // 2 <= end and self._on_half is not None:
            self._on_half(key_id, version)
        return start, end
