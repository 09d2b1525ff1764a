"""The per-process audit writer: group commit of the records of every request waiting at that
moment, and a request's answer only after its record is committed.

Why group commit: a transaction costs ~0.3-0.6 ms, most of it SQLite's write lock and the
commit (``fsync``), shared by every worker — one transaction per request would cap the whole
API near 1,400 requests/s, and its CPU competes with the requests'. The writer's thread instead
appends, in one transaction, whatever is queued when it is free — while requests overlap,
after letting the group grow for ``group_wait`` (1 ms); while it commits, the next requests
queue up and make the next group. A lone request is committed at once; under load a group
holds a few dozen records.

Guarantees (``docs/audit.md``, "Writing: durable before the answer"):

* **Durable before the answer.** :meth:`AuditWriter.commit` (the event loop) and
  :meth:`AuditWriter.append` (any thread) return only once the record is committed (``durable``
  trails: on disk); the server sends the answer after that. They raise
  :class:`~hsmkms.errors.ServiceUnavailable` (503, naming the cause) when the record cannot be
  committed: the append failed (a full disk, an I/O error, a cut trail), or no commit came
  within ``commit_timeout`` seconds.
* **Fail fast.** After a failed append the writer is *failing*: :meth:`check` and every new
  record are refused at once with the cause, until the writer's thread, which tries again
  every ``retry_interval`` seconds, has written to the trail again (recovery needs no
  restart). Callers ask :meth:`check` before acting, so that nothing is done that cannot be
  recorded.
* **What a failed batch keeps.** The records of calls that may have changed state
  (``retain=True``: everything but read-only operations) stay in memory and are appended first
  when the trail works again — the trail then shows what the service did, although its caller
  was answered 503. Records of read-only calls are dropped: their callers got 503, nothing was
  served.
* **Order**: the records of one writer are appended in the order they were submitted (one
  queue, one thread, one transaction per batch).
* **Encoding on the caller's thread**: an invalid record fails there, at once.
* **Bounded**: at most ``max_queue`` records and ``max_queue_bytes`` bytes wait; beyond that,
  records are refused at once (503) rather than queued.
* **Sealing**: the thread also calls :meth:`~hsmkms.audit.trail.AuditTrail.seal_if_due`
  every quarter of the trail's seal interval (the session's heartbeat).

:meth:`AuditWriter.close` appends everything queued (retrying for at most ``close_timeout``
seconds) and stops the thread; the trail itself stays open (``AuditTrail.close`` writes the
shutdown seal). A writer serves one process: make it after any ``fork()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Final

import structlog

from hsmkms.audit.records import AuditRecord, PreparedRecord, prepare_record
from hsmkms.audit.trail import AuditTrail, SealReason, TrailCut
from hsmkms.errors import KMSError, ServiceUnavailable, StorageUnavailable

__all__ = ["AuditWriter"]

log = structlog.get_logger(__name__)

_CLOSE_RETRY: Final = 0.05


class _Waiter:
    """A thread's wait for one record."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: KMSError | None = None

    def settle(self, error: KMSError | None) -> None:
        self.error = error
        self.event.set()


@dataclasses.dataclass(slots=True)
class _Entry:
    record: PreparedRecord
    retain: bool
    waiter: _Waiter | asyncio.Future[None] | None
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def size(self) -> int:
        return len(self.record.body)


class _Expired(Exception):
    """A record's commit did not come within ``commit_timeout``."""


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _settle_futures(futures: list[asyncio.Future[None]], error: KMSError | None) -> None:
    """On the event loop: finish each future still waiting."""
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _unavailable(exc: BaseException) -> KMSError:
    """What a caller is told when its record could not be committed: the error itself when
    it names its cause (a full disk, a cut trail), else the trail's failure in general."""
    if isinstance(exc, KMSError) and exc.shows_cause:
        return exc
    return ServiceUnavailable(
        f"The audit trail cannot be written ({type(exc).__name__}); the request was not served."
    )


