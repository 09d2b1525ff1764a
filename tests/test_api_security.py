"""Regression tests of issue 14's security defects, each through the real server with real
clients: encryption contexts whose keys differ only in case, alias ARNs authorized beside the
key, bounded encryption contexts and audit records, unauthenticated floods, IPv4 clients of a
server on ``::``, unsigned ``X-Amz-*`` headers and replays. The pure rules behind them are unit
tested in tests/test_encryption_context_rules.py, tests/test_sigv4.py and
tests/test_policy_*.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.hsm]

ACCOUNT = "111122223333"
ENV = {"HSMKMS_ACCOUNT_ID": ACCOUNT}


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    arn: str
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    kms: Any


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(actions: str | list[str], resource: str | list[str] = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": resource, **extra}


def client_error(code: str, call: Callable[..., Any], **kwargs: Any) -> str:
    """``call(**kwargs)`` fails with botocore's ClientError ``code`` (HTTP 400); its message."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message: str = error.get("Message", "")
    return message


def make_user(
    server: RunningServer, folder: Path, name: str, identity_policy: str | None = None
) -> User:
    args = ["credentials", "create", "--name", name, "--json"]
    if identity_policy is not None:
        path = folder / f"{name}.json"
        path.write_text(identity_policy)
        args += ["--policy-file", str(path)]
    proc = server.cli(*args, env=ENV)
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    kms = server.client(made["AccessKeyId"], made["SecretAccessKey"])
    return User(name, made["Arn"], made["AccessKeyId"], made["SecretAccessKey"], kms)


def audit_records(server: RunningServer) -> list[dict[str, Any]]:
    """Every record of the server's trail so far (after its writers flushed: read until the
    request ids asked for appear, see :func:`record_of`)."""
    with sqlite3.connect(server.data_dir / "audit.db") as db:
        rows = db.execute("SELECT record FROM audit_records ORDER BY seq").fetchall()
    return [json.loads(bytes(r[0])) for r in rows]


def record_of(server: RunningServer, request_id: str) -> dict[str, Any]:
    """The audit record of one request (waiting up to a few seconds for the writer)."""
    import time

    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(server.data_dir / "audit.db") as db:
            rows = db.execute(
                "SELECT record FROM audit_records WHERE CAST(record AS TEXT) LIKE ?", (f'%"{request_id}"%',)
            ).fetchall()
        for (raw,) in rows:
            record: dict[str, Any] = json.loads(bytes(raw))
            if record.get("requestID") == request_id:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit record of request {request_id}")
        time.sleep(0.05)


# == fixtures ====================================================================================


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("security") / "data", env=ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def root(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policies")


@pytest.fixture(scope="module")
def key(root: Any) -> str:
    arn: str = root.create_key(Description="security tests")["KeyMetadata"]["Arn"]
    return arn


# == 2. encryption context keys that differ only in case =========================================


@pytest.fixture(scope="module")
def tenant_a(server: RunningServer, folder: Path) -> User:
    """A user whose identity policy allows Encrypt only with ``tenant = A``."""
    return make_user(
        server,
        folder,
        "tenant-a",
        policy(
            allow(
                ["kms:Encrypt", "kms:GenerateDataKey"],
                Condition={"StringEquals": {"kms:EncryptionContext:tenant": "A"}},
            )
        ),
    )


def test_a_context_with_case_variant_keys_cannot_pass_a_tenant_condition(
    tenant_a: User, key: str
) -> None:
    """The defect: ``{"tenant": "B", "Tenant": "A"}`` satisfied ``tenant = A`` (the two values
    were merged). Now the request is refused before any policy is asked; tenant A still works,
    and tenant B, in either spelling, is denied."""
    kms = tenant_a.kms
    message = client_error(
        "ValidationException",
        kms.encrypt,
        KeyId=key,
        Plaintext=b"data of tenant B",
        EncryptionContext={"tenant": "B", "Tenant": "A"},
    )
    assert message == (
        "1 validation error detected: Value at 'encryptionContext' failed to satisfy "
        "constraint: Member must not have keys that differ only in case ('tenant' and 'Tenant')"
    )
    kms.encrypt(KeyId=key, Plaintext=b"ok", EncryptionContext={"tenant": "A"})
    kms.encrypt(KeyId=key, Plaintext=b"ok", EncryptionContext={"TENANT": "A"})
    for spelling in ("tenant", "Tenant"):
        client_error(
            "AccessDeniedException",
            kms.encrypt,
            KeyId=key,
            Plaintext=b"x",
            EncryptionContext={spelling: "B"},
        )


def test_a_deny_with_string_not_equals_cannot_be_bypassed(
    server: RunningServer, root: Any
) -> None:
    """A key policy denying every context but ``tenant = A`` (StringNotEquals) holds against
    the case-variant pair too: the request is refused as invalid."""
    deny_policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "kms:Encrypt",
                    "Resource": "*",
                    "Condition": {"StringNotEquals": {"kms:EncryptionContext:tenant": "A"}},
                },
            ],
        }
    )
    arn = root.create_key(Policy=deny_policy)["KeyMetadata"]["Arn"]
    root.encrypt(KeyId=arn, Plaintext=b"x", EncryptionContext={"tenant": "A"})
    client_error(
        "AccessDeniedException", root.encrypt, KeyId=arn, Plaintext=b"x",
        EncryptionContext={"tenant": "B"},
    )  # fmt: skip
    client_error(
        "ValidationException", root.encrypt, KeyId=arn, Plaintext=b"x",
        EncryptionContext={"tenant": "A", "Tenant": "B"},
    )  # fmt: skip


