"""The newest seal anchored in the token, and writer sessions: on a real SQLite file and a
real SoftHSM2 token. Cutting the tail — back to any seal, a shutdown seal or a command's
included, while writers go on or after they stopped — no longer verifies; a writer refuses to
seal a cut trail until an operator resumes it; an interrupted seal write is told apart from a
cut as far as it can be; a writer that stops without a shutdown seal is reported, and noted
in the trail by the live writers."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hsmkms.audit import AuditTrail, UserIdentity, VerifyStatus, api_call_record
from hsmkms.audit.trail import SealReason, TrailCut, anchor_name
from hsmkms.errors import ClientError
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.pkcs11 import Pkcs11Keystore

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
START = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
INTERVAL = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def record(i: int) -> dict[str, Any]:
    return api_call_record(
        "Encrypt",
        read_only=True,
        identity=UserIdentity("IAMUser", None, f"arn:aws:iam::{ACCOUNT}:user/alice", ACCOUNT),
        account_id=ACCOUNT,
        region="us-east-1",
        request_id=f"req-{i}",
        request={"KeyId": "k"},
        event_time=START,
    )


def sql(db: Path, statement: str, *params: Any) -> list[Any]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(statement, params).fetchall()
    conn.close()
    return rows


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def writer(db: Path, keystore: Pkcs11Keystore, clock: Clock, **kwargs: Any) -> AuditTrail:
    return AuditTrail(
        f"sqlite:///{db}", keystore, clock=clock, seal_every=5, seal_interval=INTERVAL, **kwargs
    )


@pytest.fixture
def trail(db: Path, keystore: Pkcs11Keystore, clock: Clock) -> Iterator[AuditTrail]:
    t = writer(db, keystore, clock)
    for i in range(1, 8):
        t.append(record(i))
    yield t
    t.engine.dispose()


def anchored(trail: AuditTrail, keystore: Pkcs11Keystore, db: Path) -> str | None:
    (ref_text,) = sql(db, "SELECT value FROM audit_settings WHERE name = 'audit_key'")[0]
    return keystore.read_anchor(anchor_name(KeyMaterialRef.from_str(ref_text)))


def seal_rows(db: Path) -> list[tuple[int, str, str | None]]:
    return [
        (int(seq), str(reason), writer)
        for seq, reason, writer in sql(
            db, "SELECT seal_seq, reason, writer FROM audit_seals ORDER BY seal_seq"
        )
    ]


def cut_after_seal(db: Path, seal_seq: int) -> None:
    """What an attacker with the database can do: remove every seal after ``seal_seq`` and
    every record after what it covers."""
    (covered,) = sql(db, "SELECT record_seq FROM audit_seals WHERE seal_seq = ?", seal_seq)[0]
    sql(db, "DELETE FROM audit_seals WHERE seal_seq > ?", seal_seq)
    sql(db, "DELETE FROM audit_records WHERE seq > ?", covered)


# -- the anchor -------------------------------------------------------------------------------


def test_every_seal_is_anchored_in_the_token(
    trail: AuditTrail, keystore: Pkcs11Keystore, db: Path
) -> None:
    for _ in range(3):
        trail.append(record(99))
        result = trail.verify()
        assert result.ok, result.problem
        assert result.newest_seal is not None
        assert anchored(trail, keystore, db) == result.newest_seal.anchor == result.anchor
    newest = trail.seal()
    assert anchored(trail, keystore, db) == f"{newest.seal_seq}:{newest.tag.hex()[:24]}"


def test_two_trails_on_one_token_keep_anchors_of_their_own(
    trail: AuditTrail, keystore: Pkcs11Keystore, db: Path, tmp_path: Path, clock: Clock
) -> None:
    other_db = tmp_path / "other.db"
    other = writer(other_db, keystore, clock)
    other.append(record(1))
    assert anchored(other, keystore, other_db) != anchored(trail, keystore, db)
    assert trail.verify().ok
    assert other.verify().ok
    other.close()


def test_cut_back_to_a_shutdown_seal_while_another_writer_goes_on_is_found(
    db: Path, keystore: Pkcs11Keystore, clock: Clock
) -> None:
    """Issue 14, defect 1: a worker reload writes a shutdown seal while the other worker goes
    on; deleting every record and seal after that shutdown seal used to verify."""
    first = writer(db, keystore, clock)
    second = writer(db, keystore, clock)
    first.append(record(1))
    first.close()  # the reloaded worker's shutdown seal
    (shutdown,) = [s for s, reason, _ in seal_rows(db) if reason == "shutdown"]
    for i in range(2, 12):
        second.append(record(i))
    cut_after_seal(db, shutdown)
    result = second.verify()
    assert result.status is VerifyStatus.TAMPERED, result
    assert result.problem is not None
    assert f"but the trail ends at seal {shutdown}: seals and records removed" in result.problem
    second.engine.dispose()


def test_cut_back_to_the_shutdown_seal_after_a_clean_stop_and_restart_is_found(
    db: Path, keystore: Pkcs11Keystore, clock: Clock
) -> None:
    """The same after a clean stop and a restart: the token remembers that the trail went on."""
    before = writer(db, keystore, clock)
    before.append(record(1))
    before.close()
    (stopped,) = [s for s, reason, _ in seal_rows(db) if reason == "shutdown"]
    after = writer(db, keystore, clock)
    for i in range(2, 9):
        after.append(record(i))
    after.close()
    clock.advance(30 * 24 * 3600)  # days later
    cut_after_seal(db, stopped)
    reader = AuditTrail(f"sqlite:///{db}", keystore, create=False, clock=clock)
    result = reader.verify()
    assert result.status is VerifyStatus.TAMPERED, result
    assert result.first_bad_seq == 2
    reader.close()


def test_cut_after_a_command_seal_is_found(
    db: Path, keystore: Pkcs11Keystore, clock: Clock
) -> None:
    """A command (``hsmkms purge``, a local file command) seals its records with a command
    seal, opens no session and promises nothing: cutting after it is found all the same."""
    command = writer(db, keystore, clock, command=True)
    command.append(record(1))
    (first,) = [s for s, reason, _ in seal_rows(db) if reason == "command"]
    command.append(record(2))
    command.append(record(3))
    assert [reason for _, reason, _ in seal_rows(db)] == ["genesis", *["command"] * 3]
    assert all(w is not None and w.startswith("command:") for _, _, w in seal_rows(db))
    assert command.verify().ok
    cut_after_seal(db, first)
    result = command.verify()
    assert result.status is VerifyStatus.TAMPERED
    command.close()


def test_a_writer_refuses_to_seal_a_cut_trail_until_it_is_resumed(
    trail: AuditTrail, keystore: Pkcs11Keystore, db: Path, clock: Clock
) -> None:
    trail.append(record(8))
    trail.append(record(9))
    trail.close()
    newest = trail.verify().newest_seal
    assert newest is not None
    assert newest.reason == "shutdown"
    cut_after_seal(db, 2)  # back to the start seal
    with pytest.raises(
        TrailCut, match=f"the token's anchor names seal {newest.seal_seq}, the trail ends at seal 2"
    ):
        writer(db, keystore, clock)
    resumer = writer(db, keystore, clock, command=True, start=False)
    seal = resumer.resume()
    assert seal.reason == SealReason.RESUME
    assert seal.supersedes == newest.anchor
    resumer.close()
    again = writer(db, keystore, clock)
    again.append(record(10))
    again.close()
    result = again.verify()
    assert result.ok, result.problem
    assert any("the trail was resumed after a cut" in w for w in result.warnings)
    # The acknowledged cut stays in the trail: cutting the resume seal away is found again.
    resumer = writer(db, keystore, clock, command=True, start=False)
    with pytest.raises(ClientError, match="not cut"):
        resumer.resume()
    resumer.close()


def test_an_interrupted_seal_write_is_superseded_and_reported(
    trail: AuditTrail, keystore: Pkcs11Keystore, db: Path
) -> None:
    """A transaction that anchored its seal and then failed to commit (a crash, a full disk)
    leaves the anchor one seal ahead: not proven until the next seal, which records that it
    replaces it — verify warns for ever after, since a removed newest seal looks the same."""
    newest = trail.verify().newest_seal
    assert newest is not None
    (ref_text,) = sql(db, "SELECT value FROM audit_settings WHERE name = 'audit_key'")[0]
    name = anchor_name(KeyMaterialRef.from_str(ref_text))
    lost = f"{newest.seal_seq + 1}:{'ab' * 12}"
    keystore.write_anchor(name, lost)
    result = trail.verify()
    assert result.status is VerifyStatus.UNCLEAN
    assert result.first_bad_seq == newest.record_seq + 1
    seal = trail.seal()
    assert (seal.seal_seq, seal.supersedes) == (newest.seal_seq + 1, lost)
    result = trail.verify()
    assert result.ok, result.problem
    (warning,) = result.warnings
    assert f"replaces the anchored seal {newest.seal_seq + 1}, which was never committed" in (
        warning
    )


def test_a_seal_committed_while_verify_reads_is_not_an_interrupted_write(
    trail: AuditTrail,
    keystore: Pkcs11Keystore,
    db: Path,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another writer anchors and commits its next seal after verify read the trail and
    before it read the anchor (a CI run of the PostgreSQL pass saw it, with a server
    writing): the anchor is one seal ahead of what verify read, as after an interrupted
    write. verify reads the trail again and finds that seal committed."""
    other = writer(db, keystore, clock)
    real = keystore.read_anchor
    sealed: list[int] = []

    def seal_first(name: str) -> str | None:
        if not sealed:
            sealed.append(0)  # the writer's own seal reads the anchor too
            sealed[0] = other.seal().seal_seq
        return real(name)

    before = trail.verify().newest_seal
    assert before is not None
    monkeypatch.setattr(keystore, "read_anchor", seal_first)
    result = trail.verify()
    assert result.ok, result.problem
    assert sealed == [before.seal_seq + 1]
    assert result.newest_seal is not None
    assert result.newest_seal.seal_seq == before.seal_seq + 1
    assert result.anchor == result.newest_seal.anchor
    other.engine.dispose()


