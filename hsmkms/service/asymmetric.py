"""Operations on key pairs: Sign, Verify, GetPublicKey, DeriveSharedSecret, Encapsulate,
Decapsulate.

The private key stays in the token: signatures, verification and key agreement are token
operations on the key's material (:class:`~hsmkms.keystore.base.KeyBackend`). Hashing a RAW
message for a hash-then-sign algorithm (RSA, ECDSA) is done here, on the host: hashing needs no
secret, and SoftHSM2 and the YubiHSM 2 sign digests (CKM_ECDSA is raw ECDSA), so a DIGEST
message goes to the token as it is.

Security contract: messages and shared secrets are passed to the token or returned to the
caller only; they are never logged or stored.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any, Final

from hsmkms.errors import (
    InvalidKeyUsageException,
    KMSInvalidSignatureException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.errors import TokenRejected, UnsupportedByToken
from hsmkms.keystore.specs import SigningAlgorithm
from hsmkms.models import (
    DecapsulateRequest,
    DecapsulateResponse,
    DeriveSharedSecretRequest,
    DeriveSharedSecretResponse,
    EncapsulateRequest,
    EncapsulateResponse,
    GetPublicKeyRequest,
    GetPublicKeyResponse,
    SignRequest,
    SignResponse,
    VerifyRequest,
    VerifyResponse,
)
from hsmkms.models.enums import (
    KeyFamily,
    KeySpec,
    KeyUsage,
    MessageType,
    OriginType,
    SigningAlgorithmSpec,
    key_family,
)
from hsmkms.service.core import Call, Prepared, ServiceCore, material_ref, operation
from hsmkms.service.key_types import KEY_TYPES, KEY_TYPES_BY_NAME, customer_master_key_spec
from hsmkms.store import KeyRecord, KeyVersionRecord

__all__ = ["AsymmetricOperations"]

_ED25519: Final = SigningAlgorithmSpec.ED25519_SHA_512
_ED25519_PH: Final = SigningAlgorithmSpec.ED25519_PH_SHA_512
# The one message type each Ed25519 algorithm takes (the botocore model's Sign documentation).
_REQUIRED_MESSAGE_TYPE: Final = {_ED25519: MessageType.RAW, _ED25519_PH: MessageType.DIGEST}


# The condition keys of each (algorithm, message type), made once: the prepare hook runs on
# every request.
_SIGNING_PREPARED: Final = {
    (algorithm, kind): Prepared(
        {"kms:SigningAlgorithm": algorithm.value, "kms:MessageType": kind.value}
    )
    for algorithm in SigningAlgorithmSpec
    for kind in MessageType
}


def _prepare_signing(request: SignRequest | VerifyRequest) -> Prepared:
    # spec: kms:MessageType is the request's MessageType, RAW when absent.
    return _SIGNING_PREPARED[(request.SigningAlgorithm, request.MessageType or MessageType.RAW)]


def _prepare_derive(request: DeriveSharedSecretRequest) -> Prepared:
    if request.Recipient is not None:
        raise UnsupportedOperationException("Recipient (attestation) is not supported.")
    return Prepared({"kms:KeyAgreementAlgorithm": request.KeyAgreementAlgorithm.value})


@dataclasses.dataclass(frozen=True, slots=True)
class _SigningPlan:
    """How a request's message becomes what the key store signs, for one (key spec, signing
    algorithm, message type): worked out once, as the checks depend on nothing else."""

    algorithm: SigningAlgorithm
    digest_length: int | None
    """The length a DIGEST must have; None for RAW."""
    hasher: Callable[[bytes], Any] | None
    """For RAW with a hash-then-sign algorithm: the hash to apply here."""


@functools.lru_cache(maxsize=1024)
def _signing_plan(spec: str, algorithm: SigningAlgorithmSpec, kind: MessageType) -> _SigningPlan:
    """AWS's checks of a signing request against the key's spec: the algorithm must be one of
    the spec's (InvalidKeyUsageException), the message type one the algorithm and spec take
    (ValidationException). Errors are raised, hence never cached."""
    if algorithm not in KEY_TYPES_BY_NAME[spec].signing:
        raise InvalidKeyUsageException(
            f"Algorithm {algorithm} is incompatible with key spec {spec}."
        )
    required = _REQUIRED_MESSAGE_TYPE.get(algorithm)
    if required is not None and kind is not required:
        # spec: "Message type DIGEST is incompatible with algorithm ED25519_SHA_512." (floci,
        # measured against AWS)
        raise ValidationException(
            f"Message type {kind} is incompatible with algorithm {algorithm}."
        )
    ml_dsa = key_family(spec) is KeyFamily.ML_DSA
    if (kind is MessageType.EXTERNAL_MU) != ml_dsa and kind is not MessageType.RAW:
        raise ValidationException(f"Message type {kind} is incompatible with key spec {spec}.")
    signing = SigningAlgorithm(algorithm.value)
    facts = signing.facts
    if kind is not MessageType.RAW:
        return _SigningPlan(signing, facts.digest_length, None)
    if facts.signs_digest:
        return _SigningPlan(signing, None, functools.partial(hashlib.new, facts.hash_name))
    return _SigningPlan(signing, None, None)


def _signing_input(
    key: KeyRecord,
    algorithm: SigningAlgorithmSpec,
    message_type: MessageType | None,
    message: bytes,
) -> tuple[SigningAlgorithm, bytes]:
    """The key store's algorithm and what it signs (a digest computed here for RAW with a
    hash-then-sign algorithm), after AWS's checks (:func:`_signing_plan`) and, for a DIGEST,
    the digest's length (ValidationException)."""
    plan = _signing_plan(key.key_spec, algorithm, message_type or MessageType.RAW)
    if plan.digest_length is not None:
        if len(message) != plan.digest_length:
            # spec: "Digest is invalid length for algorithm ECDSA_SHA_256." (§1.9)
            raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
        return plan.algorithm, message
    if plan.hasher is not None:
        return plan.algorithm, plan.hasher(message).digest()
    return plan.algorithm, message


