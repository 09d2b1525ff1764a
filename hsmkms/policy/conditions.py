"""Condition operators: parsing a ``Condition`` block and deciding it against a request.

Semantics (IAM "condition operators" and "multiple context keys or values", reference §4.2):

- Operators in a block are AND'ed; keys under one operator are AND'ed; the values given for one
  key are OR'ed, and for a negated operator (``StringNotEquals``, ``NotIpAddress``,
  ``ArnNotLike``…) NOR'ed: true only when the request value matches none of them.
- A key missing from the request makes a positive operator false and a negated one true;
  ``…IfExists`` makes any missing key true; ``Null`` tests presence itself
  (``"true"`` = the key is absent).
- ``ForAllValues:`` is true when every request value matches (vacuously true for a missing or
  empty key); ``ForAnyValue:`` when at least one does (false for a missing or empty key, with
  or without ``IfExists``). Without a set qualifier a multi-valued request key matches when any
  of its values matches.
- A key present but :data:`~hsmkms.policy.context.UNEVALUABLE` (``kms:ResourceAliases`` on a
  key over the aliases quota) makes every clause reading it false, whatever the operator.
- Policy values are checked at parse time: a number that is not a number, a date that is not a
  date, a ``Bool`` that is not true/false, bad base64 or CIDR is a malformed policy.
- Policy variables (``${aws:username}``) are not substituted: under Version 2012-10-17 a
  String/ARN value using one is refused at parse time; under 2008-10-17 it is literal text.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from hsmkms.errors import MalformedPolicyDocumentException
from hsmkms.policy.context import ConditionContext, ContextValue, Unevaluable
from hsmkms.policy.wildcard import wildcard_match


class SetQualifier(enum.Enum):
    """The ``ForAnyValue:`` / ``ForAllValues:`` prefix of a condition operator."""

    FOR_ANY_VALUE = "ForAnyValue"
    FOR_ALL_VALUES = "ForAllValues"


class _Kind(enum.Enum):
    STRING = "string"
    NUMERIC = "numeric"
    DATE = "date"
    BOOL = "bool"
    BINARY = "binary"
    IP = "ip"
    ARN = "arn"
    NULL = "null"


@dataclass(frozen=True)
class _Operator:
    kind: _Kind
    negated: bool
    compare: Callable[[Any, Any], bool]  # (request value, policy value) -> matched


def _arn_match(pattern: str, value: str) -> bool:
    # spec: IAM ArnEquals/ArnLike — each of the six colon-delimited components is matched
    # separately, case-sensitively, with * and ? wildcards that cannot span components.
    pattern_parts = pattern.split(":", 5)
    value_parts = value.split(":", 5)
    if len(pattern_parts) != 6 or len(value_parts) != 6:
        return False
    return all(wildcard_match(p, v) for p, v in zip(pattern_parts, value_parts, strict=True))


def _in_network(address: Any, network: Any) -> bool:
    return bool(address.version == network.version and address in network)


def _eq(a: Any, b: Any) -> bool:
    return bool(a == b)


def _lt(a: Any, b: Any) -> bool:
    return bool(a < b)


def _le(a: Any, b: Any) -> bool:
    return bool(a <= b)


def _gt(a: Any, b: Any) -> bool:
    return bool(a > b)


def _ge(a: Any, b: Any) -> bool:
    return bool(a >= b)


def _ieq(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def _like(value: str, pattern: str) -> bool:
    return wildcard_match(pattern, value)


def _arn(value: str, pattern: str) -> bool:
    return _arn_match(pattern, value)


def _ordered(kind: _Kind, prefix: str) -> dict[str, _Operator]:
    return {
        f"{prefix}Equals": _Operator(kind, False, _eq),
        f"{prefix}NotEquals": _Operator(kind, True, _eq),
        f"{prefix}LessThan": _Operator(kind, False, _lt),
        f"{prefix}LessThanEquals": _Operator(kind, False, _le),
        f"{prefix}GreaterThan": _Operator(kind, False, _gt),
        f"{prefix}GreaterThanEquals": _Operator(kind, False, _ge),
    }


_OPERATORS: dict[str, _Operator] = {
    "StringEquals": _Operator(_Kind.STRING, False, _eq),
    "StringNotEquals": _Operator(_Kind.STRING, True, _eq),
    "StringEqualsIgnoreCase": _Operator(_Kind.STRING, False, _ieq),
    "StringNotEqualsIgnoreCase": _Operator(_Kind.STRING, True, _ieq),
    "StringLike": _Operator(_Kind.STRING, False, _like),
    "StringNotLike": _Operator(_Kind.STRING, True, _like),
    **_ordered(_Kind.NUMERIC, "Numeric"),
    **_ordered(_Kind.DATE, "Date"),
    "Bool": _Operator(_Kind.BOOL, False, _eq),
    "BinaryEquals": _Operator(_Kind.BINARY, False, _eq),
    "IpAddress": _Operator(_Kind.IP, False, _in_network),
    "NotIpAddress": _Operator(_Kind.IP, True, _in_network),
    "ArnEquals": _Operator(_Kind.ARN, False, _arn),
    "ArnLike": _Operator(_Kind.ARN, False, _arn),
    "ArnNotEquals": _Operator(_Kind.ARN, True, _arn),
    "ArnNotLike": _Operator(_Kind.ARN, True, _arn),
    "Null": _Operator(_Kind.NULL, False, _eq),
}

BASE_OPERATORS: tuple[str, ...] = tuple(sorted(_OPERATORS))
"""Every base condition operator name this engine knows (without prefix or suffix)."""

# spec: KMS rejects ForAllValues with kms:EncryptionContext:* and aws:RequestTag/* as an
# "OverlyPermissiveCondition" (reference §4.2, DG:conditions-kms).
_OVERLY_PERMISSIVE_PREFIXES = ("kms:encryptioncontext:", "aws:requesttag/")

_EPOCH = re.compile(r"-?\d+(\.\d+)?")

POLICY_VARIABLE = re.compile(r"\$\{[^}]*\}")
"""A policy variable such as ``${aws:username}`` (substituted by AWS in 2012-10-17 policies)."""


def unsupported_variable(path: str, value: str) -> str:
    """The message refusing a policy variable hsmkms does not substitute."""
    variable = POLICY_VARIABLE.search(value)
    name = variable.group(0) if variable else value
    return (
        f"{path} value {value!r} uses the policy variable {name}; hsmkms does not substitute "
        "policy variables. Write the value out, or use Version 2008-10-17 to compare the text "
        "literally."
    )


# -- value conversion -------------------------------------------------------------------------


def _to_string(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dt.datetime):
        return _aware(value).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


def _to_decimal(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _to_datetime(value: object) -> dt.datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, dt.datetime):
        return _aware(value)
    if isinstance(value, int | float):
        return _from_epoch(value)
    if isinstance(value, str):
        text = value.strip()
        if _EPOCH.fullmatch(text):
            return _from_epoch(float(text))
        try:
            return _aware(dt.datetime.fromisoformat(text))
        except ValueError:
            return None
    return None


def _from_epoch(seconds: float) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _to_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _to_bytes(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _to_address(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A request's address. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, how a server
    listening on ``::`` sees IPv4 clients) is its IPv4 address, so IPv4 conditions apply to it
    (the server passes addresses normalized already; this holds for any other caller)."""
    if not isinstance(value, str):
        return None
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _to_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return None


