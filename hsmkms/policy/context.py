"""The request context a policy's conditions are evaluated against.

Condition key *names* are case-insensitive in IAM, including the part after
``kms:EncryptionContext:`` (reference §4.3), so the context stores keys folded to lower case.
An encryption context whose keys differ only by case (``tenant`` and ``Tenant``) cannot be
represented: ``kms:EncryptionContext:tenant`` is single-valued, and merging the two values
would let ``StringEquals`` match either (a principal confined to ``tenant = A`` could encrypt
with ``{"tenant": "B", "Tenant": "A"}``). Requests carrying one are refused before they get here
(ValidationException, :class:`hsmkms.models.constraints.EncryptionContextRules`), and
:func:`request_context` raises ``ValueError`` for one. Other keys that collide when folded (two
tags ``Team`` and ``team``) are merged into one multi-valued entry rather than one silently
hiding the other.

Values that cost a query (the key's tags ``aws:ResourceTag/<k>`` and aliases
``kms:ResourceAliases``) are loaded only when a condition names them: see
:meth:`ConditionContext.deferred`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from typing import Any, Final, TypeAlias


class Unevaluable:
    """The value of a key that is in the request but cannot be evaluated: every condition
    that reads it is false, whatever its operator (``Null``, negated, ``…IfExists`` and set
    operators too). Use the :data:`UNEVALUABLE` instance."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNEVALUABLE"


UNEVALUABLE: Final = Unevaluable()

RESOURCE_ALIASES_QUOTA: Final = 50
"""spec: §4.3 — kms:ResourceAliases is effective only while the key has at most this many
aliases (the aliases-per-key quota); beyond it the statements that test it do not apply."""

ContextValue: TypeAlias = str | bool | int | dt.datetime | tuple[str, ...] | Unevaluable
"""A stored context value. Multi-valued keys hold a tuple of strings."""

ContextInput: TypeAlias = str | bool | int | dt.datetime | Sequence[str] | Set[str] | Unevaluable
"""What callers may pass for a key: a scalar, or a list (tuple, set) of strings."""

ContextLoader: TypeAlias = Callable[[], Mapping[str, ContextInput]]
"""Returns some keys of a context, when first needed (see :meth:`ConditionContext.deferred`)."""


_SCALAR_TYPES: Final = frozenset({str, bool, int, dt.datetime})


def _normalize(value: object) -> ContextValue:
    if type(value) in _SCALAR_TYPES:  # the common case, without the isinstance walk
        return value  # type: ignore[return-value]
    if isinstance(value, str | bool | int | dt.datetime | Unevaluable):
        return value
    if isinstance(value, Sequence | Set):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return tuple(str(item) for item in items)
    raise TypeError(f"unsupported condition context value: {value!r}")


