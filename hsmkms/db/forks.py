"""Fork detection without a system call (``os.getpid`` is one, on a path every request takes).

:data:`FORKS.count <FORKS>` goes up in every child made by ``os.fork`` (which
``multiprocessing`` uses too); an object that remembers the count it last saw knows it has been
forked when the count differs.
"""

from __future__ import annotations

import os

__all__ = ["FORKS"]


class _Forks:
    count = 0


FORKS = _Forks()
"""How many forks led to this process (0 in a process that was started, not forked)."""


def _forked() -> None:
    FORKS.count += 1


os.register_at_fork(after_in_child=_forked)
