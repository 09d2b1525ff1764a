"""GenerateDataKeyPair and GenerateDataKeyPairWithoutPlaintext: an asymmetric key pair for use
outside hsmkms, its private key encrypted under a symmetric key.

Where the pair is made: on the host, by pyca/cryptography (OpenSSL, seeded from the operating
system), not in the token. A data key pair is made to leave: its private key is returned in
plaintext (GenerateDataKeyPair) or decrypted later by any caller allowed to Decrypt, so it must
exist outside the token either way. Making it in the token would need an *extractable*,
non-sensitive private key object that is then read out and destroyed — which says "HSM" while
protecting nothing more, and is refused by tokens configured to forbid extractable keys. What
the token does is what protects the pair: the private key (DER PKCS#8 ``PrivateKeyInfo``) is
encrypted under the symmetric key's current version inside the token, as an ordinary
ciphertext blob with the request's encryption context, so Decrypt returns it. The public key
is DER ``SubjectPublicKeyInfo``.

Security contract: the private key is returned to the caller (GenerateDataKeyPair only) and
sealed; it is never logged or stored, and the host copy is dropped when the call returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, rsa

from hsmkms.errors import UnsupportedOperationException
from hsmkms.models import (
    GenerateDataKeyPairRequest,
    GenerateDataKeyPairResponse,
    GenerateDataKeyPairWithoutPlaintextRequest,
    GenerateDataKeyPairWithoutPlaintextResponse,
)
from hsmkms.models.enums import DataKeyPairSpec
from hsmkms.service.core import Call, ServiceCore, operation

__all__ = ["DataKeyPairOperations", "generate_key_pair"]

_P = DataKeyPairSpec
_GENERATORS: Final[dict[DataKeyPairSpec, Callable[[], Any]]] = {
    _P.RSA_2048: lambda: rsa.generate_private_key(65537, 2048),
    _P.RSA_3072: lambda: rsa.generate_private_key(65537, 3072),
    _P.RSA_4096: lambda: rsa.generate_private_key(65537, 4096),
    _P.ECC_NIST_P256: lambda: ec.generate_private_key(ec.SECP256R1()),
    _P.ECC_NIST_P384: lambda: ec.generate_private_key(ec.SECP384R1()),
    _P.ECC_NIST_P521: lambda: ec.generate_private_key(ec.SECP521R1()),
    _P.ECC_SECG_P256K1: lambda: ec.generate_private_key(ec.SECP256K1()),
    _P.ECC_NIST_EDWARDS25519: ed25519.Ed25519PrivateKey.generate,
    # PKCS#8 in seed form, as AWS returns ML-KEM private keys.
    _P.ML_KEM_768: mlkem.MLKEM768PrivateKey.generate,
    _P.ML_KEM_1024: mlkem.MLKEM1024PrivateKey.generate,
}
_UNAVAILABLE: Final = {
    # spec: SM2 key pairs exist in the AWS China Regions only.
    _P.SM2: "it exists in the AWS China Regions only",
    _P.ML_KEM_512: "pyca/cryptography, which makes the pair, has no ML-KEM-512",
}


def generate_key_pair(spec: DataKeyPairSpec) -> tuple[bytes, bytes]:
    """A fresh key pair of ``spec``: (DER PKCS#8 private key, DER SubjectPublicKeyInfo).
    UnsupportedOperationException for a spec that cannot be made here."""
    generator = _GENERATORS.get(spec)
    if generator is None:
        raise UnsupportedOperationException(
            f"KeyPairSpec {spec} is not supported: {_UNAVAILABLE[spec]}."
        )
    private = generator()
    private_der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_der, public_der


def _no_recipient(request: GenerateDataKeyPairRequest) -> None:
    if request.Recipient is not None:
        raise UnsupportedOperationException("Recipient (attestation) is not supported.")


class DataKeyPairOperations(ServiceCore):
    """The data key pair operations of :class:`~hsmkms.service.KmsService`."""

    @operation("GenerateDataKeyPair", prepare=_no_recipient)
    def generate_data_key_pair(
        self, call: Call[GenerateDataKeyPairRequest]
    ) -> GenerateDataKeyPairResponse:
        """A data key pair: the public key, the private key in plaintext, and the private key
        encrypted under the symmetric key's current version (a ciphertext blob Decrypt
        opens, bound to the encryption context)."""
        request, key, version = call.request, call.key, call.version
        self._dry_run(request.DryRun)
        private, public = generate_key_pair(request.KeyPairSpec)
        blob = self._seal(key, version, private, request.EncryptionContext or {})
        return GenerateDataKeyPairResponse(
            PrivateKeyCiphertextBlob=blob,
            PrivateKeyPlaintext=private,
            PublicKey=public,
            KeyId=key.arn,
            KeyPairSpec=request.KeyPairSpec,
            KeyMaterialId=self._key_material_id(key, version.version),
        )

    @operation("GenerateDataKeyPairWithoutPlaintext")
    def generate_data_key_pair_without_plaintext(
        self, call: Call[GenerateDataKeyPairWithoutPlaintextRequest]
    ) -> GenerateDataKeyPairWithoutPlaintextResponse:
        """As GenerateDataKeyPair, without the plaintext private key."""
        request, key, version = call.request, call.key, call.version
        self._dry_run(request.DryRun)
        private, public = generate_key_pair(request.KeyPairSpec)
        blob = self._seal(key, version, private, request.EncryptionContext or {})
        return GenerateDataKeyPairWithoutPlaintextResponse(
            PrivateKeyCiphertextBlob=blob,
            PublicKey=public,
            KeyId=key.arn,
            KeyPairSpec=request.KeyPairSpec,
            KeyMaterialId=self._key_material_id(key, version.version),
        )
