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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
import cli_process
import pytest
from server import RunningServer, running_server

from hsmkms.sigv4 import SignedRequest, sign

pytestmark = [pytest.mark.server, pytest.mark.hsm]

ACCOUNT = "111122223333"
# Replays are refused only when the operator turns it on (the AWS SDKs sign two identical calls
# made within one second identically).
ENV = {"HSMKMS_ACCOUNT_ID": ACCOUNT, "HSMKMS_REFUSE_REPLAYS": "1"}


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    arn: str
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    kms: Any


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(
    actions: str | list[str], resource: str | list[str] = "*", **extra: Any
) -> dict[str, Any]:
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
                "SELECT record FROM audit_records WHERE CAST(record AS TEXT) LIKE ?",
                (f'%"{request_id}"%',),
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


def test_a_deny_with_string_not_equals_cannot_be_bypassed(server: RunningServer, root: Any) -> None:
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
        (
            root.encrypt,
            {"KeyId": key, "Plaintext": b"x", "EncryptionContext": bad},
            "encryptionContext",
        ),
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
        (
            root.generate_data_key,
            {"KeyId": key, "KeySpec": "AES_256", "EncryptionContext": bad},
            "encryptionContext",
        ),
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
    ]
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
    body = {
        "KeyId": key,
        "Plaintext": base64.b64encode(b"x").decode(),
        "EncryptionContext": context,
    }
    resp = server.signed("TrentService.Encrypt", body)
    assert resp.status == 400, resp.body[:300]
    error = resp.json()
    assert error["__type"] == "ValidationException"
    assert (
        "Member must have an encoded length less than or equal to 8192 bytes" in (error["message"])
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


# == 7. signed headers and replays =================================================================


def _signed_request(
    server: RunningServer, target: str, body: dict[str, Any], *, later: bool = False
) -> tuple[bytes, dict[str, str]]:
    """A signed request (root credentials); ``later``: dated a second ahead, so its signature
    differs from one signed now."""
    data = json.dumps(body).encode()
    base = [
        ("Host", server.host),
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", f"TrentService.{target}"),
    ]
    when = datetime.now(UTC) + timedelta(seconds=1 if later else 0)
    signed = sign(
        SignedRequest("POST", "/", "", base, data), server.root, region=server.region, when=when
    )
    return data, dict(signed.headers)


def _sign_without_target(
    server: RunningServer, body: dict[str, Any], target: str
) -> tuple[bytes, dict[str, str]]:
    """A request signed without an X-Amz-Target header, which is then added: the target is
    unsigned (what an on-path attacker could change)."""
    data = json.dumps(body).encode()
    base = [("Host", server.host), ("Content-Type", "application/x-amz-json-1.1")]
    signed = sign(
        SignedRequest("POST", "/", "", base, data),
        server.root,
        region=server.region,
        when=datetime.now(UTC),
    )
    headers = dict(signed.headers)
    headers["X-Amz-Target"] = target
    return data, headers


def test_an_unsigned_target_cannot_turn_describe_key_into_schedule_key_deletion(
    server: RunningServer, root: Any
) -> None:
    """The defect: with X-Amz-Target unsigned, a signed DescribeKey could be sent on as
    ScheduleKeyDeletion. Now the request is refused and the key is untouched."""
    arn = root.create_key()["KeyMetadata"]["Arn"]
    data, headers = _sign_without_target(server, {"KeyId": arn}, "TrentService.ScheduleKeyDeletion")
    resp = server.raw("POST", "/", data, headers)
    assert resp.status == 400
    assert resp.json() == {
        "__type": "InvalidSignatureException",
        "message": "'X-Amz-Target' must be a 'SignedHeader' in the AWS Authorization.",
    }
    assert root.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"


def test_a_captured_state_change_cannot_be_replayed_to_undo_a_later_one(
    server: RunningServer, root: Any
) -> None:
    """The replay the issue describes: an administrator disables a key (the request is
    captured), then enables it again; the captured DisableKey sent again within its five
    minutes is refused, and the key stays enabled. Signed anew, the same change is a new
    request."""
    arn = root.create_key()["KeyMetadata"]["Arn"]
    data, headers = _signed_request(server, "DisableKey", {"KeyId": arn})
    assert server.raw("POST", "/", data, headers).status == 200
    root.enable_key(KeyId=arn)
    again = server.raw("POST", "/", data, headers)
    assert again.status == 400
    assert again.json() == {
        "__type": "InvalidSignatureException",
        "message": "This request was received before: a request that changes state is "
        "accepted once per signature. Sign it again to repeat it.",
    }
    assert root.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"
    data, headers = _signed_request(server, "DisableKey", {"KeyId": arn}, later=True)
    assert server.raw("POST", "/", data, headers).status == 200
    assert root.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Disabled"


def test_create_key_may_be_sent_again(server: RunningServer, root: Any) -> None:
    """CreateKey is the exception: two keys created with the same parameters within one second
    are the same signed request (boto3 signs none of its per-call headers). A replay adds an
    unused key and changes nothing that exists, so it is accepted."""
    data, headers = _signed_request(server, "CreateKey", {"Description": "twice"})
    before = len(root.list_keys(Limit=1000)["Keys"])
    assert server.raw("POST", "/", data, headers).status == 200
    assert server.raw("POST", "/", data, headers).status == 200
    assert len(root.list_keys(Limit=1000)["Keys"]) == before + 2


def test_a_read_only_request_may_be_sent_again(server: RunningServer, key: str) -> None:
    """Encrypt, Decrypt, DescribeKey... change nothing: the same signed request works twice."""
    body = {"KeyId": key, "Plaintext": base64.b64encode(b"twice").decode()}
    data = json.dumps(body).encode()
    base = [
        ("Host", server.host),
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", "TrentService.Encrypt"),
    ]
    signed = sign(
        SignedRequest("POST", "/", "", base, data),
        server.root,
        region=server.region,
        when=datetime.now(UTC),
    )
    for _ in range(2):
        assert server.raw("POST", "/", data, dict(signed.headers)).status == 200


# == 6. a server on "::" and its IPv4 clients; replays across workers ==============================


@pytest.fixture(scope="module")
def dual_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Two workers listening on ``::`` (IPv6 and IPv4-mapped), reached over IPv4 at
    127.0.0.1."""
    data_dir = tmp_path_factory.mktemp("dual") / "data"
    with running_server(data_dir, workers=2, args=["--host", "::"], env=ENV) as srv:
        port = srv.endpoint.rsplit(":", 1)[1]
        yield dataclasses.replace(srv, endpoint=f"http://127.0.0.1:{port}")


def test_an_ipv4_deny_list_holds_on_a_server_listening_on_ipv6(
    dual_stack: RunningServer, tmp_path: Path
) -> None:
    """The defect: on ``--host ::`` an IPv4 client's address was ``::ffff:127.0.0.1``, which no
    IPv4 ``aws:SourceIp`` condition matches: a deny list failed open. Now the address is
    ``127.0.0.1`` for the policy and in the audit record."""
    root = dual_stack.client()
    key = root.create_key()["KeyMetadata"]["Arn"]
    user = make_user(
        dual_stack,
        tmp_path,
        "denylisted",
        policy(
            allow("kms:*"),
            {
                "Effect": "Deny",
                "Action": "kms:*",
                "Resource": "*",
                "Condition": {"IpAddress": {"aws:SourceIp": "127.0.0.0/8"}},
            },
        ),
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        user.kms.encrypt(KeyId=key, Plaintext=b"x")
    response = info.value.response
    assert response["Error"]["Code"] == "AccessDeniedException"
    assert "with an explicit deny in an identity-based policy" in response["Error"]["Message"]
    record = record_of(dual_stack, response["ResponseMetadata"]["RequestId"])
    assert record["sourceIPAddress"] == "127.0.0.1"
    # An allow list on the same range lets the IPv4 client in.
    allowed = make_user(
        dual_stack,
        tmp_path,
        "allowlisted",
        policy(allow("kms:Encrypt", Condition={"IpAddress": {"aws:SourceIp": "127.0.0.1/32"}})),
    )
    allowed.kms.encrypt(KeyId=key, Plaintext=b"x")
    # An unauthenticated request's record also shows the IPv4 address.
    resp = dual_stack.raw("POST", "/", b"{}", {"X-Amz-Target": "TrentService.ListKeys"})
    assert resp.status == 400
    assert record_of(dual_stack, resp.headers["x-amzn-requestid"])["sourceIPAddress"] == (
        "127.0.0.1"
    )


def test_ipv6_clients_keep_their_address(dual_stack: RunningServer) -> None:
    port = dual_stack.endpoint.rsplit(":", 1)[1]
    v6 = dataclasses.replace(dual_stack, endpoint=f"http://[::1]:{port}")
    resp = v6.signed("TrentService.ListKeys", {})
    assert resp.status == 200
    assert record_of(v6, resp.headers["x-amzn-requestid"])["sourceIPAddress"] == "::1"


def test_a_replay_is_refused_by_every_worker(dual_stack: RunningServer) -> None:
    """The signatures are shared by the workers of the node: whichever worker a replayed
    TagResource reaches refuses it."""
    key = dual_stack.client().create_key()["KeyMetadata"]["Arn"]
    tags = {"KeyId": key, "Tags": [{"TagKey": "once", "TagValue": "1"}]}
    data, headers = _signed_request(dual_stack, "TagResource", tags)
    answers: dict[str, list[int]] = {}
    for _ in range(60):
        resp = dual_stack.raw("POST", "/", data, headers)
        answers.setdefault(resp.headers["x-hsmkms-worker"], []).append(resp.status)
        if len(answers) == 2 and sum(len(v) for v in answers.values()) >= 4:
            break
    statuses = [s for v in answers.values() for s in v]
    assert statuses.count(200) == 1, answers
    assert set(statuses) == {200, 400}
    assert len(answers) == 2, "the kernel sent every connection to one worker"
    assert all(400 in v for v in answers.values() if v != [200])


# == 5. a flood of unauthenticated requests ========================================================


def test_a_flood_of_unauthenticated_requests_is_counted_not_recorded_one_by_one(
    tmp_path: Path,
) -> None:
    """300 requests with a bad signature leave a handful of records whose counts add up to 300
    (one full record, then summaries per interval), instead of 300 records of ~1.5 KB; the
    requests still get their error. Requests counted in the interval running at shutdown are
    summarized then."""
    env = {**ENV, "HSMKMS_UNAUTHENTICATED_AUDIT_INTERVAL": "1"}
    with running_server(tmp_path / "data", env=env) as srv:
        wrong = dataclasses.replace(srv, secret_access_key="wrong-secret-0123456789abcdefghijkl")
        for _ in range(300):
            resp = wrong.signed("TrentService.ListKeys", {}, credential=wrong.root)
            assert resp.status == 400
            assert resp.json()["__type"] == "InvalidSignatureException"

        def unauthenticated() -> tuple[int, int, list[dict[str, Any]]]:
            records = [r for r in audit_records(srv) if r["userIdentity"].get("type") == "Unknown"]
            full = [r for r in records if r["eventName"] != "UnauthenticatedRequests"]
            summaries = [r for r in records if r["eventName"] == "UnauthenticatedRequests"]
            counted = sum(r["additionalEventData"]["requestCount"] for r in summaries)
            return len(full), counted, summaries

        import time

        deadline = time.monotonic() + 20
        while True:
            full, counted, summaries = unauthenticated()
            if full + counted == 300 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert full + counted == 300
        assert 1 <= full <= len(summaries) + 1
        for summary in summaries:
            assert summary["sourceIPAddress"] == "127.0.0.1"
            codes = summary["additionalEventData"]["errorCodes"]
            assert (
                codes
                == f"InvalidSignatureException:{summary['additionalEventData']['requestCount']}"
            )
        records_before_stop = len(audit_records(srv))
        assert records_before_stop < 60
        # Counted now, written at shutdown.
        for _ in range(20):
            srv.raw("POST", "/", b"{}", {"X-Amz-Target": "TrentService.ListKeys"})
    full, counted, summaries = unauthenticated()
    assert full + counted == 320
    assert any(
        "MissingAuthenticationTokenException" in s["additionalEventData"]["errorCodes"]
        for s in summaries
    )
    proc = srv.cli("audit", "verify")
    assert proc.returncode == 0, proc.stderr


# == 3. alias operations authorize the alias too ===================================================


def _alias_arn(name: str) -> str:
    return f"arn:aws:kms:us-east-1:{ACCOUNT}:alias/{name}"


def test_create_alias_on_a_key_does_not_give_every_alias_name(
    server: RunningServer, root: Any, folder: Path
) -> None:
    """The defect: a user allowed kms:CreateAlias on its key could take any alias name
    (``alias/prod-payments``) and so satisfy others' ``kms:ResourceAliases`` conditions. Now
    the alias ARN is decided by the user's identity policy too."""
    own = root.create_key(Description="team A")["KeyMetadata"]["Arn"]
    team = make_user(
        server,
        folder,
        "team-a-admin",
        policy(
            allow(["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias"], own),
            allow(
                ["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias"], _alias_arn("team-a-*")
            ),
            allow(
                "kms:GenerateDataKey",
                Condition={
                    "ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/prod-payments"}
                },
            ),
        ),
    )
    team.kms.create_alias(AliasName="alias/team-a-app", TargetKeyId=own)
    message = client_error(
        "AccessDeniedException",
        team.kms.create_alias,
        AliasName="alias/prod-payments",
        TargetKeyId=own,
    )
    assert message == (
        f"User: {team.arn} is not authorized to perform: kms:CreateAlias on resource: "
        f"{_alias_arn('prod-payments')} because no identity-based policy allows the "
        "kms:CreateAlias action"
    )
    names = [a["AliasName"] for a in root.list_aliases(KeyId=own)["Aliases"]]
    assert names == ["alias/team-a-app"]
    # So the condition keyed on that alias stays unmet.
    client_error("AccessDeniedException", team.kms.generate_data_key, KeyId=own, KeySpec="AES_256")
    # Renaming is bound the same way: the team's alias cannot be moved onto another name's key
    # it does not own, nor another team's alias deleted.
    other = root.create_key()["KeyMetadata"]["Arn"]
    root.create_alias(AliasName="alias/team-b-app", TargetKeyId=other)
    client_error(
        "AccessDeniedException", team.kms.update_alias, AliasName="alias/team-a-app",
        TargetKeyId=other,
    )  # fmt: skip
    client_error("AccessDeniedException", team.kms.delete_alias, AliasName="alias/team-b-app")
    team.kms.delete_alias(AliasName="alias/team-a-app")


