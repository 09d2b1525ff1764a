"""Read caches that stay right across processes: answers are kept only while a change signal
says nothing a cache holds was committed to the database since they were read.

A :class:`ChangeSignal` answers one question, "has anything been committed since token X?",
as an opaque token that moves on every commit, by any connection, process or node, of a write
transaction that may change what a cache holds (``Database.write(cached=True)``, the default;
writes of tables no cache reads, such as the audit trail's appends and the encryption
counters' block reservations, pass ``cached=False`` and move nothing). Each dialect provides
its own (:mod:`hsmkms.db.dialects`): both SQLite and PostgreSQL keep a change counter that
every such write transaction bumps as its last statement, read in one primary-key lookup
(on SQLite only after ``PRAGMA data_version`` says that something was committed); a dialect
without one gets :class:`NoChangeSignal`, which makes every cache miss.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar

from hsmkms.db.forks import FORKS

__all__ = ["ChangeSignal", "NoChangeSignal", "ReadCache"]

_R = TypeVar("_R")
_MISSING: Any = object()


class ChangeSignal(Protocol):
    """Tells whether anything was committed to a database between two moments."""

    def token(self) -> Hashable | None:
        """An opaque token: two equal tokens from this signal mean nothing was committed in
        between, by any connection of any process. ``None`` when that cannot be told (then
        nothing may be answered from a cache). Thread-safe."""
        ...

    def close(self) -> None:
        """Release what the signal holds; :meth:`token` answers ``None`` afterwards."""
        ...


class NoChangeSignal:
    """The signal of a database that cannot tell: every token is ``None``, so every read cache
    misses."""

    def token(self) -> Hashable | None:
        return None

    def close(self) -> None:
        pass


def _nothing() -> None:
    return None


class ReadCache:
    """Answers by key, kept while the database is unchanged. Thread-safe.

    ``signal`` is the database's change signal. It is asked at most every ``check_interval``
    seconds, so a commit by another process is seen within that time; :meth:`invalidate`
    (called by :class:`~hsmkms.db.Database` after each of its write transactions) makes this
    process's own writes visible at once. ``on_fork`` runs on the first use in a forked child
    (the database's fork check, which gives the cache the child's own signal through
    :meth:`rebind`). ``None`` answers are kept only with ``keep_none``; at ``max_entries`` the
    cache starts over.
    """

    def __init__(
        self,
        signal: ChangeSignal,
        *,
        check_interval: float,
        max_entries: int,
        keep_none: bool = False,
        on_fork: Callable[[], None] = _nothing,
    ) -> None:
        self._signal = signal
        self._on_fork = on_fork
        self._forks = FORKS.count
        self._interval = check_interval
        self._max = max_entries
        self._keep_none = keep_none
        self._lock = threading.Lock()
        self._entries: dict[Hashable, Any] = {}
        self._token: Hashable | None = None
        self._checked_at = -math.inf

    def _fresh(self) -> bool:
        """Whether entries may be served; empties the cache when the database changed since
        they were read. Lock held."""
        if self._interval:
            now = time.monotonic()
            if now - self._checked_at < self._interval:
                return self._token is not None
            self._checked_at = now
        token = self._signal.token()
        if token is None or token != self._token:
            self._entries.clear()
            self._token = token
        return token is not None

    def get(self, key: Hashable, load: Callable[[], _R]) -> _R:
        """``load()``, or its answer remembered under ``key`` while the database is unchanged.
        An answer is remembered only if nothing changed while it was loaded, so callers must
        return values that they never mutate."""
        if self._forks != FORKS.count:
            self._forked()
        with self._lock:
            if self._fresh():
                hit = self._entries.get(key, _MISSING)
                if hit is not _MISSING:
                    return hit  # type: ignore[no-any-return]  # cast() costs a call, every request
                token = self._token
            else:
                token = None
        found = load()
        if token is not None and (found is not None or self._keep_none):
            with self._lock:
                if self._fresh() and self._token == token:
                    if len(self._entries) >= self._max:
                        self._entries.clear()
                    self._entries[key] = found
        return found

    def _forked(self) -> None:
        """First use in a forked child: tell the owner (which rebinds this cache)."""
        self._on_fork()
        self._forks = FORKS.count

    def invalidate(self) -> None:
        """Forget every answer, and ask the signal again on the next :meth:`get`."""
        with self._lock:
            self._entries.clear()
            self._checked_at = -math.inf

    def rebind(self, signal: ChangeSignal) -> None:
        """Forget every answer and watch ``signal`` from now on (tokens of two signals do not
        compare)."""
        with self._lock:
            self._signal = signal
            self._entries.clear()
            self._token = None
            self._checked_at = -math.inf
