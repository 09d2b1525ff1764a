"""The audit trail on a real SQLite file and a real SoftHSM2 token: appends, seals, search, and
``verify`` against each kind of tampering done directly in the database."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import multiprocessing
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import new_mac_key
from hsmkms.audit import AuditTrail, UserIdentity, VerifyStatus, api_call_record, canonical_json
from hsmkms.audit.records import service_event_record
from hsmkms.audit.trail import _index_values
from hsmkms.errors import DependencyTimeoutException, KMSInternalException
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service.operations import READ_ONLY_OPERATIONS
from hsmkms.store.metadata import MetadataStore

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
START = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
EVERY = 5
INTERVAL = 60.0


def key_arn(n: int) -> str:
    return f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0000000{n}-aaaa-bbbb-cccc-dddddddddddd"


def identity(name: str) -> UserIdentity:
    return UserIdentity(
        "IAMUser", f"AIDA{name.upper()}", f"arn:aws:iam::{ACCOUNT}:user/{name}", ACCOUNT,
        f"AKIA{name.upper()}",
    )  # fmt: skip


class FakeClock:
    """A clock the test moves."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def record(
    i: int,
    *,
    event: str = "Encrypt",
    who: str = "alice",
    key: int = 1,
    when: dt.datetime | None = None,
    request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return api_call_record(
        event,
        read_only=event in READ_ONLY_OPERATIONS,
        identity=identity(who),
        account_id=ACCOUNT,
        region="us-east-1",
        request_id=f"req-{i}",
        request=request if request is not None else {"KeyId": key_arn(key)},
        key_arns=[key_arn(key)],
        event_time=when or START,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hsmkms.db"


@pytest.fixture
def trail(db: Path, keystore: Pkcs11Keystore, clock: FakeClock) -> Iterator[AuditTrail]:
    """A trail sealed every 5 records, holding 12 records: seals 1 (genesis) and 2 (start)
    cover nothing, seal 3 covers 1..5, seal 4 covers 1..10; records 11, 12 are unsealed."""
    t = AuditTrail(f"sqlite:///{db}", keystore, clock=clock, seal_every=EVERY,
                   seal_interval=INTERVAL)  # fmt: skip
    for i in range(1, 13):
        clock.advance(1)
        t.append(record(i, when=clock.now))
    yield t
    t.engine.dispose()


def sql(db: Path, statement: str, *params: Any) -> list[Any]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(statement, params).fetchall()
    conn.close()
    return rows


def rewrite_records(db: Path, bodies: list[bytes]) -> None:
    """Replace every record by ``bodies`` with a correctly recomputed hash chain (what an
    attacker with database access can do)."""
    with sqlite3.connect(db) as conn:
        cols = conn.execute("SELECT * FROM audit_records WHERE seq = 1").description
        names = [c[0] for c in cols]
        first = dict(zip(names, conn.execute("SELECT * FROM audit_records WHERE seq = 1")
                         .fetchone(), strict=True))  # fmt: skip
        conn.execute("DELETE FROM audit_records")
        prev = bytes(32)
        for seq, body in enumerate(bodies, start=1):
            digest = hashlib.sha256(prev + body).digest()
            row = dict(first, seq=seq, record=body, hash=digest)
            row.update(_index_values(json.loads(body)))
            conn.execute(
                f"INSERT INTO audit_records ({', '.join(row)}) VALUES "  # noqa: S608
                f"({', '.join('?' for _ in row)})",
                list(row.values()),
            )
            prev = digest
    conn.close()


def bodies(db: Path) -> list[bytes]:
    return [bytes(r[0]) for r in sql(db, "SELECT record FROM audit_records ORDER BY seq")]


def check(trail: AuditTrail, status: VerifyStatus, first_bad: int | None, text: str) -> None:
    result = trail.verify()
    assert result.status is status, result
    assert result.first_bad_seq == first_bad, result
    assert result.problem is not None
    assert text in result.problem, result.problem


# -- the untampered trail ---------------------------------------------------------------------


def test_intact_trail_verifies(trail: AuditTrail) -> None:
    result = trail.verify()
    assert result.ok, result
    assert (result.records, result.seals, result.sealed_through, result.unsealed) == (12, 4, 10, 2)
    assert result.problem is None


def test_records_are_stored_as_canonical_json_chained_from_zero(
    trail: AuditTrail, db: Path
) -> None:
    rows = sql(db, "SELECT seq, record, hash FROM audit_records ORDER BY seq")
    prev = bytes(32)
    for expected, (seq, body, digest) in enumerate(rows, start=1):
        assert seq == expected
        assert canonical_json(json.loads(body)) == body
        assert hashlib.sha256(prev + body).digest() == digest
        prev = digest


def test_seal_on_demand_and_shutdown_cover_everything(trail: AuditTrail) -> None:
    seal = trail.seal()
    assert (seal.seal_seq, seal.record_seq, seal.reason) == (5, 12, "demand")
    trail.close()
    result = trail.verify()
    assert result.ok
    assert (result.unsealed, result.seals) == (0, 6)


def test_interval_seal_on_append_and_heartbeat(trail: AuditTrail, clock: FakeClock) -> None:
    assert trail.seal_if_due() is None
    clock.advance(INTERVAL)
    heartbeat = trail.seal_if_due()
    assert heartbeat is not None
    assert heartbeat.reason == "interval"
    clock.advance(INTERVAL)
    trail.append(record(13, when=clock.now))
    assert trail.verify().unsealed == 0  # the append sealed: the interval had passed


def test_reopening_reuses_the_audit_key_and_writes_a_start_seal(
    trail: AuditTrail, db: Path, keystore: Pkcs11Keystore, clock: FakeClock
) -> None:
    key_before = sql(db, "SELECT value FROM audit_settings WHERE name = 'audit_key'")
    again = AuditTrail(f"sqlite:///{db}", keystore, clock=clock, seal_every=EVERY)
    assert sql(db, "SELECT value FROM audit_settings WHERE name = 'audit_key'") == key_before
    assert sql(db, "SELECT reason FROM audit_seals ORDER BY seal_seq DESC LIMIT 1") == [("start",)]
    assert again.verify().ok
    again.engine.dispose()


def test_audit_key_is_a_non_extractable_token_key(
    trail: AuditTrail, db: Path, keystore: Pkcs11Keystore
) -> None:
    text = sql(db, "SELECT value FROM audit_settings WHERE name = 'audit_key'")[0][0]
    ref = KeyMaterialRef.from_str(text)
    assert text.startswith("v2:default:HMAC_256:-:")
    (object_id,) = ref.object_ids
    attrs = keystore.attributes(object_id, ["EXTRACTABLE", "SENSITIVE", "TOKEN", "LABEL"])
    assert attrs["EXTRACTABLE"] is False
    assert attrs["SENSITIVE"] is True
    assert attrs["TOKEN"] is True
    assert attrs["LABEL"] == "hsmkms:audit"


def test_shares_the_metadata_store_database_through_its_engine(
    db: Path, keystore: Pkcs11Keystore
) -> None:
    store = MetadataStore(f"sqlite:///{db}")
    trail = AuditTrail(store.engine, keystore)
    trail.append(record(1))
    assert trail.verify().ok
    assert trail.engine is not store.engine
    assert store.schema_version() == store.latest_schema_version()
    trail.close()
    store.close()


def test_reader_without_trail_reports_missing(tmp_path: Path, keystore: Pkcs11Keystore) -> None:
    reader = AuditTrail(f"sqlite:///{tmp_path / 'empty.db'}", keystore, create=False)
    result = reader.verify()
    assert result.status is VerifyStatus.MISSING
    assert list(reader.search()) == []
    assert reader.tail(5) == []
    reader.close()


# -- tampering --------------------------------------------------------------------------------


def test_modified_record_is_found(trail: AuditTrail, db: Path) -> None:
    body = bodies(db)[2].replace(b'"Encrypt"', b'"Decrypt"')
    sql(db, "UPDATE audit_records SET record = ? WHERE seq = 3", body)
    check(trail, VerifyStatus.TAMPERED, 3, "record 3: hash chain broken (modified, inserted or "
          "removed record)")  # fmt: skip


def test_modified_record_with_recomputed_chain_is_found_by_the_seal(
    trail: AuditTrail, db: Path
) -> None:
    forged = bodies(db)
    forged[6] = forged[6].replace(b"alice", b"bobby")
    rewrite_records(db, forged)
    check(trail, VerifyStatus.TAMPERED, 6, "records 6..10 do not match seal 4")


def test_deleted_record_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_records WHERE seq = 7")
    check(trail, VerifyStatus.TAMPERED, 7, "record 7: missing")


def test_deleted_record_with_renumbered_chain_is_found_by_the_seal(
    trail: AuditTrail, db: Path
) -> None:
    rewrite_records(db, [b for i, b in enumerate(bodies(db)) if i != 1])
    check(trail, VerifyStatus.TAMPERED, 1, "records 1..5 do not match seal 3")


def test_inserted_forged_record_with_recomputed_chain_is_found_by_the_seal(
    trail: AuditTrail, db: Path
) -> None:
    original = bodies(db)
    forged = canonical_json(record(99, who="mallory", when=START))
    rewrite_records(db, [*original[:3], forged, *original[3:]])
    check(trail, VerifyStatus.TAMPERED, 1, "records 1..5 do not match seal 3")


def test_inserted_row_without_chain_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "UPDATE audit_records SET seq = seq + 100 WHERE seq > 4")
    sql(db, "UPDATE audit_records SET seq = seq - 99 WHERE seq > 100")
    forged = canonical_json(record(99, who="mallory"))
    row = sql(db, "SELECT event_time, event_name, principal, access_key_id, key_ids, hash "
              "FROM audit_records WHERE seq = 4")[0]  # fmt: skip
    sql(db, "INSERT INTO audit_records VALUES (5, ?, ?, ?, ?, ?, ?, ?)", *row[:5], forged, row[5])
    check(trail, VerifyStatus.TAMPERED, 5, "record 5: hash chain broken")


