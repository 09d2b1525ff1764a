"""Secrets redact themselves in logs: the central processor masks them, whatever the caller,
and every entry point (a command, the server's parent and workers) logs through it."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import secrets
from pathlib import Path

import leak_probe
import pytest
from server import running_server

from hsmkms.cli import audit as cli_audit
from hsmkms.cli.main import main
from hsmkms.errors import ClientError
from hsmkms.log import MASK, configure_logging, get_logger, redact_secrets

pytestmark = pytest.mark.database


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


def test_a_line_the_stream_cannot_take_is_dropped_and_the_caller_goes_on() -> None:
    """A full disk under the log file (/dev/full answers every write with ENOSPC; line
    buffered, as stderr is), then a closed stream: the calls that log go on, which is what
    keeps a server's fault an AWS answer instead of uvicorn's bare 500."""
    full = open("/dev/full", "w", buffering=1, encoding="utf-8")  # noqa: SIM115
    try:
        configure_logging("INFO", stream=full)
        get_logger("t").error("server_fault", error="DependencyTimeoutException")
        logging.getLogger("uvicorn.error").error("Exception in ASGI application")
    finally:
        with contextlib.suppress(OSError):  # what it still buffers cannot be written either
            full.close()
    closed = io.StringIO()
    closed.close()
    configure_logging("INFO", stream=closed)
    get_logger("t").warning("after the reader went away")
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    get_logger("t").info("written again")
    assert json.loads(stream.getvalue())["event"] == "written again"


def test_nested_structures_are_scrubbed() -> None:
    event = redact_secrets(
        None, "info", {"event": "x", "body": {"items": [{"SecretAccessKey": "s"}, b"\x00\x01"]}}
    )
    assert event["body"] == {"items": [{"SecretAccessKey": MASK}, "<2 bytes>"]}


# -- every entry point logs through the same set-up ------------------------------------------

TESTS = Path(__file__).parent
PLAINTEXT = b"top secret plaintext " + secrets.token_hex(8).encode()
SECRETS = {
    "pin": b"pin-" + secrets.token_hex(8).encode(),
    "secret_access_key": base64.b64encode(os.urandom(30)),
    "plaintext": PLAINTEXT,
    "data_key": os.urandom(32),
}


def _forms(value: bytes) -> list[str]:
    """How a secret could show in text: itself, hex, base64, a bytes repr."""
    forms = [value.hex(), base64.b64encode(value).decode(), repr(value)]
    with contextlib.suppress(UnicodeDecodeError):
        forms.append(value.decode())
    return forms


def assert_nothing_secret(text: str, values: dict[str, bytes]) -> None:
    for name, value in values.items():
        for form in _forms(value):
            assert form not in text, f"{name} leaked as {form!r}"


def test_a_command_logs_json_lines_to_stderr_through_the_redaction(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A command run through hsmkms.cli.main.main: a log event with a PIN, a secret access
    key, a plaintext and a data key (named as secrets, as bytes, nested, as stdlib arguments)
    made during the command reaches stderr as JSON lines without any of them."""

    def reader(settings: object) -> None:
        leak_probe.emit(SECRETS)
        raise ClientError("no database at nowhere")

    monkeypatch.setattr(cli_audit, "open_audit_reader", reader)
    (tmp_path / "hsmkms.db").touch()  # a data directory, as far as `audit tail` asks
    assert main(["audit", "tail", "--data-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    *logged, message = err.splitlines()
    assert message == "hsmkms audit: no database at nowhere"
    events = [json.loads(line) for line in logged]
    assert [e["event"].split()[0] for e in events] == [leak_probe.MARKER, leak_probe.MARKER]
    first = events[0]
    assert first["user_pin"] == first["SecretAccessKey"] == first["Plaintext"] == MASK
    assert first["payload"] == f"<{len(PLAINTEXT)} bytes>"
    assert first["body"]["items"][1] == {"Authorization": MASK}
    assert events[1]["logger"] == "uvicorn.error"
    assert_nothing_secret(err, SECRETS)


@pytest.mark.server
@pytest.mark.hsm
def test_the_server_and_its_workers_log_through_the_redaction(tmp_path: Path) -> None:
    """``hsmkms serve`` (parent and worker processes): the probe event each process logs right
    after its logging set-up reaches the server's stderr without a secret; nor do the root
    secret, the token PIN, or the plaintext and data key of real requests."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport leak_probe\nleak_probe.install()\n"
    )
    secret = SECRETS["secret_access_key"].decode()
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")])),
        leak_probe.ENV: json.dumps({k: v.hex() for k, v in SECRETS.items()}),
        "HSMKMS_ROOT_ACCESS_KEY_ID": "AKIAPROBE0000000000",
        "HSMKMS_ROOT_SECRET_ACCESS_KEY": secret,
    }
    data_dir = tmp_path / "data"
    with running_server(data_dir, env=env, args=["--log-level", "debug"]) as server:
        client = server.client()
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        data_key = client.generate_data_key(KeyId=key_id, KeySpec="AES_256")["Plaintext"]
        blob = client.encrypt(KeyId=key_id, Plaintext=PLAINTEXT)["CiphertextBlob"]
        assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == PLAINTEXT
    log = server.log()
    probes = [json.loads(line) for line in log.splitlines() if leak_probe.MARKER in line]
    assert len({p["pid"] for p in probes if "pid" in p}) >= 2, log  # the parent and the worker
    assert all(p.get("user_pin", MASK) == MASK for p in probes)
    assert "serving the KMS API on http://127.0.0.1:" in log  # printed, not logged
    pin = (data_dir / "user.pin").read_bytes().strip()
    assert_nothing_secret(log, {**SECRETS, "token pin": pin, "real data key": data_key})
