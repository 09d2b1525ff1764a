"""The hsmkms pytest plugin: a real, HSM-backed KMS for any project's test suite.

Installed with hsmkms (entry point ``pytest11``: ``hsmkms``); it needs SoftHSM2
(``apt-get install softhsm2``) and, for ``kms_client``, boto3. Fixtures:

``hsmkms_server`` (session)
    ``hsmkms serve`` in a subprocess on a free loopback port, with its own SoftHSM2 token and
    data directory (under pytest's temporary directory), stopped at the end of the session.
    An :class:`HsmkmsServer`: ``endpoint``, ``region``, ``account_id``, ``access_key_id``,
    ``secret_access_key`` (the account root's), ``data_dir``; ``client()`` makes a boto3
    client, ``env()`` gives the ``AWS_*`` variables for a subprocess.
``kms_client`` (session)
    A boto3 KMS client for that server, as the account root.

Options (command line, or the ini file without the dashes): ``--hsmkms-seed FILE``
(``hsmkms_seed``: a seed file applied at start, relative to the rootdir), ``--hsmkms-region``
(``hsmkms_region``, default us-east-1), ``--hsmkms-account-id`` (``hsmkms_account_id``,
default 111122223333), ``--hsmkms-workers`` (``hsmkms_workers``, default 1).

Importing this module imports nothing but the standard library and pytest: it is loaded into
every pytest run of an environment where hsmkms is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["HsmkmsServer", "start_server"]

STARTUP_TIMEOUT = 90.0
_ENDPOINT = re.compile(r"serving the KMS API on (https?://\S+)")
_OPTIONS = {
    "seed": ("seed file applied when the server starts", None),
    "region": ("region of the server (default us-east-1)", "us-east-1"),
    "account_id": ("account id of the server (default 111122223333)", "111122223333"),
    "workers": ("worker processes of the server (default 1)", "1"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hsmkms", "hsmkms: a throwaway HSM-backed KMS (hsmkms_server)")
    for name, (help_text, default) in _OPTIONS.items():
        group.addoption(f"--hsmkms-{name.replace('_', '-')}", dest=f"hsmkms_{name}", help=help_text)
        parser.addini(f"hsmkms_{name}", help_text, default=default)


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(f"hsmkms_{name}")
    if value is None:
        value = config.getini(f"hsmkms_{name}")
    return str(value) if value else None


@dataclasses.dataclass
class HsmkmsServer:
    """A running ``hsmkms serve`` with its own token and data directory."""

    endpoint: str
    region: str
    account_id: str
    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = dataclasses.field(repr=False)

    def env(self) -> dict[str, str]:
        """``AWS_*`` variables pointing an AWS SDK or the AWS CLI at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_KMS": self.endpoint,
        }

    def client(self, service_name: str = "kms", **kwargs: Any) -> Any:
        """A boto3 client for this server (the root's credentials unless others are given)."""
        try:
            import boto3
        except ImportError:  # pragma: no cover - boto3 is in the test environment
            pytest.fail("hsmkms: a client needs boto3 (pip install boto3)", pytrace=False)
        options: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }
        options.update(kwargs)
        make: Any = boto3.client  # any service name, not only the literal ones its stubs know
        return make(service_name, **options)

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def _server_env(region: str, account_id: str) -> dict[str, str]:
    # The throwaway server is configured here only: not by the HSMKMS_* / AWS_* variables of
    # the test run (which may point at another data directory or a real HSM).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSMKMS_", "AWS_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(HSMKMS_REGION=region, HSMKMS_ACCOUNT_ID=account_id)
    return env


def _healthy(endpoint: str) -> bool:
    url = f"{endpoint}/healthz"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
        return bool(response.status == 200)
    return False


def start_server(
    data_dir: Path,
    *,
    seed: Path | None = None,
    region: str = "us-east-1",
    account_id: str = "111122223333",
    workers: int = 1,
) -> HsmkmsServer:
    """Start ``hsmkms serve`` on a free loopback port with ``data_dir`` as its data directory,
    wait until ``/healthz`` answers, and return it. Raises RuntimeError with the server's output
    when it does not start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    command = [
        sys.executable,
        "-m",
        "hsmkms.cli.main",
        "serve",
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        str(workers),
    ]
    if seed is not None:
        command += ["--seed", str(seed)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(region, account_id),
            start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    endpoint = None
    while endpoint is None or not _healthy(endpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            output = log_path.read_text(errors="replace").strip()
            raise RuntimeError(
                "hsmkms serve did not start (it needs SoftHSM2: apt-get install softhsm2; "
                f"its output follows)\n{output}"
            )
        if endpoint is None:
            match = _ENDPOINT.search(log_path.read_text(errors="replace"))
            endpoint = match.group(1) if match else None
        time.sleep(0.05)
    root = json.loads((data_dir / "root-credentials.json").read_text())
    return HsmkmsServer(
        endpoint=endpoint,
        region=region,
        account_id=account_id,
        access_key_id=root["AccessKeyId"],
        secret_access_key=root["SecretAccessKey"],
        data_dir=data_dir,
        log_path=log_path,
        process=process,
    )


@pytest.fixture(scope="session")
def hsmkms_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HsmkmsServer]:
    """A throwaway hsmkms server (own SoftHSM2 token and data directory) for the session."""
    config = request.config
    seed = _option(config, "seed")
    try:
        server = start_server(
            tmp_path_factory.mktemp("hsmkms") / "data",
            seed=Path(config.rootpath, seed) if seed else None,
            region=_option(config, "region") or "us-east-1",
            account_id=_option(config, "account_id") or "111122223333",
            workers=int(_option(config, "workers") or 1),
        )
    except (RuntimeError, ValueError) as exc:
        pytest.fail(f"hsmkms_server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kms_client(hsmkms_server: HsmkmsServer) -> Any:
    """A boto3 KMS client for ``hsmkms_server``, as the account root."""
    return hsmkms_server.client("kms")
