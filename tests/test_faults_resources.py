"""Faults of the surroundings through the real server: a full disk (a small tmpfs mounted for
the test) and the token taken away. Workers stay up, requests are refused at once with a 503
naming the cause, ``/healthz`` answers with it, and everything recovers without a restart."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from load import NOT_JSON, Load, send
from server import RunningServer, start_server

from hsmkms.config import Settings
from hsmkms.system import open_audit_reader

pytestmark = [pytest.mark.server, pytest.mark.slow]

NO_SPACE = "no space left on the data directory's device"


def wait_for(predicate: Any, timeout: float = 60.0, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(step)


@contextlib.contextmanager
def small_filesystem(where: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted at ``where`` (root, or passwordless sudo); the test is
    skipped, with the reason, where mounting is not permitted."""
    where.mkdir(parents=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(where)]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        pytest.skip(f"cannot mount a small filesystem for the full-disk test: {exc}")
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        pytest.skip(f"cannot mount a small filesystem for the full-disk test: {reason}")
    try:
        yield where
    finally:
        unmount = ["umount", "-l", str(where)]
        subprocess.run(unmount if os.geteuid() == 0 else ["sudo", "-n", *unmount], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the device is full (large writes, then the last few blocks)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 512):
            with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
                while True:
                    os.write(fd, b"\0" * size)
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def health(server: RunningServer) -> tuple[int, dict[str, Any]]:
    resp = server.raw("GET", "/healthz")
    return resp.status, resp.json()


