"""Who may use, administer and view a key: every known principal asked of the policy engine.

For one key, each known principal (the account root, every credential, every principal a key
policy statement names, every grantee) is evaluated by :func:`hsmkms.policy.evaluate_key_access`
— the decision the service makes on a request — for every action of the key's operations, then
grants are consulted as the service consults them (only when the policies do not allow and
nothing denies). Nothing here parses a policy by hand.

The action groups come from the operation descriptors (:mod:`hsmkms.service.operations`), for
the operations the key can take part in:

- ``use``: operations that use the key material (key state ``Enabled`` needed, read-only in
  CloudTrail's sense): Encrypt, Decrypt, GenerateDataKey*, Sign, GenerateMac, ...;
- ``administer``: operations that change the key, its policy, grants, aliases, tags or state;
- ``view``: operations that read its metadata (DescribeKey, GetKeyPolicy, ListGrants, ...).

A decision that depends on the request (an encryption context, the source address, the time:
a statement with a ``Condition``) is reported as *conditional*: the key's own condition keys
(spec, usage, tags, aliases) are in the context; the request's are unknown, so the decision is
also taken with every conditional statement applying and with none applying, and when the
three differ the action is marked conditional. A grant with constraints is conditional for the
operations its constraints restrict.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from hsmkms.policy import (
    AccessRequest,
    Decision,
    Outcome,
    PolicyDocument,
    PolicySource,
    account_of,
    evaluate_key_access,
    grant_allows,
    parse_identity_policy,
    request_context,
    root_arn,
)
from hsmkms.service.authorize import constraints_from_text, identity_policy, key_policy
from hsmkms.service.operations import (
    ALL_OPERATIONS,
    Operation,
    Resource,
    bound_to_encryption_context,
)
from hsmkms.service.states import Access
from hsmkms.store import GrantRecord

__all__ = [
    "ActionGroup",
    "GroupAccess",
    "KeyAccess",
    "Principal",
    "PrincipalAccess",
    "group_actions",
    "summarize_access",
]

# Decided by the grant itself, never by a policy (docs/key-policies.md, "Grants").
_NOT_POLICY_DECIDED: Final = frozenset({"RetireGrant"})
# A policy that allows everything, for the hypothetical principals below.
_ALLOW_ALL: Final = parse_identity_policy(
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"}]}'
)
_OTHER_ACCOUNT: Final = "000000000000"


class ActionGroup(enum.StrEnum):
    """The groups of key actions the report summarizes access by."""

    USE = "use"
    ADMINISTER = "administer"
    VIEW = "view"


def _group_of(op: Operation) -> ActionGroup:
    if op.access is Access.USE and op.read_only:
        return ActionGroup.USE
    return ActionGroup.VIEW if op.read_only else ActionGroup.ADMINISTER


def group_actions(key_spec: str, key_usage: str) -> dict[ActionGroup, tuple[str, ...]]:
    """The IAM actions (``kms:Decrypt``) of each group for a key of this spec and usage: the
    implemented key operations the key can take part in, from their descriptors."""
    groups: dict[ActionGroup, list[str]] = {group: [] for group in ActionGroup}
    for op in ALL_OPERATIONS.values():
        if (
            op.resource is not Resource.KEY
            or not op.implemented
            or op.name in _NOT_POLICY_DECIDED
            or not op.accepts(key_spec, key_usage)
        ):
            continue
        groups[_group_of(op)].extend(op.actions)
    return {group: tuple(sorted(set(actions))) for group, actions in groups.items()}


@dataclasses.dataclass(frozen=True)
class Principal:
    """Someone a decision is asked for: an ARN, its identity policy (None: it has none) and
    where the report learnt of it (``root``, ``credential``, ``key-policy``, ``grantee``)."""

    arn: str
    identity_policy: str | None = None
    sources: tuple[str, ...] = ()
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class PrincipalAccess:
    """What one principal may do within one group."""

    arn: str
    actions: tuple[str, ...]
    """The group's actions allowed (each by a policy or a grant)."""
    via: tuple[str, ...]
    """How: ``key policy (<Sid>)``, ``identity policy``, ``grant <id>``."""
    conditional: tuple[str, ...] = ()
    """Those of ``actions`` whose decision depends on the request (conditions, constraints)."""
    all_actions: bool = False


@dataclasses.dataclass(frozen=True)
class GroupAccess:
    """Access to one group of actions."""

    group: ActionGroup
    actions: tuple[str, ...]
    principals: tuple[PrincipalAccess, ...]
    identity_policies_may_grant: bool
    """Whether an identity policy can give a principal of the key's account these actions (the
    key policy delegates to the account) — principals not known to this hsmkms included."""
    other_accounts: bool
    """Whether a principal of another account can be allowed (with its own identity policy)."""


@dataclasses.dataclass(frozen=True)
class KeyAccess:
    """The access summary of one key."""

    groups: tuple[GroupAccess, ...]
    findings: tuple[str, ...] = ()


def _strip(document: PolicyDocument, *, keep_conditional: bool) -> PolicyDocument:
    """The document with conditions removed (every statement applies unconditionally), or
    with its conditional statements removed (none of them applies)."""
    statements = tuple(
        dataclasses.replace(s, conditions=())
        for s in document.statements
        if keep_conditional or not s.conditions
    )
    return dataclasses.replace(document, statements=statements)


def _has_conditions(document: PolicyDocument | None) -> bool:
    return document is not None and any(s.conditions for s in document.statements)