def _merge(old: ContextValue, new: ContextValue) -> ContextValue:
    if isinstance(old, Unevaluable) or isinstance(new, Unevaluable):
        return UNEVALUABLE

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
    most requests never need them; its ``lazy`` loaders go further, for keys that cost a query.
    """

    __slots__ = ("_factory", "_items", "_lazy", "_lazy_prefixes")

    def __init__(self, values: Mapping[str, ContextInput] | None = None) -> None:
        self._factory: Callable[[], Mapping[str, ContextInput]] | None = None
        self._lazy: dict[str, ContextLoader] = {}
        self._lazy_prefixes: tuple[str, ...] = ()
        self._items = self._build(values)

    @classmethod
    def deferred(
        cls,
        factory: Callable[[], Mapping[str, ContextInput]],
        *,
        lazy: Mapping[str, ContextLoader] | None = None,
    ) -> ConditionContext:
        """A context whose values ``factory`` returns, called at most once, when first read.

        ``lazy`` maps a key prefix, in lower case, to a loader of the keys under it:
        ``{"aws:resourcetag/": load_tags}`` calls ``load_tags`` only when a condition reads a
        key starting with ``aws:ResourceTag/`` (in any case), or the whole context is iterated;
        once it succeeded, never again. The loader's keys must all start with that prefix.
        """
        context = cls.__new__(cls)
        context._factory = factory
        context._lazy = dict(lazy) if lazy else {}
        context._lazy_prefixes = tuple(context._lazy)
        if any(prefix != prefix.lower() for prefix in context._lazy_prefixes):
            raise ValueError("lazy key prefixes must be in lower case")
        return context

    @staticmethod
    def _build(values: Mapping[str, ContextInput] | None) -> dict[str, ContextValue]:
        if isinstance(values, ConditionContext):
            return dict(values._all())  # folded and normalized already
        items: dict[str, ContextValue] = {}
        ConditionContext._add(items, values)
        return items

    @staticmethod
    def _add(items: dict[str, ContextValue], values: Mapping[str, ContextInput] | None) -> None:
        if isinstance(values, ConditionContext):
            for folded, value in values._all().items():
                items[folded] = _merge(items[folded], value) if folded in items else value
            return
        for key, raw in (values or {}).items():
            folded = key.lower()
            value = _normalize(raw)
            items[folded] = _merge(items[folded], value) if folded in items else value

    def _values(self) -> dict[str, ContextValue]:
        """The values built so far (the factory's; lazy groups only once loaded)."""
        try:
            return self._items
        except AttributeError:
            assert self._factory is not None
            self._items = self._build(self._factory())
            return self._items

    def _load(self, folded: str | None) -> dict[str, ContextValue]:
        """The values, with the lazy groups covering ``folded`` loaded (all when None)."""
        items = self._values()
        for prefix in self._lazy_prefixes:
            if folded is None or folded.startswith(prefix):
                loaded = self._lazy[prefix]()
                # Forgotten only once loaded: a failed load raises again on the next read.
                del self._lazy[prefix]
                self._lazy_prefixes = tuple(self._lazy)
                self._add(items, loaded)
        return items

    def _all(self) -> dict[str, ContextValue]:
        return self._load(None) if self._lazy_prefixes else self._values()

    def _get(self, folded: str) -> dict[str, ContextValue]:
        if self._lazy_prefixes and folded.startswith(self._lazy_prefixes):
            return self._load(folded)
        return self._values()

    def __getitem__(self, key: str) -> ContextValue:
        folded = key.lower()
        return self._get(folded)[folded]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        folded = key.lower()
        return folded in self._get(folded)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"ConditionContext({self._all()!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ConditionContext):
            return self._all() == other._all()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._all().items()))


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
    resource_aliases: Sequence[str] | None = None,
    extra: Mapping[str, ContextInput] | None = None,
) -> ConditionContext:
    """Build the condition context of one request from plain values.

    A value left as ``None`` leaves its key out of the context, which is what AWS does when
    a request does not carry the thing (for example no encryption context: neither
    ``kms:EncryptionContext:<k>`` nor ``kms:EncryptionContextKeys`` exists). Request
    parameters that have a default (``kms:KeySpec`` = SYMMETRIC_DEFAULT on CreateKey) must be
    passed with the default filled in (reference §4.3).

    ``encryption_context`` must not hold two keys that differ only in case (``ValueError``:
    :func:`check_encryption_context_keys`). ``resource_tags`` and ``resource_aliases`` are the
    tags and alias names of the key the request acts on (``aws:ResourceTag/<k>``,
    ``kms:ResourceAliases``); a key with more than :data:`RESOURCE_ALIASES_QUOTA` aliases
    makes ``kms:ResourceAliases`` :data:`UNEVALUABLE`.
    """
    values: dict[str, ContextInput] = {}
    if principal_arn is not None:
        values["aws:PrincipalArn"] = principal_arn
    if caller_account is not None:
        values["kms:CallerAccount"] = caller_account
    if encryption_context is not None:
        check_encryption_context_keys(encryption_context)
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
    if resource_aliases is not None:
        values["kms:ResourceAliases"] = (
            list(resource_aliases)
            if len(resource_aliases) <= RESOURCE_ALIASES_QUOTA
            else UNEVALUABLE
        )
    if extra:
        values.update(extra)
    return ConditionContext(values)


def check_encryption_context_keys(encryption_context: Mapping[str, str]) -> None:
    """``ValueError`` when two keys of ``encryption_context`` differ only in case (they would
    be one condition key, ``kms:EncryptionContext:<k>``, with two values)."""
    if len({name.lower() for name in encryption_context}) != len(encryption_context):
        raise ValueError("encryption context keys must not differ only in case")


def deferred_request_context(
    *,
    resource_tags: Callable[[], Mapping[str, str]] | None = None,
    resource_aliases: Callable[[], Sequence[str]] | None = None,
    **kwargs: Any,
) -> ConditionContext:
    """:func:`request_context` with the same arguments, built only if a condition reads it.

    The key's tags and aliases are passed as loaders instead of values: each is called only
    when a condition reads ``aws:ResourceTag/<k>`` or ``kms:ResourceAliases`` (at most once),
    so a policy that tests only, say, the encryption context costs no query for them.
    """
    lazy: dict[str, ContextLoader] = {}
    if resource_tags is not None:
        load_tags = resource_tags
        lazy["aws:resourcetag/"] = lambda: request_context(resource_tags=load_tags())
    if resource_aliases is not None:
        load_aliases = resource_aliases
        lazy["kms:resourcealiases"] = lambda: request_context(resource_aliases=load_aliases())
    return ConditionContext.deferred(lambda: request_context(**kwargs), lazy=lazy)
