"""Evaluating key and identity policies: actions, resources, principals, deny-overrides,
delegation to identity policies, AccessDenied wording, the lockout check, and properties."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkms.errors import MalformedPolicyDocumentException
from hsmkms.policy import (
    LOCKOUT_MESSAGE,
    RESOURCE_ALIASES_QUOTA,
    UNEVALUABLE,
    AccessRequest,
    ConditionContext,
    Decision,
    Outcome,
    PolicyDocument,
    PolicySource,
    access_denied_message,
    default_key_policy,
    deferred_request_context,
    evaluate,
    evaluate_identity_access,
    evaluate_key_access,
    lockout_check,
    parse_identity_policy,
    parse_policy,
    request_context,
)
from hsmkms.service.operations import ACCOUNT_ACTIONS, KEY_RESOURCE_ACTIONS

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
BOB = f"arn:aws:iam::{ACCOUNT}:user/bob"
ADMIN_ROLE = f"arn:aws:iam::{ACCOUNT}:role/KeyAdmin"
CAROL = f"arn:aws:iam::{OTHER_ACCOUNT}:user/carol"
OTHER_ROOT = f"arn:aws:iam::{OTHER_ACCOUNT}:root"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0987dcba-09fe-87dc-65ba-ab0987654321"

Stmt = dict[str, Any]


def stmt(
    effect: str = "Allow",
    principal: Any = None,
    action: Any = "kms:Decrypt",
    resource: Any = "*",
    **extra: Any,
) -> Stmt:
    body: Stmt = {"Effect": effect, "Action": action, "Resource": resource, **extra}
    if principal is not None:
        body["Principal"] = principal
    return {k: v for k, v in body.items() if v is not None}


def key_policy(*statements: Stmt) -> PolicyDocument:
    return parse_policy(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def identity_policy(*statements: Stmt) -> PolicyDocument:
    return parse_identity_policy(
        json.dumps({"Version": "2012-10-17", "Statement": list(statements)})
    )


def account_of(arn: str) -> str:
    return arn.split(":")[4]


def request(
    principal: str = ALICE,
    action: str = "kms:Decrypt",
    resource: str = KEY,
    context: dict[str, Any] | None = None,
) -> AccessRequest:
    return AccessRequest(principal, account_of(principal), action, resource, context or {})


def outcome(policy: PolicyDocument, req: AccessRequest) -> Outcome:
    return evaluate(policy, req).outcome


ALLOW, DENY, IMPLICIT = Outcome.ALLOW, Outcome.EXPLICIT_DENY, Outcome.IMPLICIT_DENY


# -- Action matching --------------------------------------------------------------------------

ACTION_CASES = [
    ("kms:*", "kms:Decrypt", True),
    ("*", "kms:Decrypt", True),
    ("kms:Decrypt", "kms:Decrypt", True),
    ("kms:Decrypt", "kms:decrypt", True),
    ("KMS:DECRYPT", "kms:Decrypt", True),
    ("kms:Decrypt", "kms:DecryptX", False),
    ("kms:Decrypt", "kms:Encrypt", False),
    ("kms:ReEncrypt*", "kms:ReEncryptFrom", True),
    ("kms:ReEncrypt*", "kms:ReEncryptTo", True),
    ("kms:ReEncrypt*", "kms:Encrypt", False),
    ("kms:GenerateDataKey*", "kms:GenerateDataKeyPairWithoutPlaintext", True),
    ("kms:GenerateDataKey*", "kms:GenerateDataKey", True),
    ("kms:GenerateDataKey?", "kms:GenerateDataKey", False),
    ("kms:Get?eyPolicy", "kms:GetKeyPolicy", True),
    ("kms:Describe*", "kms:DescribeKey", True),
    ("kms:*crypt", "kms:Decrypt", True),
    ("kms:*crypt", "kms:Encrypt", True),
    ("kms:*crypt", "kms:ReEncryptFrom", False),
    ("kms:Create*", "kms:CreateGrant", True),
    ("s3:*", "kms:Decrypt", False),
    ("k?s:Decrypt", "kms:Decrypt", True),
]


@pytest.mark.parametrize(("pattern", "action", "matches"), ACTION_CASES)
def test_action_wildcards(pattern: str, action: str, matches: bool) -> None:
    """Action patterns match case-insensitively with * and ? wildcards."""
    policy = key_policy(stmt(principal={"AWS": ALICE}, action=pattern))
    assert outcome(policy, request(action=action)) is (ALLOW if matches else IMPLICIT)


@pytest.mark.parametrize(("pattern", "action", "matches"), ACTION_CASES)
def test_not_action_is_the_complement(pattern: str, action: str, matches: bool) -> None:
    """NotAction applies to exactly the actions Action would not."""
    policy = key_policy(stmt(principal={"AWS": ALICE}, action=None, NotAction=pattern))
    assert outcome(policy, request(action=action)) is (IMPLICIT if matches else ALLOW)


def test_not_action_with_deny() -> None:
    """Deny + NotAction denies everything but the listed actions."""
    policy = key_policy(
        stmt(principal={"AWS": ALICE}, action="kms:*", Sid="all"),
        stmt("Deny", {"AWS": ALICE}, action=None, NotAction="kms:Describe*", Sid="only-describe"),
    )
    assert outcome(policy, request(action="kms:DescribeKey")) is ALLOW
    decision = evaluate(policy, request(action="kms:Decrypt"))
    assert (decision.outcome, decision.sid) == (DENY, "only-describe")


def test_action_list() -> None:
    """An Action list matches any of its entries."""
    policy = key_policy(stmt(principal={"AWS": ALICE}, action=["kms:Encrypt", "kms:Decrypt"]))
    assert outcome(policy, request(action="kms:Encrypt")) is ALLOW
    assert outcome(policy, request(action="kms:Decrypt")) is ALLOW
    assert outcome(policy, request(action="kms:Sign")) is IMPLICIT


# -- Resource matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "not_resource", "expected"),
    [
        ("*", None, ALLOW),
        (KEY, None, ALLOW),
        (OTHER_KEY, None, IMPLICIT),
        (f"arn:aws:kms:*:{ACCOUNT}:key/*", None, ALLOW),
        (f"arn:aws:kms:us-east-1:{OTHER_ACCOUNT}:key/*", None, IMPLICIT),
        ([OTHER_KEY, KEY], None, ALLOW),
        (KEY.upper().replace("ARN:AWS:KMS", "arn:aws:kms"), None, IMPLICIT),  # case-sensitive
        (None, OTHER_KEY, ALLOW),
        (None, KEY, IMPLICIT),
        (None, "*", IMPLICIT),
    ],
)
def test_resource_matching(resource: Any, not_resource: Any, expected: Outcome) -> None:
    """Resource "*" means this key; ARNs and wildcards match; NotResource is the complement."""
    policy = key_policy(stmt(principal={"AWS": ALICE}, resource=resource, NotResource=not_resource))
    assert outcome(policy, request()) is expected


def test_statements_without_action_or_resource_never_apply() -> None:
    """A statement missing Action or Resource parses but never allows or denies."""
    for policy in (
        key_policy(stmt(principal="*", action=None)),
        key_policy(stmt(principal="*", resource=None)),
    ):
        for action in ("kms:Decrypt", "kms:PutKeyPolicy"):
            assert outcome(policy, request(action=action)) is IMPLICIT
    deny_nothing = key_policy(
        stmt(principal="*", action="kms:*", Sid="a"),
        stmt("Deny", "*", action=None, Sid="b"),
        stmt("Deny", "*", resource=None, Sid="c"),
    )
    assert outcome(deny_nothing, request()) is ALLOW


# -- Principal matching -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "caller", "expected", "delegated"),
    [
        ("*", ALICE, ALLOW, False),
        ("*", CAROL, ALLOW, False),
        ({"AWS": "*"}, ALICE, ALLOW, False),
        ({"AWS": ALICE}, ALICE, ALLOW, False),
        ({"AWS": ALICE}, BOB, IMPLICIT, False),
        ({"AWS": [ALICE, BOB]}, BOB, ALLOW, False),
        ({"AWS": ADMIN_ROLE}, ADMIN_ROLE, ALLOW, False),
        ({"AWS": ACCOUNT}, ALICE, IMPLICIT, True),
        ({"AWS": ROOT}, ALICE, IMPLICIT, True),
        ({"AWS": ACCOUNT}, ROOT, ALLOW, False),
        ({"AWS": ROOT}, ROOT, ALLOW, False),
        ({"AWS": OTHER_ROOT}, ALICE, IMPLICIT, False),
        ({"AWS": OTHER_ACCOUNT}, CAROL, IMPLICIT, True),
        ({"Service": "ec2.amazonaws.com"}, ALICE, IMPLICIT, False),
        ({"AWS": ALICE}, f"arn:aws:iam::{ACCOUNT}:user/Alice", IMPLICIT, False),
    ],
)
def test_principal_forms(principal: Any, caller: str, expected: Outcome, delegated: bool) -> None:
    """Exact ARNs and * allow directly; an account (root ARN or id) only delegates."""
    decision = evaluate(key_policy(stmt(principal=principal)), request(caller))
    assert (decision.outcome, decision.delegated) == (expected, delegated)


def test_deny_to_the_account_covers_every_principal_in_it() -> None:
    """A Deny naming the account applies to all its principals, root included."""
    policy = key_policy(
        stmt(principal="*", action="kms:*", Sid="everyone"),
        stmt("Deny", {"AWS": ACCOUNT}, Sid="deny-account"),
    )
    for caller in (ALICE, BOB, ROOT):
        assert outcome(policy, request(caller)) is DENY
    assert outcome(policy, request(CAROL)) is ALLOW


@pytest.mark.parametrize(
    ("not_principal", "caller", "denied"),
    [
        ({"AWS": [ADMIN_ROLE, ACCOUNT]}, ALICE, True),
        ({"AWS": [ADMIN_ROLE, ACCOUNT]}, ADMIN_ROLE, False),
        ({"AWS": [ADMIN_ROLE, ACCOUNT]}, ROOT, False),
        ({"AWS": ADMIN_ROLE}, ADMIN_ROLE, True),  # its account must be listed too
        ({"AWS": ROOT}, ROOT, False),
        ({"AWS": ROOT}, ALICE, True),
        ({"AWS": "*"}, ALICE, False),
        ("*", ALICE, False),
        ({"Service": "ec2.amazonaws.com"}, ALICE, True),
    ],
)
def test_not_principal_deny(not_principal: Any, caller: str, denied: bool) -> None:
    """Deny + NotPrincipal denies everyone not listed (with their account)."""
    policy = key_policy(
        stmt(principal="*", action="kms:*", Sid="everyone"),
        stmt("Deny", None, action="kms:*", NotPrincipal=not_principal, Sid="fence"),
    )
    assert outcome(policy, request(caller)) is (DENY if denied else ALLOW)


# -- Deny overrides, statement order ----------------------------------------------------------


def test_explicit_deny_wins_over_allow_in_any_order() -> None:
    """Deny beats Allow whatever the statement order, and names the denying Sid."""
    allow = stmt(principal={"AWS": ALICE}, action="kms:*", Sid="allow-all")
    deny = stmt("Deny", {"AWS": ALICE}, action="kms:Decrypt", Sid="no-decrypt")
    for order in ((allow, deny), (deny, allow)):
        decision = evaluate(key_policy(*order), request())
        assert decision.outcome is DENY
        assert decision.sid == "no-decrypt"
        assert decision.statement_label == "no-decrypt"
        assert outcome(key_policy(*order), request(action="kms:Encrypt")) is ALLOW


def test_decision_names_statement_without_sid() -> None:
    """Without a Sid the decision names the statement by index."""
    decision = evaluate(key_policy(stmt(principal="*", Sid="x"), stmt("Deny", "*")), request())
    assert decision.sid is None
    assert decision.statement_index == 1
    assert decision.statement_label == "Statement[1]"
    assert Decision(IMPLICIT).statement_label is None


def test_conditions_gate_statements() -> None:
    """A statement applies only when its conditions hold."""
    policy = key_policy(
        stmt(
            principal={"AWS": ALICE},
            Condition={"StringEquals": {"kms:EncryptionContext:dept": "hr"}},
            Sid="hr-only",
        ),
        stmt(
            "Deny",
            "*",
            action="kms:*",
            Condition={"Bool": {"aws:SecureTransport": "false"}},
            Sid="tls-only",
        ),
    )
    ok = request_context(encryption_context={"dept": "hr"}, secure_transport=True)
    assert outcome(policy, request(context=dict(ok))) is ALLOW
    wrong = request_context(encryption_context={"dept": "it"}, secure_transport=True)
    assert outcome(policy, request(context=dict(wrong))) is IMPLICIT
    plain = request_context(encryption_context={"dept": "hr"}, secure_transport=False)
    assert outcome(policy, request(context=dict(plain))) is DENY


# -- Key policy x identity policy -------------------------------------------------------------

K_DEFAULT = parse_policy(default_key_policy(ACCOUNT))
K_DIRECT = key_policy(stmt(principal={"AWS": ALICE}, Sid="alice-direct"))
K_BOB_ONLY = key_policy(stmt(principal={"AWS": BOB}, Sid="bob"))
K_DENY_ALICE = key_policy(
    stmt(principal={"AWS": ROOT}, action="kms:*", Sid="root"),
    stmt("Deny", {"AWS": ALICE}, Sid="no-alice"),
)
K_CROSS = key_policy(
    stmt(principal={"AWS": ROOT}, action="kms:*", Sid="root"),
    stmt(principal={"AWS": OTHER_ACCOUNT}, Sid="other-account"),
)
K_CROSS_DIRECT = key_policy(stmt(principal={"AWS": CAROL}, Sid="carol"))
I_ALLOW = identity_policy(stmt(action="kms:Decrypt", Sid="id-allow"))
I_ALLOW_OTHER_KEY = identity_policy(stmt(action="kms:*", resource=OTHER_KEY))
I_DENY = identity_policy(
    stmt(action="kms:*", Sid="id-all"), stmt("Deny", action="kms:Decrypt", Sid="id-deny")
)

MATRIX: list[tuple[str, PolicyDocument, PolicyDocument | None, str, Outcome, PolicySource]] = [
    ("default, no identity policy", K_DEFAULT, None, ALICE, IMPLICIT, PolicySource.IDENTITY),
    ("default, identity allows", K_DEFAULT, I_ALLOW, ALICE, ALLOW, PolicySource.IDENTITY),
    (
        "default, identity for other key",
        K_DEFAULT,
        I_ALLOW_OTHER_KEY,
        ALICE,
        IMPLICIT,
        PolicySource.IDENTITY,
    ),
    ("default, identity denies", K_DEFAULT, I_DENY, ALICE, DENY, PolicySource.IDENTITY),
    ("default, root", K_DEFAULT, None, ROOT, ALLOW, PolicySource.RESOURCE),
    ("default, root, identity denies", K_DEFAULT, I_DENY, ROOT, DENY, PolicySource.IDENTITY),
    ("direct, no identity policy", K_DIRECT, None, ALICE, ALLOW, PolicySource.RESOURCE),
    ("direct, identity denies", K_DIRECT, I_DENY, ALICE, DENY, PolicySource.IDENTITY),
    ("direct, other principal", K_DIRECT, I_ALLOW, BOB, IMPLICIT, PolicySource.RESOURCE),
    (
        "not in key policy, identity allows",
        K_BOB_ONLY,
        I_ALLOW,
        ALICE,
        IMPLICIT,
        PolicySource.RESOURCE,
    ),
    ("root not in key policy", K_BOB_ONLY, None, ROOT, IMPLICIT, PolicySource.RESOURCE),
    ("key policy denies", K_DENY_ALICE, I_ALLOW, ALICE, DENY, PolicySource.RESOURCE),
    (
        "key policy denies other user: delegation",
        K_DENY_ALICE,
        I_ALLOW,
        BOB,
        ALLOW,
        PolicySource.IDENTITY,
    ),
    ("other account, identity allows", K_CROSS, I_ALLOW, CAROL, ALLOW, PolicySource.IDENTITY),
    ("other account, no identity", K_CROSS, None, CAROL, IMPLICIT, PolicySource.IDENTITY),
    ("other account root", K_CROSS, None, OTHER_ROOT, ALLOW, PolicySource.RESOURCE),
    (
        "other account direct, no identity",
        K_CROSS_DIRECT,
        None,
        CAROL,
        IMPLICIT,
        PolicySource.IDENTITY,
    ),
    (
        "other account direct, identity",
        K_CROSS_DIRECT,
        I_ALLOW,
        CAROL,
        ALLOW,
        PolicySource.IDENTITY,
    ),
    ("other account not delegated", K_DEFAULT, I_ALLOW, CAROL, IMPLICIT, PolicySource.RESOURCE),
]


@pytest.mark.parametrize(
    ("key", "identity", "caller", "expected", "source"),
    [row[1:] for row in MATRIX],
    ids=[row[0] for row in MATRIX],
)
def test_delegation_matrix(
    key: PolicyDocument,
    identity: PolicyDocument | None,
    caller: str,
    expected: Outcome,
    source: PolicySource,
) -> None:
    """evaluate_key_access combines key policy and identity policy as AWS KMS does."""
    decision = evaluate_key_access(key, identity, request(caller))
    assert (decision.outcome, decision.source) == (expected, source)


def test_key_access_checks_policy_kinds() -> None:
    """Passing the policies the wrong way round is a programming error."""
    with pytest.raises(ValueError, match="key_policy"):
        evaluate_key_access(I_ALLOW, None, request())
    with pytest.raises(ValueError, match="identity_policy"):
        evaluate_key_access(K_DEFAULT, K_DIRECT, request())
    with pytest.raises(ValueError, match="identity_policy"):
        evaluate_identity_access(K_DEFAULT, request())


def test_identity_access_for_account_actions() -> None:
    """Account-level actions: root may do anything not denied; others need an Allow."""
    create = identity_policy(stmt(action="kms:CreateKey"))
    create_req = request(action="kms:CreateKey", resource="*")
    assert evaluate_identity_access(create, create_req).allowed
    assert not evaluate_identity_access(None, create_req).allowed
    assert evaluate_identity_access(None, request(ROOT, "kms:CreateKey", "*")).allowed
    deny = identity_policy(stmt("Deny", action="kms:*"))
    assert evaluate_identity_access(deny, request(ROOT, "kms:CreateKey", "*")).outcome is DENY
    # A key-scoped Resource does not cover an account-level request.
    scoped = identity_policy(
        stmt(action="kms:CreateKey", resource=f"arn:aws:kms:*:{ACCOUNT}:key/*")
    )
    assert not evaluate_identity_access(scoped, create_req).allowed


# -- AccessDenied messages --------------------------------------------------------------------


def test_access_denied_messages() -> None:
    """The four AWS wordings (reference §2.2)."""
    head = f"User: {ALICE} is not authorized to perform: kms:Decrypt on resource: {KEY}"
    cases = [
        (
            Decision(IMPLICIT, PolicySource.RESOURCE),
            f"{head} because no resource-based policy allows the kms:Decrypt action",
        ),
        (
            Decision(DENY, PolicySource.RESOURCE),
            f"{head} with an explicit deny in a resource-based policy",
        ),
        (
            Decision(IMPLICIT, PolicySource.IDENTITY),
            f"{head} because no identity-based policy allows the kms:Decrypt action",
        ),
        (
            Decision(DENY, PolicySource.IDENTITY),
            f"{head} with an explicit deny in an identity-based policy",
        ),
    ]
    for decision, message in cases:
        assert access_denied_message(ALICE, "kms:Decrypt", KEY, decision) == message


def test_message_follows_from_evaluation() -> None:
    """Denials from evaluate_key_access produce the matching wording end to end."""
    decision = evaluate_key_access(K_DEFAULT, None, request())
    assert access_denied_message(ALICE, "kms:Decrypt", KEY, decision).endswith(
        "because no identity-based policy allows the kms:Decrypt action"
    )
    decision = evaluate_key_access(K_BOB_ONLY, None, request())
    assert access_denied_message(ALICE, "kms:Decrypt", KEY, decision).endswith(
        "because no resource-based policy allows the kms:Decrypt action"
    )


# -- Lockout safety check ---------------------------------------------------------------------


def test_lockout_check() -> None:
    """The new policy must let the caller call PutKeyPolicy later."""
    default = default_key_policy(ACCOUNT)
    lockout_check(default, ROOT, None)  # root is always allowed by delegation
    lockout_check(default, ALICE, identity_policy(stmt(action="kms:*")))
    lockout_check(
        key_policy(stmt(principal={"AWS": ALICE}, action="kms:PutKeyPolicy")), ALICE, None
    )
    for policy, caller, identity in [
        (default, ALICE, None),
        (default, ALICE, identity_policy(stmt(action="kms:Decrypt"))),
        (json.dumps({"Statement": [stmt(principal={"AWS": BOB}, action="kms:*")]}), ALICE, None),
        (json.dumps({"Statement": [stmt(principal={"AWS": BOB}, action="kms:*")]}), ROOT, None),
        (
            json.dumps(
                {
                    "Statement": [
                        stmt(principal={"AWS": ALICE}, action="kms:*", Sid="a"),
                        stmt("Deny", {"AWS": ALICE}, action="kms:Put*", Sid="b"),
                    ]
                }
            ),
            ALICE,
            None,
        ),
    ]:
        with pytest.raises(MalformedPolicyDocumentException) as info:
            lockout_check(policy, caller, identity)
        assert info.value.message == LOCKOUT_MESSAGE


def test_lockout_check_with_key_arn_and_context() -> None:
    """A policy naming the key by ARN needs key_arn; conditions see the given context."""
    by_arn = key_policy(stmt(principal={"AWS": ALICE}, action="kms:*", resource=KEY))
    with pytest.raises(MalformedPolicyDocumentException):
        lockout_check(by_arn, ALICE, None)
    lockout_check(by_arn, ALICE, None, key_arn=KEY)
    tls = key_policy(
        stmt(
            principal={"AWS": ALICE},
            action="kms:*",
            Condition={"Bool": {"aws:SecureTransport": "true"}},
        )
    )
    with pytest.raises(MalformedPolicyDocumentException):
        lockout_check(tls, ALICE, None)
    lockout_check(tls, ALICE, None, context=request_context(secure_transport=True))


# -- Request context --------------------------------------------------------------------------


def test_request_context_fills_the_keys() -> None:
    """request_context maps plain values to the AWS condition keys."""
    import datetime as dt

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    context = request_context(
        principal_arn=ALICE,
        caller_account=ACCOUNT,
        encryption_context={"Dept": "hr", "project": "x"},
        encryption_algorithm="SYMMETRIC_DEFAULT",
        request_alias="alias/app",
        grant_operations=["Decrypt"],
        key_spec="SYMMETRIC_DEFAULT",
        key_usage="ENCRYPT_DECRYPT",
        rotation_period_in_days=365,
        schedule_key_deletion_pending_window_in_days=30,
        secure_transport=True,
        source_ip="203.0.113.7",
        current_time=now,
        request_tags={"team": "a"},
        resource_tags={"env": "prod"},
        extra={"kms:ViaService": "s3.us-east-1.amazonaws.com"},
    )
    assert context["kms:encryptioncontext:DEPT"] == "hr"
    assert context["kms:EncryptionContextKeys"] == ("Dept", "project")
    assert context["aws:PrincipalArn"] == ALICE
    assert context["kms:CallerAccount"] == ACCOUNT
    assert context["kms:GrantOperations"] == ("Decrypt",)
    assert context["kms:RotationPeriodInDays"] == 365
    assert context["kms:ScheduleKeyDeletionPendingWindowInDays"] == 30
    assert context["aws:SecureTransport"] is True
    assert context["aws:CurrentTime"] == now
    assert context["aws:RequestTag/team"] == "a"
    assert context["aws:TagKeys"] == ("team",)
    assert context["aws:ResourceTag/env"] == "prod"
    assert context["kms:ViaService"].startswith("s3")  # type: ignore[union-attr]
    assert "KMS:KEYSPEC" in context
    assert len(request_context()) == 0


def test_context_refuses_encryption_context_keys_that_differ_by_case() -> None:
    """Dept and dept in one encryption context would be one condition key with two values
    (StringEquals matching either): request_context refuses it (the API refuses such requests
    first, with ValidationException)."""
    with pytest.raises(ValueError, match="differ only in case"):
        request_context(encryption_context={"Dept": "hr", "dept": "secret"})


def test_context_merges_other_keys_that_differ_by_case() -> None:
    """Other keys folding to one name (two tags Team and team) both reach the policy, as a
    multi-value, so neither hides the other: a Deny on either value applies."""
    context = request_context(resource_tags={"Team": "hr", "team": "secret"})
    assert sorted(context["aws:ResourceTag/team"]) == ["hr", "secret"]  # type: ignore[arg-type]
    deny = key_policy(
        stmt(principal="*", action="kms:*", Sid="all"),
        stmt("Deny", "*", Condition={"StringEquals": {"aws:ResourceTag/team": "secret"}}),
    )
    assert outcome(deny, request(context=dict(context))) is DENY


def test_context_rejects_unsupported_values() -> None:
    """Only scalars and lists of strings may go into a context."""
    with pytest.raises(TypeError):
        ConditionContext({"kms:X": [1, 2]})  # type: ignore[list-item]
    with pytest.raises(TypeError):
        ConditionContext({"kms:X": None})  # type: ignore[dict-item]


def test_context_mapping_behaviour() -> None:
    """ConditionContext is a read-only, case-insensitive mapping with value equality."""
    a = ConditionContext({"Aws:SourceIp": "1.2.3.4"})
    b = ConditionContext({"aws:sourceip": "1.2.3.4"})
    assert a == b
    assert hash(a) == hash(b)
    assert list(a) == ["aws:sourceip"]
    assert object() not in a
    assert "ConditionContext" in repr(a)
    assert a != {"aws:sourceip": "1.2.3.4"}


# -- Resource tags and aliases (ABAC) --------------------------------------------------------


class Loads:
    """Loaders of a key's tags and aliases that count how often they are called."""

    def __init__(self, tags: dict[str, str], aliases: list[str]) -> None:
        self.tags, self.aliases = tags, aliases
        self.calls: list[str] = []

    def load_tags(self) -> dict[str, str]:
        self.calls.append("tags")
        return self.tags

    def load_aliases(self) -> list[str]:
        self.calls.append("aliases")
        return self.aliases

    def context(self, **values: Any) -> ConditionContext:
        return deferred_request_context(
            resource_tags=self.load_tags, resource_aliases=self.load_aliases, **values
        )