# -- writer sessions --------------------------------------------------------------------------


def test_a_session_that_stopped_is_noted_by_a_live_one(
    db: Path, keystore: Pkcs11Keystore, clock: Clock
) -> None:
    """kill -9 of one worker: its session never gets a shutdown seal. While the other worker
    goes on, verify reports it, and the live worker's next check writes a recover seal naming
    it; from then on the trail verifies, with the unclean stop in its history."""
    killed = writer(db, keystore, clock)
    live = writer(db, keystore, clock)
    killed.append(record(1))
    killed.engine.dispose()  # killed: no shutdown seal
    clock.advance(2 * INTERVAL + 1)
    assert live.seal_if_due() is not None  # heartbeat: overdue sessions are noted
    (recover,) = [(s, w) for s, reason, w in seal_rows(db) if reason == "recover"]
    assert recover[1] == live.writer_id
    (ended,) = sql(db, "SELECT ended FROM audit_seals WHERE seal_seq = ?", recover[0])[0]
    assert ended == killed.writer_id
    result = live.verify()
    assert result.ok, result.problem
    (stop,) = result.unclean
    assert (stop.writer, stop.noted_by) == (killed.writer_id, recover[0])
    assert result.live == (live.writer_id,)
    live.close()
    assert live.verify().ok


