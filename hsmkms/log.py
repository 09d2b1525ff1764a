"""Logging: structlog, one JSON object per line (or a console line), with secrets masked
centrally.

:func:`configure_logging` is the one logging set-up of every entry point: each command of the
command line (:func:`hsmkms.cli.main.main`, at its ``--log-level``, default ``warning``), the
parent of ``hsmkms serve`` and each of its workers (:func:`hsmkms.api.app.create_app`).
structlog events and stdlib ``logging`` records (uvicorn's) leave through the same processors,
:func:`redact_secrets` first, to stderr: stdout carries command output. The format is JSON
lines (``--log-format json``, the default when stderr is not a terminal: for log shippers) or
one readable line per event (``console``, the default on a terminal). A line stderr cannot take
(a full disk under the log file, a reader that went away) is dropped, never raised into the
call that logged it.

:func:`redact_secrets` replaces the value of any field whose name says it holds a secret
(plaintext, data keys, PINs, secrets, Authorization headers, ...) with ``[secure]`` (as httpx
masks Authorization), and renders any ``bytes`` value as its length only: hsmkms never logs raw
bytes, because bytes in this service are keys, plaintext or ciphertext. A stdlib record's
``%``-arguments get the same treatment before its message is formatted; its ``extra`` fields
are not rendered at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, cast

import structlog

MASK = "[secure]"

# Field names (case-insensitive, anywhere in the name) whose values are never logged.
_SECRET_NAME = re.compile(
    r"plaintext|secret|password|passwd|pin|token|authorization|credential|data_?key|"
    r"private|signature|ciphertext|cookie",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=4096)
def _secret_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (the names a program logs are few: the
    answer is remembered)."""
    return _SECRET_NAME.search(name) is not None


# Values that are never secret containers and print as themselves: returned untouched at once
# (the access log's fields, most fields of every event).
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def _scrub(value: Any, depth: int = 0) -> Any:
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        return {
            k: (MASK if isinstance(k, str) and _secret_name(k) else _scrub(v, depth + 1))
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
        if _secret_name(key):
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


LOG_LEVELS: tuple[str, ...] = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS: tuple[str, ...] = ("json", "console")


def default_format(stream: Any) -> str:
    """``console`` when ``stream`` is a terminal, else ``json``."""
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def _renderer(fmt: str, stream: Any) -> Any:
    if fmt == "json":
        return structlog.processors.JSONRenderer(sort_keys=True)
    if fmt == "console":
        colors = default_format(stream) == "console" and "NO_COLOR" not in os.environ
        return structlog.dev.ConsoleRenderer(colors=colors, sort_keys=True)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")


class _LogStream:
    """The stream the logs go to, which never fails the call that logged: a line it cannot
    take (a full disk under a log file, a reader that went away) is dropped. A server whose
    log file was on a full disk answered uvicorn's bare 500 instead of the 503 the fault
    deserves, because writing the fault's own log line raised."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except (OSError, ValueError):  # ValueError: the stream was closed
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def configure_logging(level: str = "INFO", *, stream: Any = None, fmt: str | None = None) -> None:
    """Send structlog (and stdlib logging, e.g. uvicorn's) to ``stream`` (default stderr),
    through :func:`redact_secrets`, at ``level`` (a level name, any case) and above, as JSON
    lines or console lines (``fmt``; None: :func:`default_format`). Called once by each entry
    point; calling it again replaces the set-up."""
    given = stream if stream is not None else sys.stderr
    renderer = _renderer(fmt if fmt is not None else default_format(given), given)
    out = _LogStream(given)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                structlog.processors.format_exc_info,
                renderer,
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
    root.setLevel(numeric)
    # uvicorn sets its own loggers' levels from its log_level; they propagate here, where the
    # root's level and handler decide. Loggers that keep their own handlers would bypass the
    # format and the redaction: none may.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``logger=name``."""
    return structlog.get_logger().bind(logger=name)