def abac_request(context: ConditionContext, action: str = "kms:Encrypt") -> AccessRequest:
    return AccessRequest(ALICE, ACCOUNT, action, KEY, context)


def test_resource_tags_and_aliases_load_only_when_a_condition_reads_them() -> None:
    """A condition on the encryption context reads neither the key's tags nor its aliases; one
    on aws:ResourceTag/<k> loads the tags once (not the aliases); kms:ResourceAliases the
    aliases; iterating the context loads everything."""
    on_context = identity_policy(
        stmt(action="kms:Encrypt", Condition={"StringEquals": {"kms:EncryptionContext:a": "b"}})
    )
    loads = Loads({"Project": "blue"}, ["alias/app"])
    request_ = abac_request(loads.context(encryption_context={"a": "b"}))
    assert evaluate(on_context, request_).outcome is ALLOW
    assert loads.calls == []

    on_tags = identity_policy(
        stmt(action="kms:Encrypt", Condition={"StringEquals": {"aws:ResourceTag/Project": "x"}}),
        stmt(action="kms:Encrypt", Condition={"StringEquals": {"aws:ResourceTag/Project": "blue"}}),
        stmt(action="kms:Encrypt", Condition={"Null": {"aws:ResourceTag/Other": "false"}}),
    )
    request_ = abac_request(loads.context())
    assert evaluate(on_tags, request_).outcome is ALLOW
    assert loads.calls == ["tags"]

    on_aliases = identity_policy(
        stmt(
            action="kms:Encrypt",
            Condition={"ForAnyValue:StringLike": {"kms:ResourceAliases": "alias/a*"}},
        )
    )
    loads.calls.clear()
    request_ = abac_request(loads.context())
    assert evaluate(on_aliases, request_).outcome is ALLOW
    assert loads.calls == ["aliases"]

    loads.calls.clear()
    context = loads.context(principal_arn=ALICE)
    assert dict(context) == {
        "aws:principalarn": ALICE,
        "aws:resourcetag/project": "blue",
        "kms:resourcealiases": ("alias/app",),
    }
    assert sorted(loads.calls) == ["aliases", "tags"]


