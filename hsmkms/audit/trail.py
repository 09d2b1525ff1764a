"""The tamper-evident audit trail: a hash chain of records in SQL, sealed by a token HMAC, the
newest seal anchored in the token.

Storage (three tables of their own, migrated by the database layer's runner as component
``audit``, whose versions are in the database's ``schema_migrations``)::

    audit_settings  name -> value: ``audit_key`` (KeyMaterialRef text of HMAC_256 material);
                    ``schema_version``, the version as hsmkms before the database layer kept
                    it (adopted from there, and kept equal to the latest applied version)
    audit_records   seq (1, 2, 3, ... gap-free), record (canonical JSON bytes),
                    hash = SHA-256(hash of seq-1 || record), genesis hash = 32 zero bytes;
                    plus search columns copied from the record (event_time, event_name,
                    principal, access_key_id, key_ids) — never trusted: search re-checks
                    every hit against the record itself, and verify checks they agree
    audit_seals     seal_seq (1, 2, 3, ...), record_seq, chain_hash (the hash of record
                    record_seq; zeros for 0), sealed_at, reason, max_unsealed, interval_ms,
                    prev_tag (the tag of seal seal_seq-1; zeros for seal 1), tag; since
                    version 2: writer (the writer session that sealed), ended (the sessions a
                    ``recover`` seal declares stopped), supersedes (the anchor a seal replaced
                    although the trail did not hold its seal)

A seal's ``tag`` is HMAC-SHA-256, computed inside the token with the trail's own
non-extractable audit key (label ``hsmkms:audit``), over the seal payload::

    b"hsmkms-audit-seal-v2\n" || canonical JSON of
    {"chainHash": hex, "ended": [writer, ...], "intervalMs": int, "maxUnsealed": int,
     "prevTag": hex, "reason": str, "recordSeq": int, "sealSeq": int,
     "sealedAt": "YYYY-MM-DDTHH:MM:SS.ffffffZ", "supersedes": str | null, "writer": str}

(seals written before version 2 — no ``writer`` — keep their payload
``b"hsmkms-audit-seal-v1\n"`` || the same JSON without ``ended``, ``supersedes`` and
``writer``). Each seal authenticates the whole chain up to ``record_seq``, every earlier seal
(through ``prev_tag``), its own time, who wrote it, and the promise it makes about the next
one: the writer session seals again within ``interval_ms`` and the trail within
``max_unsealed`` records (a ``shutdown`` or ``command`` seal promises nothing).

**Writer sessions.** A server process appends through a session: its ``start`` seal opens it,
its ``shutdown`` seal closes it, and it seals at least every ``interval`` in between (a
heartbeat), so a session whose newest seal is overdue has stopped without a clean shutdown
(killed, crashed, power lost). A live session that finds such a session writes a ``recover``
seal naming it (``ended``): the unclean stop becomes part of the sealed trail.
A command (``hsmkms purge``, a file command on a local data directory) has no session: each of
its appends is one transaction of its records and a ``command`` seal.

**The anchor.** Every seal is written to the token first (:meth:`Keystore.write_anchor`, name
``audit-<audit key id>``, value ``<sealSeq>:<first 24 hex of the tag>``), then to the
database, in the transaction that holds the trail's write lock: the token always names the
newest seal the trail was given (one ahead when that transaction then failed to commit), so
removing seals and records from the tail — also back to a ``shutdown`` seal, and after the
writers stopped — no longer verifies. A writer refuses to seal a trail the anchor says was cut
(:class:`TrailCut`) until an operator runs ``hsmkms audit resume``.

Threat model: the database is not trusted (anyone may edit it); the token and its audit key
are. What :meth:`AuditTrail.verify` can and cannot prove is in ``docs/audit.md``.

Concurrency: every append (of one record or of a batch) is one transaction that takes the
write lock first (:meth:`hsmkms.db.Database.write` with the trail's writer lock, so appenders
take turns on every database), reads the last sequence number and hash, inserts, and seals
when due — so any number of processes may append and the sequence stays gap-free. Servers
append through :class:`hsmkms.audit.writer.AuditWriter`, which commits the records of all
requests waiting at that moment together (group commit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import hmac
import itertools
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    or_,
    select,
)
from sqlalchemy.engine import URL

from hsmkms.audit.records import (
    SEARCH_COLUMNS,
    AuditRecord,
    PreparedRecord,
    canonical_json,
    format_event_time,
    key_id_of,
    prepare_record,
    record_key_ids,
    search_columns,
)
from hsmkms.db import (
    BigIntKey,
    Component,
    Database,
    ErrorMessages,
    LegacyMarker,
    Migration,
    add_column,
    migrate,
)
from hsmkms.errors import ClientError, KMSError, KMSInternalException, ServiceUnavailable
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName, checked_mac_key
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.types import Clock, utc_now

__all__ = [
    "AUDIT_KEY_NAME",
    "SCHEMA_VERSION",
    "STALE_FACTOR",
    "AuditSink",
    "AuditTrail",
    "Seal",
    "SealGap",
    "SealReason",
    "TrailCut",
    "UncleanStop",
    "VerifyResult",
    "VerifyStatus",
]

log = structlog.get_logger(__name__)

AUDIT_KEY_NAME: Final = "audit"
_GENESIS: Final = bytes(32)
_SEAL_DOMAIN: Final = b"hsmkms-audit-seal-v1\n"
_SEAL_DOMAIN_V2: Final = b"hsmkms-audit-seal-v2\n"
# How many hex digits of a seal's tag the token's anchor keeps (96 bits: the anchor names a
# seal the audit key made, it does not authenticate one).
_ANCHOR_TAG_HEX: Final = 24
# verify reads the trail again while the anchor is one seal ahead of what it read (a writer
# committing its next seal meanwhile): this many reads in all, this many seconds apart.
_PENDING_READS: Final = 4
_PENDING_PAUSE: Final = 0.2
# A seal promises the next one within its interval; verify allows this factor of slack.
STALE_FACTOR: Final = 2
_PAGE: Final = 500
# Seals a writer reads per seal_if_due() while it learns the writer sessions of the trail.
_SESSION_PAGE: Final = 5000
# Every write takes this writer lock first (Database.write), so appenders take turns and the
# first creation of the tables is serialized too. "hsmkmsA": the value hsmkms always used.
_APPEND_LOCK: Final = 0x68736D6B6D7341
_ERRORS: Final = ErrorMessages(
    busy="The audit trail is busy.",
    failed="The audit trail failed.",
    unavailable="The audit trail is unavailable.",
)

metadata = MetaData()

audit_settings = Table(
    "audit_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

audit_records = Table(
    "audit_records",
    metadata,
    Column("seq", BigIntKey, primary_key=True, autoincrement=False),
    Column("event_time", String(20), nullable=False),
    Column("event_name", String(64), nullable=False),
    Column("principal", String(2048), nullable=True),
    Column("access_key_id", String(128), nullable=True),
    Column("key_ids", Text, nullable=False),
    Column("record", LargeBinary, nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    Index("ix_audit_records_event_time", "event_time"),
    Index("ix_audit_records_event_name", "event_name"),
    Index("ix_audit_records_principal", "principal"),
)

audit_seals = Table(
    "audit_seals",
    metadata,
    Column("seal_seq", BigIntKey, primary_key=True, autoincrement=False),
    Column("record_seq", BigInteger, nullable=False),
    Column("chain_hash", LargeBinary(32), nullable=False),
    Column("sealed_at", String(32), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("max_unsealed", Integer, nullable=False),
    Column("interval_ms", BigInteger, nullable=False),
    Column("prev_tag", LargeBinary(32), nullable=False),
    Column("tag", LargeBinary(32), nullable=False),
    Column("writer", String(96), nullable=True),
    Column("ended", Text, nullable=True),
    Column("supersedes", String(64), nullable=True),
)

_R = audit_records
_S = audit_seals
_SET = audit_settings


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


def _v2_sessions(conn: Connection) -> None:
    for name in ("writer", "ended", "supersedes"):
        add_column(conn, "audit_seals", Column(name, audit_seals.c[name].type))


COMPONENT: Final = Component(
    "audit",
    [
        Migration(1, "audit_settings, audit_records, audit_seals", _v1_initial),
        Migration(2, "audit_seals.writer, ended, supersedes: writer sessions", _v2_sessions),
    ],
    legacy=LegacyMarker(audit_settings),
    refused="The audit trail's schema version {found} is not one this hsmkms knows.",
)
"""The audit trail's tables, for :func:`hsmkms.db.migrate`."""
SCHEMA_VERSION: Final = COMPONENT.latest
# Built once: an append runs on every API call, and building statements costs more than
# running them.
_HEAD = select(_R.c.seq, _R.c.hash).order_by(_R.c.seq.desc()).limit(1)
_NEWEST_SEAL = select(_S).order_by(_S.c.seal_seq.desc()).limit(1)
_INSERT_RECORD = _R.insert()
_INSERT_SEAL = _S.insert()
_SEAL_COLUMNS = (
    "seal_seq, record_seq, chain_hash, sealed_at, reason, max_unsealed, interval_ms, prev_tag, "
    "tag, writer, ended, supersedes"
)
_RECORD_COLUMNS = ("seq", *SEARCH_COLUMNS, "record", "hash")
# The append's statements in the driver's own SQL, run on the transaction's DBAPI cursor:
# compiling and wrapping Core statements cost about four times what SQLite spends on them, and
# the write lock is held meanwhile. Only for drivers whose placeholder is ``?`` or ``%s``.
_DRIVER_HEAD = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1"
_DRIVER_NEWEST_SEAL = f"SELECT {_SEAL_COLUMNS} FROM audit_seals ORDER BY seal_seq DESC LIMIT 1"  # noqa: S608
_DRIVER_INSERT = f"INSERT INTO audit_records ({', '.join(_RECORD_COLUMNS)}) VALUES "  # noqa: S608
# A batch is inserted by multi-row INSERTs of up to this many rows (8 parameters each: under
# every SQLite's limit of 999). One statement is one step inside the driver, so the appending
# thread gives the GIL up and takes it back once per chunk rather than once per row — taking
# it back from a busy event loop costs up to the interpreter's switch interval (5 ms) each time.
_ROWS_PER_INSERT = 100


