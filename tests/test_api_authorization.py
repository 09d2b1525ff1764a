"""Authorization end to end: key policies, identity policies and grants decide requests made by
real boto3 clients (and the AWS Encryption SDK) against the real server, for the account root
and for users made with ``hsmkms credentials create --name N --policy-file F`` while the server
runs. Every denial is checked for its code and its AWS-worded message as botocore parses them.

The server runs with a non-default account id, so every ARN below is built from it. The
decisions in detail (every condition operator, every action, every grant rule) are tested
without HTTP in tests/test_service_authorization.py and tests/test_policy_*.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import botocore.exceptions
import botocore.session
import pytest
from policy_docs import EXAMPLE_ADMIN, EXAMPLE_ROOT, EXAMPLE_USER, separation_of_duties
from postgres import outside_sql
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "444455556666"
ROOT_ARN = f"arn:aws:iam::{ACCOUNT}:root"
ENV = {"HSMKMS_ACCOUNT_ID": ACCOUNT}


@dataclasses.dataclass(frozen=True)
class User:
    """A credential made by ``hsmkms credentials create`` and a boto3 KMS client signing as it."""

    name: str
    arn: str
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    kms: Any


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)}, indent=2)


def allow(actions: str | list[str], resource: str = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": resource, **extra}


def not_authorized(who: str, action: str, resource: str) -> str:
    return f"User: {who} is not authorized to perform: {action} on resource: {resource}"


def no_identity_allow(who: str, action: str, resource: str) -> str:
    """AWS's message when the key policy delegates and no identity policy allows."""
    return (
        f"{not_authorized(who, action, resource)} because no identity-based policy allows the "
        f"{action} action"
    )


def no_resource_allow(who: str, action: str, resource: str) -> str:
    """AWS's message when the key policy neither allows nor delegates."""
    return (
        f"{not_authorized(who, action, resource)} because no resource-based policy allows the "
        f"{action} action"
    )


def explicit_deny(who: str, action: str, resource: str, where: str = "a resource-based") -> str:
    return f"{not_authorized(who, action, resource)} with an explicit deny in {where} policy"


def client_error(code: str, call: Callable[..., Any], **kwargs: Any) -> str:
    """``call(**kwargs)`` fails with botocore's ClientError of ``code``; its message."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message: str = error.get("Message", "")
    return message


def denied(call: Callable[..., Any], **kwargs: Any) -> str:
    """``call(**kwargs)`` fails with AccessDeniedException; its message."""
    return client_error("AccessDeniedException", call, **kwargs)


# == fixtures ====================================================================================


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("authz") / "data", env=ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def root(server: RunningServer) -> Any:
    """boto3 signing as the account root (``arn:aws:iam::<account>:root``)."""
    return server.client()


@pytest.fixture(scope="module")
def alice_key(root: Any) -> str:
    """The one key alice's identity policy names (by ARN)."""
    arn: str = root.create_key(Description="alice's key")["KeyMetadata"]["Arn"]
    return arn


CAROL_POLICY = policy(
    allow(
        "kms:Encrypt", Sid="FromLoopback", Condition={"IpAddress": {"aws:SourceIp": "127.0.0.1/32"}}
    ),
    allow(
        "kms:Decrypt",
        Sid="FromTheOffice",
        Condition={"IpAddress": {"aws:SourceIp": "203.0.113.0/24"}},
    ),
    allow(
        "kms:GenerateDataKey",
        Sid="PlainHttpIsFine",
        Condition={"Bool": {"aws:SecureTransport": "false"}},
    ),
    allow("kms:DescribeKey", Sid="TlsOnly", Condition={"Bool": {"aws:SecureTransport": "true"}}),
    {
        "Sid": "NoWrappedDataKeysOffSite",
        "Effect": "Deny",
        "Action": "kms:GenerateDataKeyWithoutPlaintext",
        "Resource": "*",
        "Condition": {"NotIpAddress": {"aws:SourceIp": "203.0.113.0/24"}},
    },
    allow("kms:GenerateDataKeyWithoutPlaintext"),
)