def test_resource_tag_condition_keys_are_case_insensitive() -> None:
    """aws:resourcetag/project finds the tag Project; the tag's value compares by the
    operator (StringEquals: exactly)."""
    policy = identity_policy(
        stmt(action="kms:Encrypt", Condition={"StringEquals": {"aws:resourcetag/project": "blue"}})
    )
    assert outcome(policy, abac_request(Loads({"Project": "blue"}, []).context())) is ALLOW
    assert outcome(policy, abac_request(Loads({"PROJECT": "blue"}, []).context())) is ALLOW
    assert outcome(policy, abac_request(Loads({"Project": "Blue"}, []).context())) is IMPLICIT
    assert outcome(policy, abac_request(Loads({}, []).context())) is IMPLICIT


def test_a_failed_load_is_not_taken_for_an_absent_key() -> None:
    """A loader that raises raises again on the next read, never leaving the key 'missing'
    (which would make a negated Deny condition silently true or false)."""
    calls = 0

    def broken() -> dict[str, str]:
        nonlocal calls
        calls += 1
        raise RuntimeError("store down")

    context = deferred_request_context(resource_tags=broken)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            context.get("aws:ResourceTag/Project")
    assert calls == 2


def test_resource_aliases_beyond_the_quota_satisfy_no_condition() -> None:
    """spec: kms:ResourceAliases is effective only while the key is within the aliases quota:
    beyond it every condition reading the key is false, whatever its operator."""
    within = [f"alias/a{i}" for i in range(RESOURCE_ALIASES_QUOTA)]
    beyond = [*within, "alias/one-too-many"]
    assert request_context(resource_aliases=within)["kms:ResourceAliases"] == tuple(within)
    assert request_context(resource_aliases=beyond)["kms:ResourceAliases"] is UNEVALUABLE
    operators = [
        {"ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/a0"}},
        {"ForAllValues:StringLike": {"kms:ResourceAliases": "alias/*"}},
        {"ForAnyValue:StringNotEquals": {"kms:ResourceAliases": "alias/none"}},
        {"StringNotLikeIfExists": {"kms:ResourceAliases": "alias/none"}},
        {"Null": {"kms:ResourceAliases": "true"}},
        {"Null": {"kms:ResourceAliases": "false"}},
    ]
    for condition in operators:
        policy = identity_policy(stmt(action="kms:Encrypt", Condition=condition))
        assert outcome(policy, abac_request(Loads({}, beyond).context())) is IMPLICIT, condition
        deny = identity_policy(
            stmt(action="kms:Encrypt"), stmt("Deny", action="kms:Encrypt", Condition=condition)
        )
        assert outcome(deny, abac_request(Loads({}, beyond).context())) is ALLOW, condition
    allowed = identity_policy(stmt(action="kms:Encrypt", Condition=operators[0]))
    assert outcome(allowed, abac_request(Loads({}, within).context())) is ALLOW
    merged = ConditionContext({"kms:ResourceAliases": UNEVALUABLE, "KMS:ResourceAliases": ["x"]})
    assert merged["kms:resourcealiases"] is UNEVALUABLE
    assert repr(UNEVALUABLE) == "UNEVALUABLE"


