"""Audit records of requests that did not authenticate, bounded: a flood cannot fill the disk.

Every authenticated request gets its own audit record. A request that did not authenticate
(no or a malformed ``Authorization`` header, a wrong signature, an unknown access key, a body
too large to read, a replayed signature) costs its sender nothing, yet its record cost ~1.5 KB:
a flood of them filled the data directory's disk, and then — since no request is served
unrecorded — stopped the service. So, per worker process and per interval (60 s by default):

* the **first** unauthenticated request from each source gets its full record, at most
  :data:`FULL_RECORDS` of them per interval in all;
* every other one is **counted**: at the end of the interval each source with counted requests
  gets one summary record (``eventName`` ``UnauthenticatedRequests``; ``additionalEventData``:
  ``requestCount``, ``firstEventTime``, ``lastEventTime``, ``errorCodes``);
* a source is an IPv4 address, or the ``/64`` of an IPv6 address (one host holds a whole
  ``/64``); at most :data:`MAX_SOURCES` sources are tracked per interval, the rest are counted
  together under ``sourceIPAddress`` ``"*"``.

So one worker writes at most ``FULL_RECORDS + MAX_SOURCES + 1`` records per interval for
unauthenticated traffic, however much arrives (``docs/audit.md``). Counted requests are
answered before their summary is written: a crash loses the counts of the current interval.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import threading
from collections.abc import Callable
from typing import Final

__all__ = [
    "FULL_RECORDS",
    "MAX_SOURCES",
    "OTHER_SOURCES",
    "Summary",
    "UnauthenticatedRecords",
    "source_of",
]

FULL_RECORDS: Final = 20
"""Full records of unauthenticated requests per interval and worker, over all sources."""
MAX_SOURCES: Final = 64
"""Sources counted one by one per interval and worker; others share :data:`OTHER_SOURCES`."""
OTHER_SOURCES: Final = "*"


def source_of(address: str | None) -> str:
    """The source a request is counted under: an IPv4 address as it is, an IPv6 address as
    its ``/64``, anything else (no address, a Unix socket) as it is or ``"-"``."""
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(ip)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The counted requests of one source in one interval."""

    source: str
    count: int
    first: float  # wall-clock seconds of the first and last counted request
    last: float
    error_codes: tuple[tuple[str, int], ...]  # sorted by code


@dataclasses.dataclass
class _Tally:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    codes: dict[str, int] = dataclasses.field(default_factory=dict)


class UnauthenticatedRecords:
    """Decides which unauthenticated requests get a full record, and counts the others.
    Thread-safe. ``clock`` returns wall-clock seconds (``time.time``)."""

    def __init__(
        self,
        *,
        interval: float,
        clock: Callable[[], float],
        full_records: int = FULL_RECORDS,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        if interval <= 0:
            raise ValueError("the interval must be positive")
        self._interval = interval
        self._clock = clock
        self._full_records = full_records
        self._max_sources = max_sources
        self._lock = threading.Lock()
        self._start = clock()
        self._recorded: set[str] = set()  # sources with a full record this interval
        self._tallies: dict[str, _Tally] = {}
        self._ended: list[Summary] = []

    def admit(self, address: str | None, error_code: str) -> bool:
        """True when this request gets a full record; False when it was counted instead."""
        now = self._clock()
        source = source_of(address)
        with self._lock:
            self._roll(now)
            if source not in self._recorded and len(self._recorded) < self._full_records:
                self._recorded.add(source)
                return True
            if source not in self._tallies and len(self._tallies) >= self._max_sources:
                source = OTHER_SOURCES
            tally = self._tallies.get(source)
            if tally is None:
                tally = self._tallies[source] = _Tally(first=now)
            tally.count += 1
            tally.last = now
            tally.codes[error_code] = tally.codes.get(error_code, 0) + 1
            return False

    def due(self) -> list[Summary]:
        """The summaries of intervals that have ended (each returned once)."""
        with self._lock:
            self._roll(self._clock())
            ended, self._ended = self._ended, []
        return ended

    def drain(self) -> list[Summary]:
        """Every summary, the current interval's too (at shutdown)."""
        with self._lock:
            self._end_interval(self._clock())
            ended, self._ended = self._ended, []
        return ended

    def _roll(self, now: float) -> None:
        """Lock held: end the current interval when its time is up."""
        if now - self._start >= self._interval:
            self._end_interval(now)

    def _end_interval(self, now: float) -> None:
        for source, tally in sorted(self._tallies.items()):
            codes = tuple(sorted(tally.codes.items()))
            self._ended.append(Summary(source, tally.count, tally.first, tally.last, codes))
        self._tallies = {}
        self._recorded = set()
        self._start = now