def test_swapped_records_are_found(trail: AuditTrail, db: Path) -> None:
    rows = sql(db, "SELECT seq, record, hash FROM audit_records WHERE seq IN (2, 3) ORDER BY seq")
    sql(db, "UPDATE audit_records SET record = ?, hash = ? WHERE seq = 2", rows[1][1], rows[1][2])
    sql(db, "UPDATE audit_records SET record = ?, hash = ? WHERE seq = 3", rows[0][1], rows[0][2])
    check(trail, VerifyStatus.TAMPERED, 2, "record 2: hash chain broken")


def test_swapped_records_with_recomputed_chain_are_found_by_the_seal(
    trail: AuditTrail, db: Path
) -> None:
    b = bodies(db)
    b[7], b[8] = b[8], b[7]
    rewrite_records(db, b)
    check(trail, VerifyStatus.TAMPERED, 6, "records 6..10 do not match seal 4")


def test_truncated_unsealed_tail_cannot_be_proven(trail: AuditTrail, db: Path) -> None:
    """Documented limit: records after the newest seal can be removed without a trace."""
    sql(db, "DELETE FROM audit_records WHERE seq > 10")
    result = trail.verify()
    assert result.ok
    assert (result.records, result.unsealed) == (10, 0)


def test_truncated_sealed_tail_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_records WHERE seq > 8")
    check(trail, VerifyStatus.TAMPERED, 9, "record 9: missing (seal 4 covers records through 10 "
          "but the trail ends at 8: tail removed)")  # fmt: skip


