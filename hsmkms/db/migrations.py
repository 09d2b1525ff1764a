"""One migration runner, one version table per database.

Every component that keeps tables (the metadata store, the identity store, the audit trail)
describes them as a :class:`Component`: its name, its ordered, append-only
:class:`Migration` list, and, for a component older than this layer, the marker in which it
kept its version before (:class:`LegacyMarker`). :func:`migrate` runs inside the caller's write
transaction (so several processes opening one database at once take turns) and records each
applied version in the database's one version table::

    schema_migrations  (component, version) -> name, applied_at

Rules:

- a migration receives the connection inside the runner's transaction and uses dialect-neutral
  DDL; it checks before it creates or adds (a database made by the current code already has
  what a later migration adds), so running it on any earlier shape is harmless;
- once released, a migration is frozen: a schema change is a new migration plus the matching
  change to the declared tables (``tests/test_store.py`` checks that a migrated database
  matches what every component declares);
- a database holding a version this code does not know is refused ("upgrade hsmkms").

Databases from before this layer open unchanged: a ``schema_migrations`` table without the
``component`` column (the metadata store's alone) is rebuilt with its rows as the metadata
store's; a component without rows adopts its legacy marker (version ``n`` = migrations 1 to
``n`` applied). The legacy markers are then kept equal to the latest applied version, so that
an hsmkms from before this layer, which reads only them, still refuses a newer schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    column,
    insert,
    inspect,
    literal,
    select,
    table,
    text,
    update,
)

from hsmkms.db.dialects import dialect_for
from hsmkms.db.types import UTCDateTime
from hsmkms.errors import KMSInternalException
from hsmkms.types import Clock

__all__ = [
    "LEGACY_COMPONENT",
    "MIGRATION_LOCK",
    "Component",
    "LegacyMarker",
    "Migration",
    "add_column",
    "applied_versions",
    "drop_unique",
    "metadata",
    "migrate",
    "rebuild_table",
    "schema_migrations",
]

metadata = MetaData()

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("component", String(64), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(128), nullable=False),
    Column("applied_at", UTCDateTime, nullable=False),
)
_M = schema_migrations

LEGACY_COMPONENT: Final = "metadata"
"""Whose rows a version table from before this layer (no ``component`` column) holds."""

_OLD_TABLE: Final = "schema_migrations_v0"
# Writers of the version table take this lock first (PostgreSQL: an advisory lock; SQLite's
# write transaction holds the one write lock already). "hsmkmsM".
MIGRATION_LOCK: Final = 0x68736D6B6D734D
_REFUSED: Final = (
    "The {component} tables are of schema version {found}; this hsmkms knows up to {latest}: "
    "upgrade hsmkms."
)


class Migration(NamedTuple):
    """One step: ``apply(conn)`` brings the component's tables from ``version - 1`` to
    ``version``."""

    version: int
    name: str
    apply: Callable[[Connection], None]


@dataclasses.dataclass(frozen=True)
class LegacyMarker:
    """Where an hsmkms from before this layer kept a component's version: the ``value`` of
    row ``name`` of a ``name -> value`` table of the component."""

    table: Table
    name: str = "schema_version"


@dataclasses.dataclass(frozen=True)
class Component:
    """A component's tables: its ``migrations`` (versions 1, 2, 3, ... in order, append-only),
    its legacy marker if it had one, and the message refusing a version it does not know
    (``{component}``, ``{found}`` and ``{latest}`` are filled in)."""

    name: str
    migrations: Sequence[Migration]
    legacy: LegacyMarker | None = None
    refused: str = _REFUSED

    def __post_init__(self) -> None:
        versions = [m.version for m in self.migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"{self.name}: migrations must be numbered 1, 2, 3, ...")

    @property
    def latest(self) -> int:
        """The version this code migrates to."""
        return len(self.migrations)

    def refusal(self, found: object) -> KMSInternalException:
        """The error for a database at version ``found``, which this code does not know."""
        return KMSInternalException(
            self.refused.format(component=self.name, found=found, latest=self.latest)
        )


def applied_versions(conn: Connection, component: str) -> list[int]:
    """The versions of ``component`` recorded in ``conn``'s database, ascending."""
    rows = conn.execute(select(_M.c.version).where(_M.c.component == component))
    return sorted(int(r[0]) for r in rows)


def migrate(conn: Connection, component: Component, clock: Clock) -> list[int]:
    """Apply every pending migration of ``component`` in order, inside the caller's write
    transaction. Returns the versions applied by this call (empty when already current).

    Raises :class:`~hsmkms.errors.KMSInternalException` when the database is of a version this
    code does not know.
    """
    dialect = dialect_for(conn.dialect.name)
    dialect.lock(conn, MIGRATION_LOCK)
    dialect.prepare(conn)
    _ensure_version_table(conn)
    applied = applied_versions(conn, component.name)
    legacy = _read_legacy(conn, component)
    if legacy is not None and (not legacy.isdigit() or int(legacy) > component.latest):
        raise component.refusal(legacy)
    if not applied and legacy is not None and int(legacy) > 0:
        adopted = component.migrations[: int(legacy)]
        _record(conn, component, adopted, clock)
        applied = [m.version for m in adopted]
    unknown = [v for v in applied if v > component.latest]
    if unknown:
        raise component.refusal(max(unknown))
    done = set(applied)
    pending = [m for m in component.migrations if m.version not in done]
    for migration in pending:
        migration.apply(conn)
    _record(conn, component, pending, clock)
    if component.legacy is not None and legacy != str(component.latest):
        _write_legacy(conn, component.legacy, str(component.latest), present=legacy is not None)
    return [m.version for m in pending]


