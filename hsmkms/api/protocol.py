"""The AWS JSON 1.1 wire protocol, on plain values (no ASGI here): target, body, errors.

Requests (reference/aws-kms-api.md §2.1)::

    POST /   X-Amz-Target: TrentService.<Operation>
             Content-Type: application/x-amz-json-1.1
             body: a JSON object (an empty body counts as {})

Members are the request model's PascalCase field names. ``bytes`` members (found by looking at
the model's annotations, through ``Annotated`` and ``| None``) are standard base64 strings;
responses carry datetimes as epoch seconds (a JSON number, millisecond precision), enums as
their value, and leave out members that are None. A response model without members is sent
as an empty body.

What a client gets wrong, and the answer (always HTTP 400):

==============================================  ===========================================
malformed JSON, not an object, NaN/Infinity      SerializationException
a member of the wrong JSON type, bad base64      SerializationException (names the member)
a missing member, an enum or constraint failure  ValidationException, AWS-worded
unknown or missing X-Amz-Target                  UnknownOperationException
a Content-Type that is not JSON                  SerializationException
a body over :data:`MAX_BODY` bytes               ValidationException
==============================================  ===========================================

Security contract: no message repeats a blob member's value (plaintext, ciphertext, data
key); :func:`encode_error` gives server faults a generic message with no internal detail.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import enum
import functools
import json
import types
import typing
from typing import Any, Final

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from hsmkms.errors import (
    SERVER_FAULT_MESSAGE,
    KMSError,
    SerializationException,
    UnknownOperationException,
    ValidationException,
)
from hsmkms.models.constraints import from_pydantic_error, member_path

__all__ = [
    "CONTENT_TYPE",
    "MAX_BODY",
    "SERVER_FAULT_MESSAGE",
    "TARGET_PREFIX",
    "check_content_type",
    "decode_request",
    "encode_error",
    "encode_response",
    "operation_name",
    "oversize_error",
]

CONTENT_TYPE: Final = "application/x-amz-json-1.1"
TARGET_PREFIX: Final = "TrentService."
MAX_BODY: Final = 1 << 20
"""Largest request body accepted (1 MiB). KMS requests are small: the largest member is a
6144-byte ciphertext (8 KiB in base64) or a 32 KiB key policy."""

_ACCEPTED_CONTENT_TYPES = frozenset(
    {"application/x-amz-json-1.1", "application/x-amz-json-1.0", "application/json"}
)
_MAX_ECHO = 64


def _clip(text: str) -> str:
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


# --------------------------------------------------------------------------------------------
# Target and content type
# --------------------------------------------------------------------------------------------


def operation_name(target: str | None, known: typing.Container[str]) -> str:
    """The operation named by an ``X-Amz-Target`` header; UnknownOperationException when it is
    missing, lacks the ``TrentService.`` prefix or names no operation in ``known``."""
    if target is None:
        raise UnknownOperationException("The X-Amz-Target header is missing.")
    name = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else None
    if name is None or name not in known:
        raise UnknownOperationException(f"Unknown operation {_clip(target)!r}.")
    return name


def check_content_type(value: str | None) -> None:
    """Accept the JSON content types (and none at all); SerializationException otherwise."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media not in _ACCEPTED_CONTENT_TYPES:
        raise SerializationException(
            f"Content-Type {_clip(value)!r} is not supported; use {CONTENT_TYPE}."
        )


def oversize_error(limit: int = MAX_BODY) -> ValidationException:
    """The error for a request body longer than ``limit`` bytes."""
    return ValidationException(f"The request body is larger than the limit of {limit} bytes.")


# --------------------------------------------------------------------------------------------
# Request decoding
# --------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    ANY = "any"
    BLOB = "blob"
    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    LIST = "list"
    MAP = "map"
    STRUCTURE = "structure"


@dataclasses.dataclass(frozen=True)
class _Shape:
    kind: _Kind
    element: _Shape | None = None  # list elements, map values
    # structure: wire name -> (attribute, shape, path segment)
    members: dict[str, tuple[str, _Shape, str]] | None = None


_ANY = _Shape(_Kind.ANY)
_SCALARS: dict[Any, _Shape] = {
    bytes: _Shape(_Kind.BLOB),
    str: _Shape(_Kind.STRING),
    bool: _Shape(_Kind.BOOLEAN),
    int: _Shape(_Kind.INTEGER),
    float: _Shape(_Kind.NUMBER),
}


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``X | None`` (repeatedly) from an annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin is typing.Union or origin is types.UnionType:
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) == 1:
                annotation = rest[0]
                continue
        return annotation


def _shape_of(annotation: Any) -> _Shape:
    annotation = _unwrap(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return _model_shape(annotation)
        if issubclass(annotation, enum.Enum) and issubclass(annotation, str):
            return _SCALARS[str]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple) and args:
        return _Shape(_Kind.LIST, element=_shape_of(args[0]))
    if origin is dict and len(args) == 2:
        return _Shape(_Kind.MAP, element=_shape_of(args[1]))
    return _ANY


@functools.cache
def _model_shape(model: type[BaseModel]) -> _Shape:
    members = {
        (field.alias or name): (name, _shape_of(field.annotation), member_path(field.alias or name))
        for name, field in model.model_fields.items()
    }
    return _Shape(_Kind.STRUCTURE, members=members)


