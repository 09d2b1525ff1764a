"""A throwaway PostgreSQL server for the tests, and which database the tests run on.

:class:`Cluster` runs Debian's PostgreSQL (``initdb`` + ``pg_ctl``, installed by
``ci/bootstrap.sh``) in a temporary directory: its unix socket there, TCP on a free port of
127.0.0.1 with a password (scram-sha-256), no fsync (a test server holds nothing worth a power
cut). ``initdb`` refuses to run as root: then every server command runs as the ``postgres``
system user (``runuser``), in a directory it owns. :func:`cluster` starts one per test session,
on first use; ``conftest.py`` stops it at the end of the session.

``HSMKMS_TEST_DATABASE`` chooses the database of the tests marked ``database`` (the service, API,
store, credentials and audit tests): ``sqlite`` (the default) or ``postgresql``, which gives each
test's data directory a fresh PostgreSQL database (:func:`database_url_for`), reached by
``hsmkms serve`` and every command through ``HSMKMS_DATABASE_URL`` (``tests/server.py`` and
``tests/local_system.py`` pass it on).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

TEST_DATABASE = os.environ.get("HSMKMS_TEST_DATABASE", "sqlite")
if TEST_DATABASE not in ("sqlite", "postgresql"):
    raise RuntimeError(f"HSMKMS_TEST_DATABASE must be sqlite or postgresql, not {TEST_DATABASE!r}")
USER = "hsmkms_test"


def on_postgresql() -> bool:
    """Whether this test run keeps the service's tables in PostgreSQL."""
    return TEST_DATABASE == "postgresql"


def _bin_dir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    if not found:
        raise RuntimeError("PostgreSQL is not installed (ci/bootstrap.sh installs it)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL server in ``base`` (made by :meth:`start`)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "socket"
        self.log = base / "server.log"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(16)
        self._bin = _bin_dir()
        self._as_postgres = os.geteuid() == 0
        self._names = 0
        self._options = ""
        self.created: list[str] = []  # database names, in the order made
        self._lock = threading.Lock()

    # -- running server commands --------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        self.socket_dir.mkdir(parents=True)
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            "initdb",
            "-D", str(self.data),
            "-U", USER,
            "--pwfile", str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        self._options = " ".join(
            [
                f"-c port={self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=400",
                "-c shared_buffers=32MB",
                "-c logging_collector=off",
            ]
        )
        self.pg_ctl("start")

    def pg_ctl(self, action: str, *args: str) -> None:
        """``pg_ctl ACTION`` on this server, waiting for it to finish (``start``, ``stop``,
        ``restart``; ``-m fast`` disconnects every client)."""
        if action == "start":
            args = ("-o", self._options, *args)
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log), "-w", *args)

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", check=False)

    def restart(self) -> None:
        """Restart the server: every client connection is cut (``-m fast``)."""
        self.pg_ctl("restart", "-m", "fast")

    # -- databases ----------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        """The SQLAlchemy URL of ``database`` over TCP with this server's password."""
        secret = f":{self.password}" if password else ""
        return f"postgresql+psycopg://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """A connection to the ``postgres`` database over the unix socket, in autocommit."""
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=USER, dbname="postgres", autocommit=True
        )

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; its name."""
        with self._lock:
            self._names += 1
            name = f"{prefix}_{os.getpid()}_{self._names}"
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        with self._lock:
            self.created.append(name)
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


_cluster: Cluster | None = None
_cluster_lock = threading.Lock()


def cluster() -> Cluster:
    """The session's PostgreSQL server, started on first use."""
    global _cluster
    with _cluster_lock:
        if _cluster is None:
            base = Path(tempfile.mkdtemp(prefix="hsmkms-pg-"))
            started = Cluster(base)
            try:
                started.start()
            except BaseException:
                started.stop()
                shutil.rmtree(base, ignore_errors=True)
                raise
            _cluster = started
        return _cluster


def stop_cluster() -> None:
    """Stop the session's server and remove its directory (when one was started)."""
    global _cluster
    with _cluster_lock:
        if _cluster is not None:
            _cluster.stop()
            shutil.rmtree(_cluster.base, ignore_errors=True)
            _cluster = None


def fresh_database_url(prefix: str = "t") -> str:
    """The URL of a new, empty database on the session's server."""
    server = cluster()
    return server.url(server.create_database(prefix))


def store_url(path: Path) -> str:
    """The database URL a test keeps its tables in: the SQLite file ``path``, or on a
    PostgreSQL run the database that belongs to ``path``."""
    return database_url_for(path) or f"sqlite:///{path}"