def _unsupported_algorithm(algorithm: SigningAlgorithmSpec, exc: UnsupportedByToken) -> Exception:
    return UnsupportedOperationException(
        f"Signing algorithm {algorithm} is not supported by this key store: {exc.message}."
    )


class AsymmetricOperations(ServiceCore):
    """The key pair operations of :class:`~hsmkms.service.KmsService`."""

    @operation("Sign", prepare=_prepare_signing)
    def sign(self, call: Call[SignRequest]) -> SignResponse:
        """Sign a message (RAW: hashed here first, for RSA and ECDSA) or a digest (DIGEST) with
        the key pair's private key, inside the token. ECDSA signatures are DER."""
        request, key = call.request, call.key
        algorithm, data = _signing_input(
            key, request.SigningAlgorithm, request.MessageType, request.Message
        )
        self._dry_run(request.DryRun)
        ref = material_ref(call.version.material_ref)
        try:
            signature = self._stores.backend_for(ref).sign(ref, data, algorithm)
        except UnsupportedByToken as exc:
            raise _unsupported_algorithm(request.SigningAlgorithm, exc) from None
        # Built from trusted values: skip re-validation on the hot path.
        return SignResponse.trusted(
            KeyId=key.arn, Signature=signature, SigningAlgorithm=request.SigningAlgorithm
        )

    @operation("Verify", prepare=_prepare_signing)
    def verify(self, call: Call[VerifyRequest]) -> VerifyResponse:
        """Verify a signature inside the token with the key pair's public key; a signature that
        does not verify is KMSInvalidSignatureException (AWS never answers
        ``SignatureValid: false``)."""
        request, key = call.request, call.key
        algorithm, data = _signing_input(
            key, request.SigningAlgorithm, request.MessageType, request.Message
        )
        self._dry_run(request.DryRun)
        ref = material_ref(call.version.material_ref)
        try:
            valid = self._stores.backend_for(ref).verify(ref, data, request.Signature, algorithm)
        except UnsupportedByToken as exc:
            raise _unsupported_algorithm(request.SigningAlgorithm, exc) from None
        if not valid:
            raise KMSInvalidSignatureException()
        return VerifyResponse(
            KeyId=key.arn, SignatureValid=True, SigningAlgorithm=request.SigningAlgorithm
        )

    def _public_key(self, version: KeyVersionRecord) -> bytes:
        ref = material_ref(version.material_ref)
        return self._stores.backend_for(ref).public_key(ref)

    @operation("GetPublicKey")
    def get_public_key(self, call: Call[GetPublicKeyRequest]) -> GetPublicKeyResponse:
        """The key pair's public key (DER SubjectPublicKeyInfo) with its spec, usage and the
        algorithms of its usage, as DescribeKey shows them."""
        key = call.key
        key_type = KEY_TYPES[KeySpec(key.key_spec)]
        usage = KeyUsage(key.key_usage)
        return GetPublicKeyResponse.model_validate(
            {
                "KeyId": key.arn,
                "PublicKey": self._public_key(call.version),
                "CustomerMasterKeySpec": customer_master_key_spec(key.key_spec),
                "KeySpec": key_type.spec,
                "KeyUsage": usage,
                **key_type.algorithm_lists(usage),
            }
        )

    @operation("DeriveSharedSecret", prepare=_prepare_derive)
    def derive_shared_secret(
        self, call: Call[DeriveSharedSecretRequest]
    ) -> DeriveSharedSecretResponse:
        """ECDH inside the token between the key agreement key pair's private key and the
        peer's public key (DER SubjectPublicKeyInfo on the key's curve): the raw shared secret.

        Security contract: the shared secret is returned to the caller only."""
        request, key = call.request, call.key
        self._dry_run(request.DryRun)
        ref = material_ref(call.version.material_ref)
        try:
            secret = self._stores.backend_for(ref).derive_shared_secret(ref, request.PublicKey)
        except TokenRejected:
            raise ValidationException(
                "PublicKey must be a DER-encoded X.509 public key (SubjectPublicKeyInfo) on the "
                f"curve of the KMS key ({key.key_spec})."
            ) from None
        return DeriveSharedSecretResponse(
            KeyId=key.arn,
            SharedSecret=secret,
            KeyAgreementAlgorithm=request.KeyAgreementAlgorithm,
            KeyOrigin=OriginType(key.origin),
        )

    def _no_ml_kem(self, key: KeyRecord) -> UnsupportedOperationException:
        # An ML-KEM key cannot be created on any token hsmkms supports (CreateKey refuses the
        # spec), so only a key usage check precedes this.
        return UnsupportedOperationException(f"KeySpec {key.key_spec} is not supported.")

    @operation("Encapsulate")
    def encapsulate(self, call: Call[EncapsulateRequest]) -> EncapsulateResponse:
        """Encapsulate (ML-KEM): refused. The template already answered NotFound, a state
        error or InvalidKeyUsageException for every key hsmkms can hold."""
        raise self._no_ml_kem(call.key)

    @operation("Decapsulate")
    def decapsulate(self, call: Call[DecapsulateRequest]) -> DecapsulateResponse:
        """Decapsulate (ML-KEM): refused, as Encapsulate."""
        raise self._no_ml_kem(call.key)