@pytest.fixture(scope="module")
def users(
    server: RunningServer, alice_key: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, User]:
    """Every user of the module, made at once through the CLI while the server runs (each
    ``hsmkms credentials create`` is a process of its own, so they run side by side)."""
    policies: dict[str, str | None] = {
        # Encrypt and Decrypt on alice_key only.
        "alice": policy(allow(["kms:Encrypt", "kms:Decrypt"], alice_key, Sid="UseOneKey")),
        "nobody": None,  # no identity policy: nothing unless a key policy or a grant says so
        "carol": CAROL_POLICY,
        "dave": policy(allow("kms:Encrypt")),
        "KeyAdmin": None,
        "KeyUser": None,
    }
    folder = tmp_path_factory.mktemp("policies")

    def create(name: str) -> dict[str, str]:
        args = ["credentials", "create", "--name", name, "--json"]
        text = policies[name]
        if text is not None:
            path = folder / f"{name}.json"
            path.write_text(text)
            args += ["--policy-file", str(path)]
        proc = server.cli(*args, env=ENV)
        assert proc.returncode == 0, proc.stderr
        made: dict[str, str] = json.loads(proc.stdout)
        return made

    with ThreadPoolExecutor(max_workers=len(policies)) as pool:
        created = dict(zip(policies, pool.map(create, policies), strict=True))
    users = {}
    for name, made in created.items():
        assert made["Arn"] == f"arn:aws:iam::{ACCOUNT}:user/{name}"
        # boto3's default session is not thread-safe: clients are made here, one by one.
        kms = server.client(made["AccessKeyId"], made["SecretAccessKey"])
        users[name] = User(name, made["Arn"], made["AccessKeyId"], made["SecretAccessKey"], kms)
    return users


@pytest.fixture(scope="module")
def alice(users: dict[str, User]) -> User:
    return users["alice"]


@pytest.fixture(scope="module")
def nobody(users: dict[str, User]) -> User:
    return users["nobody"]


@pytest.fixture
def key(root: Any) -> str:
    """A fresh key (default key policy) made by the root; its ARN."""
    arn: str = root.create_key()["KeyMetadata"]["Arn"]
    return arn


# == key policies and identity policies ==========================================================


def test_identity_policy_allows_what_it_names(root: Any, alice: User, alice_key: str) -> None:
    """Under the default key policy, alice may Encrypt and Decrypt the key her identity policy
    names, and nothing else."""
    blob = alice.kms.encrypt(KeyId=alice_key, Plaintext=b"for alice")["CiphertextBlob"]
    assert alice.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"for alice"
    assert root.decrypt(CiphertextBlob=blob)["Plaintext"] == b"for alice"

    message = denied(alice.kms.generate_data_key, KeyId=alice_key, KeySpec="AES_256")
    assert message == no_identity_allow(alice.arn, "kms:GenerateDataKey", alice_key)
    other = root.create_key()["KeyMetadata"]["Arn"]
    message = denied(alice.kms.encrypt, KeyId=other, Plaintext=b"x")
    assert message == no_identity_allow(alice.arn, "kms:Encrypt", other)


def test_a_user_without_identity_policy_is_denied_by_default(nobody: User, key: str) -> None:
    """The default key policy delegates to identity policies; nobody has none, so nothing."""
    message = denied(nobody.kms.encrypt, KeyId=key, Plaintext=b"x")
    assert message == (
        f"User: arn:aws:iam::{ACCOUNT}:user/nobody is not authorized to perform: kms:Encrypt on "
        f"resource: {key} because no identity-based policy allows the kms:Encrypt action"
    )
    message = denied(nobody.kms.describe_key, KeyId=key)
    assert message == no_identity_allow(nobody.arn, "kms:DescribeKey", key)
    # Account-level actions name no key: the resource is "*".
    assert denied(nobody.kms.list_keys) == no_identity_allow(nobody.arn, "kms:ListKeys", "*")
    assert denied(nobody.kms.create_key) == no_identity_allow(nobody.arn, "kms:CreateKey", "*")


