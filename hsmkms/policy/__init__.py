"""Key policies, identity policies and grants: a pure authorization engine (no I/O).

``parse_policy`` / ``parse_identity_policy`` turn AWS policy JSON into frozen documents;
``evaluate_key_access`` decides a request the way AWS KMS does (explicit Deny wins, then a
direct key-policy Allow, then delegation to identity policies, else implicit deny);
``access_denied_message`` words the refusal as AWS does; ``grant_allows`` decides grants. The
model is described in docs/key-policies.md.
"""

from __future__ import annotations

from hsmkms.policy.conditions import BASE_OPERATORS, ConditionClause, SetQualifier
from hsmkms.policy.context import (
    RESOURCE_ALIASES_QUOTA,
    UNEVALUABLE,
    ConditionContext,
    ContextInput,
    ContextValue,
    deferred_request_context,
    request_context,
)
from hsmkms.policy.document import (
    MAX_POLICY_BYTES,
    Effect,
    PolicyDocument,
    PolicyKind,
    Principals,
    Statement,
    account_of,
    default_key_policy,
    parse_identity_policy,
    parse_policy,
    root_arn,
)
from hsmkms.policy.evaluate import (
    LOCKOUT_MESSAGE,
    AccessRequest,
    Decision,
    Outcome,
    PolicySource,
    access_denied_message,
    evaluate,
    evaluate_identity_access,
    evaluate_key_access,
    lockout_check,
)
from hsmkms.policy.grants import GrantConstraints, grant_allows

__all__ = [
    "BASE_OPERATORS",
    "LOCKOUT_MESSAGE",
    "MAX_POLICY_BYTES",
    "RESOURCE_ALIASES_QUOTA",
    "UNEVALUABLE",
    "AccessRequest",
    "ConditionClause",
    "ConditionContext",
    "ContextInput",
    "ContextValue",
    "Decision",
    "Effect",
    "GrantConstraints",
    "Outcome",
    "PolicyDocument",
    "PolicyKind",
    "PolicySource",
    "Principals",
    "SetQualifier",
    "Statement",
    "access_denied_message",
    "account_of",
    "default_key_policy",
    "deferred_request_context",
    "evaluate",
    "evaluate_identity_access",
    "evaluate_key_access",
    "grant_allows",
    "lockout_check",
    "parse_identity_policy",
    "parse_policy",
    "request_context",
    "root_arn",
]
