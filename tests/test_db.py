"""The database layer (hsmkms/db) on real SQLite files: the error mapping (each rule provoked
for real), the migration runner and its adoption of databases from before the layer, the read
cache and its change signal, and the rule that nothing outside the layer knows the dialect."""

from __future__ import annotations

import ast
import datetime as dt
import fcntl
import inspect as pyinspect
import multiprocessing
import os
import sqlite3
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.exc import IntegrityError, NoResultFound, OperationalError

import hsmkms
from hsmkms.audit.trail import COMPONENT as AUDIT
from hsmkms.audit.trail import AuditTrail
from hsmkms.db import (
    Component,
    Database,
    ErrorMessages,
    Migration,
    NoChangeSignal,
    ReadCache,
    database_exists,
    database_location,
    file_url,
    migrate,
)
from hsmkms.db import cache as db_cache
from hsmkms.db.dialects import SQLiteDialect
from hsmkms.db.errors import RULES, Outcome, classify, map_error
from hsmkms.db.migrations import LEGACY_COMPONENT, applied_versions, schema_migrations
from hsmkms.errors import KMSInternalException, NotFoundException, ServiceUnavailable
from hsmkms.identity import CredentialStore
from hsmkms.identity.store import COMPONENT as IDENTITY
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.store import KeyRecord, KeyVersionRecord, MetadataStore
from hsmkms.store.key_stores import COMPONENT as CUSTOM_KEY_STORES
from hsmkms.store.migrations import COMPONENT as METADATA
from hsmkms.store.uses import COMPONENT as USES

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
WORDING = ErrorMessages(busy="The thing is busy.", failed="The thing failed.")

_meta = MetaData()
things = Table(
    "things",
    _meta,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(16), nullable=False, unique=True),
)


def clock() -> dt.datetime:
    return T0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "db.sqlite"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    database = Database(file_url(path), busy_timeout_ms=50)
    with database.write(WORDING) as conn:
        _meta.create_all(conn)
        conn.execute(things.insert(), [{"id": i, "name": f"n{i}"} for i in range(3)])
    yield database
    database.close()


