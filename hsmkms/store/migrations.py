"""The metadata store's migrations, run by the database layer's runner
(:mod:`hsmkms.db.migrations`), which records them in ``schema_migrations`` as component
``metadata``.

``MIGRATIONS`` is append-only: once a release ships, a migration function is frozen. When the
schema changes, write the new DDL as a new migration and update :mod:`hsmkms.store.schema` to
match; ``tests/test_store.py`` checks that a migrated database matches the declared schema.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, Connection, LargeBinary

from hsmkms.db import Component, Migration, add_column
from hsmkms.store import schema

__all__ = ["COMPONENT", "MIGRATIONS"]


def _v1_initial(conn: Connection) -> None:
    # Before the first release the declared schema is version 1.
    schema.metadata.create_all(conn, tables=list(schema.APPLICATION_TABLES), checkfirst=True)


def _v2_grants(conn: Connection) -> None:
    schema.grants.create(conn, checkfirst=True)


def _add_mac_columns(conn: Connection, *tables: str) -> None:
    # A database made by migration 1 of this code already has the columns; one made by an
    # earlier hsmkms gets them here. Existing rows keep mac NULL until a store opened with a
    # sealer adopts them.
    for table in tables:
        add_column(conn, table, Column("mac", LargeBinary))


def _v3_row_macs(conn: Connection) -> None:
    _add_mac_columns(conn, "keys", "key_versions")
    schema.store_settings.create(conn, checkfirst=True)


def _v4_alias_tag_macs(conn: Connection) -> None:
    _add_mac_columns(conn, "aliases", "tags")


def _v5_imported_key_material(conn: Connection) -> None:
    schema.import_tokens.create(conn, checkfirst=True)
    schema.imported_key_material.create(conn, checkfirst=True)


MIGRATIONS: Final[list[Migration]] = [
    Migration(1, "initial schema: keys, key_versions, aliases, tags", _v1_initial),
    Migration(2, "grants", _v2_grants),
    Migration(3, "integrity MACs on keys and key_versions; store_settings", _v3_row_macs),
    Migration(4, "integrity MACs on aliases and tags", _v4_alias_tag_macs),
    Migration(
        5, "imported key material: import_tokens, imported_key_material", _v5_imported_key_material
    ),
]

COMPONENT: Final = Component("metadata", MIGRATIONS)
"""The metadata store's tables, for :func:`hsmkms.db.migrate`."""
