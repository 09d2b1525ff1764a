"""Integrity tags on the metadata rows that decide security: the database is not trusted.

Every ``keys``, ``key_versions``, ``grants``, ``aliases``, ``tags``, ``import_tokens`` and
``imported_key_material`` row carries ``mac``: HMAC-SHA-256, computed
inside the token with a dedicated non-extractable key (label ``hsmkms:metadata-integrity``),
over the row's canonical bytes::

    b"hsmkms-row-v1" || field(table name) || field(value) for each column of SEALED_COLUMNS[table]

    field(b)          = 4-byte big-endian length of b || b
    value None        = b"N"
    value bool        = b"B0" | b"B1"
    value int         = b"I" || ASCII decimal
    value str         = b"S" || UTF-8
    value datetime    = b"T" || "YYYY-MM-DDTHH:MM:SS.ffffffZ" (UTC)

The table name and every column (the primary key among them) are inside, so a row edited,
copied to another key (an alias repointed, a tag moved), or moved to another table fails its
check. The column lists are part of the format: a column added to a sealed table later needs a
new format version and a re-seal. A table added to :data:`SEALED_COLUMNS` later leaves every
existing row's bytes unchanged, but its own existing rows have no MAC: the store adopts them
once (``aliases`` and ``tags`` joined this way, with migration 4; ``import_tokens`` and
``imported_key_material``, new and empty, with migration 5).

:class:`RowSealer` is the seam the store sees (the store never imports ``pkcs11``);
:class:`TokenRowSealer` is the implementation over a :class:`~hsmkms.keystore.base.Keystore`.
What is and is not detected: ``docs/metadata-store.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import threading
from collections.abc import Mapping
from typing import Any, Final, Protocol

from hsmkms.errors import KMSInternalException
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName, checked_mac_key
from hsmkms.keystore.specs import KeyMaterialSpec

__all__ = [
    "INTEGRITY_KEY_NAME",
    "SEALED_COLUMNS",
    "IntegrityProblem",
    "RowSealer",
    "RowVerifier",
    "TokenRowSealer",
    "canonical_row",
    "safe_alias_name",
    "safe_key_id",
    "safe_tag_key",
]

INTEGRITY_KEY_NAME: Final = "metadata-integrity"
_DOMAIN: Final = b"hsmkms-row-v1"

SEALED_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "keys": (
        "id", "arn", "description", "key_usage", "key_spec", "origin", "state", "created_at",
        "deletion_date", "pending_window_days", "policy", "rotation_enabled",
        "rotation_period_days", "next_rotation_date", "current_version", "on_demand_rotations",
    ),
    "key_versions": ("key_id", "version", "material_ref", "profile", "created_at",
                     "rotation_type"),
    "grants": (
        "id", "key_id", "name", "grantee_principal", "retiring_principal", "operations",
        "constraints", "issuing_account", "created_at",
    ),
    "aliases": ("name", "key_id", "created_at", "updated_at"),
    "tags": ("key_id", "tag_key", "tag_value"),
    "import_tokens": ("id", "key_id", "wrapping_algorithm", "wrapping_key_spec", "wrapping_key",
                      "created_at", "valid_to"),
    "imported_key_material": ("key_id", "version", "key_material_id", "expiration_model",
                              "valid_to", "description", "import_state", "imported_at",
                              "rotation_date"),
}  # fmt: skip
"""Per sealed table, the columns a MAC covers, in order: every column but ``mac``."""

_SAFE_KEY_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_SAFE_ALIAS_NAME = re.compile(r"alias/[A-Za-z0-9:/_-]{1,250}")
_SAFE_TAG_KEY = re.compile(r"[A-Za-z0-9 _.:/=+@-]{1,128}")


class RowSealer(Protocol):
    """Computes and checks row MACs with a key the database cannot forge.

    The store keeps the key's reference (never a secret) in its ``store_settings`` table: it
    calls :meth:`create_key` once, when the database has no reference yet, and
    :meth:`use_key` with the stored reference on every later open.
    """

    def create_key(self) -> str:
        """Make a new sealing key and use it; returns its reference for the store to keep."""
        ...

    def use_key(self, reference: str) -> None:
        """Use the key ``reference`` names (as :meth:`create_key` returned it). May check it
        lazily: then the first :meth:`seal` or :meth:`verify` raises when it names no sealing
        key."""
        ...

    def seal(self, data: bytes) -> bytes:
        """The MAC of ``data``."""
        ...

    def verify(self, data: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the MAC of ``data``."""
        ...