def test_deleted_last_seal_leaves_too_many_unsealed_records(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_seals WHERE seal_seq = 4")
    check(trail, VerifyStatus.STALE, 6, "7 records after the newest seal (seal 3) where at most "
          "5 are allowed")  # fmt: skip


def test_deleted_newest_seal_and_the_tail_after_the_one_before_is_not_intact(
    trail: AuditTrail, db: Path
) -> None:
    """Removing the newest seal and the records after the one before: the token's anchor still
    names the removed seal. One seal short is what an interrupted seal write also leaves, so
    it is reported as not proven (not as intact, and at once — not once overdue)."""
    sql(db, "DELETE FROM audit_seals WHERE seal_seq = 4")
    sql(db, "DELETE FROM audit_records WHERE seq > 5")
    check(trail, VerifyStatus.UNCLEAN, 6, "the token's anchor names seal 4, which the trail "
          "does not hold: its write was interrupted")  # fmt: skip


def test_deleted_seals_and_tail_are_found_by_the_anchor(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_seals WHERE seal_seq > 2")
    sql(db, "DELETE FROM audit_records")
    check(trail, VerifyStatus.TAMPERED, 1, "record 1: missing (the token's anchor names seal 4 "
          "but the trail ends at seal 2: seals and records removed from the tail)")  # fmt: skip


def test_deleted_middle_seal_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_seals WHERE seal_seq = 3")
    check(trail, VerifyStatus.TAMPERED, 1, "seal 3: missing (seal sequence jumps to 4)")


def test_every_seal_deleted_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_seals")
    check(trail, VerifyStatus.TAMPERED, 1, "seal 1: missing")


def test_renumbered_seals_are_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "DELETE FROM audit_seals WHERE seal_seq = 3")
    sql(db, "UPDATE audit_seals SET seal_seq = 3 WHERE seal_seq = 4")
    check(trail, VerifyStatus.TAMPERED, 1, "seal 3: invalid tag")


def test_moved_seal_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "UPDATE audit_seals SET record_seq = 9 WHERE seal_seq = 4")
    check(trail, VerifyStatus.TAMPERED, 6, "seal 4: invalid tag (modified or forged seal)")


