"""The database: one engine with its dialect's connection set-up, read and write transactions
that map database errors, fork safety, and the change signal behind read caches."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url

from hsmkms.db.cache import ChangeSignal, NoChangeSignal, ReadCache
from hsmkms.db.dialects import WRITE_OPTION, ConnectionOptions, Dialect, dialect_for
from hsmkms.db.errors import DEFAULT_DEVICE, ErrorMessages, map_error
from hsmkms.db.forks import FORKS

__all__ = ["Database", "database_exists", "database_location", "file_url", "snapshot_database"]

_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


class Database:
    """One database, opened from a SQLAlchemy URL; several components may share it (so the
    metadata store and the identity store can use one engine and one change signal).

    Every connection is set up by the dialect: on SQLite (the embedded default) a busy timeout
    of ``busy_timeout_ms``, ``foreign_keys`` as given, WAL, and ``synchronous=FULL`` when
    ``durable`` (a commit is on disk when it returns), else ``NORMAL`` (safe against a crash
    of the process, not of the machine). Thread-safe.

    Fork-safe: in a forked child the first use drops the parent's pooled connections and change
    signal without closing them (they belong to the parent) and opens its own.

    ``device``: how error messages name where the database lives when its device is full or
    failing (``the data directory's device``; default ``the database's device``).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        busy_timeout_ms: int = 10_000,
        durable: bool = True,
        foreign_keys: bool = True,
        device: str | None = None,
    ) -> None:
        parsed = make_url(url)
        self._dialect: Dialect = dialect_for(parsed.get_backend_name())
        self._engine: Engine = create_engine(parsed, **self._dialect.engine_options(parsed))
        self._device = device or DEFAULT_DEVICE
        self._dialect.configure(
            self._engine, ConnectionOptions(busy_timeout_ms, durable, foreign_keys)
        )
        self._forks = FORKS.count
        self._lock = threading.Lock()
        # Opens its connection on first use: a database without read caches never does.
        self._signal: ChangeSignal = self._dialect.change_signal(self._engine)
        self._read_options = self._dialect.read_options()
        self._closed = False
        # Replaced, never changed in place: writers iterate it without the lock.
        self._caches: tuple[weakref.ref[ReadCache], ...] = ()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics and tests)."""
        return self._engine

    @property
    def url(self) -> URL:
        """The database's URL."""
        return self._engine.url

    @property
    def placeholder(self) -> str | None:
        """The driver's placeholder for a positional parameter in driver SQL (run on
        ``conn.connection.cursor()``): ``?`` or ``%s``; ``None`` for any other parameter style
        (then use SQLAlchemy statements)."""
        return _PLACEHOLDERS.get(self._engine.dialect.paramstyle)

    # -- transactions ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self, errors: ErrorMessages) -> Iterator[Connection]:
        """A read transaction; database errors raised inside become hsmkms errors worded by
        ``errors`` (:mod:`hsmkms.db.errors`)."""
        if self._forks != FORKS.count:
            self._after_fork()
        try:
            with self._engine.connect() as conn:
                if self._read_options:
                    conn.execution_options(**self._read_options)
                with conn.begin():
                    yield conn
        except Exception as exc:
            mapped = map_error(exc, errors, self._dialect, self._device)
            if mapped is None:
                raise
            raise mapped from exc

    @contextlib.contextmanager
    def write(
        self, errors: ErrorMessages, *, lock: int | None = None, cached: bool = True
    ) -> Iterator[Connection]:
        """A write transaction whose read-check-write sequences are atomic across processes
        (SQLite: ``BEGIN IMMEDIATE``, the write lock from the start; PostgreSQL: the rows the
        sequence depends on locked first, see :mod:`hsmkms.db.postgresql`). ``lock`` (a
        positive 63-bit number) also serializes every writer passing the same number on
        databases whose writers do not already take turns (PostgreSQL: an advisory lock); on
        SQLite such writers take turns at a file lock before they begin, so a writer waiting
        for another is woken at once instead of polling in SQLite's busy handler.

        ``cached``: whether the transaction may change what a read cache holds (the default).
        Then it is announced to the change signal of every process (PostgreSQL: the change
        counter, bumped last in the transaction) and, after it (committed or not), every read
        cache of this database is emptied, so this process sees its own writes at once. A
        component none of whose tables is cached (the audit trail) passes ``False``, so its
        frequent writes empty no cache. Errors are mapped as in :meth:`read`.
        """
        if self._forks != FORKS.count:
            self._after_fork()
        gate = (
            self._dialect.writer_gate(self._engine.url)
            if lock is not None
            else contextlib.nullcontext()
        )
        try:
            with gate, self._engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    if lock is not None:
                        self._dialect.lock(conn, lock)
                    yield conn
                    if cached:
                        self._dialect.announce(conn)
        except Exception as exc:
            mapped = map_error(exc, errors, self._dialect, self._device)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            if cached:
                for ref in self._caches:
                    cache = ref()
                    if cache is not None:
                        cache.invalidate()

    # -- read caches ----------------------------------------------------------------------------

    def read_cache(
        self, *, check_interval: float, max_entries: int, keep_none: bool = False
    ) -> ReadCache:
        """A new :class:`~hsmkms.db.cache.ReadCache` on this database's change signal, emptied
        after each of this database's write transactions. ``check_interval``: seconds between
        two looks at the signal (a commit by another process is seen within that time)."""
        self.check_fork()
        with self._lock:
            cache = ReadCache(
                self._signal,
                check_interval=check_interval,
                max_entries=max_entries,
                keep_none=keep_none,
                on_fork=self.check_fork,
            )
            live = tuple(ref for ref in self._caches if ref() is not None)
            self._caches = (*live, weakref.ref(cache))
        return cache

    def exclusive(self, key: int) -> AbstractContextManager[bool]:
        """Hold lock ``key`` (a positive 63-bit number) for every process of every node using
        this database, if no one holds it: the context yields whether it is held, without
        waiting. For work that must run on one node at a time (the periodic rotations and
        purges). PostgreSQL: a session advisory lock on a connection of its own; SQLite: an
        ``flock`` on a file beside the database. Released at the end of the context, or by the
        holder's death."""
        self.check_fork()
        return self._dialect.exclusive(self._engine, self._engine.url, key)

    def change_token(self) -> Hashable | None:
        """The change signal's current token (:meth:`~hsmkms.db.cache.ChangeSignal.token`)."""
        self.check_fork()
        return self._signal.token()

    # -- life cycle -----------------------------------------------------------------------------

    def check_fork(self) -> None:
        """In a forked child, drop what belongs to the parent (done by every transaction)."""
        if self._forks != FORKS.count:
            self._after_fork()

    def _after_fork(self) -> None:
        with self._lock:
            if self._forks == FORKS.count:
                return
            self._engine.dispose(close=False)
            # The parent's signal is dropped, not closed; the child watches with its own.
            if not self._closed:
                self._signal = self._dialect.change_signal(self._engine)
            self._forks = FORKS.count
        self._rebind_caches()

    def close(self) -> None:
        """Release every pooled connection and the change signal; read caches miss from now
        on. The database stays usable (new connections are opened on demand)."""
        with self._lock:
            self._closed = True
            signal, self._signal = self._signal, NoChangeSignal()
        signal.close()
        self._rebind_caches()
        self._engine.dispose()

    def _rebind_caches(self) -> None:
        for ref in self._caches:
            cache = ref()
            if cache is not None:
                cache.rebind(self._signal)


def snapshot_database(url: str | URL, target: Path) -> None:
    """Copy a consistent snapshot of the database at ``url`` (a file: the embedded default)
    into the new file ``target`` while other processes keep using it (``hsmkms backup``).
    ``ValueError`` for a database server, which has its own backup tools."""
    parsed = make_url(url)
    dialect_for(parsed.get_backend_name()).snapshot(parsed, target)


def file_url(path: str | os.PathLike[str]) -> str:
    """The URL of the embedded default's database in the file at ``path`` (SQLite)."""
    return f"sqlite:///{Path(path)}"


def database_exists(url: str | URL) -> bool:
    """Whether the database at ``url`` exists: for the embedded default, whether its file is
    there; a database server's database is taken to exist (connecting says otherwise)."""
    parsed = make_url(url)
    return dialect_for(parsed.get_backend_name()).exists(parsed)


def database_location(url: str | URL) -> str:
    """Where the database at ``url`` is, for messages: a file's path, else the URL without its
    password."""
    parsed = make_url(url)
    return dialect_for(parsed.get_backend_name()).location(parsed)
