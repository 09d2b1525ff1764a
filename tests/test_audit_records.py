"""Audit records: the CloudTrail shape, the allow-lists that keep secrets out, canonical JSON."""

from __future__ import annotations

import base64
import datetime as dt
import json
import typing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from hsmkms import models as m
from hsmkms.audit.records import (
    REQUEST_FIELDS,
    RESPONSE_FIELDS,
    UserIdentity,
    api_call_record,
    canonical_json,
    key_id_of,
    service_event_record,
)
from hsmkms.service.operations import OPERATIONS, READ_ONLY_OPERATIONS

ACCOUNT = "111122223333"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ALICE = UserIdentity(
    type="IAMUser",
    principal_id="AIDAALICE",
    arn=f"arn:aws:iam::{ACCOUNT}:user/alice",
    account_id=ACCOUNT,
    access_key_id="AKIAALICE",
    user_name="alice",
)
WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)

# Request members that must never be logged. A new member in the wire models has to be put
# either here or in REQUEST_FIELDS (test_every_request_member_is_classified).
NOT_LOGGED = frozenset(
    {
        "Plaintext",
        "CiphertextBlob",
        "GrantTokens",
        "GrantToken",
        "Message",
        "Signature",
        "Mac",
        "PublicKey",
        "SharedSecretCiphertextBlob",
        "EncryptedKeyMaterial",
        "ImportToken",
        "KeyStorePassword",
        "XksProxyAuthenticationCredential",
    }
)

SECRET = b"top-secret plaintext \x00\xff"
DATA_KEY = bytes(range(32))
BLOB = b"\x01ciphertext-blob-bytes" + bytes(40)


def call(event: str = "Encrypt", **kwargs: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "identity": ALICE,
        "account_id": ACCOUNT,
        "region": "us-east-1",
        "request_id": "req-1",
        "key_arns": [KEY_ARN],
        "source_ip": "127.0.0.1",
        "user_agent": "boto3/1.35",
        "event_time": WHEN,
        "read_only": event in READ_ONLY_OPERATIONS,
    }
    values.update(kwargs)
    return api_call_record(event, **values)