def _record(
    conn: Connection, component: Component, migrations: Sequence[Migration], clock: Clock
) -> None:
    if migrations:
        now = clock()
        rows = [
            {"component": component.name, "version": m.version, "name": m.name, "applied_at": now}
            for m in migrations
        ]
        conn.execute(insert(_M), rows)


def rebuild_table(conn: Connection, declared: Table) -> None:
    """Rebuild the table ``declared`` names as it is declared now, keeping its rows (the
    columns the old and the new table share): for a change ``ALTER TABLE`` cannot make on
    every dialect (SQLite cannot drop a constraint). Runs in the migration's transaction: the
    old table is renamed, the new one created with its indexes, the rows copied, the old one
    dropped."""
    name = declared.name
    old = f"{name}_before_rebuild"
    inspector = inspect(conn)
    shared = [
        c["name"]
        for c in inspector.get_columns(name)
        if c["name"] in {col.name for col in declared.columns}
    ]
    explicit = [i["name"] for i in inspector.get_indexes(name) if i.get("name")]
    conn.execute(text(f"ALTER TABLE {name} RENAME TO {old}"))
    for index in explicit:  # they moved with the table and would collide with the new ones
        conn.execute(text(f"DROP INDEX {index}"))
    declared.create(conn)
    source = table(old, *(column(c) for c in shared))
    conn.execute(insert(declared).from_select(shared, select(*source.c)))
    conn.execute(text(f"DROP TABLE {old}"))


def drop_unique(conn: Connection, declared: Table, columns: Sequence[str]) -> bool:
    """Drop the uniqueness of ``columns`` in the table ``declared`` names (declared now without
    it), keeping every row. SQLite cannot drop a constraint: the table is rebuilt
    (:func:`rebuild_table`); other dialects drop the constraint or unique index by name.
    Returns whether there was one."""
    inspector = inspect(conn)
    wanted = list(columns)
    constraints = [
        u for u in inspector.get_unique_constraints(declared.name) if u["column_names"] == wanted
    ]
    # PostgreSQL lists the index behind a UNIQUE constraint among the indexes too (with
    # ``duplicates_constraint``); it goes with its constraint.
    constraint_names = {u["name"] for u in constraints}
    indexes = [
        i
        for i in inspector.get_indexes(declared.name)
        if i["unique"]
        and i["column_names"] == wanted
        and i["name"] not in constraint_names
        and not i.get("duplicates_constraint")
    ]
    if not constraints and not indexes:
        return False
    if conn.dialect.name == "sqlite":
        rebuild_table(conn, declared)
        return True
    quote = conn.dialect.identifier_preparer.quote
    for constraint in constraints:
        name = quote(str(constraint["name"]))
        conn.execute(text(f"ALTER TABLE {quote(declared.name)} DROP CONSTRAINT {name}"))
    for index in indexes:
        conn.execute(text(f"DROP INDEX {quote(str(index['name']))}"))
    return True


def _ensure_version_table(conn: Connection) -> None:
    """Create the version table, or rebuild one from before this layer (no ``component``
    column, version alone as the key) with its rows as :data:`LEGACY_COMPONENT`'s."""
    inspector = inspect(conn)
    if not inspector.has_table(_M.name):
        _M.create(conn)
        return
    if "component" in {c["name"] for c in inspector.get_columns(_M.name)}:
        return
    conn.execute(text(f"ALTER TABLE {_M.name} RENAME TO {_OLD_TABLE}"))
    _M.create(conn)
    old = table(_OLD_TABLE, column("version"), column("name"), column("applied_at"))
    conn.execute(
        insert(_M).from_select(
            ["component", "version", "name", "applied_at"],
            select(literal(LEGACY_COMPONENT), old.c.version, old.c.name, old.c.applied_at),
        )
    )
    conn.execute(text(f"DROP TABLE {_OLD_TABLE}"))


def _read_legacy(conn: Connection, component: Component) -> str | None:
    marker = component.legacy
    if marker is None or not inspect(conn).has_table(marker.table.name):
        return None
    names, values = marker.table.c.name, marker.table.c.value
    found = conn.execute(select(values).where(names == marker.name)).scalar()
    return None if found is None else str(found)


def _write_legacy(conn: Connection, marker: LegacyMarker, value: str, *, present: bool) -> None:
    names, values = marker.table.c.name, marker.table.c.value
    if present:
        conn.execute(update(marker.table).where(names == marker.name).values({values: value}))
    else:
        conn.execute(insert(marker.table).values({names: marker.name, values: value}))


def add_column(conn: Connection, table_name: str, column_: Column[Any]) -> bool:
    """Add ``column_`` (nullable, no default) to ``table_name`` unless it is there already;
    whether it was added. For migrations."""
    columns = {c["name"] for c in inspect(conn).get_columns(table_name)}
    if column_.name in columns:
        return False
    kind = column_.type.compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE {table_name} ADD COLUMN {column_.name} {kind}"))
    return True