def _via(decision: Decision) -> str:
    if decision.source is PolicySource.IDENTITY:
        return "identity policy"
    label = decision.statement_label
    return f"key policy ({label})" if label else "key policy"


class _Evaluator:
    def __init__(
        self,
        *,
        key_arn: str,
        policy: PolicyDocument,
        key_spec: str,
        key_usage: str,
        tags: Mapping[str, str],
        aliases: Sequence[str],
    ) -> None:
        self.key_arn = key_arn
        self.policy = policy
        self.key_spec = key_spec
        self.key_usage = key_usage
        self.tags = tags
        self.aliases = aliases
        self._variants = (
            (_strip(policy, keep_conditional=True), _strip(policy, keep_conditional=False))
            if _has_conditions(policy)
            else None
        )

    def decide(
        self, principal: str, identity: PolicyDocument | None, action: str
    ) -> tuple[Decision, bool]:
        """The decision with the key's own context, and whether it depends on the request."""
        account = account_of(principal)
        context = request_context(
            principal_arn=principal,
            caller_account=account,
            key_spec=self.key_spec,
            key_usage=self.key_usage,
            resource_tags=self.tags,
            resource_aliases=self.aliases,
        )
        request = AccessRequest(principal, account, action, self.key_arn, context)
        decision = evaluate_key_access(self.policy, identity, request)
        if self._variants is None and not _has_conditions(identity):
            return decision, False
        outcomes = {decision.outcome}
        policies = self._variants or (self.policy, self.policy)
        identities: tuple[PolicyDocument | None, PolicyDocument | None] = (identity, identity)
        if identity is not None and _has_conditions(identity):
            identities = (
                _strip(identity, keep_conditional=True),
                _strip(identity, keep_conditional=False),
            )
        for policy, ident in zip(policies, identities, strict=True):
            outcomes.add(evaluate_key_access(policy, ident, request).outcome)
        return decision, len(outcomes) > 1


def summarize_access(
    *,
    key_arn: str,
    key_spec: str,
    key_usage: str,
    policy_text: str,
    principals: Iterable[Principal],
    grants: Sequence[GrantRecord],
    tags: Mapping[str, str] | None = None,
    aliases: Sequence[str] = (),
) -> KeyAccess:
    """Who may do what with one key (see the module docstring)."""
    policy = key_policy(policy_text)
    evaluator = _Evaluator(
        key_arn=key_arn,
        policy=policy,
        key_spec=key_spec,
        key_usage=key_usage,
        tags=tags or {},
        aliases=aliases,
    )
    by_grantee: dict[str, list[GrantRecord]] = {}
    for grant in grants:
        by_grantee.setdefault(grant.grantee_principal, []).append(grant)
    known = list(principals)
    key_account = account_of(key_arn)
    groups: list[GroupAccess] = []
    findings: list[str] = []
    for group, actions in group_actions(key_spec, key_usage).items():
        if not actions:
            continue
        entries: list[PrincipalAccess] = []
        for principal in known:
            identity = (
                identity_policy(principal.identity_policy) if principal.identity_policy else None
            )
            allowed: list[str] = []
            via: dict[str, None] = {}
            conditional: list[str] = []
            for action in actions:
                decision, depends = evaluator.decide(principal.arn, identity, action)
                if decision.allowed:
                    allowed.append(action)
                    via[_via(decision)] = None
                    if depends:
                        conditional.append(action)
                    continue
                if depends:
                    # Denied with the key's own context, but some request could be allowed.
                    allowed.append(action)
                    via[_via(decision) if decision.source else "key policy"] = None
                    conditional.append(action)
                    continue
                if decision.outcome is Outcome.EXPLICIT_DENY:
                    continue
                for grant in by_grantee.get(principal.arn, ()):
                    constraints = constraints_from_text(grant.constraints)
                    bound = bound_to_encryption_context(action)
                    if grant_allows(grant.operations, None, action, None, bound_to_context=bound):
                        allowed.append(action)
                        via[f"grant {grant.grant_id[:12]}"] = None
                        if bound and constraints is not None and not constraints.empty:
                            conditional.append(action)
                        break
            if allowed:
                entries.append(
                    PrincipalAccess(
                        principal.arn,
                        tuple(allowed),
                        tuple(via),
                        tuple(conditional),
                        all_actions=len(allowed) == len(actions),
                    )
                )
        delegated = any(
            evaluator.decide(f"arn:aws:iam::{key_account}:user/*any-principal*", _ALLOW_ALL, a)[
                0
            ].allowed
            for a in actions
        )
        other = any(
            evaluator.decide(f"arn:aws:iam::{_OTHER_ACCOUNT}:user/*any-principal*", _ALLOW_ALL, a)[
                0
            ].allowed
            for a in actions
        ) or any(account_of(p.arn) != key_account for p in entries)
        if other:
            findings.append(
                f"the key policy lets principals of other accounts {group.value} the key"
            )
        groups.append(GroupAccess(group, actions, tuple(entries), delegated, other))
    use = next((g for g in groups if g.group is ActionGroup.USE), None)
    admin = next((g for g in groups if g.group is ActionGroup.ADMINISTER), None)
    if use is not None and admin is not None:
        both = sorted(
            {p.arn for p in use.principals}
            & {p.arn for p in admin.principals} - {root_arn(key_account)}
        )
        for arn in both:
            findings.append(f"{arn} may both use and administer the key (no separation of duties)")
    return KeyAccess(tuple(groups), tuple(findings))
