"""Secrets redact themselves in logs: the central processor masks them, whatever the caller."""

from __future__ import annotations

import base64
import io
import json
import logging

from hsmkms.log import MASK, configure_logging, get_logger, redact_secrets


def test_secret_named_fields_are_masked_and_bytes_never_logged() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    secret = b"top secret plaintext"
    get_logger("t").info(
        "request",
        Plaintext=base64.b64encode(secret).decode(),
        headers={"Authorization": "AWS4-HMAC-SHA256 Credential=...", "host": "x"},
        user_pin="1234",
        blob=secret,
        key_id="1234abcd",
    )
    line = stream.getvalue()
    record = json.loads(line)
    assert record["Plaintext"] == MASK
    assert record["headers"] == {"Authorization": MASK, "host": "x"}
    assert record["user_pin"] == MASK
    assert record["blob"] == f"<{len(secret)} bytes>"
    assert record["key_id"] == "1234abcd"
    assert secret.decode() not in line
    assert base64.b64encode(secret).decode() not in line


def test_stdlib_logging_goes_through_the_same_processor() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    logging.getLogger("uvicorn.error").info("started")
    assert json.loads(stream.getvalue())["event"] == "started"


def test_nested_structures_are_scrubbed() -> None:
    event = redact_secrets(
        None, "info", {"event": "x", "body": {"items": [{"SecretAccessKey": "s"}, b"\x00\x01"]}}
    )
    assert event["body"] == {"items": [{"SecretAccessKey": MASK}, "<2 bytes>"]}
