"""The audit trail written by the real server: one record per API call — allowed or denied,
successful or failed, authenticated or not — matched to the request id boto3 saw, in order,
verifiable with ``hsmkms audit verify``, tamper-evident, holding no secret, and complete after a
graceful shutdown."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from postgres import outside_fetch, outside_sql, stored_bytes
from server import Response, RunningServer, running_server

from hsmkms.api.app import UNKNOWN_EVENT_NAME, _error_fields, _event_name
from hsmkms.api.protocol import SERVER_FAULT_MESSAGE
from hsmkms.errors import DependencyTimeoutException, KMSInternalException, NotFoundException

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "111122223333"
PLAINTEXT = b"the plaintext that must never be audited"
CONTEXT = {"purpose": "audit-test"}
WRONG_SECRET = "wrongSecretKeyThatSignsBadly0123456789ABC"
UNKNOWN_KEY_ID = "AKIAUNKNOWNKEY123456"


@dataclasses.dataclass
class Call:
    """One request of the workload and what its record must say."""

    request_id: str
    event_name: str
    error_code: str | None


@dataclasses.dataclass
class Workload:
    server: RunningServer
    calls: list[Call]
    key_arn: str
    data_key: bytes
    blobs: list[bytes]
    secrets: list[str]
    user_arn: str

    @property
    def database(self) -> Path:
        return self.server.data_dir / "audit.db"

    def records(self) -> list[dict[str, Any]]:
        rows = outside_fetch(self.database, "SELECT record FROM audit_records ORDER BY seq")
        return [json.loads(body) for (body,) in rows]

    def by_request(self) -> dict[str, dict[str, Any]]:
        return {r["requestID"]: r for r in self.records() if "requestID" in r}


def _boto(calls: list[Call], name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a boto3 call, noting its request id and outcome; returns the response (or {})."""
    try:
        response = fn()
    except ClientError as exc:
        meta = exc.response["ResponseMetadata"]
        calls.append(Call(meta["RequestId"], name, exc.response["Error"]["Code"]))
        return {}
    calls.append(Call(response["ResponseMetadata"]["RequestId"], name, None))
    return response


def _raw(calls: list[Call], name: str, response: Response) -> Response:
    code = None if response.status == 200 else response.json()["__type"]
    calls.append(Call(response.headers["x-amzn-requestid"], name, code))
    return response


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    """Every kind of call against a one-worker server, which is then stopped gracefully."""
    data_dir = tmp_path_factory.mktemp("audited") / "data"
    calls: list[Call] = []
    with running_server(data_dir) as srv:
        made = srv.cli("credentials", "create", "--name", "auditee", "--json")
        assert made.returncode == 0, made.stderr
        user = json.loads(made.stdout)
        kms = srv.client()
        created = _boto(calls, "CreateKey", lambda: kms.create_key(Description="audited"))
        key_arn = created["KeyMetadata"]["Arn"]
        key_id = created["KeyMetadata"]["KeyId"]
        gdk = _boto(
            calls,
            "GenerateDataKey",
            lambda: kms.generate_data_key(
                KeyId=key_id, KeySpec="AES_256", EncryptionContext=CONTEXT
            ),
        )
        _boto(
            calls,
            "Decrypt",
            lambda: kms.decrypt(CiphertextBlob=gdk["CiphertextBlob"], EncryptionContext=CONTEXT),
        )
        encrypted = _boto(calls, "Encrypt", lambda: kms.encrypt(KeyId=key_id, Plaintext=PLAINTEXT))
        _boto(calls, "DescribeKey", lambda: kms.describe_key(KeyId=str(uuid.uuid4())))
        # Neither KeySpec nor NumberOfBytes: the service's ValidationException.
        _raw(
            calls, "GenerateDataKey", srv.signed("TrentService.GenerateDataKey", {"KeyId": key_id})
        )
        _raw(calls, "Encrypt", srv.signed("TrentService.Encrypt", b"{not json"))
        bad_signature = srv.client(srv.access_key_id, WRONG_SECRET)
        _boto(
            calls,
            "GenerateDataKey",
            lambda: bad_signature.generate_data_key(KeyId=key_id, KeySpec="AES_256"),
        )
        stranger = srv.client(UNKNOWN_KEY_ID, WRONG_SECRET)
        _boto(calls, "ListKeys", lambda: stranger.list_keys())
        _raw(
            calls,
            "ListKeys",
            srv.raw("POST", "/", b"{}", {"X-Amz-Target": "TrentService.ListKeys"}),
        )
        _raw(calls, UNKNOWN_EVENT_NAME, srv.signed(None, {}))
        _raw(calls, "NoSuchThing", srv.signed("TrentService.NoSuchThing", {}))
        auditee = srv.client(user["AccessKeyId"], user["SecretAccessKey"])
        _boto(
            calls,
            "GenerateDataKey",
            lambda: auditee.generate_data_key(KeyId=key_id, KeySpec="AES_256"),
        )
        assert srv.raw("GET", "/healthz").status == 200  # neither is audited
        assert srv.raw("GET", "/metrics").status == 200
        # The last calls, just before the shutdown: the graceful stop must flush them.
        for _ in range(5):
            _boto(calls, "ListAliases", lambda: kms.list_aliases())
    assert srv.process.returncode == 0, srv.log()
    return Workload(
        srv,
        calls,
        key_arn,
        gdk["Plaintext"],
        [gdk["CiphertextBlob"], encrypted["CiphertextBlob"]],
        [srv.secret_access_key, user["SecretAccessKey"], WRONG_SECRET],
        user["Arn"],
    )


