"""Policy documents: the AWS policy grammar, parsed into frozen dataclasses.

Two kinds of document share the grammar (reference §4.1):

- a **key policy** (resource-based): every statement names a ``Principal`` (or, for Deny only,
  a ``NotPrincipal``); ``Resource: "*"`` means "this key";
- an **identity policy** (attached to an hsmkms credential, like an IAM user policy): no
  statement may name a principal — the policy applies to the identity it is attached to.

Everything that is not a well-formed policy raises MalformedPolicyDocumentException with a
message that names the offending element (``Statement[1].Effect must be Allow or Deny.``;
statements are numbered from 0 in the order written); a document over 32,768 bytes raises
LimitExceededException. A statement without Action/NotAction or without Resource/NotResource
is accepted and never applies, as AWS does.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from hsmkms.errors import LimitExceededException, MalformedPolicyDocumentException
from hsmkms.policy.conditions import (
    POLICY_VARIABLE,
    ConditionClause,
    parse_condition_block,
    unsupported_variable,
)

MAX_POLICY_BYTES = 32768
"""spec: a key policy is at most 32 KB (32,768 bytes), not adjustable (reference §4.1)."""

POLICY_VERSIONS = ("2012-10-17", "2008-10-17")

_POLICY_CHARACTERS = re.compile(r"[\u0009\u000A\u000D\u0020-\u00FF]+")
_TOP_LEVEL = frozenset({"Version", "Id", "Statement"})
_STATEMENT = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)
_PRINCIPAL_TYPES = frozenset({"AWS", "Service", "Federated", "CanonicalUser"})
_ACCOUNT_ID = re.compile(r"\d{12}")
_PARTITION = r"aws(?:-cn|-us-gov|-iso|-iso-b)?"
_NAME = r"[A-Za-z0-9+=,.@_\-]+"
_PATH = rf"(?:/{_NAME})*/"
_PRINCIPAL_ARN = re.compile(
    rf"arn:{_PARTITION}:(?:"
    rf"iam::\d{{12}}:(?:root|user{_PATH}{_NAME}|role{_PATH}{_NAME})"
    rf"|sts::\d{{12}}:(?:assumed-role/{_NAME}/{_NAME}|federated-user/{_NAME})"
    r")",
    re.ASCII,
)
_ACTION = re.compile(r"\*|[A-Za-z0-9*?\-]+:[A-Za-z0-9*?]+", re.ASCII)


class Effect(enum.Enum):
    """A statement's Effect."""

    ALLOW = "Allow"
    DENY = "Deny"


class PolicyKind(enum.Enum):
    """Where a policy is attached, which decides whether statements name principals."""

    KEY = "key"
    IDENTITY = "identity"


def root_arn(account_id: str) -> str:
    """The ARN of an account's root principal: ``arn:aws:iam::<account>:root``."""
    return f"arn:aws:iam::{account_id}:root"


def account_of(arn: str) -> str:
    """The account field of an ARN (empty when the ARN has none)."""
    parts = arn.split(":", 5)
    return parts[4] if len(parts) == 6 else ""


@dataclass(frozen=True)
class Principals:
    """A Principal or NotPrincipal element.

    ``aws`` holds ARNs; bare account ids are stored as the account's root ARN. ``services``
    and ``others`` (Federated, CanonicalUser) are kept but never match an hsmkms principal.
    """

    everyone: bool = False
    aws: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()
    others: frozenset[str] = frozenset()

    def names(self, principal_arn: str) -> bool:
        """True when this element names ``principal_arn`` itself (or is ``*``)."""
        return self.everyone or principal_arn in self.aws

    def names_account(self, account_id: str) -> bool:
        """True when this element names the account (its root ARN or its bare id)."""
        return root_arn(account_id) in self.aws


@dataclass(frozen=True)
class Statement:
    """One statement. ``None`` means the element is absent."""

    index: int
    effect: Effect
    sid: str | None = None
    principal: Principals | None = None
    not_principal: Principals | None = None
    actions: tuple[str, ...] | None = None
    not_actions: tuple[str, ...] | None = None
    resources: tuple[str, ...] | None = None
    not_resources: tuple[str, ...] | None = None
    conditions: tuple[ConditionClause, ...] = ()


@dataclass(frozen=True)
class PolicyDocument:
    """A parsed policy. ``text`` is the document exactly as given."""

    kind: PolicyKind
    statements: tuple[Statement, ...]
    version: str | None = None
    id: str | None = None
    text: str = ""


