"""The NSS softokn test token (Mozilla's software token through p11-kit-proxy): fixtures shared
by the modules that run hsmkms on it (tests/test_nss_token.py, tests/test_nss_conformance.py).

The token is registered with p11-kit by ``ci/bootstrap.sh`` (``/etc/pkcs11/modules/
hsmkms-nss-ci.module``, database in :data:`NSS_DIR`); :func:`nss_token` makes a fresh NSS
database there, with a random PIN, for each module using it. Without the module file the tests
are skipped and say why. One NSS database serves one module at a time: :func:`nss_token` holds
:data:`NSS_LOCK` for its module, so modules in parallel processes (xdist workers, two test runs)
take turns.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _pytest.fixtures import FixtureFunctionDefinition
from server import RunningServer, running_server

from hsmkms.keystore.token_lock import token_write_lock

NSS_DIR = Path("/var/lib/hsmkms-ci/nss")
NSS_LOCK = Path(tempfile.gettempdir()) / "hsmkms-ci-nss.lock"
MODULE_FILE = Path("/etc/pkcs11/modules/hsmkms-nss-ci.module")
TOKEN = "NSS%20Certificate%20DB"


def _proxy() -> Path | None:
    found = sorted(Path("/usr/lib").glob("*/p11-kit-proxy.so"))
    return found[0] if found else None


def fresh_token(pin_dir: Path) -> tuple[str, str]:
    """A fresh NSS token (its database made anew in NSS_DIR, its PIN in ``pin_dir``): the
    PKCS#11 URI naming it without a PIN, and its PIN. Skips the test where the bootstrap could
    not register the token."""
    proxy = _proxy()
    if not MODULE_FILE.exists() or proxy is None or shutil.which("certutil") is None:
        pytest.skip(
            f"no NSS softokn test token: {MODULE_FILE} or p11-kit-proxy or certutil is missing "
            "(ci/bootstrap.sh installs them when it runs as root or with sudo)"
        )
    if not NSS_DIR.is_dir() or not NSS_DIR.stat().st_mode & 0o200:
        pytest.skip(f"{NSS_DIR} is not a writable directory (ci/bootstrap.sh makes it)")
    for old in NSS_DIR.iterdir():
        old.unlink()
    pin = pin_dir / "user.pin"
    pin.write_text(secrets.token_hex(12))  # 24 characters: also a custom key store password
    pin.chmod(0o600)
    subprocess.run(
        ["certutil", "-N", "-d", f"sql:{NSS_DIR}", "-f", str(pin)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return f"pkcs11:token={TOKEN}?module-path={proxy}", pin.read_text()


def proxy_module() -> Path:
    """p11-kit-proxy, the module NSS is reached through."""
    proxy = _proxy()
    assert proxy is not None
    return proxy


@pytest.fixture(scope="module")
def nss_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A fresh NSS token for the module, the module's alone until its end (its servers are
    stopped first): its URI without a PIN, and its PIN."""
    with token_write_lock(NSS_LOCK).exclusive():  # a flock: any process, any module
        yield fresh_token(tmp_path_factory.mktemp("nss"))


@pytest.fixture(scope="module")
def nss_uri(nss_token: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URI of the NSS token with its PIN's file: for a server whose default token it is."""
    pin = tmp_path_factory.mktemp("nss-pin") / "user.pin"
    pin.write_text(nss_token[1])
    pin.chmod(0o600)
    return f"{nss_token[0]}&pin-source=file:{pin}"


@pytest.fixture(scope="module")
def nss_server(nss_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("nss-server") / "data"
    with running_server(data_dir, workers=2, env={"HSMKMS_PKCS11_URI": nss_uri}) as server:
        yield server


def adopt(
    suite: ModuleType, namespace: dict[str, Any], skipped: Mapping[str, str] | None = None
) -> None:
    """Collect ``suite``'s tests and fixtures again in the module of ``namespace`` (its
    globals), whose own ``server`` fixture runs them on the NSS token; ``skipped`` names tests
    not run there, with the reason. Names the module defines itself stay its own."""
    skipped = skipped or {}
    for name, value in vars(suite).items():
        if name in namespace:
            continue
        if isinstance(value, FixtureFunctionDefinition):
            namespace[name] = value
        elif name.startswith("test_") and callable(value):
            if name in skipped:
                value = pytest.mark.skip(reason=skipped[name])(value)
            namespace[name] = value
