"""Prometheus metrics of the HTTP API, in prometheus-client's multiprocess mode.

``hsmkms serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` (``<data_dir>/prometheus``, emptied at
start) before any worker imports prometheus-client, so each worker writes its samples to
files there and ``GET /metrics`` in any worker reports the sum over all workers. Without the
variable (a test importing the app in-process) the default registry is used.

Metrics::

    hsmkms_requests_total{operation, code}            requests answered; code = OK or __type
    hsmkms_request_duration_seconds{operation}        whole request, body read to response
    hsmkms_hsm_call_duration_seconds{call}            each PKCS#11 keystore call (encrypt,
                                                      decrypt, create_key, random, self_test...),
                                                      fed by the keystore's observer hook
                                                      (observe_hsm_call)
    hsmkms_due_task_runs_total{result}                periodic task passes: ran / skipped

``operation`` is the KMS operation, or ``-`` when the request names none this service knows
(label values are never taken from the request unchecked).

prometheus-client maps its multiprocess files into memory and grows them sparsely: a page
first written while the device is full kills the process with ``SIGBUS``. So each worker
reserves its files' blocks once, at start (:func:`reserve_files`, ``posix_fallocate``);
a worker that cannot (the data directory's device is full) keeps no metrics of its own rather
than risk its life, and says so in the log.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "DUE_TASK_RUNS",
    "HSM_CALLS",
    "MULTIPROC_ENV",
    "NO_OPERATION",
    "REQUESTS",
    "REQUEST_LATENCY",
    "count_due_task_run",
    "exposition",
    "observe_hsm_call",
    "observe_request",
    "reserve_files",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NO_OPERATION = "-"
RESERVED_BYTES = 4 << 20
"""Bytes reserved per metrics file of a worker: room for ~20,000 label sets, far more than
hsmkms's bounded labels make, so a file never grows past its reserved blocks."""
# The prometheus-client value types hsmkms's metrics use (its files: <type>_<pid>.db).
_FILE_TYPES = ("counter", "histogram")

log = structlog.get_logger(__name__)
_enabled = True

REQUESTS = Counter(
    "hsmkms_requests_total",
    "KMS API requests answered, by operation and result code (OK or the error __type).",
    ["operation", "code"],
)
REQUEST_LATENCY = Histogram(
    "hsmkms_request_duration_seconds",
    "KMS API request latency in seconds, from the first body byte to the response.",
    ["operation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
HSM_CALLS = Histogram(
    "hsmkms_hsm_call_duration_seconds",
    "PKCS#11 keystore call latency in seconds (including the wait for the process lock).",
    ["call"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0),
)

DUE_TASK_RUNS = Counter(
    "hsmkms_due_task_runs_total",
    "Periodic task passes (due rotations and deletions): ran, or skipped because another "
    "worker held the task lock.",
    ["result"],
)

# Label children are looked up once: .labels() costs more than the observation itself.
_request_children: dict[tuple[str, str], Counter] = {}
_latency_children: dict[str, Histogram] = {}
_hsm_children: dict[str, Histogram] = {}


def reserve_files(size: int = RESERVED_BYTES) -> bool:
    """In a worker, before its first observation: create this process's multiprocess files
    with ``size`` bytes of blocks allocated, which prometheus-client then uses as they are.
    When the blocks cannot be had (no space left), this process records no metrics (returns
    False, logged). Nothing to do outside multiprocess mode."""
    global _enabled
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return True
    try:
        for kind in _FILE_TYPES:
            path = Path(directory) / f"{kind}_{os.getpid()}.db"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
    except OSError as exc:
        _enabled = False
        log.error(
            "metrics_disabled",
            reason=f"cannot reserve the metrics files: {exc.strerror or exc}",
            pid=os.getpid(),
        )
        return False
    _enabled = True
    return True


def count_due_task_run(result: str) -> None:
    """Count one periodic task pass (``ran`` or ``skipped``)."""
    if _enabled:
        DUE_TASK_RUNS.labels(result).inc()


def observe_request(operation: str, code: str, seconds: float) -> None:
    """Count one answered request and record its latency."""
    if not _enabled:
        return
    counter = _request_children.get((operation, code))
    if counter is None:
        counter = _request_children[(operation, code)] = REQUESTS.labels(operation, code)
    counter.inc()
    histogram = _latency_children.get(operation)
    if histogram is None:
        histogram = _latency_children[operation] = REQUEST_LATENCY.labels(operation)
    histogram.observe(seconds)


def observe_hsm_call(call: str, seconds: float) -> None:
    """Record one keystore call's latency: the keystore's observer hook
    (:data:`hsmkms.keystore.base.CallObserver`), failures included."""
    if not _enabled:
        return
    histogram = _hsm_children.get(call)
    if histogram is None:
        histogram = _hsm_children[call] = HSM_CALLS.labels(call)
    histogram.observe(seconds)


def exposition() -> bytes:
    """The Prometheus text exposition: all workers' samples in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
