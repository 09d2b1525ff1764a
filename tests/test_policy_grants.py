"""Grants, the pure part: operations per key type, constraints, and child-grant strictness."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest

from hsmkms.policy import GrantConstraints, grant_allows
from hsmkms.service.operations import (
    ENCRYPTION_CONTEXT_OPERATIONS,
    GRANT_OPERATIONS,
    bound_to_encryption_context,
    valid_grant_operations,
)

EC = {"Dept": "hr", "Project": "apollo"}


def allows(
    operations: Collection[str],
    constraints: GrantConstraints | None,
    action: str,
    context: Mapping[str, str] | None,
    *,
    child_constraints: GrantConstraints | None = None,
) -> bool:
    """grant_allows as the service calls it: constraints bind the operations the descriptors
    say take an encryption context."""
    return grant_allows(
        operations,
        constraints,
        action,
        context,
        bound_to_context=bound_to_encryption_context(action),
        child_constraints=child_constraints,
    )


def test_symmetric_operations() -> None:
    """A symmetric ENCRYPT_DECRYPT key takes exactly the eleven documented grant operations."""
    assert valid_grant_operations("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT") == frozenset(
        {
            "Decrypt",
            "Encrypt",
            "GenerateDataKey",
            "GenerateDataKeyWithoutPlaintext",
            "ReEncryptFrom",
            "ReEncryptTo",
            "CreateGrant",
            "RetireGrant",
            "DescribeKey",
            "GenerateDataKeyPair",
            "GenerateDataKeyPairWithoutPlaintext",
        }
    )
    symmetric = valid_grant_operations("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    assert {g.value for g in GRANT_OPERATIONS} >= symmetric
    assert "Sign" not in symmetric


@pytest.mark.parametrize(
    ("spec", "usage", "present", "absent"),
    [
        ("RSA_2048", "ENCRYPT_DECRYPT", "GetPublicKey", "GenerateDataKey"),
        ("RSA_2048", "SIGN_VERIFY", "Sign", "Decrypt"),
        ("ECC_NIST_P256", "SIGN_VERIFY", "Verify", "Encrypt"),
        ("HMAC_256", "GENERATE_VERIFY_MAC", "GenerateMac", "Sign"),
        ("ECC_NIST_P256", "KEY_AGREEMENT", "DeriveSharedSecret", "Sign"),
        ("UNKNOWN", "UNKNOWN", "DescribeKey", "Decrypt"),
    ],
)
def test_operations_by_key_type(spec: str, usage: str, present: str, absent: str) -> None:
    """Each key type admits its own operations and not the others'."""
    valid = valid_grant_operations(spec, usage)
    assert present in valid
    assert absent not in valid
    assert {"CreateGrant", "RetireGrant", "DescribeKey"} <= valid
    assert valid <= {g.value for g in GRANT_OPERATIONS}


def test_operation_must_be_granted() -> None:
    """Only the listed operations are allowed; the kms: prefix is optional."""
    assert allows({"Decrypt"}, None, "kms:Decrypt", EC)
    assert allows({"Decrypt"}, None, "Decrypt", None)
    assert not allows({"Decrypt"}, None, "kms:Encrypt", EC)
    assert not allows({"Decrypt"}, None, "kms:decrypt", EC)  # enum values are exact
    assert allows({"ReEncryptFrom"}, None, "kms:ReEncryptFrom", EC)
    assert not allows({"ReEncryptFrom"}, None, "kms:ReEncryptTo", EC)


@pytest.mark.parametrize(
    ("request_context", "allowed"),
    [
        ({"Dept": "hr", "Project": "apollo"}, True),
        ({"dept": "hr", "PROJECT": "apollo"}, True),  # keys case-insensitive
        ({"Dept": "HR", "Project": "apollo"}, False),  # values case-sensitive
        ({"Dept": "hr"}, False),  # missing pair
        ({"Dept": "hr", "Project": "apollo", "Extra": "x"}, False),  # extra pair
        ({}, False),
        ({"Dept": "hr", "dept": "hr", "Project": "apollo"}, False),  # colliding keys: refuse
    ],
)
def test_encryption_context_equals(request_context: dict[str, str], allowed: bool) -> None:
    """EncryptionContextEquals: the request context must be exactly the constraint."""
    constraints = GrantConstraints(encryption_context_equals=EC)
    assert allows({"Decrypt"}, constraints, "kms:Decrypt", request_context) is allowed


