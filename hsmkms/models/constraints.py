"""AWS member constraints declared on the models, and the validator that enforces them.

Constraints ride in ``Annotated`` metadata (``KeyId: Annotated[str, Length(1, 2048)]``), where
pydantic ignores them; :func:`validate_request` walks a model and raises one
:class:`~hsmkms.errors.ValidationException` worded like AWS::

    1 validation error detected: Value '1025' at 'numberOfBytes' failed to satisfy constraint:
    Member must have value less than or equal to 1024

Blob values are never echoed (AWS says ``Value at 'plaintext'``), so no secret reaches a message.
Several failures are joined with ``; `` under ``N validation errors detected:``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from hsmkms.errors import ValidationException


@dataclasses.dataclass(frozen=True)
class Length:
    """Length bounds: characters of a string, bytes of a blob, items of a list or map."""

    min: int | None = None
    max: int | None = None


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of an integer member."""

    min: int | None = None
    max: int | None = None


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A regular expression the whole string must match (AWS model ``pattern``)."""

    regex: str

    def matches(self, value: str) -> bool:
        return re.fullmatch(self.regex, value) is not None


@dataclasses.dataclass(frozen=True)
class EncryptionContextRules:
    """The rules of an encryption context (a map of strings to strings).

    * No two keys may differ only in case: condition key names are case-insensitive
      (``kms:EncryptionContext:tenant`` names ``Tenant`` too), so a context holding ``tenant``
      and ``Tenant`` would give a policy two values for one condition key.
    * Its canonical encoding (:func:`hsmkms.ciphertext.encode_encryption_context`: 2 bytes, then
      per pair 4 bytes and the UTF-8 bytes of the key and the value) is at most ``max_bytes``.
    """

    max_bytes: int

    def problems(self, path: str, value: Any) -> list[str]:
        """The AWS validation clauses ``value`` fails (none when it passes). The context itself
        is never echoed (it may be large); a colliding key is, cut to 64 characters."""
        if not isinstance(value, dict):
            return []
        out: list[str] = []
        size = 2
        seen: dict[str, str] = {}
        collision: tuple[str, str] | None = None
        for key, item in value.items():
            size += 4 + _utf8_length(key) + _utf8_length(item)
            # The fold the policy engine uses for condition key names (hsmkms.policy.context).
            folded = key.lower() if isinstance(key, str) else key
            first = seen.setdefault(folded, key)
            if first is not key and collision is None:
                collision = (first, key)
        if collision is not None:
            a, b = (_clip(k) for k in collision)
            out.append(
                f"Value at '{path}' failed to satisfy constraint: Member must not have keys "
                f"that differ only in case ('{a}' and '{b}')"
            )
        if size > self.max_bytes:
            out.append(
                f"Value at '{path}' failed to satisfy constraint: Member must have an encoded "
                f"length less than or equal to {self.max_bytes} bytes"
            )
        return out


def _utf8_length(text: Any) -> int:
    if not isinstance(text, str):
        return 0
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


_MAX_ECHO = 1024  # the longest value a validation message repeats


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_CONSTRAINTS = (Length, Range, Pattern, EncryptionContextRules)


def member_path(name: str) -> str:
    """The AWS path of a member: its name in lowerCamelCase (``NumberOfBytes`` ->
    ``numberOfBytes``)."""
    return name[:1].lower() + name[1:]


def _show(value: Any) -> str | None:
    """The value as AWS echoes it, or ``None`` for blobs (never echoed)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        shown = "[" + ", ".join(str(v) for v in value) + "]"
    else:
        shown = str(value)
    # A request may carry a megabyte in one member: the message (and the audit record that
    # repeats it) gets its beginning only.
    return _clip(shown, _MAX_ECHO)


def constraint_error(path: str, value: Any, constraint: str) -> str:
    """One AWS validation clause: ``Value 'x' at 'path' failed to satisfy constraint: ...``."""
    shown = _show(value)
    head = "Value" if shown is None else f"Value '{shown}'"
    return f"{head} at '{path}' failed to satisfy constraint: {constraint}"


def validation_exception(clauses: Sequence[str]) -> ValidationException:
    """The ValidationException carrying ``clauses`` in AWS's wording."""
    n = len(clauses)
    noun = "error" if n == 1 else "errors"
    return ValidationException(f"{n} validation {noun} detected: " + "; ".join(clauses))


