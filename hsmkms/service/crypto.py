"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey,
GenerateDataKeyWithoutPlaintext, GenerateRandom.

Security contract: plaintext and data keys are passed to the token or returned to the caller
only; they are never logged or stored. The encryption context is bound as AAD and must be given
again to decrypt.
"""

from __future__ import annotations

from typing import Final

from hsmkms.errors import (
    IncorrectKeyException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.models import (
    DecryptRequest,
    DecryptResponse,
    EncryptRequest,
    EncryptResponse,
    GenerateDataKeyRequest,
    GenerateDataKeyResponse,
    GenerateDataKeyWithoutPlaintextRequest,
    GenerateDataKeyWithoutPlaintextResponse,
    GenerateRandomRequest,
    GenerateRandomResponse,
    ReEncryptRequest,
    ReEncryptResponse,
)
from hsmkms.models.constraints import validation_exception
from hsmkms.models.enums import DataKeySpec, EncryptionAlgorithmSpec
from hsmkms.service.core import Call, ServiceCore, check_algorithm, operation
from hsmkms.service.operations import OPERATIONS
from hsmkms.service.states import Access

INCORRECT_KEY_MESSAGE: Final = (
    "The key ID in the request does not identify a CMK that can perform this operation."
)
# The only algorithm of a symmetric key; the prepare hooks refuse any other.
SYMMETRIC_DEFAULT: Final = EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
_DECRYPT: Final = OPERATIONS["Decrypt"]
_RE_ENCRYPT: Final = OPERATIONS["ReEncrypt"]


def _required_blob(blob: bytes | None) -> bytes:
    """CiphertextBlob is optional in the model (DryRun with IGNORE_CIPHERTEXT) but required for
    the operation itself."""
    if blob is None:
        raise validation_exception(
            ["Value null at 'ciphertextBlob' failed to satisfy constraint: Member must not be null"]
        )
    return blob


def _incorrect_key() -> Exception:
    # spec: AWS KMS Decrypt — IncorrectKeyException when KeyId does not match.
    return IncorrectKeyException(INCORRECT_KEY_MESSAGE)


def _no_recipient(recipient: object) -> None:
    if recipient is not None:
        raise UnsupportedOperationException("Recipient (attestation) is not supported.")


def _data_key_length(key_spec: DataKeySpec | None, number_of_bytes: int | None) -> int:
    # spec: exactly one of KeySpec (AES_256|AES_128) or NumberOfBytes (1-1024) (§1.9).
    if (key_spec is None) == (number_of_bytes is None):
        raise ValidationException("Please specify either number of bytes or key spec.")
    if key_spec is not None:
        return key_spec.length
    assert number_of_bytes is not None
    return number_of_bytes


def _prepare_encrypt(request: EncryptRequest) -> None:
    check_algorithm(request.EncryptionAlgorithm)


def _prepare_decrypt(request: DecryptRequest) -> None:
    check_algorithm(request.EncryptionAlgorithm)
    _no_recipient(request.Recipient)


def _prepare_re_encrypt(request: ReEncryptRequest) -> None:
    check_algorithm(request.SourceEncryptionAlgorithm)
    check_algorithm(request.DestinationEncryptionAlgorithm)


def _prepare_generate_data_key(request: GenerateDataKeyRequest) -> None:
    _data_key_length(request.KeySpec, request.NumberOfBytes)
    _no_recipient(request.Recipient)


def _prepare_generate_data_key_without_plaintext(
    request: GenerateDataKeyWithoutPlaintextRequest,
) -> None:
    _data_key_length(request.KeySpec, request.NumberOfBytes)


def _prepare_generate_random(request: GenerateRandomRequest) -> None:
    if request.NumberOfBytes is None:
        raise ValidationException("NumberOfBytes is required.")


class CryptoOperations(ServiceCore):
    """The cryptographic operations of :class:`~hsmkms.service.KmsService`."""

    @operation("Encrypt", prepare=_prepare_encrypt)
    def encrypt(self, call: Call[EncryptRequest]) -> EncryptResponse:
        """Encrypt 1-4096 bytes under the key's current version, inside the token."""
        request, key = call.request, call.key
        self._dry_run(request.DryRun)
        blob = self._seal(key, call.version, request.Plaintext, request.EncryptionContext or {})
        # Built from trusted values: skip re-validation on the hot path.
        return EncryptResponse.model_construct(
            CiphertextBlob=blob,
            KeyId=key.arn,
            EncryptionAlgorithm=request.EncryptionAlgorithm or SYMMETRIC_DEFAULT,
        )

    @operation("Decrypt", prepare=_prepare_decrypt)
    def decrypt(self, call: Call[DecryptRequest]) -> DecryptResponse:
        """Decrypt with the key and version the blob names (never trial decryption). A KeyId,
        when given, must identify that key (IncorrectKeyException otherwise)."""
        request, caller = call.request, call.caller
        expected = None
        if request.KeyId is not None:
            expected = self._resolve_id(request.KeyId, aliases=True)
        if request.DryRun and "IGNORE_CIPHERTEXT" in (request.DryRunModifiers or []):
            if expected is not None:
                self._resolve(
                    expected,
                    aliases=False,
                    access=Access.USE,
                    caller=caller,
                    action=_DECRYPT.action,
                )
            self._dry_run(True)
        key, version, plaintext = self._open(
            _required_blob(request.CiphertextBlob),
            request.EncryptionContext or {},
            expected,
            _incorrect_key,
            op=_DECRYPT,
            caller=caller,
            given_context=request.EncryptionContext,
        )
        self._dry_run(request.DryRun)
        # Built from trusted values: skip re-validation on the hot path.
        return DecryptResponse.model_construct(
            KeyId=key.arn,
            Plaintext=plaintext,
            EncryptionAlgorithm=request.EncryptionAlgorithm or SYMMETRIC_DEFAULT,
            KeyMaterialId=self._key_material_id(key, version.version),
        )

    @operation("ReEncrypt", prepare=_prepare_re_encrypt)
    def re_encrypt(self, call: Call[ReEncryptRequest]) -> ReEncryptResponse:
        """ReEncrypt: decrypt with the source key version the blob names and encrypt under the
        destination key's current version; the plaintext never leaves the service."""
        request, caller = call.request, call.caller
        from_action, to_action = _RE_ENCRYPT.actions
        expected = None
        if request.SourceKeyId is not None:
            expected = self._resolve_id(request.SourceKeyId, aliases=True)
        destination, destination_version = self._resolve_current(
            request.DestinationKeyId,
            op=_RE_ENCRYPT,
            caller=caller,
            action=to_action,
            encryption_context=request.DestinationEncryptionContext,
        )
        if request.DryRun and "IGNORE_CIPHERTEXT" in (request.DryRunModifiers or []):
            self._dry_run(True)
        source, source_version, plaintext = self._open(
            _required_blob(request.CiphertextBlob),
            request.SourceEncryptionContext or {},
            expected,
            _incorrect_key,
            op=_RE_ENCRYPT,
            caller=caller,
            action=from_action,
            given_context=request.SourceEncryptionContext,
        )
        self._dry_run(request.DryRun)
        blob = self._seal(
            destination,
            destination_version,
            plaintext,
            request.DestinationEncryptionContext or {},
        )
        return ReEncryptResponse(
            CiphertextBlob=blob,
            SourceKeyId=source.arn,
            KeyId=destination.arn,
            SourceEncryptionAlgorithm=check_algorithm(request.SourceEncryptionAlgorithm),
            DestinationEncryptionAlgorithm=check_algorithm(request.DestinationEncryptionAlgorithm),
            SourceKeyMaterialId=self._key_material_id(source, source_version.version),
            DestinationKeyMaterialId=self._key_material_id(
                destination, destination_version.version
            ),
        )

    @operation("GenerateDataKey", prepare=_prepare_generate_data_key)
    def generate_data_key(self, call: Call[GenerateDataKeyRequest]) -> GenerateDataKeyResponse:
        """GenerateDataKey: a fresh data key from the token's generator, returned in plaintext
        and encrypted under the key's current version.

        Security contract: the plaintext data key is returned to the caller only; it is
        never logged or stored.
        """
        request, key, version = call.request, call.key, call.version
        self._dry_run(request.DryRun)
        data_key = self._keystore.random(_data_key_length(request.KeySpec, request.NumberOfBytes))
        blob = self._seal(key, version, data_key, request.EncryptionContext or {})
        # Built from trusted values: skip re-validation on the hot path.
        return GenerateDataKeyResponse.model_construct(
            CiphertextBlob=blob,
            Plaintext=data_key,
            KeyId=key.arn,
            KeyMaterialId=self._key_material_id(key, version.version),
        )

    @operation(
        "GenerateDataKeyWithoutPlaintext", prepare=_prepare_generate_data_key_without_plaintext
    )
    def generate_data_key_without_plaintext(
        self, call: Call[GenerateDataKeyWithoutPlaintextRequest]
    ) -> GenerateDataKeyWithoutPlaintextResponse:
        """GenerateDataKeyWithoutPlaintext: as GenerateDataKey, returning only the encrypted
        data key."""
        request, key, version = call.request, call.key, call.version
        self._dry_run(request.DryRun)
        length = _data_key_length(request.KeySpec, request.NumberOfBytes)
        blob = self._seal(
            key, version, self._keystore.random(length), request.EncryptionContext or {}
        )
        # Built from trusted values: skip re-validation on the hot path.
        return GenerateDataKeyWithoutPlaintextResponse.model_construct(
            CiphertextBlob=blob,
            KeyId=key.arn,
            KeyMaterialId=self._key_material_id(key, version.version),
        )

    @operation("GenerateRandom", prepare=_prepare_generate_random)
    def generate_random(self, call: Call[GenerateRandomRequest]) -> GenerateRandomResponse:
        """GenerateRandom: 1-1024 bytes from the token's random generator."""
        request = call.request
        if request.CustomKeyStoreId is not None:
            raise UnsupportedOperationException("Custom key stores are not supported.")
        _no_recipient(request.Recipient)
        assert request.NumberOfBytes is not None  # checked by the prepare hook
        return GenerateRandomResponse(Plaintext=self._keystore.random(request.NumberOfBytes))