def test_an_explicit_deny_in_the_key_policy_beats_the_identity_allow(
    root: Any, alice: User, alice_key: str
) -> None:
    """The root puts a Deny for alice's Encrypt on her key: the next request is refused as an
    explicit deny, while Decrypt (not denied) still works; restoring the policy restores it."""
    blob = alice.kms.encrypt(KeyId=alice_key, Plaintext=b"before")["CiphertextBlob"]
    default = root.get_key_policy(KeyId=alice_key, PolicyName="default")["Policy"]
    deny = policy(
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": ROOT_ARN},
            "Action": "kms:*",
            "Resource": "*",
        },
        {
            "Sid": "NoEncryptForAlice",
            "Effect": "Deny",
            "Principal": {"AWS": alice.arn},
            "Action": "kms:Encrypt",
            "Resource": "*",
        },
    )
    root.put_key_policy(KeyId=alice_key, PolicyName="default", Policy=deny)
    try:
        message = denied(alice.kms.encrypt, KeyId=alice_key, Plaintext=b"after")
        assert message == explicit_deny(alice.arn, "kms:Encrypt", alice_key)
        assert alice.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
    finally:
        root.put_key_policy(KeyId=alice_key, PolicyName="default", Policy=default)
    assert alice.kms.encrypt(KeyId=alice_key, Plaintext=b"again")["CiphertextBlob"]


def test_lockout_safety_check(root: Any, alice: User, key: str) -> None:
    """A policy that would lock the caller out of PutKeyPolicy is refused, by PutKeyPolicy and
    by CreateKey, unless BypassPolicyLockoutSafetyCheck; after a bypass the root is out."""
    alice_only = policy(
        {
            "Sid": "AliceEncryptsOnly",
            "Effect": "Allow",
            "Principal": {"AWS": alice.arn},
            "Action": "kms:Encrypt",
            "Resource": "*",
        }
    )
    lockout = "The new key policy will not allow you to update the key policy in the future."
    before = root.get_key_policy(KeyId=key, PolicyName="default")["Policy"]
    put = root.put_key_policy
    message = client_error(
        "MalformedPolicyDocumentException", put, KeyId=key, PolicyName="default", Policy=alice_only
    )
    assert message == lockout
    assert root.get_key_policy(KeyId=key, PolicyName="default")["Policy"] == before
    message = client_error("MalformedPolicyDocumentException", root.create_key, Policy=alice_only)
    assert message == lockout

    put(KeyId=key, PolicyName="default", Policy=alice_only, BypassPolicyLockoutSafetyCheck=True)
    # The policy no longer names the account: the root is refused even its own policy...
    message = denied(root.get_key_policy, KeyId=key, PolicyName="default")
    assert message == no_resource_allow(ROOT_ARN, "kms:GetKeyPolicy", key)
    message = denied(put, KeyId=key, PolicyName="default", Policy=before)
    assert message == no_resource_allow(ROOT_ARN, "kms:PutKeyPolicy", key)
    # ...and alice, named by it, may encrypt though her identity policy names another key.
    assert alice.kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    made = root.create_key(Policy=alice_only, BypassPolicyLockoutSafetyCheck=True)["KeyMetadata"]
    assert made["KeyState"] == "Enabled"


