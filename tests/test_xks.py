"""hsmkms as an XKS proxy: the credentials command line, and the XKS proxy API through the real
server with real SigV4 (service ``kms-xks-proxy``), a real token and real HTTP requests."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from server import Response, RunningServer, run_cli, running_server

from hsmkms.sigv4 import Credential, SignedRequest, sign

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

PREFIX = "tenant-a/xks_1"
PATH = f"/{PREFIX}/kms/xks/v1"
PLAINTEXT = bytes(range(256)) * 16 + b"p" * 204  # 4,300 bytes
AAD = bytes((i * 7) % 256 for i in range(8192))
ACCESS_KEY_ID = r"[A-Z2-7]{20,30}"
SECRET = r"[A-Za-z0-9/+=]{43,64}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _metadata(operation: str, key_arn: str | None = None) -> dict[str, str]:
    found = {
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/xks-test",
        "kmsOperation": operation,
        "kmsRequestId": str(uuid.uuid4()),
    }
    if key_arn is not None:
        found["kmsKeyArn"] = key_arn
    return found


class Xks:
    """An XKS client of the server: signs with an XKS credential for kms-xks-proxy."""

    def __init__(self, server: RunningServer, credential: Credential) -> None:
        self.server = server
        self.credential = credential

    def post(
        self,
        route: str,
        body: dict[str, Any] | bytes,
        *,
        credential: Credential | None = None,
        path: str = PATH,
        extra_headers: dict[str, str] | None = None,
    ) -> Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = [("Host", self.server.host), ("Content-Type", "application/json")]
        headers += list((extra_headers or {}).items())
        signed = sign(
            SignedRequest("POST", path + route, "", headers, data),
            credential or self.credential,
            region=self.server.region,
            service="kms-xks-proxy",
            when=datetime.now(UTC),
        )
        return self.server.raw("POST", path + route, data, dict(signed.headers))

    def encrypt(self, key_id: str, plaintext: bytes, aad: bytes | None, **extra: Any) -> Response:
        body: dict[str, Any] = {
            "requestMetadata": _metadata("Encrypt", f"arn:aws:kms:us-east-1:1:key/{key_id}"),
            "plaintext": _b64(plaintext),
            "encryptionAlgorithm": "AES_GCM",
            **extra,
        }
        if aad is not None:
            body["additionalAuthenticatedData"] = _b64(aad)
        return self.post(f"/keys/{key_id}/encrypt", body)

    def decrypt(self, key_id: str, sealed: dict[str, Any], aad: bytes | None) -> Response:
        body: dict[str, Any] = {
            "requestMetadata": _metadata("Decrypt", f"arn:aws:kms:us-east-1:1:key/{key_id}"),
            "encryptionAlgorithm": "AES_GCM",
            **{
                k: sealed[k]
                for k in (
                    "ciphertext",
                    "initializationVector",
                    "authenticationTag",
                    "ciphertextMetadata",
                )
            },
        }
        if aad is not None:
            body["additionalAuthenticatedData"] = _b64(aad)
        return self.post(f"/keys/{key_id}/decrypt", body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("xks") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def issued(server: RunningServer) -> dict[str, str]:
    made = server.cli("xks", "credentials", "create", "--prefix", PREFIX, "--json")
    assert made.returncode == 0, made.stderr
    found: dict[str, str] = json.loads(made.stdout)
    return found


@pytest.fixture(scope="module")
def xks(server: RunningServer, issued: dict[str, str]) -> Xks:
    return Xks(server, Credential(issued["AccessKeyId"], issued["SecretAccessKey"], "xks"))


@pytest.fixture(scope="module")
def key_id(server: RunningServer) -> str:
    found: str = server.client().create_key(Description="xks")["KeyMetadata"]["KeyId"]
    return found


def _audit(server: RunningServer) -> list[dict[str, Any]]:
    tail = server.cli("audit", "tail", "-n", "500", "--json")
    assert tail.returncode == 0, tail.stderr
    records: list[dict[str, Any]] = json.loads(tail.stdout)
    return records


def _error(resp: Response, status: int, name: str) -> None:
    assert resp.status == status, resp.body
    assert resp.body.count(b"\n") == 0
    body = resp.json()
    assert body["errorName"] == name
    assert isinstance(body["errorMessage"], str)
    assert len(body["errorMessage"]) < 512


# -- credentials -------------------------------------------------------------------------------


def test_credentials_create_prints_the_spec_shapes(issued: dict[str, str]) -> None:
    import re

    assert re.fullmatch(ACCESS_KEY_ID, issued["AccessKeyId"])
    assert re.fullmatch(SECRET, issued["SecretAccessKey"])
    assert issued["UriPath"] == PATH


def test_credentials_list_rotate_and_delete(server: RunningServer, issued: dict[str, str]) -> None:
    """A prefix holds two credentials (rotation), not three; list never shows a secret; a
    deleted credential stops working at once; every change is audited."""
    prefix = "rotating"
    first = json.loads(
        server.cli("xks", "credentials", "create", "--prefix", prefix, "--json").stdout
    )
    second = json.loads(
        server.cli("xks", "credentials", "create", "--prefix", prefix, "--json").stdout
    )
    third = server.cli("xks", "credentials", "create", "--prefix", prefix)
    assert third.returncode == 1
    assert "delete one first" in third.stderr
    listed = json.loads(
        server.cli("xks", "credentials", "list", "--prefix", prefix, "--json").stdout
    )
    assert {e["AccessKeyId"] for e in listed} == {first["AccessKeyId"], second["AccessKeyId"]}
    everything = server.cli("xks", "credentials", "list").stdout
    assert issued["AccessKeyId"] in everything
    for secret in (first["SecretAccessKey"], second["SecretAccessKey"], issued["SecretAccessKey"]):
        assert secret not in everything
        assert secret not in json.dumps(listed)
    old = Xks(server, Credential(first["AccessKeyId"], first["SecretAccessKey"], "x"))
    new = Xks(server, Credential(second["AccessKeyId"], second["SecretAccessKey"], "x"))
    health = {"requestMetadata": {"kmsRequestId": "r1", "kmsOperation": "CreateCustomKeyStore"}}
    assert old.post("/health", health, path="/rotating/kms/xks/v1").status == 200
    gone = server.cli("xks", "credentials", "delete", first["AccessKeyId"], "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout) == {
        "Deleted": first["AccessKeyId"],
        "UriPath": "/rotating/kms/xks/v1",
    }
    _error(old.post("/health", health, path="/rotating/kms/xks/v1"), 401,
           "AuthenticationFailedException")  # fmt: skip
    assert new.post("/health", health, path="/rotating/kms/xks/v1").status == 200
    unknown = server.cli("xks", "credentials", "delete", first["AccessKeyId"])
    assert unknown.returncode == 1
    records = [r for r in _audit(server) if r["eventSource"] == "kms-xks-proxy.hsmkms"]
    created = [r for r in records if r["eventName"] == "CreateXksCredential"]
    assert {r["responseElements"]["accessKeyId"] for r in created if r["responseElements"]} >= {
        first["AccessKeyId"],
        second["AccessKeyId"],
    }
    assert any(r.get("errorCode") == "LimitExceededException" for r in created)
    deleted = [r for r in records if r["eventName"] == "DeleteXksCredential"]
    assert {"accessKeyId": first["AccessKeyId"], "prefix": prefix} in [
        r["requestParameters"] for r in deleted
    ]
    text = json.dumps(records)
    for secret in (first["SecretAccessKey"], second["SecretAccessKey"]):
        assert secret not in text


@pytest.mark.parametrize("prefix", ["", "/lead", "trail/", "a//b", "a" * 129, "sp ace", "dot.s"])
def test_a_bad_prefix_is_a_one_line_usage_error(server: RunningServer, prefix: str) -> None:
    proc = server.cli("xks", "credentials", "create", "--prefix", prefix)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_a_credential_of_another_prefix_does_not_open_this_one(
    server: RunningServer, xks: Xks
) -> None:
    other = json.loads(
        server.cli("xks", "credentials", "create", "--prefix", "other", "--json").stdout
    )
    stranger = Credential(other["AccessKeyId"], other["SecretAccessKey"], "x")
    health = {"requestMetadata": {"kmsRequestId": "r2", "kmsOperation": "KmsHealthCheck"}}
    _error(xks.post("/health", health, credential=stranger), 401, "AuthenticationFailedException")


# -- the API -----------------------------------------------------------------------------------


def test_metadata_of_an_enabled_and_a_disabled_key(
    server: RunningServer, xks: Xks, key_id: str
) -> None:
    body = {"requestMetadata": _metadata("CreateKey")}
    resp = xks.post(f"/keys/{key_id}/metadata", body)
    assert resp.status == 200, resp.body
    assert resp.body == (
        b'{"keySpec":"AES_256","keyUsage":["ENCRYPT","DECRYPT"],"keyStatus":"ENABLED"}'
    )
    kms = server.client()
    other = kms.create_key(Description="to disable")["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=other)
    assert xks.post(f"/keys/{other}/metadata", body).json()["keyStatus"] == "DISABLED"
    _error(xks.encrypt(other, b"x", None), 400, "InvalidStateException")


def test_round_trip_with_4300_bytes_and_8192_bytes_of_aad(xks: Xks, key_id: str) -> None:
    resp = xks.encrypt(key_id, PLAINTEXT, AAD, ciphertextDataIntegrityValueAlgorithm="SHA_256")
    assert resp.status == 200, resp.body
    assert resp.body.count(b"\n") == 0
    sealed = resp.json()
    ciphertext = base64.b64decode(sealed["ciphertext"])
    iv = base64.b64decode(sealed["initializationVector"])
    tag = base64.b64decode(sealed["authenticationTag"])
    metadata = base64.b64decode(sealed["ciphertextMetadata"])
    assert len(ciphertext) == len(PLAINTEXT)
    assert ciphertext != PLAINTEXT
    assert len(iv) == 12
    assert len(tag) == 16
    assert 0 < len(metadata) <= 20
    # spec: SHA-256(AAD || ciphertextMetadata || IV || ciphertext || tag)
    expected = hashlib.sha256(AAD + metadata + iv + ciphertext + tag).digest()
    assert base64.b64decode(sealed["ciphertextDataIntegrityValue"]) == expected
    opened = xks.decrypt(key_id, sealed, AAD)
    assert opened.status == 200, opened.body
    assert base64.b64decode(opened.json()["plaintext"]) == PLAINTEXT
    metrics = xks.server.raw("GET", "/metrics").body.decode()
    assert 'hsmkms_requests_total{code="OK",operation="xks:Encrypt"}' in metrics
    assert 'hsmkms_request_duration_seconds_count{operation="xks:Decrypt"}' in metrics
    without = xks.encrypt(key_id, b"short", None)
    assert "ciphertextDataIntegrityValue" not in without.json()
    assert (
        base64.b64decode(xks.decrypt(key_id, without.json(), None).json()["plaintext"]) == b"short"
    )


def test_a_request_signed_as_aws_kms_signs_it_is_served(
    server: RunningServer, xks: Xks, key_id: str
) -> None:
    """Signed by botocore's own SigV4 signer (not hsmkms's), with only ``host`` and
    ``x-amz-date`` signed as AWS KMS does, and the content type added after signing."""
    route = f"{PATH}/keys/{key_id}/encrypt"
    body = json.dumps(
        {
            "requestMetadata": _metadata("Encrypt", f"arn:aws:kms:us-east-1:1:key/{key_id}"),
            "plaintext": _b64(b"signed by botocore"),
            "encryptionAlgorithm": "AES_GCM",
        }
    ).encode()
    request = AWSRequest(
        "POST", f"http://{server.host}{route}", data=body, headers={"Host": server.host}
    )
    credentials = Credentials(xks.credential.access_key_id, xks.credential.secret)
    SigV4Auth(credentials, "kms-xks-proxy", server.region).add_auth(request)
    assert "SignedHeaders=host;x-amz-date," in request.headers["Authorization"]
    headers = {**dict(request.headers), "Content-Type": "application/json"}
    resp = server.raw("POST", route, body, headers)
    assert resp.status == 200, resp.body
    opened = xks.decrypt(key_id, resp.json(), None)
    assert base64.b64decode(opened.json()["plaintext"]) == b"signed by botocore"
    SigV4Auth(credentials, "kms", server.region).add_auth(request)  # the KMS API's service
    assert server.raw("POST", route, body, dict(request.headers)).status == 401


def test_tampering_is_invalid_ciphertext(xks: Xks, key_id: str) -> None:
    sealed = xks.encrypt(key_id, b"secret data", b"context").json()
    tag = bytearray(base64.b64decode(sealed["authenticationTag"]))
    tag[0] ^= 1
    _error(xks.decrypt(key_id, {**sealed, "authenticationTag": _b64(bytes(tag))}, b"context"),
           400, "InvalidCiphertextException")  # fmt: skip
    _error(xks.decrypt(key_id, sealed, b"other context"), 400, "InvalidCiphertextException")
    md = bytearray(base64.b64decode(sealed["ciphertextMetadata"]))
    md[-1] ^= 2
    _error(xks.decrypt(key_id, {**sealed, "ciphertextMetadata": _b64(bytes(md))}, b"context"),
           400, "InvalidCiphertextException")  # fmt: skip
    _error(xks.decrypt(key_id, {**sealed, "initializationVector": _b64(b"1234")}, b"context"),
           400, "InvalidCiphertextException")  # fmt: skip


def test_rotation_keeps_old_ciphertexts_readable(server: RunningServer, xks: Xks) -> None:
    kms = server.client()
    key = kms.create_key(Description="xks rotating")["KeyMetadata"]["KeyId"]
    before = xks.encrypt(key, b"before rotation", b"a").json()
    kms.rotate_key_on_demand(KeyId=key)
    after = xks.encrypt(key, b"after rotation", b"a").json()
    assert after["ciphertextMetadata"] != before["ciphertextMetadata"]
    assert (
        base64.b64decode(xks.decrypt(key, before, b"a").json()["plaintext"]) == b"before rotation"
    )
    assert base64.b64decode(xks.decrypt(key, after, b"a").json()["plaintext"]) == b"after rotation"


def test_a_wrong_secret_is_401(xks: Xks, key_id: str) -> None:
    wrong = Credential(xks.credential.access_key_id, "A" * 48, "x")
    body = {"requestMetadata": _metadata("DescribeKey")}
    _error(xks.post(f"/keys/{key_id}/metadata", body, credential=wrong), 401,
           "AuthenticationFailedException")  # fmt: skip
    _error(xks.server.raw("POST", f"{PATH}/keys/{key_id}/metadata", json.dumps(body).encode()),
           401, "AuthenticationFailedException")  # fmt: skip


def test_a_signature_for_another_service_is_401(xks: Xks, key_id: str) -> None:
    body = json.dumps({"requestMetadata": _metadata("DescribeKey")}).encode()
    route = f"{PATH}/keys/{key_id}/metadata"
    headers = [("Host", xks.server.host), ("Content-Type", "application/json")]
    signed = sign(SignedRequest("POST", route, "", headers, body), xks.credential,
                  region=xks.server.region, service="kms", when=datetime.now(UTC))  # fmt: skip
    _error(xks.server.raw("POST", route, body, dict(signed.headers)), 401,
           "AuthenticationFailedException")  # fmt: skip


def test_unknown_key_is_404(xks: Xks) -> None:
    body = {"requestMetadata": _metadata("DescribeKey")}
    _error(xks.post(f"/keys/{uuid.uuid4()}/metadata", body), 404, "KeyNotFoundException")
    _error(xks.encrypt("no-such-key", b"x", None), 404, "KeyNotFoundException")


def test_unknown_prefix_and_route_are_invalid_uri_path(xks: Xks, key_id: str) -> None:
    body = {"requestMetadata": _metadata("DescribeKey")}
    _error(xks.post(f"/keys/{key_id}/metadata", body, path="/nobody/kms/xks/v1"), 404,
           "InvalidUriPathException")  # fmt: skip
    _error(xks.post(f"/keys/{key_id}/rotate", body), 404, "InvalidUriPathException")


def test_get_is_405(xks: Xks, key_id: str) -> None:
    resp = xks.server.raw("GET", f"{PATH}/keys/{key_id}/metadata")
    _error(resp, 405, "ValidationException")
    assert resp.headers["allow"] == "POST"
    _error(xks.server.raw("GET", f"{PATH}/health"), 405, "ValidationException")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"requestMetadata": {}},
        {"requestMetadata": "text"},
        {"requestMetadata": {"kmsOperation": "Encrypt", "awsPrincipalArn": "a"}},
        b"not json",
        b"[1, 2]",
    ],
)
def test_missing_request_metadata_is_a_validation_error(
    xks: Xks, key_id: str, body: dict[str, Any] | bytes
) -> None:
    _error(xks.post(f"/keys/{key_id}/metadata", body), 400, "ValidationException")
    _error(xks.post("/health", body), 400, "ValidationException")


@pytest.mark.parametrize(
    ("change", "name", "status"),
    [
        ({"plaintext": "***"}, "ValidationException", 400),
        ({"plaintext": None}, "ValidationException", 400),
        ({"encryptionAlgorithm": None}, "ValidationException", 400),
        ({"encryptionAlgorithm": "AES_CBC"}, "UnsupportedOperationException", 501),
        ({"ciphertextDataIntegrityValueAlgorithm": "MD5"}, "ValidationException", 400),
        ({"plaintext": _b64(b"x" * 65_537)}, "UnsupportedOperationException", 501),
    ],
)
def test_malformed_encrypt_requests(
    xks: Xks, key_id: str, change: dict[str, Any], name: str, status: int
) -> None:
    body: dict[str, Any] = {
        "requestMetadata": _metadata("Encrypt", "arn:aws:kms:us-east-1:1:key/k"),
        "plaintext": _b64(b"data"),
        "encryptionAlgorithm": "AES_GCM",
    }
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    _error(xks.post(f"/keys/{key_id}/encrypt", body), status, name)


def test_health_is_a_real_operation(xks: Xks) -> None:
    resp = xks.post("/health", {"requestMetadata": {"kmsRequestId": "h", "kmsOperation": "X"}})
    assert resp.status == 200, resp.body
    health = resp.json()
    assert health["xksProxyFleetSize"] >= 1
    assert health["xksProxyVendor"] == "hsmkms"
    assert isinstance(health["xksProxyModel"], str)
    assert isinstance(health["ekmVendor"], str)
    (fleet,) = health["ekmFleetDetails"]
    assert fleet["healthStatus"] == "ACTIVE"
    assert fleet["id"]
    assert fleet["model"]


def test_every_call_is_audited_without_plaintext(
    server: RunningServer, xks: Xks, key_id: str
) -> None:
    marker = b"plaintext-that-must-not-be-audited"
    body_encrypt = {
        "requestMetadata": {
            **_metadata("Encrypt", f"arn:aws:kms:us-east-1:1:key/{key_id}"),
            "kmsRequestId": "audit-encrypt-1",
            "kmsViaService": "ebs",
        },
        "plaintext": _b64(marker),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": _b64(b"aad-that-must-not-be-audited"),
    }
    sealed = xks.post(f"/keys/{key_id}/encrypt", body_encrypt).json()
    tag = bytearray(base64.b64decode(sealed["authenticationTag"]))
    tag[3] ^= 0x10
    bad = {
        "requestMetadata": {**_metadata("Decrypt", "arn:k"), "kmsRequestId": "audit-decrypt-bad"},
        "encryptionAlgorithm": "AES_GCM",
        **{k: sealed[k] for k in ("ciphertext", "initializationVector", "ciphertextMetadata")},
        "authenticationTag": _b64(bytes(tag)),
    }
    xks.post(f"/keys/{key_id}/decrypt", bad)
    records = [r for r in _audit(server) if r["eventSource"] == "kms-xks-proxy.hsmkms"]
    by_request = {r["requestParameters"].get("kmsRequestId"): r for r in records
                  if r.get("requestParameters")}  # fmt: skip
    encrypt = by_request["audit-encrypt-1"]
    assert encrypt["eventName"] == "Encrypt"
    assert encrypt["userIdentity"]["type"] == "XksProxyCredential"
    assert encrypt["userIdentity"]["accessKeyId"] == xks.credential.access_key_id
    assert encrypt["requestParameters"]["awsPrincipalArn"] == (
        "arn:aws:iam::123456789012:user/xks-test"
    )
    assert encrypt["requestParameters"]["externalKeyId"] == key_id
    assert encrypt["requestParameters"]["kmsViaService"] == "ebs"
    assert encrypt["additionalEventData"]["keyVersion"] == 1
    assert encrypt["resources"][0]["ARN"].endswith(key_id)
    assert "errorCode" not in encrypt
    failed = by_request["audit-decrypt-bad"]
    assert failed["errorCode"] == "InvalidCiphertextException"
    text = json.dumps(records)
    for secret in (marker, b"aad-that-must-not-be-audited"):
        assert secret.decode() not in text
        assert _b64(secret) not in text
    assert sealed["ciphertext"] not in text
    assert xks.credential.secret not in text
    assert xks.credential.secret not in server.log()
    verify = server.cli("audit", "verify")
    assert verify.returncode == 0, verify.stderr


def test_the_data_directory_holds_no_secret_in_the_clear(
    server: RunningServer, issued: dict[str, str]
) -> None:
    secret = issued["SecretAccessKey"].encode()
    for path in Path(server.data_dir).rglob("*"):
        if path.is_file() and "softhsm" not in str(path).lower():
            assert secret not in path.read_bytes(), path


def test_an_older_copy_of_the_database_does_not_bring_a_deleted_credential_back(
    tmp_path: Path,
) -> None:
    """The token anchors the XKS credential set: a deleted credential put back with an older
    copy of the database is not accepted, no change is built on that copy, and ``hsmkms xks
    credentials trust`` (audited) vouches for it."""
    data_dir = tmp_path / "data"
    assert run_cli("init", "--data-dir", str(data_dir)).returncode == 0
    made = run_cli("xks", "credentials", "create", "--prefix", "p", "--json",
                   "--data-dir", str(data_dir))  # fmt: skip
    assert made.returncode == 0, made.stderr
    issued = json.loads(made.stdout)
    db = data_dir / "hsmkms.db"
    if not db.exists():
        pytest.skip("the data directory's database is not a SQLite file in this run")
    old_copy = tmp_path / "old.db"
    shutil.copy(db, old_copy)
    gone = run_cli(
        "xks", "credentials", "delete", issued["AccessKeyId"], "--data-dir", str(data_dir)
    )
    assert gone.returncode == 0, gone.stderr
    shutil.copy(old_copy, db)
    health = {"requestMetadata": {"kmsRequestId": "r", "kmsOperation": "KmsHealthCheck"}}
    credential = Credential(issued["AccessKeyId"], issued["SecretAccessKey"], "x")
    with running_server(data_dir) as server:
        client = Xks(server, credential)
        _error(client.post("/health", health, path="/p/kms/xks/v1"), 401,
               "AuthenticationFailedException")  # fmt: skip
        assert "xks_credentials_stale" in server.log()
        refused = server.cli("xks", "credentials", "create", "--prefix", "q")
        assert refused.returncode == 1
        assert "hsmkms xks credentials trust" in refused.stderr
        assert refused.stderr.splitlines()[-1].startswith("hsmkms xks: the XKS credentials")
        assert "Traceback" not in refused.stderr
        trusted = server.cli("xks", "credentials", "trust", "--json")
        assert trusted.returncode == 0, trusted.stderr
        assert json.loads(trusted.stdout) == {"AccessKeys": 1}
        assert client.post("/health", health, path="/p/kms/xks/v1").status == 200
        records = [r for r in _audit(server) if r["eventName"] == "TrustXksCredentials"]
        assert [r["responseElements"] for r in records] == [{"accessKeys": 1}]


# -- secondary authorization -------------------------------------------------------------------

APP_ROLE = "arn:aws:iam::111122223333:role/app"


def test_a_prefix_policy_decides_each_request_by_its_request_metadata(
    server: RunningServer, key_id: str, tmp_path: Path
) -> None:
    """``hsmkms xks policy put``: a key policy's form decided against requestMetadata
    (kms:<kmsOperation> by awsPrincipalArn on kmsKeyArn, conditions on kms:ViaService...);
    refused requests are 403 AccessDeniedException and audited; health is exempt; delete
    serves everything again; the changes are audited."""
    prefix = "guarded"
    path = f"/{prefix}/kms/xks/v1"
    made = json.loads(
        server.cli("xks", "credentials", "create", "--prefix", prefix, "--json").stdout
    )
    client = Xks(server, Credential(made["AccessKeyId"], made["SecretAccessKey"], "x"))
    key_arn = f"arn:aws:kms:us-east-1:111122223333:key/{key_id}"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AppThroughEbs",
                "Effect": "Allow",
                "Principal": {"AWS": APP_ROLE},
                "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"],
                "Resource": key_arn,
                "Condition": {"StringEquals": {"kms:ViaService": "ec2.us-east-1.amazonaws.com"}},
            },
            {
                "Sid": "AccountDescribes",
                "Effect": "Allow",
                "Principal": {"AWS": "111122223333"},
                "Action": ["kms:DescribeKey", "kms:CreateKey"],
                "Resource": "*",
            },
        ],
    }
    policy_file = tmp_path / "xks-policy.json"
    policy_file.write_text(json.dumps(policy))
    put = server.cli("xks", "policy", "put", "--prefix", prefix, "--policy-file", str(policy_file))
    assert put.returncode == 0, put.stderr
    shown = server.cli("xks", "policy", "get", "--prefix", prefix)
    assert json.loads(shown.stdout) == policy
    as_json = json.loads(server.cli("xks", "policy", "get", "--prefix", prefix, "--json").stdout)
    assert as_json["UriPath"] == path
    assert json.loads(as_json["Policy"]) == policy

    def encrypt(principal: str, operation: str, via: str | None, arn: str = key_arn) -> Response:
        metadata = {"awsPrincipalArn": principal, "kmsOperation": operation,
                    "kmsRequestId": str(uuid.uuid4()), "kmsKeyArn": arn}  # fmt: skip
        if via is not None:
            metadata["kmsViaService"] = via
        body = {
            "requestMetadata": metadata,
            "plaintext": _b64(b"x"),
            "encryptionAlgorithm": "AES_GCM",
        }
        return client.post(f"/keys/{key_id}/encrypt", body, path=path)

    ebs = "ec2.us-east-1.amazonaws.com"
    assert encrypt(APP_ROLE, "GenerateDataKeyWithoutPlaintext", ebs).status == 200
    assert encrypt(APP_ROLE, "Encrypt", ebs).status == 200
    _error(encrypt(APP_ROLE, "Encrypt", None), 403, "AccessDeniedException")  # no ViaService
    _error(
        encrypt(APP_ROLE, "Encrypt", "rds.us-east-1.amazonaws.com"), 403, "AccessDeniedException"
    )
    _error(encrypt("arn:aws:iam::111122223333:role/other", "Encrypt", ebs), 403,
           "AccessDeniedException")  # fmt: skip
    _error(encrypt(APP_ROLE, "ReEncrypt", ebs), 403, "AccessDeniedException")
    _error(encrypt(APP_ROLE, "Encrypt", ebs, arn=key_arn + "0"), 403, "AccessDeniedException")
    ops = "arn:aws:iam::111122223333:user/ops"
    describe = {
        "requestMetadata": {
            "awsPrincipalArn": ops,
            "kmsOperation": "DescribeKey",
            "kmsRequestId": "d",
        }
    }
    assert client.post(f"/keys/{key_id}/metadata", describe, path=path).status == 200
    other_account = "arn:aws:iam::999999999999:root"
    stranger = {
        "requestMetadata": {**describe["requestMetadata"], "awsPrincipalArn": other_account}
    }
    _error(client.post(f"/keys/{key_id}/metadata", stranger, path=path), 403,
           "AccessDeniedException")  # fmt: skip
    health = {"requestMetadata": {"kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck"}}
    assert client.post("/health", health, path=path).status == 200  # exempt

    gone = server.cli("xks", "policy", "delete", "--prefix", prefix)
    assert gone.returncode == 0, gone.stderr
    assert encrypt("arn:aws:iam::111122223333:role/other", "Encrypt", None).status == 200
    again = server.cli("xks", "policy", "delete", "--prefix", prefix)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1
    assert server.cli("xks", "policy", "get", "--prefix", prefix).returncode == 1

    records = [r for r in _audit(server) if r["eventSource"] == "kms-xks-proxy.hsmkms"]
    assert [r["eventName"] for r in records if r["eventName"].endswith("XksPolicy")][-3:] == [
        "PutXksPolicy",
        "DeleteXksPolicy",
        "DeleteXksPolicy",
    ]
    denied = [r for r in records if r.get("errorCode") == "AccessDeniedException"]
    assert len(denied) >= 6
    assert all(r["userIdentity"]["accessKeyId"] == made["AccessKeyId"] for r in denied)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "not valid JSON"),
        ('{"Statement": []}', "non-empty list"),
        (
            '{"Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]}',
            "has no Principal",
        ),
    ],
)
def test_a_bad_policy_file_is_a_one_line_usage_error(
    server: RunningServer, tmp_path: Path, content: str, problem: str
) -> None:
    policy_file = tmp_path / "bad.json"
    policy_file.write_text(content)
    proc = server.cli(
        "xks", "policy", "put", "--prefix", "guarded", "--policy-file", str(policy_file)
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "bad.json" in proc.stderr
    assert problem in proc.stderr
    missing = server.cli("xks", "policy", "put", "--prefix", "guarded", "--policy-file",
                         str(tmp_path / "absent.json"))  # fmt: skip
    assert missing.returncode == 2
    assert "cannot read policy file" in missing.stderr
