"""Batched appends and the background audit writer, on a real SQLite file and a real SoftHSM2
token: one transaction per batch with the same seals as single appends; group commit (the
records waiting during a commit go together into the next), a record committed before its
caller goes on (threads and event loops), order, refusal at once while the trail fails and
recovery without a restart, what a failed batch keeps, a full queue, a trail that opens late,
flush on close, the seal heartbeat; and the service events (automatic rotation, purge)
reaching the trail."""

from __future__ import annotations

import asyncio
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
from hsmkms.errors import ServiceUnavailable, StorageUnavailable
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


# -- the writer: group commit, durable before return ---------------------------------------------


class GatedTrail(CountingTrail):
    """A real trail whose appends wait while the test holds its gate closed (a slow commit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def append_prepared(self, prepared: Sequence[PreparedRecord]) -> int:
        self.entered.set()
        assert self.gate.wait(30)
        return super().append_prepared(prepared)


@pytest.fixture
def gated(db: Path, keystore: Pkcs11Keystore) -> Iterator[GatedTrail]:
    t = GatedTrail(f"sqlite:///{db}", keystore, seal_every=5, busy_timeout_ms=50)
    yield t
    t.gate.set()
    t.engine.dispose()


def test_append_returns_once_the_record_is_in_the_trail(trail: CountingTrail) -> None:
    writer = AuditWriter(trail)
    try:
        for i in range(5):
            writer.append(record(f"r{i}"))
            assert request_ids(trail)[-1] == f"r{i}"  # committed before append returned
    finally:
        writer.close()
    assert trail.verify().ok


def test_records_waiting_during_a_commit_are_committed_together(gated: GatedTrail) -> None:
    """Group commit: while one transaction runs, the records submitted meanwhile queue up and
    go into the next transaction together, in order."""
    writer = AuditWriter(gated, commit_timeout=30)
    try:
        gated.gate.clear()
        first = writer.submit(record("r0"))
        assert gated.entered.wait(10)  # r0's transaction is running (held at the gate)
        waiters = [writer.submit(record(f"r{i}")) for i in range(1, 120)]
        gated.gate.set()
        for waiter in [first, *waiters]:
            writer.wait(waiter)
    finally:
        writer.close()
    assert gated.batches == [1, 119]
    assert request_ids(gated) == [f"r{i}" for i in range(120)]
    assert gated.verify().ok


def test_requests_on_an_event_loop_await_their_commit_together(gated: GatedTrail) -> None:
    writer = AuditWriter(gated, commit_timeout=30)

    async def requests() -> None:
        gated.gate.clear()
        first = asyncio.ensure_future(writer.commit(record("r0")))
        while not gated.entered.is_set():
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(writer.commit(record(f"r{i}"))) for i in range(1, 40)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in [first, *rest])  # nobody answered before the commit
        gated.gate.set()
        await asyncio.gather(first, *rest)

    try:
        asyncio.run(requests())
    finally:
        writer.close()
    assert gated.batches == [1, 39]
    assert request_ids(gated) == [f"r{i}" for i in range(40)]


def test_records_of_each_thread_keep_their_order(trail: CountingTrail) -> None:
    writer = AuditWriter(trail, batch_size=7, max_queue=20)

    def append_all(name: str) -> None:
        for i in range(60):
            writer.append(record(f"{name}-{i}", who=name))

    threads = [threading.Thread(target=append_all, args=(n,)) for n in ("carol", "dave", "erin")]
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
        writer.append(record("good"))
    finally:
        writer.close()
    assert request_ids(trail) == ["good"]


def test_a_commit_that_does_not_come_in_time_is_refused(gated: GatedTrail) -> None:
    """The caller is told at the deadline; the record, still queued, is written later (it
    tells what the service did, although its caller was answered 503)."""
    writer = AuditWriter(gated, commit_timeout=0.2)
    try:
        gated.gate.clear()
        with pytest.raises(ServiceUnavailable, match=r"did not commit the record within 0\.2 s"):
            writer.append(record("slow"))
        gated.gate.set()
        assert writer.flush(10)
    finally:
        writer.close()
    assert request_ids(gated) == ["slow"]


def test_a_failing_trail_refuses_at_once_keeps_state_changes_and_recovers(
    trail: CountingTrail, locked: sqlite3.Connection
) -> None:
    """The batch that fails is answered with the cause; from then on every record is refused
    at once (check() too) until the trail can be written again, without a restart. Records of
    calls that may have changed state are kept and appended first; read-only ones are not."""
    writer = AuditWriter(trail, retry_interval=0.05, commit_timeout=5)
    try:
        # The cause, as the database layer names it (a write lock held too long: busy).
        with pytest.raises(ServiceUnavailable, match="The audit trail is busy"):
            writer.append(record("state-change"), retain=True)
        with pytest.raises(ServiceUnavailable, match="The audit trail is busy"):
            writer.check()
        # Refused with the failure's cause, not after the 5 s commit deadline ("did not commit
        # the record within 5 s"): no wait for a commit that cannot come.
        with pytest.raises(ServiceUnavailable, match="The audit trail is busy"):
            writer.append(record("refused-at-once"), retain=True)
        assert writer.error is not None
        locked.execute("ROLLBACK")
        deadline = time.monotonic() + 10
        while writer.failure is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        writer.check()
        writer.append(record("after"), retain=False)
    finally:
        writer.close()
    assert request_ids(trail) == ["state-change", "after"]
    assert trail.verify().ok


def test_a_read_only_record_of_a_failed_batch_is_not_kept(
    trail: CountingTrail, locked: sqlite3.Connection
) -> None:
    writer = AuditWriter(trail, retry_interval=0.05, commit_timeout=5)
    try:
        with pytest.raises(ServiceUnavailable):
            writer.append(record("read-only"), retain=False)
        locked.execute("ROLLBACK")
        deadline = time.monotonic() + 10
        while writer.failure is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        writer.append(record("after"))
    finally:
        writer.close()
    assert request_ids(trail) == ["after"]


def test_a_full_queue_refuses_at_once_and_keeps_what_it_accepted(gated: GatedTrail) -> None:
    writer = AuditWriter(gated, batch_size=2, max_queue=4, commit_timeout=30)
    try:
        gated.gate.clear()
        waiters = [writer.submit(record("r0"))]
        assert gated.entered.wait(10)
        refused: list[str] = []
        for i in range(1, 12):
            try:
                waiters.append(writer.submit(record(f"r{i}")))
            except ServiceUnavailable as exc:
                refused.append(exc.message)
        assert len(waiters) == 5  # the running batch, then the queue's 4
        assert len(refused) == 7
        assert all("not keeping up" in m for m in refused)
        gated.gate.set()
        for waiter in waiters:
            writer.wait(waiter)
    finally:
        writer.close()
    assert request_ids(gated) == [f"r{i}" for i in range(5)]


def test_a_trail_that_cannot_be_opened_is_opened_once_it_can(
    tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    """A worker starts with its trail unwritable (here: a directory where the file should be);
    records are refused with the cause; once the obstacle is gone, the writer opens the trail
    (its start seal) by itself."""
    path = tmp_path / "audit.db"
    path.mkdir()
    trail = AuditTrail(f"sqlite:///{path}", keystore, start=False)
    with pytest.raises(StorageUnavailable) as failed:
        trail.start()
    writer = AuditWriter(trail, failure=failed.value, retry_interval=0.05)
    try:
        with pytest.raises(StorageUnavailable, match="I/O error"):
            writer.check()
        path.rmdir()
        deadline = time.monotonic() + 10
        while writer.failure is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        writer.append(record("first"))
    finally:
        writer.close()
    trail.close()
    assert request_ids(trail) == ["first"]
    result = trail.verify()
    assert result.ok, result
    assert [s for _, s in seal_positions(path)][:2] == ["genesis", "start"]


def test_close_while_failing_keeps_trying_the_kept_records(
    trail: CountingTrail, locked: sqlite3.Connection
) -> None:
    """A graceful stop while the trail fails retries what it kept until its deadline: the
    state-changing record refused earlier is written once the database frees."""
    writer = AuditWriter(trail, retry_interval=60, close_timeout=30)
    with pytest.raises(ServiceUnavailable):
        writer.append(record("kept"), retain=True)
    closing = threading.Thread(target=writer.close)
    closing.start()
    time.sleep(0.3)
    locked.execute("ROLLBACK")
    closing.join(30)
    assert not closing.is_alive()
    assert request_ids(trail) == ["kept"]


def test_close_appends_everything_queued(gated: GatedTrail) -> None:
    writer = AuditWriter(gated)
    gated.gate.clear()
    for i in range(30):
        writer.submit(record(f"r{i}"))
    gated.gate.set()
    writer.close()
    assert request_ids(gated) == [f"r{i}" for i in range(30)]
    writer.append(record("after-close"))  # written synchronously
    assert request_ids(gated)[-1] == "after-close"
    gated.close()
    assert gated.verify().ok


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
        on_event=service_event_sink(writer.append, region=REGION, account_id=ACCOUNT),
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


def _thread_cpu_ticks(native_id: int) -> int:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def test_a_failing_writer_waits_between_tries_instead_of_spinning(
    db: Path, keystore: Pkcs11Keystore
) -> None:
    """While the trail fails (here: locked) past its seal checks, the thread sleeps between
    tries: it uses next to no CPU (a thread that spun would use all of a core)."""
    trail = AuditTrail(f"sqlite:///{db}", keystore, seal_interval=0.04, busy_timeout_ms=10)
    writer = AuditWriter(trail, retry_interval=0.2)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ServiceUnavailable):
            writer.append(record("refused"))
        native_id = writer._thread.native_id
        assert native_id is not None
        before = _thread_cpu_ticks(native_id)
        time.sleep(1.0)
        used = _thread_cpu_ticks(native_id) - before
        assert used < 10, f"the writer thread used {used} ticks of CPU while failing"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        writer.close()
        trail.close()
