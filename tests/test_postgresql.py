"""The database layer on a real PostgreSQL server (``tests/postgres.py`` starts one per session):
its tables and types, the error mapping by SQLSTATE, the change counter behind the read caches,
recovery after a server restart, atomic read-check-write sequences under concurrency, and row
MACs whose input does not depend on the database.

The whole service and API suite runs on PostgreSQL too, in the second pass of ``make test``
(``HSMKMS_TEST_DATABASE=postgresql``); the tests here hold what only PostgreSQL has.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres import Cluster, wait_until_accepting
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from hsmkms.audit.records import service_event_record
from hsmkms.audit.trail import AuditTrail
from hsmkms.config import ConfigError, Settings
from hsmkms.db import Database, ErrorMessages, file_url
from hsmkms.db.errors import Outcome, classify
from hsmkms.db.postgresql import BUSY_SQLSTATES, PostgreSQLDialect
from hsmkms.errors import DependencyTimeoutException, KMSInternalException
from hsmkms.identity import CredentialStore
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.store import KeyRecord, KeyVersionRecord, MetadataStore
from hsmkms.store.integrity import TokenRowSealer
from hsmkms.store.metadata import DuplicateAlias, LimitReached, VersionConflict
from hsmkms.store.records import GrantRecord

pytestmark = [pytest.mark.postgres, pytest.mark.hsm]

T0 = dt.datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=dt.UTC)
WORDING = ErrorMessages(
    busy="The thing is busy.", failed="The thing failed.", unavailable="The thing is unavailable."
)


def _key(key_id: str) -> KeyRecord:
    return KeyRecord(
        key_id,
        f"arn:aws:kms:us-east-1:111122223333:key/{key_id}",
        "a description",
        "ENCRYPT_DECRYPT",
        "SYMMETRIC_DEFAULT",
        "AWS_KMS",
        "Enabled",
        T0,
        '{"Version":"2012-10-17"}',
        1,
        rotation_enabled=True,
        rotation_period_days=365,
        next_rotation_date=T0 + dt.timedelta(days=365),
    )


def _version(key_id: str) -> KeyVersionRecord:
    return KeyVersionRecord(key_id, 1, "AES_256_GCM:00ab", "AES_256_GCM", T0, None)


# -- tables and types ----------------------------------------------------------------------------


def test_every_component_migrates_into_postgresql_with_its_types(
    pg_url: str, keystore: Pkcs11Keystore
) -> None:
    """The same migration runner creates every component's tables: timestamps with time zone,
    64-bit keys, bytea for binary columns; a second open applies nothing."""
    store = MetadataStore(pg_url)
    CredentialStore(pg_url, keystore, account_id="111122223333").close()
    AuditTrail(pg_url, keystore).close()
    insp = inspect(store.engine)
    types = {
        (t, c["name"]): str(c["type"]) for t in insp.get_table_names() for c in insp.get_columns(t)
    }
    assert types["keys", "created_at"] == "TIMESTAMP"  # SQLAlchemy's name; the zone is below
    with store.engine.connect() as conn:
        zoned = conn.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE data_type = 'timestamp with time zone' ORDER BY 1, 2"
            )
        ).all()
        versions = conn.execute(
            text("SELECT component, max(version) FROM schema_migrations GROUP BY 1 ORDER BY 1")
        ).all()
    assert ("keys", "created_at") in zoned
    assert ("schema_migrations", "applied_at") in zoned
    assert types["audit_records", "seq"] == "BIGINT"
    assert types["audit_records", "record"] == "BYTEA"
    assert types["identity_credentials", "policy"] == "TEXT"
    assert [tuple(v) for v in versions] == [("audit", 2), ("identity", 3), ("metadata", 5)]
    indexes = {i["name"] for i in insp.get_indexes("audit_records")}
    assert {
        "ix_audit_records_event_time",
        "ix_audit_records_event_name",
        "ix_audit_records_principal",
    } <= indexes
    assert any(
        i["column_names"] == ["key_id", "grantee_principal"] for i in insp.get_indexes("grants")
    )
    store.close()
    again = MetadataStore(pg_url)
    assert again.schema_version() == MetadataStore.latest_schema_version()
    again.close()


def test_timestamps_keep_microseconds_and_come_back_utc(pg_url: str) -> None:
    store = MetadataStore(pg_url)
    store.create_key(_key("k1"), _version("k1"), {})
    found = store.get_key("k1")
    assert found is not None
    assert found.created_at == T0
    assert found.created_at.tzinfo is dt.UTC
    store.close()


# -- row MACs: the same bytes on every database --------------------------------------------------


class RecordingSealer(TokenRowSealer):
    """The token's sealer, remembering every input it MACs."""

    def __init__(self, keystore: Pkcs11Keystore) -> None:
        super().__init__(keystore)
        self.inputs: list[bytes] = []

    def seal(self, data: bytes) -> bytes:
        self.inputs.append(data)
        return super().seal(data)


