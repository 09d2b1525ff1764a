"""What AWS KMS says about each key spec: the key usages it may have, the algorithms of each
usage (DescribeKey's ``EncryptionAlgorithms``, ``SigningAlgorithms``, ``MacAlgorithms``,
``KeyAgreementAlgorithms``, ``EncapsulationAlgorithms``, in AWS's order), and the key material
the key store makes for it.

Pure facts (reference/aws-kms-api.md §1.9, the botocore model, DG "Key spec reference"); which
specs a token can host is the key store's business (``hsmkms doctor``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

from hsmkms.keystore.specs import KeyMaterialSpec, MaterialUsage
from hsmkms.models.enums import (
    CustomerMasterKeySpec,
    EncapsulationAlgorithmSpec,
    EncryptionAlgorithmSpec,
    KeyAgreementAlgorithmSpec,
    KeySpec,
    KeyUsage,
    MacAlgorithmSpec,
    SigningAlgorithmSpec,
)

__all__ = ["KEY_TYPES", "KEY_TYPES_BY_NAME", "KeyType", "customer_master_key_spec"]

_E = EncryptionAlgorithmSpec
_S = SigningAlgorithmSpec
_RSA_SIGNING: Final = (
    _S.RSASSA_PKCS1_V1_5_SHA_256, _S.RSASSA_PKCS1_V1_5_SHA_384, _S.RSASSA_PKCS1_V1_5_SHA_512,
    _S.RSASSA_PSS_SHA_256, _S.RSASSA_PSS_SHA_384, _S.RSASSA_PSS_SHA_512,
)  # fmt: skip
_RSA_ENCRYPTION: Final = (_E.RSAES_OAEP_SHA_1, _E.RSAES_OAEP_SHA_256)
_ECDH: Final = (KeyAgreementAlgorithmSpec.ECDH,)


@dataclasses.dataclass(frozen=True)
class KeyType:
    """One key spec as AWS KMS defines it."""

    spec: KeySpec
    usages: tuple[KeyUsage, ...]
    """The key usages a key of this spec may be created with."""
    material: KeyMaterialSpec | None
    """The key material the key store makes; ``None``: no PKCS#11 token can hold it (SM2)."""
    encryption: tuple[EncryptionAlgorithmSpec, ...] = ()
    signing: tuple[SigningAlgorithmSpec, ...] = ()
    mac: tuple[MacAlgorithmSpec, ...] = ()
    agreement: tuple[KeyAgreementAlgorithmSpec, ...] = ()
    encapsulation: tuple[EncapsulationAlgorithmSpec, ...] = ()

    @property
    def symmetric(self) -> bool:
        """Whether this is the symmetric encryption spec."""
        return self.spec is KeySpec.SYMMETRIC_DEFAULT

    @property
    def asymmetric(self) -> bool:
        """Whether a key of this spec is a key pair (it has a public key)."""
        return not self.symmetric and not self.mac

    def algorithm_lists(self, usage: KeyUsage) -> dict[str, list[str]]:
        """The algorithm member(s) DescribeKey and GetPublicKey show for a key of this spec
        made for ``usage`` (AWS shows only the list of the key's usage)."""
        lists: dict[KeyUsage, tuple[str, tuple[str, ...]]] = {
            KeyUsage.ENCRYPT_DECRYPT: ("EncryptionAlgorithms", self.encryption),
            KeyUsage.SIGN_VERIFY: ("SigningAlgorithms", self.signing),
            KeyUsage.GENERATE_VERIFY_MAC: ("MacAlgorithms", self.mac),
            KeyUsage.KEY_AGREEMENT: ("KeyAgreementAlgorithms", self.agreement),
            KeyUsage.ENCAPSULATE_DECAPSULATE: ("EncapsulationAlgorithms", self.encapsulation),
        }
        member, algorithms = lists[usage]
        return {member: list(algorithms)} if algorithms else {}

    def material_usage(self, usage: KeyUsage) -> MaterialUsage:
        """The key store's name for ``usage``."""
        return MaterialUsage(usage.value)


def _rsa(spec: KeySpec, material: KeyMaterialSpec) -> KeyType:
    usages = (KeyUsage.ENCRYPT_DECRYPT, KeyUsage.SIGN_VERIFY)
    return KeyType(spec, usages, material, encryption=_RSA_ENCRYPTION, signing=_RSA_SIGNING)


def _nist(spec: KeySpec, material: KeyMaterialSpec, signing: SigningAlgorithmSpec) -> KeyType:
    usages = (KeyUsage.SIGN_VERIFY, KeyUsage.KEY_AGREEMENT)
    return KeyType(spec, usages, material, signing=(signing,), agreement=_ECDH)


