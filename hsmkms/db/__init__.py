"""The one database layer: connection set-up, transactions, the mapping of database errors,
the migration runner and its version table, and read caches kept right by a change signal.

SQLite is the embedded default. Everything that differs between database engines lives in
this package (:mod:`hsmkms.db.dialects`); the components above it (the metadata store, the
identity store, the audit trail) write SQLAlchemy Core against a :class:`Database` and never
name a dialect. ``tests/test_db.py`` fails when one does.
"""

from __future__ import annotations

from hsmkms.db.cache import ChangeSignal, NoChangeSignal, ReadCache
from hsmkms.db.database import (
    Database,
    database_exists,
    database_location,
    file_url,
    snapshot_database,
)
from hsmkms.db.dialects import check_database_file
from hsmkms.db.errors import ErrorMessages
from hsmkms.db.migrations import (
    Component,
    LegacyMarker,
    Migration,
    add_column,
    drop_unique,
    migrate,
    rebuild_table,
)
from hsmkms.db.types import BigIntKey, UTCDateTime

__all__ = [
    "BigIntKey",
    "ChangeSignal",
    "Component",
    "Database",
    "ErrorMessages",
    "LegacyMarker",
    "Migration",
    "NoChangeSignal",
    "ReadCache",
    "UTCDateTime",
    "add_column",
    "check_database_file",
    "database_exists",
    "database_location",
    "drop_unique",
    "file_url",
    "migrate",
    "rebuild_table",
    "snapshot_database",
]