class TokenRowSealer:
    """A :class:`RowSealer` over the keystore: HMAC-SHA-256 inside the token, with a dedicated
    non-extractable HMAC_256 key (labelled ``hsmkms:metadata-integrity``). Thread-safe.

    A stored reference is checked against the (trusted) token on first use — the object must
    exist and carry this key's label — so a reference swapped for another key's fails closed
    (``KMSInternalException``).
    """

    def __init__(self, keystore: Keystore) -> None:
        self._keystore = keystore
        self._lock = threading.Lock()
        self._reference: str | None = None
        self._key: KeyMaterialRef | None = None

    def create_key(self) -> str:
        key = self._keystore.create(
            KeyMaterialSpec.HMAC_256, MaterialName.service_key(INTEGRITY_KEY_NAME)
        )
        with self._lock:
            self._key, self._reference = key, key.to_str()
        return key.to_str()

    def use_key(self, reference: str) -> None:
        with self._lock:
            if reference != self._reference:
                self._key, self._reference = None, reference

    def _checked(self) -> KeyMaterialRef:
        key = self._key
        if key is not None:
            return key
        with self._lock:
            if self._key is None:
                if self._reference is None:
                    raise KMSInternalException("The metadata store has no integrity key.")
                try:
                    self._key = checked_mac_key(self._keystore, self._reference, INTEGRITY_KEY_NAME)
                except ValueError as exc:
                    raise KMSInternalException(
                        f"The metadata store's integrity key is wrong: {exc}."
                    ) from exc
            return self._key

    def seal(self, data: bytes) -> bytes:
        return self._keystore.mac(self._checked(), data)

    def verify(self, data: bytes, tag: bytes) -> bool:
        return self._keystore.verify_mac(self._checked(), data, tag)


def _encode_value(value: Any) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"B1" if value else b"B0"
    if isinstance(value, int):
        return b"I" + str(value).encode("ascii")
    if isinstance(value, str):
        return b"S" + value.encode("utf-8")
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("sealed timestamps must be aware")
        utc = value.astimezone(dt.UTC)
        return b"T" + utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode("ascii")
    raise TypeError(f"cannot seal a {type(value).__name__}")


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def canonical_row(table: str, values: Mapping[Any, Any]) -> bytes:
    """The bytes a row's MAC covers (layout in the module docstring). ``values`` maps column
    names to values as the store reads them back (aware datetimes, bools, ints, strs)."""
    parts = [_DOMAIN, _field(table.encode("ascii"))]
    parts += [_field(_encode_value(values[c])) for c in SEALED_COLUMNS[table]]
    return b"".join(parts)


def _safe(value: Any, pattern: re.Pattern[str], unreadable: str) -> str:
    """``value`` for a message when the (untrusted) row's value matches ``pattern``, else
    ``unreadable``: error messages and logs never carry other row content (no control
    characters reach a terminal or a log)."""
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    return unreadable


def safe_key_id(key_id: Any) -> str:
    """A row's key id for a message, or ``"(unreadable id)"``."""
    return _safe(key_id, _SAFE_KEY_ID, "(unreadable id)")


def safe_alias_name(name: Any) -> str:
    """A row's alias name for a message, or ``"(unreadable alias)"``."""
    return _safe(name, _SAFE_ALIAS_NAME, "(unreadable alias)")


def safe_tag_key(tag_key: Any) -> str:
    """A row's tag key (letters, digits, spaces and ``_.:/=+@-``) for a message, or
    ``"(unreadable tag key)"``."""
    return _safe(tag_key, _SAFE_TAG_KEY, "(unreadable tag key)")


@dataclasses.dataclass(frozen=True)
class IntegrityProblem:
    """One row that failed its integrity check. ``key_id`` is the key the row names; ``detail``
    names the row (version number, grant id, alias name, tag key) and what is wrong, never the
    row's other content."""

    table: str
    key_id: str
    detail: str


class RowVerifier:
    """Seals and checks rows through a :class:`RowSealer`, remembering successful checks.

    A check of a row costs one token call; the store re-reads the same rows constantly (every
    commit anywhere empties its read cache). So the last verified ``(sha256 of the canonical
    bytes, tag)`` of each ``(table, primary key)`` is kept in a bounded dict, and a re-read of
    an unchanged row costs no token call. Only successes are remembered. Thread-safe.
    """

    def __init__(self, sealer: RowSealer, *, max_entries: int = 100_000) -> None:
        self.sealer = sealer
        self._max = max_entries
        self._lock = threading.Lock()
        self._verified: dict[tuple[str, tuple[Any, ...]], tuple[bytes, bytes]] = {}

    def _remember(self, slot: tuple[str, tuple[Any, ...]], digest: bytes, tag: bytes) -> None:
        with self._lock:
            if len(self._verified) >= self._max:
                self._verified.clear()
            self._verified[slot] = (digest, tag)

    def seal(self, table: str, pk: tuple[Any, ...], values: Mapping[Any, Any]) -> bytes:
        """The MAC of a row (a token call); the pair is remembered as verified."""
        data = canonical_row(table, values)
        tag = self.sealer.seal(data)
        self._remember((table, pk), hashlib.sha256(data).digest(), tag)
        return tag

    def verify(
        self, table: str, pk: tuple[Any, ...], values: Mapping[Any, Any], tag: bytes | None
    ) -> str | None:
        """``None`` when the row's MAC ``tag`` is right, else what is wrong (no row content)."""
        if tag is None:
            return "MAC missing"
        tag = bytes(tag)
        try:
            data = canonical_row(table, values)
        except (TypeError, ValueError):
            return "row unreadable"
        digest = hashlib.sha256(data).digest()
        slot = (table, pk)
        with self._lock:
            if self._verified.get(slot) == (digest, tag):
                return None
        if not self.sealer.verify(data, tag):
            return "MAC does not match the row"
        self._remember(slot, digest, tag)
        return None

    def forget(self) -> None:
        """Drop every remembered check."""
        with self._lock:
            self._verified.clear()
