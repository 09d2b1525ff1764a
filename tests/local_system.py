"""The running system in the test process, opened the way ``hsmkms serve`` and every command
open it (:class:`hsmkms.system.System`), for tests that set up a data directory in process."""

from __future__ import annotations

from pathlib import Path

from postgres import database_url_for

from hsmkms.config import Settings
from hsmkms.system import AuditMode, System
from hsmkms.types import Clock, utc_now


def settings_for(data_dir: Path) -> Settings:
    """The settings a command would load for ``--data-dir data_dir`` (on a PostgreSQL test run,
    with ``data_dir``'s database)."""
    settings = Settings.load(data_dir)
    url = database_url_for(data_dir)
    return settings if url is None else settings.model_copy(update={"database_url": url})


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
    return System.open(settings_for(data_dir), audit=audit, identity=identity, clock=clock)
