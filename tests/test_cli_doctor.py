"""``hsmkms doctor`` through the real command, on fresh data directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.hsm


def doctor(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    return subprocess.run(
        [sys.executable, "-m", "hsmkms.cli.main", "doctor", "--data-dir", str(data_dir), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hsmkms doctor: ")
    assert expected in lines[0]


def test_doctor_creates_the_embedded_default_and_reports_json(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc = doctor(data_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["module"].endswith("libsofthsm2.so")
    assert report["token_label"] == "hsmkms"
    assert report["profile"] == "AES_256_GCM"
    assert report["data_dir"] == str(data_dir)
    assert report["softhsm2_conf"] == str(data_dir / "softhsm2.conf")
    assert report["user_pin_file"] == str(data_dir / "user.pin")
    assert report["login"] == "ok"
    assert report["self_test"] == "ok"
    assert "AES_GCM" in report["mechanisms"]
    assert (data_dir / "user.pin").stat().st_mode & 0o077 == 0
    pin = (data_dir / "user.pin").read_text().strip()
    assert pin not in proc.stdout + proc.stderr


def test_doctor_is_idempotent_and_prints_a_human_report(tmp_path: Path) -> None:
    assert doctor(tmp_path).returncode == 0
    serial = json.loads(doctor(tmp_path, "--json").stdout)["token_serial"]
    proc = doctor(tmp_path)
    assert proc.returncode == 0
    assert f"token_serial:    {serial}" in proc.stdout
    assert "profile:         AES_256_GCM" in proc.stdout


def test_doctor_reports_the_forced_portable_profile(tmp_path: Path) -> None:
    proc = doctor(tmp_path, "--json", HSMKMS_PROFILE="AES_256_CBC_HMAC_SHA_256")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["profile"] == "AES_256_CBC_HMAC_SHA_256"


def test_doctor_wrong_pin(tmp_path: Path) -> None:
    assert doctor(tmp_path).returncode == 0
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000-not-the-pin\n")
    wrong.chmod(0o600)
    proc = doctor(tmp_path, HSMKMS_PIN_FILE=str(wrong))
    assert_one_line_failure(proc, "wrong PIN for token 'hsmkms'")
    assert "0000-not-the-pin" not in proc.stderr


def test_doctor_missing_module(tmp_path: Path) -> None:
    assert doctor(tmp_path).returncode == 0
    proc = doctor(
        tmp_path,
        HSMKMS_MODULE_PATH="/usr/lib/nowhere/libpkcs11.so",
        HSMKMS_PIN_FILE=str(tmp_path / "user.pin"),
        HSMKMS_TOKEN_LABEL="hsmkms",
    )
    assert_one_line_failure(proc, "PKCS#11 module not found: /usr/lib/nowhere/libpkcs11.so")


def test_doctor_missing_token(tmp_path: Path) -> None:
    proc = doctor(tmp_path, HSMKMS_TOKEN_LABEL="no-such-token")
    assert_one_line_failure(proc, "no token matches label=no-such-token")


def test_doctor_unreadable_softhsm_config(tmp_path: Path) -> None:
    (tmp_path / "softhsm2.conf").mkdir(parents=True)
    proc = doctor(tmp_path)
    assert_one_line_failure(proc, f"cannot read SoftHSM2 configuration {tmp_path}/softhsm2.conf")


def test_doctor_bad_setting(tmp_path: Path) -> None:
    proc = doctor(tmp_path, HSMKMS_ACCOUNT_ID="12")
    assert_one_line_failure(proc, "HSMKMS_ACCOUNT_ID")