def test_every_session_keeps_its_own_heartbeat(
    db: Path, keystore: Pkcs11Keystore, clock: Clock
) -> None:
    """A quiet worker seals on its own schedule even while another worker seals often, so a
    live session is never taken for a stopped one."""
    busy = writer(db, keystore, clock)
    quiet = writer(db, keystore, clock)
    clock.advance(INTERVAL / 2)
    busy.seal()
    assert quiet.seal_if_due() is None
    clock.advance(INTERVAL / 2)
    heartbeat = quiet.seal_if_due()
    assert heartbeat is not None
    assert (heartbeat.reason, heartbeat.writer) == ("interval", quiet.writer_id)
    result = quiet.verify()
    assert result.ok
    assert set(result.live) == {busy.writer_id, quiet.writer_id}
    busy.close()
    quiet.close()


def test_all_writers_killed_is_an_unclean_end(
    db: Path, keystore: Pkcs11Keystore, clock: Clock
) -> None:
    """kill -9 of the whole server: no live session notes anything; verify says which sessions
    stopped, what is proven (through the anchored newest seal) and what is not."""
    one = writer(db, keystore, clock)
    two = writer(db, keystore, clock)
    for i in range(1, 8):
        (one if i % 2 else two).append(record(i))
    one.engine.dispose()
    two.engine.dispose()
    clock.advance(3 * INTERVAL)
    reader = AuditTrail(f"sqlite:///{db}", keystore, create=False, clock=clock)
    result = reader.verify()
    assert result.status is VerifyStatus.UNCLEAN
    assert {u.writer for u in result.unclean} == {one.writer_id, two.writer_id}
    assert all(u.noted_by is None for u in result.unclean)
    assert result.problem is not None
    assert "which the token's anchor names; 2 records after it are chained but not sealed" in (
        result.problem
    )
    # A restarted server notes both stops; the trail verifies again, the stops in its history.
    restarted = writer(db, keystore, clock)
    clock.advance(1)
    restarted.seal_if_due()
    result = restarted.verify()
    assert result.ok, result.problem
    assert {u.writer for u in result.unclean} == {one.writer_id, two.writer_id}
    assert all(u.noted_by is not None for u in result.unclean)
    restarted.close()
    reader.close()
