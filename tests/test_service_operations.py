"""The operation registry and the wire models, without a token: dispatch metadata, blob members,
AWS-worded validation, unknown members, secrets kept out of reprs."""

from __future__ import annotations

import inspect

import pydantic
import pytest

from hsmkms import models as m
from hsmkms.errors import ValidationException
from hsmkms.service import OPERATIONS, KmsService
from hsmkms.service.operations import blob_members

ISSUE_3_OPERATIONS = {
    "CreateKey", "DescribeKey", "ListKeys", "UpdateKeyDescription", "EnableKey", "DisableKey",
    "ScheduleKeyDeletion", "CancelKeyDeletion", "CreateAlias", "UpdateAlias", "DeleteAlias",
    "ListAliases", "TagResource", "UntagResource", "ListResourceTags", "Encrypt", "Decrypt",
    "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "GenerateRandom",
    "EnableKeyRotation", "DisableKeyRotation", "GetKeyRotationStatus", "RotateKeyOnDemand",
    "ListKeyRotations", "GetKeyPolicy", "PutKeyPolicy", "ListKeyPolicies",
}  # fmt: skip
GRANT_OPERATIONS = {
    "CreateGrant", "ListGrants", "ListRetirableGrants", "RetireGrant", "RevokeGrant",
}  # fmt: skip


def test_registry_covers_every_operation_of_the_issues() -> None:
    assert set(OPERATIONS) == ISSUE_3_OPERATIONS | GRANT_OPERATIONS


@pytest.mark.parametrize("name", sorted(ISSUE_3_OPERATIONS | GRANT_OPERATIONS))
def test_registry_entry_dispatches_to_a_typed_method(name: str) -> None:
    op = OPERATIONS[name]
    assert op.name == name
    method = getattr(KmsService, op.method)
    params = inspect.signature(method).parameters
    assert list(params) == ["self", "request", "caller"]
    assert params["caller"].default is None
    hints = inspect.get_annotations(method, eval_str=True)
    assert hints["request"] is op.request_model
    assert hints["return"] is op.response_model
    assert op.request_model.__name__ == f"{name}Request"


def test_blob_members() -> None:
    assert blob_members(m.EncryptRequest) == {"Plaintext"}
    assert blob_members(m.EncryptResponse) == {"CiphertextBlob"}
    assert blob_members(m.DecryptRequest) == {"CiphertextBlob"}
    assert blob_members(m.GenerateDataKeyResponse) == {"CiphertextBlob", "Plaintext"}
    assert blob_members(m.ReEncryptRequest) == {"CiphertextBlob"}
    assert blob_members(m.DescribeKeyRequest) == frozenset()


def test_unknown_members_are_ignored() -> None:
    request = m.DescribeKeyRequest.model_validate({"KeyId": "k", "SomethingNew": 1})
    assert request.KeyId == "k"


def test_several_validation_errors_in_one_message() -> None:
    request = m.ListKeysRequest(Limit=0, Marker="")
    with pytest.raises(ValidationException) as info:
        m.validate_request(request)
    assert info.value.message == (
        "2 validation errors detected: "
        "Value '0' at 'limit' failed to satisfy constraint: "
        "Member must have value greater than or equal to 1; "
        "Value '' at 'marker' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1"
    )


def test_pattern_message() -> None:
    with pytest.raises(ValidationException) as info:
        m.validate_request(m.CreateAliasRequest(AliasName="alias/a b", TargetKeyId="k"))
    assert info.value.message == (
        "1 validation error detected: Value 'alias/a b' at 'aliasName' failed to satisfy "
        "constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"
    )


def test_pydantic_errors_become_aws_validation_errors() -> None:
    with pytest.raises(pydantic.ValidationError) as missing:
        m.EncryptRequest.model_validate({"Plaintext": b"x"})
    assert m.from_pydantic_error(missing.value).message == (
        "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: "
        "Member must not be null"
    )
    with pytest.raises(pydantic.ValidationError) as enum:
        m.CreateKeyRequest.model_validate({"KeyUsage": "BOGUS"})
    message = m.from_pydantic_error(enum.value).message
    assert message.startswith("1 validation error detected: Value 'BOGUS' at 'keyUsage'")
    assert "Member must satisfy enum value set: [SIGN_VERIFY, ENCRYPT_DECRYPT" in message


def test_plaintext_members_never_show_in_repr() -> None:
    secret = b"do-not-print-me"
    for model in (
        m.EncryptRequest(KeyId="k", Plaintext=secret),
        m.DecryptResponse(
            KeyId="k",
            Plaintext=secret,
            EncryptionAlgorithm=m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT,
        ),
        m.GenerateDataKeyResponse(CiphertextBlob=b"c", Plaintext=secret, KeyId="k"),
        m.GenerateRandomResponse(Plaintext=secret),
    ):
        assert "do-not-print-me" not in repr(model)
        assert "do-not-print-me" not in str(model)


def test_blob_values_are_never_echoed_in_validation_messages() -> None:
    with pytest.raises(ValidationException) as info:
        m.validate_request(m.EncryptRequest(KeyId="k", Plaintext=b"s" * 4097))
    assert "sss" not in info.value.message
    assert "Value at 'plaintext'" in info.value.message
