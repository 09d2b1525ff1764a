"""The metadata store: key metadata, versions, aliases and tags in SQL. Never a secret."""

from __future__ import annotations

from hsmkms.store.metadata import (
    DuplicateAlias,
    KeyMissing,
    LimitReached,
    MetadataStore,
    StoreError,
    VersionConflict,
)
from hsmkms.store.records import DELETING, AliasRecord, KeyRecord, KeyVersionRecord, Page

__all__ = [
    "DELETING",
    "AliasRecord",
    "DuplicateAlias",
    "KeyMissing",
    "KeyRecord",
    "KeyVersionRecord",
    "LimitReached",
    "MetadataStore",
    "Page",
    "StoreError",
    "VersionConflict",
]
