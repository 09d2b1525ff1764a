"""Common ground of the wire models: the base class and the shared member types."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Self, cast

from pydantic import BaseModel, ConfigDict

from hsmkms.models.constraints import EncryptionContextRules, Length, Pattern

__all__ = [
    "MAX_ENCRYPTION_CONTEXT_BYTES",
    "AliasNameType",
    "EncryptionContextType",
    "GrantTokenList",
    "KeyIdType",
    "KmsModel",
    "LimitType",
    "MarkerType",
]


class KmsModel(BaseModel):
    """Base of every request and response: AWS PascalCase member names.

    Unknown members are ignored, as AWS does (newer SDKs may send members this service does not
    know yet). Blob members are ``bytes`` (base64 on the wire: the protocol layer's business).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

    @classmethod
    def trusted(cls, **values: Any) -> Self:
        """An instance of values the service made itself, not validated: what
        :meth:`model_construct` makes for these models (no aliases, validators or private
        attributes), in about 40% of its time. Every Encrypt, Decrypt and GenerateDataKey
        answer is one. Members not given take their defaults; a required one must be given."""
        layout = _layout(cls)
        if layout is None:  # a member with a default factory: pydantic's own way
            return cast(Self, cls.model_construct(**values))
        names, defaults = layout
        if len(values) == len(names):
            members = values  # every member given (the kwargs dict is this call's own)
        else:
            members = {name: values.get(name, defaults.get(name)) for name in names}
        obj = _new(cls)
        _set(obj, "__dict__", members)
        _set(obj, "__pydantic_fields_set__", set(values))
        _set(obj, "__pydantic_extra__", None)
        _set(obj, "__pydantic_private__", None)
        return obj


_new = object.__new__
_set = object.__setattr__


@functools.cache
def _layout(model: type[BaseModel]) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """A model's member names in order, and the defaults of those that have one; None when a
    member's default comes from a factory (made anew for each instance)."""
    fields = model.model_fields
    if any(field.default_factory is not None for field in fields.values()):
        return None
    defaults = {name: field.default for name, field in fields.items() if not field.is_required()}
    return tuple(fields), defaults


KeyIdType = Annotated[str, Length(1, 2048)]
"""A key id, key ARN, alias name or alias ARN (which of them an operation accepts varies)."""

AliasNameType = Annotated[str, Length(1, 256), Pattern(r"^[a-zA-Z0-9:/_-]+$")]

MarkerType = Annotated[str, Length(1, 1024), Pattern(r"[\u0020-\u00FF]*")]

LimitType = int
"""Page size; each request declares its own Range."""

GrantTokenList = Annotated[list[Annotated[str, Length(1, 8192)]], Length(0, 10)]

MAX_ENCRYPTION_CONTEXT_BYTES = 8192
"""The largest encryption context a request may carry, measured as its canonical encoding
(``docs/kms-operations.md``, "Encryption context"): the XKS proxy API's AAD limit, and the
envelope format's."""

EncryptionContextType = Annotated[
    dict[str, str], EncryptionContextRules(MAX_ENCRYPTION_CONTEXT_BYTES)
]
"""An encryption context: keys unique ignoring case, at most 8,192 bytes encoded."""