# == a weak root secret ============================================================================


def test_a_short_root_secret_stops_the_server_unless_allowed(tmp_path: Path) -> None:
    """``HSMKMS_ROOT_SECRET_ACCESS_KEY=test`` refuses to start with one line naming the rule;
    with ``HSMKMS_ALLOW_WEAK_ROOT_SECRET=1`` the server runs (boto3 signs with test/test) and
    says so in its log and in every /healthz answer."""
    import sys

    from server import clean_env

    weak = {"HSMKMS_ROOT_ACCESS_KEY_ID": "test", "HSMKMS_ROOT_SECRET_ACCESS_KEY": "test"}
    refused = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "refused")],
        env=clean_env(**weak), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "HSMKMS_ROOT_SECRET_ACCESS_KEY is shorter than 20 characters" in refused.stderr
    assert "HSMKMS_ALLOW_WEAK_ROOT_SECRET=1" in refused.stderr
    assert "Traceback" not in refused.stderr
    env = {**weak, "HSMKMS_ALLOW_WEAK_ROOT_SECRET": "1"}
    with running_server(tmp_path / "allowed", env=env) as srv:
        assert srv.client("test", "test").list_keys()["Keys"] == []
        health = srv.raw("GET", "/healthz")
        assert health.status == 200
        (warning,) = health.json()["warnings"]
        assert "shorter than 20 characters" in warning
    (root_set,) = [r for r in audit_records(srv) if r["eventSource"] == "iam.amazonaws.com"]
    assert root_set["eventName"] == "CreateAccessKey"  # the root set at the start, recorded
    assert root_set["responseElements"]["accessKey"] == {
        "accessKeyId": "test",
        "userName": "root",
        "status": "Active",
    }
    log = srv.log()
    assert '"weak_root_secret"' in log
    assert '"test"' not in log.replace('"access_key_id":"test"', "")


