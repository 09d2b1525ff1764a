"""Batched appends and the background audit writer, on a real SQLite file and a real SoftHSM2
token: one transaction per batch with the same seals as single appends, order, retry while the
database is locked, back-pressure on a full queue, flush on close, the seal heartbeat; and the
service events (automatic rotation, purge) reaching the trail."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hsmkms import models as m
from hsmkms.audit import AuditTrail, UserIdentity, api_call_record
from hsmkms.audit.records import PreparedRecord
from hsmkms.audit.writer import AuditWriter
from hsmkms.errors import DependencyTimeoutException
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore
from hsmkms.system import service_event_sink

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
REGION = "eu-west-1"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/11111111-2222-3333-4444-555555555555"


def record(request_id: str, who: str = "alice") -> dict[str, Any]:
    return api_call_record(
        "Encrypt",
        read_only=True,
        identity=UserIdentity("IAMUser", None, f"arn:aws:iam::{ACCOUNT}:user/{who}", ACCOUNT),
        account_id=ACCOUNT,
        region=REGION,
        request_id=request_id,
        request={"KeyId": KEY_ARN},
        key_arns=[KEY_ARN],
    )


class CountingTrail(AuditTrail):
    """A real trail that remembers the size of each batch it appended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def append_prepared(self, prepared: Sequence[PreparedRecord]) -> int:
        seq = super().append_prepared(prepared)
        self.batches.append(len(prepared))
        return seq


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hsmkms.db"


@pytest.fixture
def trail(db: Path, keystore: Pkcs11Keystore) -> Iterator[CountingTrail]:
    t = CountingTrail(f"sqlite:///{db}", keystore, seal_every=5, busy_timeout_ms=50)
    yield t
    t.engine.dispose()


def request_ids(trail: AuditTrail) -> list[str]:
    return [r["requestID"] for r in trail.search()]


