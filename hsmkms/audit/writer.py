"""The per-process audit writer: requests queue their records in memory; one background thread
appends them to the :class:`~hsmkms.audit.trail.AuditTrail` in batches.

Why: a synchronous append costs ~0.6 ms, nearly all of it the SQLite write lock and the commit,
and the lock is shared by every worker — one append per request would cap the whole API at
~1,400 requests/s. A batch of a few hundred records costs about as much as one record.

Guarantees (``docs/audit.md``):

* **Order**: the records of one writer are appended in the order they were submitted (one
  queue, one thread, one transaction per batch).
* **Encoding on the caller's thread**: :meth:`AuditWriter.submit` encodes the record
  (:func:`~hsmkms.audit.records.prepare_record`; or takes one already encoded, from
  :func:`~hsmkms.audit.records.prepare_api_call`), so an invalid record fails there, at once,
  and the background thread only chains and inserts.
* **Nothing is dropped silently.** The queue is bounded in records (``max_queue``) and in the
  bytes of their encoded records (``max_queue_bytes``: records differ in size by two orders of
  magnitude, so a count alone does not bound memory); when it is full,
  :meth:`AuditWriter.submit` waits for room — back-pressure: the API slows to the pace of the
  trail — for at most ``block_timeout`` seconds, then raises
  :class:`~hsmkms.errors.DependencyTimeoutException` so the caller can refuse the request
  instead of answering it unrecorded. A batch that fails to append (database locked or away)
  is kept and retried, with back-off, in the same order.
* **Atomic batches**: a batch is one transaction, so after a crash the trail holds whole,
  chained batches; what is lost is what was still queued — normally at most one flush
  interval (``flush_interval``, 100 ms) of this process's records; while the database is slow
  or away, up to the queue bound.
* **Sealing**: the thread also calls :meth:`~hsmkms.audit.trail.AuditTrail.seal_if_due`
  every quarter of the trail's seal interval (the heartbeat the trail needs).

:meth:`AuditWriter.close` appends everything queued (retrying for at most ``close_timeout``
seconds) and stops the thread; the trail itself stays open (``AuditTrail.close`` writes the
shutdown seal). A writer serves one process: make it after any ``fork()``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Final

import structlog

from hsmkms.audit.records import AuditRecord, PreparedRecord, prepare_record
from hsmkms.audit.trail import AuditTrail
from hsmkms.errors import DependencyTimeoutException

__all__ = ["AuditWriter"]

log = structlog.get_logger(__name__)

_RETRY_FIRST: Final = 0.05
_RETRY_MAX: Final = 1.0


class AuditWriter:
    """Queue audit records and append them to ``trail`` from one background thread.

    ``flush_interval``: the longest a record waits in the queue before its batch is written;
    ``batch_size``: a batch is written as soon as this many records wait; ``max_queue``: the
    most records held in memory; ``max_queue_bytes``: the most bytes of encoded records held in
    memory (a record larger than that is still queued alone, into an empty queue);
    ``block_timeout``: how long :meth:`submit` waits for room in a
    full queue before it gives up; ``close_timeout``: how long :meth:`close` keeps retrying a
    failing append before it gives the remaining records up (logged as an error).

    Thread-safe: any thread may submit.
    """

    def __init__(
        self,
        trail: AuditTrail,
        *,
        flush_interval: float = 0.1,
        batch_size: int = 500,
        max_queue: int = 10_000,
        max_queue_bytes: int = 32 * 1024 * 1024,
        block_timeout: float = 2.0,
        close_timeout: float = 30.0,
    ) -> None:
        if flush_interval <= 0 or batch_size < 1 or max_queue < batch_size:
            raise ValueError("flush_interval and batch_size must be positive, max_queue >= batch")
        self._trail = trail
        self._interval = flush_interval
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._max_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._block_timeout = block_timeout
        self._close_timeout = close_timeout
        self._seal_every = trail.seal_interval / 4
        self._queue: collections.deque[PreparedRecord] = collections.deque()
        lock = threading.Lock()
        self._wake = threading.Condition(lock)  # the thread waits for records or a request
        self._room = threading.Condition(lock)  # submitters wait for room in a full queue
        self._done = threading.Condition(lock)  # flush() waits for its records to be written
        self._oldest = 0.0  # when the oldest queued record arrived (time.monotonic)
        self._submitted = 0
        self._written = 0  # records appended (or given up at close)
        self._flush_to = 0  # the thread writes without waiting until _written reaches this
        self._closing = False
        self._close_deadline = 0.0
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="hsmkms-audit", daemon=True)
        self._thread.start()

    # -- the request path -----------------------------------------------------------------

    def submit(self, record: AuditRecord | PreparedRecord) -> None:
        """Encode ``record`` (unless it is already) and queue it to be appended, in submission
        order.

        Returns at once unless the queue is full: then waits up to ``block_timeout`` for room,
        and raises :class:`~hsmkms.errors.DependencyTimeoutException` (the record is not
        queued) if there is none. ``ValueError``/``TypeError`` for an invalid record. After
        :meth:`close`, appends synchronously."""
        prepared = record if isinstance(record, PreparedRecord) else prepare_record(record)
        with self._wake:
            if not self._closing:
                queue = self._queue
                size = len(prepared.body)
                if self._full(size):
                    self._wait_for_room(size)
                if not queue:
                    self._oldest = time.monotonic()
                    self._wake.notify()
                queue.append(prepared)
                self._queued_bytes += size
                self._submitted += 1
                if len(queue) == self._batch_size:
                    self._wake.notify()
                return
        self._trail.append_prepared((prepared,))

    def _full(self, size: int) -> bool:
        """Lock held: whether a record of ``size`` bytes finds no room (an empty queue always
        has room)."""
        queue = self._queue
        return bool(queue) and (
            len(queue) >= self._max_queue or self._queued_bytes + size > self._max_bytes
        )

    def _wait_for_room(self, size: int) -> None:
        """Lock held: wait until the queue has room for a record of ``size`` bytes
        (``DependencyTimeoutException`` at the deadline)."""
        deadline = time.monotonic() + self._block_timeout
        while self._full(size):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                log.error(
                    "audit_queue_full",
                    queued=len(self._queue),
                    queued_bytes=self._queued_bytes,
                    error=self._error,
                )
                raise DependencyTimeoutException("The audit trail is busy.")
            self._room.wait(remaining)

    # -- control ----------------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything submitted so far now, and wait until it is in the trail. Returns
        False when ``timeout`` passed first (the trail failing meanwhile)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            target = self._submitted
            self._flush_to = max(self._flush_to, target)
            self._wake.notify()
            while self._written < target:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._done.wait(remaining)
        return True

    def close(self) -> None:
        """Append everything queued, then stop the thread (graceful shutdown). A trail that
        keeps failing is retried for ``close_timeout`` seconds; what is still queued then is
        logged as lost. Idempotent."""
        with self._wake:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + self._close_timeout
            self._wake.notify()
            self._room.notify_all()
        self._thread.join(self._close_timeout + 10)

    @property
    def backlog(self) -> int:
        """Records submitted and not yet appended."""
        with self._wake:
            return self._submitted - self._written

    @property
    def error(self) -> str | None:
        """The error class of the last failed append while it is unresolved (``WriterStopped``
        when the thread is gone before :meth:`close`), else None."""
        if not self._closing and not self._thread.is_alive():
            return "WriterStopped"
        return self._error

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        next_seal = time.monotonic() + self._seal_every
        while True:
            with self._wake:
                batch = self._next_batch(next_seal)
                finished = self._closing and not batch and not self._queue
            if batch:
                self._append(batch)
            if time.monotonic() >= next_seal and not finished:
                self._seal_if_due()
                next_seal = time.monotonic() + self._seal_every
            if finished:
                return

    def _next_batch(self, next_seal: float) -> list[PreparedRecord]:
        """Lock held: wait until a batch is due (full, old enough, flushed, closing) or the
        seal check is; take it."""
        queue = self._queue
        while not self._closing:
            now = time.monotonic()
            if queue:
                urgent = self._flush_to > self._written or len(queue) >= self._batch_size
                due = self._oldest + self._interval
                if urgent or now >= due:
                    break
                wake_at = min(due, next_seal)
            else:
                wake_at = next_seal
            if now >= next_seal:
                return []
            self._wake.wait(wake_at - now)
        n = min(len(queue), self._batch_size)
        batch = [queue.popleft() for _ in range(n)]
        self._queued_bytes -= sum(len(record.body) for record in batch)
        # What stays queued is older than ``_oldest``'s record: due already, written next.
        self._room.notify_all()
        return batch

    def _append(self, batch: Sequence[PreparedRecord]) -> None:
        """Append ``batch`` as one transaction, retrying while the trail fails (until the close
        deadline)."""
        delay = _RETRY_FIRST
        while True:
            try:
                self._trail.append_prepared(batch)
                break
            except Exception as exc:
                self._error = type(exc).__name__
                if self._closing and time.monotonic() + delay > self._close_deadline:
                    with self._wake:
                        lost = len(batch) + len(self._queue)
                        self._written += lost
                        self._queue.clear()
                        self._queued_bytes = 0
                        self._done.notify_all()
                    log.error("audit_records_lost", records=lost, error=self._error)
                    return
                log.warning("audit_append_failed", error=self._error, records=len(batch))
                time.sleep(delay)
                delay = min(2 * delay, _RETRY_MAX)
        self._error = None
        with self._wake:
            self._written += len(batch)
            self._done.notify_all()

    def _seal_if_due(self) -> None:
        try:
            self._trail.seal_if_due()
        except Exception as exc:  # the token or the database away: the next check retries
            log.warning("audit_seal_failed", error=type(exc).__name__)
