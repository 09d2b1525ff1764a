"""Parsing key and identity policies: the grammar, the limits, and every malformed case."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkms.errors import LimitExceededException, MalformedPolicyDocumentException
from hsmkms.policy import (
    MAX_POLICY_BYTES,
    Effect,
    PolicyKind,
    default_key_policy,
    parse_identity_policy,
    parse_policy,
)

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"


def statement(**elements: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"AWS": ALICE},
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    base.update(elements)
    return {k: v for k, v in base.items() if v is not None}


def policy(*statements: dict[str, Any], **top: Any) -> str:
    document: dict[str, Any] = {"Version": "2012-10-17", "Statement": list(statements)}
    document.update(top)
    return json.dumps({k: v for k, v in document.items() if v is not None}, ensure_ascii=False)


def test_default_key_policy_is_awss_text() -> None:
    """The default policy is byte for byte what AWS GetKeyPolicy returns (reference §4.1)."""
    expected = (
        '{\n  "Version" : "2012-10-17",\n  "Id" : "key-default-1",\n  "Statement" : [ {\n'
        '    "Sid" : "Enable IAM User Permissions",\n    "Effect" : "Allow",\n'
        '    "Principal" : {\n      "AWS" : "arn:aws:iam::111122223333:root"\n    },\n'
        '    "Action" : "kms:*",\n    "Resource" : "*"\n  } ]\n}'
    )
    assert default_key_policy(ACCOUNT) == expected
    parsed = parse_policy(expected)
    assert parsed.id == "key-default-1"
    assert parsed.version == "2012-10-17"
    (only,) = parsed.statements
    assert only.sid == "Enable IAM User Permissions"
    assert only.effect is Effect.ALLOW
    assert only.principal is not None
    assert only.principal.aws == frozenset({ROOT})
    assert only.actions == ("kms:*",)
    assert only.resources == ("*",)


def test_default_key_policy_needs_an_account_id() -> None:
    """default_key_policy refuses anything but a 12-digit account id."""
    with pytest.raises(ValueError, match="12-digit"):
        default_key_policy("abc")


def test_statement_may_be_a_single_object() -> None:
    """Statement may be one object instead of a list."""
    text = json.dumps({"Version": "2012-10-17", "Statement": statement()})
    assert len(parse_policy(text).statements) == 1


def test_version_2008_and_missing_version_are_accepted() -> None:
    """Both policy language versions parse, and Version may be left out."""
    assert parse_policy(policy(statement(), Version="2008-10-17")).version == "2008-10-17"
    assert parse_policy(json.dumps({"Statement": [statement()]})).version is None


def test_principal_forms() -> None:
    """ "*", {"AWS": "*"}, account ids, root/user/role/assumed-role ARNs and Service all parse."""
    forms: list[Any] = [
        "*",
        {"AWS": "*"},
        {"AWS": ACCOUNT},
        {"AWS": [ROOT, ALICE, f"arn:aws:iam::{ACCOUNT}:role/path/to/Admin"]},
        {"AWS": f"arn:aws:sts::{ACCOUNT}:assumed-role/Admin/session-1"},
        {"Service": "ec2.amazonaws.com"},
        {"Service": ["ec2.amazonaws.com"], "AWS": ALICE},
        {"Federated": "cognito-identity.amazonaws.com"},
    ]
    for form in forms:
        parse_policy(policy(statement(Principal=form)))
    everyone = parse_policy(policy(statement(Principal={"AWS": "*"}))).statements[0].principal
    assert everyone is not None
    assert everyone.everyone
    by_id = parse_policy(policy(statement(Principal={"AWS": ACCOUNT}))).statements[0].principal
    assert by_id is not None
    assert by_id.aws == frozenset({ROOT})  # a bare account id is the account's root


def test_action_and_resource_forms() -> None:
    """Action and Resource take a string or a list; wildcards and any case are allowed."""
    parsed = parse_policy(
        policy(
            statement(
                Action=["kms:*", "KMS:decrypt", "kms:ReEncrypt*", "kms:Get?eyPolicy", "*"],
                Resource=["*", "arn:aws:kms:us-east-1:111122223333:key/*"],
            )
        )
    )
    assert parsed.statements[0].actions is not None
    assert len(parsed.statements[0].actions) == 5


def test_not_elements_parse() -> None:
    """NotAction, NotResource and (with Deny) NotPrincipal parse."""
    parsed = parse_policy(
        policy(
            statement(
                Effect="Deny",
                Principal=None,
                NotPrincipal={"AWS": [ALICE, ACCOUNT]},
                Action=None,
                NotAction="kms:Describe*",
                Resource=None,
                NotResource="arn:aws:kms:us-east-1:111122223333:key/other",
            )
        )
    )
    (only,) = parsed.statements
    assert only.not_principal is not None
    assert only.not_actions == ("kms:Describe*",)
    assert only.not_resources is not None


def test_statement_without_action_or_resource_parses() -> None:
    """AWS accepts statements missing Action or Resource (they never apply)."""
    parsed = parse_policy(policy(statement(Action=None), statement(Resource=None, Sid="b")))
    assert parsed.statements[0].actions is None
    assert parsed.statements[1].resources is None


def test_sid_with_spaces_and_policy_text_kept() -> None:
    """Sids may contain spaces in key policies; the original text is kept verbatim."""
    text = policy(statement(Sid="Allow use of the key"))
    parsed = parse_policy(text)
    assert parsed.statements[0].sid == "Allow use of the key"
    assert parsed.text == text
    assert parsed.kind is PolicyKind.KEY


def test_identity_policy() -> None:
    """Identity policies name no principal."""
    parsed = parse_identity_policy(policy(statement(Principal=None)))
    assert parsed.kind is PolicyKind.IDENTITY
    with pytest.raises(MalformedPolicyDocumentException, match="identity policy must not"):
        parse_identity_policy(policy(statement()))
    with pytest.raises(MalformedPolicyDocumentException, match="identity policy must not"):
        parse_identity_policy(policy(statement(Principal=None, NotPrincipal="*", Effect="Deny")))


def test_latin1_characters_are_allowed() -> None:
    """The PolicyType pattern admits U+0020-U+00FF, tab, LF and CR."""
    parse_policy(policy(statement(Sid="Schlüssel é\tñ")).replace(", ", ",\r\n"))


MALFORMED: list[tuple[str, str]] = [
    ("not json", "not valid JSON"),
    ("", "is empty"),
    ("[]", "must be a JSON object"),
    ('"text"', "must be a JSON object"),
    (json.dumps({"Version": "2012-10-17"}), "has no Statement"),
    (json.dumps({"Statement": []}), "non-empty list"),
    (json.dumps({"Statement": "x"}), "non-empty list"),
    (json.dumps({"Statement": [statement()], "Extra": 1}), "unknown top-level element 'Extra'"),
    (policy(statement(), Version="2020-01-01"), "Version must be one of"),
    (policy(statement(), Version=1), "Version must be one of"),
    (policy(statement(), Id=5), "Id must be a string"),
    (
        policy(statement(), "x"),  # type: ignore[arg-type]
        "Statement[1] must be a JSON object",
    ),
    (policy(statement(Bogus=1)), "Statement[0] has an unknown element 'Bogus'"),
    (policy(statement(Effect=None)), "Statement[0] has no Effect"),
    (
        policy(statement(), statement(Effect="Permit", Sid="2")),
        "Statement[1].Effect must be Allow or Deny",
    ),
    (policy(statement(Effect="allow")), "Statement[0].Effect must be Allow or Deny"),
    (policy(statement(Effect=["Allow"])), "Statement[0].Effect must be Allow or Deny"),
    (policy(statement(Sid=3)), "Statement[0].Sid must be a string"),
    (policy(statement(Sid="a"), statement(Sid="a")), "Statement[1].Sid 'a' is used by an earlier"),
    (policy(statement(NotAction="kms:Encrypt")), "both Action and NotAction"),
    (policy(statement(NotResource="*")), "both Resource and NotResource"),
    (policy(statement(NotPrincipal="*")), "both Principal and NotPrincipal"),
    (policy(statement(Principal=None)), "Statement[0] has no Principal"),
    (
        policy(statement(Principal=None, NotPrincipal={"AWS": ALICE})),
        "NotPrincipal may only be used",
    ),
    (policy(statement(Principal="alice")), "Statement[0].Principal must be"),
    (policy(statement(Principal={})), "must name at least one principal"),
    (policy(statement(Principal={"User": ALICE})), "unknown principal type 'User'"),
    (policy(statement(Principal={"AWS": []})), "must not be an empty list"),
    (policy(statement(Principal={"AWS": [1]})), "Principal.AWS must be a non-empty string"),
    (
        policy(statement(Principal={"AWS": "alice"})),
        "Principal.AWS 'alice' is not a valid principal",
    ),
    (policy(statement(Principal={"AWS": "11112222333"})), "is not a valid principal"),
    (policy(statement(Principal={"AWS": "arn:aws:iam::1111:root"})), "is not a valid principal"),
    (policy(statement(Principal={"AWS": f"arn:aws:iam::{ACCOUNT}:user/*"})), "no wildcards"),
    (
        policy(statement(Principal={"AWS": f"arn:aws:iam::{ACCOUNT}:group/g"})),
        "not a valid principal",
    ),
    (policy(statement(Principal={"AWS": f"arn:aws:s3::{ACCOUNT}:root"})), "not a valid principal"),
    (policy(statement(Action="Decrypt")), "Statement[0].Action 'Decrypt' is not an action"),
    (policy(statement(Action="kms:")), "is not an action"),
    (policy(statement(Action="kms:Decrypt Encrypt")), "is not an action"),
    (policy(statement(Action=[])), "Statement[0].Action must not be an empty list"),
    (policy(statement(Action=5)), "Statement[0].Action must be a non-empty string"),
    (policy(statement(Action="")), "Statement[0].Action must be a non-empty string"),
    (policy(statement(Action=None, NotAction=["kms:Sign", None])), "NotAction must be"),
    (policy(statement(Resource="key/1234")), "Statement[0].Resource 'key/1234' must be"),
    (policy(statement(Resource={"a": 1})), "Statement[0].Resource must be"),
    (policy(statement(Condition=[])), "Statement[0].Condition must be a JSON object"),
    (policy(statement(Condition={"StringEqualz": {"kms:A": "b"}})), "unknown condition operator"),
    (policy(statement(Condition={"Bool": {"aws:SecureTransport": "yes"}})), "true or false"),
    (
        '{"Version": "2012-10-17", "Version": "2008-10-17", "Statement": []}',
        "repeats the element 'Version'",
    ),
    (
        policy(statement()).replace('"Effect": "Allow"', '"Effect": "Allow", "Effect": "Deny"'),
        "repeats",
    ),
    ('{"Statement": NaN}', "NaN is not a JSON value"),
    ('{"Statement": [' * 2000 + "]" * 2000 + "}", "not valid JSON"),
    (policy(statement(Sid="snowman \u2603")), "character outside"),
    (policy(statement(Sid="bell X")).replace("X", "\x07"), "character outside"),
]


@pytest.mark.parametrize(("text", "fragment"), MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed(text: str, fragment: str) -> None:
    """Every malformed document raises MalformedPolicyDocumentException naming the problem."""
    with pytest.raises(MalformedPolicyDocumentException) as info:
        parse_policy(text)
    assert fragment in info.value.message


def test_escaped_characters_are_checked_after_decoding_only_by_json() -> None:
    """The character pattern applies to the document text: a JSON escape is plain ASCII."""
    parsed = parse_policy(policy(statement(Sid="snowman")).replace("snowman", "\\u2603"))
    assert parsed.statements[0].sid == "\u2603"


def test_size_limit() -> None:
    """32,768 bytes parse; 32,769 bytes raise LimitExceededException (reference §4.1)."""
    head = policy(statement(Sid=""))
    padding = MAX_POLICY_BYTES - len(head.encode())
    exact = head[:-1] + " " * padding + "}"
    assert len(exact.encode()) == MAX_POLICY_BYTES
    parse_policy(exact)
    over = head[:-1] + " " * (padding + 1) + "}"
    assert len(over.encode()) == MAX_POLICY_BYTES + 1
    with pytest.raises(LimitExceededException):
        parse_policy(over)


def test_size_is_counted_in_utf8_bytes() -> None:
    """Latin-1 characters count two bytes each toward the limit."""
    text = policy(statement(Sid="é" * (MAX_POLICY_BYTES // 2)))
    assert len(text) < MAX_POLICY_BYTES < len(text.encode())
    with pytest.raises(LimitExceededException):
        parse_policy(text)


# -- property: parse never raises anything but the two policy errors -------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["*", "Allow", "Deny", "kms:*", ROOT, ACCOUNT, "2012-10-17", "true"]),
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "Version",
                    "Statement",
                    "Effect",
                    "Principal",
                    "NotPrincipal",
                    "Action",
                    "NotAction",
                    "Resource",
                    "NotResource",
                    "Condition",
                    "Sid",
                    "Id",
                    "AWS",
                    "Service",
                    "StringEquals",
                    "ForAllValues:StringLike",
                    "Null",
                    "Bool",
                    "NumericLessThan",
                    "DateGreaterThan",
                    "IpAddress",
                    "kms:EncryptionContext:a",
                    "aws:SourceIp",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(document=_json)
def test_parse_raises_only_policy_errors_on_json(document: Any) -> None:
    """Arbitrary JSON-ish documents either parse or raise one of the two policy errors."""
    for parse in (parse_policy, parse_identity_policy):
        with contextlib.suppress(MalformedPolicyDocumentException, LimitExceededException):
            parse(json.dumps(document))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_parse_raises_only_policy_errors_on_text(text: str) -> None:
    """Arbitrary text either parses or raises one of the two policy errors."""
    with contextlib.suppress(MalformedPolicyDocumentException, LimitExceededException):
        parse_policy(text)


_operator_names = st.sampled_from(
    [
        *(
            f"{prefix}{base}{suffix}"
            for prefix in ("", "ForAnyValue:", "ForAllValues:")
            for base in ("StringLike", "NumericLessThan", "DateEquals", "Bool", "Null", "IpAddress")
            for suffix in ("", "IfExists")
        ),
        "BinaryEquals",
        "ArnLike",
        "Bogus",
    ]
)
_condition_values = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.sampled_from(["1e400", "99999999999999999999", "2026-13-45", "::1/200", "Infinity", "1_0"]),
)


@settings(max_examples=300, deadline=None)
@given(
    block=st.dictionaries(
        _operator_names,
        st.dictionaries(
            st.sampled_from(["kms:EncryptionContext:a", "aws:CurrentTime", "kms:X", "x"]),
            _condition_values,
            max_size=3,
        ),
        max_size=3,
    )
)
def test_parse_raises_only_policy_errors_on_conditions(block: dict[str, Any]) -> None:
    """Arbitrary Condition blocks either parse or raise MalformedPolicyDocumentException."""
    with contextlib.suppress(MalformedPolicyDocumentException):
        parse_policy(policy(statement(Condition=block)))


@pytest.mark.parametrize(
    "element",
    [
        {"Condition": {"StringEquals": {"kms:EncryptionContext:owner": "${aws:username}"}}},
        {"Condition": {"ArnLike": {"aws:PrincipalArn": "arn:aws:iam::*:user/${aws:username}"}}},
        {"Resource": "arn:aws:kms:us-east-1:111122223333:key/${aws:username}"},
    ],
)
def test_policy_variables_are_refused_in_2012_policies(element: dict[str, Any]) -> None:
    """Policy variables are not substituted, so a 2012-10-17 policy using one is refused
    rather than silently compared as literal text; under 2008-10-17 the text is literal."""
    with pytest.raises(MalformedPolicyDocumentException, match="does not substitute"):
        parse_policy(policy(statement(**element)))
    parse_policy(policy(statement(**element), Version="2008-10-17"))


def test_dollar_signs_without_braces_are_plain_text() -> None:
    """A '$' that is not a ${...} variable is ordinary text; numeric values are not checked."""
    parse_policy(policy(statement(Condition={"StringEquals": {"kms:EncryptionContext:a": "$5"}})))
    parse_policy(policy(statement(Condition={"StringEquals": {"kms:EncryptionContext:a": 5}})))
