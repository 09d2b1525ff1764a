"""The wire codec on plain values: request decoding driven by model annotations, response
encoding, and error bodies that never leak internal detail."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from typing import Annotated

import pytest
from pydantic import BaseModel

from hsmkms.api.protocol import (
    SERVER_FAULT_MESSAGE,
    check_content_type,
    decode_request,
    encode_error,
    encode_response,
    operation_name,
)
from hsmkms.errors import (
    DependencyTimeoutException,
    NotFoundException,
    SerializationException,
    UnknownOperationException,
    ValidationException,
)
from hsmkms.keystore.errors import PinIncorrect
from hsmkms.models import (
    EmptyResponse,
    EncryptRequest,
    GenerateDataKeyResponse,
    KmsModel,
    validate_request,
)
from hsmkms.models.constraints import Length
from hsmkms.models.enums import KeyState
from hsmkms.service import OPERATIONS


class Part(KmsModel):
    Blob: bytes | None = None
    Name: str


class Outer(KmsModel):
    Blobs: list[bytes] | None = None
    Child: Part | None = None
    Items: list[Part] | None = None
    Maybe: Annotated[bytes | None, Length(1, 10)] = None
    Count: int | None = None
    Ratio: float | None = None
    When: dt.datetime | None = None
    State: KeyState | None = None
    Flags: dict[str, bool] | None = None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_blobs_are_found_through_optional_annotated_lists_and_nested_models() -> None:
    body = {
        "Blobs": [b64(b"a"), b64(b"b")],
        "Child": {"Blob": b64(b"c"), "Name": "n"},
        "Items": [{"Blob": b64(b"d"), "Name": "m"}],
        "Maybe": b64(b"e"),
        "Count": 3.0,
        "Ratio": 2,
    }
    request = decode_request(Outer, json.dumps(body).encode())
    assert isinstance(request, Outer)
    assert request.Blobs == [b"a", b"b"]
    assert request.Child is not None
    assert request.Child.Blob == b"c"
    assert request.Items is not None
    assert request.Items[0].Blob == b"d"
    assert request.Maybe == b"e"
    assert request.Count == 3


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"Blobs": "x"}, "blobs"),
        ({"Blobs": [1]}, "blobs.1.member"),
        ({"Child": {"Name": 5}}, "child.name"),
        ({"Items": [{"Name": "a"}, {"Name": []}]}, "items.2.member.name"),
        ({"Count": True}, "count"),
        ({"Count": 1.5}, "count"),
        ({"Flags": {"a": "yes"}}, "flags.a"),
        ({"Maybe": "***"}, "maybe"),
    ],
)
def test_type_errors_name_the_member(body: dict[str, object], path: str) -> None:
    with pytest.raises(SerializationException) as info:
        decode_request(Outer, json.dumps(body).encode())
    assert f"'{path}'" in info.value.message


def test_base64_must_be_strict() -> None:
    with pytest.raises(SerializationException):
        decode_request(Outer, b'{"Maybe": "aGVsbG8=\\n!"}')


def test_plaintext_never_appears_in_any_message() -> None:
    secret = "c2VjcmV0LXBsYWludGV4dA=="  # valid base64 of a recognisable plaintext
    bodies = [
        {"Plaintext": secret},  # missing KeyId
        {"KeyId": "k", "Plaintext": base64.b64encode(b"s" * 5000).decode()},
        {"KeyId": "k", "Plaintext": secret + "!"},
        {"KeyId": "k", "Plaintext": secret, "EncryptionAlgorithm": "NOPE"},
    ]
    for body in bodies:
        with pytest.raises((SerializationException, ValidationException)) as info:
            validate_request(decode_request(EncryptRequest, json.dumps(body).encode()))
        assert secret not in str(info.value)
        assert "c2VjcmV0" not in str(info.value)


def test_missing_member_is_validation_exception() -> None:
    with pytest.raises(ValidationException, match="Value null at 'keyId'"):
        decode_request(EncryptRequest, b'{"Plaintext": "aGk="}')


def test_non_objects_and_bad_json_are_serialization_errors() -> None:
    for body in (b"[1]", b"{", b'{"a": NaN}', b'{"a": Infinity}', b"[" * 100_000):
        with pytest.raises(SerializationException):
            decode_request(Outer, body)


def test_response_encoding() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678_900, tzinfo=dt.UTC)
    body = json.loads(
        encode_response(
            Outer(
                Blobs=[b"\x00\xff"],
                Child=Part(Name="n"),
                When=when,
                State=KeyState.Enabled,
                Flags={"x": True},
            )
        )
    )
    assert body == {
        "Blobs": ["AP8="],
        "Child": {"Name": "n"},
        "When": 1767323045.679,
        "State": "Enabled",
        "Flags": {"x": True},
    }
    data_key = GenerateDataKeyResponse(CiphertextBlob=b"c", Plaintext=b"p", KeyId="k")
    assert json.loads(encode_response(data_key)) == {
        "CiphertextBlob": "Yw==",
        "Plaintext": "cA==",
        "KeyId": "k",
    }
    assert encode_response(EmptyResponse()) == b""


def test_client_errors_keep_their_message_and_400() -> None:
    status, body = encode_error(NotFoundException("Key 'x' does not exist"))
    assert status == 400
    assert json.loads(body) == {"__type": "NotFoundException", "message": "Key 'x' does not exist"}


def test_server_faults_hide_their_detail() -> None:
    status, body = encode_error(PinIncorrect("login to token 'hsmkms' failed: wrong PIN"))
    assert status == 500
    assert json.loads(body)["message"] == SERVER_FAULT_MESSAGE
    assert b"PIN" not in body
    status, body = encode_error(DependencyTimeoutException("database /srv/x.db is locked"))
    assert status == 503
    assert b"/srv" not in body
    status, body = encode_error(RuntimeError("internal detail"))
    assert (status, json.loads(body)["__type"]) == (500, "KMSInternalException")
    assert b"internal detail" not in body


def test_targets() -> None:
    assert operation_name("TrentService.Encrypt", OPERATIONS) == "Encrypt"
    for target in (None, "Encrypt", "TrentService.", "TrentService.encrypt", "X.Encrypt"):
        with pytest.raises(UnknownOperationException):
            operation_name(target, OPERATIONS)
    long = "TrentService." + "A" * 500
    with pytest.raises(UnknownOperationException) as info:
        operation_name(long, OPERATIONS)
    assert len(info.value.message) < 120


def test_content_types() -> None:
    for value in (None, "application/x-amz-json-1.1", "application/json; charset=utf-8"):
        check_content_type(value)
    for value in ("text/plain", "application/xml", ""):
        with pytest.raises(SerializationException):
            check_content_type(value)


def test_every_operation_model_decodes_an_empty_object_or_names_what_is_missing() -> None:
    """Each registered request model goes through the codec: {} decodes, or fails with an
    AWS-worded ValidationException; never anything else."""
    for operation in OPERATIONS.values():
        message = ""
        assert operation.request_model is not None
        assert operation.response_model is not None
        try:
            decode_request(operation.request_model, b"{}")
        except ValidationException as exc:
            message = exc.message
        assert not message or re.match(
            r"(1 validation error|[2-9] validation errors) detected: ", message
        )
        assert issubclass(operation.response_model, BaseModel)