def test_every_operation_taking_a_context_refuses_case_variant_keys(root: Any, key: str) -> None:
    bad = {"Dept": "1", "dept": "2"}
    blob = root.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"Dept": "1"})[
        "CiphertextBlob"
    ]
    calls: list[tuple[Callable[..., Any], dict[str, Any], str]] = [
        (root.encrypt, {"KeyId": key, "Plaintext": b"x", "EncryptionContext": bad}, "encryptionContext"),
        (root.decrypt, {"CiphertextBlob": blob, "EncryptionContext": bad}, "encryptionContext"),
        (
            root.re_encrypt,
            {"CiphertextBlob": blob, "DestinationKeyId": key, "SourceEncryptionContext": bad},
            "sourceEncryptionContext",
        ),
        (
            root.re_encrypt,
            {
                "CiphertextBlob": blob,
                "DestinationKeyId": key,
                "SourceEncryptionContext": {"Dept": "1"},
                "DestinationEncryptionContext": bad,
            },
            "destinationEncryptionContext",
        ),
        (root.generate_data_key, {"KeyId": key, "KeySpec": "AES_256", "EncryptionContext": bad}, "encryptionContext"),
        (
            root.generate_data_key_without_plaintext,
            {"KeyId": key, "KeySpec": "AES_256", "EncryptionContext": bad},
            "encryptionContext",
        ),
        (
            root.create_grant,
            {
                "KeyId": key,
                "GranteePrincipal": f"arn:aws:iam::{ACCOUNT}:user/someone",
                "Operations": ["Decrypt"],
                "Constraints": {"EncryptionContextSubset": bad},
            },
            "constraints.encryptionContextSubset",
        ),
        (
            root.create_grant,
            {
                "KeyId": key,
                "GranteePrincipal": f"arn:aws:iam::{ACCOUNT}:user/someone",
                "Operations": ["Decrypt"],
                "Constraints": {"EncryptionContextEquals": bad},
            },
            "constraints.encryptionContextEquals",
        ),
    ]  # fmt: skip
    for call, kwargs, path in calls:
        message = client_error("ValidationException", call, **kwargs)
        assert f"Value at '{path}' failed to satisfy constraint: Member must not have keys" in (
            message
        ), (call, message)
    # The valid context still decrypts.
    assert root.decrypt(CiphertextBlob=blob, EncryptionContext={"Dept": "1"})["Plaintext"] == b"x"


# == 4. bounded encryption contexts and audit records ==============================================


@pytest.fixture(scope="module")
def nobody(server: RunningServer, folder: Path) -> User:
    """A user without an identity policy: denied everything on keys with the default policy."""
    return make_user(server, folder, "nobody")


def test_a_megabyte_context_is_refused_and_its_record_stays_small(
    server: RunningServer, key: str
) -> None:
    """A 1 MiB body holding one encryption context (escaped six-fold by canonical JSON, it made
    a record of several MB) is refused as too large; its record keeps the request's other
    members and at most 64 KiB of requestParameters."""
    context = {"k": "\x01" * 170_000}  # ~1 MiB of JSON (\\u0001 each)
    body = {"KeyId": key, "Plaintext": base64.b64encode(b"x").decode(), "EncryptionContext": context}
    resp = server.signed("TrentService.Encrypt", body)
    assert resp.status == 400, resp.body[:300]
    error = resp.json()
    assert error["__type"] == "ValidationException"
    assert "Member must have an encoded length less than or equal to 8192 bytes" in (
        error["message"]
    )
    assert len(resp.body) < 1000
    record = record_of(server, resp.headers["x-amzn-requestid"])
    assert record["errorCode"] == "ValidationException"
    assert record["requestParameters"]["keyId"] == key
    assert record["requestParameters"]["encryptionContext"].startswith("[omitted: ")
    assert len(json.dumps(record)) < 70_000


def test_a_denied_request_with_the_largest_context_makes_a_bounded_record(
    server: RunningServer, nobody: User, key: str
) -> None:
    """At the limit (8,192 bytes of control characters) a denied request is recorded with its
    context in full — a record of tens of KB, not MB."""
    context = {"k": "\x01" * (8192 - 7)}
    with pytest.raises(botocore.exceptions.ClientError) as info:
        nobody.kms.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=context)
    response = info.value.response
    assert response["Error"]["Code"] == "AccessDeniedException"
    record = record_of(server, response["ResponseMetadata"]["RequestId"])
    assert record["requestParameters"]["encryptionContext"] == context
    assert len(json.dumps(record)) < 60_000
