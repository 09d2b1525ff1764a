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
    """An RSA key pair (modulus 2048 bits) for signing: RSASSA-PSS and PKCS#1 v1.5."""
    ECC_NIST_P256 = "ECC_NIST_P256"
    """A NIST P-256 key pair for signing (ECDSA) or key agreement (ECDH)."""

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
    """sign / verify, public_key"""
    EC = "ec"
    """sign / verify or derive_shared_secret (by the key's usage), public_key"""


class MaterialUsage(enum.Enum):
    """What new material will be used for (named as AWS KMS key usages). It decides the token
    objects' capabilities: an EC key pair signs, or it agrees keys, never both."""

    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
    SIGN_VERIFY = "SIGN_VERIFY"
    KEY_AGREEMENT = "KEY_AGREEMENT"


@dataclasses.dataclass(frozen=True)
class SpecFacts:
    """The backend-independent facts of one key material spec."""

    spec: KeyMaterialSpec
    kind: MaterialKind
    key_bits: int
    """AES key size, HMAC key size (= the digest size, as AWS KMS), RSA modulus size, or the
    EC field size."""
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
        SpecFacts(KeyMaterialSpec.RSA_2048, MaterialKind.RSA, 2048, _PAIR, (_SIGN,)),
        SpecFacts(
            KeyMaterialSpec.ECC_NIST_P256,
            MaterialKind.EC,
            256,
            _PAIR,
            (_SIGN, MaterialUsage.KEY_AGREEMENT),
        ),
    ]
)
"""Every spec hsmkms knows."""


class SigningAlgorithm(enum.Enum):
    """A signature scheme over a message digest (named as AWS KMS signing algorithms).

    Backends sign and verify *digests*: a caller holding a message hashes it first with
    :attr:`SigningFacts.hash_name` (hashing is not secret)."""

    RSASSA_PSS_SHA_256 = "RSASSA_PSS_SHA_256"
    RSASSA_PSS_SHA_384 = "RSASSA_PSS_SHA_384"
    RSASSA_PSS_SHA_512 = "RSASSA_PSS_SHA_512"
    RSASSA_PKCS1_V1_5_SHA_256 = "RSASSA_PKCS1_V1_5_SHA_256"
    RSASSA_PKCS1_V1_5_SHA_384 = "RSASSA_PKCS1_V1_5_SHA_384"
    RSASSA_PKCS1_V1_5_SHA_512 = "RSASSA_PKCS1_V1_5_SHA_512"
    ECDSA_SHA_256 = "ECDSA_SHA_256"

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


@dataclasses.dataclass(frozen=True)
class SigningFacts:
    """What a signing algorithm is made of."""

    kind: MaterialKind
    """The material it signs with (RSA or EC)."""
    scheme: SignatureScheme
    hash_name: str
    """The digest, as :mod:`hashlib` names it."""
    digest_length: int
    """Bytes of digest the backend signs."""


_RSA, _EC = MaterialKind.RSA, MaterialKind.EC
_PSS, _PKCS1 = SignatureScheme.RSASSA_PSS, SignatureScheme.RSASSA_PKCS1_V1_5
_SIGNING: dict[SigningAlgorithm, SigningFacts] = {
    SigningAlgorithm.RSASSA_PSS_SHA_256: SigningFacts(_RSA, _PSS, "sha256", 32),
    SigningAlgorithm.RSASSA_PSS_SHA_384: SigningFacts(_RSA, _PSS, "sha384", 48),
    SigningAlgorithm.RSASSA_PSS_SHA_512: SigningFacts(_RSA, _PSS, "sha512", 64),
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_256: SigningFacts(_RSA, _PKCS1, "sha256", 32),
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_384: SigningFacts(_RSA, _PKCS1, "sha384", 48),
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_512: SigningFacts(_RSA, _PKCS1, "sha512", 64),
    SigningAlgorithm.ECDSA_SHA_256: SigningFacts(_EC, SignatureScheme.ECDSA, "sha256", 32),
}
