"""The real hsmkms server as a subprocess on a free loopback port, for end-to-end tests.

:func:`start_server` runs ``hsmkms serve --port 0`` on a fresh data directory (its own
SoftHSM2 token, database and root credentials), waits until it answers ``/healthz``, and
returns a :class:`RunningServer` with the endpoint, the root credentials and helpers for
boto3, raw signed requests and the ``hsmkms`` command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import cli_process
from botocore.config import Config
from postgres import database_url_for

from hsmkms.sigv4 import Credential, SignedRequest, sign

REGION = "us-east-1"
STARTUP_TIMEOUT = 90.0
_ENDPOINT_LINE = re.compile(r"serving the KMS API on (https?://\S+)")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any HSMKMS_* or AWS_* variable, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HSMKMS_", "AWS_", "PROMETHEUS_MULTIPROC_DIR"))
    }
    env.update(extra)
    return env


@dataclasses.dataclass
class Response:
    """An HTTP response, read whole."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class RunningServer:
    """A started ``hsmkms serve`` subprocess."""

    endpoint: str
    data_dir: Path
    access_key_id: str
    secret_access_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    region: str = REGION
    ca_file: Path | None = None  # the certificate to trust when serving HTTPS
    token_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The server's token settings (HSMKMS_PKCS11_*), which its CLI commands need too."""

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).netloc

    @property
    def root(self) -> Credential:
        return Credential(
            self.access_key_id, self.secret_access_key, "arn:aws:iam::111122223333:root"
        )

    def client(
        self,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        *,
        region: str | None = None,
        session_token: str | None = None,
    ) -> Any:
        """A boto3 KMS client for the server (root credentials unless others are given)."""
        return boto3.client(
            "kms",
            endpoint_url=self.endpoint,
            region_name=region or self.region,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
            aws_session_token=session_token,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}),
            verify=str(self.ca_file) if self.ca_file is not None else None,
        )

    def connection(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.endpoint)
        host = parts.hostname or "127.0.0.1"
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            return http.client.HTTPSConnection(host, parts.port, timeout=30, context=context)
        return http.client.HTTPConnection(host, parts.port, timeout=30)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request exactly as given (no signature)."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def signed(
        self,
        target: str | None,
        body: bytes | dict[str, Any] = b"",
        *,
        credential: Credential | None = None,
        when: datetime | None = None,
        headers: Mapping[str, str] | None = None,
        region: str | None = None,
        path: str = "/",
        tamper: bytes | None = None,
    ) -> Response:
        """A SigV4-signed POST (root credentials, the current time, unless told otherwise).
        ``tamper`` replaces the body after signing."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        base: list[tuple[str, str]] = [
            ("Host", self.host),
            ("Content-Type", "application/x-amz-json-1.1"),
        ]
        if target is not None:
            base.append(("X-Amz-Target", target))
        for name, value in (headers or {}).items():
            base = [(n, v) for n, v in base if n.lower() != name.lower()]
            base.append((name, value))
        request = sign(
            SignedRequest("POST", path, "", base, data),
            credential or self.root,
            region=region or self.region,
            when=when or datetime.now(UTC),
        )
        return self.raw("POST", path, tamper if tamper is not None else data, dict(request.headers))

    def cli(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``hsmkms ARGS --data-dir <this server's data dir>`` on the server's token."""
        return run_cli(
            *args, "--data-dir", str(self.data_dir), env={**self.token_env, **(env or {})}
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it; its exit code. SIGKILL (and a server that does
        not stop in time) kills the whole process group: the parent and its workers, which
        would otherwise live on without their supervisor."""
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                self._kill_group()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.process.wait(10)
        return self.process.returncode

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def database_env(data_dir: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` plus, on a PostgreSQL test run, ``HSMKMS_DATABASE_URL`` of ``data_dir``'s database
    (unless ``env`` names one)."""
    merged = dict(env or {})
    url = database_url_for(data_dir)
    if url is not None:
        merged.setdefault("HSMKMS_DATABASE_URL", url)
    return merged


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``hsmkms`` command line in a subprocess with a clean environment (and, on a
    PostgreSQL test run, the database of the ``--data-dir`` it names)."""
    if "--data-dir" in args:
        env = database_env(Path(args[args.index("--data-dir") + 1]), env)
    return cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", *args],
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start_server(
    data_dir: Path,
    *,
    workers: int = 1,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ca_file: Path | None = None,
    wait_healthy: bool = True,
) -> RunningServer:
    """Start ``hsmkms serve`` on a free loopback port and wait until it is healthy (with
    ``wait_healthy=False``: until every worker answers ``/healthz`` at all, healthy or not).
    ``ca_file``: the certificate clients should trust (with ``--tls-cert`` in ``args``). On a
    PostgreSQL test run the server keeps its tables in ``data_dir``'s database."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = database_env(data_dir, env)
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hsmkms.cli.main",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            "--workers",
            str(workers),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=clean_env(**(env or {})),
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    endpoint = None
    while endpoint is None:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"hsmkms serve did not start:\n{log_path.read_text()}")
        match = _ENDPOINT_LINE.search(log_path.read_text(errors="replace"))
        if match:
            endpoint = match.group(1)
        else:
            time.sleep(0.05)
    root_file = data_dir / "root-credentials.json"
    if root_file.exists():
        root = json.loads(root_file.read_text())
        key, secret = root["AccessKeyId"], root["SecretAccessKey"]
    else:
        key = (env or {})["HSMKMS_ROOT_ACCESS_KEY_ID"]
        secret = (env or {})["HSMKMS_ROOT_SECRET_ACCESS_KEY"]
    token_env = {k: v for k, v in (env or {}).items() if k.startswith("HSMKMS_PKCS11_")}
    server = RunningServer(
        endpoint, data_dir, key, secret, process, log_path, ca_file=ca_file, token_env=token_env
    )
    # Healthy means every worker has answered /healthz (each request on a new connection).
    healthy: set[str] = set()
    while len(healthy) < workers:
        with contextlib.suppress(OSError):
            resp = server.raw("GET", "/healthz")
            if resp.status == 200 or (not wait_healthy and resp.status == 503):
                healthy.add(resp.headers["x-hsmkms-worker"])
                continue
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"hsmkms serve is not healthy:\n{server.log()}")
        time.sleep(0.05)
    return server


@contextlib.contextmanager
def running_server(
    data_dir: Path,
    *,
    workers: int = 1,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ca_file: Path | None = None,
    wait_healthy: bool = True,
) -> Iterator[RunningServer]:
    """:func:`start_server` as a context manager that stops the server on exit."""
    server = start_server(
        data_dir, workers=workers, args=args, env=env, ca_file=ca_file, wait_healthy=wait_healthy
    )
    try:
        yield server
    finally:
        server.stop()
