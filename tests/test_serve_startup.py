"""``hsmkms serve`` starts honestly: it checks the token and the databases first and says what
is wrong in one line before printing anything; it prints "serving" only once every worker is
ready; it takes its settings from the environment too; it logs through the one pipeline — the
level and format asked for, uvicorn's records included, one access line per request."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server import RunningServer, clean_env, run_cli, running_server

pytestmark = [pytest.mark.server, pytest.mark.hsm]


def _serve(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hsmkms.cli.main", "serve", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**(env or {})),
        start_new_session=True,
    )  # fmt: skip


def _until_serving(proc: subprocess.Popen[str], timeout: float = 90) -> list[str]:
    """stdout lines up to and including the "serving" line (the process keeps running)."""
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "serving the KMS API on" in line:
            # The banner's other lines follow at once.
            for _ in range(2):
                lines.append(proc.stdout.readline().rstrip("\n"))
            return lines
    raise AssertionError(f"no serving line: {lines}")


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return out, err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "data"
    assert run_cli("init", "--data-dir", str(path)).returncode == 0
    return path


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HSMKMS_PIN_FILE": "{wrong}"}, "hsmkms serve: wrong PIN for token 'hsmkms'"),
        (
            {"HSMKMS_MODULE_PATH": "/usr/lib/nowhere/libpkcs11.so", "HSMKMS_PIN_FILE": "{pin}"},
            "hsmkms serve: PKCS#11 module not found: /usr/lib/nowhere/libpkcs11.so",
        ),
        (
            {"HSMKMS_TOKEN_LABEL": "no-such-token"},
            "hsmkms serve: no token matches label=no-such-token",
        ),
        ({"HSMKMS_PORT": "http"}, "hsmkms serve: invalid HSMKMS_PORT: Input should be a valid"),
        ({"HSMKMS_WORKERS": "0"}, "hsmkms serve: invalid HSMKMS_WORKERS: must be a number"),
    ],
    ids=["wrong PIN", "missing module", "missing token", "bad port", "no workers"],
)
def test_a_start_that_cannot_work_is_one_line_before_anything_else(
    data_dir: Path, tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000-not-the-pin\n")
    wrong.chmod(0o600)
    values = {k: v.format(wrong=wrong, pin=data_dir / "user.pin") for k, v in env.items()}
    proc = run_cli("serve", "--port", "0", "--data-dir", str(data_dir), env=values)
    assert proc.returncode == 1
    assert proc.stdout == ""  # no endpoint, no credentials
    (line,) = proc.stderr.splitlines()
    assert line.startswith(expected)
    assert "0000-not-the-pin" not in proc.stderr


def test_serving_is_printed_once_every_worker_has_started(data_dir: Path) -> None:
    """The workers' "Application startup complete." come before "serving" in the output."""
    proc = _serve(data_dir, "--port", "0", "--workers", "2", "--log-level", "info",
                  "--log-format", "json")  # fmt: skip
    try:
        banner = _until_serving(proc)
    finally:
        _, err = _stop(proc)
    assert banner[0].startswith("hsmkms: serving the KMS API on http://127.0.0.1:")
    assert "2 worker(s)" in banner[1]
    assert "token 'hsmkms' serial" in banner[1]
    started = [json.loads(x) for x in err.splitlines() if "startup complete" in x]
    assert len(started) == 2
    # Both workers were up before the parent printed: the readiness ping said so.
    assert proc.returncode == 0


def test_a_wrong_audit_key_is_found_before_serving_in_one_line(tmp_path: Path) -> None:
    """The audit key reference names no token object (the trail's database was edited): what
    each worker's writer would refuse, the parent says first, once."""
    data_dir = tmp_path / "data"
    with running_server(data_dir) as server:
        server.client().create_key()
    with sqlite3.connect(data_dir / "audit.db") as conn:
        conn.execute(
            "UPDATE audit_settings SET value = 'v2:default:HMAC_256:-:' || hex(randomblob(16)) "
            "WHERE name = 'audit_key'"
        )
    conn.close()
    proc = run_cli("serve", "--port", "0", "--data-dir", str(data_dir))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "hsmkms serve: The audit trail's audit key is wrong: the audit key reference names no "
        "object on the token.\n"
    )


@pytest.mark.slow
def test_settings_come_from_the_environment_and_options_win(data_dir: Path) -> None:
    port = _free_port()
    env = {"HSMKMS_HOST": "127.0.0.1", "HSMKMS_PORT": str(port), "HSMKMS_WORKERS": "2"}
    proc = _serve(data_dir, env=env)
    try:
        banner = _until_serving(proc)
    finally:
        _stop(proc)
    assert banner[0] == f"hsmkms: serving the KMS API on http://127.0.0.1:{port}"
    assert "; 2 worker(s);" in banner[1]
    proc = _serve(data_dir, "--port", "0", "--workers", "1", env=env)
    try:
        banner = _until_serving(proc)
    finally:
        _stop(proc)
    assert f":{port}" not in banner[0]
    assert "; 1 worker(s);" in banner[1]


