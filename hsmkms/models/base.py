"""Common ground of the wire models: the base class and the shared member types."""

from __future__ import annotations

from typing import Annotated

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
