"""The data directory: whether there is one, and its initialization (``hsmkms init`` and the
parent of ``hsmkms serve``, the only two that may create one).

:func:`initialize` creates the embedded SoftHSM2 token when needed, migrates the database (the
metadata store opened with its row sealer, so its integrity key exists from the start), and
creates the account root identity, writing freshly generated root credentials to
``<data_dir>/root-credentials.json`` (mode 0600).

:func:`require_data_directory` is what every other command asks first: a command run in the
wrong directory must say so, not make a new token, database and root credential there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from hsmkms.config import Settings
from hsmkms.db import database_exists
from hsmkms.errors import ClientError
from hsmkms.identity import ROOT_NAME, IssuedCredential
from hsmkms.keystore.base import TokenInfo
from hsmkms.softhsm import CONF_NAME
from hsmkms.system.operator import OperatorCredentials
from hsmkms.system.root import System

__all__ = [
    "ROOT_CREDENTIALS_FILE",
    "ROOT_KEY_ENV",
    "ROOT_SECRET_ENV",
    "InitReport",
    "NoDataDirectory",
    "check_data_directory",
    "data_directory_exists",
    "initialize",
    "require_data_directory",
    "write_root_file",
]

ROOT_CREDENTIALS_FILE = "root-credentials.json"
ROOT_KEY_ENV = "HSMKMS_ROOT_ACCESS_KEY_ID"
ROOT_SECRET_ENV = "HSMKMS_ROOT_SECRET_ACCESS_KEY"  # noqa: S105 (a variable name)


class NoDataDirectory(ClientError):
    """The data directory the command was pointed at does not exist (or holds no hsmkms data).
    A usage error: the command line exits 2."""


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What :func:`initialize` found or did."""

    data_dir: Path
    root_access_key_id: str
    root_credentials_file: Path | None  # None when the root identity comes from the environment
    root_created: bool
    created: bool = False
    """The data directory did not exist (or held no hsmkms data) before."""
    root_environment_retired: str | None = None
    """When ``HSMKMS_ROOT_ACCESS_KEY_ID`` names a root key retired by ``hsmkms credentials
    delete``: since when (the variables were ignored)."""


def data_directory_exists(settings: Settings, *, token: bool = True) -> bool:
    """Whether the configured data directory holds what this configuration keeps there: the
    embedded token's ``softhsm2.conf`` (embedded default; not asked with ``token=False``, for
    a command that reads only the database) and the SQLite database (unless
    ``HSMKMS_DATABASE_URL`` names another database). A configuration that keeps nothing there
    (a hardware token and a database server) needs none: always True."""
    data_dir = settings.data_dir
    if token and settings.is_embedded and not (data_dir / CONF_NAME).exists():
        return False
    return settings.database_url is not None or database_exists(settings.sqlite_url)


def require_data_directory(settings: Settings, *, token: bool = True) -> None:
    """Raise :class:`NoDataDirectory` unless :func:`data_directory_exists`: every command but
    ``init`` and ``serve`` asks this before it opens anything, so that none of them creates a
    token, a database or root credentials by being run in the wrong directory."""
    if not data_directory_exists(settings, token=token):
        raise NoDataDirectory(
            f"no data directory at {settings.data_dir} (run hsmkms init or pass --data-dir)"
        )


def _root_from_env() -> tuple[str | None, str | None]:
    key = os.environ.get(ROOT_KEY_ENV) or None
    secret = os.environ.get(ROOT_SECRET_ENV) or None
    return key, secret


def write_root_file(path: Path, issued: IssuedCredential, region: str) -> None:
    """Write root credentials to ``path`` (mode 0600, atomically)."""
    _write_root_file(path, issued, region)


def _write_root_file(path: Path, issued: IssuedCredential, region: str) -> None:
    content = json.dumps(
        {
            "AccessKeyId": issued.access_key_id,
            "SecretAccessKey": issued.secret_access_key,
            "Arn": issued.principal_arn,
            "Region": region,
        },
        indent=2,
    )
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _init_lock(data_dir: Path) -> Iterator[None]:
    with open(data_dir / ".serve-init.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_data_directory(settings: Settings) -> TokenInfo:
    """Open what a server worker will open and check it works, the way ``hsmkms doctor`` does:
    the PKCS#11 module loads, the token is found, the PIN logs in, a self-test encrypts and
    decrypts with temporary keys, and the metadata database and the audit trail answer.
    Returns the token's description; raises the first problem as a :class:`KMSError` with a
    one-line message (``hsmkms serve`` says it before printing any endpoint)."""
    with System.open(settings, audit=None, prepare=False) as system:
        info = system.keystore.info()
        system.keystore.self_test()
        system.store.schema_version()
        if database_exists(settings.audit_database_url):
            with system.audit_reader() as trail:
                trail.check_key()  # the audit key a worker's writer will seal with
    return info


def initialize(settings: Settings) -> InitReport:
    """Create what the data directory lacks: the embedded token (when embedded), the database
    schema, the metadata store's integrity key, the identity tables and the root identity.
    Idempotent; safe across processes.

    Root credentials: ``HSMKMS_ROOT_ACCESS_KEY_ID`` / ``HSMKMS_ROOT_SECRET_ACCESS_KEY`` when set
    (nothing is written to disk then) unless they name a retired root key (then ignored), else
    generated once and written to ``<data_dir>/root-credentials.json`` (0600).
    """
    data_dir = settings.data_dir
    created = not data_directory_exists(settings)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    root_file = data_dir / ROOT_CREDENTIALS_FILE
    env_key, env_secret = _root_from_env()
    with _init_lock(data_dir), System.open(settings, audit="direct", identity=True) as system:
        credentials = system.credentials
        issued = credentials.ensure_root(
            env_key, env_secret, allow_weak=settings.allow_weak_root_secret
        )
        if issued is not None:
            # A root created or replaced is a credential change like any other: recorded.
            OperatorCredentials(system, command="initialize").record_created(issued)
        if issued is not None and env_key is None:
            _write_root_file(root_file, issued, settings.region)
        elif issued is not None:
            # The environment now defines root: a file of an earlier generated root is stale.
            with contextlib.suppress(FileNotFoundError):
                root_file.unlink()
        retired = (
            credentials.retired_at(env_key) if env_key is not None and issued is None else None
        )
        # The newest root key (a rotated root holds two until the old one is deleted).
        root = [c for c in credentials.list() if c.name == ROOT_NAME][-1]
    return InitReport(
        data_dir=data_dir,
        root_access_key_id=root.access_key_id,
        root_credentials_file=root_file if root_file.exists() else None,
        root_created=issued is not None,
        created=created,
        root_environment_retired=retired,
    )