def test_seal_copied_from_another_trail_is_found(
    trail: AuditTrail, db: Path, tmp_path: Path, keystore: Pkcs11Keystore, clock: FakeClock
) -> None:
    other_db = tmp_path / "other.db"
    other = AuditTrail(f"sqlite:///{other_db}", keystore, clock=clock, seal_every=EVERY)
    for i in range(1, 13):
        other.append(record(i, when=clock.now))
    other.engine.dispose()
    sql(db, "DELETE FROM audit_seals WHERE seal_seq = 4")
    seal = sql(other_db, "SELECT * FROM audit_seals WHERE seal_seq = 4")[0]
    sql(db, f"INSERT INTO audit_seals VALUES ({', '.join('?' for _ in seal)})", *seal)  # noqa: S608
    check(trail, VerifyStatus.TAMPERED, 6, "seal 4: invalid tag")


def test_audit_key_replaced_by_another_audit_key_is_found(
    trail: AuditTrail, db: Path, keystore: Pkcs11Keystore
) -> None:
    other = new_mac_key(keystore, "audit")
    sql(db, "UPDATE audit_settings SET value = ? WHERE name = 'audit_key'", other.to_str())
    check(trail, VerifyStatus.TAMPERED, 1, "seal 1: invalid tag")


def test_audit_key_replaced_by_a_non_audit_key_is_found(
    trail: AuditTrail, db: Path, keystore: Pkcs11Keystore, clock: FakeClock
) -> None:
    other = new_mac_key(keystore, "integrity")
    sql(db, "UPDATE audit_settings SET value = ? WHERE name = 'audit_key'", other.to_str())
    check(trail, VerifyStatus.TAMPERED, 1, "labelled 'hsmkms:integrity'")
    with pytest.raises(KMSInternalException, match="audit key is wrong"):
        AuditTrail(f"sqlite:///{db}", keystore, clock=clock)


def test_audit_key_reference_to_nothing_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "UPDATE audit_settings SET value = ? WHERE name = 'audit_key'", "HMAC_SHA_256:abcd")
    check(trail, VerifyStatus.TAMPERED, 1, "names no object on the token")


def test_removed_audit_key_reference_is_found_and_not_replaced(
    trail: AuditTrail, db: Path, keystore: Pkcs11Keystore
) -> None:
    sql(db, "DELETE FROM audit_settings WHERE name = 'audit_key'")
    check(trail, VerifyStatus.TAMPERED, 1, "no audit key reference")
    with pytest.raises(KMSInternalException, match="seals but no audit key"):
        AuditTrail(f"sqlite:///{db}", keystore)


