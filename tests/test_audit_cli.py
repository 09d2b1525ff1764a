"""``hsmkms audit verify|tail|search`` through the real command on a real token and database."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cli_process
import pytest

from hsmkms.audit import AuditTrail, UserIdentity, api_call_record
from hsmkms.cli.main import main
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service.operations import READ_ONLY_OPERATIONS

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def key_arn(n: int) -> str:
    return f"arn:aws:kms:us-east-1:{ACCOUNT}:key/key-{n}"


def add(trail: AuditTrail, n: int, event: str, who: str, key: int, day: int) -> None:
    trail.append(
        api_call_record(
            event,
            read_only=event in READ_ONLY_OPERATIONS,
            identity=UserIdentity("IAMUser", who, f"arn:aws:iam::{ACCOUNT}:user/{who}", ACCOUNT,
                                  f"AKIA{who.upper()}"),
            account_id=ACCOUNT, region="us-east-1", request_id=f"req-{n}",
            request={"KeyId": key_arn(key), "Plaintext": b"never"}, key_arns=[key_arn(key)],
            event_time=START + dt.timedelta(days=day),
        )
    )  # fmt: skip


def audit(
    data_dir: Path, db: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    clean["HSMKMS_DATABASE_URL"] = f"sqlite:///{db}"
    return cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "audit", *args, "--data-dir", str(data_dir)],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def db(tmp_path: Path, keystore: Pkcs11Keystore) -> Path:
    path = tmp_path / "audit.db"
    trail = AuditTrail(f"sqlite:///{path}", keystore, seal_every=3)
    add(trail, 1, "Encrypt", "alice", 1, 0)
    add(trail, 2, "Decrypt", "alice", 2, 1)
    add(trail, 3, "Decrypt", "bob", 1, 2)
    add(trail, 4, "CreateKey", "bob", 3, 3)
    trail.close()
    return path


def test_verify_intact_trail_exits_zero_and_checks_an_expected_seal(
    softhsm_dir: Path, db: Path
) -> None:
    proc = audit(softhsm_dir, db, "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("audit trail intact: 4 records, ")
    assert proc.stderr == ""
    newest = proc.stdout.split("newest seal ")[1].split()[0]  # N:TAG
    number, tag = newest.split(":")
    assert audit(softhsm_dir, db, "verify", "--expect-seal", newest).returncode == 0
    later = f"{int(number) + 1}:{tag}"
    proc = audit(softhsm_dir, db, "verify", "--expect-seal", later)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"hsmkms audit verify: seal {int(number) + 1}: missing (the trail ends at seal {number}: "
        "rolled back)"
    ]


def test_verify_names_the_first_bad_record_in_one_line(softhsm_dir: Path, db: Path) -> None:
    with sqlite3.connect(db) as conn:
        (body,) = conn.execute("SELECT record FROM audit_records WHERE seq = 3").fetchone()
        forged = body.replace(b"bob", b"eve")
        conn.execute("UPDATE audit_records SET record = ? WHERE seq = 3", (forged,))
    conn.close()
    proc = audit(softhsm_dir, db, "verify")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "hsmkms audit verify: record 3: hash chain broken (modified, inserted or removed record)"
    ]


def test_verify_stale_trail_exits_three(
    softhsm_dir: Path, tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    path = tmp_path / "stale.db"
    trail = AuditTrail(f"sqlite:///{path}", keystore, seal_interval=0.1)
    add(trail, 1, "Encrypt", "alice", 1, 0)
    trail.engine.dispose()  # a writer that died: no shutdown seal
    time.sleep(0.3)
    proc = audit(softhsm_dir, path, "verify")
    assert proc.returncode == 3
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        "hsmkms audit verify: writer stopped without a clean shutdown: "
        f"{trail.writer_id} (newest seal 2, "
    )
    assert line.endswith(
        "Intact through seal 2 (record 0), which the token's anchor names; 1 records after it "
        "are chained but not sealed"
    )


def test_verify_without_database_fails_in_one_line(softhsm_dir: Path, tmp_path: Path) -> None:
    proc = audit(softhsm_dir, tmp_path / "absent.db", "verify")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"hsmkms audit: no database at {tmp_path / 'absent.db'}"]
    assert not (tmp_path / "absent.db").exists()


def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path, *args: str
) -> list[dict[str, object]]:
    monkeypatch.setenv("HSMKMS_DATABASE_URL", f"sqlite:///{db}")
    assert main(["audit", *args, "--data-dir", str(db.parent)]) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_tail_prints_the_newest_records_one_json_per_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path
) -> None:
    records = run_cli(capsys, monkeypatch, db, "tail", "-n", "2")
    assert [r["requestID"] for r in records] == ["req-3", "req-4"]


def test_search_filters_print_one_json_per_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path
) -> None:
    def search(*args: str) -> list[object]:
        return [r["requestID"] for r in run_cli(capsys, monkeypatch, db, "search", *args)]

    assert search("--key-id", key_arn(1)) == ["req-1", "req-3"]
    assert search("--principal", f"arn:aws:iam::{ACCOUNT}:user/bob") == ["req-3", "req-4"]
    assert search("--event-name", "Decrypt", "--principal", "AKIAALICE") == ["req-2"]
    assert search("--since", "2026-03-02", "--until", "2026-03-03T00:00:00Z") == ["req-2", "req-3"]
    assert search("--limit", "1") == ["req-1"]


def test_search_rejects_a_bad_time(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db: Path
) -> None:
    monkeypatch.setenv("HSMKMS_DATABASE_URL", f"sqlite:///{db}")
    with pytest.raises(SystemExit) as exc:
        main(["audit", "search", "--since", "yesterday", "--data-dir", str(db.parent)])
    assert exc.value.code == 2
    assert "not an ISO-8601 time" in capsys.readouterr().err
