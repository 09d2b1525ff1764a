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
"""

from __future__ import annotations

import os

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
    "exposition",
    "observe_hsm_call",
    "observe_request",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NO_OPERATION = "-"

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


def observe_request(operation: str, code: str, seconds: float) -> None:
    """Count one answered request and record its latency."""
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