_REQUEST_COERCE: dict[_Kind, Callable[[object], object | None]] = {
    _Kind.STRING: _to_string,
    _Kind.ARN: _to_string,
    _Kind.NUMERIC: _to_decimal,
    _Kind.DATE: _to_datetime,
    _Kind.BOOL: _to_bool,
    _Kind.BINARY: _to_bytes,
    _Kind.IP: _to_address,
}

_POLICY_PARSE: dict[_Kind, tuple[Callable[[object], object | None], str]] = {
    _Kind.STRING: (_to_string, "a string"),
    _Kind.ARN: (_to_string, "a string"),
    _Kind.NUMERIC: (_to_decimal, "a number"),
    _Kind.DATE: (_to_datetime, "an ISO 8601 date or epoch seconds"),
    _Kind.BOOL: (_to_bool, "true or false"),
    _Kind.NULL: (_to_bool, "true or false"),
    _Kind.BINARY: (_to_bytes, "base64"),
    _Kind.IP: (_to_network, "an IPv4 or IPv6 address or CIDR block"),
}


# -- the parsed form --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionClause:
    """One ``operator: {key: values}`` test of a statement's Condition block."""

    operator: str
    """The operator as written, for example ``ForAnyValue:StringLikeIfExists``."""
    base: str
    """The base operator, for example ``StringLike``."""
    qualifier: SetQualifier | None
    if_exists: bool
    key: str
    """The condition key as written (matched case-insensitively)."""
    values: tuple[Any, ...]
    """Policy values, converted to the operator's type (str, Decimal, datetime, bool, ...)."""

    def matches(self, context: Mapping[str, ContextValue]) -> bool:
        """Decide this clause against a request context (keys looked up case-insensitively)."""
        raw = _lookup(context, self.key)
        if isinstance(raw, Unevaluable):
            return False  # spec: §4.3 — e.g. kms:ResourceAliases beyond the aliases quota
        request_values: tuple[object, ...]
        if raw is None:
            request_values = ()
        elif isinstance(raw, tuple | list):
            request_values = tuple(raw)
        else:
            request_values = (raw,)
        operator = _OPERATORS[self.base]
        if operator.kind is _Kind.NULL:
            # spec: Null "true" = the key is absent (an empty multi-valued key counts as absent).
            absent = not request_values
            return any(value == absent for value in self.values)
        if self.qualifier is SetQualifier.FOR_ALL_VALUES:
            return all(self._each(value) for value in request_values)
        if self.qualifier is SetQualifier.FOR_ANY_VALUE:
            return any(self._each(value) for value in request_values)
        if not request_values:
            return self.if_exists or operator.negated
        hit = any(self._hit(value) for value in request_values)
        return not hit if operator.negated else hit

    def _hit(self, request_value: object) -> bool:
        operator = _OPERATORS[self.base]
        converted = _REQUEST_COERCE[operator.kind](request_value)
        if converted is None:
            return False
        return any(operator.compare(converted, policy_value) for policy_value in self.values)

    def _each(self, request_value: object) -> bool:
        hit = self._hit(request_value)
        return not hit if _OPERATORS[self.base].negated else hit


