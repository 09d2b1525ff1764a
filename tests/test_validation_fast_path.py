"""The request validator's fast path (``hsmkms.models.constraints._passes``) never lets through
what the full walk refuses, for every request model of every operation, and vouches for the
ordinary requests (else it would save nothing)."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from hsmkms import models as m
from hsmkms.errors import ValidationException
from hsmkms.models.constraints import (
    EncryptionContextRules,
    Length,
    Pattern,
    Range,
    _passes,
    _plan,
    _walk,
    validate_request,
)
from hsmkms.service.operations import ALL_OPERATIONS

MODELS = sorted(
    {op.request_model for op in ALL_OPERATIONS.values() if op.request_model is not None},
    key=lambda model: model.__name__,
)

# Characters that count differently as code points and as UTF-8 bytes, cases that fold
# together, and what the members' patterns refuse.
_CHARS = st.sampled_from(["a", "A", "é", "É", "\u00ff", "\u4e2d", "/", " ", "\x00", "-", "1"])


def _sizes(item: Length | None) -> st.SearchStrategy[int]:
    near: set[int] = {0, 1, 2, 3}
    if item is not None:
        for bound in (item.min, item.max):
            if bound is not None:
                near |= {max(bound - 1, 0), bound, bound + 1}
    return st.sampled_from(sorted(near))


def _text(length: Length | None) -> st.SearchStrategy[str]:
    """A string of a length near the bounds: a few drawn characters, repeated to the length
    (Hypothesis draws no lists of thousands)."""
    return st.tuples(_sizes(length), st.lists(_CHARS, min_size=1, max_size=4)).map(
        lambda drawn: ("".join(drawn[1]) * drawn[0])[: drawn[0]]
    )


def _context(rules: EncryptionContextRules) -> st.SearchStrategy[dict[str, str]]:
    small = st.lists(_CHARS, max_size=4).map("".join)
    # One pair near the limit: 2 + 4 + key + value bytes crosses it by a few bytes or not.
    large = st.integers(rules.max_bytes - 12, rules.max_bytes - 4).map(lambda n: "v" * n)
    values = st.one_of(small, large)
    return st.dictionaries(small, values, min_size=1, max_size=4)


def _value(metadata: tuple[Any, ...], annotation: Any) -> st.SearchStrategy[Any]:
    length = next((i for i in metadata if isinstance(i, Length)), None)
    span = next((i for i in metadata if isinstance(i, Range)), None)
    for item in metadata:
        if isinstance(item, EncryptionContextRules):
            return _context(item)
    if span is not None:
        edges = {v + d for v in (span.min, span.max) if v is not None for d in (-1, 0, 1)}
        return st.sampled_from(sorted(edges | {0, 1}))
    if annotation is bytes:
        return _sizes(length).map(lambda n: b"x" * n)
    if any(isinstance(i, Pattern) for i in metadata) or annotation is str or length is not None:
        return _text(length)
    return st.none()


def _member(model: type[BaseModel], name: str) -> st.SearchStrategy[Any]:
    plan = next(p for p in _plan(model) if p.name == name)
    annotation = model.model_fields[name].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    inner = typing.get_args(args[0])[0] if args and typing.get_origin(args[0]) else None
    if plan.is_list:
        element = _value(plan.element_metadata, str)
        return _sizes(next((i for i in plan.metadata if isinstance(i, Length)), None)).flatmap(
            lambda n: st.lists(element, min_size=n, max_size=n)
        )
    base = inner if inner is not None else (args[0] if args else annotation)
    return _value(plan.metadata, base)


def _requests(model: type[BaseModel], only: str | None = None) -> st.SearchStrategy[BaseModel]:
    """Requests of ``model`` with values near their members' bounds: every constrained member
    maybe, or only the member ``only``."""
    members = {
        plan.name: _member(model, plan.name)
        if only
        else st.one_of(st.none(), _member(model, plan.name))
        for plan in _plan(model)
        if (plan.metadata or plan.is_list) and (only is None or plan.name == only)
    }
    absent = dict.fromkeys(model.model_fields)  # model_construct leaves out what is not given
    return st.fixed_dictionaries(members).map(
        lambda values: model.model_construct(**{**absent, **values})
    )


def _agree(request: BaseModel) -> None:
    clauses: list[str] = []
    _walk(request, "", clauses)
    if _passes(type(request))(request):
        assert clauses == []
    # Either way, validate_request answers as the walk does.
    if clauses:
        with pytest.raises(ValidationException):
            validate_request(request)
    else:
        validate_request(request)


MEMBERS = [
    (model, plan.name) for model in MODELS for plan in _plan(model) if plan.metadata or plan.is_list
]


@pytest.mark.parametrize(
    ("model", "member"), MEMBERS, ids=[f"{model.__name__}.{name}" for model, name in MEMBERS]
)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_member_alone(model: type[BaseModel], member: str, data: st.DataObject) -> None:
    _agree(data.draw(_requests(model, member)))


@pytest.mark.parametrize("model", MODELS, ids=lambda model: model.__name__)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_members_together(model: type[BaseModel], data: st.DataObject) -> None:
    _agree(data.draw(_requests(model)))


def test_ordinary_requests_take_the_fast_path() -> None:
    key = "1234abcd-12ab-34cd-56ef-1234567890ab"
    context = {"purpose": "test", "Tenant": "a"}
    ordinary = [
        m.EncryptRequest(KeyId=key, Plaintext=b"x" * 32, EncryptionContext=context),
        m.DecryptRequest(CiphertextBlob=b"x" * 100, EncryptionContext=context),
        m.GenerateDataKeyRequest(KeyId=key, NumberOfBytes=32, GrantTokens=["t" * 20]),
        m.CreateKeyRequest(Description="d", Tags=[m.Tag(TagKey="k", TagValue="v")]),
        m.CreateAliasRequest(AliasName="alias/app", TargetKeyId=key),
    ]
    for request in ordinary:
        assert _passes(type(request))(request), type(request).__name__


def test_a_refused_nested_member_is_not_vouched_for() -> None:
    """A tag inside CreateKey's list of tags is a model of its own: its bounds count."""
    request = m.CreateKeyRequest.model_construct(
        Tags=[m.Tag.model_construct(TagKey="", TagValue="v")]
    )
    assert not _passes(m.CreateKeyRequest)(request)
    with pytest.raises(ValidationException, match=r"tags\.1\.member\.tagKey"):
        validate_request(request)
