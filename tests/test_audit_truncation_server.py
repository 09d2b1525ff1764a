"""Issue 14, security defect 1, through the real server and the real CLI: the audit trail's tail
cut back to a seal — after ``hsmkms purge`` (a command), after a worker reload (SIGHUP), after
a clean stop and a restart — used to verify. Each cut is now found by ``hsmkms audit verify``
(exit 1: the token's anchor names a later seal); a server refuses to write a cut trail (503)
until ``hsmkms audit resume``; cutting only the newest seal is reported as not proven (exit
3), never as intact."""

from __future__ import annotations

import datetime as dt
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from local_system import open_system
from server import RunningServer, run_cli, running_server

from hsmkms.models import CreateKeyRequest, ScheduleKeyDeletionRequest
from hsmkms.service.testing import ManualClock

pytestmark = [pytest.mark.server, pytest.mark.slow]

# Heartbeat seals every 0.3 s: traffic() leaves several seals after each point of interest.
ENV = {"HSMKMS_AUDIT_SEAL_INTERVAL": "0.3"}


def sql(db: Path, statement: str, *params: Any) -> list[Any]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(statement, params).fetchall()
    conn.close()
    return rows


def seals(data_dir: Path) -> list[tuple[int, str, str]]:
    rows = sql(data_dir / "audit.db", "SELECT seal_seq, reason, writer FROM audit_seals ORDER BY 1")
    return [(int(s), str(r), str(w)) for s, r, w in rows]


def cut_after_seal(data_dir: Path, seal_seq: int) -> None:
    """What someone with write access to the database can do."""
    db = data_dir / "audit.db"
    (covered,) = sql(db, "SELECT record_seq FROM audit_seals WHERE seal_seq = ?", seal_seq)[0]
    sql(db, "DELETE FROM audit_seals WHERE seal_seq > ?", seal_seq)
    sql(db, "DELETE FROM audit_records WHERE seq > ?", covered)


def verify(data_dir: Path) -> tuple[int, str]:
    done = run_cli("audit", "verify", "--data-dir", str(data_dir))
    return done.returncode, (done.stdout + done.stderr)


def traffic(server: RunningServer, n: int = 5) -> None:
    client = server.client()
    for _ in range(n):
        client.create_key()
        client.list_keys()
    time.sleep(1)  # heartbeat seals after the calls


def assert_cut_found(data_dir: Path, seal_seq: int) -> None:
    cut_after_seal(data_dir, seal_seq)
    code, text = verify(data_dir)
    assert code == 1, text
    assert f"but the trail ends at seal {seal_seq}: seals and records removed from the tail" in (
        text
    )


def test_a_cut_back_to_a_purge_is_found(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # A key whose deletion window has ended, so that purge has something to record.
    eight_days_ago = ManualClock(dt.datetime.now(dt.UTC) - dt.timedelta(days=8))
    with open_system(data_dir, clock=eight_days_ago, audit=None) as system:
        key_id = system.service.create_key(CreateKeyRequest()).KeyMetadata.KeyId
        system.service.schedule_key_deletion(
            ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
        )
    with running_server(data_dir, args=["--task-interval", "0"], env=ENV) as server:
        traffic(server)
        purged = server.cli("purge")
        assert purged.returncode == 0, purged.stderr
        assert f"deleted {key_id}" in purged.stdout
        traffic(server)
    reasons = [reason for _, reason, _ in seals(data_dir)]
    # purge sealed its record as a command: no session of its own opened or closed.
    (command,) = [s for s, reason, writer in seals(data_dir) if reason == "command"]
    assert reasons.count("start") == reasons.count("shutdown") == 1
    assert all(w.startswith("command:") for s, r, w in seals(data_dir) if s == command)
    code, text = verify(data_dir)
    assert code == 0, text
    assert_cut_found(data_dir, command)


def test_a_cut_back_to_a_worker_reload_is_found(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_server(data_dir, workers=2, env=ENV) as server:
        traffic(server)
        server.process.send_signal(signal.SIGHUP)  # every worker replaced, one by one
        deadline = time.monotonic() + 90
        while sum(r == "shutdown" for _, r, _ in seals(data_dir)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        traffic(server)
    reload_shutdown = min(s for s, reason, _ in seals(data_dir) if reason == "shutdown")
    code, text = verify(data_dir)
    assert code == 0, text
    assert_cut_found(data_dir, reload_shutdown)


def test_a_cut_back_to_a_clean_stop_is_found_after_a_restart_and_blocks_the_server(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    with running_server(data_dir, env=ENV) as server:
        traffic(server)
    (stopped,) = [s for s, reason, _ in seals(data_dir) if reason == "shutdown"]
    with running_server(data_dir, env=ENV) as server:
        traffic(server)
    assert_cut_found(data_dir, stopped)
    # A server does not write on top of a cut trail: it starts, but refuses every request
    # with the cause until an operator resumes the trail (or restores its tail).
    with running_server(data_dir, env=ENV, wait_healthy=False) as server:
        client = server.client()
        with pytest.raises(client.exceptions.DependencyTimeoutException, match="was cut"):
            client.list_keys()
        health = server.raw("GET", "/healthz")
        assert health.status == 503
        assert "was cut" in health.json()["audit"]
        resumed = server.cli("audit", "resume")
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.startswith("audit trail resumed: seal ")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_keys()
                break
            except client.exceptions.DependencyTimeoutException:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    code, text = verify(data_dir)
    assert code == 0, text
    assert "the trail was resumed after a cut" in text


def test_removing_only_the_newest_seal_is_never_reported_intact(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_server(data_dir, env=ENV) as server:
        traffic(server)
    newest = seals(data_dir)[-1][0]
    cut_after_seal(data_dir, newest - 1)
    code, text = verify(data_dir)
    assert code == 3, text
    assert f"the token's anchor names seal {newest}, which the trail does not hold" in text