def test_identity_policy_changed_live(
    server: RunningServer, users: dict[str, User], tmp_path: Path, key: str
) -> None:
    """``hsmkms credentials set-policy`` (another process) takes effect on the next request."""
    dave = users["dave"]
    blob = dave.kms.encrypt(KeyId=key, Plaintext=b"dave's")["CiphertextBlob"]
    message = denied(dave.kms.decrypt, CiphertextBlob=blob)
    assert message == no_identity_allow(dave.arn, "kms:Decrypt", key)

    path = tmp_path / "decrypt-only.json"
    path.write_text(policy(allow("kms:Decrypt", key)))
    proc = server.cli("credentials", "set-policy", "dave", "--policy-file", str(path), env=ENV)
    assert proc.returncode == 0, proc.stderr

    assert dave.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"dave's"
    message = denied(dave.kms.encrypt, KeyId=key, Plaintext=b"x")
    assert message == no_identity_allow(dave.arn, "kms:Encrypt", key)


def test_source_ip_and_secure_transport_conditions(users: dict[str, User], key: str) -> None:
    """carol's identity policy: Encrypt from 127.0.0.1/32 (the test's address), Decrypt only
    from 203.0.113.0/24, GenerateDataKey over plain HTTP, DescribeKey only over TLS; a Deny of
    GenerateDataKeyWithoutPlaintext from outside 203.0.113.0/24 beats its Allow."""
    carol = users["carol"]
    blob = carol.kms.encrypt(KeyId=key, Plaintext=b"from loopback")["CiphertextBlob"]
    message = denied(carol.kms.decrypt, CiphertextBlob=blob)
    assert message == no_identity_allow(carol.arn, "kms:Decrypt", key)
    assert len(carol.kms.generate_data_key(KeyId=key, KeySpec="AES_256")["Plaintext"]) == 32
    message = denied(carol.kms.describe_key, KeyId=key)
    assert message == no_identity_allow(carol.arn, "kms:DescribeKey", key)
    message = denied(carol.kms.generate_data_key_without_plaintext, KeyId=key, KeySpec="AES_256")
    assert message == explicit_deny(
        carol.arn, "kms:GenerateDataKeyWithoutPlaintext", key, "an identity-based"
    )


def test_forwarded_headers_do_not_change_source_ip_or_transport(
    users: dict[str, User], key: str
) -> None:
    """aws:SourceIp is the connection's peer and aws:SecureTransport the server's own scheme:
    a client cannot claim another address or TLS with X-Forwarded-For / X-Forwarded-Proto."""
    carol = users["carol"]
    blob = carol.kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]

    def claim(request: Any, **_: Any) -> None:
        request.headers["X-Forwarded-For"] = "203.0.113.7"
        request.headers["X-Forwarded-Proto"] = "https"
        request.headers["Forwarded"] = "for=203.0.113.7;proto=https"

    carol.kms.meta.events.register("before-sign.kms.*", claim)
    try:
        message = denied(carol.kms.decrypt, CiphertextBlob=blob)
        assert message == no_identity_allow(carol.arn, "kms:Decrypt", key)
        message = denied(carol.kms.describe_key, KeyId=key)
        assert message == no_identity_allow(carol.arn, "kms:DescribeKey", key)
    finally:
        carol.kms.meta.events.unregister("before-sign.kms.*", claim)


# == grants ======================================================================================


