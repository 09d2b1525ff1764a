"""Refusing replays of requests that change state: the signatures this node accepted recently.

A SigV4 signature is valid for five minutes either side of its request time, so a captured
request could be sent again within that window. For read-only operations (Encrypt, Decrypt,
DescribeKey, ... — the operation descriptors' ``read_only``) that is harmless, and clients
legitimately resend them; a request that changes state (ScheduleKeyDeletion, CreateGrant,
PutKeyPolicy, ...) is accepted once per signature. The workers of one server share a small
database file in the data directory (``replay.db``: one row per accepted signature, kept until
the signature can no longer be valid), so a replay is refused whichever worker receives it.
Another node does not know these signatures: the guarantee is per node (``docs/authentication.md``).

An insert costs tens of microseconds (the file is not synced: a crash of the whole machine may
forget the last signatures, which a restart within the window would then accept again once).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from sqlalchemy import Column, Float, MetaData, String, Table, delete, insert
from sqlalchemy.exc import IntegrityError

from hsmkms.db import Database, ErrorMessages, file_url
from hsmkms.types import utc_now

__all__ = ["REPLAY_FILE", "ReplayCache"]

REPLAY_FILE: Final = "replay.db"
_PRUNE_EVERY: Final = 256  # claims between two deletions of expired rows

_ERRORS = ErrorMessages(
    busy="The replay cache is busy.",
    failed="The replay cache failed.",
    handled=(IntegrityError,),
)
_metadata = MetaData()
_seen = Table(
    "seen_signatures",
    _metadata,
    Column("signature", String(128), primary_key=True),
    Column("expires", Float, nullable=False, index=True),
)


class ReplayCache:
    """The signatures of state-changing requests this node accepted, until they expire.

    ``window`` is how long a signature stays valid after it was first seen: twice the SigV4
    clock skew (a request dated five minutes ahead is accepted until ten minutes from now),
    plus a minute. Thread-safe; one per worker process, all on the same file.
    """

    def __init__(
        self,
        path: Path,
        *,
        window: dt.timedelta = dt.timedelta(minutes=11),
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self._db = Database(file_url(path), durable=False, busy_timeout_ms=5_000)
        self._window = window.total_seconds()
        self._clock = clock
        self._lock = threading.Lock()
        self._claims = 0
        with self._db.write(_ERRORS) as conn:
            _metadata.create_all(conn, checkfirst=True)

    def first_use(self, signature: str) -> bool:
        """Record ``signature``; True when this node has not accepted it within the window
        (the request may go ahead), False for a replay."""
        now = self._clock().timestamp()
        with self._lock:
            self._claims += 1
            prune = self._claims % _PRUNE_EVERY == 1
        try:
            with self._db.write(_ERRORS) as conn:
                if prune:
                    conn.execute(delete(_seen).where(_seen.c.expires < now))
                else:
                    # The same signature seen long ago (expired) is a new request now.
                    conn.execute(
                        delete(_seen).where(_seen.c.signature == signature, _seen.c.expires < now)
                    )
                conn.execute(insert(_seen).values(signature=signature, expires=now + self._window))
        except IntegrityError:
            return False
        return True

    def close(self) -> None:
        self._db.close()