# == credential changes are audited ================================================================


def test_credential_changes_are_recorded_without_secrets(
    server: RunningServer, folder: Path
) -> None:
    """``hsmkms credentials create``, ``set-policy`` (and ``--clear``), ``rotate`` and
    ``delete`` — on the data directory of a running server — each leave a record (as IAM
    records its own), the failed attempts too; no record holds a secret."""
    before = len(audit_records(server))
    user = make_user(server, folder, "audited", policy(allow("kms:Encrypt")))
    path = folder / "audited-2.json"
    path.write_text(policy(allow("kms:Decrypt")))
    assert (
        server.cli("credentials", "set-policy", "audited", "--policy-file", str(path)).returncode
        == 0
    )
    assert server.cli("credentials", "set-policy", user.access_key_id, "--clear").returncode == 0
    rotation = server.cli("credentials", "rotate", "audited", "--json")
    assert rotation.returncode == 0, rotation.stderr
    second = json.loads(rotation.stdout)
    assert server.cli("credentials", "delete", user.access_key_id).returncode == 0
    assert server.cli("credentials", "delete", "audited").returncode == 0
    failed = server.cli("credentials", "delete", "no-such-user")
    assert failed.returncode == 1
    records = [r for r in audit_records(server)[before:] if r["eventSource"] == "iam.amazonaws.com"]
    assert [r["eventName"] for r in records] == [
        "CreateAccessKey",
        "PutUserPolicy",
        "DeleteUserPolicy",
        "CreateAccessKey",
        "DeleteAccessKey",
        "DeleteAccessKey",
        "DeleteAccessKey",
    ]
    created, put, cleared, rotated, deleted, _, refused = records
    for record in records:
        assert record["userIdentity"]["type"] == "LocalOperator"
        assert record["sourceIPAddress"] == "hsmkms-cli"
        assert record["userAgent"].startswith("hsmkms-cli/")
        assert user.secret_access_key not in json.dumps(record)
        assert second["SecretAccessKey"] not in json.dumps(record)
    assert rotated["responseElements"]["accessKey"]["accessKeyId"] == second["AccessKeyId"]
    assert rotated["userAgent"].endswith("(credentials rotate)")
    assert created["requestParameters"] == {
        "userName": "audited",
        "policyDocument": policy(allow("kms:Encrypt")),
    }
    assert created["responseElements"] == {
        "accessKey": {"accessKeyId": user.access_key_id, "userName": "audited", "status": "Active"}
    }
    assert put["requestParameters"]["policyDocument"] == policy(allow("kms:Decrypt"))
    assert cleared["requestParameters"] == {
        "accessKeyId": user.access_key_id,
        "userName": "audited",
    }
    assert deleted["requestParameters"] == {
        "userName": "audited",
        "accessKeyId": user.access_key_id,
    }
    assert "errorCode" not in deleted
    assert refused["requestParameters"] == {"userName": "no-such-user"}
    assert refused["errorCode"] == "NotFoundException"
    assert server.cli("audit", "verify").returncode == 0
