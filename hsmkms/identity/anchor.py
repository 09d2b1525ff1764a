"""Keeping a set of sealed secrets fresh: the token anchors a digest of the whole set, so rows
put back from an older copy of the database are not accepted (the seal alone binds no time).

Used by the KMS API's credentials (:mod:`hsmkms.identity.store`) and the XKS proxy's
(:mod:`hsmkms.identity.xks`). A set is its rows' ``(id, IV, sealed secret)`` in id order; the
IV and the sealed bytes change at every sealing, so any change, deletion or re-sealing changes
the digest (40 hex characters of SHA-256 under a per-set domain, an anchor's size).

Every change writes the new digest as the *pending* anchor before its commit and as the
anchor after it, so a crash between the two leaves a set that still verifies. A reader accepts
a row only as a row of the anchored set (:meth:`SetAnchor.holds`); a set matching neither
anchor is an older copy and is refused (a warning logged once per set) until the
operator vouches for it (:meth:`SetAnchor.trust`). A set without an anchor yet is anchored as
it is on first use. Anchor names follow the wrapping key, so two databases sharing a token
keep apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import structlog
from sqlalchemy import Column, Connection, Table, delete, insert, select

from hsmkms.keystore.base import KeyMaterialRef, Keystore

__all__ = ["Sealings", "SetAnchor"]

log = structlog.get_logger(__name__)

Sealings = dict[str, tuple[bytes, bytes]]
"""Row id -> (IV, sealed secret): a set as its digest covers it."""


class SetAnchor:
    """The token's anchor of one table's set of sealed secrets. Thread-safe enough: the
    remembered set is one tuple, replaced whole.

    ``table``'s columns ``id_column``, ``iv_column`` and ``sealed_column`` make the set;
    ``domain`` separates its digests from other sets'; ``name`` prefixes the anchor names
    (``<name>:<wrapping key id>`` and ``<name>-pending:<id>``), ``event`` the log events
    (``<event>_anchored``, ``<event>_stale``)."""

    def __init__(
        self,
        keystore: Keystore,
        table: Table,
        *,
        id_column: str,
        iv_column: str = "secret_iv",
        sealed_column: str = "secret_sealed",
        domain: bytes,
        name: str,
        event: str,
    ) -> None:
        self._keystore = keystore
        self._columns: tuple[Column[Any], ...] = (
            table.c[id_column],
            table.c[iv_column],
            table.c[sealed_column],
        )
        self._domain = domain
        self._name = name
        self._event = event
        # The set last found anchored: its digest and sealings.
        self._verified: tuple[str, Sealings] | None = None
        self._stale: str | None = None  # the digest last refused (logged once)

    def __repr__(self) -> str:
        return f"SetAnchor({self._name!r})"

    def names(self, ref: KeyMaterialRef) -> tuple[str, str]:
        """(anchor, pending anchor) of the set sealed under the wrapping key ``ref``."""
        object_id = ref.object_ids[0][:16]
        return f"{self._name}:{object_id}", f"{self._name}-pending:{object_id}"

    def read(self, conn: Connection) -> tuple[str, Sealings]:
        """The set as this transaction sees it: its digest and sealings."""
        digest = hashlib.sha256(self._domain)
        sealings: Sealings = {}
        key = self._columns[0]
        for row_id, iv, sealed in conn.execute(select(*self._columns).order_by(key)):
            sealings[str(row_id)] = (bytes(iv), bytes(sealed))
            for field in (str(row_id).encode(), bytes(iv), bytes(sealed)):
                digest.update(len(field).to_bytes(4, "big") + field)
        return digest.hexdigest()[:40], sealings

    def holds(
        self,
        conn: Connection,
        ref: KeyMaterialRef,
        row: tuple[str, bytes, bytes] | None = None,
    ) -> bool:
        """Whether the set ``conn`` sees is the one anchored in the token (or the pending one,
        then made the anchor); a set with no anchor yet is anchored as it is.

        With ``row`` (``(id, IV, sealed)`` read in ``conn``): one token read when the anchor is
        the set last verified here and ``row`` is that set's row for its id (then the row is
        current, whatever else changed); otherwise the whole set is read and checked."""
        anchor, pending = self.names(ref)
        found = self._keystore.read_anchor(anchor)
        verified = self._verified
        if (
            row is not None
            and verified is not None
            and found == verified[0]
            and verified[1].get(row[0]) == (row[1], row[2])
        ):
            return True
        current = self.read(conn)
        digest = current[0]
        if found is None:
            self._keystore.write_anchor(anchor, digest)
            log.info(f"{self._event}_anchored")
        elif found != digest:
            if self._keystore.read_anchor(pending) != digest:
                if self._stale != digest:
                    self._stale = digest
                    log.warning(f"{self._event}_stale")
                return False
            self._keystore.write_anchor(anchor, digest)  # the change committed; its anchor
        self._verified = current
        return True

    @contextlib.contextmanager
    def changing(
        self,
        transaction: AbstractContextManager[Connection],
        ref: KeyMaterialRef,
        stale: Callable[[], Exception],
    ) -> Iterator[Connection]:
        """``transaction`` (a write transaction) for a change of the set: the set must verify
        first (``stale()`` is raised otherwise: an old copy is not built on); the new digest
        is written as the pending anchor before the commit and as the anchor after it."""
        anchor, pending = self.names(ref)
        with transaction as conn:
            if not self.holds(conn, ref):
                raise stale()
            yield conn
            verified = self.read(conn)
            self._keystore.write_anchor(pending, verified[0])
        self._keystore.write_anchor(anchor, verified[0])
        self._verified = verified

    def trust(
        self, transaction: AbstractContextManager[Connection], ref: KeyMaterialRef, meta: Table
    ) -> int:
        """Vouch for the set now in the database (after restoring an older copy on purpose):
        it becomes the anchored set. Returns how many rows it holds. The row ``trusted`` of
        ``meta`` (a ``name -> value`` table) is rewritten, so the database's change signal
        moves and running servers drop the refusals their read caches hold."""
        anchor, pending = self.names(ref)
        with transaction as conn:
            verified = self.read(conn)
            self._keystore.write_anchor(pending, verified[0])
            self._keystore.write_anchor(anchor, verified[0])
            conn.execute(delete(meta).where(meta.c.name == "trusted"))
            stamp = f"{verified[0]} {secrets.token_hex(8)}"
            conn.execute(insert(meta).values(name="trusted", value=stamp))
        self._verified = verified
        return len(verified[1])
