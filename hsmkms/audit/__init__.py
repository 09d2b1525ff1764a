"""The audit trail: CloudTrail-shaped records of every API call and service event, stored as a
hash chain sealed by a token HMAC (see ``docs/audit.md``).

The service builds a record with :func:`api_call_record` / :func:`service_event_record` and
hands it to an :class:`AuditSink` (an :class:`AuditTrail`); ``hsmkms audit`` verifies, tails
and searches the trail.
"""

from __future__ import annotations

from hsmkms.audit.records import (
    AuditRecord,
    UserIdentity,
    api_call_record,
    canonical_json,
    service_event_record,
)
from hsmkms.audit.trail import (
    AuditSink,
    AuditTrail,
    Seal,
    SealGap,
    SealReason,
    VerifyResult,
    VerifyStatus,
)

__all__ = [
    "AuditRecord",
    "AuditSink",
    "AuditTrail",
    "Seal",
    "SealGap",
    "SealReason",
    "UserIdentity",
    "VerifyResult",
    "VerifyStatus",
    "api_call_record",
    "canonical_json",
    "service_event_record",
]
