"""What one server worker runs on: the system of :mod:`hsmkms.system` (keystore, metadata
store, service, credentials store, audit trail with its writer), opened from the settings for a
server (data-directory initialization, which runs once in the parent, is
:func:`hsmkms.system.initialize`).

:class:`Runtime` is opened in each worker process after it has been spawned, so that every
worker initializes PKCS#11 itself. The keystore reports the latency of each of its calls to
:func:`hsmkms.api.metrics.observe_hsm_call` (its observer hook), which records it in
``hsmkms_hsm_call_duration_seconds``.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import text

from hsmkms.api.metrics import DUE_TASK_RUNS, observe_hsm_call
from hsmkms.api.sigv4 import Credential
from hsmkms.audit import AuditRecord, PreparedRecord
from hsmkms.config import Settings
from hsmkms.errors import KMSError
from hsmkms.service import DueTaskReport
from hsmkms.system import System

__all__ = ["Runtime", "run_exclusively"]

TASKS_LOCK_FILE = "tasks.lock"
SELF_TEST_INTERVAL = 5.0

log = structlog.get_logger(__name__)
_T = TypeVar("_T")


def run_exclusively(lock_path: Path, fn: Callable[[], _T]) -> _T | None:
    """Run ``fn`` while holding an exclusive fcntl lock on ``lock_path``; when another process
    (or thread) holds it, return None at once without running ``fn``."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            return fn()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# The per-worker runtime
# --------------------------------------------------------------------------------------------


class Runtime:
    """The service objects of one worker process: a :class:`~hsmkms.system.System` opened
    for a server, and what the HTTP layer adds to it (HSM call timing, the health check, the
    due-task lock). Thread-safe.

    Every record goes through :meth:`audit` to the worker's :class:`AuditWriter`, which
    appends in batches from its own thread to the trail (``Settings.audit_database_url``:
    ``audit.db`` on the embedded default)."""

    def __init__(self, system: System) -> None:
        if system.writer is None:
            raise ValueError("a server's system audits through its writer (audit='writer')")
        self.system = system
        self.settings = system.settings
        self.keystore = system.keystore
        self.store = system.store
        self.credentials = system.credentials
        self.service = system.service
        self.writer = system.writer
        self._submit = system.writer.submit
        self._lookup = system.credentials.lookup
        self._health_lock = threading.Lock()
        self._self_test_at = -SELF_TEST_INTERVAL
        self._self_test_error: str | None = None

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Open the worker's system (:meth:`System.open <hsmkms.system.System.open>`): the
        keystore (lazily: PKCS#11 loads on first use), its calls timed by the observer; the
        store, the credentials, the audit trail (``Settings.audit_database_url``, which
        ``hsmkms audit`` reads; a ``start`` seal) and its writer, and the service reporting its
        events to the trail. The data directory was prepared by the parent."""
        return cls(
            System.open(
                settings,
                audit="writer",
                identity=True,
                prepare=False,
                observer=observe_hsm_call,
            )
        )

    @property
    def region(self) -> str:
        """The region requests must be signed for."""
        return self.settings.region

    @property
    def account_id(self) -> str:
        """The account the keys belong to."""
        return self.settings.account_id

    def lookup(self, access_key_id: str) -> Credential | None:
        """The SigV4 lookup: the credentials store's answer."""
        return self._lookup(access_key_id)

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Queue one audit record (returns at once; see :meth:`AuditWriter.submit` for a full
        queue: ``DependencyTimeoutException``)."""
        self._submit(record)

    def warm_up(self) -> None:
        """Initialize PKCS#11 and log in now rather than on the first request."""
        self.keystore.info()

    def health(self) -> dict[str, Any]:
        """Deep check: token self-test (at most every few seconds), ``SELECT 1``, and whether
        the audit writer's appends succeed.

        Returns ``{"status": "ok"|"fail", "keystore": ..., "database": ..., "audit": ...}``; a
        failed part shows the error's code only.
        """
        report: dict[str, Any] = {"pid": os.getpid()}
        with self._health_lock:
            now = time.monotonic()
            if now - self._self_test_at >= SELF_TEST_INTERVAL:
                try:
                    self.keystore.self_test()
                    self._self_test_error = None
                except KMSError as exc:
                    self._self_test_error = exc.code
                except Exception as exc:
                    self._self_test_error = type(exc).__name__
                self._self_test_at = now
            report["keystore"] = (
                "ok" if self._self_test_error is None else f"fail: {self._self_test_error}"
            )
        try:
            with self.store.engine.connect() as conn:
                conn.execute(text("SELECT 1")).scalar()
            report["database"] = "ok"
        except Exception as exc:
            report["database"] = f"fail: {type(exc).__name__}"
        audit_error = self.writer.error
        report["audit"] = "ok" if audit_error is None else f"fail: {audit_error}"
        ok = report["keystore"] == "ok" and report["database"] == "ok" and audit_error is None
        report["status"] = "ok" if ok else "fail"
        return report

    def run_due_tasks(self) -> DueTaskReport | None:
        """Run the service's periodic work unless another worker is running it (an fcntl lock
        on ``<data_dir>/tasks.lock``). Returns None when skipped."""
        report = run_exclusively(
            self.settings.data_dir / TASKS_LOCK_FILE, self.service.run_due_tasks
        )
        DUE_TASK_RUNS.labels("skipped" if report is None else "ran").inc()
        if report is not None and (report.rotated or report.purged):
            log.info("due_tasks", rotated=len(report.rotated), purged=len(report.purged))
        return report

    def close(self) -> None:
        """Close everything (end of the worker): the audit writer appends what is queued and
        the trail writes its ``shutdown`` seal before the token session closes."""
        self.system.close()
