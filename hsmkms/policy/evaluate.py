"""Deciding a request against key policies and identity policies.

The model (reference §4.2, documented in docs/key-policies.md):

1. ``evaluate(policy, request)`` decides one document. A statement applies when its
   principal, action, resource and conditions all match. Any applicable Deny → EXPLICIT_DENY;
   else any applicable Allow → ALLOW; else IMPLICIT_DENY.
2. In a key policy an Allow naming the **account** (``arn:aws:iam::<acct>:root`` or the bare
   id) allows the root principal itself, and for any other principal of that account only
   *delegates*: the decision carries ``delegated=True`` and the caller's identity policy must
   allow. A Deny naming the account applies to every principal of the account.
3. ``evaluate_key_access`` combines the two: an explicit Deny in either wins; then a direct
   key-policy Allow; then delegation (the account root is always allowed; others need an
   identity-policy Allow); else implicit deny. A caller from another account than the key's
   needs both the key policy and its own identity policy to allow.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from hsmkms.errors import MalformedPolicyDocumentException
from hsmkms.policy.conditions import conditions_hold
from hsmkms.policy.context import ConditionContext, ContextInput, request_context
from hsmkms.policy.document import (
    Effect,
    PolicyDocument,
    PolicyKind,
    Principals,
    Statement,
    account_of,
    parse_policy,
    root_arn,
)
from hsmkms.policy.wildcard import wildcard_match


class Outcome(enum.Enum):
    """The three answers of policy evaluation."""

    ALLOW = "ALLOW"
    EXPLICIT_DENY = "EXPLICIT_DENY"
    IMPLICIT_DENY = "IMPLICIT_DENY"


class PolicySource(enum.Enum):
    """Which kind of policy a decision rests on (for AccessDenied messages and audit)."""

    RESOURCE = "resource-based"
    IDENTITY = "identity-based"


@dataclass(frozen=True)
class AccessRequest:
    """One authorization question: may ``principal_arn`` do ``action`` on ``resource``?

    ``action`` is the IAM action name (``kms:Decrypt``; ReEncrypt is ``kms:ReEncryptFrom`` on
    the source key and ``kms:ReEncryptTo`` on the destination); ``resource`` is the key ARN
    (``"*"`` for account-level actions). ``principal_account`` must be the account in
    ``principal_arn``. ``context`` is the condition context (see ``request_context``); any
    mapping is accepted and turned into a case-insensitive ConditionContext.
    """

    principal_arn: str
    principal_account: str
    action: str
    resource: str
    context: Mapping[str, ContextInput] = field(default_factory=ConditionContext)

    def __post_init__(self) -> None:
        if account_of(self.principal_arn) != self.principal_account:
            # A mismatch would let an Allow naming one account delegate for another's user.
            raise ValueError(
                f"principal_account {self.principal_account!r} is not the account of "
                f"{self.principal_arn!r}"
            )
        if not isinstance(self.context, ConditionContext):
            object.__setattr__(self, "context", ConditionContext(self.context))

    @property
    def is_account_root(self) -> bool:
        """True when the principal is its account's root user."""
        return self.principal_arn == root_arn(self.principal_account)


@dataclass(frozen=True)
class Decision:
    """The answer, the statement it rests on (its Sid and 0-based index) and its source."""

    outcome: Outcome
    source: PolicySource = PolicySource.RESOURCE
    sid: str | None = None
    statement_index: int | None = None
    delegated: bool = False
    """Key policy only: no direct Allow, but an Allow to the principal's account applied."""

    @property
    def allowed(self) -> bool:
        """True only for ALLOW."""
        return self.outcome is Outcome.ALLOW

    @property
    def statement_label(self) -> str | None:
        """The Sid, else ``Statement[<index>]``; None when no statement decided."""
        if self.sid is not None:
            return self.sid
        return None if self.statement_index is None else f"Statement[{self.statement_index}]"


def _principal_match(principals: Principals, request: AccessRequest) -> tuple[bool, bool]:
    """(names the principal directly, names the principal's account)."""
    return principals.names(request.principal_arn), principals.names_account(
        request.principal_account
    )


