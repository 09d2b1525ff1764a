"""The AWS JSON 1.1 protocol through real HTTP: every client mistake gets a 400 (or 404/405)
with the right ``__type`` and an ``x-amzn-RequestId``; never a 500, never a traceback."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from server import Response, RunningServer, running_server

from hsmkms.api.protocol import MAX_BODY

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("protocol") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def key_id(server: RunningServer) -> str:
    key: str = server.client().create_key()["KeyMetadata"]["KeyId"]
    return key


def assert_error(resp: Response, code: str, status: int = 400) -> str:
    """The response is an AWS error of ``code``; returns its message."""
    assert resp.status == status, resp.body
    uuid.UUID(resp.headers["x-amzn-requestid"])
    body = resp.json()
    assert body["__type"] == code, body
    assert set(body) == {"__type", "message"}
    assert "Traceback" not in body["message"]
    message: str = body["message"]
    return message


def test_unknown_target_is_unknown_operation(server: RunningServer) -> None:
    message = assert_error(
        server.signed("TrentService.NoSuchThing", {}), "UnknownOperationException"
    )
    assert "TrentService.NoSuchThing" in message


def test_target_of_another_service_is_unknown_operation(server: RunningServer) -> None:
    assert_error(server.signed("DynamoDB_20120810.ListTables", {}), "UnknownOperationException")


def test_missing_target_header_is_unknown_operation(server: RunningServer) -> None:
    message = assert_error(server.signed(None, {}), "UnknownOperationException")
    assert "X-Amz-Target" in message


def test_malformed_json_is_serialization_error(server: RunningServer) -> None:
    assert_error(server.signed("TrentService.ListKeys", b'{"Limit": '), "SerializationException")


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"NaN", b"\xff\xfe"])
def test_body_that_is_not_an_object_is_serialization_error(
    server: RunningServer, body: bytes
) -> None:
    assert_error(server.signed("TrentService.ListKeys", body), "SerializationException")


def test_empty_body_counts_as_empty_object(server: RunningServer) -> None:
    resp = server.signed("TrentService.ListKeys", b"")
    assert resp.status == 200
    assert "Keys" in resp.json()


def test_member_of_wrong_type_is_serialization_error(server: RunningServer) -> None:
    resp = server.signed("TrentService.GenerateRandom", {"NumberOfBytes": "12"})
    message = assert_error(resp, "SerializationException")
    assert "numberOfBytes" in message


@pytest.mark.parametrize(
    "body",
    [
        {"KeyId": 5, "Plaintext": "aGVsbG8="},
        {"KeyId": "k", "Plaintext": "aGVsbG8=", "EncryptionContext": ["a"]},
        {"KeyId": "k", "Plaintext": "aGVsbG8=", "EncryptionContext": {"a": 1}},
        {"KeyId": "k", "Plaintext": "aGVsbG8=", "GrantTokens": "t"},
        {"KeyId": "k", "Plaintext": "aGVsbG8=", "DryRun": "true"},
        {"KeyId": "k", "Plaintext": 12},
    ],
)
def test_wrong_json_types_are_serialization_errors(
    server: RunningServer, body: dict[str, object]
) -> None:
    assert_error(server.signed("TrentService.Encrypt", body), "SerializationException")


def test_bad_base64_is_serialization_error_without_the_value(
    server: RunningServer, key_id: str
) -> None:
    secret = "not*base64*secret-value"
    resp = server.signed("TrentService.Encrypt", {"KeyId": key_id, "Plaintext": secret})
    message = assert_error(resp, "SerializationException")
    assert "plaintext" in message
    assert secret not in resp.body.decode()


def test_missing_member_is_aws_worded_validation_error(server: RunningServer) -> None:
    message = assert_error(
        server.signed("TrentService.Encrypt", {"Plaintext": "aGVsbG8="}), "ValidationException"
    )
    assert message == (
        "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: "
        "Member must not be null"
    )


def test_enum_violation_lists_allowed_values(server: RunningServer, key_id: str) -> None:
    resp = server.signed("TrentService.GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_512"})
    message = assert_error(resp, "ValidationException")
    assert "Value 'AES_512' at 'keySpec'" in message
    assert "Member must satisfy enum value set: [AES_256, AES_128]" in message


def test_oversize_plaintext_is_validation_error_without_the_value(
    server: RunningServer, key_id: str
) -> None:
    plaintext = base64.b64encode(b"S" * 4097).decode()
    resp = server.signed("TrentService.Encrypt", {"KeyId": key_id, "Plaintext": plaintext})
    message = assert_error(resp, "ValidationException")
    assert "Value at 'plaintext' failed to satisfy constraint" in message
    assert plaintext[:32] not in resp.body.decode()


def test_oversize_body_is_refused_with_400(server: RunningServer) -> None:
    body = b'{"Limit": 1, "Pad": "' + b"x" * MAX_BODY + b'"}'
    message = assert_error(server.signed("TrentService.ListKeys", body), "ValidationException")
    assert str(MAX_BODY) in message


def test_oversize_chunked_body_is_refused_with_400(server: RunningServer) -> None:
    conn = server.connection()
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("X-Amz-Target", "TrentService.ListKeys")
        conn.endheaders()
        chunk = b"x" * 65536
        try:
            for _ in range(MAX_BODY // len(chunk) + 2):
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server may answer and close before the whole body is sent
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 400
    assert json.loads(body)["__type"] == "ValidationException"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_8_mib_post_through_urllib_gets_the_400_not_a_reset(
    server: RunningServer, chunked: bool
) -> None:
    """Issue 14: an 8 MiB POST was refused by resetting the connection while urllib still sent
    it. The server reads the body to its end (up to a bound) before answering 400 with the
    AWS error and closing the connection, so a simple client sees the answer."""
    body = b"x" * (8 << 20)
    data: bytes | Iterator[bytes] = body
    if chunked:  # urllib sends an iterable body with Transfer-Encoding: chunked
        data = iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)])
    request = urllib.request.Request(  # noqa: S310 (the test's own loopback server)
        server.endpoint + "/",
        data=data,
        method="POST",
        headers={"Content-Type": "application/x-amz-json-1.1",
                 "X-Amz-Target": "TrentService.ListKeys"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)  # noqa: S310
    answer = refused.value
    assert answer.code == 400
    assert answer.headers["connection"] == "close"
    payload = json.loads(answer.read())
    assert payload["__type"] == "ValidationException"
    assert payload["message"] == f"The request body is larger than the limit of {MAX_BODY} bytes."
    # The refused call is recorded like any other.
    request_id = answer.headers["x-amzn-RequestId"]
    found = server.cli("audit", "search", "--event-name", "ListKeys")
    records = [json.loads(line) for line in found.stdout.splitlines()]
    (record,) = [r for r in records if r["requestID"] == request_id]
    assert record["errorCode"] == "ValidationException"


def test_unsupported_content_type_is_serialization_error(server: RunningServer) -> None:
    resp = server.signed("TrentService.ListKeys", {}, headers={"Content-Type": "text/xml"})
    assert_error(resp, "SerializationException")


def test_get_on_root_is_405_with_error_body(server: RunningServer) -> None:
    resp = server.raw("GET", "/")
    assert_error(resp, "UnknownOperationException", status=405)
    assert resp.headers["allow"] == "POST"


def test_other_path_is_404(server: RunningServer) -> None:
    assert_error(server.raw("POST", "/nothing/here"), "UnknownOperationException", status=404)


def test_unsigned_request_is_refused_before_parsing(server: RunningServer) -> None:
    resp = server.raw("POST", "/", b"not json", {"X-Amz-Target": "TrentService.ListKeys"})
    assert_error(resp, "MissingAuthenticationTokenException")


def test_unknown_members_are_ignored(server: RunningServer) -> None:
    resp = server.signed("TrentService.ListKeys", {"Limit": 5, "FutureMember": {"x": [1]}})
    assert resp.status == 200


def test_null_member_counts_as_absent(server: RunningServer) -> None:
    resp = server.signed("TrentService.ListKeys", {"Limit": None})
    assert resp.status == 200


def test_response_wire_format(server: RunningServer) -> None:
    """Timestamps are epoch-second numbers, blobs standard base64, None members left out."""
    resp = server.signed("TrentService.CreateKey", {"Description": "wire"})
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/x-amz-json-1.1"
    uuid.UUID(resp.headers["x-amzn-requestid"])
    metadata = resp.json()["KeyMetadata"]
    assert isinstance(metadata["CreationDate"], float | int)
    assert "DeletionDate" not in metadata
    encrypted = server.signed(
        "TrentService.Encrypt",
        {"KeyId": metadata["KeyId"], "Plaintext": base64.b64encode(b"wire").decode()},
    ).json()
    assert base64.b64decode(encrypted["CiphertextBlob"], validate=True)
    assert encrypted["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"


def test_operation_without_output_answers_empty_body(server: RunningServer, key_id: str) -> None:
    resp = server.signed("TrentService.EnableKey", {"KeyId": key_id})
    assert resp.status == 200
    assert resp.body == b""
    uuid.UUID(resp.headers["x-amzn-requestid"])


def test_service_client_error_keeps_status_400(server: RunningServer) -> None:
    resp = server.signed("TrentService.DescribeKey", {"KeyId": str(uuid.uuid4())})
    assert "does not exist" in assert_error(resp, "NotFoundException")


def test_every_response_has_a_distinct_request_id(server: RunningServer) -> None:
    ids = {server.raw("GET", "/").headers["x-amzn-requestid"] for _ in range(5)}
    assert len(ids) == 5


def test_server_log_has_no_traceback(server: RunningServer, tmp_path: Path) -> None:
    assert "Traceback" not in server.log()
