"""The running system in the test process, opened the way ``hsmkms serve`` and every command
open it (:class:`hsmkms.system.System`), for tests that set up a data directory in process."""

from __future__ import annotations

from pathlib import Path

from hsmkms.config import Settings
from hsmkms.system import AuditMode, System
from hsmkms.types import Clock, utc_now


def open_system(
    data_dir: Path,
    *,
    clock: Clock = utc_now,
    audit: AuditMode | None = "direct",
    identity: bool = False,
) -> System:
    """:meth:`System.open` on ``data_dir`` (the embedded token is created when missing), with
    the settings a command would load for ``--data-dir data_dir``. Close it (or use it as a
    context manager)."""
    return System.open(Settings.load(data_dir), audit=audit, identity=identity, clock=clock)
