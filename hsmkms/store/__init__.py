"""The metadata store: key metadata, versions, aliases, tags and grants in SQL. Never a secret;
never trusted either: rows that decide security carry a token MAC (:mod:`.integrity`)."""

from __future__ import annotations

from hsmkms.store.integrity import IntegrityProblem, RowSealer, TokenRowSealer
from hsmkms.store.metadata import (
    DuplicateAlias,
    ImportConflict,
    KeyMissing,
    LimitReached,
    MetadataStore,
    StoreError,
    VersionConflict,
)
from hsmkms.store.records import (
    DELETING,
    IMPORTED,
    PENDING_IMPORT,
    AliasRecord,
    GrantRecord,
    ImportedMaterialRecord,
    ImportTokenRecord,
    KeyRecord,
    KeyVersionRecord,
    Page,
)

__all__ = [
    "DELETING",
    "IMPORTED",
    "PENDING_IMPORT",
    "AliasRecord",
    "DuplicateAlias",
    "GrantRecord",
    "ImportConflict",
    "ImportTokenRecord",
    "ImportedMaterialRecord",
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