def _lookup(context: Mapping[str, ContextValue], key: str) -> object | None:
    try:
        return context[key]
    except KeyError:
        if isinstance(context, ConditionContext):
            # Case-insensitive already; scanning it would load its lazy keys (tags, aliases).
            return None
    folded = key.lower()
    for name, value in context.items():
        if name.lower() == folded:
            return value
    return None


# -- parsing ----------------------------------------------------------------------------------


def _malformed(message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(message)


def split_operator(name: str) -> tuple[SetQualifier | None, str, bool] | None:
    """Split ``ForAnyValue:StringLikeIfExists`` into its parts; None when not an operator."""
    qualifier: SetQualifier | None = None
    rest = name
    if ":" in name:
        prefix, rest = name.split(":", 1)
        try:
            qualifier = SetQualifier(prefix)
        except ValueError:
            return None
    if_exists = rest.endswith("IfExists") and rest != "IfExists"
    base = rest[: -len("IfExists")] if if_exists else rest
    if base not in _OPERATORS:
        return None
    if base == "Null" and (if_exists or qualifier is not None):
        return None  # spec: IfExists applies to every operator except Null
    return qualifier, base, if_exists


def _scalar(value: object) -> bool:
    return isinstance(value, str | bool | int | float)


def parse_condition_block(
    block: object, where: str, *, variables: bool = False
) -> tuple[ConditionClause, ...]:
    """Parse a statement's Condition element; raise MalformedPolicyDocumentException naming
    the offending operator, key or value (``where`` is the statement's path, for messages).

    ``variables`` says the policy language version has policy variables (2012-10-17): a
    String/ARN value using one is then refused, since this engine does not substitute them and
    comparing the text literally would silently change what the statement means.
    """
    if not isinstance(block, dict):
        raise _malformed(f"{where} must be a JSON object of condition operators.")
    clauses: list[ConditionClause] = []
    for operator_name, keys in block.items():
        parts = split_operator(operator_name)
        if parts is None:
            raise _malformed(f"{where} uses an unknown condition operator {operator_name!r}.")
        qualifier, base, if_exists = parts
        path = f"{where}.{operator_name}"
        if not isinstance(keys, dict) or not keys:
            raise _malformed(f"{path} must be a non-empty JSON object of condition keys.")
        kind = _OPERATORS[base].kind
        convert, expected = _POLICY_PARSE[kind]
        for key, raw in keys.items():
            if not _valid_key(key):
                raise _malformed(
                    f"{path} has an invalid condition key {key!r}: it must be <service>:<name>."
                )
            if qualifier is SetQualifier.FOR_ALL_VALUES and key.lower().startswith(
                _OVERLY_PERMISSIVE_PREFIXES
            ):
                raise _malformed(
                    f"{path} is an OverlyPermissiveCondition: ForAllValues with {key} also "
                    "matches requests that lack the key; use ForAnyValue, or "
                    "ForAllValues with kms:EncryptionContextKeys or aws:TagKeys."
                )
            raw_values = raw if isinstance(raw, list) else [raw]
            if not raw_values:
                raise _malformed(f"{path}.{key} must have at least one value.")
            values: list[Any] = []
            for value in raw_values:
                if (
                    variables
                    and kind in (_Kind.STRING, _Kind.ARN)
                    and isinstance(value, str)
                    and POLICY_VARIABLE.search(value)
                ):
                    raise _malformed(unsupported_variable(f"{path}.{key}", value))
                converted = convert(value) if _scalar(value) else None
                if converted is None:
                    raise _malformed(
                        f"{path}.{key} value {value!r} is not valid: {base} needs {expected}."
                    )
                values.append(converted)
            clauses.append(
                ConditionClause(
                    operator=operator_name,
                    base=base,
                    qualifier=qualifier,
                    if_exists=if_exists,
                    key=key,
                    values=tuple(values),
                )
            )
    return tuple(clauses)


_KEY = re.compile(r"[A-Za-z0-9-]+:\S.*", re.DOTALL)


def _valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))


def conditions_hold(
    clauses: tuple[ConditionClause, ...], context: Mapping[str, ContextValue]
) -> bool:
    """True when every clause holds (clauses are AND'ed; an empty block always holds)."""
    return all(clause.matches(context) for clause in clauses)