def _write_the_same_rows(url: str, keystore: Pkcs11Keystore) -> tuple[list[bytes], list[str]]:
    sealer = RecordingSealer(keystore)
    store = MetadataStore(url, sealer=sealer, clock=lambda: T0)
    sealer.inputs.clear()  # adoption at open seals nothing here (empty database)
    store.create_key(_key("k1"), _version("k1"), {"Project": "x", "Team": "y"})
    store.create_alias("alias/one", "k1", T0)
    store.create_grant(
        GrantRecord(
            "a" * 64,
            "k1",
            "grant-name",
            "arn:aws:iam::111122223333:user/alice",
            None,
            ("Encrypt", "Decrypt"),
            '{"EncryptionContextSubset":{"a":"b"}}',
            "111122223333",
            T0,
        )
    )
    store.transition("k1", ["Enabled"], "Disabled")
    problems = [p.detail for p in store.integrity_problems()]
    store.close()
    return sealer.inputs, problems


def test_a_row_is_sealed_over_the_same_bytes_on_sqlite_and_postgresql(
    pg_url: str, keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """The canonical bytes a row's MAC covers do not depend on the database: the same writes
    seal the same inputs on SQLite and on PostgreSQL, and both verify."""
    on_sqlite, sqlite_problems = _write_the_same_rows(file_url(tmp_path / "m.db"), keystore)
    on_postgresql, pg_problems = _write_the_same_rows(pg_url, keystore)
    assert len(on_sqlite) >= 6
    assert on_postgresql == on_sqlite
    assert sqlite_problems == pg_problems == []


# -- the error mapping, by SQLSTATE -------------------------------------------------------------


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url, busy_timeout_ms=100)
    with database.write(WORDING) as conn:
        conn.exec_driver_sql("CREATE TABLE things (id integer PRIMARY KEY, name text)")
        conn.exec_driver_sql("INSERT INTO things VALUES (1, 'one'), (2, 'two')")
    yield database
    database.close()


def _driver(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))


def _update_one(db: Database) -> None:
    with db.write(WORDING) as conn:
        conn.exec_driver_sql("UPDATE things SET name = 'x' WHERE id = 1")


def test_a_row_locked_past_the_busy_timeout_is_busy(db: Database, pg_url: str) -> None:
    holder = _driver(pg_url)
    holder.execute("SELECT * FROM things WHERE id = 1 FOR UPDATE")
    try:
        with pytest.raises(DependencyTimeoutException, match="The thing is busy"):
            _update_one(db)
    finally:
        holder.rollback()
        holder.close()


def test_an_advisory_writer_lock_held_elsewhere_is_busy(db: Database, pg_url: str) -> None:
    holder = _driver(pg_url)
    holder.execute("SELECT pg_advisory_xact_lock(42)")
    try:
        with pytest.raises(DependencyTimeoutException, match="busy"), db.write(WORDING, lock=42):
            pass
    finally:
        holder.rollback()
        holder.close()
    with db.write(WORDING, lock=42):
        pass  # given up with the holder's transaction


def _sleep_past_the_statement_timeout(db: Database) -> None:
    with db.write(WORDING) as conn:
        conn.exec_driver_sql("SET LOCAL statement_timeout = 10")
        conn.exec_driver_sql("SELECT pg_sleep(1)")


def test_a_statement_timeout_is_busy(db: Database) -> None:
    with pytest.raises(DependencyTimeoutException, match="busy"):
        _sleep_past_the_statement_timeout(db)


