"""``KmsModel.trusted``: the answers the service builds on its hot path are the instances
pydantic's ``model_construct`` makes (equal, same members set, same dump, same repr, same wire
form), and with a default factory it is ``model_construct`` itself."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from hsmkms import models as m
from hsmkms.api.protocol import encode_response
from hsmkms.models.base import KmsModel

ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
CASES: list[tuple[type[KmsModel], dict[str, Any]]] = [
    (
        m.EncryptResponse,
        {
            "CiphertextBlob": b"c" * 80,
            "KeyId": ARN,
            "EncryptionAlgorithm": m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT,
        },
    ),
    (
        m.DecryptResponse,
        {
            "KeyId": ARN,
            "Plaintext": b"p",
            "EncryptionAlgorithm": m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT,
            "KeyMaterialId": "a" * 64,
        },
    ),
    # A member left out takes its default, and is not among the members set.
    (
        m.DecryptResponse,
        {
            "KeyId": ARN,
            "Plaintext": b"p",
            "EncryptionAlgorithm": m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT,
        },
    ),
    (
        m.GenerateDataKeyResponse,
        {"CiphertextBlob": b"c", "Plaintext": b"k" * 32, "KeyId": ARN, "KeyMaterialId": None},
    ),
    (m.GenerateDataKeyWithoutPlaintextResponse, {"CiphertextBlob": b"c", "KeyId": ARN}),
]


@pytest.mark.parametrize(("model", "values"), CASES)
def test_trusted_is_model_construct(model: type[KmsModel], values: dict[str, Any]) -> None:
    fast, slow = model.trusted(**values), model.model_construct(**values)
    assert type(fast) is model
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set == set(values)
    assert fast.model_dump() == slow.model_dump()
    assert repr(fast) == repr(slow)
    assert "Plaintext=" not in repr(fast)  # a secret's repr=False holds
    assert encode_response(fast) == encode_response(slow)
    with pytest.raises(ValueError, match="frozen"):
        setattr(fast, "KeyId", "other")  # noqa: B010 - the model's type has no KeyId


class WithFactory(KmsModel):
    Items: list[str] = Field(default_factory=list)


def test_a_default_factory_makes_a_new_default_each_time() -> None:
    first, second = WithFactory.trusted(), WithFactory.trusted()
    assert first.Items == [] == second.Items
    assert first.Items is not second.Items