@pytest.mark.parametrize(
    ("request_context", "allowed"),
    [
        ({"Dept": "hr", "Project": "apollo"}, True),
        ({"Dept": "hr", "Project": "apollo", "Extra": "x"}, True),  # superset is fine
        ({"DEPT": "hr", "project": "apollo"}, True),
        ({"Dept": "hr"}, False),
        ({"Dept": "hr", "Project": "Apollo"}, False),
        ({}, False),
    ],
)
def test_encryption_context_subset(request_context: dict[str, str], allowed: bool) -> None:
    """EncryptionContextSubset: the request context must contain every constraint pair."""
    constraints = GrantConstraints(encryption_context_subset=EC)
    assert allows({"Encrypt"}, constraints, "kms:Encrypt", request_context) is allowed
    assert allows({"Encrypt"}, constraints, "kms:Encrypt", None) is False


def test_both_constraints_must_hold() -> None:
    """With both constraints set, a request must satisfy both."""
    constraints = GrantConstraints(
        encryption_context_equals=EC, encryption_context_subset={"Dept": "hr"}
    )
    assert allows({"Decrypt"}, constraints, "Decrypt", EC)
    contradictory = GrantConstraints(
        encryption_context_equals=EC, encryption_context_subset={"Dept": "it"}
    )
    assert not allows({"Decrypt"}, contradictory, "Decrypt", EC)


def test_constraints_do_not_restrict_operations_without_context() -> None:
    """DescribeKey and RetireGrant are not restricted by EC constraints."""
    constraints = GrantConstraints(encryption_context_equals=EC)
    assert allows({"DescribeKey", "RetireGrant"}, constraints, "kms:DescribeKey", None)
    assert allows({"DescribeKey", "RetireGrant"}, constraints, "kms:RetireGrant", {})
    for operation in ENCRYPTION_CONTEXT_OPERATIONS:
        assert not allows({operation}, constraints, operation, {})


def test_empty_constraints_are_no_constraints() -> None:
    """GrantConstraints() with nothing set restricts nothing."""
    assert GrantConstraints().empty
    assert allows({"Decrypt"}, GrantConstraints(), "Decrypt", {"any": "thing"})


@pytest.mark.parametrize(
    ("parent", "child", "allowed"),
    [
        (GrantConstraints(), None, True),
        (GrantConstraints(encryption_context_subset={"Dept": "hr"}), None, False),
        (
            GrantConstraints(encryption_context_subset={"Dept": "hr"}),
            GrantConstraints(encryption_context_subset={"dept": "hr", "Project": "x"}),
            True,
        ),
        (
            GrantConstraints(encryption_context_subset={"Dept": "hr"}),
            GrantConstraints(encryption_context_subset={"Project": "x"}),
            False,
        ),
        (
            GrantConstraints(encryption_context_subset={"Dept": "hr"}),
            GrantConstraints(encryption_context_equals={"Dept": "hr", "Project": "x"}),
            True,
        ),
        (
            GrantConstraints(encryption_context_subset={"Dept": "hr"}),
            GrantConstraints(encryption_context_equals={"Dept": "it"}),
            False,
        ),
        (
            GrantConstraints(encryption_context_equals=EC),
            GrantConstraints(encryption_context_equals={"dept": "hr", "project": "apollo"}),
            True,
        ),
        (
            GrantConstraints(encryption_context_equals=EC),
            GrantConstraints(encryption_context_subset=EC),
            False,
        ),
        (GrantConstraints(encryption_context_equals=EC), GrantConstraints(), False),
        (
            GrantConstraints(encryption_context_equals=EC),
            GrantConstraints(encryption_context_equals={"a": "1", "A": "2"}),  # admits nothing
            True,
        ),
    ],
)
def test_child_grants_must_be_at_least_as_strict(
    parent: GrantConstraints, child: GrantConstraints | None, allowed: bool
) -> None:
    """A constrained grant allowing CreateGrant only permits equally or more strict children."""
    assert (
        allows({"CreateGrant"}, parent, "kms:CreateGrant", None, child_constraints=child) is allowed
    )