def _hmac(spec: KeySpec, material: KeyMaterialSpec, mac: MacAlgorithmSpec) -> KeyType:
    return KeyType(spec, (KeyUsage.GENERATE_VERIFY_MAC,), material, mac=(mac,))


def _ml_dsa(spec: KeySpec, material: KeyMaterialSpec) -> KeyType:
    return KeyType(spec, (KeyUsage.SIGN_VERIFY,), material, signing=(_S.ML_DSA_SHAKE_256,))


def _ml_kem(spec: KeySpec, material: KeyMaterialSpec) -> KeyType:
    usages = (KeyUsage.ENCAPSULATE_DECAPSULATE,)
    return KeyType(spec, usages, material, encapsulation=(EncapsulationAlgorithmSpec.ML_KEM,))


_K, _M = KeySpec, KeyMaterialSpec
KEY_TYPES: Final[Mapping[KeySpec, KeyType]] = {
    t.spec: t
    for t in (
        KeyType(_K.SYMMETRIC_DEFAULT, (KeyUsage.ENCRYPT_DECRYPT,), _M.SYMMETRIC_DEFAULT,
                encryption=(_E.SYMMETRIC_DEFAULT,)),
        _rsa(_K.RSA_2048, _M.RSA_2048),
        _rsa(_K.RSA_3072, _M.RSA_3072),
        _rsa(_K.RSA_4096, _M.RSA_4096),
        _nist(_K.ECC_NIST_P256, _M.ECC_NIST_P256, _S.ECDSA_SHA_256),
        _nist(_K.ECC_NIST_P384, _M.ECC_NIST_P384, _S.ECDSA_SHA_384),
        _nist(_K.ECC_NIST_P521, _M.ECC_NIST_P521, _S.ECDSA_SHA_512),
        KeyType(_K.ECC_SECG_P256K1, (KeyUsage.SIGN_VERIFY,), _M.ECC_SECG_P256K1,
                signing=(_S.ECDSA_SHA_256,)),
        KeyType(_K.ECC_NIST_EDWARDS25519, (KeyUsage.SIGN_VERIFY,), _M.ECC_NIST_EDWARDS25519,
                signing=(_S.ED25519_SHA_512, _S.ED25519_PH_SHA_512)),
        _hmac(_K.HMAC_224, _M.HMAC_224, MacAlgorithmSpec.HMAC_SHA_224),
        _hmac(_K.HMAC_256, _M.HMAC_256, MacAlgorithmSpec.HMAC_SHA_256),
        _hmac(_K.HMAC_384, _M.HMAC_384, MacAlgorithmSpec.HMAC_SHA_384),
        _hmac(_K.HMAC_512, _M.HMAC_512, MacAlgorithmSpec.HMAC_SHA_512),
        # spec: SM2 exists only in the AWS China Regions; PKCS#11 defines no SM2 mechanism.
        KeyType(_K.SM2, (KeyUsage.ENCRYPT_DECRYPT, KeyUsage.SIGN_VERIFY, KeyUsage.KEY_AGREEMENT),
                None, encryption=(_E.SM2PKE,), signing=(_S.SM2DSA,), agreement=_ECDH),
        _ml_dsa(_K.ML_DSA_44, _M.ML_DSA_44),
        _ml_dsa(_K.ML_DSA_65, _M.ML_DSA_65),
        _ml_dsa(_K.ML_DSA_87, _M.ML_DSA_87),
        _ml_kem(_K.ML_KEM_512, _M.ML_KEM_512),
        _ml_kem(_K.ML_KEM_768, _M.ML_KEM_768),
        _ml_kem(_K.ML_KEM_1024, _M.ML_KEM_1024),
    )
}  # fmt: skip
"""Every key spec of the AWS KMS API, by spec."""
if set(KEY_TYPES) != set(KeySpec):  # pragma: no cover - import-time check
    raise ImportError("a key spec has no key type")

KEY_TYPES_BY_NAME: Final[Mapping[str, KeyType]] = {s.value: t for s, t in KEY_TYPES.items()}
""":data:`KEY_TYPES` by the spec's name, as the metadata store holds it (the hot paths look a
key's type up without making the enum member)."""

_LEGACY: Final = frozenset(s.value for s in CustomerMasterKeySpec)


def customer_master_key_spec(spec: str) -> CustomerMasterKeySpec | None:
    """DescribeKey's deprecated ``CustomerMasterKeySpec``: the spec, when that older enum has
    it (Ed25519, ML-DSA and ML-KEM keys have none)."""
    return CustomerMasterKeySpec(spec) if spec in _LEGACY else None
