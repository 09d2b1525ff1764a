"""Logging: structlog, one JSON object per line, with secrets masked centrally.

:func:`configure_logging` is the one logging set-up of every entry point: each command of the
command line (:func:`hsmkms.cli.main.main`, at ``WARNING``; ``serve`` at its ``--log-level``),
the parent of ``hsmkms serve`` and each of its workers (:func:`hsmkms.api.app.create_app`).
structlog events and stdlib ``logging`` records (uvicorn's) leave through the same processor,
:func:`redact_secrets`, to stderr: stdout carries command output.

:func:`redact_secrets` replaces the value of any field whose name says it holds a secret
(plaintext, data keys, PINs, secrets, Authorization headers, ...) with ``[secure]`` (as httpx
masks Authorization), and renders any ``bytes`` value as its length only: hsmkms never logs raw
bytes, because bytes in this service are keys, plaintext or ciphertext. A stdlib record's
``%``-arguments get the same treatment before its message is formatted; its ``extra`` fields
are not rendered at all.
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
            event = event_dict[key]
            if isinstance(event, bytes | bytearray | memoryview):
                event_dict[key] = _scrub(event)
            continue
        if _SECRET_NAME.search(key):
            event_dict[key] = MASK
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def _scrub_stdlib_arguments(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """For a stdlib record: its message formatted again with :func:`redact_secrets`' rule
    applied to its ``%``-arguments (``log.info("key %s", data_key)`` shows the length only)."""
    record = event_dict.get("_record")
    args = event_dict.pop("positional_args", None)  # ProcessorFormatter(pass_foreign_args=True)
    if not isinstance(record, logging.LogRecord):
        return event_dict
    if isinstance(record.msg, bytes | bytearray | memoryview):
        event_dict["event"] = _scrub(record.msg)
    elif args:
        scrubbed: Any = (
            _scrub(args)  # secret-named keys masked too
            if isinstance(args, Mapping)
            else tuple(_scrub(v) for v in args)
        )
        try:
            event_dict["event"] = str(record.msg) % scrubbed
        except (TypeError, ValueError, KeyError):
            event_dict["event"] = str(record.msg)
    return event_dict


def configure_logging(level: str = "INFO", *, stream: Any = None) -> None:
    """Send structlog (and stdlib logging, e.g. uvicorn's) to ``stream`` (default stderr) as
    JSON lines, through :func:`redact_secrets`, at ``level`` (a level name, any case) and
    above. Called once by each entry point; calling it again replaces the set-up."""
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
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(sort_keys=True),
            ],
            foreign_pre_chain=[
                _scrub_stdlib_arguments,
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            pass_foreign_args=True,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``logger=name``."""
    return structlog.get_logger().bind(logger=name)