def _not_principal_applies(principals: Principals, request: AccessRequest) -> bool:
    # spec: IAM NotPrincipal — a principal escapes the Deny only when it is listed and, unless it
    # is the account root itself, its account is listed too ("you must also specify the account
    # ARN of the not-denied principal").
    if principals.everyone:
        return False
    listed = principals.names(request.principal_arn)
    account_listed = principals.names_account(request.principal_account)
    if request.is_account_root:
        return not account_listed
    return not (listed and account_listed)


@functools.lru_cache(maxsize=16384)
def _match(pattern: str, value: str, ignore_case: bool) -> bool:
    # Cached: the same few actions and key ARNs meet the same statements on every request.
    return pattern == "*" or wildcard_match(pattern, value, ignore_case=ignore_case)


def _matches_any(patterns: tuple[str, ...], value: str, *, ignore_case: bool) -> bool:
    return any(_match(pattern, value, ignore_case) for pattern in patterns)


def action_matches(statement: Statement, action: str) -> bool:
    """True when the statement's Action/NotAction covers ``action`` (case-insensitive)."""
    if statement.actions is not None:
        return _matches_any(statement.actions, action, ignore_case=True)
    if statement.not_actions is not None:
        return not _matches_any(statement.not_actions, action, ignore_case=True)
    return False  # spec: a statement without Action has no effect (reference §4.1)


def resource_matches(statement: Statement, resource: str) -> bool:
    """True when the statement's Resource/NotResource covers ``resource`` (case-sensitive;
    ``*`` in a key policy means this key)."""
    if statement.resources is not None:
        return _matches_any(statement.resources, resource, ignore_case=False)
    if statement.not_resources is not None:
        return not _matches_any(statement.not_resources, resource, ignore_case=False)
    return False  # spec: a statement without Resource has no effect (reference §4.1)


def _applies_otherwise(statement: Statement, request: AccessRequest) -> bool:
    assert isinstance(request.context, ConditionContext)
    return (
        action_matches(statement, request.action)
        and resource_matches(statement, request.resource)
        and conditions_hold(statement.conditions, request.context)
    )


def evaluate(policy: PolicyDocument, request: AccessRequest) -> Decision:
    """Decide ``request`` against one policy: explicit Deny wins, then any Allow, else
    implicit deny. For a key policy an Allow that names only the caller's account yields
    IMPLICIT_DENY with ``delegated=True`` (see ``evaluate_key_access``)."""
    source = PolicySource.IDENTITY if policy.kind is PolicyKind.IDENTITY else PolicySource.RESOURCE
    allow: Statement | None = None
    delegation: Statement | None = None
    for statement in policy.statements:
        direct = account = False
        if policy.kind is PolicyKind.IDENTITY:
            direct = True
        elif statement.principal is not None:
            direct, account = _principal_match(statement.principal, request)
        elif statement.not_principal is not None:
            direct = _not_principal_applies(statement.not_principal, request)
        if not (direct or account) or not _applies_otherwise(statement, request):
            continue
        if statement.effect is Effect.DENY:
            return Decision(Outcome.EXPLICIT_DENY, source, statement.sid, statement.index)
        if direct and allow is None:
            allow = statement
        elif not direct and delegation is None:
            delegation = statement
    if allow is not None:
        return Decision(Outcome.ALLOW, source, allow.sid, allow.index)
    if delegation is not None:
        return Decision(
            Outcome.IMPLICIT_DENY, source, delegation.sid, delegation.index, delegated=True
        )
    return Decision(Outcome.IMPLICIT_DENY, source)


