"""Where data keys come from: the one seam between envelope encryption and a KMS.

:class:`DataKeyProvider` is the protocol; :class:`ServiceProvider` calls a
:class:`~hsmkms.service.KmsService` in this process (the local data directory), and
:class:`Boto3Provider` calls any KMS endpoint through a boto3 client (an ``hsmkms serve``
server, or AWS KMS itself). Both ask for 32-byte data keys (``KeySpec=AES_256``).

Security contract: plaintext data keys travel as :class:`DataKey` objects whose ``repr``
shows no key bytes and whose :meth:`DataKey.wipe` zeroes the bytearray. Python cannot wipe
the immutable ``bytes`` a KMS client returns; they are copied into a bytearray at once and
dropped, which is as far as Python allows.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

from hsmkms import errors
from hsmkms.envelope.format import DATA_KEY_LENGTH
from hsmkms.types import Caller, EncryptionContext

if TYPE_CHECKING:
    from hsmkms.models.crypto import (
        DecryptRequest,
        DecryptResponse,
        GenerateDataKeyRequest,
        GenerateDataKeyResponse,
        ReEncryptRequest,
        ReEncryptResponse,
    )

# The request models (pydantic) are imported by ServiceProvider when it is used: a client of a
# remote KMS (Boto3Provider) does not pay for them at start-up.

__all__ = [
    "Boto3Provider",
    "DataKey",
    "DataKeyProvider",
    "DataKeyService",
    "ServiceProvider",
    "WrappedKey",
    "map_boto_error",
]


@dataclasses.dataclass(slots=True, eq=False)
class DataKey:
    """A plaintext data key with its KMS-encrypted copy and the ARN of the wrapping key.

    ``plaintext`` is a bytearray so that :meth:`wipe` can zero it; the repr redacts it."""

    plaintext: bytearray
    encrypted: bytes
    key_arn: str

    def __repr__(self) -> str:
        return (
            f"DataKey(key_arn={self.key_arn!r}, encrypted=<{len(self.encrypted)} bytes>, "
            "plaintext=<redacted>)"
        )

    __str__ = __repr__

    def wipe(self) -> None:
        """Zero the plaintext key in place."""
        self.plaintext[:] = bytes(len(self.plaintext))

    def copy(self) -> DataKey:
        """An independent copy (its own bytearray) that the receiver wipes."""
        return DataKey(bytearray(self.plaintext), self.encrypted, self.key_arn)


@dataclasses.dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key re-encrypted under another KMS key (ReEncrypt's answer)."""

    encrypted: bytes = dataclasses.field(repr=False)
    key_arn: str


class DataKeyProvider(Protocol):
    """Data keys from a KMS. Errors are :mod:`hsmkms.errors` classes (KMS error codes)."""

    def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        """A fresh 32-byte data key, and its copy encrypted under ``key_id`` (a key id, key
        ARN, alias name or alias ARN) with ``context`` bound as AAD."""
        ...

    def decrypt_data_key(
        self, encrypted: bytes, context: EncryptionContext, key_id: str | None
    ) -> DataKey:
        """Decrypt an encrypted data key. ``key_id``, when given, must identify the key that
        encrypted it (KMS answers IncorrectKeyException otherwise)."""
        ...

    def re_encrypt(
        self, encrypted: bytes, context: EncryptionContext, new_key_id: str
    ) -> WrappedKey:
        """Re-encrypt an encrypted data key under ``new_key_id`` inside the KMS (the plaintext
        key never reaches the caller), keeping the same encryption context."""
        ...


def _owned(plaintext: bytes, encrypted: bytes, key_arn: str) -> DataKey:
    key = DataKey(bytearray(plaintext), encrypted, key_arn)
    if len(key.plaintext) != DATA_KEY_LENGTH:
        key.wipe()
        raise errors.KMSInternalException("the KMS returned a data key of the wrong length")
    return key


class DataKeyService(Protocol):
    """The three operations :class:`ServiceProvider` calls: a
    :class:`~hsmkms.service.KmsService`, or the local operator's audited view of one
    (:class:`hsmkms.system.OperatorService`)."""

    def generate_data_key(
        self, request: GenerateDataKeyRequest, caller: Caller | None = None, /
    ) -> GenerateDataKeyResponse: ...

    def decrypt(
        self, request: DecryptRequest, caller: Caller | None = None, /
    ) -> DecryptResponse: ...

    def re_encrypt(
        self, request: ReEncryptRequest, caller: Caller | None = None, /
    ) -> ReEncryptResponse: ...


