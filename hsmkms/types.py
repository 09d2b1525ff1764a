"""Type aliases shared across hsmkms."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping

KeyId = str
"""A KMS key id: a UUID string."""

EncryptionContext = Mapping[str, str]
"""An AWS encryption context: string keys to string values, bound to ciphertexts as AAD."""

Clock = Callable[[], dt.datetime]
"""Returns the current time as an aware UTC datetime. Injected so tests can move time."""


def utc_now() -> dt.datetime:
    """The default clock: the current time in UTC."""
    return dt.datetime.now(dt.UTC)
