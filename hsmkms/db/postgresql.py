"""PostgreSQL (``postgresql+psycopg://...``, psycopg 3): what this layer does differently there.

**Transactions.** A write transaction runs at ``READ COMMITTED``, the default: every statement
sees what was committed before it started, and the rows a read-check-write sequence depends on
are locked first (the metadata store selects the key row ``FOR UPDATE``, the migration runner
and the audit trail take transaction-scoped advisory locks), so the statements after the lock
see the previous writer's commit and the sequence is atomic, as under SQLite's
``BEGIN IMMEDIATE``. A read transaction runs at ``REPEATABLE READ``, read only: one snapshot for
all its statements, as SQLite gives a reader (``hsmkms audit verify`` reads seals and then
records). ``docs/metadata-store.md`` lists each sequence and its lock.

**Busy and unavailable, by SQLSTATE** (never by message text):

- busy (a lock or the server's capacity, past the wait allowed): ``55P03`` lock_not_available
  (``lock_timeout``, set from the busy timeout), ``40P01`` deadlock_detected, ``40001``
  serialization_failure, ``57014`` query_canceled (``statement_timeout``), ``53300``
  too_many_connections;
- unavailable (the server cannot be reached): class ``08`` (connection exceptions), ``57P01``
  admin_shutdown, ``57P02`` crash_shutdown, ``57P03`` cannot_connect_now, and psycopg's
  ``OperationalError`` without a SQLSTATE (connection refused or lost, or a login the server
  refused: libpq gives no SQLSTATE for those, and the message text is not read).

The engine checks a pooled connection before lending it (``pool_pre_ping``): after a server
restart the first request gets a fresh connection instead of an error, and while the server is
away every request fails at once with a 503 naming the cause.

**Change signal.** The table ``change_counter`` holds one row, ``(id=1, counter)``; every write
transaction of a component with read caches adds one to it just before it commits
(:meth:`PostgreSQLDialect.announce`; the audit trail's appends do not: they change nothing a
cache holds). Because the increment commits with the write, a reader that sees the new counter
also sees the write. :class:`ChangeCounter` reads ``(counter, xmin)`` of the row on a
connection of its own, in autocommit, one primary-key lookup per check; ``xmin`` (the
transaction that wrote the row) also moves when a backup is restored over the database.
The row is taken last in a write transaction, so it is held only from that moment to the commit,
and it never takes part in a deadlock (nothing is waited for after it).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator
from typing import Any, Final

from sqlalchemy import BigInteger, Column, Connection, Engine, Integer, MetaData, Table, event, text
from sqlalchemy.engine import URL

from hsmkms.db.dialects import ConnectionOptions, Dialect
from hsmkms.db.forks import FORKS
from hsmkms.db.migrations import MIGRATION_LOCK

__all__ = ["BUSY_SQLSTATES", "ChangeCounter", "PostgreSQLDialect", "change_counter"]

BUSY_SQLSTATES: Final = frozenset({"55P03", "40P01", "40001", "57014", "53300"})
_UNAVAILABLE_SQLSTATES: Final = {
    "57P01": "the database server is shutting down",
    "57P02": "the database server crashed",
    "57P03": "the database server is starting up or shutting down",
}
_CONNECTION_CLASS: Final = "08"
# Without a SQLSTATE psycopg cannot say more: a refused TCP connection, a lost one, and a login
# the server refused (wrong password, no such database) all look alike, short of reading text.
_DISK_FULL: Final = "53100"
"""SQLSTATE disk_full: the server's device has no space left."""
_LOST: Final = "the database server cannot be reached or refused the connection"
# Seconds to wait for a connection, unless the URL says otherwise (libpq waits forever).
_CONNECT_TIMEOUT: Final = 10

change_counter = Table(
    "change_counter",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("counter", BigInteger, nullable=False),
)
"""The change signal's one row (see the module docstring); created by the migration runner."""

_BUMP: Final = "UPDATE change_counter SET counter = counter + 1 WHERE id = 1"
_FIRST_ROW: Final = (
    "INSERT INTO change_counter (id, counter) VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
)
_EXISTS: Final = "SELECT to_regclass('change_counter')"
_READ: Final = "SELECT counter, xmin::text FROM change_counter WHERE id = 1"


