"""The separation-of-duties example of docs/key-policies.md, evaluated across every KMS action
by the pure engine (the same text through the real server and boto3:
tests/test_api_authorization.py).

Key administrators can manage the key but never use it; key users can use it but never
manage it (in particular never schedule its deletion).
"""

from __future__ import annotations

import json

import pytest
from policy_docs import EXAMPLE_ACCOUNT as ACCOUNT
from policy_docs import EXAMPLE_ADMIN as ADMIN
from policy_docs import EXAMPLE_ROOT as ROOT
from policy_docs import EXAMPLE_USER as USER
from policy_docs import separation_of_duties

from hsmkms.errors import MalformedPolicyDocumentException
from hsmkms.policy import (
    AccessRequest,
    Outcome,
    PolicyDocument,
    evaluate_key_access,
    lockout_check,
    parse_identity_policy,
    parse_policy,
)
from hsmkms.service.operations import KEY_RESOURCE_ACTIONS

OTHER = f"arn:aws:iam::{ACCOUNT}:user/someone"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
EVERYTHING = parse_identity_policy(
    '{"Version": "2012-10-17",'
    ' "Statement": {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}}'
)

USE = {
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
}
USER_ALLOWED = USE | {"kms:DescribeKey"}
ADMIN_NEVER = USE | {
    "kms:Sign",
    "kms:Verify",
    "kms:GenerateMac",
    "kms:VerifyMac",
    "kms:DeriveSharedSecret",
    "kms:CreateGrant",
}
# What the administrators' own statement allows (written out by hand, not computed).
ADMIN_BY_KEY_POLICY = {
    "kms:CancelKeyDeletion",
    "kms:CreateAlias",
    "kms:DeleteAlias",
    "kms:DeleteImportedKeyMaterial",
    "kms:DescribeKey",
    "kms:DisableKey",
    "kms:DisableKeyRotation",
    "kms:EnableKey",
    "kms:EnableKeyRotation",
    "kms:GetKeyLastUsage",
    "kms:GetKeyPolicy",
    "kms:GetKeyRotationStatus",
    "kms:GetParametersForImport",
    "kms:GetPublicKey",
    "kms:ListGrants",
    "kms:ListKeyPolicies",
    "kms:ListKeyRotations",
    "kms:ListResourceTags",
    "kms:PutKeyPolicy",
    "kms:RevokeGrant",
    "kms:RotateKeyOnDemand",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateAlias",
    "kms:UpdateKeyDescription",
    "kms:UpdatePrimaryRegion",
}


POLICY: PolicyDocument = parse_policy(separation_of_duties())


def allowed(principal: str, action: str, with_identity_policy: bool) -> bool:
    request = AccessRequest(principal, ACCOUNT, action, KEY)
    identity = EVERYTHING if with_identity_policy else None
    return evaluate_key_access(POLICY, identity, request).allowed


@pytest.mark.parametrize("with_identity_policy", [False, True])
@pytest.mark.parametrize("action", KEY_RESOURCE_ACTIONS)
def test_key_administrators(action: str, with_identity_policy: bool) -> None:
    """Administrators manage but never use the key, even with an identity policy of kms:*."""
    got = allowed(ADMIN, action, with_identity_policy)
    if action in ADMIN_NEVER:
        assert not got
    elif with_identity_policy:
        assert got
    else:
        assert got is (action in ADMIN_BY_KEY_POLICY)


@pytest.mark.parametrize("with_identity_policy", [False, True])
@pytest.mark.parametrize("action", KEY_RESOURCE_ACTIONS)
def test_key_users(action: str, with_identity_policy: bool) -> None:
    """Users use but never manage the key (no ScheduleKeyDeletion), whatever IAM says."""
    assert allowed(USER, action, with_identity_policy) is (action in USER_ALLOWED)


@pytest.mark.parametrize("action", KEY_RESOURCE_ACTIONS)
def test_others_and_root(action: str) -> None:
    """Other credentials get nothing without an identity policy; the root keeps everything."""
    assert not allowed(OTHER, action, False)
    assert allowed(ROOT, action, False)


def test_the_duties_do_not_overlap() -> None:
    """No action is open to both administrators and users except DescribeKey."""
    admin = {a for a in KEY_RESOURCE_ACTIONS if allowed(ADMIN, a, True)}
    user = {a for a in KEY_RESOURCE_ACTIONS if allowed(USER, a, True)}
    assert admin & user == {"kms:DescribeKey"}
    assert "kms:ScheduleKeyDeletion" in admin
    assert "kms:ScheduleKeyDeletion" not in user
    assert "kms:Decrypt" in user
    assert "kms:Decrypt" not in admin


def test_denials_name_the_statement() -> None:
    """An administrator's Decrypt is an explicit deny by the administrators' Deny statement."""
    decision = evaluate_key_access(
        POLICY, EVERYTHING, AccessRequest(ADMIN, ACCOUNT, "kms:Decrypt", KEY)
    )
    assert decision.outcome is Outcome.EXPLICIT_DENY
    assert decision.sid == "Key administrators never use the key"
    decision = evaluate_key_access(
        POLICY, None, AccessRequest(USER, ACCOUNT, "kms:ScheduleKeyDeletion", KEY)
    )
    assert decision.outcome is Outcome.EXPLICIT_DENY
    assert decision.sid == "Key users only use the key"


def test_example_passes_the_lockout_check() -> None:
    """The administrators (and root) can still update the policy; a user could not set it."""
    lockout_check(POLICY, ADMIN, None)
    lockout_check(POLICY, ROOT, None)
    with pytest.raises(MalformedPolicyDocumentException, match="will not allow you to update"):
        lockout_check(POLICY, USER, EVERYTHING)
    assert json.loads(POLICY.text)["Id"] == "separation-of-duties"
