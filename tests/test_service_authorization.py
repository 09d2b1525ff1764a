"""Authorization in KmsService: key policies, identity policies and grants decide every
operation for a caller (real SoftHSM2 token, real SQLite file). End-to-end checks through boto3
are in tests/test_api_authorization.py."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from postgres import outside_sql, store_url

from hsmkms import models as m
from hsmkms.errors import (
    AccessDeniedException,
    DryRunOperationException,
    InvalidGrantIdException,
    InvalidGrantTokenException,
    KeyIntegrityError,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    ValidationException,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore, TokenRowSealer
from hsmkms.types import Caller

pytestmark = [pytest.mark.hsm, pytest.mark.database, pytest.mark.vendors]

REGION = "us-east-2"
ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
BOB = f"arn:aws:iam::{ACCOUNT}:user/bob"
MALLORY = f"arn:aws:iam::{OTHER_ACCOUNT}:user/mallory"
T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def caller(arn: str, policy: dict[str, Any] | None = None, **kwargs: Any) -> Caller:
    return Caller(
        principal_arn=arn,
        account_id=arn.split(":")[4],
        identity_policy=json.dumps(policy) if policy is not None else None,
        **kwargs,
    )


def allow(actions: list[str] | str, resource: str = "*", **extra: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {"Effect": "Allow", "Action": actions, "Resource": resource}
    statement.update(extra)
    return {"Version": "2012-10-17", "Statement": [statement]}


def key_policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


ROOT_ALL = {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"}


@pytest.fixture
def service(keystore: Pkcs11Keystore, tmp_path: Path) -> Iterator[KmsService]:
    clock = ManualClock(T0)
    store = MetadataStore(store_url(tmp_path / "kms.db"), clock=clock)
    svc = KmsService(keystore, store, region=REGION, account_id=ACCOUNT, clock=clock)
    yield svc
    store.close()


def new_key(service: KmsService, policy: str | None = None, **kwargs: Any) -> str:
    request = m.CreateKeyRequest(Policy=policy, **kwargs)
    return service.create_key(request, caller=caller(ROOT)).KeyMetadata.KeyId


def encrypt(service: KmsService, key_id: str, who: Caller, **context: str) -> bytes:
    request = m.EncryptRequest(KeyId=key_id, Plaintext=b"secret", EncryptionContext=context or None)
    blob = service.encrypt(request, caller=who).CiphertextBlob
    assert blob is not None
    return blob


def decrypt(service: KmsService, blob: bytes, who: Caller, **context: str) -> bytes:
    request = m.DecryptRequest(CiphertextBlob=blob, EncryptionContext=context or None)
    plaintext = service.decrypt(request, caller=who).Plaintext
    assert plaintext is not None
    return plaintext


# == key policies and identity policies =========================================================


def test_root_may_do_everything_under_the_default_policy(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    assert decrypt(service, encrypt(service, key_id, root), root) == b"secret"
    service.disable_key(m.DisableKeyRequest(KeyId=key_id), caller=root)
    service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id), caller=root)


def test_a_user_without_identity_policy_may_do_nothing(service: KmsService) -> None:
    key_id = new_key(service)
    arn = service.arns.key(key_id)
    with pytest.raises(AccessDeniedException) as info:
        encrypt(service, key_id, caller(ALICE))
    assert info.value.message == (
        f"User: {ALICE} is not authorized to perform: kms:Encrypt on resource: {arn} "
        "because no identity-based policy allows the kms:Encrypt action"
    )
    with pytest.raises(AccessDeniedException):
        service.describe_key(m.DescribeKeyRequest(KeyId=key_id), caller=caller(ALICE))
    with pytest.raises(AccessDeniedException):
        service.list_keys(m.ListKeysRequest(), caller=caller(ALICE))
    with pytest.raises(AccessDeniedException):
        service.create_key(m.CreateKeyRequest(), caller=caller(ALICE))
    with pytest.raises(AccessDeniedException):
        service.generate_random(m.GenerateRandomRequest(NumberOfBytes=8), caller=caller(ALICE))


def test_identity_policy_allows_what_it_names_on_the_key_it_names(service: KmsService) -> None:
    key_id = new_key(service)
    other = new_key(service)
    alice = caller(ALICE, allow(["kms:Encrypt", "kms:Decrypt"], service.arns.key(key_id)))
    assert decrypt(service, encrypt(service, key_id, alice), alice) == b"secret"
    with pytest.raises(AccessDeniedException):
        encrypt(service, other, alice)
    with pytest.raises(AccessDeniedException):
        service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id), caller=alice)
    with pytest.raises(AccessDeniedException):
        service.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=key_id, KeySpec=m.DataKeySpec.AES_256), caller=alice
        )


def test_explicit_deny_in_the_key_policy_beats_an_identity_allow(service: KmsService) -> None:
    deny = {
        "Sid": "NoDecryptForAlice",
        "Effect": "Deny",
        "Principal": {"AWS": ALICE},
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    key_id = new_key(service, key_policy(ROOT_ALL, deny))
    alice = caller(ALICE, allow("kms:*"))
    blob = encrypt(service, key_id, alice)
    with pytest.raises(AccessDeniedException) as info:
        decrypt(service, blob, alice)
    assert info.value.message.endswith("with an explicit deny in a resource-based policy")


def test_explicit_deny_in_the_identity_policy(service: KmsService) -> None:
    key_id = new_key(service)
    policy = allow("kms:*")
    policy["Statement"].append({"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"})
    alice = caller(ALICE, policy)
    blob = encrypt(service, key_id, alice)
    with pytest.raises(AccessDeniedException) as info:
        decrypt(service, blob, alice)
    assert info.value.message.endswith("with an explicit deny in an identity-based policy")


def test_a_key_policy_naming_a_user_needs_no_identity_policy(service: KmsService) -> None:
    bob_uses = {
        "Effect": "Allow",
        "Principal": {"AWS": BOB},
        "Action": ["kms:Encrypt", "kms:Decrypt"],
        "Resource": "*",
    }
    key_id = new_key(service, key_policy(ROOT_ALL, bob_uses))
    bob = caller(BOB)
    assert decrypt(service, encrypt(service, key_id, bob), bob) == b"secret"


def test_without_the_account_statement_identity_policies_are_ineffective(
    service: KmsService,
) -> None:
    admin_only = {"Effect": "Allow", "Principal": {"AWS": BOB}, "Action": "kms:*", "Resource": "*"}
    key_id = new_key(service, key_policy(admin_only), BypassPolicyLockoutSafetyCheck=True)
    with pytest.raises(AccessDeniedException) as info:
        encrypt(service, key_id, caller(ALICE, allow("kms:*")))
    assert info.value.message.endswith(
        "because no resource-based policy allows the kms:Encrypt action"
    )


def test_another_account_is_denied_by_the_default_policy(service: KmsService) -> None:
    key_id = new_key(service)
    with pytest.raises(AccessDeniedException):
        encrypt(service, service.arns.key(key_id), caller(MALLORY, allow("kms:*")))


def test_encryption_context_conditions(service: KmsService) -> None:
    key_id = new_key(service)
    condition = {"StringEquals": {"kms:EncryptionContext:dept": "finance"}}
    alice = caller(ALICE, allow(["kms:Encrypt", "kms:Decrypt"], Condition=condition))
    blob = encrypt(service, key_id, alice, dept="finance")
    assert decrypt(service, blob, alice, dept="finance") == b"secret"
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice, dept="sales")
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)


def test_request_alias_condition(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/app", TargetKeyId=key_id), root)
    condition = {"StringEquals": {"kms:RequestAlias": "alias/app"}}
    alice = caller(ALICE, allow("kms:Encrypt", Condition=condition))
    encrypt(service, "alias/app", alice)
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)


def test_source_ip_and_secure_transport_conditions(service: KmsService) -> None:
    key_id = new_key(service)
    policy = allow(
        "kms:Encrypt",
        Condition={
            "IpAddress": {"aws:SourceIp": "10.0.0.0/8"},
            "Bool": {"aws:SecureTransport": "true"},
        },
    )
    encrypt(service, key_id, caller(ALICE, policy, source_ip="10.1.2.3", secure_transport=True))
    with pytest.raises(AccessDeniedException):
        encrypt(
            service, key_id, caller(ALICE, policy, source_ip="192.0.2.1", secure_transport=True)
        )
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, caller(ALICE, policy, source_ip="10.1.2.3"))


def test_rotation_period_and_deletion_window_conditions(service: KmsService) -> None:
    key_id = new_key(service)
    rotation = allow(
        "kms:EnableKeyRotation",
        Condition={"NumericLessThanEquals": {"kms:RotationPeriodInDays": "180"}},
    )
    deletion = allow(
        "kms:ScheduleKeyDeletion",
        Condition={
            "NumericGreaterThanEquals": {"kms:ScheduleKeyDeletionPendingWindowInDays": "30"}
        },
    )
    policy = {"Version": "2012-10-17", "Statement": rotation["Statement"] + deletion["Statement"]}
    alice = caller(ALICE, policy)
    with pytest.raises(AccessDeniedException):  # the default period, 365, is checked
        service.enable_key_rotation(m.EnableKeyRotationRequest(KeyId=key_id), caller=alice)
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key_id, RotationPeriodInDays=90), caller=alice
    )
    with pytest.raises(AccessDeniedException):
        service.schedule_key_deletion(
            m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7), caller=alice
        )
    service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id), caller=alice)


def test_create_key_conditions_and_account_actions(service: KmsService) -> None:
    policy = allow(
        "kms:CreateKey", Condition={"StringEquals": {"kms:KeySpec": "SYMMETRIC_DEFAULT"}}
    )
    policy["Statement"].append({"Effect": "Allow", "Action": "kms:ListKeys", "Resource": "*"})
    alice = caller(ALICE, policy)
    created = service.create_key(m.CreateKeyRequest(), caller=alice).KeyMetadata
    # The default key policy delegates to alice's identity policy, which allows no kms:Encrypt.
    with pytest.raises(AccessDeniedException):
        encrypt(service, created.KeyId, alice)
    assert service.list_keys(m.ListKeysRequest(), caller=alice).Keys


def test_authorization_comes_before_the_key_state(service: KmsService) -> None:
    key_id = new_key(service)
    service.disable_key(m.DisableKeyRequest(KeyId=key_id), caller=caller(ROOT))
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, caller(ALICE))


def test_unknown_key_is_not_found_before_authorization(service: KmsService) -> None:
    with pytest.raises(NotFoundException):
        encrypt(service, "0b1c2d3e-0000-4000-8000-000000000000", caller(ALICE))


def test_dry_run_checks_permission(service: KmsService) -> None:
    key_id = new_key(service)
    request = m.EncryptRequest(KeyId=key_id, Plaintext=b"x", DryRun=True)
    with pytest.raises(AccessDeniedException):
        service.encrypt(request, caller=caller(ALICE))
    with pytest.raises(DryRunOperationException):
        service.encrypt(request, caller=caller(ROOT))


def test_re_encrypt_needs_from_on_the_source_and_to_on_the_destination(
    service: KmsService,
) -> None:
    source, destination = new_key(service), new_key(service)
    blob = encrypt(service, source, caller(ROOT))
    request = m.ReEncryptRequest(CiphertextBlob=blob, DestinationKeyId=destination)
    only_to = caller(ALICE, allow("kms:ReEncryptTo"))
    with pytest.raises(AccessDeniedException) as info:
        service.re_encrypt(request, caller=only_to)
    assert "kms:ReEncryptFrom" in info.value.message
    both = caller(ALICE, allow("kms:ReEncrypt*"))
    assert service.re_encrypt(request, caller=both).KeyId == service.arns.key(destination)


def test_the_caller_records_the_keys_and_versions_used(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    blob = encrypt(service, key_id, root)
    assert root.keys_used == {service.arns.key(key_id): 1}
    denied = caller(ALICE)
    with pytest.raises(AccessDeniedException):
        decrypt(service, blob, denied)
    assert denied.keys_used == {service.arns.key(key_id): 1}


# == lockout safety check ======================================================================


def test_put_key_policy_refuses_a_policy_that_locks_the_caller_out(service: KmsService) -> None:
    key_id = new_key(service)
    bob_only = key_policy(
        {"Effect": "Allow", "Principal": {"AWS": BOB}, "Action": "kms:*", "Resource": "*"}
    )
    root = caller(ROOT)
    with pytest.raises(MalformedPolicyDocumentException) as info:
        service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key_id, Policy=bob_only), root)
    assert "will not allow you to update the key policy" in info.value.message
    assert "kms:*" in service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key_id), root).Policy
    service.put_key_policy(
        m.PutKeyPolicyRequest(KeyId=key_id, Policy=bob_only, BypassPolicyLockoutSafetyCheck=True),
        root,
    )
    with pytest.raises(AccessDeniedException):  # as AWS: the root is locked out now
        service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key_id), root)
    assert service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key_id), caller(BOB)).Policy


def test_create_key_with_a_lockout_policy_creates_nothing(
    service: KmsService, keystore: Pkcs11Keystore
) -> None:
    bob_only = key_policy(
        {"Effect": "Allow", "Principal": {"AWS": BOB}, "Action": "kms:*", "Resource": "*"}
    )
    objects = len(keystore.list_objects())
    keys = service.list_keys(m.ListKeysRequest()).Keys
    with pytest.raises(MalformedPolicyDocumentException):
        service.create_key(m.CreateKeyRequest(Policy=bob_only), caller=caller(ROOT))
    assert len(keystore.list_objects()) == objects
    assert service.list_keys(m.ListKeysRequest()).Keys == keys


def test_lockout_check_counts_the_callers_identity_policy(service: KmsService) -> None:
    key_id = new_key(service)
    alice = caller(ALICE, allow(["kms:PutKeyPolicy", "kms:GetKeyPolicy"]))
    # The default policy delegates to the account, and alice's policy allows PutKeyPolicy.
    default = service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key_id), alice).Policy
    assert default is not None
    service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key_id, Policy=default), alice)
    bob_only = key_policy(ROOT_ALL | {"Principal": {"AWS": BOB}})
    with pytest.raises(MalformedPolicyDocumentException):
        service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key_id, Policy=bob_only), alice)


# == grants =====================================================================================


def create_grant(
    service: KmsService, key_id: str, who: Caller, **kwargs: Any
) -> m.CreateGrantResponse:
    kwargs.setdefault("GranteePrincipal", ALICE)
    kwargs.setdefault("Operations", ["Encrypt", "Decrypt"])
    return service.create_grant(m.CreateGrantRequest(KeyId=key_id, **kwargs), caller=who)


def test_a_grant_allows_its_operations_at_once_and_revoking_ends_it(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    alice = caller(ALICE)
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)
    grant = create_grant(service, key_id, root)
    assert grant.GrantId is not None
    assert len(grant.GrantId) == 64
    assert decrypt(service, encrypt(service, key_id, alice), alice) == b"secret"
    with pytest.raises(AccessDeniedException):  # not a grant operation it carries
        service.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=key_id, NumberOfBytes=32), caller=alice
        )
    with pytest.raises(AccessDeniedException):  # grants are per grantee
        encrypt(service, key_id, caller(BOB))
    service.revoke_grant(m.RevokeGrantRequest(KeyId=key_id, GrantId=grant.GrantId), root)
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)


def test_an_explicit_deny_beats_a_grant(service: KmsService) -> None:
    key_id = new_key(service)
    create_grant(service, key_id, caller(ROOT))
    deny_all = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": "kms:*", "Resource": "*"}],
    }
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, caller(ALICE, deny_all))


def test_constrained_grants(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    create_grant(
        service,
        key_id,
        root,
        Constraints=m.GrantConstraints(EncryptionContextEquals={"app": "billing"}),
    )
    create_grant(
        service,
        key_id,
        root,
        GranteePrincipal=BOB,
        Constraints=m.GrantConstraints(EncryptionContextSubset={"app": "billing"}),
    )
    alice, bob = caller(ALICE), caller(BOB)
    blob = encrypt(service, key_id, alice, app="billing")
    assert decrypt(service, blob, alice, app="billing") == b"secret"
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice, app="billing", extra="1")
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)
    encrypt(service, key_id, bob, app="billing", extra="1")
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, bob, app="payroll")


def test_create_grant_through_a_grant_is_no_broader(service: KmsService) -> None:
    key_id = new_key(service)
    create_grant(
        service,
        key_id,
        caller(ROOT),
        Operations=["CreateGrant", "Decrypt"],
        Constraints=m.GrantConstraints(EncryptionContextSubset={"app": "billing"}),
    )
    alice = caller(ALICE)
    narrower = m.GrantConstraints(EncryptionContextSubset={"app": "billing", "team": "a"})
    create_grant(
        service, key_id, alice, GranteePrincipal=BOB, Operations=["Decrypt"], Constraints=narrower
    )
    with pytest.raises(AccessDeniedException):  # an operation alice's grant lacks
        create_grant(
            service,
            key_id,
            alice,
            GranteePrincipal=BOB,
            Operations=["Encrypt"],
            Constraints=narrower,
        )
    with pytest.raises(AccessDeniedException):  # no constraint: broader than alice's grant
        create_grant(service, key_id, alice, GranteePrincipal=BOB, Operations=["Decrypt"])


def test_create_grant_is_idempotent_with_a_name(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    first = create_grant(service, key_id, root, Name="app-1")
    again = create_grant(service, key_id, root, Name="app-1")
    assert first.GrantId == again.GrantId
    assert first.GrantToken != again.GrantToken
    other = create_grant(service, key_id, root, Name="app-1", Operations=["Decrypt"])
    assert other.GrantId != first.GrantId
    grants = service.list_grants(m.ListGrantsRequest(KeyId=key_id), root).Grants
    assert grants is not None
    assert len(grants) == 2


def test_grant_operations_must_suit_the_key(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    with pytest.raises(ValidationException):
        create_grant(service, key_id, root, Operations=["Sign"])
    with pytest.raises(ValidationException):
        create_grant(service, key_id, root, Operations=[])
    with pytest.raises(ValidationException):
        create_grant(
            service,
            key_id,
            root,
            Constraints=m.GrantConstraints(
                EncryptionContextEquals={f"k{i}": "v" for i in range(9)}
            ),
        )


def test_list_grants_and_list_retirable_grants(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    grant = create_grant(service, key_id, root, RetiringPrincipal=BOB, Name="n1")
    create_grant(service, key_id, root, GranteePrincipal=BOB)
    listed = service.list_grants(m.ListGrantsRequest(KeyId=key_id, GranteePrincipal=ALICE), root)
    assert listed.Grants is not None
    assert len(listed.Grants) == 1
    entry = listed.Grants[0]
    assert entry.GrantId == grant.GrantId
    assert entry.KeyId == service.arns.key(key_id)
    assert entry.IssuingAccount == ROOT
    assert entry.RetiringPrincipal == BOB
    assert entry.Name == "n1"
    assert {op.value for op in entry.Operations or []} == {"Encrypt", "Decrypt"}
    retirable = service.list_retirable_grants(
        m.ListRetirableGrantsRequest(RetiringPrincipal=BOB), root
    )
    assert [g.GrantId for g in retirable.Grants or []] == [grant.GrantId]
    with pytest.raises(AccessDeniedException):
        service.list_grants(m.ListGrantsRequest(KeyId=key_id), caller(ALICE))
    with pytest.raises(AccessDeniedException):
        service.list_retirable_grants(
            m.ListRetirableGrantsRequest(RetiringPrincipal=BOB), caller(ALICE)
        )


def test_who_may_retire_a_grant(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    plain = create_grant(service, key_id, root, RetiringPrincipal=BOB)
    assert plain.GrantToken is not None
    assert plain.GrantId is not None
    with pytest.raises(AccessDeniedException):  # the grantee, without RetireGrant
        service.retire_grant(m.RetireGrantRequest(GrantToken=plain.GrantToken), caller(ALICE))
    service.retire_grant(m.RetireGrantRequest(GrantToken=plain.GrantToken), caller(BOB))
    with pytest.raises(NotFoundException):
        service.retire_grant(m.RetireGrantRequest(GrantToken=plain.GrantToken), caller(BOB))
    self_retiring = create_grant(service, key_id, root, Operations=["Decrypt", "RetireGrant"])
    assert self_retiring.GrantId is not None
    service.retire_grant(
        m.RetireGrantRequest(KeyId=service.arns.key(key_id), GrantId=self_retiring.GrantId),
        caller(ALICE),
    )
    by_account = create_grant(service, key_id, root)
    assert by_account.GrantId is not None
    service.retire_grant(m.RetireGrantRequest(KeyId=key_id, GrantId=by_account.GrantId), root)
    assert service.list_grants(m.ListGrantsRequest(KeyId=key_id), root).Grants == []


def test_malformed_grant_tokens_and_ids(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    with pytest.raises(InvalidGrantTokenException):
        service.retire_grant(m.RetireGrantRequest(GrantToken="not-a-token"), root)
    with pytest.raises(InvalidGrantTokenException):
        create_grant(service, key_id, root, GrantTokens=["bogus"])
    with pytest.raises(InvalidGrantIdException):
        service.revoke_grant(m.RevokeGrantRequest(KeyId=key_id, GrantId="nope"), root)
    with pytest.raises(NotFoundException):
        service.revoke_grant(m.RevokeGrantRequest(KeyId=key_id, GrantId="a" * 64), root)
    with pytest.raises(ValidationException):
        service.retire_grant(m.RetireGrantRequest(KeyId=key_id), root)


def test_grants_follow_the_key_state(service: KmsService) -> None:
    key_id = new_key(service)
    root = caller(ROOT)
    grant = create_grant(service, key_id, root)
    service.disable_key(m.DisableKeyRequest(KeyId=key_id), root)
    create_grant(service, key_id, root, GranteePrincipal=BOB)  # allowed while disabled
    service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id), root)
    with pytest.raises(KMSInvalidStateException):
        create_grant(service, key_id, root)
    assert grant.GrantId is not None
    service.revoke_grant(m.RevokeGrantRequest(KeyId=key_id, GrantId=grant.GrantId), root)


def test_create_grant_conditions(service: KmsService) -> None:
    key_id = new_key(service)
    policy = allow(
        "kms:CreateGrant",
        Condition={"ForAllValues:StringEquals": {"kms:GrantOperations": ["Encrypt", "Decrypt"]}},
    )
    alice = caller(ALICE, policy)
    create_grant(service, key_id, alice, GranteePrincipal=BOB, Operations=["Decrypt"])
    with pytest.raises(AccessDeniedException):
        create_grant(service, key_id, alice, GranteePrincipal=BOB, Operations=["ReEncryptFrom"])


def test_describe_key_through_a_grant(service: KmsService) -> None:
    key_id = new_key(service)
    create_grant(service, key_id, caller(ROOT), Operations=["DescribeKey"])
    described = service.describe_key(m.DescribeKeyRequest(KeyId=key_id), caller(ALICE))
    assert described.KeyMetadata.KeyId == key_id


# == the key's tags and aliases (ABAC: aws:ResourceTag/<k>, kms:ResourceAliases) ================

BLUE_ONLY = {"StringEquals": {"aws:ResourceTag/Project": "blue"}}


def tag(service: KmsService, key_id: str, who: Caller | None = None, **tags: str) -> None:
    request = m.TagResourceRequest(
        KeyId=key_id, Tags=[m.Tag(TagKey=k, TagValue=v) for k, v in tags.items()]
    )
    service.tag_resource(request, caller=who or caller(ROOT))


def untag(service: KmsService, key_id: str, *keys: str, who: Caller | None = None) -> None:
    request = m.UntagResourceRequest(KeyId=key_id, TagKeys=list(keys))
    service.untag_resource(request, caller=who or caller(ROOT))


def test_identity_policy_resource_tag_condition(service: KmsService) -> None:
    """An identity policy allowing Encrypt only on keys tagged Project=blue: allowed on such a
    key, denied on an untagged key and on Project=red; the next request after a TagResource or
    UntagResource follows the new tags (no decision or read cache keeps the old ones)."""
    blue = new_key(service, Tags=[m.Tag(TagKey="Project", TagValue="blue")])
    untagged = new_key(service)
    red = new_key(service, Tags=[m.Tag(TagKey="Project", TagValue="red")])
    alice = caller(ALICE, allow("kms:Encrypt", Condition=BLUE_ONLY))
    encrypt(service, blue, alice)
    for key_id in (untagged, red):
        with pytest.raises(AccessDeniedException) as info:
            encrypt(service, key_id, alice)
        assert info.value.message.endswith(
            "because no identity-based policy allows the kms:Encrypt action"
        )

    tag(service, red, Project="blue")
    encrypt(service, red, alice)
    tag(service, blue, Project="red")
    with pytest.raises(AccessDeniedException):
        encrypt(service, blue, alice)
    tag(service, untagged, Project="blue")
    encrypt(service, untagged, alice)
    untag(service, untagged, "Project")
    with pytest.raises(AccessDeniedException):
        encrypt(service, untagged, alice)


def test_key_policy_resource_tag_condition_with_a_lower_case_key_name(
    service: KmsService,
) -> None:
    """The same in a key policy naming alice (who has no identity policy), with the condition
    key written aws:resourcetag/Project: condition key names are case-insensitive."""
    statement = {
        "Effect": "Allow",
        "Principal": {"AWS": ALICE},
        "Action": "kms:Encrypt",
        "Resource": "*",
        "Condition": {"StringEquals": {"aws:resourcetag/Project": "blue"}},
    }
    policy = key_policy(ROOT_ALL, statement)
    key_id = new_key(service, policy, Tags=[m.Tag(TagKey="Project", TagValue="blue")])
    alice = caller(ALICE)
    encrypt(service, key_id, alice)
    tag(service, key_id, Project="red")
    with pytest.raises(AccessDeniedException) as info:
        encrypt(service, key_id, alice)
    # ROOT_ALL delegates to identity policies, and alice's allows nothing.
    assert info.value.message.endswith(
        "because no identity-based policy allows the kms:Encrypt action"
    )
    untagged = new_key(service, policy)
    with pytest.raises(AccessDeniedException):
        encrypt(service, untagged, alice)


def test_a_resource_tag_deny_beats_an_allow_and_a_grant(service: KmsService) -> None:
    """A Deny on keys tagged Classification=restricted, in the key policy or in the identity
    policy, beats an identity policy allowing kms:* and a grant for Encrypt; the grant itself
    knows nothing of tags."""
    deny = {
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": "kms:Encrypt",
        "Resource": "*",
        "Condition": {"StringEquals": {"aws:ResourceTag/Classification": "restricted"}},
    }
    key_id = new_key(service, key_policy(ROOT_ALL, deny))
    alice = caller(ALICE, allow("kms:*"))
    create_grant(service, key_id, caller(ROOT), GranteePrincipal=BOB, Operations=["Encrypt"])
    bob = caller(BOB)
    encrypt(service, key_id, alice)
    encrypt(service, key_id, bob)
    tag(service, key_id, Classification="restricted")
    for who in (alice, bob, caller(ROOT)):
        with pytest.raises(AccessDeniedException) as info:
            encrypt(service, key_id, who)
        assert info.value.message.endswith("with an explicit deny in a resource-based policy")

    other = new_key(service, Tags=[m.Tag(TagKey="Classification", TagValue="restricted")])
    identity_deny = {
        "Effect": "Deny",
        "Action": "kms:*",
        "Resource": "*",
        "Condition": {"StringEquals": {"aws:ResourceTag/Classification": "restricted"}},
    }
    everything = {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}
    wary = caller(ALICE, {"Version": "2012-10-17", "Statement": [everything, identity_deny]})
    with pytest.raises(AccessDeniedException) as info:
        encrypt(service, other, wary)
    assert info.value.message.endswith("with an explicit deny in an identity-based policy")
    encrypt(service, new_key(service), wary)


def test_tag_and_untag_resource_are_decided_on_the_tags_before_the_request(
    service: KmsService,
) -> None:
    """spec: resource conditions see the key as it is: alice may change the tags of keys tagged
    Owner=alice; retagging Owner=bob succeeds (decided on Owner=alice) and then locks her out;
    removing Owner likewise."""
    mine = {"StringEquals": {"aws:ResourceTag/Owner": "alice"}}
    alice = caller(ALICE, allow(["kms:TagResource", "kms:UntagResource"], Condition=mine))
    key_id = new_key(service, Tags=[m.Tag(TagKey="Owner", TagValue="alice")])
    tag(service, key_id, alice, Owner="bob")
    with pytest.raises(AccessDeniedException):
        tag(service, key_id, alice, Owner="alice")
    tag(service, key_id, Owner="alice")
    untag(service, key_id, "Owner", who=alice)
    with pytest.raises(AccessDeniedException):
        untag(service, key_id, "Owner", who=alice)
    # CreateKey has no resource yet: aws:ResourceTag is absent, the tags are aws:RequestTag.
    create = caller(ALICE, allow("kms:CreateKey", Condition=mine))
    with pytest.raises(AccessDeniedException):
        service.create_key(
            m.CreateKeyRequest(Tags=[m.Tag(TagKey="Owner", TagValue="alice")]), caller=create
        )


def test_resource_aliases_condition_follows_the_aliases(service: KmsService) -> None:
    """ForAnyValue:StringEquals kms:ResourceAliases ["alias/app"] allows using the key through
    its key id once the alias exists, and no longer after UpdateAlias moves the alias to
    another key (which it then allows) or DeleteAlias removes it."""
    root = caller(ROOT)
    key_id, other = new_key(service), new_key(service)
    condition = {"ForAnyValue:StringEquals": {"kms:ResourceAliases": ["alias/app"]}}
    alice = caller(ALICE, allow(["kms:Encrypt", "kms:DescribeKey"], Condition=condition))
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/other", TargetKeyId=key_id), root)
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/app", TargetKeyId=key_id), root)
    encrypt(service, key_id, alice)
    encrypt(service, service.arns.key(key_id), alice)
    service.describe_key(m.DescribeKeyRequest(KeyId=key_id), caller=alice)
    with pytest.raises(AccessDeniedException):
        encrypt(service, other, alice)

    service.update_alias(m.UpdateAliasRequest(AliasName="alias/app", TargetKeyId=other), root)
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)
    encrypt(service, other, alice)
    encrypt(service, "alias/app", alice)

    service.delete_alias(m.DeleteAliasRequest(AliasName="alias/app"), root)
    for key in (key_id, other):
        with pytest.raises(AccessDeniedException):
            encrypt(service, key, alice)


def test_resource_aliases_in_a_deny_and_in_decrypt(service: KmsService) -> None:
    """A Deny on keys whose aliases match alias/legacy-* stops Decrypt of a blob made before
    the alias was added (the key is found from the blob, not from a KeyId)."""
    deny = {
        "Effect": "Deny",
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {"ForAnyValue:StringLike": {"kms:ResourceAliases": "alias/legacy-*"}},
    }
    everything = {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}
    alice = caller(ALICE, {"Version": "2012-10-17", "Statement": [everything, deny]})
    key_id = new_key(service)
    blob = encrypt(service, key_id, alice)
    assert decrypt(service, blob, alice) == b"secret"
    service.create_alias(
        m.CreateAliasRequest(AliasName="alias/legacy-billing", TargetKeyId=key_id), caller(ROOT)
    )
    with pytest.raises(AccessDeniedException) as info:
        decrypt(service, blob, alice)
    assert info.value.message.endswith("with an explicit deny in an identity-based policy")


def test_resource_aliases_beyond_the_quota_allow_nothing(service: KmsService) -> None:
    """spec: kms:ResourceAliases is effective only for keys within the 50-aliases quota. The
    service never lets a key exceed it; a key that does anyway (its rows written past the
    service) is denied to principals that the condition would have allowed."""
    key_id = new_key(service)
    for i in range(50):
        service.store.create_alias(f"alias/app-{i:02}", key_id, T0)
    condition = {"ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/app-00"}}
    alice = caller(ALICE, allow("kms:Encrypt", Condition=condition))
    encrypt(service, key_id, alice)
    with pytest.raises(LimitExceededException):
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/app-50", TargetKeyId=key_id), caller(ROOT)
        )
    service.store.create_alias("alias/app-50", key_id, T0)
    with pytest.raises(AccessDeniedException):
        encrypt(service, key_id, alice)
    encrypt(service, key_id, caller(ROOT))


def test_conditions_on_other_keys_read_no_tags_or_aliases(service: KmsService) -> None:
    """Cost: with a policy whose conditions test only the encryption context, an authorized
    Encrypt runs no query on the tags or aliases tables; one testing aws:ResourceTag queries
    the tags (once) and not the aliases."""
    key_id = new_key(service, Tags=[m.Tag(TagKey="Project", TagValue="blue")])
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.lower())

    engine = service.store.engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", record)
    try:
        on_context = caller(
            ALICE,
            allow("kms:Encrypt", Condition={"StringEquals": {"kms:EncryptionContext:a": "b"}}),
        )
        encrypt(service, key_id, on_context, a="b")
        assert not [s for s in statements if "tags" in s or "aliases" in s]
        statements.clear()
        encrypt(service, key_id, caller(ALICE, allow("kms:Encrypt", Condition=BLUE_ONLY)))
        assert len([s for s in statements if "from tags" in s]) == 1
        assert not [s for s in statements if "aliases" in s]
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", record)


def test_the_lockout_check_of_put_key_policy_sees_the_keys_tags(service: KmsService) -> None:
    """PutKeyPolicy's lockout check evaluates the new policy on the existing key: a policy
    letting the root manage only keys tagged Team=ops passes on such a key, and is refused
    on an untagged one (unless the check is bypassed)."""
    ops_only = dict(ROOT_ALL, Condition={"StringEquals": {"aws:ResourceTag/Team": "ops"}})
    root = caller(ROOT)
    tagged = new_key(service, Tags=[m.Tag(TagKey="Team", TagValue="ops")])
    request = m.PutKeyPolicyRequest(KeyId=tagged, Policy=key_policy(ops_only))
    service.put_key_policy(request, caller=root)
    service.describe_key(m.DescribeKeyRequest(KeyId=tagged), caller=root)
    untagged = new_key(service)
    with pytest.raises(MalformedPolicyDocumentException):
        service.put_key_policy(
            m.PutKeyPolicyRequest(KeyId=untagged, Policy=key_policy(ops_only)), caller=root
        )


def test_an_edited_tag_row_fails_a_tag_condition_closed(
    keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """With rows sealed by the token (as served), a tag value edited in the database neither
    grants nor denies through aws:ResourceTag: the request that reads it fails with
    KeyIntegrityError. A policy that never reads the tags does not touch them."""
    path = tmp_path / "sealed.db"
    store = MetadataStore(store_url(path), sealer=TokenRowSealer(keystore))
    try:
        service = KmsService(keystore, store, region=REGION, account_id=ACCOUNT)
        key_id = new_key(service, Tags=[m.Tag(TagKey="Project", TagValue="red")])
        outside_sql(path, "UPDATE tags SET tag_value = 'blue' WHERE key_id = ?", key_id)
        with pytest.raises(KeyIntegrityError):
            encrypt(service, key_id, caller(ALICE, allow("kms:Encrypt", Condition=BLUE_ONLY)))
        on_context = {"StringEquals": {"kms:EncryptionContext:a": "b"}}
        encrypt(service, key_id, caller(ALICE, allow("kms:Encrypt", Condition=on_context)), a="b")
    finally:
        store.close()


# == alias operations: the alias resource and every key involved ===================================


def _alias_arn(name: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/{name}"


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


KEY_ALIAS_ACTIONS = ["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias", "kms:DescribeKey"]


def test_create_alias_needs_the_alias_resource_too(service: KmsService) -> None:
    """The defect: kms:CreateAlias on a key let a caller take any alias name. Now the alias ARN
    is decided by the caller's identity policy as well: a user whose policy covers the key
    (and alias/team-a-*) gets team-a names only."""
    key_id = new_key(service)
    key_arn = service.arns.key(key_id)
    alice = caller(
        ALICE,
        _policy(
            {"Effect": "Allow", "Action": KEY_ALIAS_ACTIONS, "Resource": key_arn},
            {"Effect": "Allow", "Action": "kms:CreateAlias", "Resource": _alias_arn("team-a-*")},
        ),
    )
    service.create_alias(
        m.CreateAliasRequest(AliasName="alias/team-a-app", TargetKeyId=key_id), caller=alice
    )
    with pytest.raises(AccessDeniedException) as info:
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/prod-payments", TargetKeyId=key_id),
            caller=alice,
        )
    assert info.value.message == (
        f"User: {ALICE} is not authorized to perform: kms:CreateAlias on resource: "
        f"{_alias_arn('prod-payments')} because no identity-based policy allows the "
        "kms:CreateAlias action"
    )
    assert service.store.get_alias("alias/prod-payments") is None


def test_an_alias_permission_without_the_key_permission_is_not_enough(
    service: KmsService,
) -> None:
    key_id = new_key(service)
    bob = caller(BOB, allow("kms:CreateAlias", _alias_arn("*")))  # every alias, no key
    with pytest.raises(AccessDeniedException) as info:
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/bob", TargetKeyId=key_id), caller=bob
        )
    assert f"on resource: {service.arns.key(key_id)}" in info.value.message


def test_a_key_policy_naming_the_user_does_not_cover_the_alias(service: KmsService) -> None:
    """A key policy governs the key only: a user it allows CreateAlias directly (by ARN) still
    needs an identity policy for the alias (AWS: "Provide this permission in an IAM policy")."""
    direct = {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*", "Resource": "*"}
    key_id = new_key(service, key_policy(ROOT_ALL, direct))
    with pytest.raises(AccessDeniedException) as info:
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/direct", TargetKeyId=key_id),
            caller=caller(ALICE),
        )
    assert f"on resource: {_alias_arn('direct')}" in info.value.message


def test_update_alias_needs_the_alias_the_old_key_and_the_new_key(service: KmsService) -> None:
    old, new, other = new_key(service), new_key(service), new_key(service)
    service.create_alias(
        m.CreateAliasRequest(AliasName="alias/moving", TargetKeyId=old), caller=caller(ROOT)
    )
    keys = [service.arns.key(k) for k in (old, new)]

    def user(alias_resource: str, key_resources: list[str]) -> Caller:
        return caller(
            ALICE,
            _policy(
                {"Effect": "Allow", "Action": KEY_ALIAS_ACTIONS, "Resource": key_resources},
                {"Effect": "Allow", "Action": "kms:UpdateAlias", "Resource": alias_resource},
            ),
        )

    request = m.UpdateAliasRequest(AliasName="alias/moving", TargetKeyId=new)
    for who, resource in [
        (user(_alias_arn("other"), keys), _alias_arn("moving")),  # not the alias
        (user(_alias_arn("moving"), keys[1:]), keys[0]),  # not the old key
        (user(_alias_arn("moving"), keys[:1]), keys[1]),  # not the new key
    ]:
        with pytest.raises(AccessDeniedException) as info:
            service.update_alias(request, caller=who)
        assert f"kms:UpdateAlias on resource: {resource}" in info.value.message
    service.update_alias(request, caller=user(_alias_arn("moving"), keys))
    alias = service.store.get_alias("alias/moving")
    assert alias is not None
    assert alias.key_id == new
    # Unknown aliases: the alias permission is asked first, so no existence is revealed.
    with pytest.raises(AccessDeniedException):
        service.update_alias(
            m.UpdateAliasRequest(AliasName="alias/nope", TargetKeyId=other),
            caller=user(_alias_arn("moving"), keys),
        )


def test_delete_alias_needs_the_alias_and_its_key(service: KmsService) -> None:
    key_id = new_key(service)
    service.create_alias(
        m.CreateAliasRequest(AliasName="alias/gone", TargetKeyId=key_id), caller=caller(ROOT)
    )
    key_arn = service.arns.key(key_id)
    only_key = caller(ALICE, allow("kms:DeleteAlias", key_arn))
    with pytest.raises(AccessDeniedException) as info:
        service.delete_alias(m.DeleteAliasRequest(AliasName="alias/gone"), caller=only_key)
    assert f"on resource: {_alias_arn('gone')}" in info.value.message
    only_alias = caller(ALICE, allow("kms:DeleteAlias", _alias_arn("gone")))
    with pytest.raises(AccessDeniedException) as info:
        service.delete_alias(m.DeleteAliasRequest(AliasName="alias/gone"), caller=only_alias)
    assert f"on resource: {key_arn}" in info.value.message
    both = caller(ALICE, _policy({"Effect": "Allow", "Action": "kms:DeleteAlias", "Resource": "*"}))
    service.delete_alias(m.DeleteAliasRequest(AliasName="alias/gone"), caller=both)
    assert service.store.get_alias("alias/gone") is None


def test_an_explicit_deny_on_alias_names_holds_for_a_user_allowed_everything(
    service: KmsService,
) -> None:
    key_id = new_key(service)
    who = caller(
        ALICE,
        _policy(
            {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "kms:CreateAlias", "Resource": _alias_arn("prod-*")},
        ),
    )
    service.create_alias(m.CreateAliasRequest(AliasName="alias/dev-x", TargetKeyId=key_id), who)
    with pytest.raises(AccessDeniedException) as info:
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/prod-x", TargetKeyId=key_id), who
        )
    assert info.value.message.endswith("with an explicit deny in an identity-based policy")


def test_another_account_may_not_create_aliases_here(service: KmsService) -> None:
    """Cross-account alias operations do not exist (AWS: "Cross-account use: No"), even for a
    principal the key policy allows."""
    other_root = f"arn:aws:iam::{OTHER_ACCOUNT}:root"
    cross = {
        "Effect": "Allow",
        "Principal": {"AWS": other_root},
        "Action": "kms:*",
        "Resource": "*",
    }
    key_id = new_key(service, key_policy(ROOT_ALL, cross))
    with pytest.raises(AccessDeniedException) as info:
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/theirs", TargetKeyId=service.arns.key(key_id)),
            caller=caller(other_root),
        )
    assert f"on resource: {_alias_arn('theirs')}" in info.value.message


def test_a_resource_aliases_condition_cannot_be_met_by_taking_an_alias(
    service: KmsService,
) -> None:
    """ABAC by alias: a user allowed GenerateDataKey on keys with alias/finance-key, and
    CreateAlias on its own keys' aliases alias/alice-*, cannot give another key the finance
    alias to pass the condition."""
    key_id = new_key(service)
    alice = caller(
        ALICE,
        _policy(
            {
                "Effect": "Allow",
                "Action": "kms:GenerateDataKey",
                "Resource": "*",
                "Condition": {
                    "ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/finance-key"}
                },
            },
            {"Effect": "Allow", "Action": "kms:CreateAlias", "Resource": "*"},
            {"Effect": "Deny", "Action": "kms:CreateAlias", "Resource": _alias_arn("finance-*")},
        ),
    )
    with pytest.raises(AccessDeniedException):
        service.create_alias(
            m.CreateAliasRequest(AliasName="alias/finance-key", TargetKeyId=key_id), alice
        )
    with pytest.raises(AccessDeniedException):
        service.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=key_id, KeySpec="AES_256"), caller=alice
        )
