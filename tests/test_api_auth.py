"""SigV4 authentication through real HTTP: real clients (boto3) and hand-signed requests.
Every failure is a 400 with the AWS error code; nothing works without a valid signature."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import botocore.exceptions
import pytest
from server import Response, RunningServer, running_server

from hsmkms.sigv4 import Credential, SignedRequest, sign

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("auth") / "data") as srv:
        yield srv


def error_of(resp: Response) -> tuple[str, str]:
    assert resp.status == 400, resp.body
    uuid.UUID(resp.headers["x-amzn-requestid"])
    body = resp.json()
    return body["__type"], body["message"]


def client_error(call: object) -> dict[str, str]:
    assert callable(call)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    error = info.value.response["Error"]
    return {"Code": error.get("Code", ""), "Message": error.get("Message", "")}


def test_boto3_with_root_credentials_works(server: RunningServer) -> None:
    assert "Keys" in server.client().list_keys()


def test_no_authorization_header_is_missing_token(server: RunningServer) -> None:
    resp = server.raw(
        "POST",
        "/",
        b"{}",
        {"X-Amz-Target": "TrentService.ListKeys", "Content-Type": "application/x-amz-json-1.1"},
    )
    assert error_of(resp) == ("MissingAuthenticationTokenException", "Missing Authentication Token")


def test_unknown_access_key_is_unrecognized_client(server: RunningServer) -> None:
    error = client_error(server.client("AKIAAAAAAAAAAAAAAAAA", "x" * 40).list_keys)
    assert error["Code"] == "UnrecognizedClientException"
    assert error["Message"] == "The security token included in the request is invalid."


def test_wrong_secret_is_invalid_signature(server: RunningServer) -> None:
    error = client_error(server.client(secret_access_key="y" * 40).list_keys)
    assert error["Code"] == "InvalidSignatureException"
    assert error["Message"].startswith("The request signature we calculated does not match")


def test_other_region_is_invalid_signature(server: RunningServer) -> None:
    error = client_error(server.client(region="eu-west-1").list_keys)
    assert error["Code"] == "InvalidSignatureException"
    assert "eu-west-1" in error["Message"]


def test_session_token_is_unrecognized_client(server: RunningServer) -> None:
    error = client_error(server.client(session_token="FwoGZXIvYXdzE").list_keys)
    assert error["Code"] == "UnrecognizedClientException"


def test_expired_request_is_invalid_signature(server: RunningServer) -> None:
    when = datetime.now(UTC) - timedelta(minutes=6)
    code, message = error_of(server.signed("TrentService.ListKeys", {}, when=when))
    assert code == "InvalidSignatureException"
    assert message.startswith("Signature expired: ")


def test_request_from_the_future_is_invalid_signature(server: RunningServer) -> None:
    when = datetime.now(UTC) + timedelta(minutes=6)
    code, message = error_of(server.signed("TrentService.ListKeys", {}, when=when))
    assert code == "InvalidSignatureException"
    assert message.startswith("Signature not yet current: ")


def test_request_within_the_skew_window_is_accepted(server: RunningServer) -> None:
    when = datetime.now(UTC) - timedelta(minutes=4)
    assert server.signed("TrentService.ListKeys", {}, when=when).status == 200


def test_body_changed_after_signing_is_invalid_signature(server: RunningServer) -> None:
    resp = server.signed("TrentService.ListKeys", {"Limit": 1}, tamper=b'{"Limit": 2}')
    assert error_of(resp)[0] == "InvalidSignatureException"


def test_target_changed_after_signing_is_invalid_signature(server: RunningServer) -> None:
    """Signed for ListKeys, sent as CreateKey: the target header is signed."""
    request = sign(
        SignedRequest(
            "POST",
            "/",
            "",
            [("Host", server.host), ("X-Amz-Target", "TrentService.ListKeys")],
            b"{}",
        ),
        server.root,
        region=server.region,
        when=datetime.now(UTC),
    )
    headers = {n: v for n, v in request.headers if n != "X-Amz-Target"}
    headers["X-Amz-Target"] = "TrentService.CreateKey"
    resp = server.raw("POST", "/", b"{}", headers)
    assert error_of(resp)[0] == "InvalidSignatureException"


def test_malformed_authorization_is_incomplete_signature(server: RunningServer) -> None:
    resp = server.raw(
        "POST",
        "/",
        b"{}",
        {
            "X-Amz-Target": "TrentService.ListKeys",
            "X-Amz-Date": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAAAAAAAAAAAAAAAAA",
        },
    )
    assert error_of(resp)[0] == "IncompleteSignatureException"


def test_missing_date_is_incomplete_signature(server: RunningServer) -> None:
    resp = server.raw(
        "POST",
        "/",
        b"{}",
        {
            "X-Amz-Target": "TrentService.ListKeys",
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAAAAAAAAAAAAAAAAA/20260101/"
            "us-east-1/kms/aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
        },
    )
    assert error_of(resp)[0] == "IncompleteSignatureException"


def test_hand_signed_with_unknown_key_is_unrecognized(server: RunningServer) -> None:
    stranger = Credential("AKIAZZZZZZZZZZZZZZZZ", "s" * 40, "arn:aws:iam::111122223333:user/x")
    resp = server.signed("TrentService.ListKeys", {}, credential=stranger)
    assert error_of(resp)[0] == "UnrecognizedClientException"


def test_secret_never_appears_in_an_error(server: RunningServer) -> None:
    resp = server.signed(
        "TrentService.ListKeys",
        {},
        credential=Credential(server.access_key_id, "wrong-secret-value", "x"),
    )
    assert error_of(resp)[0] == "InvalidSignatureException"
    assert server.secret_access_key.encode() not in resp.body
    assert b"wrong-secret-value" not in resp.body


def test_health_and_metrics_need_no_signature(server: RunningServer) -> None:
    assert server.raw("GET", "/healthz").status == 200
    assert server.raw("GET", "/metrics").status == 200
