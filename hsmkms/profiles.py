"""Mechanism profiles: how a key version turns plaintext + AAD into ciphertext inside the token.

A profile is named by :class:`MechanismProfile` (the stable name: configuration, the metadata
store's ``profile`` column, key material references) and described by one
:class:`SymmetricProfile` object in the registry :data:`PROFILES` (its frozen wire id, IV and
tag lengths, the token objects of a key version and their roles, and the shape of its output).
Code that needs a fact asks the profile object; nothing branches on which profile it is. The
token operations of each profile are a per-profile object inside the PKCS#11 backend
(:mod:`hsmkms.keystore.pkcs11_mechanisms`).

The profile is recorded per key version (and in every ciphertext blob), so ciphertexts stay
decryptable when the default profile changes.

Adding a profile: a new :class:`MechanismProfile` member, its :class:`SymmetricProfile` in
:data:`PROFILES` with a new wire id (never reuse one), and its implementation in the backend.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "PROFILES",
    "MechanismProfile",
    "ObjectRole",
    "ProfileRegistry",
    "SymmetricProfile",
]


class ObjectRole(enum.Enum):
    """What one token object of a piece of key material does. The value is the object's label
    suffix (``hsmkms:<key>:<version>:<suffix>``), part of the token format: never change one."""

    ENCRYPT = "a"
    """An AES key: encrypt and decrypt only."""
    MAC = "h"
    """A generic secret: HMAC sign and verify only."""
    KEY_PAIR = "k"
    """A key pair: a private key object (sign, or derive for key agreement, only) and a
    public key object (verify only) sharing one id, as PKCS#11 tokens pair them."""


class MechanismProfile(enum.Enum):
    """The name of a symmetric AEAD construction built from mechanisms the token offers. Its
    facts are on :attr:`facts` (the registry's :class:`SymmetricProfile`)."""

    AES_256_GCM = "AES_256_GCM"
    """CKM_AES_GCM, 96-bit IV, 128-bit tag appended to the ciphertext. One AES key object."""

    AES_256_CBC_HMAC_SHA_256 = "AES_256_CBC_HMAC_SHA_256"
    """Encrypt-then-MAC: CKM_AES_CBC_PAD with a 128-bit IV, then CKM_SHA256_HMAC over
    ``len64(aad) || aad || iv || ciphertext``, tag (32 bytes) appended. Two key objects (AES
    and generic secret), both in the token. Portable: what a YubiHSM 2 can do."""

    @property
    def facts(self) -> SymmetricProfile:
        """This profile's facts (from :data:`PROFILES`)."""
        return _FACTS[self]

    @property
    def wire_id(self) -> int:
        """The one-byte identifier used in the ciphertext blob. Frozen: never renumber."""
        return _FACTS[self].wire_id

    @classmethod
    def from_wire_id(cls, value: int) -> MechanismProfile:
        """The profile for a wire id; ``ValueError`` when unknown."""
        return PROFILES.by_wire_id(value).name

    @property
    def iv_length(self) -> int:
        """Length in bytes of the IV this profile uses."""
        return _FACTS[self].iv_length

    @property
    def tag_length(self) -> int:
        """Length in bytes of the authentication tag appended to the ciphertext."""
        return _FACTS[self].tag_length

    def max_body_length(self, max_plaintext: int) -> int:
        """Largest ``ciphertext || tag`` this profile produces for ``max_plaintext`` bytes."""
        return _FACTS[self].max_body_length(max_plaintext)


@dataclasses.dataclass(frozen=True)
class SymmetricProfile:
    """The facts of one mechanism profile. No token code here: the PKCS#11 backend holds one
    implementation object per profile."""

    name: MechanismProfile
    wire_id: int
    """The one-byte identifier in the ciphertext blob. Frozen: never renumber."""
    iv_length: int
    """Bytes of IV, drawn from the token's generator for every encryption."""
    tag_length: int
    """Bytes of authentication tag appended to the ciphertext."""
    roles: tuple[ObjectRole, ...]
    """The token objects of one key version, in the order a key material reference lists
    their ids."""
    block_size: int | None
    """``None``: the ciphertext is as long as the plaintext (a stream mode). Otherwise the
    plaintext is PKCS#7-padded to whole blocks of this many bytes (1..block_size added)."""

    def max_body_length(self, max_plaintext: int) -> int:
        """Largest ``ciphertext || tag`` this profile produces for ``max_plaintext`` bytes."""
        if self.block_size is None:
            return max_plaintext + self.tag_length
        return (max_plaintext // self.block_size + 1) * self.block_size + self.tag_length

    def body_check(self, max_plaintext: int | None) -> Callable[[int], bool]:
        """A predicate on the length of ``ciphertext || tag``: whether this profile can produce
        that many bytes for at most ``max_plaintext`` bytes of plaintext (None: any amount).
        (Returned as a function with the limits worked out once: every Encrypt and Decrypt
        checks a body.)"""
        tag, block = self.tag_length, self.block_size
        longest = float("inf") if max_plaintext is None else self.max_body_length(max_plaintext)
        if block is None:
            return lambda length: tag <= length <= longest

        def padded(length: int) -> bool:
            # PKCS#7 padding always produces at least one whole block.
            return tag < length <= longest and not (length - tag) % block

        return padded


class ProfileRegistry:
    """The known profiles, looked up by name or by wire id. Immutable."""

    def __init__(self, profiles: Iterable[SymmetricProfile]) -> None:
        self._by_name: dict[MechanismProfile, SymmetricProfile] = {}
        self._by_wire_id: dict[int, SymmetricProfile] = {}
        for profile in profiles:
            if profile.name in self._by_name or profile.wire_id in self._by_wire_id:
                raise ValueError(f"profile {profile.name.value} registered twice")
            if not 0 < profile.wire_id < 0x100:
                raise ValueError(f"wire id of {profile.name.value} does not fit a byte")
            self._by_name[profile.name] = profile
            self._by_wire_id[profile.wire_id] = profile
        missing = set(MechanismProfile) - set(self._by_name)
        if missing:
            raise ValueError(f"profiles without facts: {sorted(p.value for p in missing)}")

    def by_name(self, name: MechanismProfile | str) -> SymmetricProfile:
        """The profile named ``name`` (the enum member or its value); ``ValueError`` when
        unknown."""
        return self._by_name[MechanismProfile(name)]

    def by_wire_id(self, wire_id: int) -> SymmetricProfile:
        """The profile with this wire id; ``ValueError`` when unknown."""
        found = self._by_wire_id.get(wire_id)
        if found is None:
            raise ValueError(f"unknown profile id {wire_id}")
        return found

    def __iter__(self) -> Iterator[SymmetricProfile]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


PROFILES = ProfileRegistry(
    [
        SymmetricProfile(
            name=MechanismProfile.AES_256_GCM,
            wire_id=1,
            iv_length=12,
            tag_length=16,
            roles=(ObjectRole.ENCRYPT,),
            block_size=None,
        ),
        SymmetricProfile(
            name=MechanismProfile.AES_256_CBC_HMAC_SHA_256,
            wire_id=2,
            iv_length=16,
            tag_length=32,
            roles=(ObjectRole.ENCRYPT, ObjectRole.MAC),
            block_size=16,
        ),
    ]
)
"""Every profile hsmkms knows."""

_FACTS: dict[MechanismProfile, SymmetricProfile] = {p.name: p for p in PROFILES}
