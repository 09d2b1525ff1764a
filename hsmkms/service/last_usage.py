"""GetKeyLastUsage: the last successful cryptographic operation with a key.

Where it comes from: the audit trail, which already records every call with its key ARNs, its
``eventID`` (AWS's ``CloudTrailEventId``) and ``requestID`` (``KmsRequestId``), and whether it
failed. The alternative, a last-use column per key, would add a database write to every
Encrypt, Sign and GenerateMac — and every such write empties every worker's read cache — for an
operation that is rarely called. Reading the trail costs nothing on the hot path; the cost is on
GetKeyLastUsage itself: the trail is read newest first until a successful use of the key is
found (every row for a key never used). Like AWS's answer, it is eventually consistent: a
server appends its records in batches (at most ``flush_interval``, 100 ms, behind).

The service sees the trail only through :class:`KeyUsageHistory`; the composition root
(:mod:`hsmkms.system`) adapts the trail to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection
from typing import Final, Protocol

from hsmkms.errors import UnsupportedOperationException
from hsmkms.models import GetKeyLastUsageRequest, GetKeyLastUsageResponse, KeyLastUsageData
from hsmkms.models.enums import KeyLastUsageOperation
from hsmkms.service.core import Call, ServiceCore, operation

__all__ = ["LAST_USAGE_OPERATIONS", "KeyUsageHistory", "KeyUse", "LastUsageOperations"]

LAST_USAGE_OPERATIONS: Final = frozenset(o.value for o in KeyLastUsageOperation)
"""The cryptographic operations GetKeyLastUsage reports (the botocore model's enum)."""


@dataclasses.dataclass(frozen=True)
class KeyUse:
    """One successful cryptographic operation with a key."""

    operation: str
    time: dt.datetime
    event_id: str | None
    request_id: str | None


class KeyUsageHistory(Protocol):
    """Where the service learns how keys were used (the audit trail)."""

    def tracking_start(self) -> dt.datetime | None:
        """Since when uses are recorded; None when nothing is recorded yet."""
        ...

    def last_use(self, key_id: str, operations: Collection[str]) -> KeyUse | None:
        """The newest successful call among ``operations`` that used the key."""
        ...


class LastUsageOperations(ServiceCore):
    """GetKeyLastUsage of :class:`~hsmkms.service.KmsService`."""

    @operation("GetKeyLastUsage")
    def get_key_last_usage(self, call: Call[GetKeyLastUsageRequest]) -> GetKeyLastUsageResponse:
        """The key's last successful cryptographic operation, from the audit trail, with the
        date tracking began (the trail's first record, or the key's creation if later)."""
        key = call.key
        history = self._usage_history
        if history is None:
            raise UnsupportedOperationException(
                "Key usage is read from the audit trail, which this hsmkms process does not open."
            )
        started = history.tracking_start() or self._clock()
        use = history.last_use(key.key_id, LAST_USAGE_OPERATIONS)
        # spec: "If the KeyLastUsage response element is empty ..." — present and empty.
        last = KeyLastUsageData()
        if use is not None:
            last = KeyLastUsageData(
                Operation=KeyLastUsageOperation(use.operation),
                Timestamp=use.time,
                CloudTrailEventId=use.event_id,
                KmsRequestId=use.request_id,
            )
        return GetKeyLastUsageResponse(
            KeyId=key.arn,
            KeyLastUsage=last,
            TrackingStartDate=max(started, key.created_at),
            KeyCreationDate=key.created_at,
        )
