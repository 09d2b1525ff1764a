"""``hsmkms serve`` as a whole: two worker processes serving the same keys, the deep health
check, Prometheus metrics across workers, the periodic-task lock, graceful shutdown, and
one-line start-up errors."""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import ipaddress
import json
import re
import select
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server import RunningServer, run_cli, running_server, start_server

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("serve") / "data"
    with running_server(data_dir, workers=2, args=["--task-interval", "0.2"]) as srv:
        yield srv


def samples(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = server.raw("GET", "/metrics")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def _burst(host: str, port: int, connections: int) -> set[bytes]:
    """Open ``connections`` at once (every connect started before any completes, as a client
    pool opens them), send one request on each; the workers that answered."""
    conns = []
    for _ in range(connections):
        conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        conn.setblocking(False)
        conn.connect_ex((host, port))
        conns.append(conn)
    workers = set()
    try:
        for conn in conns:
            assert select.select([], [conn], [], 30)[1], "no connection"
            conn.settimeout(30)
            conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        for conn in conns:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                assert chunk, "connection closed before the answer"
                head += chunk
            found = re.search(rb"(?i)x-hsmkms-worker: *(\d+)", head)
            assert found is not None, head
            workers.add(found.group(1))
    finally:
        for conn in conns:
            conn.close()
    return workers


def test_connections_opened_at_once_are_spread_over_the_workers(server: RunningServer) -> None:
    """Each worker listens on a socket of its own on the one port (SO_REUSEPORT), so the kernel
    spreads a burst of new connections over them. With one shared socket, the worker that
    woke first took every waiting connection (all 16 in about half of the bursts). The chance
    that 16 connections all hash to one of two sockets is 1 in 32,768 per burst."""
    parts = urlsplit(server.endpoint)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    spread = [len(_burst(host, port, 16)) for _ in range(6)]
    assert spread == [2] * 6


def test_two_workers_serve_the_same_keys(server: RunningServer) -> None:
    """A key created through one connection is used by many requests on new connections;
    both worker processes answer, and every answer is right."""
    created = server.signed("TrentService.CreateKey", {})
    key_id = created.json()["KeyMetadata"]["KeyId"]
    plaintext = base64.b64encode(b"shared by workers").decode()
    blob = server.signed("TrentService.Encrypt", {"KeyId": key_id, "Plaintext": plaintext}).json()[
        "CiphertextBlob"
    ]

    def one(_: int) -> tuple[str, int, bytes]:
        resp = server.signed("TrentService.Decrypt", {"CiphertextBlob": blob})
        return resp.headers["x-hsmkms-worker"], resp.status, resp.body

    pids: set[str] = set()
    deadline = time.monotonic() + 30
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while len(pids) < 2 and time.monotonic() < deadline:
            for pid, status, body in pool.map(one, range(64)):
                assert status == 200, (pid, status, body)
                assert json.loads(body)["Plaintext"] == plaintext
                pids.add(pid)
    assert len(pids) == 2, pids
    assert created.headers["x-hsmkms-worker"].isdigit()


def test_healthz_is_a_deep_check(server: RunningServer) -> None:
    resp = server.raw("GET", "/healthz")
    assert resp.status == 200
    report = resp.json()
    assert report["status"] == "ok"
    assert report["keystore"] == "ok"
    assert report["database"] == "ok"
    assert str(report["pid"]) == resp.headers["x-hsmkms-worker"]
    assert resp.headers["x-amzn-requestid"]


def test_healthz_refuses_other_methods(server: RunningServer) -> None:
    resp = server.raw("POST", "/healthz")
    assert resp.status == 405
    assert resp.json()["__type"] == "UnknownOperationException"


def test_metrics_count_requests_errors_and_hsm_calls(server: RunningServer) -> None:
    before = samples(server)
    server.signed("TrentService.ListKeys", {})
    server.signed("TrentService.NoSuchOperation", {})
    server.signed("TrentService.GenerateRandom", {"NumberOfBytes": 16})
    server.raw("POST", "/", b"{}", {"X-Amz-Target": "TrentService.ListKeys"})
    after = samples(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    total = "hsmkms_requests_total"
    assert grew(total, operation="ListKeys", code="OK") >= 1
    assert grew(total, operation="GenerateRandom", code="OK") >= 1
    assert grew(total, operation="-", code="UnknownOperationException") >= 1
    assert grew(total, operation="-", code="MissingAuthenticationTokenException") >= 1
    latency = "hsmkms_request_duration_seconds_count"
    assert grew(latency, operation="GenerateRandom") >= 1
    assert value(after, "hsmkms_hsm_call_duration_seconds_count", call="random") >= 1
    assert value(after, "hsmkms_hsm_call_duration_seconds_count", call="decrypt") >= 1


def test_metrics_sum_over_both_workers(server: RunningServer) -> None:
    """Whichever worker answers /metrics, it reports requests served by the other one too."""
    for _ in range(10):
        server.raw("GET", "/metrics")
    found = samples(server)
    answered = value(found, "hsmkms_requests_total", operation="Decrypt", code="OK")
    assert answered >= 64


def test_periodic_tasks_run_in_one_worker_at_a_time(server: RunningServer) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = samples(server)
        if value(found, "hsmkms_due_task_runs_total", result="ran") >= 2:
            break
        time.sleep(0.2)
    assert value(found, "hsmkms_due_task_runs_total", result="ran") >= 2


def test_sigterm_stops_gracefully(server: RunningServer) -> None:
    """Last in the module: the server exits 0 on SIGTERM, without a traceback."""
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.log()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_serves_https_to_boto3(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with running_server(tmp_path / "data", args=args, ca_file=cert) as srv:
        assert srv.endpoint.startswith("https://127.0.0.1:")
        kms = srv.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"over tls")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"over tls"
        kms.close()  # an idle TLS connection would hold the graceful shutdown open


def test_root_from_environment_and_sigint(tmp_path: Path) -> None:
    """HSMKMS_ROOT_* define the root identity (nothing written to disk); SIGINT stops the
    server gracefully too."""
    env = {
        "HSMKMS_ROOT_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "HSMKMS_ROOT_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    }
    srv = start_server(tmp_path / "data", env=env)
    try:
        assert srv.access_key_id == "AKIAIOSFODNN7EXAMPLE"
        assert srv.client().list_keys()["Keys"] == []
        assert not (tmp_path / "data" / "root-credentials.json").exists()
        assert "root access key AKIAIOSFODNN7EXAMPLE (from HSMKMS_ROOT_ACCESS_KEY_ID)" in srv.log()
    finally:
        code = srv.stop(signal.SIGINT)
    assert code == 0
    assert "Traceback" not in srv.log()


def test_tls_options_must_come_together(tmp_path: Path) -> None:
    proc = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(tmp_path / "c"))
    assert proc.returncode == 2  # a usage error
    assert proc.stderr.strip() == "hsmkms serve: --tls-cert and --tls-key must be given together"


def test_zero_workers_is_one_line_error(tmp_path: Path) -> None:
    proc = run_cli("serve", "--data-dir", str(tmp_path / "d"), "--workers", "0")
    assert proc.returncode == 2  # a usage error
    assert proc.stderr.strip() == "hsmkms serve: --workers must be at least 1"


def test_a_port_in_use_is_refused_although_the_workers_share_theirs() -> None:
    """The workers' sockets share one port (SO_REUSEPORT), but a second server of the same
    user cannot join it: its first bind, without SO_REUSEPORT, finds the port taken."""
    from hsmkms.api.server import _bind_all
    from hsmkms.config import ConfigError

    first = _bind_all("127.0.0.1", 0, 2)
    try:
        ports = {sock.getsockname()[1] for sock in first}
        assert len(first) == 2
        assert len(ports) == 1
        with pytest.raises(ConfigError, match="cannot listen"):
            _bind_all("127.0.0.1", ports.pop(), 2)
    finally:
        for sock in first:
            sock.close()