def test_rollback_is_found_by_the_anchor_and_with_a_seal_kept_outside(
    trail: AuditTrail, db: Path, tmp_path: Path, clock: FakeClock
) -> None:
    """A database restored from an older copy: the token's anchor names a later seal; the
    newest seal of a later verify, kept elsewhere, exposes it too."""
    backup = tmp_path / "backup.db"
    with sqlite3.connect(db) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    trail.seal()
    trail.close()
    kept = trail.verify().newest_seal
    assert kept is not None
    assert trail.verify(expect_seal=(kept.seal_seq, kept.tag)).ok
    restored = AuditTrail(f"sqlite:///{backup}", trail.keystore, create=False, clock=clock)
    result = restored.verify()
    assert result.status is VerifyStatus.TAMPERED
    assert result.problem == (
        "record 11: missing (the token's anchor names seal 6 but the trail ends at seal 4: "
        "seals and records removed from the tail)"
    )
    result = restored.verify(expect_seal=(kept.seal_seq, kept.tag))
    assert result.status is VerifyStatus.TAMPERED
    assert result.problem == "seal 6: missing (the trail ends at seal 4: rolled back)"
    assert result.first_bad_seq == 11
    result = restored.verify(expect_seal=(4, kept.tag))
    assert result.problem == "seal 4: not the seal recorded earlier (trail rolled back or replaced)"
    restored.close()


def test_edited_search_column_is_found(trail: AuditTrail, db: Path) -> None:
    sql(db, "UPDATE audit_records SET principal = 'arn:mallory' WHERE seq = 4")
    check(trail, VerifyStatus.TAMPERED, 4, "record 4: search columns do not match the record")


def test_a_writer_that_stopped_sealing_is_an_unclean_stop_and_shutdown_ends_the_duty(
    trail: AuditTrail, clock: FakeClock
) -> None:
    clock.advance(2 * INTERVAL + 1)
    result = trail.verify()
    assert result.status is VerifyStatus.UNCLEAN
    assert result.problem is not None
    assert result.problem.startswith(
        f"writer stopped without a clean shutdown: {trail.writer_id} (newest seal 4, "
    )
    assert result.problem.endswith(
        "Intact through seal 4 (record 10), which the token's anchor names; 2 records after it "
        "are chained but not sealed"
    )
    (stop,) = result.unclean
    assert (stop.writer, stop.last_seal, stop.noted_by) == (trail.writer_id, 4, None)
    trail.close()
    clock.advance(30 * 24 * 3600)
    result = trail.verify()
    assert result.ok, result.problem
    assert (result.unclean, result.live, result.unsealed) == ((), (), 0)


def test_a_restored_copy_records_the_end_of_the_sessions_it_copied(
    trail: AuditTrail, db: Path, keystore: Pkcs11Keystore, clock: FakeClock
) -> None:
    """A copy of the database taken while a writer runs (a backup, restored): a command trail
    on it ends the copied session with a recover seal at once, so verify finds it noted, not
    stopped uncleanly, however long after; the original writer's next seal is its own."""
    copy = db.with_name("restored.db")
    shutil.copyfile(db, copy)
    for suffix in ("-wal", "-shm"):  # the writer's seals may still be in the WAL
        if db.with_name(db.name + suffix).exists():
            shutil.copyfile(db.with_name(db.name + suffix), copy.with_name(copy.name + suffix))
    restored = AuditTrail(f"sqlite:///{copy}", keystore, clock=clock, command=True)
    try:
        assert restored.end_copied_sessions() == (trail.writer_id,)
        assert restored.end_copied_sessions() == ()  # nothing open any more: no seal
        clock.advance(30 * 24 * 3600)
        result = restored.verify()
        assert result.status is not VerifyStatus.UNCLEAN, result.problem
        (stop,) = result.unclean
        assert stop.writer == trail.writer_id
        assert stop.noted_by is not None
    finally:
        restored.close()


def test_seal_gap_is_reported_as_warning(trail: AuditTrail, clock: FakeClock) -> None:
    clock.advance(10 * INTERVAL)
    trail.seal_if_due()
    result = trail.verify()
    assert result.ok
    assert len(result.gaps) == 1
    assert result.gaps[0].after_seal == 4
    assert result.gaps[0].seconds > 2 * INTERVAL