def _malformed(message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(message)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Two parsers would read a duplicated element differently; refuse it outright.
            raise _malformed(f"The policy repeats the element {key!r} in one JSON object.")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _malformed(f"The policy is not valid JSON: {name} is not a JSON value.")


def _load(text: str) -> Any:
    if not isinstance(text, str):
        raise _malformed("The policy must be a JSON string.")
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise LimitExceededException(
            f"The policy is {len(text.encode('utf-8'))} bytes; the maximum is "
            f"{MAX_POLICY_BYTES} bytes."
        )
    if not _POLICY_CHARACTERS.fullmatch(text):
        raise _malformed(
            "The policy contains a character outside tab, LF, CR and U+0020-U+00FF, or is empty."
        )
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except MalformedPolicyDocumentException:
        raise
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"The policy is not valid JSON: {exc}.") from None


def _string_list(value: object, path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values and not allow_empty:
        raise _malformed(f"{path} must not be an empty list.")
    for item in values:
        if not isinstance(item, str) or not item:
            raise _malformed(f"{path} must be a non-empty string or a list of them.")
    return tuple(values)


def _parse_principals(value: object, path: str) -> Principals:
    if value == "*":
        return Principals(everyone=True)
    if not isinstance(value, dict):
        raise _malformed(f'{path} must be "*" or an object such as {{"AWS": ...}}.')
    if not value:
        raise _malformed(f"{path} must name at least one principal.")
    everyone = False
    aws: set[str] = set()
    services: set[str] = set()
    others: set[str] = set()
    for principal_type, entries in value.items():
        if principal_type not in _PRINCIPAL_TYPES:
            raise _malformed(f"{path} has an unknown principal type {principal_type!r}.")
        names = _string_list(entries, f"{path}.{principal_type}")
        for name in names:
            if principal_type == "AWS":
                if name == "*":
                    everyone = True
                elif _ACCOUNT_ID.fullmatch(name):
                    aws.add(root_arn(name))
                elif _PRINCIPAL_ARN.fullmatch(name):
                    aws.add(name)
                else:
                    raise _malformed(
                        f'{path}.AWS {name!r} is not a valid principal: use "*", a 12-digit '
                        "account id, or an arn:aws:iam::<account>:root|user/...|role/... ARN "
                        "(no wildcards)."
                    )
            elif principal_type == "Service":
                services.add(name)
            else:
                others.add(f"{principal_type}:{name}")
    return Principals(
        everyone=everyone,
        aws=frozenset(aws),
        services=frozenset(services),
        others=frozenset(others),
    )


def _parse_actions(value: object, path: str) -> tuple[str, ...]:
    actions = _string_list(value, path)
    for action in actions:
        if not _ACTION.fullmatch(action):
            raise _malformed(
                f'{path} {action!r} is not an action: use "*" or <service>:<action>, '
                "for example kms:Decrypt or kms:ReEncrypt*."
            )
    return actions


def _parse_resources(value: object, path: str, variables: bool) -> tuple[str, ...]:
    resources = _string_list(value, path)
    for resource in resources:
        if resource != "*" and not resource.startswith("arn:"):
            raise _malformed(f'{path} {resource!r} must be "*" or an ARN.')
        if variables and POLICY_VARIABLE.search(resource):
            raise _malformed(unsupported_variable(path, resource))
    return resources


def _parse_statement(raw: object, index: int, kind: PolicyKind, variables: bool) -> Statement:
    path = f"Statement[{index}]"
    if not isinstance(raw, dict):
        raise _malformed(f"{path} must be a JSON object.")
    unknown = sorted(set(raw) - _STATEMENT)
    if unknown:
        raise _malformed(f"{path} has an unknown element {unknown[0]!r}.")
    for first, second in (
        ("Principal", "NotPrincipal"),
        ("Action", "NotAction"),
        ("Resource", "NotResource"),
    ):
        if first in raw and second in raw:
            raise _malformed(f"{path} must not have both {first} and {second}.")

    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise _malformed(f"{path}.Sid must be a string.")
    if "Effect" not in raw:
        raise _malformed(f"{path} has no Effect.")
    try:
        effect = Effect(raw["Effect"])
    except (ValueError, TypeError):
        raise _malformed(f"{path}.Effect must be Allow or Deny.") from None

    principal = not_principal = None
    if kind is PolicyKind.IDENTITY:
        for element in ("Principal", "NotPrincipal"):
            if element in raw:
                raise _malformed(f"{path} has a {element}; an identity policy must not name one.")
    else:
        if "Principal" in raw:
            principal = _parse_principals(raw["Principal"], f"{path}.Principal")
        elif "NotPrincipal" in raw:
            if effect is not Effect.DENY:
                raise _malformed(f'{path}.NotPrincipal may only be used with "Effect": "Deny".')
            not_principal = _parse_principals(raw["NotPrincipal"], f"{path}.NotPrincipal")
        else:
            raise _malformed(f"{path} has no Principal; a key policy statement must name one.")

    def optional(element: str, parse: Any) -> tuple[str, ...] | None:
        return parse(raw[element], f"{path}.{element}") if element in raw else None

    def resources(value: object, where: str) -> tuple[str, ...]:
        return _parse_resources(value, where, variables)

    conditions: tuple[ConditionClause, ...] = ()
    if "Condition" in raw:
        conditions = parse_condition_block(
            raw["Condition"], f"{path}.Condition", variables=variables
        )
    return Statement(
        index=index,
        effect=effect,
        sid=sid,
        principal=principal,
        not_principal=not_principal,
        actions=optional("Action", _parse_actions),
        not_actions=optional("NotAction", _parse_actions),
        resources=optional("Resource", resources),
        not_resources=optional("NotResource", resources),
        conditions=conditions,
    )


def _parse(text: str, kind: PolicyKind) -> PolicyDocument:
    document = _load(text)
    if not isinstance(document, dict):
        raise _malformed("The policy must be a JSON object.")
    unknown = sorted(set(document) - _TOP_LEVEL)
    if unknown:
        raise _malformed(f"The policy has an unknown top-level element {unknown[0]!r}.")
    version = document.get("Version")
    if version is not None and version not in POLICY_VERSIONS:
        raise _malformed(f"Version must be one of {', '.join(POLICY_VERSIONS)}; got {version!r}.")
    policy_id = document.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        raise _malformed("Id must be a string.")
    if "Statement" not in document:
        raise _malformed("The policy has no Statement.")
    raw_statements = document["Statement"]
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        raise _malformed("Statement must be an object or a non-empty list of objects.")
    statements = tuple(
        # spec: IAM substitutes policy variables only under Version 2012-10-17.
        _parse_statement(raw, index, kind, version == "2012-10-17")
        for index, raw in enumerate(raw_statements)
    )
    seen: set[str] = set()
    for statement in statements:
        if statement.sid is not None and statement.sid != "":
            if statement.sid in seen:
                raise _malformed(
                    f"Statement[{statement.index}].Sid {statement.sid!r} is used by an earlier "
                    "statement; statement ids must be unique."
                )
            seen.add(statement.sid)
    return PolicyDocument(
        kind=kind, statements=statements, version=version, id=policy_id, text=text
    )


def parse_policy(text: str) -> PolicyDocument:
    """Parse a key policy (resource-based: each statement names a Principal).

    Raises LimitExceededException over 32,768 bytes and MalformedPolicyDocumentException for
    anything else that is not a valid policy; never any other exception.
    """
    return _parse(text, PolicyKind.KEY)


def parse_identity_policy(text: str) -> PolicyDocument:
    """Parse an identity policy (attached to a credential; statements name no principal)."""
    return _parse(text, PolicyKind.IDENTITY)


def default_key_policy(account_id: str) -> str:
    """The default key policy of a key created through the API, byte for byte as AWS returns
    it from GetKeyPolicy (reference §4.1): the account root may do ``kms:*``, which delegates
    the decision to the account's identity policies."""
    if not _ACCOUNT_ID.fullmatch(account_id):
        raise ValueError(f"not a 12-digit account id: {account_id!r}")
    return (
        "{\n"
        '  "Version" : "2012-10-17",\n'
        '  "Id" : "key-default-1",\n'
        '  "Statement" : [ {\n'
        '    "Sid" : "Enable IAM User Permissions",\n'
        '    "Effect" : "Allow",\n'
        '    "Principal" : {\n'
        f'      "AWS" : "arn:aws:iam::{account_id}:root"\n'
        "    },\n"
        '    "Action" : "kms:*",\n'
        '    "Resource" : "*"\n'
        "  } ]\n"
        "}"
    )
