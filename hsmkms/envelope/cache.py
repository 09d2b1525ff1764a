"""Data-key caching: one data key for several messages, to save KMS calls on many small objects
(as the Encryption SDK's caching materials manager and S3 Bucket Keys do). Off by default.

A cached key is reused for at most ``max_messages`` messages, ``max_bytes`` plaintext bytes and
``max_age`` seconds, per (key id, encryption context). A message whose length is not known in
advance (a stream) never uses the cache, so the byte limit holds (as in the Encryption SDK); a
file is counted at the size it had when its encryption started.

Why reuse is safe: every message derives its own key from the data key and a fresh 32-byte
salt (:mod:`hsmkms.envelope.format`), so nonces never repeat under one key. What reuse costs:
anyone who obtains one message's data key can open every message that shared it, and a key
policy change or a disabled key takes effect on new messages only after ``max_age``.

Security contract: cached plaintext keys are wiped on eviction and by :meth:`DataKeyCache.clear`;
callers receive copies and wipe those.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from hsmkms.ciphertext import encode_encryption_context
from hsmkms.envelope.providers import DataKey, DataKeyProvider
from hsmkms.errors import ValidationException
from hsmkms.types import EncryptionContext

__all__ = ["CacheStats", "DataKeyCache"]

# spec: the Encryption SDK caps messages per cached data key at 2**32.
MAX_MESSAGES_PER_KEY = 1 << 32


@dataclasses.dataclass(frozen=True, slots=True)
class CacheStats:
    """What the cache did. ``kms_calls``: GenerateDataKey calls made; ``kms_calls_saved``:
    messages served from the cache instead; ``bypassed``: messages of unknown length (they
    always get a fresh key, counted in ``kms_calls``); ``evictions``: keys retired early or
    at their limits; ``entries``: keys held now."""

    kms_calls: int
    kms_calls_saved: int
    bypassed: int
    evictions: int
    entries: int


@dataclasses.dataclass(slots=True, eq=False, repr=False)
class _Entry:
    key: DataKey
    created: float
    messages: int
    nbytes: int


class DataKeyCache:
    """A thread-safe data-key cache with message, byte and age limits, holding at most
    ``capacity`` keys (least recently used evicted first)."""

    def __init__(
        self,
        *,
        max_messages: int,
        max_bytes: int,
        max_age: float,
        capacity: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= max_messages <= MAX_MESSAGES_PER_KEY:
            raise ValidationException(f"max_messages must be in 1..{MAX_MESSAGES_PER_KEY}")
        if max_bytes < 0 or max_age <= 0 or capacity < 1:
            raise ValidationException("max_bytes >= 0, max_age > 0 and capacity >= 1 required")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self._kms_calls = 0
        self._saved = 0
        self._bypassed = 0
        self._evictions = 0

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(max_messages={self.max_messages}, max_bytes={self.max_bytes}, "
            f"max_age={self.max_age}, {self.stats})"
        )

    @property
    def stats(self) -> CacheStats:
        """Counters since creation."""
        with self._lock:
            return CacheStats(
                self._kms_calls, self._saved, self._bypassed, self._evictions, len(self._entries)
            )

    def _evict(self, cache_key: tuple[str, bytes]) -> None:
        entry = self._entries.pop(cache_key, None)
        if entry is not None:
            entry.key.wipe()
            self._evictions += 1

    def _usable(self, entry: _Entry, nbytes: int, now: float) -> bool:
        return (
            now - entry.created < self.max_age
            and entry.messages < self.max_messages
            and entry.nbytes + nbytes <= self.max_bytes
        )

    def data_key(
        self,
        provider: DataKeyProvider,
        key_id: str,
        context: EncryptionContext,
        plaintext_length: int | None,
    ) -> DataKey:
        """A data key for one message of ``plaintext_length`` bytes (``None``: unknown, never
        cached). Returns a copy the caller must wipe."""
        if plaintext_length is None:
            key = provider.generate_data_key(key_id, context)
            with self._lock:
                self._kms_calls += 1
                self._bypassed += 1
            return key
        cache_key = (key_id, encode_encryption_context(context))
        with self._lock:
            entry = self._entries.get(cache_key)
            now = self._clock()
            if entry is not None and self._usable(entry, plaintext_length, now):
                entry.messages += 1
                entry.nbytes += plaintext_length
                self._entries.move_to_end(cache_key)
                self._saved += 1
                return entry.key.copy()
            if entry is not None:
                self._evict(cache_key)
        # The KMS call happens outside the lock: a slow KMS must not stall cache hits of
        # other keys. Two threads may both miss and both call; the later one's key is kept.
        key = provider.generate_data_key(key_id, context)
        with self._lock:
            self._kms_calls += 1
            if plaintext_length <= self.max_bytes and self.max_messages > 1:
                self._evict(cache_key)
                self._entries[cache_key] = _Entry(key.copy(), self._clock(), 1, plaintext_length)
                while len(self._entries) > self._capacity:
                    self._evict(next(iter(self._entries)))
        return key

    def clear(self) -> None:
        """Wipe and forget every cached key."""
        with self._lock:
            for cache_key in list(self._entries):
                self._evict(cache_key)
