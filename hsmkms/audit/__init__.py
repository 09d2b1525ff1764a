"""The audit trail: CloudTrail-shaped records of every API call and service event, stored as a
hash chain sealed by a token HMAC (see ``docs/audit.md``).

Records are built with :func:`api_call_record` / :func:`service_event_record` (or, on the API's
hot path, encoded directly by :func:`prepare_api_call`) and appended to an :class:`AuditTrail` —
by a server through its :class:`AuditWriter`, which batches; ``hsmkms audit`` verifies, tails
and searches the trail.
"""

from __future__ import annotations

from hsmkms.audit.records import (
    AuditRecord,
    PreparedRecord,
    UserIdentity,
    api_call_record,
    canonical_json,
    operator_event_record,
    prepare_api_call,
    prepare_record,
    service_event_record,
    unauthenticated_summary_record,
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
from hsmkms.audit.writer import AuditWriter

__all__ = [
    "AuditRecord",
    "AuditSink",
    "AuditTrail",
    "AuditWriter",
    "PreparedRecord",
    "Seal",
    "SealGap",
    "SealReason",
    "UserIdentity",
    "VerifyResult",
    "VerifyStatus",
    "api_call_record",
    "canonical_json",
    "operator_event_record",
    "prepare_api_call",
    "prepare_record",
    "service_event_record",
    "unauthenticated_summary_record",
]
