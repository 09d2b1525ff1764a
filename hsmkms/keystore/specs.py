"""Key material specs: what kind of key a backend creates, and the facts every backend shares.

A :class:`KeyMaterialSpec` names the material (the names are AWS KMS ``KeySpec`` values); its
:class:`SpecFacts` in :data:`SPECS` say which token objects one piece of material is made of
(their roles, in the order a key material reference lists their ids) and which operations it
takes. Symmetric material (``SYMMETRIC_DEFAULT``) takes its objects from its mechanism profile
(:mod:`hsmkms.profiles`); every other spec has a fixed set.

Pure: no ``pkcs11`` here. How a spec is generated and used on a PKCS#11 token is the backend's
business (:mod:`hsmkms.keystore.pkcs11_mechanisms`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator

from hsmkms.profiles import MechanismProfile, ObjectRole

__all__ = [
    "SPECS",
    "AsymmetricEncryption",
    "EncryptionFacts",
    "KeyMaterialSpec",
    "MaterialKind",
    "MaterialUsage",
    "SignatureScheme",
    "SigningAlgorithm",
    "SigningFacts",
    "SpecFacts",
    "SpecRegistry",
]


class KeyMaterialSpec(enum.Enum):
    """The kind of key material a backend creates (named as AWS KMS key specs)."""

    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
    """AES-256 encryption under a mechanism profile (the ciphertext blob's AEAD)."""
    HMAC_224 = "HMAC_224"
    HMAC_256 = "HMAC_256"
    """Also the service's own MAC keys: the audit trail's seal and the row integrity key."""
    HMAC_384 = "HMAC_384"
    HMAC_512 = "HMAC_512"
    RSA_2048 = "RSA_2048"
    """An RSA key pair (modulus 2048 bits) for signing (RSASSA-PSS, PKCS#1 v1.5) or
    encryption (RSAES-OAEP)."""
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    ECC_NIST_P256 = "ECC_NIST_P256"
    """A NIST P-256 key pair for signing (ECDSA) or key agreement (ECDH)."""
    ECC_NIST_P384 = "ECC_NIST_P384"
    ECC_NIST_P521 = "ECC_NIST_P521"
    ECC_SECG_P256K1 = "ECC_SECG_P256K1"
    """A secp256k1 key pair for signing (ECDSA)."""
    ECC_NIST_EDWARDS25519 = "ECC_NIST_EDWARDS25519"
    """An Ed25519 key pair for signing (EdDSA; Ed25519ph where the token performs it)."""
    ML_DSA_44 = "ML_DSA_44"
    """ML-DSA key pairs (FIPS 204): known to hsmkms so that a token without the mechanisms
    refuses them by name; the PKCS#11 backend has no implementation yet."""
    ML_DSA_65 = "ML_DSA_65"
    ML_DSA_87 = "ML_DSA_87"
    ML_KEM_512 = "ML_KEM_512"
    """ML-KEM key pairs (FIPS 203): as ML-DSA."""
    ML_KEM_768 = "ML_KEM_768"
    ML_KEM_1024 = "ML_KEM_1024"

    @property
    def facts(self) -> SpecFacts:
        """This spec's facts (from :data:`SPECS`)."""
        return SPECS.facts(self)


class MaterialKind(enum.Enum):
    """What operations a piece of material takes."""

    SYMMETRIC = "symmetric"
    """encrypt / decrypt (AEAD under a mechanism profile)"""
    HMAC = "hmac"
    """mac / verify_mac"""
    RSA = "rsa"
    """sign / verify or asymmetric_encrypt / asymmetric_decrypt (by the key's usage),
    public_key"""
    EC = "ec"
    """sign / verify or derive_shared_secret (by the key's usage), public_key"""
    EDWARDS = "edwards"
    """sign / verify (EdDSA), public_key"""
    ML_DSA = "ml_dsa"
    """sign / verify (ML-DSA), public_key"""
    ML_KEM = "ml_kem"
    """encapsulate / decapsulate (ML-KEM), public_key"""


class MaterialUsage(enum.Enum):
    """What new material will be used for (named as AWS KMS key usages). It decides the token
    objects' capabilities: an EC key pair signs, or it agrees keys, never both."""

    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
    SIGN_VERIFY = "SIGN_VERIFY"
    KEY_AGREEMENT = "KEY_AGREEMENT"
    ENCAPSULATE_DECAPSULATE = "ENCAPSULATE_DECAPSULATE"


@dataclasses.dataclass(frozen=True)
class SpecFacts:
    """The backend-independent facts of one key material spec."""

    spec: KeyMaterialSpec
    kind: MaterialKind
    key_bits: int
    """AES key size, HMAC key size (= the digest size, as AWS KMS), RSA modulus size, the EC
    field size; 0 for ML-DSA and ML-KEM (a parameter set, not a key size)."""
    fixed_roles: tuple[ObjectRole, ...] | None
    """The token objects of one piece of material, in reference order; ``None``: the mechanism
    profile's (symmetric material)."""
    usages: tuple[MaterialUsage, ...]
    """The usages material of this spec can be made for; the first is the default."""
    mac_length: int | None = None
    """Bytes of an HMAC tag (HMAC specs)."""

    def usage(self, wanted: MaterialUsage | None) -> MaterialUsage:
        """``wanted``, or the default usage; ``ValueError`` when this spec does not allow it."""
        if wanted is None:
            return self.usages[0]
        if wanted not in self.usages:
            raise ValueError(f"{self.spec.value} material is not for {wanted.value}")
        return wanted

    @property
    def takes_profile(self) -> bool:
        """Whether material of this spec is made under a mechanism profile."""
        return self.fixed_roles is None

    def roles(self, profile: MechanismProfile | None) -> tuple[ObjectRole, ...]:
        """The token objects' roles for material of this spec made under ``profile``.
        ``ValueError`` when a profile is missing where one is needed, or given where none is."""
        if self.fixed_roles is None:
            if profile is None:
                raise ValueError(f"{self.spec.value} material needs a mechanism profile")
            return profile.facts.roles
        if profile is not None:
            raise ValueError(f"{self.spec.value} material has no mechanism profile")
        return self.fixed_roles


class SpecRegistry:
    """The known specs' facts. Immutable."""

    def __init__(self, specs: list[SpecFacts]) -> None:
        self._facts: dict[KeyMaterialSpec, SpecFacts] = {}
        for facts in specs:
            if facts.spec in self._facts:
                raise ValueError(f"spec {facts.spec.value} registered twice")
            self._facts[facts.spec] = facts
        missing = set(KeyMaterialSpec) - set(self._facts)
        if missing:
            raise ValueError(f"specs without facts: {sorted(s.value for s in missing)}")

    def facts(self, spec: KeyMaterialSpec | str) -> SpecFacts:
        """The facts of ``spec`` (the member or its name); ``ValueError`` when unknown."""
        return self._facts[KeyMaterialSpec(spec)]

    def __iter__(self) -> Iterator[SpecFacts]:
        return iter(self._facts.values())


def _hmac(spec: KeyMaterialSpec, bits: int) -> SpecFacts:
    return SpecFacts(
        spec, MaterialKind.HMAC, bits, (ObjectRole.MAC,), (MaterialUsage.GENERATE_VERIFY_MAC,),
        mac_length=bits // 8,
    )  # fmt: skip


_PAIR = (ObjectRole.KEY_PAIR,)
_SIGN = MaterialUsage.SIGN_VERIFY
_RSA_USAGES = (_SIGN, MaterialUsage.ENCRYPT_DECRYPT)
_EC_USAGES = (_SIGN, MaterialUsage.KEY_AGREEMENT)


def _pair(
    spec: KeyMaterialSpec, kind: MaterialKind, bits: int, *usages: MaterialUsage
) -> SpecFacts:
    return SpecFacts(spec, kind, bits, _PAIR, usages)


SPECS = SpecRegistry(
    [
        SpecFacts(
            KeyMaterialSpec.SYMMETRIC_DEFAULT,
            MaterialKind.SYMMETRIC,
            256,
            None,
            (MaterialUsage.ENCRYPT_DECRYPT,),
        ),
        _hmac(KeyMaterialSpec.HMAC_224, 224),
        _hmac(KeyMaterialSpec.HMAC_256, 256),
        _hmac(KeyMaterialSpec.HMAC_384, 384),
        _hmac(KeyMaterialSpec.HMAC_512, 512),
        _pair(KeyMaterialSpec.RSA_2048, MaterialKind.RSA, 2048, *_RSA_USAGES),
        _pair(KeyMaterialSpec.RSA_3072, MaterialKind.RSA, 3072, *_RSA_USAGES),
        _pair(KeyMaterialSpec.RSA_4096, MaterialKind.RSA, 4096, *_RSA_USAGES),
        _pair(KeyMaterialSpec.ECC_NIST_P256, MaterialKind.EC, 256, *_EC_USAGES),
        _pair(KeyMaterialSpec.ECC_NIST_P384, MaterialKind.EC, 384, *_EC_USAGES),
        _pair(KeyMaterialSpec.ECC_NIST_P521, MaterialKind.EC, 521, *_EC_USAGES),
        _pair(KeyMaterialSpec.ECC_SECG_P256K1, MaterialKind.EC, 256, _SIGN),
        _pair(KeyMaterialSpec.ECC_NIST_EDWARDS25519, MaterialKind.EDWARDS, 255, _SIGN),
        _pair(KeyMaterialSpec.ML_DSA_44, MaterialKind.ML_DSA, 0, _SIGN),
        _pair(KeyMaterialSpec.ML_DSA_65, MaterialKind.ML_DSA, 0, _SIGN),
        _pair(KeyMaterialSpec.ML_DSA_87, MaterialKind.ML_DSA, 0, _SIGN),
        _pair(
            KeyMaterialSpec.ML_KEM_512,
            MaterialKind.ML_KEM,
            0,
            MaterialUsage.ENCAPSULATE_DECAPSULATE,
        ),
        _pair(
            KeyMaterialSpec.ML_KEM_768,
            MaterialKind.ML_KEM,
            0,
            MaterialUsage.ENCAPSULATE_DECAPSULATE,
        ),
        _pair(
            KeyMaterialSpec.ML_KEM_1024,
            MaterialKind.ML_KEM,
            0,
            MaterialUsage.ENCAPSULATE_DECAPSULATE,
        ),
    ]
)
"""Every spec hsmkms knows."""


class SigningAlgorithm(enum.Enum):
    """A signature scheme (named as AWS KMS signing algorithms).

    Backends sign and verify what :attr:`SigningFacts.input_length` says: for the
    hash-then-sign schemes (RSA, ECDSA) a *digest*, which a caller holding a message computes
    first with :attr:`SigningFacts.hash_name` (hashing is not secret); for pure EdDSA and ML-DSA
    the message itself; for Ed25519ph the 64-byte SHA-512 digest the caller was given (the
    scheme hashes it once more, as AWS KMS's ED25519_PH_SHA_512 does)."""

    RSASSA_PSS_SHA_256 = "RSASSA_PSS_SHA_256"
    RSASSA_PSS_SHA_384 = "RSASSA_PSS_SHA_384"
    RSASSA_PSS_SHA_512 = "RSASSA_PSS_SHA_512"
    RSASSA_PKCS1_V1_5_SHA_256 = "RSASSA_PKCS1_V1_5_SHA_256"
    RSASSA_PKCS1_V1_5_SHA_384 = "RSASSA_PKCS1_V1_5_SHA_384"
    RSASSA_PKCS1_V1_5_SHA_512 = "RSASSA_PKCS1_V1_5_SHA_512"
    ECDSA_SHA_256 = "ECDSA_SHA_256"
    ECDSA_SHA_384 = "ECDSA_SHA_384"
    ECDSA_SHA_512 = "ECDSA_SHA_512"
    ED25519_SHA_512 = "ED25519_SHA_512"
    ED25519_PH_SHA_512 = "ED25519_PH_SHA_512"
    ML_DSA_SHAKE_256 = "ML_DSA_SHAKE_256"

    @property
    def facts(self) -> SigningFacts:
        """This algorithm's facts."""
        return _SIGNING[self]


class SignatureScheme(enum.Enum):
    """How a signing algorithm turns a digest into a signature."""

    RSASSA_PSS = "RSASSA_PSS"
    """RSASSA-PSS, MGF1 with the digest's hash, salt as long as the digest (as AWS KMS)."""
    RSASSA_PKCS1_V1_5 = "RSASSA_PKCS1_V1_5"
    ECDSA = "ECDSA"
    """ECDSA; the signature DER-encoded (``Ecdsa-Sig-Value``), as X.509 and AWS KMS."""
    EDDSA = "EDDSA"
    """Pure EdDSA (RFC 8032) over the message."""
    EDDSA_PH = "EDDSA_PH"
    """HashEdDSA (Ed25519ph, RFC 8032 §5.1) over a message that is itself a SHA-512 digest."""
    ML_DSA = "ML_DSA"
    """ML-DSA (FIPS 204), pure, over the message."""


@dataclasses.dataclass(frozen=True)
class SigningFacts:
    """What a signing algorithm is made of."""

    kind: MaterialKind
    """The material it signs with."""
    scheme: SignatureScheme
    hash_name: str
    """The digest, as :mod:`hashlib` names it (``shake_256`` for ML-DSA)."""
    digest_length: int
    """Bytes of the algorithm's digest (what AWS's MessageType DIGEST must be)."""
    signs_digest: bool = True
    """Whether the backend signs a digest of :attr:`digest_length` bytes the caller computed
    (RSA, ECDSA, Ed25519ph); else it signs the message itself (pure EdDSA, ML-DSA)."""

    def input_ok(self, data: bytes) -> bool:
        """Whether ``data`` has the length the backend signs for this algorithm."""
        return len(data) == self.digest_length if self.signs_digest else 0 < len(data) <= 4096


_RSA, _EC, _ED = MaterialKind.RSA, MaterialKind.EC, MaterialKind.EDWARDS
_PSS, _PKCS1 = SignatureScheme.RSASSA_PSS, SignatureScheme.RSASSA_PKCS1_V1_5
_SIGNING: dict[SigningAlgorithm, SigningFacts] = {
    SigningAlgorithm.RSASSA_PSS_SHA_256: SigningFacts(_RSA, _PSS, "sha256", 32),
    SigningAlgorithm.RSASSA_PSS_SHA_384: SigningFacts(_RSA, _PSS, "sha384", 48),
    SigningAlgorithm.RSASSA_PSS_SHA_512: SigningFacts(_RSA, _PSS, "sha512", 64),
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_256: SigningFacts(_RSA, _PKCS1, "sha256", 32),
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_384: SigningFacts(_RSA, _PKCS1, "sha384", 48),
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_512: SigningFacts(_RSA, _PKCS1, "sha512", 64),
    SigningAlgorithm.ECDSA_SHA_256: SigningFacts(_EC, SignatureScheme.ECDSA, "sha256", 32),
    SigningAlgorithm.ECDSA_SHA_384: SigningFacts(_EC, SignatureScheme.ECDSA, "sha384", 48),
    SigningAlgorithm.ECDSA_SHA_512: SigningFacts(_EC, SignatureScheme.ECDSA, "sha512", 64),
    SigningAlgorithm.ED25519_SHA_512: SigningFacts(
        _ED, SignatureScheme.EDDSA, "sha512", 64, signs_digest=False
    ),
    SigningAlgorithm.ED25519_PH_SHA_512: SigningFacts(_ED, SignatureScheme.EDDSA_PH, "sha512", 64),
    SigningAlgorithm.ML_DSA_SHAKE_256: SigningFacts(
        MaterialKind.ML_DSA, SignatureScheme.ML_DSA, "shake_256", 64, signs_digest=False
    ),
}


class AsymmetricEncryption(enum.Enum):
    """A public-key encryption scheme (named as AWS KMS encryption algorithms): RSAES-OAEP with
    the same hash for OAEP and MGF1 and an empty label, as AWS KMS."""

    RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
    RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"

    @property
    def facts(self) -> EncryptionFacts:
        """This scheme's facts."""
        return _ENCRYPTION[self]


@dataclasses.dataclass(frozen=True)
class EncryptionFacts:
    """What an asymmetric encryption scheme is made of."""

    hash_name: str
    """The OAEP (and MGF1) hash, as :mod:`hashlib` names it."""
    hash_length: int

    def max_plaintext(self, modulus_bytes: int) -> int:
        """The longest plaintext OAEP fits in a modulus of ``modulus_bytes`` (RFC 8017 §7.1.1:
        ``k - 2 hLen - 2``)."""
        return modulus_bytes - 2 * self.hash_length - 2


_ENCRYPTION: dict[AsymmetricEncryption, EncryptionFacts] = {
    AsymmetricEncryption.RSAES_OAEP_SHA_1: EncryptionFacts("sha1", 20),
    AsymmetricEncryption.RSAES_OAEP_SHA_256: EncryptionFacts("sha256", 32),
}