def test_a_grant_allows_at_once_and_revoking_ends_it(root: Any, nobody: User, key: str) -> None:
    """A grant to a user with no identity policy works from the next request (with or without
    its token), only for its operations; ListGrants shows it; RevokeGrant (a key-policy
    permission, not the grantee's) ends it."""
    assert denied(nobody.kms.encrypt, KeyId=key, Plaintext=b"x") == no_identity_allow(
        nobody.arn, "kms:Encrypt", key
    )
    grant = root.create_grant(
        KeyId=key, GranteePrincipal=nobody.arn, Operations=["Encrypt", "Decrypt"], Name="use-it"
    )
    token = grant["GrantToken"]
    blob = nobody.kms.encrypt(KeyId=key, Plaintext=b"granted", GrantTokens=[token])[
        "CiphertextBlob"
    ]
    assert nobody.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"granted"
    message = denied(nobody.kms.generate_data_key, KeyId=key, KeySpec="AES_256")
    assert message == no_identity_allow(nobody.arn, "kms:GenerateDataKey", key)

    (listed,) = root.list_grants(KeyId=key)["Grants"]
    assert listed["GrantId"] == grant["GrantId"]
    assert listed["KeyId"] == key
    assert listed["Name"] == "use-it"
    assert listed["GranteePrincipal"] == nobody.arn
    assert listed["IssuingAccount"] == ROOT_ARN
    assert sorted(listed["Operations"]) == ["Decrypt", "Encrypt"]
    assert "Constraints" not in listed
    assert "RetiringPrincipal" not in listed

    message = denied(nobody.kms.revoke_grant, KeyId=key, GrantId=grant["GrantId"])
    assert message == no_identity_allow(nobody.arn, "kms:RevokeGrant", key)
    root.revoke_grant(KeyId=key, GrantId=grant["GrantId"])
    assert root.list_grants(KeyId=key)["Grants"] == []
    message = denied(nobody.kms.decrypt, CiphertextBlob=blob, GrantTokens=[token])
    assert message == no_identity_allow(nobody.arn, "kms:Decrypt", key)


def test_who_may_retire_a_grant(root: Any, alice: User, nobody: User, key: str) -> None:
    """RetireGrant: the retiring principal (by token), the grantee when the grant includes
    RetireGrant (by key and grant id), the issuing account's root; not a grantee without it."""
    by_alice = root.create_grant(
        KeyId=key, GranteePrincipal=nobody.arn, RetiringPrincipal=alice.arn, Operations=["Encrypt"]
    )
    by_grantee = root.create_grant(
        KeyId=key, GranteePrincipal=nobody.arn, Operations=["Encrypt", "RetireGrant"]
    )
    by_root = root.create_grant(KeyId=key, GranteePrincipal=nobody.arn, Operations=["Decrypt"])

    message = denied(nobody.kms.retire_grant, GrantToken=by_alice["GrantToken"])
    assert message.startswith(not_authorized(nobody.arn, "kms:RetireGrant", key) + " because ")
    retirable = root.list_retirable_grants(RetiringPrincipal=alice.arn)["Grants"]
    assert [g["GrantId"] for g in retirable] == [by_alice["GrantId"]]
    assert retirable[0]["RetiringPrincipal"] == alice.arn

    alice.kms.retire_grant(GrantToken=by_alice["GrantToken"])
    nobody.kms.retire_grant(KeyId=key, GrantId=by_grantee["GrantId"])
    root.retire_grant(GrantToken=by_root["GrantToken"])
    assert root.list_grants(KeyId=key)["Grants"] == []
    assert root.list_retirable_grants(RetiringPrincipal=alice.arn)["Grants"] == []
    denied(nobody.kms.encrypt, KeyId=key, Plaintext=b"x")


def test_a_grant_constrained_to_one_encryption_context(root: Any, nobody: User, key: str) -> None:
    """EncryptionContextEquals: exactly that context works; another, none or more is denied."""
    grant = root.create_grant(
        KeyId=key,
        GranteePrincipal=nobody.arn,
        Operations=["Encrypt", "Decrypt"],
        Constraints={"EncryptionContextEquals": {"purpose": "payroll"}},
    )
    payroll = {"purpose": "payroll"}
    blob = nobody.kms.encrypt(KeyId=key, Plaintext=b"salaries", EncryptionContext=payroll)[
        "CiphertextBlob"
    ]
    assert nobody.kms.decrypt(CiphertextBlob=blob, EncryptionContext=payroll)["Plaintext"] == (
        b"salaries"
    )
    for context in ({"purpose": "marketing"}, {"purpose": "payroll", "team": "x"}, None):
        extra = {"EncryptionContext": context} if context is not None else {}
        message = denied(nobody.kms.encrypt, KeyId=key, Plaintext=b"x", **extra)
        assert message == no_identity_allow(nobody.arn, "kms:Encrypt", key)
    message = denied(
        nobody.kms.decrypt, CiphertextBlob=blob, EncryptionContext={"purpose": "marketing"}
    )
    assert message == no_identity_allow(nobody.arn, "kms:Decrypt", key)
    (listed,) = root.list_grants(KeyId=key, GrantId=grant["GrantId"])["Grants"]
    assert listed["Constraints"] == {"EncryptionContextEquals": payroll}


