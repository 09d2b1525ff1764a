"""Operations the HTTP layer runs inline on its event loop (fast token work: the descriptors'
``inline``) must not wait there on anything slow, or every other request of the worker waits
too. The two slow things an inline operation can meet — a call to an external key store's XKS
proxy (a network round trip, up to HSMKMS_XKS_TIMEOUT) and the first use of a custom key store's
token in this process (opening and logging in) — call :func:`leave_the_event_loop` first: on
the event loop (inside :func:`on_event_loop`) it raises :class:`MustLeaveTheEventLoop` before
the operation changed anything, and the HTTP layer runs the whole operation again on a thread.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["MustLeaveTheEventLoop", "leave_the_event_loop", "on_event_loop"]

_ON_EVENT_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hsmkms_on_event_loop", default=False
)


class MustLeaveTheEventLoop(Exception):
    """The operation would block the event loop on ``what``: run it again on a thread."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@contextlib.contextmanager
def on_event_loop() -> Iterator[None]:
    """The code inside runs on the HTTP event loop."""
    token = _ON_EVENT_LOOP.set(True)
    try:
        yield
    finally:
        _ON_EVENT_LOOP.reset(token)


def leave_the_event_loop(what: str) -> None:
    """Called before blocking on ``what``: on the event loop, raise
    :class:`MustLeaveTheEventLoop`; elsewhere, nothing."""
    if _ON_EVENT_LOOP.get():
        raise MustLeaveTheEventLoop(what)