@functools.lru_cache(maxsize=16)
def _multi_insert(placeholder: str, rows: int) -> str:
    """The driver SQL inserting ``rows`` audit records at once."""
    one = "(" + ", ".join(placeholder for _ in _RECORD_COLUMNS) + ")"
    return _DRIVER_INSERT + ", ".join(one for _ in range(rows))


class AuditSink(Protocol):
    """Where the service sends audit records. :class:`AuditTrail` is the implementation."""

    def append(self, record: AuditRecord) -> int:
        """Store one record durably; returns its sequence number."""
        ...


class SealReason(enum.StrEnum):
    """Why a seal was written."""

    GENESIS = "genesis"  # the trail was created
    START = "start"  # a writer session began (a server process opened the trail)
    COUNT = "count"  # ``seal_every`` records since the last seal
    INTERVAL = "interval"  # ``interval`` since the session's last seal (or the trail's)
    DEMAND = "demand"  # :meth:`AuditTrail.seal`
    SHUTDOWN = "shutdown"  # :meth:`AuditTrail.close`: the session ended cleanly
    COMMAND = "command"  # a command's records (no session; promises nothing)
    RECOVER = "recover"  # sessions (``ended``) stopped without a shutdown seal
    RESUME = "resume"  # an operator resumed a cut trail (``supersedes``: the lost anchor)


# Seals after which nothing need follow from their writer.
_NO_PROMISE = frozenset({SealReason.SHUTDOWN, SealReason.COMMAND})


@dataclasses.dataclass(frozen=True)
class Seal:
    """One seal row (see the module docstring)."""

    seal_seq: int
    record_seq: int
    chain_hash: bytes
    sealed_at: str
    reason: str
    max_unsealed: int
    interval_ms: int
    prev_tag: bytes
    tag: bytes
    writer: str | None = None
    """The writer session (``<host>:<pid>:<random>``, ``command:...`` for a command); None in
    seals written before sessions (payload version 1)."""
    ended: tuple[str, ...] = ()
    """A ``recover`` seal: the sessions it declares stopped without a shutdown seal."""
    supersedes: str | None = None
    """The anchor value this seal replaced although the trail did not hold that seal (an
    interrupted write; or, with ``resume``, a cut the operator acknowledged)."""

    def payload(self) -> bytes:
        """The bytes the tag authenticates."""
        fields: dict[str, Any] = {
            "chainHash": self.chain_hash.hex(),
            "intervalMs": self.interval_ms,
            "maxUnsealed": self.max_unsealed,
            "prevTag": self.prev_tag.hex(),
            "reason": self.reason,
            "recordSeq": self.record_seq,
            "sealSeq": self.seal_seq,
            "sealedAt": self.sealed_at,
        }
        if self.writer is None:
            return _SEAL_DOMAIN + canonical_json(fields)
        fields.update(ended=list(self.ended), supersedes=self.supersedes, writer=self.writer)
        return _SEAL_DOMAIN_V2 + canonical_json(fields)

    @property
    def anchor(self) -> str:
        """What the token's anchor holds for this seal."""
        return f"{self.seal_seq}:{self.tag.hex()[:_ANCHOR_TAG_HEX]}"

    @property
    def promises(self) -> bool:
        """Whether the seal promises another from its writer (within its interval)."""
        return self.reason not in _NO_PROMISE

    def row(self) -> dict[str, Any]:
        """The seal as an ``audit_seals`` row."""
        values = dataclasses.asdict(self)
        values["ended"] = ",".join(self.ended) if self.ended else None
        return values

    @property
    def time(self) -> dt.datetime | None:
        """``sealed_at`` as an aware datetime; ``None`` when malformed (an edited row)."""
        try:
            return _parse_time(self.sealed_at)
        except ValueError:
            return None


class VerifyStatus(enum.StrEnum):
    """The outcome of :meth:`AuditTrail.verify`."""

    OK = "ok"
    TAMPERED = "tampered"  # proven: a record, seal, the key reference or the tail was changed
    STALE = "stale"  # not proven: the newest seal is overdue and the token holds no anchor
    UNCLEAN = "unclean"  # intact through the anchored seal, but a writer stopped uncleanly
    MISSING = "missing"  # no audit trail in this database


class TrailCut(ServiceUnavailable):
    """The token's anchor names a seal the trail does not hold: seals and records were removed
    from the tail (or the database was replaced by an older copy). A writer refuses to seal
    such a trail — requests are answered 503 — until an operator restores the tail or runs
    ``hsmkms audit resume``."""


@dataclasses.dataclass(frozen=True)
class UncleanStop:
    """A writer session that stopped without a shutdown seal: its newest seal is
    ``last_seal`` (at ``last_seal_at``); ``noted_by`` is the ``recover`` seal that says so
    (None while no live session has noted it yet)."""

    writer: str
    last_seal: int
    last_seal_at: str
    noted_by: int | None


