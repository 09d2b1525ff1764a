"""The rules of an encryption context, without HTTP: keys that differ only in case are refused
(they would be one condition key with two values), and the context is bounded (8,192 bytes
encoded). Property tests hold the validator, the ciphertext's canonical encoding and the policy
engine together; the same rules through the real server are in tests/test_api_security.py."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hsmkms.ciphertext import encode_encryption_context
from hsmkms.errors import ValidationException
from hsmkms.models import (
    CreateGrantRequest,
    DecryptRequest,
    EncryptRequest,
    GenerateDataKeyRequest,
    GenerateDataKeyWithoutPlaintextRequest,
    ReEncryptRequest,
    validate_request,
)
from hsmkms.models.base import MAX_ENCRYPTION_CONTEXT_BYTES
from hsmkms.models.constraints import EncryptionContextRules
from hsmkms.models.grants import GrantConstraints
from hsmkms.policy import (
    AccessRequest,
    Outcome,
    evaluate_key_access,
    parse_identity_policy,
    parse_policy,
    request_context,
)
from hsmkms.policy.context import check_encryption_context_keys

RULES = EncryptionContextRules(MAX_ENCRYPTION_CONTEXT_BYTES)
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
USER = "arn:aws:iam::111122223333:user/tenant-a"

# Keys and values as a client may send them: any Unicode except lone surrogates (not JSON text).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
keys = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=24)
contexts = st.dictionaries(keys, text, max_size=8)


def _collides(context: dict[str, str]) -> bool:
    return len({k.lower() for k in context}) != len(context)


def _collision_clause(context: dict[str, str]) -> bool:
    return any("differ only in case" in p for p in RULES.problems("encryptionContext", context))


# -- case collisions --------------------------------------------------------------------------


@given(contexts)
def test_a_collision_is_reported_exactly_when_two_keys_fold_to_one(context: dict[str, str]) -> None:
    """The validator refuses a context exactly when two of its keys are one condition key for
    the policy engine (the engine folds names with ``str.lower``)."""
    assert _collision_clause(context) == _collides(context)


@given(contexts, st.data())
def test_adding_a_case_variant_of_a_key_is_always_refused(
    context: dict[str, str], data: st.DataObject
) -> None:
    """Whatever the context, adding another spelling of one of its keys (any case change that
    folds to the same name) makes it invalid, wherever the variant lands in the map."""
    assume(context)
    original = data.draw(st.sampled_from(sorted(context)))
    variant = data.draw(
        st.sampled_from(
            sorted({original.upper(), original.lower(), original.swapcase(), original.title()})
        )
    )
    assume(variant != original and variant.lower() == original.lower())
    mixed = {**context, variant: data.draw(text)}
    assert _collision_clause(mixed)
    with pytest.raises(ValueError, match="differ only in case"):
        request_context(encryption_context=mixed)


@given(contexts)
def test_the_engine_sees_one_value_per_key_of_a_valid_context(context: dict[str, str]) -> None:
    """For a context the validator accepts, ``kms:EncryptionContext:<k>`` (named in any case)
    is exactly the one value of the key, never a merged list; ``kms:EncryptionContextKeys`` is
    the keys as sent."""
    assume(not _collides(context))
    values = request_context(encryption_context=context)
    for name, value in context.items():
        for spelling in (name, name.lower(), name.upper(), name.swapcase()):
            if spelling.lower() == name.lower():  # not so for every letter: "ß".upper() == "SS"
                assert values[f"KMS:EncryptionContext:{spelling}"] == value
    assert values["kms:EncryptionContextKeys"] == tuple(context)


def test_check_encryption_context_keys_names_no_value() -> None:
    with pytest.raises(ValueError, match="differ only in case") as info:
        check_encryption_context_keys({"tenant": "secret-ish-B", "Tenant": "secret-ish-A"})
    assert "secret-ish" not in str(info.value)
    check_encryption_context_keys({"tenant": "A", "tenant2": "B"})  # distinct keys: fine


@pytest.mark.parametrize(
    "request_model",
    [
        lambda ctx: EncryptRequest(KeyId="k", Plaintext=b"x", EncryptionContext=ctx),
        lambda ctx: DecryptRequest(CiphertextBlob=b"x", EncryptionContext=ctx),
        lambda ctx: ReEncryptRequest(
            CiphertextBlob=b"x", DestinationKeyId="k", SourceEncryptionContext=ctx
        ),
        lambda ctx: ReEncryptRequest(
            CiphertextBlob=b"x", DestinationKeyId="k", DestinationEncryptionContext=ctx
        ),
        lambda ctx: GenerateDataKeyRequest(KeyId="k", NumberOfBytes=32, EncryptionContext=ctx),
        lambda ctx: GenerateDataKeyWithoutPlaintextRequest(
            KeyId="k", NumberOfBytes=32, EncryptionContext=ctx
        ),
        lambda ctx: CreateGrantRequest(
            KeyId="k",
            GranteePrincipal=USER,
            Operations=["Encrypt"],
            Constraints=GrantConstraints(EncryptionContextSubset=ctx),
        ),
        lambda ctx: CreateGrantRequest(
            KeyId="k",
            GranteePrincipal=USER,
            Operations=["Encrypt"],
            Constraints=GrantConstraints(EncryptionContextEquals=ctx),
        ),
    ],
    ids=[
        "Encrypt",
        "Decrypt",
        "ReEncrypt-source",
        "ReEncrypt-destination",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "CreateGrant-subset",
        "CreateGrant-equals",
    ],
)
def test_every_request_carrying_a_context_refuses_a_collision(request_model: object) -> None:
    build = request_model
    assert callable(build)
    validate_request(build({"tenant": "A", "team": "x"}))  # distinct keys pass
    with pytest.raises(ValidationException) as info:
        validate_request(build({"tenant": "B", "Tenant": "A"}))
    message = info.value.message
    assert message.startswith("1 validation error detected: Value at '")
    assert "failed to satisfy constraint: Member must not have keys that differ only in case" in (
        message
    )
    assert "('tenant' and 'Tenant')" in message


def test_a_collision_message_clips_long_keys() -> None:
    long_key = "k" * 500
    problems = RULES.problems("encryptionContext", {long_key: "1", long_key.upper(): "2"})
    assert len(problems) == 1
    assert len(problems[0]) < 300


# -- the policy decision a collision used to subvert -------------------------------------------

CONFINED = parse_identity_policy(
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:Encrypt",'
    '"Resource":"*","Condition":{"StringEquals":{"kms:EncryptionContext:tenant":"A"}}}]}'
)
DENY_OTHERS = parse_policy(
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":'
    '"arn:aws:iam::111122223333:root"},"Action":"kms:*","Resource":"*"},{"Effect":"Deny",'
    '"Principal":"*","Action":"kms:Encrypt","Resource":"*","Condition":{"StringNotEquals":'
    '{"kms:EncryptionContext:tenant":"A"}}}]}'
)


@settings(max_examples=200)
@given(st.sampled_from(["tenant", "Tenant", "TENANT", "tEnAnT"]), text)
def test_a_principal_confined_to_one_tenant_is_allowed_only_that_tenant(
    spelling: str, value: str
) -> None:
    """With the key named in any case (one spelling per valid context), the confined principal
    is allowed exactly when the value is A, and the Deny with StringNotEquals applies exactly
    when it is not."""
    context = request_context(
        principal_arn=USER, caller_account="111122223333", encryption_context={spelling: value}
    )
    access = AccessRequest(USER, "111122223333", "kms:Encrypt", KEY_ARN, context)
    decision = evaluate_key_access(DENY_OTHERS, CONFINED, access)
    if value == "A":
        assert decision.allowed
    else:
        assert decision.outcome is Outcome.EXPLICIT_DENY


# -- the bound ---------------------------------------------------------------------------------


def _encoded_length(context: dict[str, str]) -> int:
    return len(encode_encryption_context(context))


@given(
    st.dictionaries(
        keys, st.text(st.characters(exclude_categories=["Cs"]), max_size=3000), max_size=6
    )
)
def test_the_bound_is_the_size_of_the_canonical_encoding(context: dict[str, str]) -> None:
    """The size the validator measures is exactly the length of the ciphertext's canonical
    encoding of the context (the AAD it becomes), so the limit means what the docs say."""
    too_big = any("encoded length" in p for p in RULES.problems("encryptionContext", context))
    assert too_big == (_encoded_length(context) > MAX_ENCRYPTION_CONTEXT_BYTES)


def test_the_bound_is_inclusive() -> None:
    # 2 + (4 + 1 + n) = 8192 exactly
    exact = {"k": "v" * (MAX_ENCRYPTION_CONTEXT_BYTES - 7)}
    assert _encoded_length(exact) == MAX_ENCRYPTION_CONTEXT_BYTES
    assert RULES.problems("encryptionContext", exact) == []
    over = {"k": "v" * (MAX_ENCRYPTION_CONTEXT_BYTES - 6)}
    (problem,) = RULES.problems("encryptionContext", over)
    assert problem == (
        "Value at 'encryptionContext' failed to satisfy constraint: Member must have an encoded "
        "length less than or equal to 8192 bytes"
    )
    # Multi-byte characters count by their UTF-8 bytes: 3 bytes each here.
    euro = {"k": "\u20ac" * 2729}  # 2 + 4 + 1 + 8187 = 8194
    assert _encoded_length(euro) == 8194
    assert RULES.problems("encryptionContext", euro)


def test_an_oversized_context_is_never_echoed() -> None:
    huge = {"k": "secret-looking-value-" * 1000}
    with pytest.raises(ValidationException) as info:
        validate_request(EncryptRequest(KeyId="k", Plaintext=b"x", EncryptionContext=huge))
    assert "secret-looking-value" not in info.value.message
    assert len(info.value.message) < 300