def worker_pids(server: RunningServer) -> set[int]:
    """The pids of the server's worker processes (children of its parent)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    found = set()
    for pid in children.read_text().split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            found.add(int(pid))
    return found


def request_ids(data_dir: Path) -> set[str]:
    reader = open_audit_reader(Settings.load(data_dir))
    try:
        return {str(r.get("requestID")) for r in reader.search()}
    finally:
        reader.close()


def test_a_full_disk_refuses_writes_with_the_cause_and_recovers(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "mnt", 48) as mnt:
        data_dir = mnt / "data"
        server = start_server(data_dir, workers=2, env={"HSMKMS_AUDIT_SEAL_INTERVAL": "1"})
        try:
            client = server.client()
            key_id = client.create_key()["KeyMetadata"]["KeyId"]
            load = Load(
                server,
                [
                    ("Encrypt", lambda i: {"KeyId": key_id, "Plaintext": "aGVsbG8="}),
                    ("CreateKey", lambda i: {}),
                ],
                threads=4,
            ).start()
            wait_for(lambda: load.count() > 50)
            fill(mnt / "filler")
            wait_for(lambda: any(a.status == 503 for a in load.answers[-20:]))
            time.sleep(1)
            full = load.stop()
            pids = {a.worker for a in full}

            # Each answer is the service's: none is uvicorn's bare 500 for an exception that
            # escaped (writing a log line to the full disk did that).
            assert [a.message for a in full if a.error == NOT_JSON] == []
            refused = [a for a in full if a.status == 503]
            assert refused
            for answer in refused:
                assert answer.error == "DependencyTimeoutException"
                assert NO_SPACE in (answer.message or "")
            # Reads are refused too: every call needs its audit record (docs/operations-faults.md).
            conn = server.connection()
            for target, body in (
                ("DescribeKey", {"KeyId": key_id}),
                ("Encrypt", {"KeyId": key_id, "Plaintext": "aGVsbG8="}),
                ("CreateKey", {}),
            ):
                answer = send(server, conn, target, body)
                assert (answer.status, answer.error) == (503, "DependencyTimeoutException")
                assert NO_SPACE in (answer.message or "")
            conn.close()
            status, report = health(server)
            assert status == 503
            assert report["status"] == "fail"
            assert NO_SPACE in report["disk"]

            (mnt / "filler").unlink()  # room again: recovery needs no restart

            def recovered() -> bool:
                conn = server.connection()
                try:
                    answer = send(server, conn, "Encrypt", {"KeyId": key_id, "Plaintext": "aA=="})
                    return answer.status == 200
                finally:
                    conn.close()

            wait_for(recovered)

            def created() -> bool:  # each worker recovers on its own, within its retry pause
                conn = server.connection()
                try:
                    return send(server, conn, "CreateKey", {}).status == 200
                finally:
                    conn.close()

            for _ in range(6):  # new connections: both workers, whichever answers
                wait_for(created)
            wait_for(lambda: health(server)[0] == 200)
            # The workers stayed up all along: the supervisor logs every death.
            assert "worker_died" not in server.log()
            assert pids <= {str(p) for p in worker_pids(server)}
            # Every answer is in the trail, but the refusals: nothing was done for them.
            recorded = request_ids(data_dir)
            unrecorded = [a for a in full if a.status != 503 and a.request_id not in recorded]
            assert unrecorded == []
            assert not any(a.request_id in recorded for a in refused if a.target == "Encrypt")
        finally:
            server.stop()
        done = server.cli("audit", "verify")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("audit trail intact: ")


def test_the_token_away_fails_fast_with_the_pkcs11_reason_and_comes_back(tmp_path: Path) -> None:
    """The token's directory moved away: requests fail with 503 KeyUnavailableException naming
    the PKCS#11 reason, /healthz says why, key creations that fail half-way leave no orphan
    (the periodic work destroys them once the token is back), and everything recovers."""
    data_dir = tmp_path / "data"
    server = start_server(data_dir, workers=2, args=["--task-interval", "0.5"])
    try:
        client = server.client()
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        load = Load(
            server,
            [
                ("Encrypt", lambda i: {"KeyId": key_id, "Plaintext": "aGVsbG8="}),
                ("CreateKey", lambda i: {}),
            ],
            threads=4,
        ).start()
        wait_for(lambda: load.count() > 20)
        (home,) = (p for p in (data_dir / "tokens").iterdir() if p.is_dir())  # not the lock
        away = tmp_path / "token-away"
        home.rename(away)
        wait_for(lambda: sum(a.status == 503 for a in load.answers) > 20)
        # A worker that served none of the load learns it from its background self-test.
        reports: list[tuple[int, dict[str, Any]]] = []

        def failing() -> bool:
            reports.append(health(server))
            return reports[-1][0] == 503

        wait_for(failing, timeout=30)
        assert reports[-1][1]["keystore"].startswith("fail: the HSM token is unavailable (")
        away.rename(home)
        wait_for(lambda: all(a.status == 200 for a in load.answers[-8:]))
        answers = load.stop()
        gone = [a for a in answers if a.status >= 500]
        assert gone
        for answer in gone:
            assert (answer.status, answer.error) == (503, "KeyUnavailableException"), answer
            assert (answer.message or "").startswith("The HSM token is unavailable (")
        wait_for(lambda: health(server)[0] == 200)
        # Half-made keys are destroyed by the workers' periodic work: doctor finds no orphan.
        doctor: list[Any] = []

        def clean() -> bool:
            doctor.append(server.cli("doctor"))
            return bool(doctor[-1].returncode == 0)

        try:
            wait_for(clean, timeout=60, step=0.5)
        except AssertionError:
            raise AssertionError(f"doctor still says: {doctor[-1].stderr}") from None
        assert "worker_died" not in server.log()
    finally:
        server.stop()


def test_healthz_answers_while_the_admin_thread_is_blocked(tmp_path: Path) -> None:
    """/healthz (and /metrics) never wait behind key administration: with a CreateKey stuck on
    the database's write lock, they answer."""
    data_dir = tmp_path / "data"
    server = start_server(data_dir, workers=1)
    holder = sqlite3.connect(data_dir / "hsmkms.db", isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")  # CreateKey now waits for the write lock
        pending: list[Any] = []
        thread = threading.Thread(target=lambda: pending.append(server.client().create_key()))
        thread.start()
        time.sleep(0.3)  # the CreateKey is in the admin thread, waiting
        status, report = health(server)
        metrics = server.raw("GET", "/metrics")
        assert not pending  # still waiting, yet both answered
        assert status == 200, report
        assert metrics.status == 200
        holder.execute("ROLLBACK")
        thread.join(30)
        (created,) = pending
        assert created["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        holder.close()
        server.stop()
