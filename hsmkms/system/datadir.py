"""Data-directory initialization, for the parent of ``hsmkms serve`` and the ``hsmkms
credentials`` command.

:func:`initialize` creates the embedded SoftHSM2 token when needed, migrates the database (the
metadata store opened with its row sealer, so its integrity key exists from the start), and
creates the account root identity, writing freshly generated root credentials to
``<data_dir>/root-credentials.json`` (mode 0600).
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
from hsmkms.identity import ROOT_NAME, IssuedCredential
from hsmkms.system.operator import OperatorCredentials
from hsmkms.system.root import System

__all__ = [
    "ROOT_CREDENTIALS_FILE",
    "ROOT_KEY_ENV",
    "ROOT_SECRET_ENV",
    "InitReport",
    "initialize",
]

ROOT_CREDENTIALS_FILE = "root-credentials.json"
ROOT_KEY_ENV = "HSMKMS_ROOT_ACCESS_KEY_ID"
ROOT_SECRET_ENV = "HSMKMS_ROOT_SECRET_ACCESS_KEY"  # noqa: S105 (a variable name)


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What :func:`initialize` found or did."""

    data_dir: Path
    root_access_key_id: str
    root_credentials_file: Path | None  # None when the root identity comes from the environment
    root_created: bool


def _root_from_env() -> tuple[str | None, str | None]:
    key = os.environ.get(ROOT_KEY_ENV) or None
    secret = os.environ.get(ROOT_SECRET_ENV) or None
    return key, secret


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


def initialize(settings: Settings) -> InitReport:
    """Create what the data directory lacks: the embedded token (when embedded), the database
    schema, the metadata store's integrity key, the identity tables and the root identity.
    Idempotent; safe across processes.

    Root credentials: ``HSMKMS_ROOT_ACCESS_KEY_ID`` / ``HSMKMS_ROOT_SECRET_ACCESS_KEY`` when set
    (nothing is written to disk then), else generated once and written to
    ``<data_dir>/root-credentials.json`` (0600).
    """
    data_dir = settings.data_dir
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
        root = next(c for c in credentials.list() if c.name == ROOT_NAME)
    return InitReport(
        data_dir=data_dir,
        root_access_key_id=root.access_key_id,
        root_credentials_file=root_file if root_file.exists() else None,
        root_created=issued is not None,
    )
