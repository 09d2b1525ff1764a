"""Condition operators, table-driven: match, no match, missing key, IfExists, negation, sets."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmkms.errors import MalformedPolicyDocumentException
from hsmkms.policy import ConditionContext, ContextInput
from hsmkms.policy.conditions import conditions_hold, parse_condition_block, split_operator
from hsmkms.policy.wildcard import wildcard_match

MISSING = object()
ROLE_ADMIN = "arn:aws:iam::111122223333:role/Admin"
USER_BOB = "arn:aws:iam::111122223333:user/bob"
T2020 = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def holds(operator: str, key: str, values: Any, request_value: Any) -> bool:
    clauses = parse_condition_block({operator: {key: values}}, "Statement[0].Condition")
    context = {} if request_value is MISSING else {key: request_value}
    return conditions_hold(clauses, ConditionContext(context))


# (operator, key, policy values, request value or MISSING, expected)
CASES: list[tuple[str, str, Any, Any, bool]] = [
    # -- String ---------------------------------------------------------------------------
    ("StringEquals", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", "SYMMETRIC_DEFAULT", True),
    ("StringEquals", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", "symmetric_default", False),
    ("StringEquals", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", MISSING, False),
    ("StringEqualsIfExists", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", MISSING, True),
    (
        "StringEqualsIfExists",
        "kms:EncryptionAlgorithm",
        "SYMMETRIC_DEFAULT",
        "RSAES_OAEP_SHA_1",
        False,
    ),
    (
        "StringEqualsIfExists",
        "kms:EncryptionAlgorithm",
        "SYMMETRIC_DEFAULT",
        "SYMMETRIC_DEFAULT",
        True,
    ),
    ("StringEquals", "kms:EncryptionContext:dept", ["hr", "it"], "it", True),
    ("StringEquals", "kms:EncryptionContext:dept", ["hr", "it"], "ops", False),
    ("StringNotEquals", "kms:EncryptionContext:dept", "hr", "hr", False),
    ("StringNotEquals", "kms:EncryptionContext:dept", "hr", "it", True),
    ("StringNotEquals", "kms:EncryptionContext:dept", "hr", MISSING, True),
    ("StringNotEquals", "kms:EncryptionContext:dept", ["hr", "it"], "it", False),  # NOR
    ("StringNotEquals", "kms:EncryptionContext:dept", ["hr", "it"], "ops", True),
    ("StringNotEqualsIfExists", "kms:EncryptionContext:dept", "hr", MISSING, True),
    ("StringNotEqualsIfExists", "kms:EncryptionContext:dept", "hr", "hr", False),
    ("StringEqualsIgnoreCase", "kms:EncryptionContext:dept", "Finance", "FINANCE", True),
    ("StringEqualsIgnoreCase", "kms:EncryptionContext:dept", "Finance", "fin", False),
    ("StringEqualsIgnoreCase", "kms:EncryptionContext:dept", "Finance", MISSING, False),
    ("StringEqualsIgnoreCaseIfExists", "kms:EncryptionContext:dept", "Finance", MISSING, True),
    ("StringNotEqualsIgnoreCase", "kms:EncryptionContext:dept", "Finance", "finance", False),
    ("StringNotEqualsIgnoreCase", "kms:EncryptionContext:dept", "Finance", "hr", True),
    ("StringNotEqualsIgnoreCase", "kms:EncryptionContext:dept", "Finance", MISSING, True),
    ("StringLike", "kms:RequestAlias", "alias/app-*", "alias/app-prod", True),
    ("StringLike", "kms:RequestAlias", "alias/app-*", "alias/app-", True),
    ("StringLike", "kms:RequestAlias", "alias/app-*", "alias/other", False),
    ("StringLike", "kms:RequestAlias", "alias/App-*", "alias/app-prod", False),  # case-sensitive
    ("StringLike", "kms:RequestAlias", "alias/v?", "alias/v1", True),
    ("StringLike", "kms:RequestAlias", "alias/v?", "alias/v10", False),
    ("StringLike", "kms:RequestAlias", "alias/v?", "alias/v", False),
    ("StringLike", "kms:RequestAlias", "alias/[ab]", "alias/a", False),  # [ is literal
    ("StringLike", "kms:RequestAlias", "alias/[ab]", "alias/[ab]", True),
    ("StringLike", "kms:RequestAlias", "alias/app-*", MISSING, False),
    ("StringLikeIfExists", "kms:RequestAlias", "alias/app-*", MISSING, True),
    ("StringLikeIfExists", "kms:RequestAlias", "alias/app-*", "alias/x", False),
    ("StringNotLike", "kms:RequestAlias", "alias/app-*", "alias/app-prod", False),
    ("StringNotLike", "kms:RequestAlias", "alias/app-*", "alias/other", True),
    ("StringNotLike", "kms:RequestAlias", "alias/app-*", MISSING, True),
    ("StringNotLikeIfExists", "kms:RequestAlias", "alias/app-*", MISSING, True),
    ("StringEquals", "kms:CallerAccount", 111122223333, "111122223333", True),  # JSON number
    ("StringEquals", "aws:SecureTransport", "true", True, True),  # bool context as string
    ("StringEquals", "kms:RotationPeriodInDays", "365", 365, True),  # int context as string
    # -- Numeric --------------------------------------------------------------------------
    ("NumericEquals", "kms:RotationPeriodInDays", "90", 90, True),
    ("NumericEquals", "kms:RotationPeriodInDays", 90, "90", True),
    ("NumericEquals", "kms:RotationPeriodInDays", "90", 91, False),
    ("NumericEquals", "kms:RotationPeriodInDays", "90", MISSING, False),
    ("NumericEquals", "kms:RotationPeriodInDays", "90", "ninety", False),
    ("NumericEqualsIfExists", "kms:RotationPeriodInDays", "90", MISSING, True),
    ("NumericNotEquals", "kms:RotationPeriodInDays", "90", 90, False),
    ("NumericNotEquals", "kms:RotationPeriodInDays", "90", 91, True),
    ("NumericNotEquals", "kms:RotationPeriodInDays", "90", MISSING, True),
    ("NumericNotEqualsIfExists", "kms:RotationPeriodInDays", "90", MISSING, True),
    ("NumericLessThan", "kms:RotationPeriodInDays", "100", 90, True),
    ("NumericLessThan", "kms:RotationPeriodInDays", "100", 100, False),
    ("NumericLessThan", "kms:RotationPeriodInDays", "7.5", 7, True),
    ("NumericLessThan", "kms:RotationPeriodInDays", "100", MISSING, False),
    ("NumericLessThanIfExists", "kms:RotationPeriodInDays", "100", MISSING, True),
    ("NumericLessThanEquals", "kms:RotationPeriodInDays", "100", 100, True),
    ("NumericLessThanEquals", "kms:RotationPeriodInDays", "100", 101, False),
    ("NumericLessThanEquals", "kms:RotationPeriodInDays", "100", MISSING, False),
    ("NumericGreaterThan", "kms:ScheduleKeyDeletionPendingWindowInDays", "29", 30, True),
    ("NumericGreaterThan", "kms:ScheduleKeyDeletionPendingWindowInDays", "30", 30, False),
    ("NumericGreaterThan", "kms:ScheduleKeyDeletionPendingWindowInDays", "30", MISSING, False),
    ("NumericGreaterThanEquals", "kms:ScheduleKeyDeletionPendingWindowInDays", "30", 30, True),
    ("NumericGreaterThanEquals", "kms:ScheduleKeyDeletionPendingWindowInDays", "30", 7, False),
    (
        "NumericGreaterThanEqualsIfExists",
        "kms:ScheduleKeyDeletionPendingWindowInDays",
        "30",
        MISSING,
        True,
    ),
    ("NumericEquals", "kms:RotationPeriodInDays", "1", True, False),  # a bool is not a number
    # -- Date -----------------------------------------------------------------------------
    (
        "DateGreaterThan",
        "aws:CurrentTime",
        "2020-01-01T00:00:00Z",
        T2020 + dt.timedelta(days=1),
        True,
    ),
    ("DateGreaterThan", "aws:CurrentTime", "2020-01-01T00:00:00Z", T2020, False),
    ("DateGreaterThan", "aws:CurrentTime", "2020-01-01T00:00:00Z", MISSING, False),
    ("DateGreaterThanIfExists", "aws:CurrentTime", "2020-01-01T00:00:00Z", MISSING, True),
    ("DateGreaterThanEquals", "aws:CurrentTime", "2020-01-01T00:00:00Z", T2020, True),
    (
        "DateGreaterThanEquals",
        "aws:CurrentTime",
        "2020-01-01T00:00:00Z",
        T2020 - dt.timedelta(seconds=1),
        False,
    ),
    ("DateLessThan", "aws:CurrentTime", "1577836800", T2020 - dt.timedelta(days=1), True),  # epoch
    ("DateLessThan", "aws:CurrentTime", 1577836800, T2020, False),
    ("DateLessThan", "aws:CurrentTime", "1577836800", MISSING, False),
    ("DateLessThanEquals", "aws:CurrentTime", "2020-01-01", T2020, True),  # date only
    ("DateLessThanEquals", "aws:CurrentTime", "2020-01-01", T2020 + dt.timedelta(seconds=1), False),
    ("DateEquals", "aws:CurrentTime", "2020-01-01T00:00:00Z", "1577836800", True),
    ("DateEquals", "aws:CurrentTime", "2020-01-01T02:00:00+02:00", T2020, True),  # offset
    ("DateEquals", "aws:CurrentTime", "2020-01-01T00:00:00.000Z", T2020, True),  # fraction
    (
        "DateEquals",
        "aws:CurrentTime",
        "2020-01-01T00:00:00Z",
        dt.datetime(2020, 1, 1),
        True,
    ),  # naive=UTC
    ("DateEquals", "aws:CurrentTime", "2020-01-01T00:00:00Z", "not a date", False),
    ("DateEquals", "aws:CurrentTime", "2020-01-01T00:00:00Z", MISSING, False),
    ("DateNotEquals", "aws:CurrentTime", "2020-01-01T00:00:00Z", T2020, False),
    (
        "DateNotEquals",
        "aws:CurrentTime",
        "2020-01-01T00:00:00Z",
        T2020 + dt.timedelta(hours=1),
        True,
    ),
    ("DateNotEquals", "aws:CurrentTime", "2020-01-01T00:00:00Z", MISSING, True),
    ("DateNotEqualsIfExists", "aws:CurrentTime", "2020-01-01T00:00:00Z", MISSING, True),
    # -- Bool -----------------------------------------------------------------------------
    ("Bool", "aws:SecureTransport", "true", True, True),
    ("Bool", "aws:SecureTransport", "true", False, False),
    ("Bool", "aws:SecureTransport", "true", "true", True),
    ("Bool", "aws:SecureTransport", True, "TRUE", True),
    ("Bool", "aws:SecureTransport", "false", False, True),
    ("Bool", "aws:SecureTransport", "true", MISSING, False),
    ("Bool", "aws:SecureTransport", "true", "yes", False),
    ("BoolIfExists", "aws:SecureTransport", "false", MISSING, True),
    ("BoolIfExists", "aws:SecureTransport", "false", True, False),
    # -- Binary ---------------------------------------------------------------------------
    ("BinaryEquals", "aws:Blob", "QmluYXJ5VmFsdWU=", "QmluYXJ5VmFsdWU=", True),
    ("BinaryEquals", "aws:Blob", "QmluYXJ5VmFsdWU=", "T3RoZXI=", False),
    ("BinaryEquals", "aws:Blob", "QmluYXJ5VmFsdWU=", "not base64!", False),
    ("BinaryEquals", "aws:Blob", "QmluYXJ5VmFsdWU=", MISSING, False),
    ("BinaryEqualsIfExists", "aws:Blob", "QmluYXJ5VmFsdWU=", MISSING, True),
    # -- IP -------------------------------------------------------------------------------
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", "203.0.113.7", True),
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", "198.51.100.1", False),
    ("IpAddress", "aws:SourceIp", "203.0.113.7", "203.0.113.7", True),  # bare address
    ("IpAddress", "aws:SourceIp", ["10.0.0.0/8", "203.0.113.0/24"], "10.1.2.3", True),
    ("IpAddress", "aws:SourceIp", "2001:db8::/32", "2001:db8::1", True),
    ("IpAddress", "aws:SourceIp", "2001:db8::/32", "203.0.113.7", False),
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", "not-an-ip", False),
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", MISSING, False),
    ("IpAddressIfExists", "aws:SourceIp", "203.0.113.0/24", MISSING, True),
    ("NotIpAddress", "aws:SourceIp", "203.0.113.0/24", "203.0.113.7", False),
    ("NotIpAddress", "aws:SourceIp", "203.0.113.0/24", "198.51.100.1", True),
    ("NotIpAddress", "aws:SourceIp", "203.0.113.0/24", MISSING, True),
    ("NotIpAddressIfExists", "aws:SourceIp", "203.0.113.0/24", MISSING, True),
    # -- ARN ------------------------------------------------------------------------------
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", ROLE_ADMIN, True),
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", USER_BOB, False),
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::*:role/Admin", ROLE_ADMIN, True),
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::*", ROLE_ADMIN, False),  # * stays in its field
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/admin", ROLE_ADMIN, False),
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", "not-an-arn", False),
    ("ArnLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", MISSING, False),
    ("ArnLikeIfExists", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", MISSING, True),
    ("ArnEquals", "aws:PrincipalArn", ROLE_ADMIN, ROLE_ADMIN, True),
    ("ArnEquals", "aws:PrincipalArn", ROLE_ADMIN, USER_BOB, False),
    ("ArnEquals", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", ROLE_ADMIN, True),
    ("ArnEquals", "aws:PrincipalArn", ROLE_ADMIN, MISSING, False),
    ("ArnEqualsIfExists", "aws:PrincipalArn", ROLE_ADMIN, MISSING, True),
    ("ArnNotEquals", "aws:PrincipalArn", ROLE_ADMIN, ROLE_ADMIN, False),
    ("ArnNotEquals", "aws:PrincipalArn", ROLE_ADMIN, USER_BOB, True),
    ("ArnNotEquals", "aws:PrincipalArn", ROLE_ADMIN, MISSING, True),
    ("ArnNotLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", ROLE_ADMIN, False),
    ("ArnNotLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", USER_BOB, True),
    ("ArnNotLike", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", MISSING, True),
    ("ArnNotLikeIfExists", "aws:PrincipalArn", "arn:aws:iam::111122223333:role/*", MISSING, True),
    # -- Null -----------------------------------------------------------------------------
    ("Null", "kms:RequestAlias", "true", MISSING, True),
    ("Null", "kms:RequestAlias", "true", "alias/x", False),
    ("Null", "kms:RequestAlias", "false", "alias/x", True),
    ("Null", "kms:RequestAlias", "false", MISSING, False),
    ("Null", "kms:RequestAlias", True, MISSING, True),
    ("Null", "kms:EncryptionContextKeys", "true", [], True),  # an empty set counts as absent
    ("Null", "kms:RequestAlias", ["true", "false"], "alias/x", True),  # OR'ed
]


@pytest.mark.parametrize(
    ("operator", "key", "values", "request_value", "expected"),
    CASES,
    ids=[f"{c[0]}-{c[2]!s:.20}-{'missing' if c[3] is MISSING else c[3]!s:.20}" for c in CASES],
)
def test_operator(operator: str, key: str, values: Any, request_value: Any, expected: bool) -> None:
    """Each operator against a matching, non-matching and missing request value."""
    assert holds(operator, key, values, request_value) is expected


KEYS = "kms:EncryptionContextKeys"

# (operator, policy values, request set or MISSING, expected) on kms:EncryptionContextKeys
SET_CASES: list[tuple[str, Any, Any, bool]] = [
    ("ForAllValues:StringEquals", ["Dept", "Project"], ["Dept"], True),  # subset
    ("ForAllValues:StringEquals", ["Dept", "Project"], ["Project", "Dept"], True),  # equal
    (
        "ForAllValues:StringEquals",
        ["Dept", "Project"],
        ["Dept", "Project", "Cost"],
        False,
    ),  # superset
    ("ForAllValues:StringEquals", ["Dept", "Project"], ["Cost"], False),
    ("ForAllValues:StringEquals", ["Dept"], [], True),  # empty: vacuously true
    ("ForAllValues:StringEquals", ["Dept"], MISSING, True),
    ("ForAllValues:StringEqualsIfExists", ["Dept"], MISSING, True),
    ("ForAllValues:StringLike", ["Dept*"], ["DeptA", "DeptB"], True),
    ("ForAllValues:StringLike", ["Dept*"], ["DeptA", "Cost"], False),
    ("ForAllValues:StringNotEquals", ["Secret"], ["Dept", "Project"], True),
    ("ForAllValues:StringNotEquals", ["Secret"], ["Dept", "Secret"], False),
    ("ForAllValues:StringNotEquals", ["Secret"], MISSING, True),
    ("ForAnyValue:StringEquals", ["Dept"], ["Dept", "Cost"], True),  # superset
    ("ForAnyValue:StringEquals", ["Dept", "Project"], ["Dept"], True),  # subset
    ("ForAnyValue:StringEquals", ["Dept"], ["Cost"], False),
    ("ForAnyValue:StringEquals", ["Dept"], [], False),  # empty: false
    ("ForAnyValue:StringEquals", ["Dept"], MISSING, False),
    ("ForAnyValue:StringEqualsIfExists", ["Dept"], MISSING, False),  # still false (as AWS)
    ("ForAnyValue:StringNotEquals", ["Dept", "Owner"], ["Dept", "Owner"], False),
    ("ForAnyValue:StringNotEquals", ["Dept", "Owner"], ["Dept", "Cost"], True),
    ("ForAnyValue:StringNotEquals", ["Dept", "Owner"], MISSING, False),
    ("ForAnyValue:StringEqualsIgnoreCase", ["dept"], ["DEPT"], True),
    ("ForAnyValue:StringEquals", ["Dept"], "Dept", True),  # a single value is a one-element set
    ("StringEquals", ["Dept"], ["Dept", "Cost"], True),  # no qualifier: any value matches
    ("StringEquals", ["Dept"], ["Cost"], False),
    ("StringNotEquals", ["Dept"], ["Dept", "Cost"], False),  # no qualifier, negated: none match
    ("StringNotEquals", ["Dept"], ["Cost"], True),
    ("StringEquals", ["Dept"], [], False),
]


@pytest.mark.parametrize(("operator", "values", "request_value", "expected"), SET_CASES)
def test_set_qualifiers(operator: str, values: Any, request_value: Any, expected: bool) -> None:
    """ForAllValues/ForAnyValue over empty, subset, equal and superset request sets."""
    assert holds(operator, KEYS, values, request_value) is expected


def test_grant_operations_set() -> None:
    """kms:GrantOperations is multi-valued: ForAllValues bounds what a grant may carry."""
    allowed = ["Decrypt", "Encrypt", "RetireGrant"]
    assert holds("ForAllValues:StringEquals", "kms:GrantOperations", allowed, ["Decrypt"])
    assert not holds(
        "ForAllValues:StringEquals", "kms:GrantOperations", allowed, ["Decrypt", "CreateGrant"]
    )
    assert holds("ForAnyValue:StringLike", "kms:GrantOperations", "Re*", ["Decrypt", "ReEncryptTo"])


def test_keys_and_operators_are_anded() -> None:
    """Two keys under one operator, and two operators, must all hold."""
    block = {
        "StringEquals": {"kms:EncryptionContext:dept": "hr", "kms:CallerAccount": "111122223333"},
        "Bool": {"aws:SecureTransport": "true"},
    }
    clauses = parse_condition_block(block, "C")
    full: dict[str, ContextInput] = {
        "kms:EncryptionContext:dept": "hr",
        "kms:CallerAccount": "111122223333",
        "aws:SecureTransport": True,
    }
    assert conditions_hold(clauses, ConditionContext(full))
    for dropped in full:
        partial = {k: v for k, v in full.items() if k != dropped}
        assert not conditions_hold(clauses, ConditionContext(partial)), dropped
    assert not conditions_hold(clauses, ConditionContext({**full, "aws:SecureTransport": False}))


def test_empty_condition_block_holds() -> None:
    """A Condition with no operators imposes nothing."""
    assert conditions_hold(parse_condition_block({}, "C"), ConditionContext())


def test_condition_key_names_are_case_insensitive() -> None:
    """Both the policy's and the request's key names ignore case, including the EC key part."""
    clauses = parse_condition_block({"StringEquals": {"KMS:encryptioncontext:DEPT": "hr"}}, "C")
    assert conditions_hold(clauses, ConditionContext({"kms:EncryptionContext:dept": "hr"}))
    assert conditions_hold(clauses, ConditionContext({"Kms:EncryptionContext:Dept": "hr"}))
    # ...but values stay case-sensitive under StringEquals.
    assert not conditions_hold(clauses, ConditionContext({"kms:EncryptionContext:dept": "HR"}))


def test_lookup_in_a_plain_mapping_is_case_insensitive() -> None:
    """A plain dict context (not a ConditionContext) is still looked up ignoring case."""
    clauses = parse_condition_block({"StringEquals": {"kms:CallerAccount": "1"}}, "C")
    assert conditions_hold(clauses, {"KMS:CALLERACCOUNT": "1"})


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ({"StringEqualz": {"kms:X": "a"}}, "unknown condition operator 'StringEqualz'"),
        ({"stringequals": {"kms:X": "a"}}, "unknown condition operator 'stringequals'"),
        ({"NullIfExists": {"kms:X": "true"}}, "unknown condition operator 'NullIfExists'"),
        ({"ForAnyValue:Null": {"kms:X": "true"}}, "unknown condition operator"),
        ({"ForSomeValues:StringEquals": {"kms:X": "a"}}, "unknown condition operator"),
        ({"IfExists": {"kms:X": "a"}}, "unknown condition operator 'IfExists'"),
        ({"Bool": {"aws:SecureTransport": "yes"}}, "Bool needs true or false"),
        ({"Bool": {"aws:SecureTransport": 1}}, "Bool needs true or false"),
        ({"Null": {"kms:X": "maybe"}}, "Null needs true or false"),
        ({"NumericLessThan": {"kms:X": "abc"}}, "NumericLessThan needs a number"),
        ({"NumericLessThan": {"kms:X": True}}, "needs a number"),
        ({"DateLessThan": {"aws:CurrentTime": "yesterday"}}, "ISO 8601 date or epoch"),
        ({"BinaryEquals": {"aws:Blob": "!!!"}}, "BinaryEquals needs base64"),
        ({"IpAddress": {"aws:SourceIp": "300.1.1.1/8"}}, "IPv4 or IPv6"),
        ({"StringEquals": {"kms:X": None}}, "value None is not valid"),
        ({"StringEquals": {"kms:X": {"a": "b"}}}, "is not valid"),
        ({"StringEquals": {"kms:X": ["a", ["b"]]}}, "is not valid"),
        ({"StringEquals": {"kms:X": []}}, "must have at least one value"),
        ({"StringEquals": {}}, "non-empty JSON object of condition keys"),
        ({"StringEquals": "kms:X"}, "non-empty JSON object of condition keys"),
        ({"StringEquals": {"NoPrefix": "a"}}, "invalid condition key 'NoPrefix'"),
        ({"StringEquals": {"": "a"}}, "invalid condition key ''"),
        (
            {"ForAllValues:StringEquals": {"kms:EncryptionContext:Dept": "hr"}},
            "OverlyPermissiveCondition",
        ),
        (
            {"ForAllValues:StringLike": {"KMS:ENCRYPTIONCONTEXT:dept": "*"}},
            "OverlyPermissiveCondition",
        ),
        ({"ForAllValues:StringEquals": {"aws:RequestTag/team": "a"}}, "OverlyPermissiveCondition"),
    ],
)
def test_malformed_conditions(block: dict[str, Any], fragment: str) -> None:
    """Each malformed Condition is refused with a message naming the problem."""
    with pytest.raises(MalformedPolicyDocumentException) as info:
        parse_condition_block(block, "Statement[0].Condition")
    assert fragment in info.value.message
    assert info.value.message.startswith("Statement[0].Condition")


def test_condition_must_be_an_object() -> None:
    """A Condition that is not an object is malformed."""
    with pytest.raises(MalformedPolicyDocumentException, match="must be a JSON object"):
        parse_condition_block(["StringEquals"], "Statement[2].Condition")


def test_forallvalues_allowed_on_the_keys_list() -> None:
    """ForAllValues is fine on kms:EncryptionContextKeys and aws:TagKeys; ForAnyValue on EC keys."""
    parse_condition_block({"ForAllValues:StringEquals": {KEYS: ["a"], "aws:TagKeys": "t"}}, "C")
    parse_condition_block({"ForAnyValue:StringEquals": {"kms:EncryptionContext:a": "b"}}, "C")


def test_split_operator() -> None:
    """Operators split into qualifier, base and IfExists."""
    parts = split_operator("ForAnyValue:StringLikeIfExists")
    assert parts is not None
    assert (parts[0] and parts[0].value, parts[1], parts[2]) == ("ForAnyValue", "StringLike", True)
    assert split_operator("Null") == (None, "Null", False)
    assert split_operator("StringLikeIfExistsIfExists") is None


_plain = st.text(alphabet=st.characters(blacklist_characters="*?"), max_size=12)


@given(pattern=_plain, value=_plain)
def test_stringlike_without_wildcards_is_stringequals(pattern: str, value: str) -> None:
    """StringLike with a pattern free of * and ? decides exactly like StringEquals."""
    for candidate in (value, pattern):
        assert holds("StringLike", "kms:X", pattern, candidate) == holds(
            "StringEquals", "kms:X", pattern, candidate
        )


_glob_text = st.text(alphabet="ab*?", max_size=10)


def _reference_glob(pattern: str, text: str) -> bool:
    # Dynamic programming over (pattern prefix, text prefix): an independent oracle.
    table = [[False] * (len(text) + 1) for _ in range(len(pattern) + 1)]
    table[0][0] = True
    for i, char in enumerate(pattern, start=1):
        table[i][0] = table[i - 1][0] and char == "*"
        for j in range(1, len(text) + 1):
            if char == "*":
                table[i][j] = table[i - 1][j] or table[i][j - 1]
            else:
                table[i][j] = table[i - 1][j - 1] and char in ("?", text[j - 1])
    return table[len(pattern)][len(text)]


@given(pattern=_glob_text, text=st.text(alphabet="ab", max_size=10))
def test_wildcard_matches_reference(pattern: str, text: str) -> None:
    """The linear matcher agrees with a dynamic-programming oracle."""
    assert wildcard_match(pattern, text) == _reference_glob(pattern, text)


def test_wildcard_is_fast_on_hostile_patterns() -> None:
    """A pattern built to make backtracking matchers explode finishes at once."""
    assert not wildcard_match("*a" * 200 + "b", "a" * 5000)
