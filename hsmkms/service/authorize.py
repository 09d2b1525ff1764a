"""Authorization of one request (reference §4.2): the caller's identity policy, the key's
policy and the key's grants, decided by the pure engine in :mod:`hsmkms.policy`.

The order is AWS's: an explicit Deny in any policy wins; then an Allow from the key policy
(directly, or by delegation to the caller's identity policy); then a grant to the caller that
covers the operation (grants only add permissions); else an implicit deny. Account-level
actions (CreateKey, ListKeys, ListAliases, GenerateRandom, ListRetirableGrants) are decided by
the identity policy alone. ``caller=None`` is the local operator and is never asked.

The condition context of an operation on a key carries the key's tags
(``aws:ResourceTag/<k>``) and alias names (``kms:ResourceAliases``), read from the store only
when a condition names them: the tags as they are before the request (TagResource and
UntagResource are decided on the old tags). They come through the store's read cache, which
every commit clears, so a tag or alias change decides the next request.

Parsed policies and grant constraints are cached by their text: a key's policy is parsed once
per process, not once per request.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence

from hsmkms.errors import AccessDeniedException
from hsmkms.policy import (
    AccessRequest,
    ConditionContext,
    ContextInput,
    Decision,
    GrantConstraints,
    Outcome,
    PolicyDocument,
    access_denied_message,
    deferred_request_context,
    evaluate_identity_access,
    evaluate_key_access,
    grant_allows,
    lockout_check,
    parse_identity_policy,
    parse_policy,
)
from hsmkms.service.operations import bound_to_encryption_context
from hsmkms.store import GrantRecord, KeyRecord
from hsmkms.types import Caller, Clock

__all__ = [
    "Authorizer",
    "GrantCheck",
    "caller_identity_policy",
    "constraints_from_text",
    "constraints_to_text",
    "identity_policy",
    "key_policy",
]


@functools.lru_cache(maxsize=4096)
def key_policy(text: str) -> PolicyDocument:
    """The parsed key policy of a stored policy text (validated when it was stored)."""
    return parse_policy(text)


@functools.lru_cache(maxsize=4096)
def identity_policy(text: str) -> PolicyDocument:
    """The parsed identity policy of a credential."""
    return parse_identity_policy(text)


def caller_identity_policy(caller: Caller) -> PolicyDocument | None:
    """The caller's parsed identity policy; None when it has none (it allows nothing)."""
    return identity_policy(caller.identity_policy) if caller.identity_policy else None


@functools.lru_cache(maxsize=4096)
def _unconditional(text: str, kind: str) -> bool:
    """Whether no statement of a policy has a Condition (its decisions depend on who, what
    and which key only, so they can be cached)."""
    document = key_policy(text) if kind == "key" else identity_policy(text)
    return all(not statement.conditions for statement in document.statements)


@functools.lru_cache(maxsize=65536)
def _static_decision(
    policy: str, identity: str | None, principal: str, account: str, action: str, resource: str
) -> Decision:
    request = AccessRequest(principal, account, action, resource, ConditionContext())
    identity_doc = identity_policy(identity) if identity is not None else None
    return evaluate_key_access(key_policy(policy), identity_doc, request)


@functools.lru_cache(maxsize=4096)
def constraints_from_text(text: str | None) -> GrantConstraints | None:
    """The constraints of a stored grant (canonical JSON, see :func:`constraints_to_text`)."""
    if text is None:
        return None
    raw = json.loads(text)
    return GrantConstraints(
        encryption_context_equals=raw.get("EncryptionContextEquals"),
        encryption_context_subset=raw.get("EncryptionContextSubset"),
    )


def constraints_to_text(
    equals: Mapping[str, str] | None, subset: Mapping[str, str] | None
) -> str | None:
    """Canonical JSON of grant constraints (sorted keys), or None when there are none."""
    raw: dict[str, Mapping[str, str]] = {}
    if equals is not None:
        raw["EncryptionContextEquals"] = dict(equals)
    if subset is not None:
        raw["EncryptionContextSubset"] = dict(subset)
    if not raw:
        return None
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


GrantCheck = Callable[[GrantRecord], bool]
"""Decides whether one grant allows the request, instead of the default operation and
encryption-context test (CreateGrant: the grant carries CreateGrant and the child grant is no
broader)."""