@dataclasses.dataclass(frozen=True)
class SealGap:
    """Two consecutive seals further apart than the first one promised (not after a shutdown):
    an unclean stop, or records and seals removed from what was then the tail."""

    after_seal: int
    seconds: float
    allowed: float


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What :meth:`AuditTrail.verify` found.

    ``first_bad_seq`` is the first record that is not proven intact (``None`` when none);
    ``problem`` one line naming it. ``sealed_through`` is the last record covered by a valid
    seal; the ``unsealed`` records after it are chained but not yet provable. ``newest_seal``
    (when the seals verified) is worth keeping outside the database: a later trail whose seals
    do not include it was rolled back.
    """

    status: VerifyStatus
    records: int
    seals: int
    sealed_through: int
    unsealed: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seal_at: dt.datetime | None = None
    gaps: tuple[SealGap, ...] = ()
    newest_seal: Seal | None = None
    unclean: tuple[UncleanStop, ...] = ()
    """Writer sessions that stopped without a shutdown seal (noted or not)."""
    live: tuple[str, ...] = ()
    """Writer sessions still sealing (their promise not yet overdue)."""
    warnings: tuple[str, ...] = ()
    """What is worth an operator's eye but proves no tampering (one line each)."""
    anchor: str | None = None
    """The token's anchor for this trail (``<sealSeq>:<tag prefix>``), None when it has none."""

    @property
    def ok(self) -> bool:
        return self.status is VerifyStatus.OK


class _Failed(Exception):
    def __init__(self, status: VerifyStatus, problem: str, first_bad: int | None) -> None:
        super().__init__(problem)
        self.status = status
        self.problem = problem
        self.first_bad = first_bad


def _seal_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError("time without a zone")
    return when.astimezone(dt.UTC)


def _index_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """The search columns of ``record`` by name (``ValueError`` when it lacks what every record
    has)."""
    return dict(zip(SEARCH_COLUMNS, search_columns(record), strict=True))


