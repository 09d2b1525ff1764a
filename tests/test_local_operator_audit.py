"""The local operator's key operations are audited through the server's path: the envelope
commands on a local data directory leave one ``AwsApiCall`` record per KMS call, with the local
operator's identity, and the trail still verifies (``docs/audit.md``, "Local operator
records")."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cli_process
import pytest
from local_system import open_system
from postgres import on_postgresql
from pydantic import BaseModel
from server import database_env

from hsmkms import __version__
from hsmkms import models as m
from hsmkms.errors import DisabledException, NotFoundException, StorageUnavailable
from hsmkms.service.identifiers import Arns
from hsmkms.system import LOCAL_SOURCE, OperatorService, System, open_audit_reader
from hsmkms.system.operator import keys_used
from hsmkms.types import Caller

pytestmark = [pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "111122223333"
REGION = "us-east-1"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
CONTEXT = {"purpose": "test"}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with open_system(tmp_path_factory.mktemp("operator") / "data") as opened:
        yield opened


def _key(system: System) -> str:
    return system.service.create_key(m.CreateKeyRequest()).KeyMetadata.Arn


def _records(system: System) -> list[dict[str, Any]]:
    on_sqlite = system.settings.database_url is None
    if on_sqlite and not (system.settings.data_dir / "audit.db").exists():  # nothing recorded yet
        return []
    trail = open_audit_reader(system.settings)
    try:
        return list(trail.search())
    finally:
        trail.close()


# -- the facts of a call: the same as the service notes on an API caller ----------------------


def _as_api_caller(system: System, method: str, request: BaseModel) -> tuple[Any, Caller]:
    caller = Caller(principal_arn=ROOT, account_id=ACCOUNT)
    try:
        response = getattr(system.service, method)(request, caller)
    except Exception:
        response = None
    return response, caller


def test_a_local_call_names_the_keys_and_versions_an_api_call_would(system: System) -> None:
    """keys_used(request, response) of the local operator == Caller.keys_used the service
    notes for the same call made through the API, for each envelope operation, across a
    rotation, by alias, for a re-encryption under the same key, and for calls refused by the
    key's state. (A call that fails before the service looks its key up — a malformed blob,
    IncorrectKeyException — names, locally, the keys its request names: docs/audit.md.)"""
    arns = Arns(REGION, ACCOUNT)
    a, b = _key(system), _key(system)
    blob = system.service.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=a, KeySpec="AES_256", EncryptionContext=CONTEXT)
    ).CiphertextBlob
    system.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=a))
    system.service.create_alias(m.CreateAliasRequest(AliasName="alias/operator", TargetKeyId=a))
    disabled = _key(system)
    old = system.service.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=disabled, KeySpec="AES_256")
    ).CiphertextBlob
    system.service.disable_key(m.DisableKeyRequest(KeyId=disabled))
    calls: list[tuple[str, BaseModel]] = [
        ("generate_data_key", m.GenerateDataKeyRequest(KeyId=a, KeySpec="AES_256")),
        ("generate_data_key", m.GenerateDataKeyRequest(KeyId="alias/operator", KeySpec="AES_256")),
        ("decrypt", m.DecryptRequest(CiphertextBlob=blob, EncryptionContext=CONTEXT)),
        ("re_encrypt", m.ReEncryptRequest(CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
                                          DestinationKeyId=b)),
        ("re_encrypt", m.ReEncryptRequest(CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
                                          DestinationKeyId=a)),
        ("generate_data_key", m.GenerateDataKeyRequest(KeyId=disabled, KeySpec="AES_256")),
        ("decrypt", m.DecryptRequest(CiphertextBlob=old)),
    ]  # fmt: skip
    for method, request in calls:
        response, caller = _as_api_caller(system, method, request)
        assert keys_used(arns, request, response) == caller.keys_used, (method, request)


# -- the records ----------------------------------------------------------------------------


def test_each_call_is_one_record_naming_the_local_operator(system: System) -> None:
    key = _key(system)
    operator = OperatorService(system, command="encrypt-file")
    before = len(_records(system))
    response = operator.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=key, KeySpec="AES_256", EncryptionContext=CONTEXT)
    )
    plain = operator.decrypt(
        m.DecryptRequest(CiphertextBlob=response.CiphertextBlob, EncryptionContext=CONTEXT)
    )
    assert plain.Plaintext == response.Plaintext
    generate, decrypt = _records(system)[before:]
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert generate["userIdentity"] == {
        "type": "LocalOperator",
        "principalId": f"{user}@{socket.gethostname()}",
        "accountId": ACCOUNT,
        "userName": user,
    }
    assert generate["sourceIPAddress"] == LOCAL_SOURCE == "hsmkms-cli"
    assert generate["userAgent"] == f"hsmkms-cli/{__version__} (encrypt-file)"
    assert generate["eventName"] == "GenerateDataKey"
    assert generate["eventType"] == "AwsApiCall"
    assert generate["requestParameters"] == {
        "keyId": key,
        "keySpec": "AES_256",
        "encryptionContext": CONTEXT,
    }
    assert generate["responseElements"] is None
    assert generate["resources"] == [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key}]
    assert generate["additionalEventData"] == {"keyVersion": 1}
    assert decrypt["eventName"] == "Decrypt"
    assert decrypt["resources"] == generate["resources"]
    text = json.dumps([generate, decrypt])
    for secret in (response.Plaintext, response.CiphertextBlob):
        assert secret.hex() not in text


def test_a_failed_call_is_recorded_and_raised(system: System) -> None:
    key = _key(system)
    system.service.disable_key(m.DisableKeyRequest(KeyId=key))
    operator = OperatorService(system, command="encrypt-file")
    before = len(_records(system))
    with pytest.raises(DisabledException):
        operator.generate_data_key(m.GenerateDataKeyRequest(KeyId=key, KeySpec="AES_256"))
    missing = key.rsplit("/", 1)[0] + "/00000000-0000-4000-8000-000000000000"
    with pytest.raises(NotFoundException):
        operator.generate_data_key(m.GenerateDataKeyRequest(KeyId=missing, KeySpec="AES_256"))
    disabled, unknown = _records(system)[before:]
    assert disabled["errorCode"] == "DisabledException"
    assert disabled["responseElements"] is None
    assert disabled["resources"][0]["ARN"] == key
    assert unknown["errorCode"] == "NotFoundException"


@pytest.mark.sqlite  # breaks the trail's own SQLite file
def test_no_record_no_result(tmp_path: Path) -> None:
    """When the record cannot be written, the call's answer is not handed out: the error is."""
    data_dir = tmp_path / "data"
    with open_system(data_dir) as system:
        key = _key(system)
        (data_dir / "audit.db").mkdir()  # the trail cannot be opened
        operator = OperatorService(system, command="encrypt-file")
        with pytest.raises(StorageUnavailable, match="audit trail failed: I/O error"):
            operator.generate_data_key(m.GenerateDataKeyRequest(KeyId=key, KeySpec="AES_256"))