class WriteLockHeld:
    """Another connection holding the write lock (``BEGIN IMMEDIATE``) until closed."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.fixture
def held(path: Path, db: Database) -> Iterator[WriteLockHeld]:
    holder = WriteLockHeld(path)
    yield holder
    holder.close()


def _raised(run: Callable[[], object]) -> BaseException:
    """What ``run()`` raised (of any class: which class is what the tests check)."""
    try:
        run()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing was raised")


# -- the error mapping: one test per rule, each error provoked for real ------------------------


def test_an_hsmkms_error_passes_unchanged(db: Database) -> None:
    error = NotFoundException("no such thing")

    def run() -> None:
        with db.read(WORDING):
            raise error

    assert _raised(run) is error


def test_an_error_the_component_handles_passes_unchanged(db: Database) -> None:
    wording = ErrorMessages("busy", "failed", handled=(IntegrityError,))

    def run() -> None:
        with db.write(wording) as conn:
            conn.execute(things.insert().values(id=9, name="n1"))  # a duplicate name

    assert isinstance(_raised(run), IntegrityError)


def test_writers_with_a_writer_lock_take_turns_at_a_file_lock(db: Database, path: Path) -> None:
    """On SQLite, writes with a writer lock (the audit trail's) wait their turn at a file lock
    before they begin — woken as soon as it is free, never failing with the busy timeout (here
    50 ms) nor polling in SQLite's busy handler — while another process holds it."""
    done: list[int] = []

    def write() -> None:
        with db.write(WORDING, lock=1) as conn:
            conn.execute(things.insert().values(id=10, name="after"))
        done.append(1)

    holder = os.open(f"{path}-writers.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another process between its BEGIN and COMMIT
    try:
        thread = threading.Thread(target=write)
        thread.start()
        thread.join(0.5)  # ten busy timeouts
        assert done == []
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
    thread.join(10)
    assert done == [1]
    with db.read(WORDING) as conn:
        assert conn.execute(select(things.c.name).where(things.c.id == 10)).scalar() == "after"


def test_write_lock_held_elsewhere_is_busy(db: Database, held: WriteLockHeld) -> None:
    """BEGIN IMMEDIATE while another connection writes: SQLITE_BUSY after the busy timeout."""

    def run() -> None:
        with db.write(WORDING):
            pass

    error = _raised(run)
    assert type(error) is ServiceUnavailable
    assert error.message == "The thing is busy."
    cause = error.__cause__
    assert isinstance(cause, OperationalError)
    assert cause.orig.sqlite_errorcode == sqlite3.SQLITE_BUSY  # type: ignore[union-attr]


def test_busy_in_driver_sql_is_busy(db: Database, held: WriteLockHeld) -> None:
    """The driver's own error, raised by SQL on the raw cursor (as the audit trail appends)."""

    def run() -> None:
        with db.read(WORDING) as conn:
            cursor = conn.connection.cursor()
            cursor.execute("INSERT INTO things VALUES (7, 'n7')")

    error = _raised(run)
    assert type(error) is ServiceUnavailable
    assert type(error.__cause__) is sqlite3.OperationalError


def test_a_table_locked_by_its_own_connection_is_busy(db: Database) -> None:
    """SQLITE_LOCKED: dropping a table that a statement of the same connection still reads."""

    def run() -> None:
        with db.write(WORDING) as conn:
            reading = conn.connection.cursor()
            reading.execute("SELECT id FROM things")
            reading.fetchone()
            conn.exec_driver_sql("DROP TABLE things")

    error = _raised(run)
    assert type(error) is ServiceUnavailable
    cause = error.__cause__
    assert isinstance(cause, OperationalError)
    assert cause.orig.sqlite_errorcode == sqlite3.SQLITE_LOCKED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("statement", "cause"),
    [
        ("SELECT * FROM missing", OperationalError),  # not busy: SQLITE_ERROR
        ("INSERT INTO things VALUES (1, 'dup')", IntegrityError),
    ],
)
def test_other_database_errors_fail(db: Database, statement: str, cause: type[Exception]) -> None:
    def run() -> None:
        with db.write(WORDING) as conn:
            conn.execute(text(statement))

    error = _raised(run)
    assert type(error) is KMSInternalException
    assert error.message == "The thing failed."
    assert type(error.__cause__) is cause


def test_other_driver_errors_fail(db: Database) -> None:
    def run() -> None:
        with db.read(WORDING) as conn:
            conn.connection.cursor().execute("SELEKT 1")

    error = _raised(run)
    assert type(error) is KMSInternalException
    assert type(error.__cause__) is sqlite3.OperationalError


def test_sqlalchemy_errors_without_a_driver_error_fail(db: Database) -> None:
    def run() -> None:
        with db.read(WORDING) as conn:
            conn.execute(select(things).where(things.c.id == 99)).one()

    assert isinstance(_raised(run).__cause__, NoResultFound)


def test_other_exceptions_pass_unchanged(db: Database) -> None:
    error = ValueError("not the database's")

    def run() -> None:
        with db.write(WORDING):
            raise error

    assert _raised(run) is error


def test_errors_are_told_apart_by_code_not_by_text() -> None:
    dialect = SQLiteDialect()
    dialect.driver_error = sqlite3.Error
    worded = sqlite3.OperationalError("database is locked")  # made by hand: no error code
    assert classify(worded, WORDING, dialect) is Outcome.FAILED


def _subclasses(root: type[BaseException]) -> list[type[BaseException]]:
    found = [root]
    for sub in root.__subclasses__():
        found += _subclasses(sub)
    return found


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance made without ``__init__`` (the classes' signatures differ); the rules look
    only at its class and, for a wrapped driver error, at ``orig``."""
    exc = cls.__new__(cls)
    if isinstance(exc, sqlalchemy.exc.StatementError):
        exc.orig = None
    return exc


def _qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__name__}"


DATABASE_ERRORS: list[type[BaseException]] = sorted(
    {
        c
        for c in _subclasses(sqlalchemy.exc.SQLAlchemyError)
        if c.__module__.startswith("sqlalchemy")
    }
    | {c for c in _subclasses(sqlite3.Error) if c.__module__ == "sqlite3"},
    key=_qualified,
)


@pytest.mark.parametrize("cls", DATABASE_ERRORS, ids=_qualified)
def test_every_database_error_class_is_mapped(cls: type[BaseException]) -> None:
    """No SQLAlchemy or driver error ever reaches a caller as itself."""
    dialect = SQLiteDialect()
    dialect.driver_error = sqlite3.Error
    assert classify(_instance(cls), WORDING, dialect) is not Outcome.UNCHANGED
    assert map_error(_instance(cls), WORDING, dialect) is not None


def test_the_rules_are_ordered_from_most_to_least_specific() -> None:
    assert [outcome for _, outcome in RULES] == [
        Outcome.UNCHANGED,
        Outcome.UNCHANGED,
        Outcome.BUSY,
        Outcome.UNAVAILABLE,
        Outcome.FULL,
        Outcome.IO_ERROR,
        Outcome.FAILED,
    ]


def _component_write(
    kind: str, url: str, keystore: Pkcs11Keystore
) -> tuple[Any, Callable[[], object]]:
    if kind == "metadata":
        store = MetadataStore(url, busy_timeout_ms=50)
        return store, lambda: store.delete_alias("alias/x")
    if kind == "credentials":
        credentials = CredentialStore(url, keystore, account_id="111122223333", busy_timeout_ms=50)
        return credentials, lambda: credentials.delete("nobody")
    trail = AuditTrail(url, keystore, busy_timeout_ms=50)
    return trail, lambda: trail.seal()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("metadata", "The metadata store is busy."),
        ("credentials", "The credentials store is busy."),
        ("audit", "The audit trail is busy."),
    ],
)
def test_each_component_says_busy_in_its_own_words(
    tmp_path: Path, keystore: Pkcs11Keystore, kind: str, message: str
) -> None:
    path = tmp_path / f"{kind}.db"
    component, write = _component_write(kind, file_url(path), keystore)
    holder = WriteLockHeld(path)
    try:
        error = _raised(write)
    finally:
        holder.close()
    assert type(error) is ServiceUnavailable
    assert error.message == message
    component.close()


# -- the migration runner -----------------------------------------------------------------------


def _rows(database: Database) -> list[tuple[str, int, str]]:
    with database.read(WORDING) as conn:
        rows = conn.execute(
            select(
                schema_migrations.c.component, schema_migrations.c.version, schema_migrations.c.name
            ).order_by(schema_migrations.c.component, schema_migrations.c.version)
        ).all()
    return [(str(c), int(v), str(n)) for c, v, n in rows]


def _expected(*components: Component) -> list[tuple[str, int, str]]:
    rows = [(c.name, m.version, m.name) for c in components for m in c.migrations]
    return sorted(rows)


def _sql(path: Path, *statements: str) -> list[Any]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        found: list[Any] = []
        for statement in statements:
            found = conn.execute(statement).fetchall()
        return found
    finally:
        conn.close()


def _open_all(path: Path, keystore: Pkcs11Keystore) -> None:
    """The metadata store, the credentials and the audit trail on one file, opened and closed
    (as with HSMKMS_DATABASE_URL set)."""
    url = file_url(path)
    MetadataStore(url).close()
    CredentialStore(url, keystore, account_id="111122223333").close()
    AuditTrail(url, keystore).close()


def test_one_version_table_for_every_component(tmp_path: Path, keystore: Pkcs11Keystore) -> None:
    path = tmp_path / "all.db"
    _open_all(path, keystore)
    database = Database(file_url(path))
    assert _rows(database) == _expected(METADATA, IDENTITY, AUDIT)
    database.close()
    # The markers of hsmkms before the layer, kept current for it.
    assert _sql(path, "SELECT value FROM identity_meta WHERE name = 'schema_version'") == [
        (str(IDENTITY.latest),)
    ]
    assert _sql(path, "SELECT value FROM audit_settings WHERE name = 'schema_version'") == [("2",)]


def _to_pre_layer_shape(path: Path) -> list[Any]:
    """Rewrite the version table as hsmkms before the database layer had it (the metadata
    store's rows only, no component column); returns its rows."""
    _sql(
        path,
        "ALTER TABLE schema_migrations RENAME TO new_shape",
        "CREATE TABLE schema_migrations (version INTEGER NOT NULL, name VARCHAR(128) NOT NULL, "
        "applied_at DATETIME NOT NULL, PRIMARY KEY (version))",
        "INSERT INTO schema_migrations SELECT version, name, '2025-06-0' || version || ' 10:00:00'"
        " FROM new_shape WHERE component = 'metadata'",
        "DROP TABLE new_shape",
    )
    return _sql(path, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")


def _dump(path: Path) -> dict[str, list[Any]]:
    tables = [r[0] for r in _sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: sorted(_sql(path, f"SELECT * FROM {t}"), key=repr) for t in tables}  # noqa: S608


def test_a_database_from_before_the_layer_is_adopted_unchanged(
    tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    path = tmp_path / "old.db"
    _open_all(path, keystore)
    old_rows = _to_pre_layer_shape(path)
    before = _dump(path)

    database = Database(file_url(path))
    with database.write(WORDING) as conn:
        # Adopted, not applied: no migration runs again.
        assert [migrate(conn, c, clock) for c in (METADATA, IDENTITY, AUDIT)] == [[], [], []]
    assert _rows(database) == _expected(METADATA, IDENTITY, AUDIT)
    database.close()
    # The metadata store's rows keep their dates; every other table is as it was.
    assert (
        _sql(
            path,
            "SELECT version, name, applied_at FROM schema_migrations "
            "WHERE component = 'metadata' ORDER BY version",
        )
        == old_rows
    )
    after = _dump(path)
    # The write transaction announced itself (the layer's change counter moved).
    for dump in (before, after):
        del dump["schema_migrations"], dump["change_counter"]
    assert after == before

    _open_all(path, keystore)  # and the components open it as usual


def test_the_pre_layer_version_table_held_the_metadata_stores_rows() -> None:
    assert METADATA.name == LEGACY_COMPONENT


def test_a_legacy_marker_adopts_that_many_migrations(path: Path) -> None:
    database = Database(file_url(path))
    _sql(
        path,
        "CREATE TABLE identity_meta (name VARCHAR(64) NOT NULL, value TEXT NOT NULL, "
        "PRIMARY KEY (name))",
        "INSERT INTO identity_meta VALUES ('schema_version', '1')",
        "CREATE TABLE identity_credentials (access_key_id VARCHAR(128) NOT NULL, "
        "name VARCHAR(64) NOT NULL, principal_arn VARCHAR(2048) NOT NULL, "
        "secret_iv BLOB NOT NULL, secret_sealed BLOB NOT NULL, wrapping_key TEXT NOT NULL, "
        "row_version BIGINT NOT NULL, created_at VARCHAR(40) NOT NULL, "
        "PRIMARY KEY (access_key_id), UNIQUE (name))",
    )
    with database.write(WORDING) as conn:
        assert migrate(conn, IDENTITY, clock) == [2, 3]
        assert applied_versions(conn, "identity") == [1, 2, 3]
    database.close()
    assert _sql(path, "SELECT value FROM identity_meta WHERE name = 'schema_version'") == [("3",)]
    # Migration 3 dropped the uniqueness of name (the table was rebuilt on SQLite).
    assert "UNIQUE (name)" not in str(
        _sql(path, "SELECT sql FROM sqlite_master WHERE name = 'identity_credentials'")
    )


@pytest.mark.parametrize(
    "component", [METADATA, IDENTITY, AUDIT, USES, CUSTOM_KEY_STORES], ids=lambda c: c.name
)
def test_a_version_this_code_does_not_know_is_refused(path: Path, component: Component) -> None:
    database = Database(file_url(path))
    with database.write(WORDING) as conn:
        migrate(conn, component, clock)
        conn.execute(
            schema_migrations.insert().values(
                component=component.name,
                version=component.latest + 1,
                name="from the future",
                applied_at=T0,
            )
        )
    with pytest.raises(KMSInternalException) as info, database.write(WORDING) as conn:
        migrate(conn, component, clock)
    assert str(component.latest + 1) in info.value.message
    database.close()


def test_a_newer_metadata_schema_is_refused_at_open(path: Path) -> None:
    MetadataStore.open_sqlite(path).close()
    future = MetadataStore.latest_schema_version() + 1
    insert = "INSERT INTO schema_migrations VALUES ('metadata', ?, 'future', '2030-01-01')"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(insert, (future,))
    finally:
        conn.close()
    with pytest.raises(KMSInternalException, match="upgrade hsmkms"):
        MetadataStore.open_sqlite(path)


def test_migrations_must_be_numbered_from_one() -> None:
    def nothing(conn: Any) -> None:
        return None

    with pytest.raises(ValueError, match="numbered"):
        Component("x", [Migration(1, "a", nothing), Migration(3, "b", nothing)])


def _adopt(url: str, results: Any) -> None:
    database = Database(url)
    with database.write(WORDING) as conn:
        results.put([migrate(conn, c, clock) for c in (METADATA, IDENTITY)])
    database.close()


def test_processes_adopting_one_database_at_once_take_turns(
    tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    path = tmp_path / "race.db"
    url = file_url(path)
    MetadataStore(url).close()
    CredentialStore(url, keystore, account_id="111122223333").close()
    _to_pre_layer_shape(path)
    _sql(path, "DELETE FROM identity_meta WHERE name = 'schema_version'")  # identity: re-run
    # fork: the children only touch SQLite (never PKCS#11), and spawning costs seconds.
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_adopt, args=(url, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    applied = sorted(results.get(timeout=5) for _ in procs)
    # Exactly one process ran identity's migrations; the metadata store's were adopted.
    assert applied == [[[], []]] * 3 + [[[], list(range(1, IDENTITY.latest + 1))]]
    database = Database(url)
    assert _rows(database) == _expected(METADATA, IDENTITY)
    database.close()


# -- read caches --------------------------------------------------------------------------------


class Loads:
    """A loader that counts its calls."""

    def __init__(self, value: object = "answer") -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> object:
        self.calls += 1
        return self.value


def _commit_elsewhere(path: Path, *, cached: bool = True) -> None:
    """A commit through a database of its own (another process's, as far as ``db`` can tell)."""
    other = Database(file_url(path), busy_timeout_ms=50)
    try:
        with other.write(WORDING, cached=cached) as conn:
            conn.execute(things.update().values(name=things.c.name + "x").where(things.c.id == 0))
    finally:
        other.close()


def test_the_change_signal_moves_on_every_commit_by_another_connection(
    db: Database, path: Path
) -> None:
    first = db.change_token()
    assert first is not None
    assert db.change_token() == first
    _commit_elsewhere(path)
    assert db.change_token() != first


def test_a_commit_that_changes_no_cache_leaves_every_cache_alone(db: Database, path: Path) -> None:
    """A ``cached=False`` write elsewhere (the encryption counters' block reservations, the
    audit trail) does not move the signal, so no cache starts over; the next announced write
    does."""
    cache = db.read_cache(check_interval=0, max_entries=10)
    load = Loads()
    cache.get("k", load)
    first = db.change_token()
    _commit_elsewhere(path, cached=False)
    assert db.change_token() == first
    cache.get("k", load)
    assert load.calls == 1
    _commit_elsewhere(path)
    cache.get("k", load)
    assert load.calls == 2


def test_without_its_counter_table_the_signal_moves_on_every_commit(tmp_path: Path) -> None:
    """A database no hsmkms write has announced itself in yet has no change counter: then any
    commit counts as a change."""
    path = tmp_path / "bare.db"
    _sql(path, "CREATE TABLE t (x INTEGER)")
    database = Database(file_url(path))
    try:
        first = database.change_token()
        assert first is not None
        _sql(path, "INSERT INTO t VALUES (1)")
        assert database.change_token() != first
    finally:
        database.close()


def test_a_restored_copy_does_not_look_unchanged(db: Database, path: Path, tmp_path: Path) -> None:
    """The counter of a copy restored over the file can equal what a cache saw; its nonce
    cannot."""
    copy = tmp_path / "copy.db"
    _backup(path, copy)
    _commit_elsewhere(path)
    seen = db.change_token()
    _backup(copy, path)  # back to the copy's counter ...
    _commit_elsewhere(path)  # ... and one write on: the counter the cache saw, another nonce
    assert db.change_token() != seen


def _backup(source: Path, target: Path) -> None:
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def test_a_cache_answers_until_the_database_changes(db: Database, path: Path) -> None:
    cache = db.read_cache(check_interval=0, max_entries=10)
    load = Loads()
    assert [cache.get("k", load) for _ in range(3)] == ["answer"] * 3
    assert load.calls == 1
    _commit_elsewhere(path)
    cache.get("k", load)
    assert load.calls == 2


def test_another_process_commit_is_seen_after_the_check_interval(
    db: Database, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache's clock is the test's: a slow commit on a loaded machine cannot outlast the
    # interval (it did, with a real 50 ms one).
    clock = [1000.0]
    monkeypatch.setattr(db_cache, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    cache = db.read_cache(check_interval=0.05, max_entries=10)
    load = Loads()
    cache.get("k", load)
    _commit_elsewhere(path)
    clock[0] += 0.04
    cache.get("k", load)
    assert load.calls == 1  # within the interval: not looked at yet
    clock[0] += 0.02
    cache.get("k", load)
    assert load.calls == 2


def test_own_writes_empty_every_cache_of_the_database_at_once(db: Database) -> None:
    caches = [db.read_cache(check_interval=3600, max_entries=10) for _ in range(2)]
    load = Loads()
    for cache in caches:
        cache.get("k", load)
    with db.write(WORDING) as conn:
        conn.execute(things.update().values(name="changed").where(things.c.id == 1))
    for cache in caches:
        cache.get("k", load)
    assert load.calls == 4


def test_an_answer_read_while_the_database_changed_is_not_kept(db: Database, path: Path) -> None:
    cache = db.read_cache(check_interval=0, max_entries=10)
    load = Loads()

    def racing() -> object:
        _commit_elsewhere(path)  # a commit between the check and the read
        return load()

    cache.get("k", racing)
    cache.get("k", load)
    assert load.calls == 2


def test_none_is_kept_only_when_asked(db: Database) -> None:
    plain = db.read_cache(check_interval=0, max_entries=10)
    negative = db.read_cache(check_interval=0, max_entries=10, keep_none=True)
    load = Loads(None)
    for _ in range(2):
        plain.get("k", load)
    assert load.calls == 2
    for _ in range(2):
        negative.get("k", load)
    assert load.calls == 3


def test_a_full_cache_starts_over(db: Database) -> None:
    cache = db.read_cache(check_interval=0, max_entries=2)
    load = Loads()
    for key in ("a", "b", "c", "a"):
        cache.get(key, load)
    assert load.calls == 4  # "c" emptied the cache: "a" was read again


def test_without_a_change_signal_every_read_misses(tmp_path: Path) -> None:
    cache = ReadCache(NoChangeSignal(), check_interval=0, max_entries=10)
    load = Loads()
    cache.get("k", load)
    cache.get("k", load)
    assert load.calls == 2
    memory = Database("sqlite://")  # an in-memory database has nothing to watch
    assert memory.change_token() is None
    memory.close()


def test_a_closed_database_caches_nothing(db: Database) -> None:
    cache = db.read_cache(check_interval=0, max_entries=10)
    load = Loads()
    cache.get("k", load)
    db.close()
    cache.get("k", load)
    cache.get("k", load)
    assert load.calls == 3


def _read_in_child(store: MetadataStore, conn: Any) -> None:
    found = store.get_key_and_version("k1")
    conn.send(found is not None and found[0].state == "Disabled")
    conn.close()


def test_a_forked_child_watches_with_its_own_signal(path: Path) -> None:
    store = MetadataStore.open_sqlite(path, cache_check_interval=3600)
    key = KeyRecord(
        "k1",
        "arn:k1",
        "",
        "ENCRYPT_DECRYPT",
        "SYMMETRIC_DEFAULT",
        "AWS_KMS",
        "Enabled",
        T0,
        "{}",
        1,
    )
    store.create_key(key, KeyVersionRecord("k1", 1, "AES_256_GCM:00", "AES_256_GCM", T0, None), {})
    assert store.get_key_and_version("k1") is not None  # cached in the parent
    _sql(path, "UPDATE keys SET state = 'Disabled'")  # another process's commit
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(store, child_end))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert parent_end.recv() is True  # the child did not answer from the parent's cache
    store.close()


# -- sharing one database -----------------------------------------------------------------------


def test_the_stores_share_one_database(tmp_path: Path, keystore: Pkcs11Keystore) -> None:
    database = Database(file_url(tmp_path / "shared.db"))
    store = MetadataStore(database)
    credentials = CredentialStore(database, keystore, account_id="111122223333")
    trail = AuditTrail(database, keystore)
    assert store.engine is credentials.engine is trail.engine is database.engine
    assert store.database is database
    store.close()
    credentials.close()
    trail.close()
    # Closing the components leaves the shared database to its owner.
    assert _rows(database) == _expected(METADATA, IDENTITY, AUDIT)
    database.close()


def test_connection_settings_follow_the_options(tmp_path: Path) -> None:
    database = Database(
        file_url(tmp_path / "s.db"), busy_timeout_ms=1234, durable=False, foreign_keys=False
    )
    with database.read(WORDING) as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 0
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    database.close()


def test_whether_a_database_exists(tmp_path: Path) -> None:
    missing = tmp_path / "absent.db"
    assert not database_exists(file_url(missing))
    assert database_location(file_url(missing)) == str(missing)
    Database(file_url(tmp_path / "there.db")).engine.connect().close()
    assert database_exists(file_url(tmp_path / "there.db"))
    assert database_exists("sqlite://")
    server = "postgresql+psycopg://kms:hunter2@db.example/kms"
    assert database_exists(server)  # a server says so itself when connected
    assert "hunter2" not in database_location(server)


# -- nothing outside the layer knows the dialect -------------------------------------------------

PACKAGE = Path(hsmkms.__file__).parent
# config.py builds the embedded default's URL (sqlite:///<data_dir>/hsmkms.db).
OUTSIDE = sorted(
    p for p in PACKAGE.rglob("*.py") if PACKAGE / "db" not in p.parents and p.name != "config.py"
)
DIALECT_WORDS = ("sqlite", "postgresql", "PRAGMA")
ERROR_WORDS = ("locked", "busy")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def dialect_knowledge(source: str) -> list[str]:
    """What in ``source`` knows a dialect or reads a database error's text: importing
    ``sqlite3``, naming a dialect or ``PRAGMA`` in code (docstrings and comments may), comparing
    ``dialect.name``, building an engine, or looking for "locked"/"busy" in a string."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    problems = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] == "sqlite3" for n in names):
                problems.append(f"{line}: imports sqlite3")
            if any(a.name == "create_engine" for a in node.names):
                problems.append(f"{line}: builds an engine")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and any(w in node.value for w in DIALECT_WORDS):
                problems.append(f"{line}: names a dialect in {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in ("dialect", "orig"):
            problems.append(f"{line}: reads .{node.attr}")
        elif isinstance(node, ast.Compare) and any(isinstance(o, ast.In) for o in node.ops):
            left = node.left
            if isinstance(left, ast.Constant) and str(left.value).lower() in ERROR_WORDS:
                problems.append(f"{line}: matches an error's text ({left.value!r} in ...)")
    return problems


def test_the_scan_finds_what_it_looks_for() -> None:
    source = pyinspect.cleandoc(
        '''
        """Docstrings may say SQLite and PRAGMA."""
        import sqlite3
        from sqlalchemy import create_engine
        x = "PRAGMA data_version"
        if engine.dialect.name == "sqlite":
            pass
        if "locked" in str(exc.orig).lower():
            pass
        '''
    )
    problems = dialect_knowledge(source)
    assert len(problems) == 7, problems
    assert dialect_knowledge('"""About SQLite."""\n# PRAGMA in a comment\nx = 1\n') == []


def test_nothing_outside_the_layer_knows_the_dialect() -> None:
    found = {str(p.relative_to(PACKAGE)): dialect_knowledge(p.read_text()) for p in OUTSIDE}
    assert len(found) > 50  # the whole package was read
    assert {name: problems for name, problems in found.items() if problems} == {}
