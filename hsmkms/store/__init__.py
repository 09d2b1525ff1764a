"""The metadata store: key metadata, versions, aliases, tags and grants in SQL. Never a secret;
never trusted either: rows that decide security carry a token MAC (:mod:`.integrity`)."""

from __future__ import annotations

from hsmkms.store.integrity import IntegrityProblem, RowSealer, TokenRowSealer
from hsmkms.store.metadata import (
    DuplicateAlias,
    KeyMissing,
    LimitReached,
    MetadataStore,
    StoreError,
    VersionConflict,
)
from hsmkms.store.records import (
    DELETING,
    AliasRecord,
    GrantRecord,
    KeyRecord,
    KeyVersionRecord,
    Page,
)

__all__ = [
    "DELETING",
    "AliasRecord",
    "DuplicateAlias",
    "GrantRecord",
    "IntegrityProblem",
    "KeyMissing",
    "KeyRecord",
    "KeyVersionRecord",
    "LimitReached",
    "MetadataStore",
    "Page",
    "RowSealer",
    "StoreError",
    "TokenRowSealer",
    "VersionConflict",
]
