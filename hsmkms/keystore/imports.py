"""Imported key material (AWS KMS "bring your own key"): the wrapping key pairs and algorithms,
the formats of wrapped material, and what an import returns. Pure: no ``pkcs11`` here; the
token side is :mod:`hsmkms.keystore.pkcs11_mechanisms`.

A caller wraps its key material with the public half of an RSA *wrapping key pair* that lives
in the token (:class:`WrappingKeyRef`: the private key is a token object that can only unwrap,
sensitive and never extractable), and the token unwraps it into a new token object: the
material is never in host memory in plaintext. The wrapped forms (AWS KMS
``WrappingAlgorithm``, reference/xks-and-key-stores.md §3)::

    RSAES_OAEP_SHA_1 / _SHA_256         RSAES-OAEP(material), MGF1 with the same hash, no label
    RSA_AES_KEY_WRAP_SHA_1 / _SHA_256   RSAES-OAEP(ephemeral AES key) || AES-KWP(material)
                                        (the RSA part is as long as the modulus; AES key wrap
                                        with padding, RFC 5649; PKCS#11's CKM_RSA_AES_KEY_WRAP)

The material (:func:`material_format`): SYMMETRIC_DEFAULT 32 raw bytes, HMAC_<n> raw bytes of
the spec's length (n / 8), a key pair its private key as DER PKCS#8.

The *check value* an import returns (:class:`ImportedMaterial`) is computed inside the token
from the new objects and identifies the material without revealing it, so that a later import
can be compared with this one after the objects are gone (``docs/keystore.md``, "Imported key
material")::

    SYMMETRIC_DEFAULT   AES-256-ECB(material, "hsmkms-kcv-v1\\0\\0\\0")          16 bytes
    HMAC_<n>            HMAC-SHA-<n>(material, "hsmkms-kcv-v1")                 n / 8 bytes
    key pair            SHA-256(DER SubjectPublicKeyInfo of its public key)    32 bytes

The definitions are part of the stored format (the service derives AWS's ``KeyMaterialId``
from them): never change one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
from typing import Final

from hsmkms.keystore.base import DEFAULT_STORE, KeyMaterialRef, MaterialName
from hsmkms.keystore.specs import KeyMaterialSpec, MaterialKind

__all__ = [
    "CHECK_BLOCK",
    "CHECK_DATA",
    "WRAPPING_LABEL_PREFIX",
    "ImportedMaterial",
    "MaterialFormat",
    "WrappingAlgorithm",
    "WrappingKeyRef",
    "WrappingKeySpec",
    "kwp_length",
    "material_format",
    "wrapping_key_end",
    "wrapping_key_name",
]

WRAPPING_LABEL_PREFIX: Final = "hsmkms:import:"
"""The label of every wrapping key pair's private key object starts with this."""

_WRAPPING_LABEL = re.compile(r"hsmkms:import:[0-9a-f]{16}:([0-9]{8})")


def wrapping_key_name(key_id: str, ends: dt.date) -> MaterialName:
    """The name of a wrapping key pair for key ``key_id`` that is of no use after ``ends``:
    ``hsmkms:import:<first 16 hex of the key id>:<YYYYMMDD>`` (39 bytes; the day is in the
    label because SoftHSM 2.6.1 stores ``CKA_END_DATE`` but fails to read it back, measured)."""
    return MaterialName(
        f"{WRAPPING_LABEL_PREFIX}{key_id.replace('-', '')[:16]}:{ends:%Y%m%d}", per_role=False
    )


def wrapping_key_end(label: str) -> dt.date | None:
    """The day after which the wrapping key pair labelled ``label`` is of no use; None when the
    label is not one :func:`wrapping_key_name` makes."""
    found = _WRAPPING_LABEL.fullmatch(label)
    if found is None:
        return None
    try:
        return dt.datetime.strptime(found.group(1), "%Y%m%d").date()
    except ValueError:
        return None


CHECK_BLOCK: Final = b"hsmkms-kcv-v1\x00\x00\x00"
"""The AES block a symmetric check value encrypts (16 bytes)."""

CHECK_DATA: Final = b"hsmkms-kcv-v1"
"""The message an HMAC check value authenticates."""


class WrappingKeySpec(enum.Enum):
    """The RSA wrapping key pairs GetParametersForImport hands out (AWS ``WrappingKeySpec``;
    SM2 is China-only and not offered)."""

    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"

    @property
    def bits(self) -> int:
        """The modulus size."""
        return int(self.value.removeprefix("RSA_"))

    @property
    def modulus_length(self) -> int:
        """Bytes of an RSA block under this key (the length of its OAEP ciphertexts)."""
        return self.bits // 8


