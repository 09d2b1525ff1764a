"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey,
GenerateDataKeyWithoutPlaintext, GenerateRandom.

Encrypt, Decrypt and ReEncrypt take symmetric keys (the ciphertext blob of
:mod:`hsmkms.ciphertext`) and RSA encryption keys (RSAES-OAEP: the raw ciphertext, as AWS KMS,
so data encrypted offline with GetPublicKey's key decrypts here and the other way round).

Security contract: plaintext and data keys are passed to the token or returned to the caller
only; they are never logged or stored. The encryption context is bound as AAD and must be given
again to decrypt (symmetric keys; asymmetric algorithms take none, as AWS KMS).
"""

from __future__ import annotations

from typing import Final

from hsmkms.errors import (
    CustomKeyStoreInvalidStateException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.errors import DecryptionFailed, UnsupportedByToken
from hsmkms.keystore.specs import AsymmetricEncryption
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
from hsmkms.models.enums import DataKeySpec, EncryptionAlgorithmSpec, KeySpec
from hsmkms.service.core import Call, ServiceCore, check_algorithm, material_ref, operation
from hsmkms.service.custom_stores import CONNECTED
from hsmkms.service.key_types import KEY_TYPES
from hsmkms.service.operations import OPERATIONS, Operation
from hsmkms.service.states import Access
from hsmkms.store import KeyRecord, KeyVersionRecord
from hsmkms.types import Caller

INCORRECT_KEY_MESSAGE: Final = (
    "The key ID in the request does not identify a CMK that can perform this operation."
)
# The only algorithm of a symmetric key; the prepare hooks refuse any other.
SYMMETRIC_DEFAULT: Final = EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
_DECRYPT: Final = OPERATIONS["Decrypt"]
_RE_ENCRYPT: Final = OPERATIONS["ReEncrypt"]
_SYMMETRIC_SPEC: Final = KeySpec.SYMMETRIC_DEFAULT.value
# spec: the wording two AWS-validated emulators (floci, and a Go one) agree on.
ASYMMETRIC_CONTEXT_MESSAGE: Final = (
    "EncryptionContext is not supported when encrypting/decrypting with asymmetric CMKs."
)


def _asymmetric(algorithm: EncryptionAlgorithmSpec | None) -> bool:
    """Whether a request's encryption algorithm is a public-key one (RSAES_*, SM2PKE)."""
    return algorithm is not None and algorithm is not SYMMETRIC_DEFAULT


def _scheme(key: KeyRecord, algorithm: EncryptionAlgorithmSpec | None) -> AsymmetricEncryption:
    """The encryption scheme of ``algorithm`` for an asymmetric encryption key;
    InvalidKeyUsageException when the key's spec does not take it (the default,
    SYMMETRIC_DEFAULT, included)."""
    chosen = algorithm or SYMMETRIC_DEFAULT
    if chosen not in KEY_TYPES[KeySpec(key.key_spec)].encryption or not _asymmetric(chosen):
        # spec: "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048." (floci,
        # measured against AWS)
        raise InvalidKeyUsageException(
            f"Algorithm {chosen} is incompatible with key spec {key.key_spec}."
        )
    return AsymmetricEncryption(chosen.value)


def _no_context(context: dict[str, str] | None) -> None:
    if context:
        raise ValidationException(ASYMMETRIC_CONTEXT_MESSAGE)


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


def _prepare_decrypt(request: DecryptRequest) -> None:
    _no_recipient(request.Recipient)


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

    # -- asymmetric encryption (RSAES-OAEP) ---------------------------------------------------

    def _seal_asymmetric(
        self,
        key: KeyRecord,
        version: KeyVersionRecord,
        plaintext: bytes,
        algorithm: EncryptionAlgorithmSpec | None,
        context: dict[str, str] | None,
        dry_run: bool | None,
    ) -> bytes:
        """RSAES-OAEP ciphertext of ``plaintext`` for an RSA encryption key, after AWS's checks
        (algorithm of the key's spec, no encryption context, plaintext size)."""
        scheme = _scheme(key, algorithm)
        _no_context(context)
        material = KEY_TYPES[KeySpec(key.key_spec)].material
        assert material is not None
        limit = scheme.facts.max_plaintext((material.facts.key_bits + 7) // 8)
        if len(plaintext) > limit:
            # spec: LocalStack's AWS-validated snapshot
            # test_encrypt_validate_plaintext_size_per_key_type.
            raise ValidationException(
                f"Algorithm {scheme.value} and key spec {key.key_spec} cannot encrypt data "
                f"larger than {limit} bytes."
            )
        self._dry_run(dry_run)
        ref = material_ref(version.material_ref)
        return self._stores.backend_for(ref).asymmetric_encrypt(ref, plaintext, scheme)

    def _open_asymmetric(
        self,
        identifier: str | None,
        ciphertext: bytes | None,
        algorithm: EncryptionAlgorithmSpec,
        context: dict[str, str] | None,
        *,
        op: Operation,
        caller: Caller | None,
        action: str,
        ignore_ciphertext: bool,
    ) -> tuple[KeyRecord, bytes]:
        """Decrypt an RSAES-OAEP ciphertext with the key ``identifier`` names (required: the
        ciphertext does not name its key), inside the token. Every failure of the ciphertext is
        one InvalidCiphertextException. ``ignore_ciphertext``: DryRun with IGNORE_CIPHERTEXT,
        answered once the caller is authorized."""
        if identifier is None:
            # Without a key id the ciphertext is taken for a symmetric one, which it is not.
            raise InvalidCiphertextException()
        key, version = self._resolve_material(
            identifier,
            op=op,
            caller=caller,
            action=action,
            extra={"kms:EncryptionAlgorithm": algorithm.value},
        )
        scheme = _scheme(key, algorithm)
        _no_context(context)
        if ignore_ciphertext:
            self._dry_run(True)
        ref = material_ref(version.material_ref)
        try:
            plaintext = self._stores.backend_for(ref).asymmetric_decrypt(
                ref, _required_blob(ciphertext), scheme
            )
        except DecryptionFailed:
            plaintext = None
        except UnsupportedByToken as exc:
            raise UnsupportedOperationException(
                f"Algorithm {scheme.value} is not supported by this key store: {exc.message}."
            ) from None
        if plaintext is None:
            raise InvalidCiphertextException()  # outside the handler: no cause reaches anyone
        return key, plaintext

    @operation("Encrypt")
    def encrypt(self, call: Call[EncryptRequest]) -> EncryptResponse:
        """Encrypt 1-4096 bytes under the key's current version, inside the token; or, with an
        RSA encryption key and an RSAES_OAEP_* algorithm, RSAES-OAEP (the raw ciphertext)."""
        request, key = call.request, call.key
        if key.key_spec != _SYMMETRIC_SPEC:
            blob = self._seal_asymmetric(
                key, call.version, request.Plaintext, request.EncryptionAlgorithm,
                request.EncryptionContext, request.DryRun,
            )  # fmt: skip
            return EncryptResponse(
                CiphertextBlob=blob, KeyId=key.arn, EncryptionAlgorithm=request.EncryptionAlgorithm
            )
        check_algorithm(request.EncryptionAlgorithm)
        self._dry_run(request.DryRun)
        blob = self._seal(key, call.version, request.Plaintext, request.EncryptionContext or {})
        # Built from trusted values: skip re-validation on the hot path.
        return EncryptResponse.trusted(
            CiphertextBlob=blob,
            KeyId=key.arn,
            EncryptionAlgorithm=request.EncryptionAlgorithm or SYMMETRIC_DEFAULT,
        )

    @operation("Decrypt", prepare=_prepare_decrypt)
    def decrypt(self, call: Call[DecryptRequest]) -> DecryptResponse:
        """Decrypt with the key and version the blob names (never trial decryption). A KeyId,
        when given, must identify that key (IncorrectKeyException otherwise). With an
        RSAES_OAEP_* algorithm: RSAES-OAEP decryption inside the token with the RSA key the
        (then required) KeyId names."""
        request, caller = call.request, call.caller
        if _asymmetric(request.EncryptionAlgorithm):
            assert request.EncryptionAlgorithm is not None
            ignore = bool(request.DryRun) and "IGNORE_CIPHERTEXT" in (request.DryRunModifiers or [])
            key, plaintext = self._open_asymmetric(
                request.KeyId, request.CiphertextBlob, request.EncryptionAlgorithm,
                request.EncryptionContext, op=_DECRYPT, caller=caller, action=_DECRYPT.action,
                ignore_ciphertext=ignore,
            )  # fmt: skip
            self._dry_run(request.DryRun)
            return DecryptResponse(
                KeyId=key.arn, Plaintext=plaintext, EncryptionAlgorithm=request.EncryptionAlgorithm
            )
        check_algorithm(request.EncryptionAlgorithm)
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
        return DecryptResponse.trusted(
            KeyId=key.arn,
            Plaintext=plaintext,
            EncryptionAlgorithm=request.EncryptionAlgorithm or SYMMETRIC_DEFAULT,
            KeyMaterialId=self._key_material_id(key, version.version),
        )

    @operation("ReEncrypt")
    def re_encrypt(self, call: Call[ReEncryptRequest]) -> ReEncryptResponse:
        """ReEncrypt: decrypt with the source key (the version the blob names, or the RSA key
        SourceKeyId names for an RSAES_OAEP_* source) and encrypt under the destination key's
        current version (or RSAES-OAEP for an RSA destination); the plaintext never leaves the
        service."""
        request, caller = call.request, call.caller
        from_action, to_action = _RE_ENCRYPT.actions
        source_algorithm = request.SourceEncryptionAlgorithm
        destination_algorithm = request.DestinationEncryptionAlgorithm
        ignore = bool(request.DryRun) and "IGNORE_CIPHERTEXT" in (request.DryRunModifiers or [])
        expected = None
        if request.SourceKeyId is not None and not _asymmetric(source_algorithm):
            expected = self._resolve_id(request.SourceKeyId, aliases=True)
        destination, destination_version = self._resolve_current(
            request.DestinationKeyId,
            op=_RE_ENCRYPT,
            caller=caller,
            action=to_action,
            encryption_context=request.DestinationEncryptionContext,
            encryption_algorithm=destination_algorithm,
        )
        symmetric_destination = destination.key_spec == _SYMMETRIC_SPEC
        if symmetric_destination:
            check_algorithm(destination_algorithm)
        else:
            _scheme(destination, destination_algorithm)
        source_version: KeyVersionRecord | None = None
        if _asymmetric(source_algorithm):
            assert source_algorithm is not None
            source, plaintext = self._open_asymmetric(
                request.SourceKeyId, request.CiphertextBlob, source_algorithm,
                request.SourceEncryptionContext, op=_RE_ENCRYPT, caller=caller,
                action=from_action, ignore_ciphertext=ignore,
            )  # fmt: skip
        else:
            check_algorithm(source_algorithm)
            if ignore:
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
        if symmetric_destination:
            self._dry_run(request.DryRun)
            blob = self._seal(
                destination,
                destination_version,
                plaintext,
                request.DestinationEncryptionContext or {},
            )
        else:
            blob = self._seal_asymmetric(
                destination, destination_version, plaintext, destination_algorithm,
                request.DestinationEncryptionContext, request.DryRun,
            )  # fmt: skip
        return ReEncryptResponse(
            CiphertextBlob=blob,
            SourceKeyId=source.arn,
            KeyId=destination.arn,
            SourceEncryptionAlgorithm=source_algorithm or SYMMETRIC_DEFAULT,
            DestinationEncryptionAlgorithm=destination_algorithm or SYMMETRIC_DEFAULT,
            SourceKeyMaterialId=(
                self._key_material_id(source, source_version.version)
                if source_version is not None
                else None
            ),
            DestinationKeyMaterialId=(
                self._key_material_id(destination, destination_version.version)
                if symmetric_destination
                else None
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
        return GenerateDataKeyResponse.trusted(
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
        return GenerateDataKeyWithoutPlaintextResponse.trusted(
            CiphertextBlob=blob,
            KeyId=key.arn,
            KeyMaterialId=self._key_material_id(key, version.version),
        )

    @operation("GenerateRandom", prepare=_prepare_generate_random)
    def generate_random(self, call: Call[GenerateRandomRequest]) -> GenerateRandomResponse:
        """GenerateRandom: 1-1024 bytes from the token's random generator."""
        request = call.request
        _no_recipient(request.Recipient)
        assert request.NumberOfBytes is not None  # checked by the prepare hook
        source = self._keystore
        if request.CustomKeyStoreId is not None:
            # spec: AWS KMS GenerateRandom — from the custom key store's cluster (AWS_CLOUDHSM
            # stores only), which must be CONNECTED.
            stores = self.custom_key_stores
            record = stores.table.require(request.CustomKeyStoreId)
            if call.caller is not None:
                call.caller.custom_key_store_id = record.store_id
            if record.store_type != "AWS_CLOUDHSM":
                # spec: AWS KMS GenerateRandom — external key stores are not supported.
                raise UnsupportedOperationException(
                    "GenerateRandom with an EXTERNAL_KEY_STORE key store is not supported."
                )
            if record.connection_state != CONNECTED:
                raise CustomKeyStoreInvalidStateException(
                    f"The custom key store {record.store_id} is {record.connection_state}: "
                    "GenerateRandom needs it CONNECTED."
                )
            try:
                source = stores.backend(record.store_id)
            except KMSInvalidStateException as exc:
                raise CustomKeyStoreInvalidStateException(exc.message) from None
        return GenerateRandomResponse(Plaintext=source.random(request.NumberOfBytes))
