"""The request context a policy's conditions are evaluated against.

Condition key *names* are case-insensitive in IAM, including the part after
``kms:EncryptionContext:`` (reference §4.3), so the context stores keys folded to lower case.
Two request keys that differ only by case (an encryption context with both ``Dept`` and
``dept``) are merged into one multi-valued entry rather than one silently hiding the other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from typing import Any, TypeAlias

ContextValue: TypeAlias = str | bool | int | dt.datetime | tuple[str, ...]
"""A stored context value. Multi-valued keys hold a tuple of strings."""

ContextInput: TypeAlias = str | bool | int | dt.datetime | Sequence[str] | Set[str]
"""What callers may pass for a key: a scalar, or a list (tuple, set) of strings."""


def _normalize(value: object) -> ContextValue:
    if isinstance(value, str | bool | int | dt.datetime):
        return value
    if isinstance(value, Sequence | Set):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return tuple(str(item) for item in items)
    raise TypeError(f"unsupported condition context value: {value!r}")


def _merge(old: ContextValue, new: ContextValue) -> ContextValue:
    def as_tuple(value: ContextValue) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        if isinstance(value, bool):
            return ("true" if value else "false",)
        if isinstance(value, dt.datetime):
            return (value.isoformat(),)
        return (str(value),)

    return as_tuple(old) + as_tuple(new)


class ConditionContext(Mapping[str, ContextValue]):
    """An immutable, case-insensitive mapping of condition keys to request values.

    :meth:`deferred` builds the values on first use: most statements carry no condition, so
    most requests never need them.
    """

    __slots__ = ("_factory", "_items")

    def __init__(self, values: Mapping[str, ContextInput] | None = None) -> None:
        self._factory: Callable[[], Mapping[str, ContextInput]] | None = None
        self._items = self._build(values)

    @classmethod
    def deferred(cls, factory: Callable[[], Mapping[str, ContextInput]]) -> ConditionContext:
        """A context whose values ``factory`` returns, called at most once, when first read."""
        context = cls.__new__(cls)
        context._factory = factory
        return context

    @staticmethod
    def _build(values: Mapping[str, ContextInput] | None) -> dict[str, ContextValue]:
        items: dict[str, ContextValue] = {}
        for key, raw in (values or {}).items():
            folded = key.lower()
            value = _normalize(raw)
            items[folded] = _merge(items[folded], value) if folded in items else value
        return items

    def _values(self) -> dict[str, ContextValue]:
        try:
            return self._items
        except AttributeError:
            assert self._factory is not None
            self._items = self._build(self._factory())
            return self._items

    def __getitem__(self, key: str) -> ContextValue:
        return self._values()[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())

    def __repr__(self) -> str:
        return f"ConditionContext({self._values()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ConditionContext):
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._values().items()))


def request_context(
    *,
    principal_arn: str | None = None,
    caller_account: str | None = None,
    encryption_context: Mapping[str, str] | None = None,
    encryption_algorithm: str | None = None,
    request_alias: str | None = None,
    grant_operations: Sequence[str] | None = None,
    key_spec: str | None = None,
    key_usage: str | None = None,
    rotation_period_in_days: int | None = None,
    schedule_key_deletion_pending_window_in_days: int | None = None,
    secure_transport: bool | None = None,
    source_ip: str | None = None,
    current_time: dt.datetime | None = None,
    request_tags: Mapping[str, str] | None = None,
    resource_tags: Mapping[str, str] | None = None,
    extra: Mapping[str, ContextInput] | None = None,
) -> ConditionContext:
    """Build the condition context of one request from plain values.

    A value left as ``None`` leaves its key out of the context, which is what AWS does when
    a request does not carry the thing (for example no encryption context: neither
    ``kms:EncryptionContext:<k>`` nor ``kms:EncryptionContextKeys`` exists). Request
    parameters that have a default (``kms:KeySpec`` = SYMMETRIC_DEFAULT on CreateKey) must be
    passed with the default filled in (reference §4.3).
    """
    values: dict[str, ContextInput] = {}
    if principal_arn is not None:
        values["aws:PrincipalArn"] = principal_arn
    if caller_account is not None:
        values["kms:CallerAccount"] = caller_account
    if encryption_context is not None:
        values["kms:EncryptionContextKeys"] = list(encryption_context)
        for name, value in encryption_context.items():
            values[f"kms:EncryptionContext:{name}"] = value
    if encryption_algorithm is not None:
        values["kms:EncryptionAlgorithm"] = encryption_algorithm
    if request_alias is not None:
        values["kms:RequestAlias"] = request_alias
    if grant_operations is not None:
        values["kms:GrantOperations"] = list(grant_operations)
    if key_spec is not None:
        values["kms:KeySpec"] = key_spec
    if key_usage is not None:
        values["kms:KeyUsage"] = key_usage
    if rotation_period_in_days is not None:
        values["kms:RotationPeriodInDays"] = rotation_period_in_days
    if schedule_key_deletion_pending_window_in_days is not None:
        values["kms:ScheduleKeyDeletionPendingWindowInDays"] = (
            schedule_key_deletion_pending_window_in_days
        )
    if secure_transport is not None:
        values["aws:SecureTransport"] = secure_transport
    if source_ip is not None:
        values["aws:SourceIp"] = source_ip
    if current_time is not None:
        values["aws:CurrentTime"] = current_time
    if request_tags is not None:
        values["aws:TagKeys"] = list(request_tags)
        for name, value in request_tags.items():
            values[f"aws:RequestTag/{name}"] = value
    if resource_tags is not None:
        for name, value in resource_tags.items():
            values[f"aws:ResourceTag/{name}"] = value
    if extra:
        values.update(extra)
    # ``Dept`` and ``dept`` in one encryption context are distinct keys here and are merged
    # into one multi-valued entry by ConditionContext.
    return ConditionContext(values)


def deferred_request_context(**kwargs: Any) -> ConditionContext:
    """:func:`request_context` with the same arguments, built only if a condition reads it."""
    return ConditionContext.deferred(lambda: request_context(**kwargs))