def test_a_subset_grant_through_the_encryption_sdk(
    server: RunningServer, root: Any, nobody: User, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AWS Encryption SDK adds its own pair to the encryption context (the signing public
    key), so a grant for it constrains a subset: with that subset the SDK encrypts and decrypts
    (passing the grant token), with another context KMS refuses its GenerateDataKey."""
    esdk = pytest.importorskip("aws_encryption_sdk")
    esdk_errors = pytest.importorskip("aws_encryption_sdk.exceptions")
    grant = root.create_grant(
        KeyId=key,
        GranteePrincipal=nobody.arn,
        Operations=["GenerateDataKey", "Decrypt"],
        Constraints={"EncryptionContextSubset": {"app": "esdk"}},
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", server.endpoint)
    session = botocore.session.Session()
    session.set_credentials(nobody.access_key_id, nobody.secret_access_key)
    provider = esdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[key], botocore_session=session, grant_tokens=[grant["GrantToken"]]
    )
    client = esdk.EncryptionSDKClient(
        commitment_policy=esdk.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    data = b"quarterly report\n" * 4096
    context = {"app": "esdk", "file": "report.txt"}
    ciphertext, header = client.encrypt(
        source=data, key_provider=provider, encryption_context=context
    )
    assert "aws-crypto-public-key" in header.encryption_context
    plaintext, header = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == data
    assert header.encryption_context["app"] == "esdk"

    with pytest.raises(esdk_errors.GenerateKeyError) as info:
        client.encrypt(source=data, key_provider=provider, encryption_context={"app": "other"})
    cause = info.value.__cause__
    assert isinstance(cause, botocore.exceptions.ClientError)
    assert cause.response["Error"]["Code"] == "AccessDeniedException"
    assert cause.response["Error"]["Message"] == no_identity_allow(
        nobody.arn, "kms:GenerateDataKey", key
    )


def test_an_invalid_grant_token_is_refused(root: Any, key: str) -> None:
    """spec: AWS KMS Encrypt — InvalidGrantTokenException when a grant token is not valid (as
    CreateGrant already answers here)."""
    message = client_error(
        "InvalidGrantTokenException", root.encrypt, KeyId=key, Plaintext=b"x", GrantTokens=["bogus"]
    )
    assert message == "The grant token is not valid."


# == the separation-of-duties example of docs/key-policies.md ====================================


class SeparatedKey(NamedTuple):
    arn: str
    policy: str  # exactly the docs' text, its principals replaced by this server's


@pytest.fixture
def separated_key(root: Any, users: dict[str, User]) -> SeparatedKey:
    """A key with the docs' separation-of-duties policy, naming the users KeyAdmin and
    KeyUser and this server's account root, put by the root through PutKeyPolicy."""
    text = separation_of_duties()
    for example, real in (
        (EXAMPLE_ROOT, ROOT_ARN),
        (EXAMPLE_ADMIN, users["KeyAdmin"].arn),
        (EXAMPLE_USER, users["KeyUser"].arn),
    ):
        assert example in text
        text = text.replace(example, real)
    assert "111122223333" not in text
    arn = root.create_key(Description="separation of duties")["KeyMetadata"]["Arn"]
    root.put_key_policy(KeyId=arn, PolicyName="default", Policy=text)
    assert root.get_key_policy(KeyId=arn, PolicyName="default")["Policy"] == text
    return SeparatedKey(arn, text)


def test_separation_of_duties_administrators(
    root: Any, users: dict[str, User], separated_key: SeparatedKey
) -> None:
    """KeyAdmin manages the key (no identity policy needed) but may never use it."""
    admin = users["KeyAdmin"]
    arn = separated_key.arn
    kms = admin.kms
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"
    kms.disable_key(KeyId=arn)
    kms.enable_key(KeyId=arn)
    kms.tag_resource(KeyId=arn, Tags=[{"TagKey": "owner", "TagValue": "security"}])
    kms.put_key_policy(KeyId=arn, PolicyName="default", Policy=separated_key.policy)
    assert kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)["KeyState"] == (
        "PendingDeletion"
    )
    kms.cancel_key_deletion(KeyId=arn)
    kms.enable_key(KeyId=arn)
    assert root.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"

    blob = root.encrypt(KeyId=arn, Plaintext=b"not for admins")["CiphertextBlob"]
    for action, call, kwargs in (
        ("kms:Encrypt", kms.encrypt, {"KeyId": arn, "Plaintext": b"x"}),
        ("kms:Decrypt", kms.decrypt, {"CiphertextBlob": blob}),
        ("kms:GenerateDataKey", kms.generate_data_key, {"KeyId": arn, "KeySpec": "AES_256"}),
        # kms:Create* would cover it: a grant to itself would be a way round the Deny.
        (
            "kms:CreateGrant",
            kms.create_grant,
            {"KeyId": arn, "GranteePrincipal": admin.arn, "Operations": ["Decrypt"]},
        ),
    ):
        assert denied(call, **kwargs) == explicit_deny(admin.arn, action, arn), action