# -- property: any single-byte change anywhere is found ---------------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    target=st.sampled_from(
        [
            ("audit_records", "record", "seq"),
            ("audit_records", "hash", "seq"),
            ("audit_seals", "tag", "seal_seq"),
            ("audit_seals", "chain_hash", "seal_seq"),
            ("audit_seals", "prev_tag", "seal_seq"),
        ]
    ),
    row=st.integers(1, 12),
    position=st.integers(0, 10_000),
    delta=st.integers(1, 255),
)
def test_any_single_byte_change_is_found(
    trail: AuditTrail, db: Path, target: tuple[str, str, str], row: int, position: int, delta: int
) -> None:
    table, column, key = target
    row = min(row, 4) if table == "audit_seals" else row
    (original,) = sql(db, f"SELECT {column} FROM {table} WHERE {key} = ?", row)[0]  # noqa: S608
    original = bytes(original)
    changed = bytearray(original)
    changed[position % len(changed)] ^= delta
    sql(db, f"UPDATE {table} SET {column} = ? WHERE {key} = ?", bytes(changed), row)  # noqa: S608
    try:
        result = trail.verify()
        assert result.status is VerifyStatus.TAMPERED, (target, row)
    finally:
        sql(db, f"UPDATE {table} SET {column} = ? WHERE {key} = ?", original, row)  # noqa: S608
    assert trail.verify().ok


# -- search and tail --------------------------------------------------------------------------


@pytest.fixture
def varied(db: Path, keystore: Pkcs11Keystore) -> Iterator[AuditTrail]:
    t = AuditTrail(f"sqlite:///{db}", keystore)
    day = dt.timedelta(days=1)
    t.append(record(1, event="Encrypt", who="alice", key=1, when=START))
    t.append(record(2, event="Decrypt", who="alice", key=2, when=START + day))
    t.append(record(3, event="Decrypt", who="bob", key=1, when=START + 2 * day))
    t.append(record(4, event="CreateKey", who="bob", key=3, when=START + 3 * day))
    t.append(
        service_event_record(
            "RotateKey", account_id=ACCOUNT, region="us-east-1", key_arn=key_arn(1),
            event_time=START + 4 * day,
        )
    )  # fmt: skip
    yield t
    t.engine.dispose()


def ids(records: Any) -> list[str | None]:
    return [r.get("requestID", r["eventName"]) for r in records]


def test_search_filters(varied: AuditTrail) -> None:
    day = dt.timedelta(days=1)
    assert ids(varied.search()) == ["req-1", "req-2", "req-3", "req-4", "RotateKey"]
    assert ids(varied.search(key_id=key_arn(1))) == ["req-1", "req-3", "RotateKey"]
    assert ids(varied.search(key_id=key_arn(1).rpartition("/")[2])) == [
        "req-1",
        "req-3",
        "RotateKey",
    ]
    assert ids(varied.search(principal=f"arn:aws:iam::{ACCOUNT}:user/bob")) == ["req-3", "req-4"]
    assert ids(varied.search(principal="AKIAALICE")) == ["req-1", "req-2"]
    assert ids(varied.search(event_name="Decrypt")) == ["req-2", "req-3"]
    assert ids(varied.search(since=START + day, until=START + 3 * day)) == [
        "req-2",
        "req-3",
        "req-4",
    ]
    assert ids(varied.search(event_name="Decrypt", principal="AKIABOB", key_id=key_arn(1))) == [
        "req-3"
    ]
    assert ids(varied.search(limit=2)) == ["req-1", "req-2"]
    assert list(varied.search(key_id="%")) == []
    assert list(varied.search(event_name="Nothing")) == []


def test_search_checks_hits_against_the_record_itself(varied: AuditTrail, db: Path) -> None:
    """An edited search column can hide a record from search, never misattribute one."""
    sql(db, "UPDATE audit_records SET principal = 'arn:mallory', access_key_id = 'AKIAM'")
    assert list(varied.search(principal="arn:mallory")) == []