class Authorizer:
    """Decides requests for one account. ``grants_for(key_id, principal)`` is the store's query
    (asked only when the policies alone do not allow); ``tags_of(key_id)`` and
    ``aliases_of(key_id)`` give a key's tags and alias names (asked only when a condition reads
    ``aws:ResourceTag/<k>`` or ``kms:ResourceAliases``; without them those keys are absent)."""

    def __init__(
        self,
        grants_for: Callable[[str, str], list[GrantRecord]],
        *,
        clock: Clock,
        tags_of: Callable[[str], Mapping[str, str]] | None = None,
        aliases_of: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        self._grants_for = grants_for
        self._clock = clock
        self._tags_of = tags_of
        self._aliases_of = aliases_of

    def _request(
        self,
        caller: Caller,
        action: str,
        key: KeyRecord | None,
        *,
        encryption_context: Mapping[str, str] | None,
        encryption_algorithm: str | None,
        request_alias: str | None,
        extra: Mapping[str, ContextInput] | None,
    ) -> AccessRequest:
        tags: Callable[[], Mapping[str, str]] | None = None
        aliases: Callable[[], Sequence[str]] | None = None
        if key is not None:
            # spec: §4.3 — resource conditions exist only for operations on an existing key;
            # kms:KeyOrigin is the key's Origin there (CreateKey passes the requested one).
            extra = {"kms:KeyOrigin": key.origin, **(extra or {})}
            if self._tags_of is not None:
                tags = functools.partial(self._tags_of, key.key_id)
            if self._aliases_of is not None:
                aliases = functools.partial(self._aliases_of, key.key_id)
        context = deferred_request_context(
            resource_tags=tags,
            resource_aliases=aliases,
            principal_arn=caller.principal_arn,
            caller_account=caller.account_id,
            encryption_context=encryption_context,
            encryption_algorithm=encryption_algorithm,
            request_alias=request_alias,
            key_spec=key.key_spec if key is not None else None,
            key_usage=key.key_usage if key is not None else None,
            secure_transport=caller.secure_transport,
            source_ip=caller.source_ip,
            current_time=self._clock(),
            extra=extra,
        )
        return AccessRequest(
            principal_arn=caller.principal_arn,
            principal_account=caller.account_id,
            action=action,
            resource=key.arn if key is not None else "*",
            context=context,
        )

    def key_decision(
        self,
        caller: Caller,
        action: str,
        key: KeyRecord,
        *,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
        request_alias: str | None = None,
        extra: Mapping[str, ContextInput] | None = None,
    ) -> Decision:
        """The policies' decision (grants not consulted)."""
        identity_text = caller.identity_policy
        if _unconditional(key.policy, "key") and (
            identity_text is None or _unconditional(identity_text, "identity")
        ):
            return _static_decision(
                key.policy, identity_text, caller.principal_arn, caller.account_id, action, key.arn
            )
        request = self._request(
            caller,
            action,
            key,
            encryption_context=encryption_context,
            encryption_algorithm=encryption_algorithm,
            request_alias=request_alias,
            extra=extra,
        )
        identity = caller_identity_policy(caller)
        return evaluate_key_access(key_policy(key.policy), identity, request)

    def check_key(
        self,
        caller: Caller | None,
        action: str,
        key: KeyRecord,
        *,
        encryption_context: Mapping[str, str] | None = None,
        encryption_algorithm: str | None = None,
        request_alias: str | None = None,
        extra: Mapping[str, ContextInput] | None = None,
        grant_check: GrantCheck | None = None,
    ) -> None:
        """Raise AccessDeniedException unless ``caller`` may do ``action`` (``kms:Decrypt``)
        on ``key``.

        Security contract: allowed only when no applicable statement denies and either the
        key policy allows (directly or through the caller's identity policy) or a grant to the
        caller on this key covers the operation, its constraints and ``grant_check``.
        """
        if caller is None:
            return
        decision = self.key_decision(
            caller,
            action,
            key,
            encryption_context=encryption_context,
            encryption_algorithm=encryption_algorithm,
            request_alias=request_alias,
            extra=extra,
        )
        if decision.allowed:
            return
        if decision.outcome is Outcome.IMPLICIT_DENY and self._granted(
            self._grants_for(key.key_id, caller.principal_arn),
            action,
            encryption_context,
            grant_check,
        ):
            return
        raise AccessDeniedException(
            access_denied_message(caller.principal_arn, action, key.arn, decision)
        )

    @staticmethod
    def _granted(
        grants: Iterable[GrantRecord],
        action: str,
        encryption_context: Mapping[str, str] | None,
        grant_check: GrantCheck | None,
    ) -> bool:
        bound = bound_to_encryption_context(action)
        for grant in grants:
            if grant_check is not None:
                if grant_check(grant):
                    return True
            elif grant_allows(
                grant.operations,
                constraints_from_text(grant.constraints),
                action,
                encryption_context,
                bound_to_context=bound,
            ):
                return True
        return False

    def check_lockout(
        self,
        caller: Caller | None,
        document: PolicyDocument,
        key_arn: str,
        key: KeyRecord | None = None,
    ) -> None:
        """spec: §4.1 — MalformedPolicyDocumentException unless the new key policy
        ``document`` lets the caller call PutKeyPolicy on the key later (the check
        BypassPolicyLockoutSafetyCheck skips). The condition context is the caller's own, and
        the key's (its spec, usage, tags and aliases) when ``key`` exists already
        (PutKeyPolicy; CreateKey has none yet)."""
        if caller is None:
            return
        request = self._request(
            caller,
            "kms:PutKeyPolicy",
            key,
            encryption_context=None,
            encryption_algorithm=None,
            request_alias=None,
            extra=None,
        )
        lockout_check(
            document,
            caller.principal_arn,
            caller_identity_policy(caller),
            key_arn=key_arn,
            context=request.context,
        )

    def check_account(
        self,
        caller: Caller | None,
        action: str,
        *,
        extra: Mapping[str, ContextInput] | None = None,
    ) -> None:
        """Raise AccessDeniedException unless the caller's identity policy allows an
        account-level action (the account root may do anything not explicitly denied)."""
        if caller is None:
            return
        request = self._request(
            caller,
            action,
            None,
            encryption_context=None,
            encryption_algorithm=None,
            request_alias=None,
            extra=extra,
        )
        identity = caller_identity_policy(caller)
        decision = evaluate_identity_access(identity, request)
        if not decision.allowed:
            raise AccessDeniedException(
                access_denied_message(caller.principal_arn, action, "*", decision)
            )
