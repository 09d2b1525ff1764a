"""Test support: a clock that only moves when told to (rotation periods and deletion windows are
crossed by moving it, never by sleeping)."""

from __future__ import annotations

import datetime as dt
import threading


class ManualClock:
    """A :data:`~hsmkms.types.Clock` that starts at ``start`` (default: now, UTC) and moves only
    through :meth:`advance` / :meth:`set`. Thread-safe."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._now = start if start is not None else dt.datetime.now(dt.UTC)
        if self._now.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, delta: dt.timedelta | None = None, **kwargs: float) -> dt.datetime:
        """Move forward by ``delta`` (or ``timedelta(**kwargs)``); returns the new time."""
        step = delta if delta is not None else dt.timedelta(**kwargs)
        with self._lock:
            self._now += step
            return self._now

    def set(self, when: dt.datetime) -> None:
        """Jump to ``when`` (aware)."""
        if when.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        with self._lock:
            self._now = when