def test_separation_of_duties_users(
    root: Any, users: dict[str, User], separated_key: SeparatedKey
) -> None:
    """KeyUser uses the key (no identity policy needed) but may never manage it."""
    user = users["KeyUser"]
    arn = separated_key.arn
    kms = user.kms
    blob = kms.encrypt(KeyId=arn, Plaintext=b"for users")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"for users"
    assert len(kms.generate_data_key(KeyId=arn, KeySpec="AES_256")["Plaintext"]) == 32
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["Arn"] == arn

    for action, call, kwargs in (
        ("kms:ScheduleKeyDeletion", kms.schedule_key_deletion, {"KeyId": arn}),
        ("kms:DisableKey", kms.disable_key, {"KeyId": arn}),
        (
            "kms:PutKeyPolicy",
            kms.put_key_policy,
            {"KeyId": arn, "PolicyName": "default", "Policy": separated_key.policy},
        ),
    ):
        assert denied(call, **kwargs) == explicit_deny(user.arn, action, arn), action
    assert root.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"


# == the database is not trusted ================================================================


def test_a_key_re_enabled_in_the_database_is_refused(server: RunningServer, root: Any) -> None:
    """An edit made directly in the database (re-enabling a disabled key) is detected by the row's
    token HMAC: the request fails closed with a clear error, and doctor names the key."""
    key_id = root.create_key()["KeyMetadata"]["KeyId"]
    root.disable_key(KeyId=key_id)
    outside_sql(
        server.data_dir / "hsmkms.db", "UPDATE keys SET state = 'Enabled' WHERE id = ?", key_id
    )
    message = client_error("KMSInvalidStateException", root.encrypt, KeyId=key_id, Plaintext=b"x")
    assert "failed its integrity check" in message
    assert key_id in message
    doctor = server.cli("doctor")
    assert doctor.returncode != 0
    assert key_id in doctor.stdout + doctor.stderr
    # restored: the MAC matches again
    outside_sql(
        server.data_dir / "hsmkms.db", "UPDATE keys SET state = 'Disabled' WHERE id = ?", key_id
    )
    client_error("DisabledException", root.encrypt, KeyId=key_id, Plaintext=b"x")
