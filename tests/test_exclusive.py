"""``Database.exclusive``: work that must run on one node at a time (the periodic rotations
and purges) takes a lock every process of every node on the database sees, without waiting;
the holder's death releases it. Run on SQLite and, in the PostgreSQL run, on a real server."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from postgres import store_url

from hsmkms.api.runtime import DUE_TASKS_LOCK
from hsmkms.db import Database

pytestmark = [pytest.mark.database]

KEY = 0x68736D6B6D73FF


def _hold_until_killed(url: str, held: multiprocessing.synchronize.Event) -> None:
    database = Database(url)
    with database.exclusive(KEY) as mine:
        assert mine
        held.set()
        time.sleep(120)


def test_one_holder_at_a_time_and_the_next_after_it(tmp_path: Path) -> None:
    url = store_url(tmp_path / "kms.db")
    first, second = Database(url), Database(url)  # two processes, or two nodes
    try:
        with first.exclusive(KEY) as held:
            assert held
            with second.exclusive(KEY) as other:
                assert not other  # skipped at once, nothing waited for
            with second.exclusive(KEY + 1) as unrelated:
                assert unrelated  # another lock is another lock
        with second.exclusive(KEY) as now:
            assert now
    finally:
        first.close()
        second.close()


def test_a_holder_killed_releases_the_lock(tmp_path: Path) -> None:
    url = store_url(tmp_path / "kms.db")
    Database(url).close()  # the database exists before the child opens it
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    child = context.Process(target=_hold_until_killed, args=(url, held))
    child.start()
    database = Database(url)
    try:
        assert held.wait(60)
        with database.exclusive(KEY) as taken:
            assert not taken
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        deadline = time.monotonic() + 30
        while True:  # PostgreSQL ends the dead client's session a moment later
            with database.exclusive(KEY) as taken:
                if taken:
                    break
            assert time.monotonic() < deadline, "the dead holder's lock was never released"
            time.sleep(0.05)
    finally:
        if child.is_alive():
            child.kill()
        database.close()


def test_the_periodic_work_s_lock_is_a_63_bit_number() -> None:
    assert 0 < DUE_TASKS_LOCK < 2**63