def _matches(
    record: Mapping[str, Any],
    key_id: str | None,
    principal: str | None,
    event_name: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> bool:
    """The search filter, applied to the record itself (the search columns are untrusted)."""
    if event_name is not None and record.get("eventName") != event_name:
        return False
    if key_id is not None and key_id_of(key_id) not in record_key_ids(record):
        return False
    if principal is not None:
        identity = record.get("userIdentity")
        identity = identity if isinstance(identity, Mapping) else {}
        if principal not in (identity.get("arn"), identity.get("accessKeyId")):
            return False
    if since is not None or until is not None:
        try:
            when = _parse_time(str(record.get("eventTime")))
        except ValueError:
            return False
        if since is not None and when < since.replace(microsecond=0):
            return False
        if until is not None and when > until:
            return False
    return True


def anchor_name(audit_key: KeyMaterialRef) -> str:
    """The name of the token anchor of the trail whose audit key is ``audit_key`` (one per
    trail: several trails may share a token)."""
    (object_id,) = audit_key.object_ids
    return f"audit-anchor:{object_id}"


def _anchor_seq(value: str) -> int | None:
    number, _, tag = value.partition(":")
    return int(number) if number.isdigit() and tag else None


def _anchor_state(found: str, newest: Seal | None) -> str:
    """How the token's anchor ``found`` relates to the trail's newest seal: ``current`` (it
    names that seal), ``pending`` (the next seal number: a transaction that anchored its seal
    and then did not commit), ``behind`` (an older seal of this trail: seals written without
    the anchor), or ``cut`` (a seal the trail does not hold, or another seal under that
    number)."""
    seq = _anchor_seq(found)
    if seq is None:
        return "cut"
    if newest is None:
        return "cut"
    if seq == newest.seal_seq:
        return "current" if found == newest.anchor else "cut"
    if seq == newest.seal_seq + 1:
        return "pending"
    return "behind" if seq < newest.seal_seq else "cut"


@dataclasses.dataclass
class _Session:
    last_seal: int
    last_at: dt.datetime | None
    interval_ms: int
    open: bool = True


class _Sessions:
    """The writer sessions of a trail, read incrementally from its seals (a writer's view for
    :meth:`AuditTrail.seal_if_due`; ``verify`` reads all seals itself)."""

    def __init__(self) -> None:
        self._seen = 0
        self._by_writer: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def catch_up(
        self, read: Callable[[], AbstractContextManager[Connection]], limit: int | None = None
    ) -> bool:
        """Read the seals not seen yet (at most ``limit``); whether it read up to the end. A
        long trail is read a page per call, so no call holds its caller for long."""
        with self._lock, read() as conn:
            query = select(_S).where(_S.c.seal_seq > self._seen).order_by(_S.c.seal_seq)
            if limit is not None:
                query = query.limit(limit)
            count = 0
            for row in conn.execute(query):
                self.add(_seal_from_row(row))
                count += 1
            return limit is None or count < limit

    def add(self, seal: Seal) -> None:
        self._seen = max(self._seen, seal.seal_seq)
        if seal.writer is None:
            return
        for writer in seal.ended:
            ended = self._by_writer.get(writer)
            if ended is not None:
                ended.open = False
        if seal.reason == SealReason.START:
            self._by_writer[seal.writer] = _Session(seal.seal_seq, seal.time, seal.interval_ms)
        session = self._by_writer.get(seal.writer)
        if session is None:
            return
        session.last_seal, session.last_at = seal.seal_seq, seal.time
        session.interval_ms = seal.interval_ms
        if seal.reason == SealReason.SHUTDOWN:
            session.open = False

    def overdue(self, now: dt.datetime, *, exclude: str | None = None) -> tuple[str, ...]:
        """The open sessions whose newest seal is older than their promise allows."""
        found = []
        for writer, session in self._by_writer.items():
            if not session.open or writer == exclude:
                continue
            allowed = dt.timedelta(milliseconds=STALE_FACTOR * session.interval_ms)
            if session.last_at is None or now - session.last_at > allowed:
                found.append(writer)
        return tuple(sorted(found))

    def open_sessions(self) -> dict[str, _Session]:
        return {w: s for w, s in self._by_writer.items() if s.open}

    def by_writer(self, writer: str) -> _Session | None:
        return self._by_writer.get(writer)


class AuditTrail:
    """The audit trail in the database at ``database``: a :class:`~hsmkms.db.Database` shared
    with other components (its settings apply, and :meth:`close` leaves it open), or an
    ``Engine``, ``URL`` or URL string, for which the trail opens and owns a database of its own
    (given an engine, on the same URL, so that its connection settings never touch the
    caller's pool).

    ``create=True``: a writer — create the tables and the token audit key when missing. A
    server's writer (the default) opens a writer *session*: a ``start`` seal now (or at
    :meth:`start`, with ``start=False``), heartbeat seals, a ``shutdown`` seal at
    :meth:`close`. ``command=True``: a command's writer — no session; each append is sealed by
    a ``command`` seal in its own transaction, and :meth:`close` writes nothing.
    ``create=False`` (``hsmkms audit ...``): write nothing; reading a database without a trail
    finds nothing and :meth:`verify` says so. ``keystore`` may be ``None`` for a reader that
    only searches (:meth:`verify` needs the token).

    Sealing: :meth:`append` seals in the same transaction once ``seal_every`` records or
    ``seal_interval`` seconds have passed since the last seal; a server's writer must also call
    :meth:`seal_if_due` at least every ``seal_interval / 2`` seconds (its session's heartbeat,
    and the check for sessions that stopped uncleanly) and :meth:`close` at shutdown. Every seal
    is anchored in the token before its transaction commits (module docstring).

    ``durable`` (a database of its own): every append is on disk when it returns. ``False``
    trades that for speed: still safe against a crash of the process, but a power loss may drop
    the newest appends (:class:`~hsmkms.db.Database`). ``device``: how messages name where the
    database lives when it is full (``the data directory's device``).

    Thread-safe and fork-aware (a forked child opens fresh database connections).
    """

    def __init__(
        self,
        database: Database | Engine | URL | str,
        keystore: Keystore | None,
        *,
        create: bool = True,
        command: bool = False,
        start: bool = True,
        clock: Clock = utc_now,
        seal_every: int = 100,
        seal_interval: float = 10.0,
        busy_timeout_ms: int = 10_000,
        durable: bool = True,
        device: str | None = None,
    ) -> None:
        if seal_every < 1 or seal_interval <= 0:
            raise ValueError("seal_every and seal_interval must be positive")
        if create and keystore is None:
            raise ValueError("a writer needs the keystore")
        self._owns_db = not isinstance(database, Database)
        if isinstance(database, Database):
            self._db = database
        else:
            self._db = Database(
                database.url if isinstance(database, Engine) else database,
                busy_timeout_ms=busy_timeout_ms,
                durable=durable,
                foreign_keys=False,  # the trail's tables have none
                device=device,
            )
        self._keystore = keystore
        self._clock = clock
        self._every = seal_every
        self._interval_ms = int(seal_interval * 1000)
        self._key: KeyMaterialRef | None = None
        self._placeholder = self._db.placeholder
        self._create = create
        self._command = command
        self._started = False
        self._closed = False
        self._writer: tuple[int, str] | None = None
        self._own_last: dt.datetime | None = None  # when this session last sealed
        self._sessions = _Sessions()
        if create and start:
            try:
                self.start()
            except BaseException:
                if self._owns_db:
                    self._db.close()
                raise

    # -- connections ----------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[Connection]:
        # cached=False: no read cache holds the trail's rows, so an append (on every request)
        # must not empty the caches of every process sharing the database.
        return self._db.write(_ERRORS, lock=_APPEND_LOCK, cached=False)

    def _read(self) -> AbstractContextManager[Connection]:
        return self._db.read(_ERRORS)

    def check_key(self) -> None:
        """Check that the trail's audit key reference names the audit key on the token, as a
        writer does when it opens the trail (nothing to check before the trail exists). A
        :class:`~hsmkms.errors.KMSError` naming the problem."""
        with self._read() as conn:
            if not self._exists(conn):
                return
            ref = self._settings(conn).get("audit_key")
        # Not remembered as this trail's key: a trail that knows its key seals on close.
        if ref is None:
            raise KMSInternalException("The audit trail has no audit key.")
        try:
            self._checked_key(ref)
        except ValueError as exc:
            raise KMSInternalException(f"The audit trail's audit key is wrong: {exc}.") from exc

    def head(self) -> tuple[int, Seal | None]:
        """The number of records and the newest seal (None: no seal; ``(0, None)`` for a
        database that holds no trail yet), read without checking anything (``verify``
        checks)."""
        with self._read() as conn:
            if not self._exists(conn):
                return 0, None
            return self._head(conn)[0], self._newest_seal(conn)

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        """Hold the trail's write lock for the block: no process appends a record or a seal
        meanwhile (they wait, up to their busy timeout). ``hsmkms backup`` copies the trail
        and the token inside it, so the copy of the trail and of the token agree."""
        with self._write():
            yield

    @property
    def keystore(self) -> Keystore:
        """The keystore (``KMSInternalException`` for a reader opened without one)."""
        if self._keystore is None:
            raise KMSInternalException("The audit trail was opened without the keystore.")
        return self._keystore

    @property
    def database(self) -> Database:
        """The database the trail lives in."""
        return self._db

    @property
    def engine(self) -> Engine:
        """The trail's database's engine (for tests and diagnostics)."""
        return self._db.engine

    @property
    def seal_interval(self) -> float:
        """Seconds between seals when records keep coming; :meth:`seal_if_due` is owed at
        least every half of it."""
        return self._interval_ms / 1000

    @property
    def started(self) -> bool:
        """Whether the writer has opened the trail (:meth:`start`)."""
        return self._started

    @property
    def writer_id(self) -> str:
        """This writer's session, named in its seals: ``<host>:<pid>:<random>``, or
        ``command:<pid>:<random>`` for a command. A forked child gets a name of its own."""
        pid = os.getpid()
        if self._writer is None or self._writer[0] != pid:
            kind = "command" if self._command else socket.gethostname()[:48]
            self._writer = (pid, f"{kind}:{pid}:{secrets.token_hex(4)}")
        return self._writer[1]

    # -- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the trail for writing, once: create the tables and the audit key when missing
        (a ``genesis`` seal), check the token's anchor, and open this writer's session (a
        ``start`` seal; none for a command). A :class:`~hsmkms.errors.KMSError` when it cannot
        (the database or the token away: call again later; :class:`TrailCut`)."""
        if self._started:
            return
        if not self._create:
            raise KMSInternalException("The audit trail was opened for reading.")
        with self._write() as conn:
            migrate(conn, COMPONENT, self._clock)
            ref = self._settings(conn).get("audit_key")
            if ref is None:
                if conn.execute(select(_S.c.seal_seq).limit(1)).first() is not None:
                    # Seals without a key reference: the reference was removed. Refuse to
                    # start a new key over an existing trail.
                    raise KMSInternalException("The audit trail has seals but no audit key.")
                key = self.keystore.create(
                    KeyMaterialSpec.HMAC_256, MaterialName.service_key(AUDIT_KEY_NAME)
                )
                conn.execute(_SET.insert().values(name="audit_key", value=key.to_str()))
                self._key = key
                self._seal(conn, SealReason.GENESIS)
            else:
                self._key = None
                self._audit_key(conn)
            if not self._command:
                self._seal(conn, SealReason.START)
        self._started = True

    @staticmethod
    def _settings(conn: Connection) -> dict[str, str]:
        return {row.name: row.value for row in conn.execute(select(_SET))}

    def _checked_key(self, ref_text: str) -> KeyMaterialRef:
        """Parse a stored key reference and check, on the (trusted) token, that it names an
        audit key. ``ValueError`` naming the problem."""
        return checked_mac_key(self.keystore, ref_text, AUDIT_KEY_NAME)

    def _audit_key(self, conn: Connection) -> KeyMaterialRef:
        if self._key is None:
            ref = self._settings(conn).get("audit_key")
            if ref is None:
                raise KMSInternalException("The audit trail has no audit key.")
            try:
                self._key = self._checked_key(ref)
            except ValueError as exc:
                raise KMSInternalException(f"The audit trail's audit key is wrong: {exc}.") from exc
        return self._key

    # -- writing --------------------------------------------------------------------------------

    def append(self, record: AuditRecord) -> int:
        """Append one record (made by :func:`~hsmkms.audit.records.api_call_record` or
        :func:`~hsmkms.audit.records.service_event_record`); returns its sequence number.
        :meth:`append_many` with one record."""
        return self.append_many((record,))

    def append_many(self, records: Iterable[AuditRecord]) -> int:
        """Append ``records`` in order, in one transaction; returns the sequence number of the
        last one (the chain head when ``records`` is empty). Every record is encoded first
        (``ValueError``/``TypeError`` for one that is not valid: then nothing is written);
        then :meth:`append_prepared`."""
        return self.append_prepared([prepare_record(r) for r in records])

    def append_prepared(self, prepared: Sequence[PreparedRecord]) -> int:
        """Append records encoded by :func:`prepare_record`, in order, in one transaction;
        returns the sequence number of the last one (the chain head when there is none).

        The transaction takes the write lock, reads the chain head and the newest seal,
        chains and inserts every record, and seals wherever a seal falls due (every
        ``seal_every`` records, so a batch gets the same seals as its records appended one by
        one; a command's append: one ``command`` seal after its records). Either every record
        is stored, chained, or none is. A server's failure to seal (the token away) is logged
        and leaves the records stored (the next seal covers them); a command's, a cut trail
        (:class:`TrailCut`) and a database failure raise :class:`~hsmkms.errors.KMSError`.
        """
        if not prepared:
            with self._read() as conn:
                return self._head(conn)[0] if self._exists(conn) else 0
        self.start()
        with self._write() as conn:
            cursor = None if self._placeholder is None else conn.connection.cursor()
            try:
                if cursor is not None:
                    cursor.execute(_DRIVER_HEAD)
                    row = cursor.fetchone()
                    seq, digest = (0, _GENESIS) if row is None else (row[0], bytes(row[1]))
                    cursor.execute(_DRIVER_NEWEST_SEAL)
                    row = cursor.fetchone()
                    newest = None if row is None else _seal_from_values(row)
                else:
                    seq, digest = self._head(conn)
                    newest = self._newest_seal(conn)
                rows: list[tuple[Any, ...]] = []
                # The time is read once per batch: an interval seal, when due, covers the
                # batch's first record; then a count seal every ``seal_every`` records.
                if self._command:
                    reason, next_seal = None, 0
                else:
                    reason = self._due(newest, seq + 1)
                    next_seal = seq + 1 if reason is not None else self._count_due(newest)
                for item in prepared:
                    seq += 1
                    digest = hashlib.sha256(digest + item.body).digest()
                    rows.append((seq, *item.columns, item.body, digest))
                    if seq == next_seal:
                        try:
                            newest = self._seal(
                                conn, reason or SealReason.COUNT, head=(seq, digest), newest=newest
                            )
                        except TrailCut:
                            raise
                        except KMSError as exc:
                            # Token away: no further seal in this batch; the next one covers it.
                            log.warning("audit_seal_failed", error=type(exc).__name__, seq=seq)
                            next_seal = 0
                        else:
                            next_seal = seq + self._every
                        reason = None
                if self._command:
                    self._seal(conn, SealReason.COMMAND, head=(seq, digest), newest=newest)
                if cursor is not None:
                    assert self._placeholder is not None
                    for at in range(0, len(rows), _ROWS_PER_INSERT):
                        chunk = rows[at : at + _ROWS_PER_INSERT]
                        sql = _multi_insert(self._placeholder, len(chunk))
                        cursor.execute(sql, [value for row in chunk for value in row])
                else:
                    conn.execute(
                        _INSERT_RECORD, [dict(zip(_RECORD_COLUMNS, r, strict=True)) for r in rows]
                    )
            finally:
                if cursor is not None:
                    cursor.close()
        return seq

    def seal(self, reason: str = SealReason.DEMAND) -> Seal:
        """Write a seal over everything appended so far (``reason``: a :class:`SealReason`)."""
        self.start()
        with self._write() as conn:
            return self._seal(conn, SealReason(reason))

    def seal_if_due(self) -> Seal | None:
        """Seal when ``seal_every`` records have been appended since the newest seal, when this
        session has not sealed for ``seal_interval`` seconds (its heartbeat, even with no new
        record), or when another session's promise is overdue — then a ``recover`` seal names
        the sessions that stopped without a shutdown seal. Call it periodically."""
        self.start()
        # The bulk of the reading outside the write lock, a page per call: on a long trail a
        # new writer learns the sessions over a few calls (and notes stopped ones after that).
        caught_up = self._sessions.catch_up(self._read, limit=_SESSION_PAGE)
        with self._write() as conn:
            now = self._clock()
            ended: tuple[str, ...] = ()
            if caught_up:
                self._sessions.catch_up(lambda: contextlib.nullcontext(conn))
                ended = self._sessions.overdue(now, exclude=self.writer_id)
            head = self._head(conn)
            newest = self._newest_seal(conn)
            if ended:
                reason: SealReason | None = SealReason.RECOVER
            else:
                reason = self._due(newest, head[0], heartbeat=True)
                own = self._own_last
                interval = dt.timedelta(milliseconds=self._interval_ms)
                if reason is None and (own is None or now - own >= interval):
                    reason = SealReason.INTERVAL
            if reason is None:
                return None
            seal = self._seal(conn, reason, head=head, newest=newest, ended=ended)
        if ended:
            log.warning("audit_writer_stopped_uncleanly", writers=list(ended), seal=seal.seal_seq)
        return seal

    def resume(self) -> Seal:
        """After a cut (:class:`TrailCut`): write a ``resume`` seal that records the anchor the
        trail no longer holds (``supersedes``) and anchor it, so the trail can be written
        again; ``verify`` reports the cut for ever after. Raises :class:`ClientError` when
        the trail is not cut."""
        self.start_without_session()
        with self._write() as conn:
            newest = self._newest_seal(conn)
            found = self.keystore.read_anchor(self._anchor_name(conn))
            if found is None or newest is None or _anchor_state(found, newest) != "cut":
                raise ClientError("the audit trail is not cut: nothing to resume")
            seal = self._seal(conn, SealReason.RESUME, newest=newest, resume_from=found)
        log.warning("audit_trail_resumed", lost_anchor=found, seal=seal.seal_seq)
        return seal

    def probe(self) -> None:
        """A write transaction that needs space on the database's device and no token: how a
        failing writer finds out that the trail can be written again."""
        self.start()
        with self._write() as conn:
            conn.execute(_SET.delete().where(_SET.c.name == "probe"))
            conn.execute(_SET.insert().values(name="probe", value=_seal_time(self._clock())))

    def end_copied_sessions(self) -> tuple[str, ...]:
        """In a restored copy of a data directory: the writer sessions its trail shows open
        belonged to the processes of the original, which will never seal here. A ``recover``
        seal names them now, so the copy's trail records their end instead of reporting them
        stopped uncleanly once their promise runs out. The writers ended (none: no seal)."""
        self.start_without_session()
        while not self._sessions.catch_up(self._read, limit=_SESSION_PAGE):
            pass
        with self._write() as conn:
            self._sessions.catch_up(lambda: contextlib.nullcontext(conn))
            ended = tuple(sorted(self._sessions.open_sessions()))
            if ended:
                self._seal(conn, SealReason.RECOVER, ended=ended)
        return ended

    def start_without_session(self) -> None:
        """Open the trail for writing without a session (``hsmkms audit resume``)."""
        self._command = True
        self.start()

    def close(self) -> None:
        """End this writer's session with a ``shutdown`` seal (a server's writer that started)
        and, when the trail opened its database itself, release the connections."""
        try:
            if self._started and not self._command and not self._closed:
                self._closed = True
                self.seal(SealReason.SHUTDOWN)
        finally:
            self._key = None
            if self._owns_db:
                self._db.close()

    def _count_due(self, newest: Seal | None) -> int:
        """The sequence number at which a ``count`` seal falls due after ``newest``."""
        return 1 if newest is None else newest.record_seq + self._every

    def _due(self, newest: Seal | None, seq: int, *, heartbeat: bool = False) -> SealReason | None:
        if newest is None:
            return SealReason.COUNT
        if seq - newest.record_seq >= self._every:
            return SealReason.COUNT
        if seq > newest.record_seq or heartbeat:
            when = newest.time
            if when is None or self._clock() - when >= dt.timedelta(milliseconds=self._interval_ms):
                return SealReason.INTERVAL
        return None

    @staticmethod
    def _head(conn: Connection) -> tuple[int, bytes]:
        row = conn.execute(_HEAD).first()
        return (0, _GENESIS) if row is None else (row.seq, bytes(row.hash))

    @staticmethod
    def _newest_seal(conn: Connection) -> Seal | None:
        row = conn.execute(_NEWEST_SEAL).first()
        return None if row is None else _seal_from_row(row)

    def _anchor_name(self, conn: Connection) -> str:
        return anchor_name(self._audit_key(conn))

    def _seal(
        self,
        conn: Connection,
        reason: SealReason,
        *,
        head: tuple[int, bytes] | None = None,
        newest: Seal | bool | None = False,
        ended: tuple[str, ...] = (),
        resume_from: str | None = None,
    ) -> Seal:
        """Insert a seal over ``head`` (default: the current chain head), anchoring it in the
        token first. Write lock held. :class:`TrailCut` when the token's anchor names a seal
        this trail does not hold (other than the one a failed transaction anchored)."""
        key = self._audit_key(conn)
        record_seq, chain_hash = head if head is not None else self._head(conn)
        previous = self._newest_seal(conn) if newest is False else newest
        assert previous is None or isinstance(previous, Seal)
        name = anchor_name(key)
        supersedes = resume_from
        if resume_from is None:
            found = self.keystore.read_anchor(name)
            state = "empty" if found is None else _anchor_state(found, previous)
            if state == "cut":
                assert found is not None
                held = "no seal" if previous is None else f"seal {previous.seal_seq}"
                raise TrailCut(
                    f"The audit trail was cut: the token's anchor names seal "
                    f"{found.partition(':')[0]}, the trail ends at {held}. Restore the trail "
                    "or run hsmkms audit resume."
                )
            if state == "pending":
                supersedes = found
        unsigned = Seal(
            seal_seq=1 if previous is None else previous.seal_seq + 1,
            record_seq=record_seq,
            chain_hash=chain_hash,
            sealed_at=_seal_time(self._clock()),
            reason=reason.value,
            max_unsealed=self._every,
            interval_ms=self._interval_ms,
            prev_tag=_GENESIS if previous is None else previous.tag,
            tag=b"",
            writer=self.writer_id,
            ended=tuple(sorted(ended)),
            supersedes=supersedes,
        )
        seal = dataclasses.replace(unsigned, tag=self.keystore.mac(key, unsigned.payload()))
        # The token first: once the row commits, the anchor already names it.
        self.keystore.write_anchor(name, seal.anchor)
        conn.execute(_INSERT_SEAL, seal.row())
        self._own_last = self._clock() if seal.writer == self.writer_id else self._own_last
        if supersedes is not None and resume_from is None:
            log.warning("audit_seal_superseded", anchor=supersedes, seal=seal.seal_seq)
        return seal

    # -- reading --------------------------------------------------------------------------------

    def _exists(self, conn: Connection) -> bool:
        names = set(inspect(conn).get_table_names())
        return {"audit_settings", "audit_records", "audit_seals"} <= names

    def search(
        self,
        *,
        key_id: str | None = None,
        principal: str | None = None,
        event_name: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[AuditRecord]:
        """Records matching every filter given, oldest first.

        ``key_id``: a key id or key ARN among the record's ``resources``; ``principal``: the
        caller's ARN or access key id; ``event_name``: the operation (``Decrypt``);
        ``since``/``until``: ``eventTime`` bounds, both inclusive (to the second). The result
        is not proof of integrity — run :meth:`verify` for that.
        """
        clauses: list[Any] = []
        if key_id is not None:
            clauses.append(_R.c.key_ids.contains(f" {key_id_of(key_id)} ", autoescape=True))
        if principal is not None:
            clauses.append(or_(_R.c.principal == principal, _R.c.access_key_id == principal))
        if event_name is not None:
            clauses.append(_R.c.event_name == event_name)
        if since is not None:
            clauses.append(_R.c.event_time >= format_event_time(since))
        if until is not None:
            clauses.append(_R.c.event_time <= format_event_time(until))
        remaining = limit
        after = 0
        while remaining is None or remaining > 0:
            with self._read() as conn:
                if not self._exists(conn):
                    return
                query = select(_R.c.seq, _R.c.record).where(_R.c.seq > after, *clauses)
                rows = conn.execute(query.order_by(_R.c.seq).limit(_PAGE)).all()
            for row in rows:
                after = row.seq
                record = _load(row.record)
                if record is None or not _matches(
                    record, key_id, principal, event_name, since, until
                ):
                    continue
                yield record
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
            if len(rows) < _PAGE:
                return

    def records_after(self, seq: int, limit: int = _PAGE) -> list[tuple[int, AuditRecord]]:
        """The records numbered above ``seq``, oldest first, at most ``limit``, each with its
        number (``hsmkms audit tail -f`` follows the trail with it). Not proof of integrity."""
        with self._read() as conn:
            if not self._exists(conn):
                return []
            query = select(_R.c.seq, _R.c.record).where(_R.c.seq > seq).order_by(_R.c.seq)
            rows = conn.execute(query.limit(limit)).all()
        found = []
        for row in rows:
            record = _load(row.record)
            if record is not None:
                found.append((int(row.seq), record))
        return found

    def last_use(self, key_id: str, event_names: Collection[str]) -> AuditRecord | None:
        """The newest record of a *successful* call named in ``event_names`` (no
        ``errorCode``) among whose ``resources`` is ``key_id``: what GetKeyLastUsage reports.
        Read newest first, so the cost is the rows newer than that use (all rows for a key
        never used); nothing is added to the hot path of the calls themselves. Like
        :meth:`search`, not proof of integrity."""
        wanted = frozenset(event_names)
        # The key alone in SQL: with the event name too, SQLite would walk the event-name index
        # and sort, instead of reading the newest rows first and stopping at the first hit.
        clauses = [_R.c.key_ids.contains(f" {key_id_of(key_id)} ", autoescape=True)]
        before: int | None = None
        page = 8  # small first: the newest matching row is most often the answer
        while True:
            with self._read() as conn:
                if not self._exists(conn):
                    return None
                query = select(_R.c.seq, _R.c.record).where(*clauses)
                if before is not None:
                    query = query.where(_R.c.seq < before)
                rows = conn.execute(query.order_by(_R.c.seq.desc()).limit(page)).all()
            for row in rows:
                before = row.seq
                record = _load(row.record)
                if (
                    record is not None
                    and "errorCode" not in record
                    and record.get("eventName") in wanted
                    and key_id_of(key_id) in record_key_ids(record)
                ):
                    return record
            if len(rows) < page:
                return None
            page = min(page * 8, _PAGE)

    def first_event_time(self) -> dt.datetime | None:
        """The ``eventTime`` of the oldest record (when the trail began); None when empty."""
        with self._read() as conn:
            if not self._exists(conn):
                return None
            row = conn.execute(select(_R.c.event_time).order_by(_R.c.seq).limit(1)).first()
        return None if row is None else _parse_time(str(row.event_time))

    def tail(self, n: int = 10) -> list[AuditRecord]:
        """The newest ``n`` records, oldest first."""
        with self._read() as conn:
            if not self._exists(conn) or n <= 0:
                return []
            query = select(_R.c.record).order_by(_R.c.seq.desc()).limit(n)
            rows = conn.execute(query).all()
        records = [_load(row.record) for row in reversed(rows)]
        return [r for r in records if r is not None]

    # -- verification ---------------------------------------------------------------------------

    def verify(
        self, *, now: dt.datetime | None = None, expect_seal: tuple[int, bytes] | None = None
    ) -> VerifyResult:
        """Check the whole trail against the token: every seal's tag (inside the token), the
        chain of seals, the hash chain of every record, that each seal's chain hash is the
        recomputed one, the sequence numbers, that the trail ends at the seal the token's
        anchor names, and, at ``now`` (default: the clock), that every writer session either
        ended with a shutdown seal or is still sealing. ``expect_seal`` = (seal number, tag)
        kept outside the database from an earlier verify: the trail must still hold that seal
        (else it was rolled back). Stops at the first problem.

        Reads one snapshot of the database, then the anchor. A live writer that anchors and
        commits its next seal in between leaves the anchor one seal ahead of the snapshot, as
        an interrupted seal write does: then the trail is read again, up to
        ``_PENDING_READS`` times, ``_PENDING_PAUSE`` seconds apart, and an anchor still ahead
        is reported."""
        now = now or self._clock()
        for attempt in range(_PENDING_READS):
            if attempt:
                time.sleep(_PENDING_PAUSE)
            read = self._verify_snapshot(expect_seal)
            if isinstance(read, VerifyResult):
                return read
            seals, records, anchor = read
            if anchor is None or _anchor_state(anchor, seals[-1]) != "pending":
                break
        return _judge(seals, records, anchor, now)

    def _verify_snapshot(
        self, expect_seal: tuple[int, bytes] | None
    ) -> VerifyResult | tuple[list[Seal], int, str | None]:
        """One snapshot's seals and record count, and the anchor read after it; or the
        verdict on a snapshot that does not verify."""
        with self._read() as conn:
            if not self._exists(conn):
                return VerifyResult(
                    VerifyStatus.MISSING, 0, 0, 0, 0, None, "no audit trail in this database"
                )
            seals = [_seal_from_row(r) for r in conn.execute(select(_S).order_by(_S.c.seal_seq))]
            try:
                key = self._verify_key(conn)
                self._verify_seals(key, seals)
                if expect_seal is not None:
                    _check_expected(seals, *expect_seal)
                records = self._verify_records(conn, seals)
                anchor = self.keystore.read_anchor(anchor_name(key))
            except _Failed as failed:
                return VerifyResult(
                    failed.status,
                    0,
                    len(seals),
                    0,
                    0,
                    failed.first_bad,
                    failed.problem,
                    seals[-1].time if seals else None,
                )
        return seals, records, anchor

    def _verify_key(self, conn: Connection) -> KeyMaterialRef:
        settings = self._settings(conn)
        ref = settings.get("audit_key")
        if ref is None:
            raise _Failed(
                VerifyStatus.TAMPERED, "no audit key reference in the database (removed)", 1
            )
        try:
            return self._checked_key(ref)
        except ValueError as exc:
            raise _Failed(VerifyStatus.TAMPERED, f"audit key reference: {exc}", 1) from None

    def _verify_seals(self, key: KeyMaterialRef, seals: list[Seal]) -> None:
        if not seals:
            raise _Failed(VerifyStatus.TAMPERED, "seal 1: missing (every seal removed)", 1)
        previous: Seal | None = None
        for expected, seal in enumerate(seals, start=1):
            covered = 0 if previous is None else previous.record_seq
            if seal.seal_seq != expected:
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: missing (seal sequence jumps to {seal.seal_seq})",
                    covered + 1,
                )
            if not self.keystore.verify_mac(key, seal.payload(), seal.tag):
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: invalid tag (modified or forged seal)",
                    covered + 1,
                )
            expected_prev = _GENESIS if previous is None else previous.tag
            if not hmac.compare_digest(seal.prev_tag, expected_prev):
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: does not follow seal {expected - 1} "
                    "(seal removed, inserted or reordered)",
                    covered + 1,
                )
            if seal.record_seq < covered:
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: covers fewer records than seal {expected - 1}",
                    covered + 1,
                )
            if seal.record_seq == 0 and seal.chain_hash != _GENESIS:
                raise _Failed(VerifyStatus.TAMPERED, f"seal {expected}: bad genesis hash", 1)
            previous = seal

    def _verify_records(self, conn: Connection, seals: list[Seal]) -> int:
        """Walk the chain; returns the number of records. Raises :class:`_Failed`."""
        pending = [s for s in seals if s.record_seq > 0]
        at = 0
        sealed_through = 0
        prev = _GENESIS
        expected = 1
        query = select(_R).order_by(_R.c.seq).execution_options(yield_per=1000)
        for row in conn.execute(query):
            seq = row.seq
            if seq != expected:
                problem = (
                    f"record {expected}: missing (removed record; the sequence jumps to {seq})"
                    if seq > expected
                    else f"record {seq}: unexpected sequence number (inserted record)"
                )
                raise _Failed(VerifyStatus.TAMPERED, problem, min(seq, expected))
            body = bytes(row.record)
            digest = hashlib.sha256(prev + body).digest()
            if not hmac.compare_digest(digest, bytes(row.hash)):
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"record {seq}: hash chain broken (modified, inserted or removed record)",
                    seq,
                )
            while at < len(pending) and pending[at].record_seq == seq:
                if not hmac.compare_digest(digest, pending[at].chain_hash):
                    raise _Failed(
                        VerifyStatus.TAMPERED,
                        f"record {sealed_through + 1}: records {sealed_through + 1}..{seq} do "
                        f"not match seal {pending[at].seal_seq} (modified, inserted or removed "
                        "record, hash chain recomputed)",
                        sealed_through + 1,
                    )
                sealed_through = seq
                at += 1
            record = _load(body)
            try:
                if record is None or _index_values(record) != _row_index(row):
                    raise ValueError
            except ValueError:
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"record {seq}: search columns do not match the record (edited)",
                    seq,
                ) from None
            prev = digest
            expected += 1
        last = expected - 1
        if at < len(pending):
            seal = pending[at]
            raise _Failed(
                VerifyStatus.TAMPERED,
                f"record {last + 1}: missing (seal {seal.seal_seq} covers records through "
                f"{seal.record_seq} but the trail ends at {last}: tail removed)",
                last + 1,
            )
        return last


def _judge(seals: list[Seal], records: int, anchor: str | None, now: dt.datetime) -> VerifyResult:
    """The verdict on a trail whose seals and records verified: the anchor, the writer
    sessions, what is unsealed (``docs/audit.md``, "What verify proves after a crash")."""
    newest = seals[-1]
    unsealed = records - newest.record_seq
    warnings: list[str] = []
    result = VerifyResult(
        VerifyStatus.OK, records, len(seals), newest.record_seq, unsealed, None, None,
        newest.time, tuple(_gaps(seals)), newest, anchor=anchor,
    )  # fmt: skip
    after = newest.record_seq + 1

    def verdict(status: VerifyStatus, problem: str) -> VerifyResult:
        return dataclasses.replace(
            result, status=status, first_bad_seq=after, problem=problem, warnings=tuple(warnings)
        )

    # The anchor: the token names the newest seal the trail was given.
    sessioned = any(s.writer is not None for s in seals)
    pending = False
    if anchor is not None:
        state = _anchor_state(anchor, newest)
        anchored = _anchor_seq(anchor)
        if state == "cut":
            if anchored is not None and anchored <= newest.seal_seq:
                return verdict(
                    VerifyStatus.TAMPERED,
                    f"seal {anchored}: not the seal anchored in the token (trail replaced)",
                )
            return verdict(
                VerifyStatus.TAMPERED,
                f"record {after}: missing (the token's anchor names seal {anchored} but the "
                f"trail ends at seal {newest.seal_seq}: seals and records removed from the "
                "tail)",
            )
        if state == "behind":
            warnings.append(
                f"the token's anchor names seal {anchored}, older than the newest seal "
                f"{newest.seal_seq}: seals were written without it (an older hsmkms)"
            )
        pending = state == "pending"
    elif sessioned:
        return verdict(
            VerifyStatus.STALE,
            "the token holds no anchor for this trail: whether seals and records were "
            "removed from the tail cannot be told",
        )
    else:
        warnings.append("no anchor in the token (a trail written before anchors)")

    for seal in seals:
        if seal.supersedes is None:
            continue
        lost = _anchor_seq(seal.supersedes)
        if seal.reason == SealReason.RESUME:
            warnings.append(
                f"seal {seal.seal_seq} ({seal.sealed_at}): the trail was resumed after a cut; "
                f"the token's anchor had named seal {lost}, which the trail no longer held "
                "(seals and records removed from the tail before that time)"
            )
        else:
            warnings.append(
                f"seal {seal.seal_seq} ({seal.sealed_at}): replaces the anchored seal {lost}, "
                "which was never committed (a write interrupted by a crash or a failed commit) "
                "— or which was removed with the records after the seal before it"
            )

    if newest.writer is None:
        # A trail written before sessions: the newest seal's own promise is all there is.
        result = dataclasses.replace(result, warnings=tuple(warnings))
        if not newest.promises and unsealed == 0:
            return result
        return _legacy_staleness(result, newest, unsealed, now)

    unclean, live, continued = _sessions(seals, now)
    warnings.extend(continued)
    result = dataclasses.replace(result, unclean=unclean, live=live, warnings=tuple(warnings))
    if unsealed > newest.max_unsealed and newest.promises:
        return verdict(
            VerifyStatus.STALE,
            f"trail stale: {unsealed} records after the newest seal (seal {newest.seal_seq}) "
            f"where at most {newest.max_unsealed} are allowed (sealing failing)",
        )
    if pending:
        return verdict(
            VerifyStatus.UNCLEAN,
            f"the token's anchor names seal {newest.seal_seq + 1}, which the trail does not "
            f"hold: its write was interrupted (a crash, or a failed commit such as a full "
            f"disk) — or it was removed with the records after seal {newest.seal_seq}. "
            f"Intact through seal {newest.seal_seq} (record {newest.record_seq})",
        )
    stopped = [u for u in unclean if u.noted_by is None]
    if stopped:
        names = ", ".join(
            f"{u.writer} (newest seal {u.last_seal}, {u.last_seal_at})" for u in stopped
        )
        tail = (
            f"; {unsealed} records after it are chained but not sealed"
            if unsealed
            else "; no record after it"
        )
        return verdict(
            VerifyStatus.UNCLEAN,
            f"writer stopped without a clean shutdown: {names}. Intact through seal "
            f"{newest.seal_seq} (record {newest.record_seq}), which the token's anchor "
            f"names{tail}",
        )
    if unsealed and not live:
        return verdict(
            VerifyStatus.UNCLEAN,
            f"{unsealed} records after the newest seal (seal {newest.seal_seq}) are not "
            "sealed: the writer that appended them stopped before sealing them",
        )
    return result


def _legacy_staleness(
    result: VerifyResult, newest: Seal, unsealed: int, now: dt.datetime
) -> VerifyResult:
    """Staleness judged by the newest seal alone (seals from before writer sessions)."""
    if unsealed > newest.max_unsealed:
        return dataclasses.replace(
            result,
            status=VerifyStatus.STALE,
            first_bad_seq=newest.record_seq + 1,
            problem=f"trail stale: {unsealed} records after the newest seal (seal "
            f"{newest.seal_seq}) where at most {newest.max_unsealed} are allowed (seals "
            "removed, or sealing failing)",
        )
    allowed = STALE_FACTOR * newest.interval_ms / 1000
    sealed_at = newest.time
    age = float("inf") if sealed_at is None else (now - sealed_at).total_seconds()
    if age > allowed:
        return dataclasses.replace(
            result,
            status=VerifyStatus.STALE,
            first_bad_seq=newest.record_seq + 1,
            problem=f"trail stale: the newest seal (seal {newest.seal_seq}, "
            f"{newest.sealed_at}) is {age:.0f} s old, more than the {allowed:g} s allowed "
            "(records and seals removed from the tail, or the writer stopped without a "
            "shutdown seal)",
        )
    return result


def _sessions(
    seals: list[Seal], now: dt.datetime
) -> tuple[tuple[UncleanStop, ...], tuple[str, ...], list[str]]:
    """The writer sessions of ``seals``: those that stopped without a shutdown seal (noted
    by a ``recover`` seal or not), those still live at ``now``, and warnings for sessions
    that sealed after being declared stopped (a stall)."""
    tracker = _Sessions()
    unclean: list[UncleanStop] = []
    warnings: list[str] = []
    declared: set[str] = set()
    for seal in seals:
        if seal.writer is None:
            continue
        if seal.writer in declared and seal.reason != SealReason.START:
            declared.discard(seal.writer)
            warnings.append(
                f"seal {seal.seal_seq}: writer {seal.writer} sealed again after it was "
                "declared stopped (it stalled for longer than its promise)"
            )
            session = tracker.by_writer(seal.writer)
            if session is not None:
                session.open = True
        for writer in seal.ended:
            session = tracker.by_writer(writer)
            if session is not None and session.open:
                unclean.append(
                    UncleanStop(writer, session.last_seal, _time_text(session), seal.seal_seq)
                )
                declared.add(writer)
        tracker.add(seal)
    live = []
    overdue = set(tracker.overdue(now))
    for writer, session in tracker.open_sessions().items():
        if writer in overdue:
            unclean.append(UncleanStop(writer, session.last_seal, _time_text(session), None))
        else:
            live.append(writer)
    return tuple(unclean), tuple(sorted(live)), warnings


def _time_text(session: _Session) -> str:
    when = session.last_at
    return "unknown time" if when is None else _seal_time(when)


def _row_index(row: Any) -> dict[str, Any]:
    return {
        "event_time": row.event_time,
        "event_name": row.event_name,
        "principal": row.principal,
        "access_key_id": row.access_key_id,
        "key_ids": row.key_ids,
    }


def _load(body: bytes) -> AuditRecord | None:
    try:
        value = json.loads(bytes(body))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _seal_from_values(values: Any) -> Seal:
    """A seal from a driver row in ``_SEAL_COLUMNS`` order."""
    (seal_seq, record_seq, chain_hash, sealed_at, reason, max_unsealed, interval, prev, tag,
     writer, ended, supersedes) = values  # fmt: skip
    return Seal(
        seal_seq, record_seq, bytes(chain_hash), sealed_at, reason, max_unsealed, interval,
        bytes(prev), bytes(tag), writer, _ended(ended), supersedes,
    )  # fmt: skip


def _ended(text: str | None) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


def _seal_from_row(row: Any) -> Seal:
    return Seal(
        seal_seq=row.seal_seq,
        record_seq=row.record_seq,
        chain_hash=bytes(row.chain_hash),
        sealed_at=row.sealed_at,
        reason=row.reason,
        max_unsealed=row.max_unsealed,
        interval_ms=row.interval_ms,
        prev_tag=bytes(row.prev_tag),
        tag=bytes(row.tag),
        writer=row.writer,
        ended=_ended(row.ended),
        supersedes=row.supersedes,
    )


def _check_expected(seals: list[Seal], seal_seq: int, tag: bytes) -> None:
    """The (already verified) ``seals`` hold seal ``seal_seq`` with ``tag``."""
    if seal_seq < 1 or seal_seq > len(seals):
        newest = seals[-1].seal_seq if seals else 0
        raise _Failed(
            VerifyStatus.TAMPERED,
            f"seal {seal_seq}: missing (the trail ends at seal {newest}: rolled back)",
            (seals[-1].record_seq if seals else 0) + 1,
        )
    seal = seals[seal_seq - 1]
    if not hmac.compare_digest(seal.tag, tag):
        previous = seals[seal_seq - 2].record_seq if seal_seq > 1 else 0
        raise _Failed(
            VerifyStatus.TAMPERED,
            f"seal {seal_seq}: not the seal recorded earlier (trail rolled back or replaced)",
            previous + 1,
        )


def _gaps(seals: list[Seal]) -> Iterator[SealGap]:
    """Consecutive seals further apart than the first promised: of the trail for seals from
    before writer sessions, of each session's own seals after."""
    legacy = [s for s in seals if s.writer is None]
    pairs: list[tuple[Seal, Seal]] = list(itertools.pairwise(legacy))
    by_writer: dict[str, Seal] = {}
    for seal in seals:
        if seal.writer is None:
            continue
        before = by_writer.get(seal.writer)
        if before is not None:
            pairs.append((before, seal))
        by_writer[seal.writer] = seal
    for before, after in sorted(pairs, key=lambda p: p[0].seal_seq):
        start, end = before.time, after.time
        if not before.promises or start is None or end is None:
            continue
        allowed = STALE_FACTOR * before.interval_ms / 1000
        seconds = (end - start).total_seconds()
        if seconds > allowed:
            yield SealGap(before.seal_seq, seconds, allowed)