def test_every_call_has_exactly_one_record_in_order(workload: Workload) -> None:
    records = workload.records()
    assert [r.get("requestID") for r in records] == [c.request_id for c in workload.calls]
    for call, found in zip(workload.calls, records, strict=True):
        assert found["eventName"] == call.event_name, (call, found)
        assert found.get("errorCode") == call.error_code, (call, found)
        assert found["eventType"] == "AwsApiCall"
    codes = {c.error_code for c in workload.calls}
    assert {
        None, "NotFoundException", "ValidationException", "SerializationException",
        "InvalidSignatureException", "UnrecognizedClientException",
        "MissingAuthenticationTokenException", "UnknownOperationException",
    } <= codes  # fmt: skip


def test_graceful_shutdown_flushed_and_sealed_everything(workload: Workload) -> None:
    """The records of the last requests are there, and the trail ends with a shutdown seal
    covering every record."""
    last = workload.calls[-5:]
    assert [r["requestID"] for r in workload.records()[-5:]] == [c.request_id for c in last]
    proc = workload.server.cli("audit", "verify")
    assert proc.returncode == 0, proc.stderr
    assert "(0 unsealed)" in proc.stdout
    ((reason,),) = outside_fetch(
        workload.database, "SELECT reason FROM audit_seals ORDER BY seal_seq DESC LIMIT 1"
    )
    assert reason == "shutdown"