def seal_positions(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT record_seq, reason FROM audit_seals ORDER BY seal_seq")
        found = [(int(seq), str(reason)) for seq, reason in rows]
    conn.close()
    return found


@pytest.fixture
def locked(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the test releases it."""
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    yield holder
    if holder.in_transaction:
        holder.execute("ROLLBACK")
    holder.close()


# -- append_many --------------------------------------------------------------------------------


def test_append_many_is_one_transaction_with_the_seals_of_single_appends(
    trail: CountingTrail, db: Path, tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    last = trail.append_many([record(f"r{i}") for i in range(1, 13)])
    assert last == 12
    assert trail.batches == [12]
    one_by_one_db = tmp_path / "single.db"
    single = AuditTrail(f"sqlite:///{one_by_one_db}", keystore, seal_every=5)
    for i in range(1, 13):
        single.append(record(f"r{i}"))
    single.engine.dispose()
    assert seal_positions(db) == seal_positions(one_by_one_db)
    assert seal_positions(db)[-2:] == [(5, "count"), (10, "count")]
    assert request_ids(trail) == [f"r{i}" for i in range(1, 13)]
    result = trail.verify()
    assert result.ok, result
    assert (result.records, result.sealed_through) == (12, 10)


def test_append_many_writes_nothing_when_one_record_is_invalid(trail: CountingTrail) -> None:
    trail.append(record("before"))
    with pytest.raises(TypeError):
        trail.append_many([record("a"), {**record("b"), "blob": b"x"}, record("c")])
    with pytest.raises(ValueError, match="eventName"):
        trail.append_many([record("a"), {"eventTime": "2026-01-01T00:00:00Z"}])
    assert request_ids(trail) == ["before"]
    assert trail.append_many([]) == 1
    assert trail.verify().ok


# -- the writer ---------------------------------------------------------------------------------


def test_writer_batches_and_keeps_order(trail: CountingTrail) -> None:
    writer = AuditWriter(trail, flush_interval=0.2, batch_size=50)
    try:
        for i in range(120):
            writer.submit(record(f"r{i}"))
        assert writer.flush(10)
        assert writer.backlog == 0
    finally:
        writer.close()
    assert request_ids(trail) == [f"r{i}" for i in range(120)]
    assert len(trail.batches) <= 4, trail.batches  # 50 + 50 + the rest, not 120 transactions
    assert max(trail.batches) == 50
    assert trail.verify().ok


def test_writer_flushes_within_its_interval_without_being_asked(trail: CountingTrail) -> None:
    writer = AuditWriter(trail, flush_interval=0.05)
    try:
        writer.submit(record("soon"))
        deadline = time.monotonic() + 5
        while not request_ids(trail) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request_ids(trail) == ["soon"]
    finally:
        writer.close()


def test_records_of_each_thread_keep_their_order(trail: CountingTrail) -> None:
    writer = AuditWriter(trail, flush_interval=0.01, batch_size=7, max_queue=20)

    def submit_all(name: str) -> None:
        for i in range(60):
            writer.submit(record(f"{name}-{i}", who=name))

    threads = [threading.Thread(target=submit_all, args=(n,)) for n in ("carol", "dave", "erin")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.close()
    ids = request_ids(trail)
    assert len(ids) == 180
    for name in ("carol", "dave", "erin"):
        assert [i for i in ids if i.startswith(name)] == [f"{name}-{i}" for i in range(60)]
    assert trail.verify().ok


def test_invalid_record_fails_at_submit_and_queues_nothing(trail: CountingTrail) -> None:
    writer = AuditWriter(trail)
    try:
        with pytest.raises(TypeError):
            writer.submit({**record("bad"), "blob": b"secret"})
        assert writer.backlog == 0
        writer.submit(record("good"))
        assert writer.flush(10)
    finally:
        writer.close()
    assert request_ids(trail) == ["good"]


def test_locked_database_is_retried_in_order_until_it_frees(
    trail: CountingTrail, locked: sqlite3.Connection
) -> None:
    """A batch that cannot be appended is kept and retried; nothing is lost or reordered."""
    writer = AuditWriter(trail, flush_interval=0.01)
    try:
        for i in range(10):
            writer.submit(record(f"r{i}"))
        assert not writer.flush(0.5)
        assert writer.error == "DependencyTimeoutException"
        assert writer.backlog == 10
        locked.execute("ROLLBACK")
        assert writer.flush(10)
        assert writer.error is None
    finally:
        writer.close()
    assert request_ids(trail) == [f"r{i}" for i in range(10)]
    assert trail.verify().ok


def test_full_queue_blocks_then_refuses_and_drops_nothing_it_accepted(
    trail: CountingTrail, locked: sqlite3.Connection
) -> None:
    """Back-pressure: a full queue makes submit wait, then raise; the caller knows the record
    was not taken. Every accepted record is written once the database frees."""
    writer = AuditWriter(trail, flush_interval=0.01, batch_size=2, max_queue=4, block_timeout=0.3)
    try:
        accepted = []
        refused = 0
        for i in range(12):
            started = time.monotonic()
            try:
                writer.submit(record(f"r{i}"))
                accepted.append(f"r{i}")
            except DependencyTimeoutException:
                refused += 1
                assert time.monotonic() - started >= 0.25  # it waited before giving up
        assert refused > 0
        assert 4 <= len(accepted) <= 6  # the queue, plus the batch being retried
        locked.execute("ROLLBACK")
        assert writer.flush(10)
    finally:
        writer.close()
    assert request_ids(trail) == accepted


def test_the_queue_is_bounded_in_bytes_too(
    trail: CountingTrail, locked: sqlite3.Connection
) -> None:
    """Large records fill the queue by their bytes long before its record count: with room for
    1,000 records but 60 KB, records of ~20 KB are refused after a few; a record larger than
    the whole bound still goes into an empty queue. Nothing accepted is lost."""
    big = {f"k{i}": "v" * 1000 for i in range(20)}  # ~20 KB of context

    def big_record(request_id: str) -> dict[str, Any]:
        made = record(request_id)
        made["requestParameters"] = {"keyId": KEY_ARN, "encryptionContext": big}
        return made

    writer = AuditWriter(
        trail,
        flush_interval=0.01,
        batch_size=1,
        max_queue=1000,
        max_queue_bytes=60_000,
        block_timeout=0.1,
    )
    try:
        accepted, refused = [], 0
        for i in range(10):
            try:
                writer.submit(big_record(f"r{i}"))
                accepted.append(f"r{i}")
            except DependencyTimeoutException:
                refused += 1
        assert refused > 0
        assert 2 <= len(accepted) <= 4  # the queue (60 KB), plus the batch being retried
        locked.execute("ROLLBACK")
        assert writer.flush(10)
    finally:
        writer.close()
    assert request_ids(trail) == accepted
    huge = AuditWriter(trail, flush_interval=0.01, max_queue_bytes=1000)
    try:
        huge.submit(big_record("alone"))  # larger than the bound, into an empty queue
        assert huge.flush(10)
    finally:
        huge.close()
    assert request_ids(trail)[-1] == "alone"


def test_close_appends_everything_queued(trail: CountingTrail) -> None:
    writer = AuditWriter(trail, flush_interval=60)
    for i in range(30):
        writer.submit(record(f"r{i}"))
    writer.close()
    assert request_ids(trail) == [f"r{i}" for i in range(30)]
    writer.submit(record("after-close"))  # written synchronously
    assert request_ids(trail)[-1] == "after-close"
    trail.close()
    assert trail.verify().ok


def test_writer_seals_on_its_own_cadence(db: Path, keystore: Pkcs11Keystore) -> None:
    """The heartbeat: with no record at all, the writer keeps the trail from going stale."""
    clock = ManualClock(dt.datetime(2026, 7, 1, tzinfo=dt.UTC))
    # The trail's time is the manual clock; the writer checks every seal_interval / 4 = 50 ms.
    trail = AuditTrail(f"sqlite:///{db}", keystore, clock=clock, seal_interval=0.2)
    writer = AuditWriter(trail)
    try:
        clock.advance(dt.timedelta(seconds=1))  # the heartbeat seal is due now
        deadline = time.monotonic() + 10
        while len(seal_positions(db)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        writer.close()
    reasons = [reason for _, reason in seal_positions(db)]
    assert reasons[:2] == ["genesis", "start"]
    assert "interval" in reasons[2:]
    trail.close()


# -- service events -----------------------------------------------------------------------------


def test_automatic_rotation_and_purge_become_service_event_records(
    db: Path, keystore: Pkcs11Keystore
) -> None:
    clock = ManualClock(dt.datetime(2026, 7, 1, tzinfo=dt.UTC))
    trail = AuditTrail(f"sqlite:///{db}", keystore, clock=clock)
    writer = AuditWriter(trail)
    store = MetadataStore.open_sqlite(db, clock=clock)
    service = KmsService(
        keystore, store, region=REGION, account_id=ACCOUNT, clock=clock,
        on_event=service_event_sink(writer.submit, region=REGION, account_id=ACCOUNT),
    )  # fmt: skip
    try:
        key = service.create_key(m.CreateKeyRequest()).KeyMetadata
        service.enable_key_rotation(
            m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
        )
        clock.advance(days=91)
        assert service.rotate_due() == [key.KeyId]
        service.schedule_key_deletion(
            m.ScheduleKeyDeletionRequest(KeyId=key.KeyId, PendingWindowInDays=7)
        )
        clock.advance(days=8)
        assert service.purge_due() == [key.KeyId]
        assert writer.flush(10)
    finally:
        writer.close()
        store.close()
    rotate, delete = trail.search()
    for event in (rotate, delete):
        assert event["eventType"] == "AwsServiceEvent"
        assert event["userIdentity"] == {"accountId": ACCOUNT, "invokedBy": "kms.amazonaws.com"}
        assert event["resources"] == [
            {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key.Arn}
        ]
        assert event["serviceEventDetails"] == {"keyId": key.KeyId}
    assert rotate["eventName"] == "RotateKey"
    assert rotate["additionalEventData"] == {"keyVersion": 2}
    assert rotate["eventTime"] == "2026-09-30T00:00:00Z"
    assert delete["eventName"] == "DeleteKey"
    assert "additionalEventData" not in delete
    assert [r["eventName"] for r in trail.search(key_id=key.KeyId)] == ["RotateKey", "DeleteKey"]
    trail.close()
    assert trail.verify(now=clock()).ok
