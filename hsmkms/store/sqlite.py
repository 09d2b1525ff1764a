"""SQLite connection set-up shared by everything that opens the database (metadata store,
audit trail): WAL, a busy timeout, and explicit transactions so that writers can take the write
lock up front with ``BEGIN IMMEDIATE`` (pysqlite's implicit ``BEGIN`` is ``DEFERRED``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, event


def install_sqlite_hooks(
    engine: Engine,
    *,
    busy_timeout_ms: int,
    write_option: str,
    synchronous: str = "FULL",
    foreign_keys: bool = True,
) -> None:
    """Configure every new connection of ``engine``; a transaction begun on a connection whose
    execution option ``write_option`` is true starts with ``BEGIN IMMEDIATE``."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # driver autocommit: transactions are begun below
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if foreign_keys:
                cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute(f"PRAGMA synchronous = {synchronous}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(write_option, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