# -- Properties -------------------------------------------------------------------------------

PRINCIPALS = [ALICE, BOB, ROOT, CAROL, ADMIN_ROLE]
ACTIONS = ["kms:Decrypt", "kms:Encrypt", "kms:ReEncryptFrom", "kms:DescribeKey", "kms:PutKeyPolicy"]
CONDITIONS: list[dict[str, Any]] = [
    {"StringEquals": {"kms:EncryptionContext:dept": "hr"}},
    {"Bool": {"aws:SecureTransport": "true"}},
    {"NumericLessThan": {"kms:RotationPeriodInDays": 100}},
    {"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["dept"]}},
    {"Null": {"kms:RequestAlias": "true"}},
    {"StringNotEquals": {"kms:EncryptionContext:dept": "hr"}},
]

_action_field = st.sampled_from(
    ["kms:*", "kms:Decrypt", "kms:ReEncrypt*", "kms:Describe*", "*", "kms:Put*"]
)
_actions = st.one_of(_action_field, st.lists(_action_field, min_size=1, max_size=3))
_resources = st.sampled_from(["*", KEY, OTHER_KEY, f"arn:aws:kms:*:{ACCOUNT}:key/*"])
_condition = st.one_of(st.none(), st.sampled_from(CONDITIONS))
_principal = st.sampled_from(
    [
        "*",
        {"AWS": ALICE},
        {"AWS": BOB},
        {"AWS": ACCOUNT},
        {"AWS": ROOT},
        {"AWS": OTHER_ACCOUNT},
        {"AWS": [ALICE, ADMIN_ROLE]},
        {"Service": "ec2.amazonaws.com"},
        {"AWS": CAROL},
    ]
)


@st.composite
def statements(draw: st.DrawFn, effect: str | None = None, identity: bool = False) -> Stmt:
    chosen = effect or draw(st.sampled_from(["Allow", "Deny"]))
    body: Stmt = {"Effect": chosen}
    if draw(st.booleans()):
        body["Action"] = draw(_actions)
    else:
        body["NotAction"] = draw(_actions)
    if draw(st.integers(0, 9)) > 0:
        body["Resource"] = draw(_resources)
    condition = draw(_condition)
    if condition is not None:
        body["Condition"] = condition
    if not identity:
        if chosen == "Deny" and draw(st.integers(0, 4)) == 0:
            body["NotPrincipal"] = draw(_principal)
        else:
            body["Principal"] = draw(_principal)
    return body


def _doc(statement_list: list[Stmt], identity: bool = False) -> PolicyDocument:
    text = json.dumps({"Version": "2012-10-17", "Statement": statement_list})
    return parse_identity_policy(text) if identity else parse_policy(text)


@st.composite
def requests(draw: st.DrawFn) -> AccessRequest:
    context: dict[str, Any] = {}
    if draw(st.booleans()):
        context["kms:EncryptionContext:dept"] = draw(st.sampled_from(["hr", "it"]))
        context["kms:EncryptionContextKeys"] = ["dept"]
    if draw(st.booleans()):
        context["aws:SecureTransport"] = draw(st.booleans())
    if draw(st.booleans()):
        context["kms:RotationPeriodInDays"] = draw(st.sampled_from([90, 365]))
    if draw(st.booleans()):
        context["kms:RequestAlias"] = "alias/app"
    return request(draw(st.sampled_from(PRINCIPALS)), draw(st.sampled_from(ACTIONS)), KEY, context)


_key_statements = st.lists(statements(), min_size=1, max_size=5)
_identity_statements = st.one_of(
    st.none(), st.lists(statements(identity=True), min_size=1, max_size=3)
)


def _decide(key: list[Stmt], ident: list[Stmt] | None, req: AccessRequest) -> Decision:
    return evaluate_key_access(
        _doc(key), _doc(ident, identity=True) if ident is not None else None, req
    )


@settings(max_examples=150, deadline=None)
@given(key=_key_statements, ident=_identity_statements, extra=statements("Deny"), req=requests())
def test_adding_a_deny_never_allows(
    key: list[Stmt], ident: list[Stmt] | None, extra: Stmt, req: AccessRequest
) -> None:
    """Adding a Deny statement (to either policy) never turns a denial into ALLOW."""
    before = _decide(key, ident, req)
    after_key = _decide([*key, extra], ident, req)
    extra_identity = {k: v for k, v in extra.items() if k not in ("Principal", "NotPrincipal")}
    after_identity = _decide(key, [*(ident or []), extra_identity], req)
    for after in (after_key, after_identity):
        if not before.allowed:
            assert not after.allowed
        if before.outcome is DENY:
            assert after.outcome is DENY


@settings(max_examples=150, deadline=None)
@given(key=_key_statements, ident=_identity_statements, extra=statements("Allow"), req=requests())
def test_adding_an_allow_never_denies(
    key: list[Stmt], ident: list[Stmt] | None, extra: Stmt, req: AccessRequest
) -> None:
    """Adding an Allow never turns ALLOW into a denial, nor removes an explicit deny."""
    before = _decide(key, ident, req)
    after_key = _decide([*key, extra], ident, req)
    extra_identity = {k: v for k, v in extra.items() if k != "Principal"}
    after_identity = _decide(key, [*(ident or []), extra_identity], req)
    for after in (after_key, after_identity):
        if before.allowed:
            assert after.allowed
        if before.outcome is DENY:
            assert after.outcome is DENY


@settings(max_examples=150, deadline=None)
@given(key=_key_statements, ident=_identity_statements, req=requests(), data=st.data())
def test_statement_order_never_matters(
    key: list[Stmt], ident: list[Stmt] | None, req: AccessRequest, data: st.DataObject
) -> None:
    """Permuting statements never changes the outcome or its source."""
    before = _decide(key, ident, req)
    shuffled_key = data.draw(st.permutations(key))
    shuffled_ident = data.draw(st.permutations(ident)) if ident is not None else None
    after = _decide(shuffled_key, shuffled_ident, req)
    assert (after.outcome, after.source, after.delegated) == (
        before.outcome,
        before.source,
        before.delegated,
    )


@settings(max_examples=100, deadline=None)
@given(key=_key_statements, req=requests())
def test_single_policy_decision_is_consistent(key: list[Stmt], req: AccessRequest) -> None:
    """evaluate's answer agrees with a brute-force reading of the statements."""
    policy = _doc(key)
    decision = evaluate(policy, req)
    if decision.outcome is DENY:
        assert decision.statement_index is not None
        assert key[decision.statement_index]["Effect"] == "Deny"
    if decision.outcome is ALLOW:
        assert decision.statement_index is not None
        assert key[decision.statement_index]["Effect"] == "Allow"
        assert not decision.delegated


@pytest.mark.parametrize("action", KEY_RESOURCE_ACTIONS)
def test_default_policy_across_all_actions(action: str) -> None:
    """Under the default policy root may do every key action and a user exactly what IAM allows."""
    assert evaluate_key_access(K_DEFAULT, None, request(ROOT, action)).allowed
    assert not evaluate_key_access(K_DEFAULT, None, request(ALICE, action)).allowed
    assert evaluate_key_access(
        K_DEFAULT, identity_policy(stmt(action=action)), request(ALICE, action)
    ).allowed


def test_action_lists_are_disjoint_and_prefixed() -> None:
    """Key actions and account actions never overlap; every name carries the kms: prefix."""
    assert not set(KEY_RESOURCE_ACTIONS) & set(ACCOUNT_ACTIONS)
    assert all(a.startswith("kms:") for a in (*KEY_RESOURCE_ACTIONS, *ACCOUNT_ACTIONS))
    assert len(set(KEY_RESOURCE_ACTIONS)) == len(KEY_RESOURCE_ACTIONS)


def test_context_merges_scalars_of_any_type() -> None:
    """Colliding keys with non-string values merge into their string forms."""
    import datetime as dt

    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    context = ConditionContext({"kms:A": 1, "KMS:A": True, "Kms:a": when, "kms:a": ["x"]})
    assert context["kms:a"] == ("1", "true", when.isoformat(), "x")


def test_request_account_must_match_the_principal() -> None:
    """An AccessRequest whose account disagrees with its principal ARN is refused."""
    with pytest.raises(ValueError, match="not the account of"):
        AccessRequest(ALICE, OTHER_ACCOUNT, "kms:Decrypt", KEY)
    with pytest.raises(ValueError, match="not the account of"):
        AccessRequest("alice", ACCOUNT, "kms:Decrypt", KEY)


def _recase(text: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flips[i % len(flips)] else c for i, c in enumerate(text))


@settings(max_examples=100, deadline=None)
@given(
    key=_key_statements,
    req=requests(),
    flips=st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_action_and_context_key_case_never_matters(
    key: list[Stmt], req: AccessRequest, flips: list[bool]
) -> None:
    """Re-casing the action name or the context key names never changes the decision."""
    policy = _doc(key)
    before = evaluate(policy, req)
    recased = AccessRequest(
        req.principal_arn,
        req.principal_account,
        _recase(req.action, flips),
        req.resource,
        {_recase(name, flips): value for name, value in req.context.items()},
    )
    after = evaluate(policy, recased)
    assert (after.outcome, after.delegated) == (before.outcome, before.delegated)