def test_api_call_record_has_the_cloudtrail_shape() -> None:
    record = call(
        request={"KeyId": KEY_ARN, "EncryptionContext": {"purpose": "test"}},
        additional_event_data={"keyVersion": 3},
    )
    assert record["eventVersion"] == "1.08"
    assert record["eventTime"] == "2026-01-02T03:04:05Z"
    assert record["eventSource"] == "kms.amazonaws.com"
    assert record["eventName"] == "Encrypt"
    assert record["userIdentity"] == {
        "type": "IAMUser",
        "principalId": "AIDAALICE",
        "arn": f"arn:aws:iam::{ACCOUNT}:user/alice",
        "accountId": ACCOUNT,
        "accessKeyId": "AKIAALICE",
        "userName": "alice",
    }
    assert record["requestParameters"] == {
        "keyId": KEY_ARN,
        "encryptionContext": {"purpose": "test"},
    }
    assert record["responseElements"] is None
    assert record["readOnly"] is True
    assert record["resources"] == [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": KEY_ARN}]
    assert record["eventType"] == "AwsApiCall"
    assert record["managementEvent"] is True
    assert record["eventCategory"] == "Management"
    assert record["recipientAccountId"] == ACCOUNT
    assert record["additionalEventData"] == {"keyVersion": 3}
    assert record["requestID"] == "req-1"
    assert len(record["eventID"]) == 36
    assert "errorCode" not in record


def test_event_ids_are_fresh_uuids() -> None:
    assert call()["eventID"] != call()["eventID"]


def test_failed_call_carries_error_code_and_message_and_no_response() -> None:
    record = call(
        "CreateKey",
        response={"KeyMetadata": {"KeyId": "x"}},
        error_code="AccessDeniedException",
        error_message="User: arn is not authorized to perform: kms:CreateKey",
    )
    assert record["errorCode"] == "AccessDeniedException"
    assert record["errorMessage"].startswith("User: arn is not authorized")
    assert record["responseElements"] is None
    assert record["readOnly"] is False


def test_decrypt_always_logs_the_encryption_algorithm() -> None:
    record = call("Decrypt", request={"CiphertextBlob": BLOB})
    assert record["requestParameters"] == {"encryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def test_create_key_logs_allow_listed_key_metadata() -> None:
    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    record = call(
        "CreateKey",
        request={"Description": "d", "KeyUsage": "ENCRYPT_DECRYPT", "Tags": [
            {"TagKey": "team", "TagValue": "a"}]},
        response={"KeyMetadata": {"KeyId": "k", "Arn": KEY_ARN, "AWSAccountId": ACCOUNT,
                                  "CreationDate": created, "Enabled": True, "Unknown": "x"}},
    )  # fmt: skip
    assert record["requestParameters"] == {
        "description": "d",
        "keyUsage": "ENCRYPT_DECRYPT",
        "tags": [{"tagKey": "team", "tagValue": "a"}],
    }
    assert record["responseElements"] == {
        "keyMetadata": {
            "keyId": "k",
            "arn": KEY_ARN,
            "aWSAccountId": ACCOUNT,
            "creationDate": "2026-01-01T00:00:00Z",
            "enabled": True,
        }
    }


def test_create_grant_logs_the_grant_id_but_never_the_grant_token() -> None:
    record = call(
        "CreateGrant",
        request={"KeyId": "k", "GranteePrincipal": "arn:p", "Operations": ["Decrypt"],
                 "Constraints": {"EncryptionContextSubset": {"a": "b"}}},
        response={"GrantId": "g-1", "GrantToken": "bearer-token-value"},
    )  # fmt: skip
    assert record["responseElements"] == {"grantId": "g-1"}
    assert record["requestParameters"]["constraints"] == {"encryptionContextSubset": {"a": "b"}}
    assert "bearer-token-value" not in canonical_json(record).decode()


def test_service_event_record_shape() -> None:
    record = service_event_record(
        "RotateKey",
        account_id=ACCOUNT,
        region="us-east-1",
        key_arn=KEY_ARN,
        additional_event_data={"keyVersion": 2},
        event_time=WHEN,
    )
    assert record["eventType"] == "AwsServiceEvent"
    assert record["userIdentity"] == {"accountId": ACCOUNT, "invokedBy": "kms.amazonaws.com"}
    assert record["serviceEventDetails"] == {"keyId": key_id_of(KEY_ARN)}
    assert record["resources"][0]["ARN"] == KEY_ARN
    assert record["requestParameters"] is None
    assert record["readOnly"] is False


def test_service_provided_members_outside_the_allow_list_are_refused() -> None:
    with pytest.raises(ValueError, match="not an allowed member"):
        call(additional_event_data={"plaintext": "x"})
    with pytest.raises(ValueError, match="must be a string"):
        call(additional_event_data={"keyVersion": b"\x01"})
    with pytest.raises(ValueError, match="not an allowed member"):
        service_event_record(
            "DeleteKey", account_id=ACCOUNT, region="r", key_arn=KEY_ARN, details={"secret": "x"}
        )


def test_naive_event_time_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        call(event_time=dt.datetime(2026, 1, 1))


def _secret_forms(value: bytes) -> list[bytes]:
    return [value, base64.b64encode(value), value.hex().encode(), value[:16]]


def test_no_secret_reaches_a_record_whatever_the_request_holds() -> None:
    """Plaintext, data keys, ciphertext blobs and tokens are dropped, even when they arrive in
    an allow-listed member with the wrong shape or are echoed by an error message."""
    records = [
        call("Encrypt", request={"KeyId": KEY_ARN, "Plaintext": SECRET, "GrantTokens": ["gt-1"]}),
        call(
            "GenerateDataKey",
            request={"KeyId": KEY_ARN, "KeySpec": "AES_256"},
            response={"Plaintext": DATA_KEY, "CiphertextBlob": BLOB, "KeyId": KEY_ARN},
        ),
        call("CreateKey", request={"Description": SECRET}, response={"KeyId": DATA_KEY}),
        call("Decrypt", request={"CiphertextBlob": BLOB, "EncryptionContext": {"k": SECRET}}),
        call(
            "Encrypt",
            request={"KeyId": KEY_ARN, "Plaintext": SECRET},
            error_code="ValidationException",
            error_message=f"Value '{base64.b64encode(SECRET).decode()}' at 'plaintext' failed "
            f"({SECRET.decode('utf-8', 'ignore')})",
        ),
        call("ReEncrypt", request={"CiphertextBlob": BLOB, "DestinationKeyId": KEY_ARN}),
        call("GenerateRandom", request={"NumberOfBytes": 32}, response={"Plaintext": DATA_KEY}),
    ]
    joined = b"\n".join(canonical_json(r) for r in records)
    for secret in (SECRET, DATA_KEY, BLOB):
        for form in _secret_forms(secret):
            assert form not in joined
    assert b"gt-1" not in joined
    assert b"[omitted]" in joined  # the error message kept its shape, minus the secret


def test_wire_models_are_accepted_and_blobs_never_kept() -> None:
    request = m.EncryptRequest(KeyId=KEY_ARN, Plaintext=SECRET, EncryptionContext={"a": "b"})
    record = call("Encrypt", request=request)
    assert record["requestParameters"] == {"keyId": KEY_ARN, "encryptionContext": {"a": "b"}}
    assert SECRET not in canonical_json(record)


def _members(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_request_member_is_classified() -> None:
    """A member added to a wire request model must be allow-listed or declared not logged."""
    unclassified = {
        f"{name}.{member}"
        for name, op in OPERATIONS.items()
        if op.request_model is not None
        for member in _members(op.request_model)
        if member not in REQUEST_FIELDS and member not in NOT_LOGGED
    }
    assert all(op.request_model is not None for op in OPERATIONS.values())
    assert not unclassified


def test_allow_lists_name_no_secret_member() -> None:
    assert not NOT_LOGGED & set(REQUEST_FIELDS)
    assert not {"Plaintext", "CiphertextBlob", "GrantToken"} & set(RESPONSE_FIELDS)


def test_blob_members_of_the_wire_models_are_not_allow_listed() -> None:
    for op in OPERATIONS.values():
        for model in (op.request_model, op.response_model):
            assert model is not None
            for name, field in model.model_fields.items():
                if _is_bytes(field.annotation):
                    assert name not in REQUEST_FIELDS
                    assert name not in RESPONSE_FIELDS


def _is_bytes(annotation: Any) -> bool:
    if annotation is bytes:
        return True
    return any(_is_bytes(a) for a in typing.get_args(annotation))


# -- canonical JSON ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_canonical_json_is_stable_through_a_round_trip(value: Any) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded
    encoded.decode("ascii")  # ASCII only: no encoding ambiguity


@given(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=6), st.randoms())
def test_canonical_json_ignores_key_order(value: dict[str, Any], rnd: Any) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert canonical_json(dict(items)) == canonical_json(value)


def test_canonical_json_refuses_bytes_and_nan() -> None:
    with pytest.raises(TypeError):
        canonical_json({"a": b"x"})
    with pytest.raises(ValueError, match="not JSON compliant"):
        canonical_json({"a": float("nan")})


def test_canonical_json_has_no_whitespace_and_sorted_keys() -> None:
    assert canonical_json({"b": [1, {"d": 2, "c": None}], "a": "é"}) == (
        b'{"a":"\\u00e9","b":[1,{"c":null,"d":2}]}'
    )


member_names = st.sampled_from(sorted(set(REQUEST_FIELDS) | NOT_LOGGED)) | st.text(max_size=12)


@given(
    st.dictionaries(member_names, st.binary(min_size=8, max_size=40), max_size=6),
    st.sampled_from(["Encrypt", "Decrypt", "CreateKey", "CreateGrant", "GenerateDataKey"]),
)
def test_bytes_in_any_member_never_reach_the_record(request: dict[str, bytes], event: str) -> None:
    record = canonical_json(call(event, request=request, response=request))
    for value in request.values():
        assert base64.b64encode(value) not in record
        assert value.hex().encode() not in record


# -- bounded records ------------------------------------------------------------------------------


def _huge_requests() -> list[tuple[str, dict[str, Any]]]:
    """Requests of about 1 MiB each (the largest body the API reads), built to make the
    biggest records: control characters and astral characters are escaped by canonical JSON
    (one byte can become six)."""
    escaped = "\x01" * 170_000 + "\U0001f600" * 40_000
    return [
        ("Encrypt", {"KeyId": "k", "EncryptionContext": {"k": escaped}}),
        (
            "ReEncrypt",
            {
                "DestinationKeyId": "k",
                "SourceEncryptionContext": {"a": escaped[:100_000]},
                "DestinationEncryptionContext": {"b": escaped[100_000:]},
            },
        ),
        ("CreateKey", {"Description": escaped, "Policy": escaped[:50_000]}),
        ("TagResource", {"KeyId": "k", "Tags": [{"TagKey": "t", "TagValue": escaped}]}),
        ("UntagResource", {"KeyId": "k", "TagKeys": ["\x02" * 100] * 2000}),
        ("CreateAlias", {"AliasName": escaped, "TargetKeyId": escaped}),
    ]


@pytest.mark.parametrize(("name", "request_members"), _huge_requests(), ids=lambda v: str(v)[:16])
def test_a_huge_request_makes_a_bounded_record(name: str, request_members: dict[str, Any]) -> None:
    """Whatever a request carries, its record stays small: requestParameters at most 64 KiB
    (the largest members replaced by a marker), errorMessage at most 2,048 characters — also
    for a denied request, whose message repeats the request. The fast encoder agrees."""
    from hsmkms.audit.records import (
        MAX_ERROR_MESSAGE,
        MAX_REQUEST_PARAMETERS,
        prepare_api_call,
        prepare_record,
    )

    message = "User: x is not authorized: " + json.dumps(request_members)
    kwargs: dict[str, Any] = {
        "identity": ALICE,
        "account_id": ACCOUNT,
        "region": "us-east-1",
        "request_id": "req-1",
        "read_only": False,
        "request": request_members,
        "error_code": "AccessDeniedException",
        "error_message": message,
        "event_time": WHEN,
        "event_id": "e",
    }
    record = api_call_record(name, **kwargs)
    params = record["requestParameters"]
    assert len(canonical_json(params)) <= MAX_REQUEST_PARAMETERS
    assert any(isinstance(v, str) and v.startswith("[omitted: ") for v in params.values())
    assert len(record["errorMessage"]) <= MAX_ERROR_MESSAGE
    assert record["errorMessage"].endswith("...[truncated]")
    body = canonical_json(record)
    assert len(body) < MAX_REQUEST_PARAMETERS + 6 * MAX_ERROR_MESSAGE + 4096
    assert prepare_api_call(name, **kwargs) == prepare_record(record)


def test_a_request_within_the_bound_is_recorded_whole() -> None:
    context = {f"key{i}": "v" * 100 for i in range(60)}  # ~7 KiB, a valid context
    record = api_call_record(
        "Encrypt",
        identity=ALICE,
        account_id=ACCOUNT,
        region="us-east-1",
        request_id="r",
        read_only=True,
        request={"KeyId": "k", "EncryptionContext": context},
    )
    assert record["requestParameters"]["encryptionContext"] == context
