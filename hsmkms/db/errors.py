"""The one mapping of database errors to hsmkms errors.

Each component names its own wording (:class:`ErrorMessages`); :data:`RULES` decide, first
match wins, what an exception raised inside a transaction becomes:

- a :class:`~hsmkms.errors.KMSError`: itself (already an answer);
- one of the component's ``handled`` classes: itself (the component turns it into its own
  outcome, such as a duplicate);
- a driver error saying that a lock was held past the busy timeout (SQLite: ``SQLITE_BUSY``,
  ``SQLITE_LOCKED``; PostgreSQL: lock timeout, deadlock, serialization failure, statement
  timeout, too many connections): :class:`~hsmkms.errors.ServiceUnavailable` (HTTP 503 with
  AWS KMS's ``DependencyTimeoutException``; the SDKs retry it) with ``busy``;
- a driver error saying that the database server cannot be reached (PostgreSQL: connection
  refused or lost, server shutting down or starting): :class:`~hsmkms.errors.ServiceUnavailable`
  with ``unavailable`` and the cause;
- a driver error saying that the database's device is full (SQLite: ``SQLITE_FULL``;
  PostgreSQL: SQLSTATE 53100) or failed (SQLite: ``SQLITE_IOERR``):
  :class:`~hsmkms.errors.StorageUnavailable`, 503 with a message naming the cause and where
  (``The audit trail failed: no space left on the data directory's device.``);
- any other SQLAlchemy or driver error: :class:`~hsmkms.errors.KMSInternalException` with
  ``failed``;
- anything else (a store's own outcome, a bug): itself.

Errors are told apart by class and driver error code (the dialect's
:meth:`~hsmkms.db.dialects.Dialect.is_busy`), never by their text. The driver's own errors
count as database errors too: a component may run driver SQL on the raw connection (the audit
trail's append).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Final

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from hsmkms.db.dialects import Dialect
from hsmkms.errors import (
    KMSError,
    KMSInternalException,
    ServiceUnavailable,
    StorageUnavailable,
)

__all__ = ["DEFAULT_DEVICE", "RULES", "ErrorMessages", "Outcome", "classify", "map_error"]


@dataclasses.dataclass(frozen=True)
class ErrorMessages:
    """What a component's callers are told when its database fails: ``busy`` (a lock held
    past the busy timeout), ``unavailable`` (the server cannot be reached; the cause is added:
    "The metadata store is unavailable: the database server is shutting down.") and
    ``failed`` (anything else). ``handled``: database exception classes the component catches
    itself, raised unchanged."""

    busy: str
    failed: str
    handled: tuple[type[Exception], ...] = ()
    unavailable: str = "The database is unavailable."

    def unavailable_because(self, cause: str) -> str:
        """``unavailable`` with ``cause`` after a colon."""
        return f"{self.unavailable.rstrip('.')}: {cause}."


class Outcome(enum.Enum):
    """What :func:`map_error` does with an exception."""

    UNCHANGED = "raised unchanged"
    BUSY = "DependencyTimeoutException"
    UNAVAILABLE = "DependencyTimeoutException, naming the cause"
    FULL = "StorageUnavailable: no space left"
    IO_ERROR = "StorageUnavailable: I/O error"
    FAILED = "KMSInternalException"


def _driver_exception(exc: BaseException, dialect: Dialect) -> BaseException | None:
    """The driver's own exception: wrapped by SQLAlchemy, or raised by driver SQL."""
    if isinstance(exc, DBAPIError):
        return exc.orig
    return exc if isinstance(exc, dialect.driver_error) else None


def _is_kms_error(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    return isinstance(exc, KMSError)


def _is_handled(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    return isinstance(exc, messages.handled)


def _is_busy(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    cause = _driver_exception(exc, dialect)
    return cause is not None and dialect.is_busy(cause)


def _is_unavailable(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    return _unavailable_cause(exc, dialect) is not None


def _unavailable_cause(exc: BaseException, dialect: Dialect) -> str | None:
    cause = _driver_exception(exc, dialect)
    return None if cause is None else dialect.unavailable(cause)


def _is_full(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    cause = _driver_exception(exc, dialect)
    return cause is not None and dialect.is_full(cause)


def _is_io_error(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    cause = _driver_exception(exc, dialect)
    return cause is not None and dialect.is_io_error(cause)


def _is_database_error(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> bool:
    return isinstance(exc, (SQLAlchemyError, dialect.driver_error))


Rule = tuple[Callable[[BaseException, ErrorMessages, Dialect], bool], Outcome]

RULES: Final[tuple[Rule, ...]] = (
    (_is_kms_error, Outcome.UNCHANGED),
    (_is_handled, Outcome.UNCHANGED),
    (_is_busy, Outcome.BUSY),
    (_is_unavailable, Outcome.UNAVAILABLE),
    (_is_full, Outcome.FULL),
    (_is_io_error, Outcome.IO_ERROR),
    (_is_database_error, Outcome.FAILED),
)
"""The mapping, in order: the first rule whose test holds decides; none: unchanged."""


def classify(exc: BaseException, messages: ErrorMessages, dialect: Dialect) -> Outcome:
    """What :data:`RULES` make of ``exc``."""
    for applies, outcome in RULES:
        if applies(exc, messages, dialect):
            return outcome
    return Outcome.UNCHANGED


DEFAULT_DEVICE: Final = "the database's device"


def map_error(
    exc: BaseException,
    messages: ErrorMessages,
    dialect: Dialect,
    device: str = DEFAULT_DEVICE,
) -> KMSError | None:
    """The hsmkms error to raise ``from exc`` instead, or ``None`` to raise ``exc`` itself.
    ``device`` names where the database lives in the message of a full or failing device."""
    outcome = classify(exc, messages, dialect)
    # Fixed texts, never the driver's: the caller may see them (public).
    if outcome is Outcome.BUSY:
        return ServiceUnavailable(messages.busy)
    if outcome is Outcome.UNAVAILABLE:
        cause = _unavailable_cause(exc, dialect) or "the database server cannot be reached"
        return ServiceUnavailable(messages.unavailable_because(cause))
    if outcome is Outcome.FULL:
        return StorageUnavailable(f"{messages.failed.rstrip('.')}: no space left on {device}.")
    if outcome is Outcome.IO_ERROR:
        return StorageUnavailable(f"{messages.failed.rstrip('.')}: I/O error on {device}.")
    if outcome is Outcome.FAILED:
        return KMSInternalException(messages.failed)
    return None