def test_a_deadlock_is_busy(db: Database, pg_url: str) -> None:
    """Two transactions locking two rows in opposite orders: the one PostgreSQL picks fails
    busy (retryable), the other commits."""
    other = _driver(pg_url)
    other.execute("SET deadlock_timeout = 50")
    other.execute("UPDATE things SET name = 'o' WHERE id = 2")
    outcome: list[BaseException | None] = []
    locked_one = threading.Event()

    def ours() -> None:
        try:
            with db.write(ErrorMessages(busy="busy", failed="failed")) as conn:
                conn.exec_driver_sql("SET LOCAL lock_timeout = 5000")
                conn.exec_driver_sql("UPDATE things SET name = 'u' WHERE id = 1")
                locked_one.set()
                conn.exec_driver_sql("UPDATE things SET name = 'u' WHERE id = 2")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=ours)
    thread.start()
    assert locked_one.wait(10)
    try:
        other.execute("SET lock_timeout = 5000")
        other.execute("UPDATE things SET name = 'o' WHERE id = 1")
        other.commit()
        theirs: BaseException | None = None
    except psycopg.errors.DeadlockDetected as exc:
        other.rollback()
        theirs = exc
    thread.join(20)
    other.close()
    assert len(outcome) == 1
    failures = [e for e in (outcome[0], theirs) if e is not None]
    assert len(failures) == 1  # exactly one transaction was chosen as the victim
    if isinstance(failures[0], psycopg.Error):
        assert failures[0].sqlstate == "40P01"
    else:
        assert isinstance(failures[0], DependencyTimeoutException)


@pytest.mark.parametrize("sqlstate", sorted(BUSY_SQLSTATES))
def test_busy_sqlstates_are_busy_whatever_their_text(sqlstate: str, db: Database) -> None:
    error = psycopg.errors.lookup(sqlstate)("nothing like a busy message")
    assert classify(error, WORDING, db._dialect) is Outcome.BUSY


def test_other_errors_are_told_apart_by_sqlstate_not_text(db: Database) -> None:
    dialect = db._dialect
    assert classify(psycopg.errors.lookup("23505")("locked busy"), WORDING, dialect) is (
        Outcome.FAILED
    )
    for sqlstate in ("57P01", "57P02", "57P03", "08006", "08001"):
        error = psycopg.errors.lookup(sqlstate)("fine")
        assert classify(error, WORDING, dialect) is Outcome.UNAVAILABLE, sqlstate
    assert classify(psycopg.OperationalError("x"), WORDING, dialect) is Outcome.UNAVAILABLE


def test_other_database_errors_fail(db: Database) -> None:
    with pytest.raises(KMSInternalException, match="The thing failed"), db.write(WORDING) as conn:
        conn.exec_driver_sql("INSERT INTO things VALUES (1, 'again')")


def test_reads_see_one_snapshot(db: Database, pg_url: str) -> None:
    """A read transaction is REPEATABLE READ: a commit made during it is not seen by its later
    statements (``hsmkms audit verify`` reads seals, then records)."""
    with db.read(WORDING) as conn:
        before = conn.exec_driver_sql("SELECT count(*) FROM things").scalar()
        with _driver(pg_url) as other:
            other.execute("INSERT INTO things VALUES (3, 'three')")
        assert conn.exec_driver_sql("SELECT count(*) FROM things").scalar() == before
        with pytest.raises(DBAPIError):
            conn.exec_driver_sql("INSERT INTO things VALUES (4, 'four')")  # read only


# -- the change signal ---------------------------------------------------------------------------


def test_a_commit_through_another_database_moves_the_signal(pg_url: str) -> None:
    first = Database(pg_url)
    second = Database(pg_url)
    with first.write(WORDING):
        pass  # creates the change counter
    token = second.change_token()
    assert token is not None
    assert second.change_token() == token  # nothing committed
    with first.write(WORDING) as conn:
        conn.exec_driver_sql("SELECT 1")
    assert second.change_token() != token
    first.close()
    second.close()