def test_the_operator_runs_calls_only_as_itself(system: System) -> None:
    operator = OperatorService(system, command="rewrap")
    with pytest.raises(TypeError):
        operator.decrypt(m.DecryptRequest(CiphertextBlob=b"x"), Caller(ROOT, ACCOUNT))


# -- end to end through the real command line -------------------------------------------------

_MAKE_KEYS = """
import sys
from pathlib import Path
from hsmkms import models as m
from hsmkms.cli.envelope import _local_service
with _local_service(Path(sys.argv[1])) as service:
    for _ in range(2):
        print(service.create_key(m.CreateKeyRequest()).KeyMetadata.Arn)
"""


def _env(data_dir: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HSMKMS_", "AWS_"))}
    return {**clean, **database_env(data_dir, None)}


def hsmkms(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=_env(data_dir),
        timeout=120,
        check=False,
    )


def _search(data_dir: Path, event_name: str) -> list[dict[str, Any]]:
    found = hsmkms(data_dir, "audit", "search", "--event-name", event_name)
    if found.returncode == 1 and "no record matches" in found.stderr:
        return []  # audit search exits 1 when nothing matches, as grep does
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


def test_file_commands_on_a_data_directory_leave_verifiable_records(tmp_path: Path) -> None:
    """encrypt-file, decrypt-file and rewrap on a local data directory: `audit search` finds
    their GenerateDataKey, Decrypt and ReEncrypt records, and `audit verify` exits 0."""
    data_dir = tmp_path / "data"
    made = subprocess.run(
        [sys.executable, "-c", _MAKE_KEYS, str(data_dir)],
        capture_output=True, text=True, env=_env(data_dir), timeout=120, check=True,
    )  # fmt: skip
    first, second = [line for line in made.stdout.splitlines() if line.startswith("arn:")]
    # Creating keys directly records nothing.
    assert (
        _search(data_dir, "CreateKey") == []
        if on_postgresql()
        else not (data_dir / "audit.db").exists()
    )
    (tmp_path / "plain").write_bytes(b"local operator payload")
    plain, ct, out = (str(tmp_path / n) for n in ("plain", "ct", "out"))

    done = hsmkms(data_dir, "encrypt-file", plain, ct, "--key-id", first, "--context", "a=1")
    assert (done.returncode, done.stderr) == (0, "")
    (record,) = _search(data_dir, "GenerateDataKey")
    assert record["userIdentity"]["type"] == "LocalOperator"
    assert record["sourceIPAddress"] == "hsmkms-cli"
    assert record["userAgent"].endswith("(encrypt-file)")
    assert record["requestParameters"]["encryptionContext"] == {"a": "1"}
    assert record["resources"][0]["ARN"] == first

    done = hsmkms(data_dir, "decrypt-file", ct, out, "--context", "a=1")
    assert (done.returncode, done.stderr) == (0, "")
    assert Path(out).read_bytes() == b"local operator payload"
    (record,) = _search(data_dir, "Decrypt")
    assert record["userAgent"].endswith("(decrypt-file)")
    assert record["resources"][0]["ARN"] == first

    done = hsmkms(data_dir, "rewrap", ct, "--key-id", second)
    assert (done.returncode, done.stderr) == (0, "")
    (record,) = _search(data_dir, "ReEncrypt")
    assert {r["ARN"] for r in record["resources"]} == {first, second}

    # The data key is now under the second key: naming the first fails inside the service.
    failed = hsmkms(data_dir, "decrypt-file", ct, out, "--context", "a=1", "--key-id", first)
    assert failed.returncode == 1
    assert failed.stderr.startswith("hsmkms decrypt-file: ")
    assert [r.get("errorCode") for r in _search(data_dir, "Decrypt")] == [
        None,
        "IncorrectKeyException",
    ]
    by_key = hsmkms(data_dir, "audit", "search", "--key-id", second)
    assert [json.loads(line)["eventName"] for line in by_key.stdout.splitlines()] == [
        "ReEncrypt",
        "Decrypt",
    ]

    verify = hsmkms(data_dir, "audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith("audit trail intact: 4 records, ")