def evaluate_key_access(
    key_policy: PolicyDocument,
    identity_policy: PolicyDocument | None,
    request: AccessRequest,
) -> Decision:
    """Decide a request on a KMS key from its key policy and the caller's identity policy.

    Security contract: the result is ALLOW only if no applicable statement in either policy
    denies, and the key policy allows the caller directly or allows the caller's account —
    in which case the caller's identity policy must allow too, unless the caller is that
    account's root. A caller outside the key's account always needs both policies to allow.
    ``identity_policy=None`` means the caller has none: it allows nothing.
    """
    if key_policy.kind is not PolicyKind.KEY:
        raise ValueError("key_policy must be a key policy (parse_policy)")
    if identity_policy is not None and identity_policy.kind is not PolicyKind.IDENTITY:
        raise ValueError("identity_policy must be an identity policy (parse_identity_policy)")
    on_key = evaluate(key_policy, request)
    on_identity = (
        evaluate(identity_policy, request)
        if identity_policy is not None
        else Decision(Outcome.IMPLICIT_DENY, PolicySource.IDENTITY)
    )
    if on_key.outcome is Outcome.EXPLICIT_DENY:
        return on_key
    if on_identity.outcome is Outcome.EXPLICIT_DENY:
        return on_identity
    if on_key.outcome is not Outcome.ALLOW and not on_key.delegated:
        return Decision(Outcome.IMPLICIT_DENY, PolicySource.RESOURCE)
    # spec: the account root holds every IAM permission of its own account, so its identity
    # "policy" always allows; every other principal needs its identity policy to allow when
    # the key policy only delegates, and cross-account callers always need it (§4.2).
    cross_account = account_of(request.resource) not in ("", request.principal_account)
    needs_identity = on_key.delegated or cross_account
    if not needs_identity or request.is_account_root:
        return Decision(Outcome.ALLOW, on_key.source, on_key.sid, on_key.statement_index)
    if on_identity.outcome is Outcome.ALLOW:
        return on_identity
    return Decision(Outcome.IMPLICIT_DENY, PolicySource.IDENTITY)


def evaluate_identity_access(
    identity_policy: PolicyDocument | None, request: AccessRequest
) -> Decision:
    """Decide an account-level action (CreateKey, ListKeys, ListAliases, GenerateRandom, …),
    which no key policy governs: the account root may do anything not explicitly denied;
    everyone else needs an identity-policy Allow. Pass ``resource="*"`` for these actions."""
    if identity_policy is None:
        decision = Decision(Outcome.IMPLICIT_DENY, PolicySource.IDENTITY)
    elif identity_policy.kind is not PolicyKind.IDENTITY:
        raise ValueError("identity_policy must be an identity policy (parse_identity_policy)")
    else:
        decision = evaluate(identity_policy, request)
    if decision.outcome is Outcome.IMPLICIT_DENY and request.is_account_root:
        return Decision(Outcome.ALLOW, PolicySource.IDENTITY)
    return decision


def access_denied_message(
    principal_arn: str, action: str, resource_arn: str, decision: Decision
) -> str:
    """The AccessDeniedException message AWS sends for a denied decision (reference §2.2)."""
    head = (
        f"User: {principal_arn} is not authorized to perform: {action} on resource: {resource_arn}"
    )
    if decision.outcome is Outcome.EXPLICIT_DENY:
        article = "an" if decision.source is PolicySource.IDENTITY else "a"
        return f"{head} with an explicit deny in {article} {decision.source.value} policy"
    return f"{head} because no {decision.source.value} policy allows the {action} action"


LOCKOUT_MESSAGE = "The new key policy will not allow you to update the key policy in the future."


def lockout_check(
    policy: PolicyDocument | str,
    caller_arn: str,
    caller_identity_policy: PolicyDocument | None,
    *,
    key_arn: str = "*",
    context: Mapping[str, ContextInput] | None = None,
) -> None:
    """Raise MalformedPolicyDocumentException unless ``policy`` would let ``caller_arn`` call
    kms:PutKeyPolicy on the key later (the check BypassPolicyLockoutSafetyCheck skips).

    Pass ``key_arn`` when the policy may name the key by ARN in Resource; without it only
    ``Resource: "*"`` statements count. ``context`` is the condition context to assume
    (default: the caller's principal ARN and account only).
    """
    document = parse_policy(policy) if isinstance(policy, str) else policy
    account = account_of(caller_arn)
    if context is None:
        context = request_context(principal_arn=caller_arn, caller_account=account)
    request = AccessRequest(
        principal_arn=caller_arn,
        principal_account=account,
        action="kms:PutKeyPolicy",
        resource=key_arn,
        context=context,
    )
    if not evaluate_key_access(document, caller_identity_policy, request).allowed:
        raise MalformedPolicyDocumentException(LOCKOUT_MESSAGE)