def test_audit_appends_do_not_move_the_signal(pg_url: str, keystore: Pkcs11Keystore) -> None:
    """The trail's appends (one per request) change nothing a cache holds: caches on the same
    database stay warm."""
    store = MetadataStore(pg_url)
    trail = AuditTrail(pg_url, keystore)
    token = store.database.change_token()
    for _ in range(3):
        trail.append(
            service_event_record(
                "RotateKey", account_id="111122223333", region="us-east-1", key_arn="arn:k"
            )
        )
    assert store.database.change_token() == token
    store.create_key(_key("k1"), _version("k1"), {})
    assert store.database.change_token() != token
    trail.close()
    store.close()


def test_a_change_by_another_process_decides_the_next_read(pg_url: str) -> None:
    reader = MetadataStore(pg_url, cache_check_interval=0)
    writer = MetadataStore(pg_url)
    writer.create_key(_key("k1"), _version("k1"), {})
    found = reader.get_key_and_version("k1")
    assert found is not None
    assert found[0].state == "Enabled"
    assert writer.transition("k1", ["Enabled"], "Disabled")
    found = reader.get_key_and_version("k1")
    assert found is not None
    assert found[0].state == "Disabled"
    reader.close()
    writer.close()


# -- connection loss and a server restart --------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A PostgreSQL server of this test alone (it is stopped and restarted)."""
    base = Path(tempfile.mkdtemp(prefix="hsmkms-pg-own-"))
    server = Cluster(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_a_restart_gives_503s_naming_the_cause_then_recovers_by_itself(
    own_cluster: Cluster,
) -> None:
    url = own_cluster.url(own_cluster.create_database())
    store = MetadataStore(url, cache_check_interval=0)
    store.create_key(_key("k1"), _version("k1"), {})
    assert store.get_key("k1") is not None  # a pooled connection now exists

    own_cluster.restart()  # every pooled connection is cut
    wait_until_accepting(own_cluster)
    assert store.get_key("k1") is not None  # pre-ping: a fresh connection, no error

    own_cluster.pg_ctl("stop", "-m", "fast")
    with pytest.raises(DependencyTimeoutException) as info:
        store.get_key("k1")
    message = info.value.message
    assert message.startswith("The metadata store is unavailable: ")
    assert "cannot be reached" in message or "shutting down" in message
    assert own_cluster.password not in message
    assert str(own_cluster.port) not in message
    with pytest.raises(DependencyTimeoutException, match="unavailable"):
        store.transition("k1", ["Enabled"], "Disabled")
    with pytest.raises(DependencyTimeoutException):  # no cached answer while it cannot tell
        store.get_key_and_version("k1")

    own_cluster.pg_ctl("start")
    wait_until_accepting(own_cluster)
    found = store.get_key_and_version("k1")
    assert found is not None
    assert found[0].state == "Enabled"  # the write that failed changed nothing
    assert store.transition("k1", ["Enabled"], "Disabled")
    store.close()


# -- read-check-write sequences under concurrency ------------------------------------------------


def test_concurrent_writers_keep_every_limit_and_fail_only_as_expected(pg_url: str) -> None:
    """Eight threads (eight connections) race on one key: adding and removing tags under a
    limit of 5, creating aliases under a limit of 3 (some names taken twice), rotating with
    compare-and-set. Every limit holds, and the only failures are the store's own outcomes."""
    store = MetadataStore(pg_url)
    store.create_key(_key("k1"), _version("k1"), {})
    unexpected: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(15):
            try:
                match (n + i) % 3:
                    case 0:
                        store.put_tags("k1", {f"t{(n + i) % 7}": str(i)}, max_tags=5)
                    case 1:
                        store.remove_tags("k1", [f"t{(n * i) % 7}"])
                    case _:
                        store.create_alias(f"alias/a{(n + i) % 6}", "k1", T0, max_per_key=3)
            except (LimitReached, DuplicateAlias):
                pass
            except BaseException as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert unexpected == []
    assert len(store.list_tags("k1", 100).items) <= 5
    assert len(store.aliases_of("k1")) <= 3
    store.close()


def test_concurrent_rotations_make_one_version_each(pg_url: str) -> None:
    store = MetadataStore(pg_url)
    store.create_key(_key("k1"), _version("k1"), {})
    won: list[int] = []
    unexpected: list[BaseException] = []
    barrier = threading.Barrier(6)

    def rotate() -> None:
        barrier.wait()
        for _ in range(5):
            found = store.get_key("k1")
            assert found is not None
            version = found.current_version + 1
            try:
                store.add_version(
                    KeyVersionRecord(
                        "k1", version, f"AES_256_GCM:{version:04x}", "AES_256_GCM", T0, "ON_DEMAND"
                    ),
                    on_demand=True,
                )
                won.append(version)
            except VersionConflict:
                pass
            except BaseException as exc:
                unexpected.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert unexpected == []
    assert sorted(won) == list(range(2, len(won) + 2))  # each version made exactly once
    key = store.get_key("k1")
    assert key is not None
    assert key.current_version == len(won) + 1
    assert key.on_demand_rotations == len(won)
    store.close()


def test_a_postgresql_dialect_is_chosen_for_the_url(pg_url: str) -> None:
    database = Database(pg_url)
    assert isinstance(database._dialect, PostgreSQLDialect)
    database.close()


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql+psycopg2://kms:hunter2@db/kms", "psycopg 3"),
        ("mysql://kms:hunter2@db/kms", "SQLite or PostgreSQL"),
        ("hunter2 is not a URL", "not a database URL"),
    ],
)
def test_a_database_url_hsmkms_cannot_use_is_refused_without_echoing_it(
    url: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSMKMS_DATABASE_URL", url)
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert "HSMKMS_DATABASE_URL" in str(info.value)
    assert problem in str(info.value)
    assert "hunter2" not in str(info.value)


def test_the_urls_connect_timeout_wins(pg_url: str) -> None:
    dialect = PostgreSQLDialect()
    assert dialect.engine_options(make_url(pg_url))["connect_args"] == {"connect_timeout": 10}
    assert "connect_args" not in dialect.engine_options(make_url(pg_url + "?connect_timeout=3"))
    database = Database(pg_url + "?connect_timeout=3")
    with database.read(WORDING) as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "10s"
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "repeatable read"
    with database.write(WORDING) as conn:
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    database.close()
    fast = Database(pg_url, durable=False, busy_timeout_ms=1234)
    with fast.write(WORDING) as conn:
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "1234ms"
    fast.close()


# -- the audit trail -----------------------------------------------------------------------------


def _event(n: int) -> dict[str, Any]:
    return service_event_record(
        "RotateKey",
        account_id="111122223333",
        region="us-east-1",
        key_arn=f"arn:aws:kms:us-east-1:111122223333:key/k{n}",
    )


def test_appenders_in_several_processes_keep_one_gap_free_chain(
    pg_url: str, keystore: Pkcs11Keystore
) -> None:
    """Four trails (four engines, as four server workers) append batches at once: the trail's
    advisory lock makes them take turns, and the chain verifies, every record once."""
    trails = [AuditTrail(pg_url, keystore, seal_every=7) for _ in range(4)]
    barrier = threading.Barrier(4)
    unexpected: list[BaseException] = []

    def append(trail: AuditTrail, n: int) -> None:
        barrier.wait()
        try:
            for batch in range(10):
                trail.append_many([_event(n * 1000 + batch * 10 + i) for i in range(3)])
        except BaseException as exc:
            unexpected.append(exc)

    threads = [threading.Thread(target=append, args=(t, n)) for n, t in enumerate(trails)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert unexpected == []
    for trail in trails:
        trail.close()
    reader = AuditTrail(pg_url, keystore, create=False)
    result = reader.verify()
    assert result.ok, result.problem
    assert result.records == 4 * 10 * 3
    arns = [r["resources"][0]["ARN"] for r in reader.search()]
    assert len(arns) == len(set(arns)) == 120
    reader.close()


def test_a_record_edited_in_postgresql_is_named_by_verify(
    pg_url: str, keystore: Pkcs11Keystore
) -> None:
    trail = AuditTrail(pg_url, keystore)
    for n in range(5):
        trail.append(_event(n))
    trail.close()
    with _driver(pg_url) as conn:
        conn.execute(
            "UPDATE audit_records SET record = "
            "convert_to(replace(convert_from(record, 'UTF8'), 'key/k3', 'key/k9'), 'UTF8') "
            "WHERE seq = 4"
        )
    reader = AuditTrail(pg_url, keystore, create=False)
    result = reader.verify()
    assert not result.ok
    assert result.first_bad_seq == 4
    assert result.problem is not None
    assert "record 4" in result.problem
    reader.close()