def test_tail_returns_the_newest_oldest_first(varied: AuditTrail) -> None:
    assert ids(varied.tail(2)) == ["req-4", "RotateKey"]
    assert len(varied.tail(100)) == 5
    assert varied.tail(0) == []


def test_append_to_a_locked_database_fails_as_dependency_timeout(
    varied: AuditTrail, db: Path, keystore: Pkcs11Keystore
) -> None:
    impatient = AuditTrail(f"sqlite:///{db}", keystore, command=True, busy_timeout_ms=50)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DependencyTimeoutException, match="busy"):
            impatient.append(record(9))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert impatient.append(record(9)) == 6
    impatient.close()


def test_append_refuses_a_record_without_event_name(varied: AuditTrail) -> None:
    with pytest.raises(ValueError, match="eventName"):
        varied.append({"eventTime": "2026-01-01T00:00:00Z"})
    with pytest.raises(TypeError):
        varied.append({"eventName": "X", "eventTime": "2026-01-01T00:00:00Z", "blob": b"x"})


# -- secrets ----------------------------------------------------------------------------------

SECRET = b"plaintext that must never be stored"
DATA_KEY = bytes(range(100, 132))
CIPHERTEXT = b"\x01\x02ciphertext blob bytes\xff" * 2


def test_stored_trail_holds_no_secret(db: Path, keystore: Pkcs11Keystore) -> None:
    """Records built from requests and responses full of secrets: scan every stored byte."""
    t = AuditTrail(f"sqlite:///{db}", keystore)
    arn = key_arn(1)
    t.append(record(1, event="Encrypt", request={"KeyId": arn, "Plaintext": SECRET}))
    t.append(
        api_call_record(
            "GenerateDataKey", identity=identity("alice"), account_id=ACCOUNT, region="r",
            read_only=True,
            request_id="r2", request={"KeyId": arn, "KeySpec": "AES_256"},
            response={"Plaintext": DATA_KEY, "CiphertextBlob": CIPHERTEXT}, key_arns=[arn],
        )
    )  # fmt: skip
    t.append(record(3, event="Decrypt", request={"CiphertextBlob": CIPHERTEXT, "KeyId": arn}))
    t.append(
        api_call_record(
            "Decrypt", identity=identity("alice"), account_id=ACCOUNT, region="r",
            read_only=True,
            request_id="r4", request={"CiphertextBlob": CIPHERTEXT},
            error_code="InvalidCiphertextException",
            error_message=f"bad blob {base64.b64encode(CIPHERTEXT).decode()}",
        )
    )  # fmt: skip
    t.append(record(5, event="CreateGrant", request={"KeyId": arn, "GrantTokens": ["tok-SECRET"]}))
    t.close()
    stored = b"".join(p.read_bytes() for p in db.parent.glob(f"{db.name}*"))
    assert b"req-1" in stored  # the scan does see the records
    for secret in (SECRET, DATA_KEY, CIPHERTEXT, b"tok-SECRET"):
        for form in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert form not in stored


# -- concurrency ------------------------------------------------------------------------------

PER_WRITER = 120


def _writer(trail: AuditTrail, name: str) -> None:
    for i in range(PER_WRITER):
        trail.append(record(i, who=name))
    trail.close()


def test_concurrent_appends_from_several_processes_keep_one_valid_chain(
    db: Path, keystore: Pkcs11Keystore
) -> None:
    trail = AuditTrail(f"sqlite:///{db}", keystore, seal_every=20)
    trail.append(record(0))  # the parent is connected before forking: children must not share
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_writer, args=(trail, n)) for n in ("carol", "dave")]
    for child in children:
        child.start()
    for i in range(PER_WRITER):
        trail.append(record(i, who="erin"))
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    result = trail.verify()
    assert result.ok, result
    assert result.records == 1 + 3 * PER_WRITER
    seqs = [r[0] for r in sql(db, "SELECT seq FROM audit_records ORDER BY seq")]
    assert seqs == list(range(1, 2 + 3 * PER_WRITER))
    for name in ("carol", "dave", "erin"):
        assert len(list(trail.search(principal=f"AKIA{name.upper()}"))) == PER_WRITER
    trail.close()