class ServiceProvider:
    """Data keys from a KMS service in this process (:class:`DataKeyService`)."""

    def __init__(self, service: DataKeyService, *, caller: Caller | None = None) -> None:
        self._service = service
        self._caller = caller

    def __repr__(self) -> str:
        return "ServiceProvider()"

    def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        from hsmkms.models.crypto import GenerateDataKeyRequest
        from hsmkms.models.enums import DataKeySpec

        response = self._service.generate_data_key(
            GenerateDataKeyRequest(
                KeyId=key_id, EncryptionContext=dict(context), KeySpec=DataKeySpec.AES_256
            ),
            self._caller,
        )
        return _owned(response.Plaintext, response.CiphertextBlob, response.KeyId)

    def decrypt_data_key(
        self, encrypted: bytes, context: EncryptionContext, key_id: str | None
    ) -> DataKey:
        from hsmkms.models.crypto import DecryptRequest

        response = self._service.decrypt(
            DecryptRequest(CiphertextBlob=encrypted, EncryptionContext=dict(context), KeyId=key_id),
            self._caller,
        )
        return _owned(response.Plaintext, encrypted, response.KeyId)

    def re_encrypt(
        self, encrypted: bytes, context: EncryptionContext, new_key_id: str
    ) -> WrappedKey:
        from hsmkms.models.crypto import ReEncryptRequest

        response = self._service.re_encrypt(
            ReEncryptRequest(
                CiphertextBlob=encrypted,
                SourceEncryptionContext=dict(context),
                DestinationKeyId=new_key_id,
                DestinationEncryptionContext=dict(context),
            ),
            self._caller,
        )
        return WrappedKey(response.CiphertextBlob, response.KeyId)


def _error_classes() -> dict[str, type[errors.KMSError]]:
    """AWS error code -> the hsmkms class carrying it (the most specific one)."""
    table: dict[str, type[errors.KMSError]] = {}
    for value in vars(errors).values():
        if (
            isinstance(value, type)
            and issubclass(value, errors.KMSError)
            and value not in (errors.KMSError, errors.ClientError, errors.ServerError)
        ):
            table.setdefault(value.code, value)
    return table


_BY_CODE = _error_classes()


def map_boto_error(exc: Exception) -> errors.KMSError:
    """The :mod:`hsmkms.errors` error for an exception raised by a boto3 KMS client.

    The one place foreign errors are mapped: a botocore ``ClientError`` by its AWS error code
    (unknown codes: a 4xx becomes :class:`~hsmkms.errors.ClientError`-shaped
    ``ValidationException`` with the code in the message, a 5xx ``KMSInternalException``);
    missing credentials become ``MissingAuthenticationTokenException``; any other botocore
    error (connection refused, timeout, bad endpoint) ``DependencyTimeoutException``."""
    from botocore import exceptions as boto_errors

    if isinstance(exc, boto_errors.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "") or code)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400) or 400)
        cls = _BY_CODE.get(code)
        if cls is not None:
            return cls(message)
        if status >= 500:
            return errors.KMSInternalException(f"{code}: {message}")
        return errors.ValidationException(f"{code}: {message}")
    if isinstance(exc, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
        return errors.MissingAuthenticationTokenException(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile"
        )
    if isinstance(exc, boto_errors.NoRegionError):
        return errors.ValidationException("no AWS region: set AWS_REGION or pass --region")
    if isinstance(exc, boto_errors.BotoCoreError):
        return errors.DependencyTimeoutException(f"KMS endpoint error: {exc}")
    return errors.KMSInternalException(type(exc).__name__)


class Boto3Provider:
    """Data keys from any KMS endpoint through a boto3 ``kms`` client."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"Boto3Provider(endpoint={self._client.meta.endpoint_url!r})"

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore import exceptions as boto_errors

        try:
            response: dict[str, Any] = getattr(self._client, operation)(**params)
        except (boto_errors.ClientError, boto_errors.BotoCoreError) as exc:
            raise map_boto_error(exc) from exc
        return response

    def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        response = self._call(
            "generate_data_key", KeyId=key_id, EncryptionContext=dict(context), KeySpec="AES_256"
        )
        try:
            return _owned(response["Plaintext"], response["CiphertextBlob"], response["KeyId"])
        finally:
            response.clear()

    def decrypt_data_key(
        self, encrypted: bytes, context: EncryptionContext, key_id: str | None
    ) -> DataKey:
        params: dict[str, Any] = {"CiphertextBlob": encrypted, "EncryptionContext": dict(context)}
        if key_id is not None:
            params["KeyId"] = key_id
        response = self._call("decrypt", **params)
        try:
            return _owned(response["Plaintext"], encrypted, response["KeyId"])
        finally:
            response.clear()

    def re_encrypt(
        self, encrypted: bytes, context: EncryptionContext, new_key_id: str
    ) -> WrappedKey:
        response = self._call(
            "re_encrypt",
            CiphertextBlob=encrypted,
            SourceEncryptionContext=dict(context),
            DestinationKeyId=new_key_id,
            DestinationEncryptionContext=dict(context),
        )
        return WrappedKey(response["CiphertextBlob"], response["KeyId"])