def drop_databases_made_after(count: int) -> None:
    """Drop the session server's databases made after the first ``count`` (each about 8 MB:
    a test's databases go when the test ends), and forget which data directory they served."""
    with _cluster_lock:
        server = _cluster
    if server is None:
        return
    with server._lock:
        names, server.created[count:] = server.created[count:], []
    if not names:
        return
    with _cluster_lock:
        for key, url in list(_by_data_dir.items()):
            if url.rsplit("/", 1)[1] in names:
                del _by_data_dir[key]
    for name in names:
        server.drop_database(name)


def databases_made() -> int:
    """How many databases the session's server has made so far (0 before it started)."""
    with _cluster_lock:
        return 0 if _cluster is None else len(_cluster.created)


_by_data_dir: dict[Path, str] = {}
# The embedded default's database files in a data directory.
_DATA_DIR_FILES = frozenset({"hsmkms.db", "audit.db"})


def database_url_for(data_dir: Path) -> str | None:
    """On a PostgreSQL run, the URL of the database that belongs to ``data_dir`` (made on first
    use, the same for every later call in this test session); ``None`` on SQLite. A data
    directory's ``hsmkms.db`` and ``audit.db`` name the data directory's database."""
    if not on_postgresql():
        return None
    key = Path(os.path.abspath(data_dir))
    if key.name in _DATA_DIR_FILES:
        key = key.parent  # with HSMKMS_DATABASE_URL set, both live in the one database
    with _cluster_lock:
        found = _by_data_dir.get(key)
    if found is None:
        found = fresh_database_url("d")
        with _cluster_lock:
            found = _by_data_dir.setdefault(key, found)
    return found


def wait_until_accepting(server: Cluster, timeout: float = 30.0) -> None:
    """Wait until ``server`` accepts connections again."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(psycopg.OperationalError):
            server.admin().close()
            return
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not come back")
        time.sleep(0.05)


def _driver_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def outside_sql(path: Path, statement: str, *params: object) -> int:
    """Run one statement on the test database of ``path`` (see :func:`store_url`) on a
    connection of its own, as someone editing the database outside hsmkms; its row count.
    ``?`` placeholders on both databases. The edit also bumps the change counter (on both: the
    read caches watch it), as any later write through hsmkms would."""
    url = database_url_for(path)
    if url is None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            count = conn.execute(statement, params).rowcount
            if conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'change_counter'"
            ).fetchone():
                conn.execute(
                    "UPDATE change_counter SET counter = counter + 1, nonce = randomblob(8)"
                )
            conn.execute("COMMIT")
            return int(count)
        finally:
            conn.close()
    with psycopg.connect(_driver_url(url), autocommit=True) as pg, pg.transaction():
        count = pg.execute(statement.replace("?", "%s"), params).rowcount
        counter = pg.execute("SELECT to_regclass('change_counter')").fetchone()
        if counter is not None and counter[0] is not None:
            pg.execute("UPDATE change_counter SET counter = counter + 1 WHERE id = 1")
    return int(count)


def outside_fetch(path: Path, statement: str, *params: object) -> list[Any]:
    """The rows of a query on the test database of ``path``, read outside hsmkms."""
    url = database_url_for(path)
    if url is None:
        conn = sqlite3.connect(path)
        try:
            return conn.execute(statement, params).fetchall()
        finally:
            conn.close()
    with psycopg.connect(_driver_url(url), autocommit=True) as pg:
        rows = pg.execute(statement.replace("?", "%s"), params).fetchall()
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


def stored_bytes(path: Path) -> bytes:
    """Everything the test database of ``path`` holds, for scans that prove a secret never
    reached it: on SQLite the bytes of ``path`` and its WAL and shared-memory files; on
    PostgreSQL the database's files after a checkpoint (raw, deleted rows included) and a
    plain ``pg_dump`` of it (values that PostgreSQL stores compressed, decompressed)."""
    url = database_url_for(path)
    if url is None:
        return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))
    server = cluster()
    name = url.rsplit("/", 1)[1]
    with server.admin() as conn:
        conn.execute("CHECKPOINT")
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert row is not None
    files = sorted((server.data / "base" / str(row[0])).iterdir())
    dump = subprocess.run(
        [str(server._bin / "pg_dump"), "-h", str(server.socket_dir), "-p", str(server.port),
         "-U", USER, name],
        capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return b"".join(p.read_bytes() for p in files if p.is_file()) + dump