def _sqlstate(error: BaseException) -> str | None:
    state = getattr(error, "sqlstate", None)
    return state if isinstance(state, str) else None


class ChangeCounter:
    """The change signal of a PostgreSQL database: ``(counter, xmin)`` of ``change_counter``'s
    row, read on a connection of its own (opened on first use, in autocommit: each read sees
    every commit before it). A failed read answers ``None`` (caches miss) and drops the
    connection; the next read connects again. One lock serializes its users."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None
        self._forks = FORKS.count
        self._closed = False

    def _connect(self) -> Any:
        dialect = self._engine.dialect
        cargs, cparams = dialect.create_connect_args(self._engine.url)
        cparams.setdefault("connect_timeout", _CONNECT_TIMEOUT)
        conn = dialect.loaded_dbapi.connect(*cargs, **cparams)
        conn.autocommit = True
        return conn

    def token(self) -> Hashable | None:
        with self._lock:
            if self._closed:
                return None
            if self._forks != FORKS.count:  # the parent's connection: never touched here
                self._conn, self._forks = None, FORKS.count
            try:
                if self._conn is None:
                    self._conn = self._connect()
                row = self._conn.execute(_READ).fetchone()
            except self._engine.dialect.loaded_dbapi.Error:
                self._drop()
                return None
            return None if row is None else (int(row[0]), str(row[1]))

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self._engine.dialect.loaded_dbapi.Error):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._forks == FORKS.count:
                self._drop()
            self._conn = None


class PostgreSQLDialect(Dialect):
    """PostgreSQL through psycopg 3 (the module docstring says what and why)."""

    _ready = False  # whether change_counter is known to exist

    def engine_options(self, url: URL) -> dict[str, Any]:
        options: dict[str, Any] = {"pool_pre_ping": True}
        if "connect_timeout" not in url.query:  # the URL's own wins
            options["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT}
        return options

    def configure(self, engine: Engine, options: ConnectionOptions) -> None:
        super().configure(engine, options)
        settings = [f"SET lock_timeout = {int(options.busy_timeout_ms)}"]
        if not options.durable:
            settings.append("SET synchronous_commit = off")

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            for statement in settings:
                dbapi_conn.execute(statement)
            dbapi_conn.commit()

    def read_options(self) -> dict[str, Any]:
        return {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}

    def is_busy(self, error: BaseException) -> bool:
        return isinstance(error, self.driver_error) and _sqlstate(error) in BUSY_SQLSTATES

    def unavailable(self, error: BaseException) -> str | None:
        if not isinstance(error, self.driver_error):
            return None
        state = _sqlstate(error)
        if state is None:
            operational = getattr(self._dbapi, "OperationalError", None)
            interface = getattr(self._dbapi, "InterfaceError", None)
            lost = tuple(c for c in (operational, interface) if isinstance(c, type))
            return _LOST if lost and isinstance(error, lost) else None
        if state.startswith(_CONNECTION_CLASS):
            return _LOST
        return _UNAVAILABLE_SQLSTATES.get(state)

    def is_full(self, error: BaseException) -> bool:
        return isinstance(error, self.driver_error) and _sqlstate(error) == _DISK_FULL

    def change_signal(self, engine: Engine) -> ChangeCounter:
        return ChangeCounter(engine)

    def prepare(self, conn: Connection) -> None:
        """Create the change counter's table and row when missing (the caller holds the
        migration runner's lock)."""
        change_counter.create(conn, checkfirst=True)
        conn.exec_driver_sql(_FIRST_ROW)
        self._ready = True

    def announce(self, conn: Connection) -> None:
        if not self._ready:
            # A write before any component migrated this database (every component migrates
            # when it opens, so normally the runner made the table already).
            if conn.exec_driver_sql(_EXISTS).scalar() is None:
                self.lock(conn, MIGRATION_LOCK)
                self.prepare(conn)
            self._ready = True
        conn.exec_driver_sql(_BUMP)

    def lock(self, conn: Connection, key: int) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    @contextlib.contextmanager
    def exclusive(self, engine: Engine, url: URL, key: int) -> Iterator[bool]:
        # A session-level advisory lock on a connection of its own, held outside any
        # transaction: every node sees it, and the server releases it when the connection
        # ends (the process died, the network went away).
        with engine.connect() as conn:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(Exception):  # a lost connection released it
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        conn.commit()