def _check(path: str, value: Any, metadata: Sequence[Any], out: list[str]) -> None:
    for item in metadata:
        if isinstance(item, Length):
            size = len(value)
            if item.min is not None and size < item.min:
                out.append(
                    constraint_error(
                        path, value, f"Member must have length greater than or equal to {item.min}"
                    )
                )
            elif item.max is not None and size > item.max:
                out.append(
                    constraint_error(
                        path, value, f"Member must have length less than or equal to {item.max}"
                    )
                )
        elif isinstance(item, Range):
            if item.min is not None and value < item.min:
                out.append(
                    constraint_error(
                        path, value, f"Member must have value greater than or equal to {item.min}"
                    )
                )
            elif item.max is not None and value > item.max:
                out.append(
                    constraint_error(
                        path, value, f"Member must have value less than or equal to {item.max}"
                    )
                )
        elif isinstance(item, EncryptionContextRules):
            out.extend(item.problems(path, value))
        elif isinstance(item, Pattern) and isinstance(value, str) and not item.matches(value):
            out.append(
                constraint_error(
                    path, value, f"Member must satisfy regular expression pattern: {item.regex}"
                )
            )


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _split_annotated(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(annotation) is typing.Annotated:
        args = typing.get_args(annotation)
        return _strip_optional(args[0]), tuple(args[1:])
    return annotation, ()


@dataclasses.dataclass(frozen=True)
class _MemberPlan:
    """What to check on one member, worked out once per model class."""

    name: str
    path: str
    metadata: tuple[Any, ...]
    is_list: bool
    element_metadata: tuple[Any, ...]
    value_type: Any
    """The member's type, without ``| None`` and ``Annotated`` (a list's element type for a
    list): what tells the fast path whether the walk may descend into a model."""


@functools.cache
def _plan(model_type: type[BaseModel]) -> tuple[_MemberPlan, ...]:
    plans = []
    for name, field in model_type.model_fields.items():
        # ``X | None`` around an ``Annotated`` alias keeps the metadata inside the union.
        annotation, inner_meta = _split_annotated(_strip_optional(field.annotation))
        is_list = typing.get_origin(annotation) is list
        element_meta: tuple[Any, ...] = ()
        value_type = annotation
        if is_list:
            value_type, element_meta = _split_annotated(typing.get_args(annotation)[0])
        plans.append(
            _MemberPlan(
                name,
                member_path(name),
                tuple(m for m in (*field.metadata, *inner_meta) if isinstance(m, _CONSTRAINTS)),
                is_list,
                element_meta,
                value_type,
            )
        )
    return tuple(plans)


def _walk(model: BaseModel, prefix: str, out: list[str]) -> None:
    for plan in _plan(type(model)):
        value = getattr(model, plan.name)
        if value is None:
            continue
        path = prefix + plan.path
        if plan.metadata:
            _check(path, value, plan.metadata, out)
        if plan.is_list and isinstance(value, list):
            for index, item in enumerate(value, start=1):
                item_path = f"{path}.{index}.member"
                if plan.element_metadata:
                    _check(item_path, item, plan.element_metadata, out)
                if isinstance(item, BaseModel):
                    _walk(item, item_path + ".", out)
        elif isinstance(value, BaseModel):
            _walk(value, path + ".", out)


# -- the fast path ------------------------------------------------------------------------------
# Nearly every request passes. A predicate per model class, made once from the same plan, says
# so in under half the walk's time; only a request it does not vouch for is walked (which
# words the clauses, or finds none). A predicate may say False where the walk finds nothing; it
# must never say True where the walk finds something (tests/test_validation_fast_path.py).

Check = typing.Callable[[Any], bool]


def _bounds(item: Length | Range) -> tuple[float, float]:
    return (
        -math.inf if item.min is None else item.min,
        math.inf if item.max is None else item.max,
    )


def _context_check(rules: EncryptionContextRules) -> Check:
    limit = rules.max_bytes

    def ok(value: Any) -> bool:
        if type(value) is not dict:
            return False
        size = 2
        folded = set()
        for key, item in value.items():
            if type(key) is not str or type(item) is not str:
                return False
            if not (key.isascii() and item.isascii()):
                return False  # the walk counts UTF-8 bytes
            size += 4 + len(key) + len(item)
            folded.add(key.lower())
        return size <= limit and len(folded) == len(value)

    return ok


def _item_check(item: Any) -> Check:
    if isinstance(item, Length):
        low, high = _bounds(item)
        return lambda value: low <= len(value) <= high
    if isinstance(item, Range):
        low, high = _bounds(item)
        return lambda value: low <= value <= high
    if isinstance(item, Pattern):
        fullmatch = re.compile(item.regex).fullmatch
        return lambda value: not isinstance(value, str) or fullmatch(value) is not None
    assert isinstance(item, EncryptionContextRules)
    return _context_check(item)


def _all(checks: Sequence[Check]) -> Check:
    if len(checks) == 1:
        return checks[0]
    return lambda value: all(check(value) for check in checks)


def _may_hold_model(annotation: Any) -> bool:
    """Whether a member of this type can hold a model (which the walk descends into). Unsure
    (``Any``, a union, a parameter) counts as yes."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return issubclass(annotation, BaseModel)
    # The walk looks into a list's items only, and only for the list's plan.
    return typing.get_origin(annotation) not in (list, dict, set, frozenset, tuple)


def _member_check(plan: _MemberPlan) -> Check | None:
    """What the walk checks on a member's non-None value, as one predicate; None when it
    checks nothing."""
    checks = [_item_check(item) for item in plan.metadata]
    if plan.is_list:
        element = [_item_check(item) for item in plan.element_metadata]
        if _may_hold_model(plan.value_type):
            element.append(_models_pass)
        if element:
            each = _all(element)

            def elements(value: Any) -> bool:
                return not isinstance(value, list) or all(each(item) for item in value)

            checks.append(elements)
    elif _may_hold_model(plan.value_type):
        checks.append(_models_pass)
    return _all(checks) if checks else None


def _models_pass(value: Any) -> bool:
    """A nested model passes; anything else is not this check's business."""
    return not isinstance(value, BaseModel) or _passes(type(value))(value)


@functools.cache
def _passes(model_type: type[BaseModel]) -> Check:
    members = [
        (plan.name, check)
        for plan in _plan(model_type)
        if (check := _member_check(plan)) is not None
    ]

    def ok(model: Any) -> bool:
        for name, check in members:
            value = getattr(model, name)
            if value is not None and not check(value):
                return False
        return True

    return ok


def validate_request(model: BaseModel) -> None:
    """Check every declared constraint of ``model`` (recursively); raise one AWS-worded
    :class:`~hsmkms.errors.ValidationException` listing every failure."""
    if _passes(type(model))(model):
        return
    clauses: list[str] = []
    _walk(model, "", clauses)
    if clauses:
        raise validation_exception(clauses)


def from_pydantic_error(exc: PydanticValidationError) -> ValidationException:
    """Turn a pydantic error raised while building a request into AWS's wording.

    For the protocol layer: a missing required member becomes ``Value null at 'keyId' failed to
    satisfy constraint: Member must not be null``; an enum mismatch lists the allowed values.
    """
    clauses: list[str] = []
    for error in exc.errors(include_url=False, include_input=True):
        loc = error.get("loc", ())
        parts: list[str] = []
        for part in loc:
            if isinstance(part, int):
                parts.append(f"{part + 1}.member")
            else:
                parts.append(member_path(str(part)))
        path = ".".join(parts) or "body"
        kind = error.get("type", "")
        if kind == "missing":
            clauses.append(
                f"Value null at '{path}' failed to satisfy constraint: Member must not be null"
            )
        elif kind == "enum":
            expected = error.get("ctx", {}).get("expected", "")
            allowed = "[" + ", ".join(re.findall(r"'([^']*)'", str(expected))) + "]"
            clauses.append(
                constraint_error(
                    path,
                    error.get("input"),
                    f"Member must satisfy enum value set: {allowed}",
                )
            )
        else:
            clauses.append(
                f"Value at '{path}' failed to satisfy constraint: Member must be of the right type"
            )
    return validation_exception(clauses or ["Value at 'body' failed to satisfy constraint"])