class WrappingAlgorithm(enum.Enum):
    """How key material is wrapped for import (AWS ``WrappingAlgorithm``; RSAES_PKCS1_V1_5,
    withdrawn by AWS in 2023, and SM2PKE are not offered)."""

    RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
    RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"
    RSA_AES_KEY_WRAP_SHA_1 = "RSA_AES_KEY_WRAP_SHA_1"
    RSA_AES_KEY_WRAP_SHA_256 = "RSA_AES_KEY_WRAP_SHA_256"

    @property
    def hash_name(self) -> str:
        """The OAEP hash (and MGF1 hash), as :mod:`hashlib` names it."""
        return "sha1" if self.value.endswith("_SHA_1") else "sha256"

    @property
    def hash_length(self) -> int:
        """Bytes of the OAEP hash."""
        return 20 if self.hash_name == "sha1" else 32

    @property
    def two_step(self) -> bool:
        """Whether the material is AES-KWP-wrapped under an RSA-wrapped ephemeral AES key."""
        return self.value.startswith("RSA_AES_KEY_WRAP")

    def max_oaep_message(self, spec: WrappingKeySpec) -> int:
        """The longest message RSAES-OAEP carries under a key of ``spec`` (RFC 8017 §7.1.1)."""
        return spec.modulus_length - 2 * self.hash_length - 2


@dataclasses.dataclass(frozen=True)
class WrappingKeyRef:
    """Names a wrapping key pair's private key object in a key store. Stored with the import
    token (the row is sealed); no secret here.

    Text form: ``wrap1:<store id>:<WrappingKeySpec>:<hex object id>``.
    """

    spec: WrappingKeySpec
    object_id: str
    store: str = DEFAULT_STORE

    _TEXT = re.compile(r"wrap1:([a-z0-9][a-z0-9-]{0,63}):(RSA_[0-9]{4}):((?:[0-9a-f]{2}){1,64})")

    def __post_init__(self) -> None:
        if not isinstance(self.spec, WrappingKeySpec):
            raise TypeError("spec must be a WrappingKeySpec")
        KeyMaterialRef.check_store_id(self.store)
        if not re.fullmatch(r"(?:[0-9a-f]{2}){1,64}", self.object_id):
            raise ValueError("the object id must be lowercase hex")

    @property
    def raw_id(self) -> bytes:
        """The object's ``CKA_ID``."""
        return bytes.fromhex(self.object_id)

    def to_str(self) -> str:
        """The stored text form."""
        return f"wrap1:{self.store}:{self.spec.value}:{self.object_id}"

    @classmethod
    def from_str(cls, value: str) -> WrappingKeyRef:
        """Parse the stored text form; ``ValueError`` when malformed."""
        found = cls._TEXT.fullmatch(value)
        if found is None:
            raise ValueError("malformed wrapping key reference")
        store, spec, object_id = found.groups()
        return cls(WrappingKeySpec(spec), object_id, store)


@dataclasses.dataclass(frozen=True)
class ImportedMaterial:
    """What an import made: the material's token object(s), and its check value (module
    docstring), computed inside the token."""

    ref: KeyMaterialRef
    check_value: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class MaterialFormat:
    """What the wrapped material of a spec is."""

    description: str
    length: int | None
    """Exact length in bytes (raw secrets); None for a DER PKCS#8 private key."""
    oaep_allowed: bool
    """Whether RSAES-OAEP alone may carry it (AWS: never an RSA private key)."""


def material_format(spec: KeyMaterialSpec) -> MaterialFormat:
    """The format of ``spec``'s material when imported."""
    facts = spec.facts
    if facts.kind is MaterialKind.SYMMETRIC:
        return MaterialFormat("32 raw bytes", 32, True)
    if facts.kind is MaterialKind.HMAC:
        length = facts.key_bits // 8
        return MaterialFormat(f"{length} raw bytes", length, True)
    if facts.kind is MaterialKind.RSA:
        return MaterialFormat("a DER PKCS#8 RSA private key", None, False)
    return MaterialFormat("a DER PKCS#8 EC private key", None, True)


def kwp_length(material_length: int) -> int:
    """The length of an AES key wrap with padding (RFC 5649) of ``material_length`` bytes."""
    return 8 + max(8, -(-material_length // 8) * 8)
