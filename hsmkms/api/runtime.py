"""What one server worker runs on: the keystore, the metadata store, the service, the
credentials store and the audit trail with its writer, opened from the settings
(data-directory initialization, which runs once in the parent, is :mod:`hsmkms.api.bootstrap`).

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
from hsmkms.audit import AuditRecord, AuditTrail, PreparedRecord
from hsmkms.audit.writer import AuditWriter
from hsmkms.config import Settings, keystore_config
from hsmkms.errors import KMSError
from hsmkms.identity import CredentialStore
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import DueTaskReport, KmsService
from hsmkms.service.local import service_event_sink
from hsmkms.store import MetadataStore
from hsmkms.store.integrity import TokenRowSealer

__all__ = ["Runtime", "run_exclusively", "service_event_sink"]

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
    """The service objects of one worker process. Thread-safe.

    Every record goes through :meth:`audit` to the worker's :class:`AuditWriter`, which
    appends in batches from its own thread to the trail in the metadata database."""

    def __init__(
        self,
        settings: Settings,
        keystore: Pkcs11Keystore,
        store: MetadataStore,
        credentials: CredentialStore,
        service: KmsService,
        trail: AuditTrail,
        writer: AuditWriter,
    ) -> None:
        self.settings = settings
        self.keystore = keystore
        self.store = store
        self.credentials = credentials
        self.service = service
        self.trail = trail
        self.writer = writer
        self._health_lock = threading.Lock()
        self._self_test_at = -SELF_TEST_INTERVAL
        self._self_test_error: str | None = None

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Open the keystore (lazily: PKCS#11 loads on first use), store, credentials, the
        audit trail (``Settings.audit_database_url``, which ``hsmkms audit`` reads; a ``start``
        seal) and its writer, and the service reporting its events to the trail."""
        keystore = Pkcs11Keystore(keystore_config(settings), observer=observe_hsm_call)
        url = settings.effective_database_url
        store = MetadataStore(url, sealer=TokenRowSealer(keystore))
        opened: list[Callable[[], object]] = [store.close]
        try:
            credentials = CredentialStore(url, keystore, account_id=settings.account_id)
            opened.append(credentials.close)
            trail = AuditTrail(settings.audit_database_url, keystore)
            opened.append(trail.close)
            writer = AuditWriter(trail)
        except BaseException:
            for close in reversed(opened):
                close()
            raise
        on_event = service_event_sink(
            writer.submit, region=settings.region, account_id=settings.account_id
        )
        service = KmsService(
            keystore,
            store,
            region=settings.region,
            account_id=settings.account_id,
            on_event=on_event,
        )
        return cls(settings, keystore, store, credentials, service, trail, writer)

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
        return self.credentials.lookup(access_key_id)

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Queue one audit record (returns at once; see :meth:`AuditWriter.submit` for a full
        queue: ``DependencyTimeoutException``)."""
        self.writer.submit(record)

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
        self.service.stop()
        try:
            self.writer.close()
            self.trail.close()
        finally:
            self.credentials.close()
            self.store.close()
            self.keystore.close()
