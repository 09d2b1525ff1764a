"""A tiny ordered migration runner.

``MIGRATIONS`` is an append-only list of ``(version, name, function)``; each function receives a
connection inside the runner's transaction and must use dialect-neutral DDL. The runner records
every applied version in ``schema_migrations`` and skips those already there, so running it again
(or from two processes at once: the runner holds the write lock) is harmless.

Rule for the future: once a release ships, a migration function is frozen. When the schema
changes, write the new DDL as a new migration and update :mod:`hsmkms.store.schema` to match;
``tests/test_store.py`` checks that a migrated database matches the declared schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from sqlalchemy import Connection, LargeBinary, inspect, select, text

from hsmkms.store import schema
from hsmkms.types import Clock

Migration = tuple[int, str, Callable[[Connection], None]]


def _v1_initial(conn: Connection) -> None:
    # Before the first release the declared schema is version 1.
    schema.metadata.create_all(conn, tables=list(schema.APPLICATION_TABLES), checkfirst=True)


def _v2_grants(conn: Connection) -> None:
    schema.grants.create(conn, checkfirst=True)


def _add_mac_columns(conn: Connection, *tables: str) -> None:
    # A database made by migration 1 of this code already has the columns; one made by an
    # earlier hsmkms gets them here. Existing rows keep mac NULL until a store opened with a
    # sealer adopts them.
    blob = LargeBinary().compile(dialect=conn.dialect)
    for table in tables:
        columns = {c["name"] for c in inspect(conn).get_columns(table)}
        if "mac" not in columns:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN mac {blob}"))


def _v3_row_macs(conn: Connection) -> None:
    _add_mac_columns(conn, "keys", "key_versions")
    schema.store_settings.create(conn, checkfirst=True)


def _v4_alias_tag_macs(conn: Connection) -> None:
    _add_mac_columns(conn, "aliases", "tags")


MIGRATIONS: Final[list[Migration]] = [
    (1, "initial schema: keys, key_versions, aliases, tags", _v1_initial),
    (2, "grants", _v2_grants),
    (3, "integrity MACs on keys and key_versions; store_settings", _v3_row_macs),
    (4, "integrity MACs on aliases and tags", _v4_alias_tag_macs),
]


def applied_versions(conn: Connection) -> list[int]:
    """The migration versions recorded in ``conn``'s database, ascending."""
    rows = conn.execute(
        select(schema.schema_migrations.c.version).order_by(schema.schema_migrations.c.version)
    )
    return [int(r[0]) for r in rows]


def run_migrations(conn: Connection, clock: Clock) -> list[int]:
    """Apply every pending migration in order, inside the caller's transaction.

    Returns the versions applied by this call (empty when the schema was already current).
    """
    schema.schema_migrations.create(conn, checkfirst=True)
    done = set(applied_versions(conn))
    newly: list[int] = []
    for version, name, function in MIGRATIONS:
        if version in done:
            continue
        function(conn)
        conn.execute(
            schema.schema_migrations.insert().values(version=version, name=name, applied_at=clock())
        )
        newly.append(version)
    return newly
