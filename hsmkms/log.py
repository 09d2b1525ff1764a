"""Logging: structlog, one JSON object per line, with secrets masked centrally.

:func:`redact_secrets` is a structlog processor that replaces the value of any field whose name
says it holds a secret (plaintext, data keys, PINs, secrets, Authorization headers, ...) with
``[secure]`` (as httpx masks Authorization), and renders any ``bytes`` value as its length only:
hsmkms never logs raw bytes, because bytes in this service are keys, plaintext or ciphertext.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

MASK = "[secure]"

# Field names (case-insensitive, anywhere in the name) whose values are never logged.
_SECRET_NAME = re.compile(
    r"plaintext|secret|password|passwd|pin|token|authorization|credential|data_?key|"
    r"private|signature|ciphertext|cookie",
    re.IGNORECASE,
)


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        return {
            k: (MASK if isinstance(k, str) and _SECRET_NAME.search(k) else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named fields and never emit raw bytes."""
    for key in list(event_dict):
        if key == "event":
            continue
        if _SECRET_NAME.search(key):
            event_dict[key] = MASK
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure_logging(level: str = "INFO", *, stream: Any = None) -> None:
    """Send structlog (and stdlib logging, e.g. uvicorn's) to ``stream`` (default stderr) as
    JSON lines, through :func:`redact_secrets`."""
    out = stream if stream is not None else sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(sort_keys=True),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                structlog.processors.JSONRenderer(sort_keys=True),
            ],
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``logger=name``."""
    return structlog.get_logger().bind(logger=name)
