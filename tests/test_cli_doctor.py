"""``hsmkms doctor`` through the real command, on fresh data directories."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import cli_process
import pytest
from local_system import open_system
from postgres import outside_fetch, outside_sql
from server import database_env

from conftest import new_key_version
from hsmkms import models as m
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.models import CreateKeyRequest, ScheduleKeyDeletionRequest
from hsmkms.service.kms import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import GrantRecord
from hsmkms.system import System
from hsmkms.types import Clock, utc_now

pytestmark = [pytest.mark.hsm, pytest.mark.database]


def doctor(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    return cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "doctor", "--data-dir", str(data_dir), *args],
        env={**clean, **database_env(data_dir, env)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def init(data_dir: Path, **env: str) -> None:
    """``hsmkms init``: doctor checks a data directory, it does not make one."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "init", "--data-dir", str(data_dir)],
        env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hsmkms doctor: ")
    assert expected in lines[0]


def test_doctor_on_a_missing_data_directory_says_so_and_creates_nothing(tmp_path: Path) -> None:
    proc = doctor(tmp_path / "data")
    assert proc.returncode == 2
    assert proc.stderr == (
        f"hsmkms doctor: no data directory at {tmp_path / 'data'} (run hsmkms init or pass "
        "--data-dir)\n"
    )
    assert not (tmp_path / "data").exists()