def test_successful_calls_carry_identity_parameters_and_key(workload: Workload) -> None:
    calls = workload.by_request()
    create, gdk, decrypt, encrypt = (calls[c.request_id] for c in workload.calls[:4])
    root = {
        "type": "Root", "principalId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:root",
        "accountId": ACCOUNT, "accessKeyId": workload.server.access_key_id,
    }  # fmt: skip
    for record in (create, gdk, decrypt, encrypt):
        assert record["userIdentity"] == root
        assert record["sourceIPAddress"] == "127.0.0.1"
        assert record["userAgent"].startswith("Boto3/")
        assert record["recipientAccountId"] == ACCOUNT
        assert record["awsRegion"] == workload.server.region
    assert create["readOnly"] is False
    assert create["requestParameters"] == {"description": "audited"}
    assert create["responseElements"]["keyMetadata"]["arn"] == workload.key_arn
    assert create["resources"] == [
        {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": workload.key_arn}
    ]
    assert gdk["requestParameters"] == {
        "keyId": workload.key_arn.rpartition("/")[2], "keySpec": "AES_256",
        "encryptionContext": CONTEXT,
    }  # fmt: skip
    assert decrypt["requestParameters"] == {
        "encryptionContext": CONTEXT, "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }  # fmt: skip
    for record in (gdk, decrypt, encrypt):
        assert record["readOnly"] is True
        assert record["responseElements"] is None
        assert record["resources"] == [
            {"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": workload.key_arn}
        ]
        assert record["additionalEventData"] == {"keyVersion": 1}


def test_failed_calls_carry_the_error_the_caller_saw(workload: Workload) -> None:
    calls = workload.calls
    records = workload.by_request()
    not_found = records[calls[4].request_id]
    assert not_found["errorMessage"].startswith("Key 'arn:aws:kms:")
    assert not_found["responseElements"] is None
    assert not_found["resources"] == []
    serialization = records[calls[6].request_id]
    assert serialization["requestParameters"] is None  # the body could not be decoded
    bad_signature, unknown_key, no_auth = (records[c.request_id] for c in calls[7:10])
    assert bad_signature["userIdentity"] == {
        "type": "Unknown", "accessKeyId": workload.server.access_key_id,
    }  # fmt: skip
    assert bad_signature["requestParameters"] is None
    assert bad_signature["resources"] == []
    assert unknown_key["userIdentity"] == {"type": "Unknown", "accessKeyId": UNKNOWN_KEY_ID}
    assert no_auth["userIdentity"] == {"type": "Unknown"}
    assert no_auth["sourceIPAddress"] == "127.0.0.1"
    user_call = records[calls[12].request_id]
    assert user_call["userIdentity"]["type"] == "IAMUser"
    assert user_call["userIdentity"]["userName"] == "auditee"
    assert user_call["userIdentity"]["arn"] == workload.user_arn


def _forms(secret: bytes) -> list[bytes]:
    return [secret, base64.b64encode(secret), secret.hex().encode()]


def test_no_secret_in_the_database_or_the_search_output(workload: Workload) -> None:
    # Every database file of the data directory: the trail, the metadata and credentials.
    stored = stored_bytes(workload.database.parent / "hsmkms.db") + stored_bytes(workload.database)
    search = workload.server.cli("audit", "search")
    assert search.returncode == 0, search.stderr
    output = search.stdout.encode()
    first = workload.calls[0].request_id.encode()
    assert first in stored  # the scan does see the records
    assert first in output
    secrets = [PLAINTEXT, workload.data_key, *workload.blobs]
    secrets += [s.encode() for s in workload.secrets]
    for secret in secrets:
        for form in _forms(secret):
            assert form not in stored
            assert form not in output


def test_a_tampered_record_is_named_by_verify(workload: Workload, tmp_path: Path) -> None:
    """Last in the module: it edits the database (and puts it back)."""
    decrypt_id = workload.calls[2].request_id
    seq, body = next(
        (seq, bytes(body))
        for seq, body in outside_fetch(workload.database, "SELECT seq, record FROM audit_records")
        if decrypt_id.encode() in bytes(body)
    )
    forged = body.replace(b'"Decrypt"', b'"Encrypt"')
    edit = "UPDATE audit_records SET record = ? WHERE seq = ?"
    try:
        outside_sql(workload.database, edit, forged, seq)
        proc = workload.server.cli("audit", "verify")
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            f"hsmkms audit verify: record {seq}: hash chain broken (modified, inserted or "
            "removed record)"
        )
    finally:
        outside_sql(workload.database, edit, body, seq)
    assert workload.server.cli("audit", "verify").returncode == 0


# -- two workers --------------------------------------------------------------------------------


def test_two_workers_record_every_request_once_in_each_workers_order(tmp_path: Path) -> None:
    """Concurrent load on both workers; meanwhile one client's sequential requests (ordered),
    which both workers answer: every request has one record, each worker's in its order."""
    with running_server(tmp_path / "data", workers=2) as srv:
        key_id = srv.signed("TrentService.CreateKey", {}).json()["KeyMetadata"]["KeyId"]
        body = {"KeyId": key_id, "NumberOfBytes": 16}

        def one(_: int = 0) -> tuple[str, str]:
            resp = srv.signed("TrentService.GenerateDataKey", body)
            assert resp.status == 200
            return resp.headers["x-amzn-requestid"], resp.headers["x-hsmkms-worker"]

        sequential: list[tuple[str, str]] = []
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            background = pool.map(one, range(300))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                len(sequential) < 40 or len({pid for _, pid in sequential}) < 2
            ):
                sequential.append(one())  # each on a new connection
            concurrent_ids = [rid for rid, _ in background]
    assert srv.process.returncode == 0
    rows = outside_fetch(srv.data_dir / "audit.db", "SELECT record FROM audit_records ORDER BY seq")
    trail = [json.loads(body)["requestID"] for (body,) in rows]
    assert len(trail) == len(set(trail)) == 1 + 300 + len(sequential)
    assert set(concurrent_ids) | {rid for rid, _ in sequential} <= set(trail)
    position = {rid: i for i, rid in enumerate(trail)}
    assert len({pid for _, pid in sequential}) == 2
    for pid in {pid for _, pid in sequential}:
        mine = [rid for rid, p in sequential if p == pid]
        assert sorted(mine, key=position.__getitem__) == mine
    assert srv.cli("audit", "verify").returncode == 0


# -- naming and error fields --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("TrentService.Decrypt", "Decrypt"),
        ("TrentService.CreateGrantX", "CreateGrantX"),
        (None, UNKNOWN_EVENT_NAME),
        ("Decrypt", UNKNOWN_EVENT_NAME),
        ("TrentService.", UNKNOWN_EVENT_NAME),
        ("TrentService.Bad Name", UNKNOWN_EVENT_NAME),
        ("TrentService." + "A" * 65, UNKNOWN_EVENT_NAME),
    ],
)
def test_event_name_comes_from_a_plausible_target_only(target: str | None, name: str) -> None:
    assert _event_name(target) == name


def test_server_faults_are_recorded_without_internal_detail() -> None:
    assert _error_fields(NotFoundException("Key 'k' does not exist")) == (
        "NotFoundException",
        "Key 'k' does not exist",
    )
    assert _error_fields(KMSInternalException("sqlite: disk I/O error at /srv/db")) == (
        "KMSInternalException",
        SERVER_FAULT_MESSAGE,
    )
    assert _error_fields(DependencyTimeoutException("locked")) == (
        "DependencyTimeoutException",
        SERVER_FAULT_MESSAGE,
    )
    assert _error_fields(RuntimeError("traceback detail")) == (
        "KMSInternalException",
        SERVER_FAULT_MESSAGE,
    )
