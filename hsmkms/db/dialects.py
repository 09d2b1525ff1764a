"""What differs between database engines, in one place: engine options and connection set-up,
read transactions' options, which driver errors mean "busy" or "unavailable", the change signal
for read caches and how a write announces itself to it, writer locks, and whether a database
exists.

:class:`Dialect` is the behaviour of a database this layer has no special knowledge of (no
set-up, no busy errors, no change signal: caches always miss); :class:`SQLiteDialect` is the
embedded default; PostgreSQL's is :class:`hsmkms.db.postgresql.PostgreSQLDialect`, in a module
of its own (it builds on this one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    event,
)
from sqlalchemy.engine import URL

from hsmkms.db.cache import ChangeSignal, NoChangeSignal

__all__ = [
    "ConnectionOptions",
    "Dialect",
    "SQLiteDialect",
    "check_database_file",
    "dialect_for",
    "sqlite_change_counter",
]

WRITE_OPTION = "hsmkms_write"
"""Execution option of a connection whose next transaction writes (takes the write lock)."""


@dataclasses.dataclass(frozen=True)
class ConnectionOptions:
    """Settings of every connection (see :class:`hsmkms.db.Database`)."""

    busy_timeout_ms: int = 10_000
    durable: bool = True
    foreign_keys: bool = True


class _NoDriverError(Exception):
    """Stands for the driver's error class until :meth:`Dialect.configure` knows it."""


class Dialect:
    """A database engine with nothing special about it."""

    driver_error: type[Exception] = _NoDriverError
    _dbapi: Any = None  # the driver module, known after configure()

    def engine_options(self, url: URL) -> dict[str, Any]:
        """Keyword arguments for ``create_engine`` on ``url``."""
        return {}

    def configure(self, engine: Engine, options: ConnectionOptions) -> None:
        """Install the connection set-up on ``engine`` (before its first connection)."""
        self._dbapi = engine.dialect.loaded_dbapi
        self.driver_error = self._dbapi.Error

    def read_options(self) -> dict[str, Any]:
        """Execution options of a read transaction's connection."""
        return {}

    def is_busy(self, error: BaseException) -> bool:
        """Whether a driver exception means a lock was held past the wait allowed."""
        return False

    def unavailable(self, error: BaseException) -> str | None:
        """Why the database cannot be reached, when a driver exception says so (a few words,
        for the caller's message); ``None`` for any other error."""
        return None

    def is_full(self, error: BaseException) -> bool:
        """Whether a driver exception means the database's device has no space left."""
        return False

    def is_io_error(self, error: BaseException) -> bool:
        """Whether a driver exception means the database's device failed a read or write."""
        return False

    def change_signal(self, engine: Engine) -> ChangeSignal:
        """A new change signal for ``engine``'s database."""
        return NoChangeSignal()

    def prepare(self, conn: Connection) -> None:
        """Create what the layer itself keeps in the database (called by the migration runner
        with its lock held; here: nothing)."""

    def announce(self, conn: Connection) -> None:
        """Make a write transaction's commit visible to the change signal of every process
        (called last in the transaction; here: nothing to do, or the database tells by
        itself)."""

    def lock(self, conn: Connection, key: int) -> None:
        """Take writer lock ``key`` until the end of ``conn``'s transaction (here: nothing to
        take)."""

    def writer_gate(self, url: URL) -> AbstractContextManager[None]:
        """Held around a whole write transaction that takes a writer lock (before it begins,
        until after it commits): writers wait their turn here rather than in the database
        (here: nothing)."""
        return contextlib.nullcontext()

    def exclusive(self, engine: Engine, url: URL, key: int) -> AbstractContextManager[bool]:
        """Hold lock ``key`` for every process of every node on this database while the
        context lasts, if no one holds it: yields whether it is held (``False``: another holder
        has it; nothing was waited for). Released when the context ends, or when the holding
        process dies. Here: a database only this process uses, always held."""
        return contextlib.nullcontext(True)

    def exists(self, url: URL) -> bool:
        """Whether the database at ``url`` exists. A database server's database is taken to
        exist (connecting says otherwise)."""
        return True

    def location(self, url: URL) -> str:
        """Where the database is, for messages (never with a password)."""
        return url.render_as_string(hide_password=True)

    def snapshot(self, url: URL, target: Path) -> None:
        """Copy a consistent snapshot of the database at ``url`` into the new file ``target``
        while other connections keep writing. Only a database kept in a file can be copied
        so; a database server has its own tools (``pg_dump``)."""
        raise ValueError(
            f"{self.location(url)} is not a database file: back it up with its own tools"
        )