def test_tls_files_from_the_environment_must_come_together(data_dir: Path) -> None:
    proc = run_cli(
        "serve", "--port", "0", "--data-dir", str(data_dir),
        env={"HSMKMS_TLS_CERT": str(data_dir / "nothing.pem")},
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        "hsmkms serve: --tls-cert and --tls-key (HSMKMS_TLS_CERT, HSMKMS_TLS_KEY) must be "
        "given together\n"
    )


def test_log_level_error_is_honoured_by_the_parent_and_the_workers(tmp_path: Path) -> None:
    """A copied data directory makes the parent log a warning (softhsm2_conf_relocated) and the
    workers log uvicorn's info lines: at --log-level error neither appears; at warning the
    warning does and the info lines do not."""
    original = tmp_path / "original"
    assert run_cli("init", "--data-dir", str(original)).returncode == 0
    for level, expect_warning in (("error", False), ("warning", True)):
        copy = tmp_path / f"copy-{level}"
        shutil.copytree(original, copy)
        proc = _serve(copy, "--port", "0", "--log-level", level, "--log-format", "json")
        try:
            _until_serving(proc)
        finally:
            _, err = _stop(proc)
        events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert len(events) == len(err.splitlines())
        assert ("softhsm2_conf_relocated" in [e["event"] for e in events]) is expect_warning
        assert all(e["level"] in ("warning", "error", "critical") for e in events)
        if level == "error":
            assert events == []


@pytest.fixture(scope="module")
def info_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("access") / "data"
    args = ["--log-level", "info", "--log-format", "json", "--workers", "2"]
    with running_server(data_dir, workers=2, args=args) as srv:
        yield srv


def test_one_access_line_per_request_without_bodies_or_secrets(info_server: RunningServer) -> None:
    kms = info_server.client()
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    plaintext = b"access-log-plaintext-marker"
    blob = kms.encrypt(KeyId=key, Plaintext=plaintext)["CiphertextBlob"]
    kms.decrypt(CiphertextBlob=blob)
    bad = info_server.signed("TrentService.Encrypt", {"KeyId": key}, headers={})
    assert bad.status == 400
    info_server.raw("GET", "/healthz")
    info_server.raw("GET", "/nowhere")
    time.sleep(0.5)
    log = info_server.log()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{") and '"request"' in x]
    requests = [x for x in lines if x.get("event") == "request"]
    by_op: dict[str, list[dict[str, Any]]] = {}
    for line in requests:
        by_op.setdefault(line.get("operation") or line.get("path"), []).append(line)
    (encrypt_ok, encrypt_bad) = sorted(by_op["Encrypt"], key=lambda x: x["status"])
    assert encrypt_ok["status"] == 200
    assert encrypt_ok["code"] == "OK"
    assert encrypt_ok["principal"] == "arn:aws:iam::111122223333:root"
    assert encrypt_ok["access_key_id"] == info_server.access_key_id
    assert encrypt_ok["level"] == "info"
    assert isinstance(encrypt_ok["latency_ms"], float)
    assert encrypt_ok["latency_ms"] > 0
    assert encrypt_ok["source_ip"] == "127.0.0.1"
    assert isinstance(encrypt_ok["request_id"], str)
    assert len(encrypt_ok["request_id"]) == 36
    assert encrypt_bad["status"] == 400
    assert encrypt_bad["code"] == "ValidationException"
    assert by_op["Decrypt"][0]["status"] == 200
    assert by_op["/nowhere"][0]["status"] == 404
    assert "/healthz" not in by_op  # probes are debug lines
    for secret in (
        plaintext,
        base64.b64encode(plaintext),
        base64.b64encode(blob),
        info_server.secret_access_key.encode(),
        b"AWS4-HMAC-SHA256",
    ):
        assert secret not in log.encode()


def test_console_log_format_is_one_readable_line_per_event(tmp_path: Path) -> None:
    with running_server(
        tmp_path / "d", args=["--log-level", "info", "--log-format", "console"]
    ) as srv:
        srv.client().list_keys()
        time.sleep(0.3)
        log = srv.log()
    lines = [x for x in log.splitlines() if " request " in x and "ListKeys" in x]
    assert len(lines) == 1
    assert not lines[0].startswith("{")
    assert "operation=ListKeys" in lines[0]
    assert "status=200" in lines[0]
    assert "Application startup complete." in log  # uvicorn's, in the same format
    assert '{"event"' not in log