class AuditWriter:
    """Commit audit records to ``trail`` from one background thread, in groups.

    ``batch_size``: the most records in one transaction; ``group_wait``: how long a group may
    grow before its commit; ``max_queue`` / ``max_queue_bytes``: the most records and encoded
    bytes waiting; ``commit_timeout``: how long :meth:`commit` and :meth:`append` wait for
    their record; ``retry_interval``: how often a failing trail is tried again;
    ``close_timeout``: how long :meth:`close` keeps retrying before it gives the remaining
    records up (logged as an error). ``failure``: the error with which the trail failed to open
    (:meth:`AuditTrail.start`); the thread keeps trying to open it.

    Thread-safe: any thread may submit; any number of event loops may await.
    """

    def __init__(
        self,
        trail: AuditTrail,
        *,
        batch_size: int = 500,
        max_queue: int = 10_000,
        max_queue_bytes: int = 64 << 20,
        commit_timeout: float = 1.0,
        retry_interval: float = 0.5,
        close_timeout: float = 30.0,
        failure: BaseException | None = None,
        group_wait: float = 0.001,
    ) -> None:
        if batch_size < 1 or max_queue < batch_size or commit_timeout <= 0:
            raise ValueError("batch_size and commit_timeout must be positive, max_queue >= batch")
        self._trail = trail
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._max_bytes = max_queue_bytes
        self._commit_timeout = commit_timeout
        self._retry_interval = retry_interval
        self._close_timeout = close_timeout
        self._group_wait = group_wait
        self._overlapping = False  # requests overlapped at the last commit: let groups grow
        self._seal_every = trail.seal_interval / 4
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_bytes = 0
        self._retained: list[PreparedRecord] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the thread waits for work
        self._done = threading.Condition(self._lock)  # flush() waits for settled records
        self._submitted = 0
        self._settled = 0  # records committed, refused after a failure, or given up
        self._closing = False
        self._close_deadline = 0.0
        self._failure: KMSError | None = None if failure is None else _unavailable(failure)
        self._thread = threading.Thread(target=self._run, name="hsmkms-audit", daemon=True)
        self._thread.start()

    # -- the request path -----------------------------------------------------------------

    def check(self) -> None:
        """Raise the trail's failure (:class:`~hsmkms.errors.ServiceUnavailable` naming the
        cause) while it cannot be written; return at once otherwise. Ask before acting on a
        request: what cannot be recorded is not done."""
        failure = self._failure
        if failure is not None:
            raise failure
        if not self._thread.is_alive() and not self._closing:
            raise ServiceUnavailable("The audit writer stopped; the request was not served.")

    def submit(
        self, record: AuditRecord | PreparedRecord, *, retain: bool = True
    ) -> _Waiter | None:
        """Queue ``record`` without waiting for it (a thread's waiter, to pass to
        :meth:`wait`). ``retain``: keep the record for a later append if its batch fails
        (a call that may have changed state). Refused at once, with the cause, while the
        trail fails or the queue is full. ``ValueError``/``TypeError`` for an invalid
        record. After :meth:`close`, appends synchronously (returns None)."""
        prepared = record if isinstance(record, PreparedRecord) else prepare_record(record)
        waiter = _Waiter()
        if self._enqueue(_Entry(prepared, retain, waiter)):
            return waiter
        return None

    def wait(self, waiter: _Waiter | None, timeout: float | None = None) -> None:
        """Wait until the record of ``waiter`` (from :meth:`submit`) is committed; raise
        :class:`~hsmkms.errors.ServiceUnavailable` when it was refused or did not commit
        within ``timeout`` (default: ``commit_timeout``)."""
        if waiter is None:
            return
        if not waiter.event.wait(self._commit_timeout if timeout is None else timeout):
            raise self._timed_out()
        if waiter.error is not None:
            raise waiter.error

    def append(self, record: AuditRecord | PreparedRecord, *, retain: bool = True) -> None:
        """Submit ``record`` and wait until it is committed (any thread; see :meth:`submit`
        and :meth:`wait`)."""
        self.wait(self.submit(record, retain=retain))

    async def commit(self, record: AuditRecord | PreparedRecord, *, retain: bool = True) -> None:
        """On an event loop: submit ``record`` and wait, without blocking the loop, until it
        is committed; :class:`~hsmkms.errors.ServiceUnavailable` when it cannot be (see
        :meth:`submit`)."""
        prepared = record if isinstance(record, PreparedRecord) else prepare_record(record)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._enqueue(_Entry(prepared, retain, future, loop)):
            return
        # A timer on the future itself: asyncio.wait_for costs a task and callbacks per request.
        expiry = loop.call_later(self._commit_timeout, _expire, future)
        try:
            await future
        except _Expired:
            raise self._timed_out() from None
        finally:
            expiry.cancel()

    def _timed_out(self) -> KMSError:
        failure = self._failure
        if failure is not None:
            return failure
        log.error("audit_commit_timeout", seconds=self._commit_timeout, queued=self.backlog)
        return ServiceUnavailable(
            f"The audit trail did not commit the record within {self._commit_timeout:g} s; "
            "the request was not served."
        )

    def _enqueue(self, entry: _Entry) -> bool:
        """Queue ``entry`` (False: appended synchronously after :meth:`close`)."""
        with self._lock:
            if not self._closing:
                self.check()
                if len(self._queue) >= self._max_queue or (
                    self._queue and self._queued_bytes + entry.size > self._max_bytes
                ):
                    log.error("audit_queue_full", queued=len(self._queue), bytes=self._queued_bytes)
                    raise ServiceUnavailable(
                        "The audit trail is not keeping up (too many records waiting); the "
                        "request was not served."
                    )
                self._queue.append(entry)
                self._queued_bytes += entry.size
                self._submitted += 1
                self._wake.notify()
                return True
        self._trail.append_prepared((entry.record,))
        return False

    # -- control ----------------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every record submitted so far is settled (committed, or refused after a
        failure). False when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            while self._settled < target:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._done.wait(remaining)
        return True

    def close(self) -> None:
        """Append everything queued and retained, then stop the thread (graceful shutdown). A
        trail that keeps failing is retried for ``close_timeout`` seconds; what remains then
        is logged as lost. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + self._close_timeout
            self._wake.notify()
        self._thread.join(self._close_timeout + 10)

    @property
    def backlog(self) -> int:
        """Records submitted and not yet settled, plus those retained after a failure."""
        with self._lock:
            return self._submitted - self._settled + len(self._retained)

    @property
    def failure(self) -> KMSError | None:
        """Why the trail cannot be written now (None while it can)."""
        if self._failure is None and not self._closing and not self._thread.is_alive():
            return ServiceUnavailable("The audit writer stopped.")
        return self._failure

    @property
    def error(self) -> str | None:
        """:attr:`failure`'s message (what ``/healthz`` shows), or None."""
        failure = self.failure
        return None if failure is None else failure.message

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        next_seal = time.monotonic() + self._seal_every
        next_try = 0.0
        try:
            while True:
                with self._lock:
                    batch, finished = self._next_batch(next_seal, next_try)
                now = time.monotonic()
                if self._failure is not None or not self._trail.started:
                    if finished:  # closing while failing: retry until the close deadline
                        if batch or self._retained:
                            self._append_closing(batch)
                        return
                    if now >= next_try:
                        self._recover()
                        next_try = time.monotonic() + self._retry_interval
                    if self._failure is not None:
                        self._refuse(batch)
                        continue
                if batch:
                    batch = self._gather(batch)
                    self._append(batch)
                if finished and not batch:
                    self._append_retained()
                    return
                if time.monotonic() >= next_seal and self._failure is None:
                    self._seal_if_due()
                    next_seal = time.monotonic() + self._seal_every
        except BaseException:
            log.exception("audit_writer_died")
            raise

    def _next_batch(self, next_seal: float, next_try: float) -> tuple[list[_Entry], bool]:
        """Lock held: wait until records are queued, the writer closes, a seal check is due,
        or (while failing) a retry is; take up to a batch. Returns (batch, finished)."""
        queue = self._queue
        while not queue and not self._closing:
            now = time.monotonic()
            # While failing, the next try is what is due (no seal is attempted meanwhile).
            failing = self._failure is not None or not self._trail.started
            wake_at = next_try if failing else next_seal
            if now >= wake_at:
                break
            self._wake.wait(wake_at - now)
        batch: list[_Entry] = []
        size = 0
        while queue and len(batch) < self._batch_size:
            size += queue[0].size
            batch.append(queue.popleft())
        self._queued_bytes -= size
        return batch, self._closing and not queue

    def _gather(self, batch: list[_Entry]) -> list[_Entry]:
        """Let a group grow for ``group_wait`` seconds before its commit: a request that
        arrives meanwhile shares the commit instead of needing one of its own. Only while
        requests overlap (the last group had several records, or records came during its
        commit): a lone request is committed at once."""
        wait = self._group_wait
        if wait <= 0 or len(batch) >= self._batch_size or not self._overlapping:
            return batch
        time.sleep(wait)
        with self._lock:
            queue = self._queue
            while queue and len(batch) < self._batch_size:
                entry = queue.popleft()
                self._queued_bytes -= entry.size
                batch.append(entry)
        return batch

    def _append(self, batch: list[_Entry]) -> None:
        """Append ``batch`` as one transaction (retained records of an earlier failure first)
        and settle its waiters; on failure, become failing and refuse the batch."""
        records = [e.record for e in batch]
        retained = self._retained
        try:
            self._trail.append_prepared([*retained, *records] if retained else records)
        except Exception as exc:
            if self._closing:
                self._append_closing(batch)
                return
            self._fail(exc)
            self._refuse(batch)
            return
        if retained:
            log.info("audit_records_recovered", records=len(retained))
            self._retained = []
        self._overlapping = len(batch) > 1 or bool(self._queue)
        self._settle(batch, None)

    def _append_closing(self, batch: list[_Entry]) -> None:
        """At close: retry until the deadline, then give up (logged)."""
        while time.monotonic() < self._close_deadline:
            try:
                self._trail.append_prepared([*self._retained, *(e.record for e in batch)])
            except Exception as exc:
                self._failure = _unavailable(exc)
                time.sleep(_CLOSE_RETRY)
                continue
            self._retained = []
            self._settle(batch, None)
            return
        self._give_up(batch)

    def _append_retained(self) -> None:
        if self._retained:
            self._append_closing([])

    def _give_up(self, batch: list[_Entry]) -> None:
        lost = len(batch) + len(self._retained)
        self._retained = []
        error = self._failure or ServiceUnavailable("The audit trail closed.")
        self._settle(batch, error)
        if lost:
            log.error("audit_records_lost", records=lost, error=error.message)

    def _fail(self, exc: BaseException) -> None:
        failure = _unavailable(exc)
        if self._failure is None or self._failure.message != failure.message:
            log.error("audit_trail_failing", error=failure.message, cause=type(exc).__name__)
        self._failure = failure

    def _refuse(self, batch: list[_Entry]) -> None:
        """The trail failed: settle ``batch`` and everything queued with the failure; keep the
        records that must not be lost (``retain``)."""
        with self._lock:
            waiting = [*batch, *self._queue]
            self._queue.clear()
            self._queued_bytes = 0
        if not waiting:
            return
        kept = [e.record for e in waiting if e.retain]
        self._retained.extend(kept)
        refused = len(waiting) - len(kept)
        log.warning(
            "audit_records_refused", refused=refused, kept=len(kept), error=self._error_text()
        )
        self._settle(waiting, self._failure)

    def _error_text(self) -> str | None:
        return None if self._failure is None else self._failure.message

    def _recover(self) -> None:
        """While failing: open the trail, append the retained records, or — with nothing to
        append — write a seal (a cut trail) or a probe; success ends the failure."""
        trail = self._trail
        try:
            if not trail.started:
                trail.start()
            if self._retained:
                trail.append_prepared(self._retained)
                log.info("audit_records_recovered", records=len(self._retained))
                self._retained = []
            elif isinstance(self._failure, TrailCut):
                trail.seal(SealReason.INTERVAL)
            else:
                trail.probe()
        except Exception as exc:
            self._fail(exc)
            return
        if self._failure is not None:
            log.warning("audit_trail_recovered", was=self._failure.message)
        self._failure = None

    def _settle(self, entries: Sequence[_Entry], error: KMSError | None) -> None:
        """Tell every waiter of ``entries`` (one call per event loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for entry in entries:
            waiter = entry.waiter
            if isinstance(waiter, _Waiter):
                waiter.settle(error)
            elif waiter is not None and entry.loop is not None:
                by_loop.setdefault(entry.loop, []).append(waiter)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle_futures, futures, error)
        with self._lock:
            self._settled += len(entries)
            self._done.notify_all()

    def _seal_if_due(self) -> None:
        try:
            self._trail.seal_if_due()
        except (TrailCut, StorageUnavailable) as exc:
            self._fail(exc)  # the trail cannot be written: refuse until it can
        except Exception as exc:  # the token away: appends go on unsealed; the next check retries
            log.warning("audit_seal_failed", error=getattr(exc, "message", type(exc).__name__))