_JSON_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "an object",
}
_EXPECTED = {
    _Kind.BLOB: "a base64 string",
    _Kind.STRING: "a string",
    _Kind.INTEGER: "an integer",
    _Kind.NUMBER: "a number",
    _Kind.BOOLEAN: "a boolean",
    _Kind.LIST: "a list",
    _Kind.MAP: "an object",
    _Kind.STRUCTURE: "an object",
}


def _wrong_type(path: str, shape: _Shape, value: Any) -> SerializationException:
    found = _JSON_TYPE_NAMES.get(type(value), "another type")
    return SerializationException(
        f"Value at '{path}' is {found}; expected {_EXPECTED[shape.kind]}."
    )


def _decode_blob(value: str, path: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SerializationException(f"Value at '{path}' is not valid base64.") from None


def _convert(value: Any, shape: _Shape, path: str) -> Any:
    kind = shape.kind
    if kind is _Kind.ANY:
        return value
    if kind is _Kind.STRING:
        if isinstance(value, str):
            return value
    elif kind is _Kind.BLOB:
        if isinstance(value, str):
            return _decode_blob(value, path)
    elif kind is _Kind.INTEGER:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is _Kind.BOOLEAN:
        if isinstance(value, bool):
            return value
    elif kind is _Kind.NUMBER:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    elif kind is _Kind.LIST:
        if isinstance(value, list):
            assert shape.element is not None
            element = shape.element
            return [
                _convert(item, element, f"{path}.{index}.member")
                for index, item in enumerate(value, start=1)
            ]
    elif kind is _Kind.MAP:
        if isinstance(value, dict):
            assert shape.element is not None
            element = shape.element
            if element.kind is _Kind.STRING:  # the common case (encryption contexts): no paths
                strings: dict[str, Any] = {}
                for key, item in value.items():
                    if isinstance(item, str):
                        strings[key] = item
                    elif item is not None:
                        raise _wrong_type(f"{path}.{_clip(key)}", element, item)
                return strings
            return {
                key: _convert(item, element, f"{path}.{_clip(key)}")
                for key, item in value.items()
                if item is not None
            }
    elif kind is _Kind.STRUCTURE and isinstance(value, dict):
        return _convert_members(value, shape, path + ".")
    raise _wrong_type(path, shape, value)


def _convert_members(value: dict[str, Any], shape: _Shape, prefix: str) -> dict[str, Any]:
    assert shape.members is not None
    out: dict[str, Any] = {}
    for wire, item in value.items():
        member = shape.members.get(wire)
        if member is None or item is None:
            continue  # unknown members are ignored, as AWS does; null means absent
        attr, member_shape, segment = member
        out[attr] = _convert(item, member_shape, prefix + segment)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_request(model: type[BaseModel], body: bytes) -> BaseModel:
    """Parse a request body into ``model``.

    Raises SerializationException (not a JSON object, wrong JSON types, bad base64) or an
    AWS-worded ValidationException (missing members, enum values). Messages never repeat a
    blob's value.
    """
    if body.strip():
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise SerializationException("The request body is not valid JSON.") from None
    else:
        data = {}
    if not isinstance(data, dict):
        raise SerializationException("The request body must be a JSON object.")
    values = _convert_members(data, _model_shape(model), "")
    try:
        return model.model_validate(values)
    except PydanticValidationError as exc:
        raise from_pydantic_error(exc) from None


# --------------------------------------------------------------------------------------------
# Response encoding
# --------------------------------------------------------------------------------------------


@functools.cache
def _members(model: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    """(attribute, wire name) of each member of ``model``."""
    return tuple((name, field.alias or name) for name, field in model.model_fields.items())


def _wire(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, wire in _members(type(value)):
            item = getattr(value, name)
            if item is not None:
                out[wire] = _wire(item)
        return out
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.datetime):
        # spec: awsJson1_1 timestamps are epoch seconds, e.g. 1571767572.317 (reference §2.1).
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return round(value.timestamp(), 3)
    if isinstance(value, list | tuple):
        return [_wire(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _wire(item) for key, item in value.items() if item is not None}
    raise TypeError(f"cannot put a {type(value).__name__} on the wire")


def encode_response(response: BaseModel) -> bytes:
    """The JSON body of a response model; empty for a model without members."""
    if not _members(type(response)):
        return b""
    return json.dumps(_wire(response), separators=(",", ":"), ensure_ascii=False).encode()


def encode_error(exc: BaseException) -> tuple[int, bytes]:
    """(HTTP status, body) for an error. Client errors carry their message; server faults and
    foreign exceptions get :data:`SERVER_FAULT_MESSAGE` and no detail — except a fault whose
    class ``shows_cause`` (a full disk, the token away: 503 naming the cause)."""
    if isinstance(exc, KMSError) and (exc.status < 500 or exc.shows_cause):
        code, status, message = exc.code, exc.status, exc.message
    elif isinstance(exc, KMSError):
        code, status, message = exc.code, exc.status, SERVER_FAULT_MESSAGE
    else:
        code, status, message = "KMSInternalException", 500, SERVER_FAULT_MESSAGE
    # spec: AWS sends no message member where it has nothing to say (InvalidCiphertextException,
    # KMSInvalidSignatureException, KMSInvalidMacException), not an empty one.
    members = {"__type": code, "message": message} if message else {"__type": code}
    body = json.dumps(members, separators=(",", ":"))
    return status, body.encode()