def test_doctor_reports_the_embedded_default_as_json(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init(data_dir)
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
    assert report["capabilities"] == {
        "specs": {
            "SYMMETRIC_DEFAULT": ["ENCRYPT_DECRYPT"],
            "HMAC_224": ["GENERATE_VERIFY_MAC"],
            "HMAC_256": ["GENERATE_VERIFY_MAC"],
            "HMAC_384": ["GENERATE_VERIFY_MAC"],
            "HMAC_512": ["GENERATE_VERIFY_MAC"],
            "RSA_2048": ["ENCRYPT_DECRYPT", "SIGN_VERIFY"],
            "RSA_3072": ["ENCRYPT_DECRYPT", "SIGN_VERIFY"],
            "RSA_4096": ["ENCRYPT_DECRYPT", "SIGN_VERIFY"],
            "ECC_NIST_P256": ["KEY_AGREEMENT", "SIGN_VERIFY"],
            "ECC_NIST_P384": ["KEY_AGREEMENT", "SIGN_VERIFY"],
            "ECC_NIST_P521": ["KEY_AGREEMENT", "SIGN_VERIFY"],
            "ECC_SECG_P256K1": ["SIGN_VERIFY"],
            "ECC_NIST_EDWARDS25519": ["SIGN_VERIFY"],
        },
        "profiles": ["AES_256_GCM", "AES_256_CBC_HMAC_SHA_256"],
        "unverified": [],
        # Measured on SoftHSM 2.6.1: RSA-OAEP unwrap with SHA-1 only.
        "wrapping_algorithms": ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"],
        # SoftHSM 2.6.1 ignores CKM_EDDSA's prehash flag; it has no ML-DSA or ML-KEM.
        "unsupported_algorithms": ["ED25519_PH_SHA_512"],
    }
    assert "AES_GCM" in report["mechanisms"]
    assert (data_dir / "user.pin").stat().st_mode & 0o077 == 0
    pin = (data_dir / "user.pin").read_text().strip()
    assert pin not in proc.stdout + proc.stderr


def test_doctor_is_idempotent_and_prints_a_human_report(tmp_path: Path) -> None:
    init(tmp_path)
    assert doctor(tmp_path).returncode == 0
    serial = json.loads(doctor(tmp_path, "--json").stdout)["token_serial"]
    proc = doctor(tmp_path)
    assert proc.returncode == 0
    assert f"token_serial:    {serial}" in proc.stdout
    assert "profile:         AES_256_GCM" in proc.stdout
    assert (
        "capabilities:    SYMMETRIC_DEFAULT (AES_256_GCM, AES_256_CBC_HMAC_SHA_256), HMAC_224, "
        "HMAC_256, HMAC_384, HMAC_512, RSA_2048 (ENCRYPT_DECRYPT, SIGN_VERIFY), "
        "RSA_3072 (ENCRYPT_DECRYPT, SIGN_VERIFY), RSA_4096 (ENCRYPT_DECRYPT, SIGN_VERIFY), "
        "ECC_NIST_P256 (KEY_AGREEMENT, SIGN_VERIFY), ECC_NIST_P384 (KEY_AGREEMENT, SIGN_VERIFY), "
        "ECC_NIST_P521 (KEY_AGREEMENT, SIGN_VERIFY), ECC_SECG_P256K1, ECC_NIST_EDWARDS25519; "
        "not performed: ED25519_PH_SHA_512\n"
    ) in proc.stdout
    assert (
        "key import:      RSAES_OAEP_SHA_1, RSA_AES_KEY_WRAP_SHA_1 (unwrapped in the token)\n"
    ) in proc.stdout


def test_doctor_reports_the_forced_portable_profile(tmp_path: Path) -> None:
    init(tmp_path)
    proc = doctor(tmp_path, "--json", HSMKMS_PROFILE="AES_256_CBC_HMAC_SHA_256")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["profile"] == "AES_256_CBC_HMAC_SHA_256"


def test_doctor_wrong_pin(tmp_path: Path) -> None:
    init(tmp_path)
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000-not-the-pin\n")
    wrong.chmod(0o600)
    proc = doctor(tmp_path, HSMKMS_PIN_FILE=str(wrong))
    assert_one_line_failure(proc, "wrong PIN for token 'hsmkms'")
    assert "0000-not-the-pin" not in proc.stderr


def test_doctor_missing_module(tmp_path: Path) -> None:
    init(tmp_path)
    proc = doctor(
        tmp_path,
        HSMKMS_MODULE_PATH="/usr/lib/nowhere/libpkcs11.so",
        HSMKMS_PIN_FILE=str(tmp_path / "user.pin"),
        HSMKMS_TOKEN_LABEL="hsmkms",
    )
    assert_one_line_failure(proc, "PKCS#11 module not found: /usr/lib/nowhere/libpkcs11.so")


def test_doctor_missing_token(tmp_path: Path) -> None:
    init(tmp_path)
    proc = doctor(tmp_path, HSMKMS_TOKEN_LABEL="no-such-token")
    assert_one_line_failure(proc, "no token matches label=no-such-token")


def test_doctor_unreadable_softhsm_config(tmp_path: Path) -> None:
    init(tmp_path)
    (tmp_path / "softhsm2.conf").unlink()
    (tmp_path / "softhsm2.conf").mkdir()
    proc = doctor(tmp_path)
    assert_one_line_failure(proc, f"cannot read SoftHSM2 configuration {tmp_path}/softhsm2.conf")


def test_doctor_bad_setting(tmp_path: Path) -> None:
    proc = doctor(tmp_path, HSMKMS_ACCOUNT_ID="12")
    assert_one_line_failure(proc, "HSMKMS_ACCOUNT_ID")


def _system(data_dir: Path, clock: Clock = utc_now) -> System:
    return open_system(data_dir, clock=clock)


def _material(service: KmsService, key_id: str) -> KeyMaterialRef:
    found = service.store.get_key_and_version(key_id)
    assert found is not None
    assert found[1] is not None
    return KeyMaterialRef.from_str(found[1].material_ref)


def test_doctor_reports_orphans_and_missing_key_material(tmp_path: Path) -> None:
    """An object no key refers to fails doctor (exit 1) until removed with --remove-orphans;
    a key version whose object is gone fails doctor."""
    init(tmp_path)
    with _system(tmp_path) as system:
        service = system.service
        orphan = new_key_version(service.keystore, "0badc0de-0000-4000-8000-000000000000")
        key_id = service.create_key(CreateKeyRequest()).KeyMetadata.KeyId
        material = _material(service, key_id)
    found = doctor(tmp_path, "--json")
    report = json.loads(found.stdout)
    assert report["orphans"] == [
        {"object_id": orphan.object_ids[0], "label": "hsmkms:0badc0de000040008000:1:a"}
    ]
    assert report["missing"] == []
    assert_one_line_failure(
        found,
        f"token object {orphan.object_ids[0]} (hsmkms:0badc0de000040008000:1:a) belongs to no "
        "key: left by a key creation interrupted half-way; remove with hsmkms doctor "
        "--remove-orphans",
    )
    removed = doctor(tmp_path, "--remove-orphans", "--orphan-grace", "0.2")
    assert removed.returncode == 0, removed.stderr
    assert f"removed token object {orphan.object_ids[0]}" in removed.stdout
    assert "orphans:         0" in removed.stdout
    with _system(tmp_path) as system:
        assert not system.keystore.exists(orphan)
        assert system.keystore.exists(material)  # a key's own material is never touched
    assert doctor(tmp_path).returncode == 0

    with _system(tmp_path) as system:
        service = system.service
        service.keystore.destroy(material)
    assert_one_line_failure(doctor(tmp_path), f"key {key_id} version 1: token object missing")


def test_purge_deletes_keys_past_their_window(tmp_path: Path) -> None:
    """`hsmkms purge` destroys the token objects of keys whose deletion date has passed."""
    # Schedule the deletion on a clock 8 days behind, so the 7-day window is over now.
    with _system(tmp_path, ManualClock(dt.datetime.now(dt.UTC) - dt.timedelta(days=8))) as system:
        service = system.service
        key_id = service.create_key(CreateKeyRequest()).KeyMetadata.KeyId
        material = _material(service, key_id)
        service.schedule_key_deletion(
            ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
        )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    clean.update(database_env(tmp_path, None))
    proc = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "purge", "--data-dir", str(tmp_path)],
        env=clean, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"deleted {key_id}" in proc.stdout
    with _system(tmp_path) as system:
        service = system.service
        assert not service.keystore.exists(material)
        assert service.store.get_key(key_id) is None
    search = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "audit", "search", "--event-name", "DeleteKey",
         "--data-dir", str(tmp_path)],
        env=clean, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    (record,) = [json.loads(line) for line in search.stdout.splitlines()]
    assert record["eventType"] == "AwsServiceEvent"
    assert record["serviceEventDetails"] == {"keyId": key_id}
    verify = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "audit", "verify", "--data-dir", str(tmp_path)],
        env=clean, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr


# -- integrity of the metadata (docs/metadata-store.md) -------------------------------------

ALICE = "arn:aws:iam::111122223333:user/alice"
MALLORY = "arn:aws:iam::111122223333:user/mallory"


def _grant(key_id: str, grantee: str, n: int = 1) -> GrantRecord:
    return GrantRecord(
        grant_id=f"{n:064x}",
        key_id=key_id,
        name=None,
        grantee_principal=grantee,
        retiring_principal=None,
        operations=("Decrypt", "Encrypt"),
        constraints=None,
        issuing_account="111122223333",
        created_at=dt.datetime.now(dt.UTC),
    )


def test_doctor_reports_each_tampered_row_and_fails(tmp_path: Path) -> None:
    with _system(tmp_path) as system:
        service = system.service
        keys = [service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId for _ in range(6)]
        service.disable_key(m.DisableKeyRequest(KeyId=keys[0]))
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=keys[4]))
        service.store.create_grant(_grant(keys[3], ALICE))
    clean = doctor(tmp_path, "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["integrity"] == []
    assert "integrity:       ok" in doctor(tmp_path).stdout

    db = tmp_path / "hsmkms.db"
    outside_sql(db, "UPDATE keys SET state = 'Enabled' WHERE id = ?", keys[0])
    outside_sql(db, "UPDATE keys SET policy = '{}' WHERE id = ?", keys[1])
    refs = dict(outside_fetch(db, "SELECT key_id, material_ref FROM key_versions"))
    outside_sql(
        db, "UPDATE key_versions SET material_ref = ? WHERE key_id = ?", refs[keys[5]], keys[2]
    )
    outside_sql(
        db,
        "INSERT INTO grants SELECT ?, key_id, name, ?, retiring_principal, operations, "
        "constraints, issuing_account, created_at, mac FROM grants",
        f"{2:064x}",
        MALLORY,
    )
    outside_sql(db, "UPDATE key_versions SET key_id = ? WHERE key_id = ? AND version = 2",
                keys[5], keys[4])  # fmt: skip
    outside_sql(db, "UPDATE keys SET mac = NULL WHERE id = ?", keys[5])

    proc = doctor(tmp_path)
    assert_one_line_failure(proc, "6 rows failed their integrity check")
    lines = proc.stdout.splitlines()
    assert "integrity:       6 bad rows" in lines
    expected = [
        f"  keys row of key {keys[0]}: MAC does not match the row",
        f"  keys row of key {keys[1]}: MAC does not match the row",
        f"  key_versions row of key {keys[2]}: version 1: MAC does not match the row",
        f"  grants row of key {keys[3]}: grant {2:064x}: MAC does not match the row",
        f"  key_versions row of key {keys[5]}: version 2: MAC does not match the row",
        f"  keys row of key {keys[5]}: MAC missing",
    ]
    for line in expected:
        assert line in lines, proc.stdout
    assert "orphans:         not checked (rows failed their integrity check)" in lines

    report = doctor(tmp_path, "--json")
    assert report.returncode != 0
    found = json.loads(report.stdout)["integrity"]
    assert len(found) == 6
    assert {"table": "keys", "key_id": keys[5], "detail": "MAC missing"} in found


def test_doctor_on_an_untouched_database_reports_nothing(tmp_path: Path) -> None:
    with _system(tmp_path) as system:
        service = system.service
        key_id = service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        service.store.create_grant(_grant(key_id, ALICE))
        service.disable_key(m.DisableKeyRequest(KeyId=key_id))
        service.enable_key(m.EnableKeyRequest(KeyId=key_id))
    proc = doctor(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "integrity:       ok" in proc.stdout
