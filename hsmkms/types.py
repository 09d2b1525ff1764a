"""Type aliases shared across hsmkms."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

KeyId = str
"""A KMS key id: a UUID string."""

EncryptionContext = Mapping[str, str]
"""An AWS encryption context: string keys to string values, bound to ciphertexts as AAD."""

Clock = Callable[[], dt.datetime]
"""Returns the current time as an aware UTC datetime. Injected so tests can move time."""


def utc_now() -> dt.datetime:
    """The default clock: the current time in UTC."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Credential:
    """An access key: its id, its secret (never shown by ``repr``) and the principal it names.

    Shared by the credentials store (``hsmkms.identity``) and the SigV4 verifier
    (``hsmkms.api.sigv4``), so it lives below both."""

    access_key_id: str
    secret: str = field(repr=False)
    principal_arn: str
