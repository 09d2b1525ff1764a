"""Shared fixtures: real SoftHSM2 tokens made fresh for each test run, in a temporary directory.

Tokens are created before any keystore opens: SoftHSM2 only sees tokens that existed at
``C_Initialize`` (reference/pkcs11-facts.md §2.4).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import nss
import pytest
import structlog
from postgres import Cluster, cluster, on_postgresql, stop_cluster

from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName
from hsmkms.keystore.config import KeystoreConfig
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.profiles import MechanismProfile
from hsmkms.softhsm import ensure_token, find_module

GCM_LABEL = "hsmkms"
PORTABLE_LABEL = "hsmkms-portable"
SCRATCH_LABEL = "hsmkms-scratch"


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background by a shell without job control (``make test &`` in a
    script, ``nohup``) starts with SIGINT ignored, and every process it starts inherits that:
    the tests that stop a command or a server as Ctrl-C does would then wait for it forever. A
    handler of our own is reset to the default in each child at exec."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a PostgreSQL run (``HSMKMS_TEST_DATABASE=postgresql``, the second pass of
    ``make test``) only the tests marked ``database`` run, except those marked ``sqlite``."""
    if not on_postgresql():
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        on_both = item.get_closest_marker("database") and not item.get_closest_marker("sqlite")
        (kept if on_both else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def _stop_postgresql() -> Iterator[None]:
    """Stop the session's PostgreSQL server (started by the first test that needed it)."""
    yield
    stop_cluster()


@pytest.fixture(scope="session")
def pg_cluster() -> Cluster:
    """A PostgreSQL server of this test session (``tests/postgres.py``)."""
    return cluster()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """The SQLAlchemy URL of a new, empty PostgreSQL database."""
    return pg_cluster.url(pg_cluster.create_database())


@pytest.fixture(scope="session")
def softhsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with three fresh tokens (GCM, portable, scratch) sharing one PIN."""
    data_dir = tmp_path_factory.mktemp("softhsm")
    for label in (GCM_LABEL, PORTABLE_LABEL, SCRATCH_LABEL):
        ensure_token(data_dir, label)
    return data_dir


def token_config(
    data_dir: Path, label: str, profile: MechanismProfile | None = None, **overrides: object
) -> KeystoreConfig:
    """A KeystoreConfig for a token made by :func:`ensure_token` in ``data_dir``."""
    values: dict[str, object] = {
        "module_path": find_module(),
        "pin": (data_dir / "user.pin").read_text().strip(),
        "token_label": label,
        "profile": profile,
        "softhsm2_conf": str(data_dir / "softhsm2.conf"),
    }
    values.update(overrides)
    return KeystoreConfig(**values)  # type: ignore[arg-type]


def new_key_version(ks: Keystore, key_id: str, version: int = 1) -> KeyMaterialRef:
    """New symmetric material of ``ks``'s profile, named as key version ``version`` of
    ``key_id``."""
    return ks.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(key_id, version))


def new_mac_key(ks: Keystore, name: str) -> KeyMaterialRef:
    """A new HMAC_256 service key labelled ``hsmkms:<name>``."""
    return ks.create(KeyMaterialSpec.HMAC_256, MaterialName.service_key(name))


ON_NSS = os.environ.get("HSMKMS_TEST_TOKEN") == "nss"
"""``HSMKMS_TEST_TOKEN=nss`` (the third pass of ``make test``, tests marked ``vendors``): the
keystore fixtures open the NSS softokn (tests/nss.py) instead of SoftHSM2 tokens."""


@pytest.fixture(scope="session")
def nss_config(tmp_path_factory: pytest.TempPathFactory) -> KeystoreConfig:
    """The NSS softokn, made fresh for the session (on an NSS pass only)."""
    uri, pin = nss.fresh_token(tmp_path_factory.mktemp("nss-session"))
    del uri
    return KeystoreConfig(
        module_path=str(nss.proxy_module()), pin=pin, token_label=nss.TOKEN.replace("%20", " ")
    )


@pytest.fixture(scope="session")
def keystore(softhsm_dir: Path, request: pytest.FixtureRequest) -> Iterator[Pkcs11Keystore]:
    """The keystore on the GCM token (profile probed: AES_256_GCM on SoftHSM2); on an NSS
    pass, on the NSS softokn (the portable profile, probed)."""
    if ON_NSS:
        ks = Pkcs11Keystore(request.getfixturevalue("nss_config"))
    else:
        ks = Pkcs11Keystore(token_config(softhsm_dir, GCM_LABEL))
    yield ks
    ks.close()


@pytest.fixture(scope="session")
def portable_keystore(
    softhsm_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Pkcs11Keystore]:
    """A keystore on its own token with the portable AES_256_CBC_HMAC_SHA_256 profile forced
    (on an NSS pass: the NSS softokn, the same token as :func:`keystore`)."""
    if ON_NSS:
        config = request.getfixturevalue("nss_config")
        ks = Pkcs11Keystore(
            dataclasses.replace(config, profile=MechanismProfile.AES_256_CBC_HMAC_SHA_256)
        )
    else:
        ks = Pkcs11Keystore(
            token_config(softhsm_dir, PORTABLE_LABEL, MechanismProfile.AES_256_CBC_HMAC_SHA_256)
        )
    yield ks
    ks.close()


@pytest.fixture(params=["gcm", "portable"])
def any_keystore(
    request: pytest.FixtureRequest, keystore: Pkcs11Keystore, portable_keystore: Pkcs11Keystore
) -> Pkcs11Keystore:
    """Each test using this runs once per mechanism profile."""
    return keystore if request.param == "gcm" else portable_keystore


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A command run in this process (``hsmkms.cli.main.main``) sets up logging for the whole
    process (hsmkms.log.configure_logging); put the earlier set-up back after each test."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


ARTIFACTS = Path(__file__).resolve().parents[1] / ".artifacts"
"""Where tests keep what a person should look at (the console's screenshots)."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the artifact directories this run wrote to."""
    for directory in sorted(ARTIFACTS.glob("*")) if ARTIFACTS.exists() else []:
        files = list(directory.glob("*.png"))
        if files:
            terminalreporter.write_line(f"artifacts: {len(files)} screenshots in {directory}")