# SQLite's primary result codes (the low byte of an extended code) for a lock that was not
# given up in time: another connection's (BUSY) or this connection's own (LOCKED).
_SQLITE_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _sqlite_code(error: BaseException) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(error, sqlite3.Error) and isinstance(code, int) else None


def _sqlite_busy(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return (
        isinstance(error, sqlite3.Error)
        and code is not None
        and (code & 0xFF) in (_SQLITE_BUSY_CODES)
    )


def _use_wal(cur: Any, busy_timeout_ms: int) -> None:
    """Switch the file to WAL unless it already is. Switching needs an exclusive lock and
    SQLite answers "database is locked" at once, without its busy handler, while another
    process writes a new file (measured: 4 of 15 runs of two processes opening one new file
    failed): retry for up to the busy timeout."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _sqlite_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


sqlite_change_counter = Table(
    "change_counter",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("counter", BigInteger, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
)
"""SQLite's change signal's one row (:class:`_CounterSignal`); made by :data:`_COUNTER_TABLE`."""

_COUNTER_TABLE = (
    "CREATE TABLE IF NOT EXISTS change_counter "
    "(id INTEGER PRIMARY KEY, counter BIGINT NOT NULL, nonce BLOB NOT NULL)"
)
# One row; the nonce is new on every bump, so a copy of the database restored over the file
# (whose counter may come back to a value a cache saw) does not look unchanged.
_BUMP = (
    "INSERT INTO change_counter (id, counter, nonce) VALUES (1, 1, randomblob(8)) "
    "ON CONFLICT (id) DO UPDATE SET counter = counter + 1, nonce = randomblob(8)"
)
_READ_COUNTER = "SELECT counter, nonce FROM change_counter WHERE id = 1"


class _CounterSignal:
    """SQLite's change signal: the ``change_counter`` row that every write transaction of a
    component with read caches bumps last (:meth:`SQLiteDialect.announce`), as on PostgreSQL.

    Read on a connection of its own that never writes, in autocommit (each read sees every
    commit before it), and only when ``PRAGMA data_version`` on that connection moved: that
    pragma changes on any commit by another connection, of this process or another, so the
    unchanged case costs one pragma. Commits that announce nothing (the audit trail's appends,
    the encryption counters' block reservations: ``cached=False`` writes) then leave every read
    cache alone, where ``data_version`` alone would empty them all. A database whose counter
    table does not exist yet (nothing announced a write since it was made) answers with
    ``data_version`` itself: any commit empties the caches. Opened on first use; one lock
    serializes its users."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._version: int | None = None
        self._token: Hashable | None = None

    def token(self) -> Hashable | None:
        with self._lock:
            if self._closed:
                return None
            try:
                if self._conn is None:
                    self._conn = sqlite3.connect(
                        self._path, check_same_thread=False, isolation_level=None
                    )
                version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
                if version == self._version:
                    return self._token
                try:
                    row = self._conn.execute(_READ_COUNTER).fetchone()
                except sqlite3.OperationalError:  # no counter table yet
                    row = None
            except sqlite3.Error:
                self._version = self._token = None
                return None
            self._version = version
            self._token = ("commit", version) if row is None else (int(row[0]), bytes(row[1]))
            return self._token

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SQLiteDialect(Dialect):
    """The embedded default: every connection gets a busy timeout, ``foreign_keys``, WAL and
    ``synchronous``; the driver's implicit transactions are turned off so that a write
    transaction begins with ``BEGIN IMMEDIATE`` (the write lock up front: a read-check-write
    sequence is atomic across processes) and a read with ``BEGIN``. The change signal is a
    counter row bumped by announced writes (:class:`_CounterSignal`)."""

    _ready = False  # whether this database's change_counter table is known to exist

    def configure(self, engine: Engine, options: ConnectionOptions) -> None:
        super().configure(engine, options)
        busy_timeout_ms = int(options.busy_timeout_ms)
        synchronous = "FULL" if options.durable else "NORMAL"
        foreign_keys = options.foreign_keys

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # driver autocommit: transactions begin below
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
                if foreign_keys:
                    cur.execute("PRAGMA foreign_keys = ON")
                _use_wal(cur, busy_timeout_ms)
                cur.execute(f"PRAGMA synchronous = {synchronous}")
            finally:
                cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get(WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    def is_busy(self, error: BaseException) -> bool:
        return _sqlite_busy(error)

    def writer_gate(self, url: URL) -> AbstractContextManager[None]:
        path = _file(url)
        return contextlib.nullcontext() if path is None else _gate(path)

    def is_full(self, error: BaseException) -> bool:
        return _sqlite_code(error) == sqlite3.SQLITE_FULL

    def is_io_error(self, error: BaseException) -> bool:
        return _sqlite_code(error) in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)

    def change_signal(self, engine: Engine) -> ChangeSignal:
        path = _file(engine.url)
        # An in-memory database is one per connection: nothing to watch.
        return NoChangeSignal() if path is None else _CounterSignal(path)

    def prepare(self, conn: Connection) -> None:
        """Create the change counter's table (the caller holds the migration runner's lock)."""
        conn.exec_driver_sql(_COUNTER_TABLE)
        self._ready = True

    def announce(self, conn: Connection) -> None:
        if not self._ready:
            # A database written before any component migrated it (or made by hand): the table
            # may be missing; creating it here is part of this write transaction.
            conn.exec_driver_sql(_COUNTER_TABLE)
            self._ready = True
        conn.exec_driver_sql(_BUMP)

    @contextlib.contextmanager
    def exclusive(self, engine: Engine, url: URL, key: int) -> Iterator[bool]:
        # An flock on <file>-<key>.lock: every process on this machine (a SQLite file is not
        # shared between machines) sees it; the kernel releases it when the process dies.
        path = _file(url)
        if path is None:
            yield True
            return
        fd = os.open(f"{path}-{key:x}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # releases the lock

    def exists(self, url: URL) -> bool:
        path = _file(url)
        return path is None or Path(path).is_file()

    def location(self, url: URL) -> str:
        path = _file(url)
        return super().location(url) if path is None else str(Path(path))

    def snapshot(self, url: URL, target: Path) -> None:
        # SQLite's online backup API, all pages in one step: one read transaction, so the copy
        # is the database as of one commit, whatever other connections (in WAL mode, any
        # number of readers and one writer) do meanwhile. The copy is a plain file (no WAL).
        path = _file(url)
        if path is None:
            raise ValueError("an in-memory database cannot be copied")
        # Opened read-write (it only reads): a read-only open of a WAL file fails when its
        # shared-memory file is missing (no process has it open).
        source = sqlite3.connect(path, timeout=10)
        try:
            dest = sqlite3.connect(target)
            try:
                source.backup(dest)
                dest.execute("PRAGMA journal_mode = DELETE")
            finally:
                dest.close()
        finally:
            source.close()


def check_database_file(path: Path) -> str | None:
    """What is wrong with the SQLite file at ``path`` (``PRAGMA integrity_check``), or None
    when it is intact. Opens it read-only."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"not a readable SQLite database ({exc})"
    problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
    return "; ".join(problems[:3]) if problems else None


class _WriterGate:
    """Turn-taking of the writers of one SQLite file across threads and processes: a thread
    lock, then an exclusive ``flock`` on ``<file>-writers.lock``. A writer that finds the file
    locked otherwise waits in SQLite's busy handler, which sleeps 1, 2, 5, 10 … 100 ms between
    looks: under steady writing from several processes (the audit trail's group commits) that
    turns a 1 ms wait into tens of milliseconds. The kernel wakes a ``flock`` waiter as soon as
    the lock is free. Fork-aware (a child opens its own descriptor); without the lock file
    (it cannot be made) the gate lets everyone through and SQLite's own lock still decides."""

    def __init__(self, path: str) -> None:
        self._path = path + "-writers.lock"
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _descriptor(self) -> int | None:
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return None
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._descriptor()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)


_GATES: dict[str, _WriterGate] = {}
_GATES_LOCK = threading.Lock()


def _gate(path: str) -> AbstractContextManager[None]:
    with _GATES_LOCK:
        gate = _GATES.get(path)
        if gate is None:
            gate = _GATES[path] = _WriterGate(path)
    return gate()


def _file(url: URL) -> str | None:
    """The file of a SQLite URL, or ``None`` for an in-memory database."""
    database = url.database
    return None if not database or database == ":memory:" else database


def dialect_for(name: str) -> Dialect:
    """The behaviour of the SQLAlchemy dialect ``name`` (``engine.dialect.name``)."""
    if name == "sqlite":
        return SQLiteDialect()
    if name == "postgresql":
        # Imported here: hsmkms.db.postgresql builds on this module.
        from hsmkms.db.postgresql import PostgreSQLDialect

        return PostgreSQLDialect()
    return Dialect()
