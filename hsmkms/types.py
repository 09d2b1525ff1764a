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
    (``hsmkms.sigv4``), so it lives below both."""

    access_key_id: str
    secret: str = field(repr=False)
    principal_arn: str
    identity_policy: str | None = field(default=None, repr=False)
    """The principal's identity policy (IAM JSON), or None: it allows nothing."""


@dataclass(eq=False, slots=True)
class Caller:
    """Who makes one request, and from where: built by the API for each request from the
    SigV4-verified credential and passed to every service operation as ``caller``.

    ``caller=None`` means the service's own operator (the local CLI, tests): no authorization.
    The service records the keys a call used in ``keys_used`` (key ARN -> key version, None
    when no version was involved), which the API copies into the call's audit record.
    """

    principal_arn: str
    account_id: str
    identity_policy: str | None = field(default=None, repr=False)
    access_key_id: str | None = None
    source_ip: str | None = None
    secure_transport: bool = False
    user_agent: str | None = None
    keys_used: dict[str, int | None] = field(default_factory=dict)
    custom_key_store_id: str | None = None
    """The custom key store the call used (its audit record's ``customKeyStoreId``)."""
    request_id: str | None = None
    """The API request's id (``x-amzn-RequestId``): an XKS call made for it carries it as
    ``kmsRequestId``."""

    def note_key(self, key_arn: str, version: int | None = None) -> None:
        """Record that the call named or used ``key_arn`` (and which version)."""
        if version is not None or key_arn not in self.keys_used:
            self.keys_used[key_arn] = version
