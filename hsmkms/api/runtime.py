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

import os
import shutil
import threading
from typing import Any, Final

import structlog
from sqlalchemy import text

from hsmkms.api.metrics import count_due_task_run, observe_hsm_call
from hsmkms.api.replay import REPLAY_FILE, ReplayCache
from hsmkms.audit import AuditRecord, PreparedRecord
from hsmkms.config import Settings
from hsmkms.errors import KMSError
from hsmkms.identity.xks import XksCredentialStore
from hsmkms.keystore.errors import TokenUnavailable
from hsmkms.service import DueTaskReport
from hsmkms.sigv4 import Credential
from hsmkms.system import System

__all__ = ["DUE_TASKS_LOCK", "Runtime"]

DUE_TASKS_LOCK: Final = 0x68736D6B6D7354  # "hsmkmsT"
"""The lock the periodic work runs under: on one worker of one node at a time."""
SELF_TEST_INTERVAL = 5.0
LOW_DISK_BYTES = 1 << 20
"""Below this much free space on the data directory's device, ``/healthz`` fails (``disk``)."""

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------------------------
# The per-worker runtime
# --------------------------------------------------------------------------------------------


class Runtime:
    """The service objects of one worker process: a :class:`~hsmkms.system.System` opened
    for a server, and what the HTTP layer adds to it (HSM call timing, the health check and
    its background token self-test, the due-task lock). Thread-safe.

    Every record goes to the worker's :class:`AuditWriter` and is committed before the call
    that made it returns: :meth:`commit_audit` on the event loop, :meth:`audit` on a thread.
    :meth:`check_audit` refuses at once while the trail cannot be written. The trail is
    ``Settings.audit_database_url`` (``audit.db`` on the embedded default)."""

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
        self._lookup = system.credentials.lookup
        # The replay cache exists only where replays are refused (HSMKMS_REFUSE_REPLAYS).
        self.replays = (
            ReplayCache(self.settings.data_dir / REPLAY_FILE)
            if self.settings.refuse_replays
            else None
        )
        # Only an operator's explicit opt-in lets a weak root secret through initialization;
        # then every health report says so (asked once: the root changes only at a start).
        self._weak_root = (
            self.settings.allow_weak_root_secret and system.credentials.root_secret_is_weak()
        )
        self._self_test_error: str | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

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

    @property
    def xks_credentials(self) -> XksCredentialStore:
        """The XKS proxy credentials store (opened on first use)."""
        return self.system.xks_credentials

    def first_use(self, signature: str) -> bool:
        """The replay check of a request that changes state (``replay.db`` in the data
        directory, shared by the node's workers); always a first use where replays are not
        refused."""
        return self.replays is None or self.replays.first_use(signature)

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Write one audit record and return once it is committed (a thread: the console's
        pages, service events); :class:`~hsmkms.errors.ServiceUnavailable` when it cannot be
        (see :meth:`AuditWriter.append`)."""
        self.writer.append(record)

    async def commit_audit(self, record: AuditRecord | PreparedRecord, *, retain: bool) -> None:
        """On the event loop: write one audit record, returning once it is committed (see
        :meth:`AuditWriter.commit`). ``retain``: the call may have changed state, so a record
        whose batch fails is kept and appended when the trail works again."""
        await self.writer.commit(record, retain=retain)

    def check_audit(self) -> None:
        """Raise, at once, why the audit trail cannot be written (503 naming the cause), if it
        cannot: nothing is done that cannot be recorded."""
        self.writer.check()

    def warm_up(self) -> None:
        """Initialize PKCS#11 and log in now rather than on the first request, and start the
        background token self-test the health check reports."""
        self.keystore.info()
        _ = self.system.xks_credentials  # its tables migrated before the first request
        if self._monitor is None:
            self._monitor = threading.Thread(
                target=self._self_tests, name="hsmkms-health", daemon=True
            )
            self._monitor.start()

    def _self_tests(self) -> None:
        """The token self-test, every :data:`SELF_TEST_INTERVAL` seconds, off the request path:
        ``/healthz`` reports the last result and never waits for the token."""
        while not self._stopping.is_set():
            try:
                self.keystore.self_test()
                self._self_test_error = None
            except TokenUnavailable:
                self._self_test_error = None  # the keystore's outage() says so, and when it ends
            except KMSError as exc:
                self._self_test_error = exc.message if exc.shows_cause else exc.code
            except Exception as exc:
                self._self_test_error = type(exc).__name__
            self._stopping.wait(SELF_TEST_INTERVAL)

    def health(self) -> dict[str, Any]:
        """Health without waiting for the token: free space on the data directory's device,
        the token's state (its keystore's last outage, else the background self-test's last
        result), ``SELECT 1`` on the metadata database, and whether the audit trail can be
        written.

        Returns ``{"status": "ok"|"fail", "disk": ..., "keystore": ..., "database": ...,
        "audit": ...}``; a failed part shows ``fail: <cause>``: the cause as an API caller
        would be told it (a full disk, a PKCS#11 reason), or the error's code — never internal
        detail.
        """
        report: dict[str, Any] = {"pid": os.getpid()}
        try:
            free = shutil.disk_usage(self.settings.data_dir).free
        except OSError as exc:
            report["disk"] = f"fail: {exc.strerror or type(exc).__name__}"
        else:
            low = free < LOW_DISK_BYTES
            report["disk"] = "fail: no space left on the data directory's device" if low else "ok"
        outage = self.keystore.outage()
        if outage is not None:
            report["keystore"] = f"fail: the HSM token is unavailable ({outage})"
        elif self._self_test_error is not None:
            report["keystore"] = f"fail: {self._self_test_error}"
        else:
            report["keystore"] = "ok"
        try:
            with self.store.engine.connect() as conn:
                conn.execute(text("SELECT 1")).scalar()
            report["database"] = "ok"
        except Exception as exc:
            report["database"] = f"fail: {type(exc).__name__}"
        audit_error = self.writer.error
        report["audit"] = "ok" if audit_error is None else f"fail: {audit_error}"
        if self._weak_root:
            report["warnings"] = [
                "the root secret is shorter than 20 characters (HSMKMS_ALLOW_WEAK_ROOT_SECRET): "
                "for throwaway test servers only"
            ]
        ok = all(report[part] == "ok" for part in ("disk", "keystore", "database", "audit"))
        report["status"] = "ok" if ok else "fail"
        return report

    def run_due_tasks(self) -> DueTaskReport | None:
        """Destroy what this worker's failed key creations left on the token
        (:meth:`~hsmkms.service.KmsService.clean_leftovers`), then run the service's periodic
        work unless another worker, of this node or another, is running it (the database's
        :meth:`~hsmkms.db.Database.exclusive` lock :data:`DUE_TASKS_LOCK`: a PostgreSQL
        advisory lock shared by every node, an ``flock`` beside a SQLite file). Returns None
        when skipped."""
        self.service.clean_leftovers()
        with self.store.database.exclusive(DUE_TASKS_LOCK) as held:
            report = self.service.run_due_tasks() if held else None
        count_due_task_run("skipped" if report is None else "ran")
        if report is not None and (report.rotated or report.purged):
            log.info("due_tasks", rotated=len(report.rotated), purged=len(report.purged))
        return report

    def close(self) -> None:
        """Close everything (end of the worker): the self-test thread stops; the audit writer
        appends what is queued and the trail writes its ``shutdown`` seal before the token
        session closes."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(10)
        if self.replays is not None:
            self.replays.close()
        self.system.close()
