"""Mechanism profiles: how a key version turns plaintext + AAD into ciphertext inside the token.

The profile is recorded per key version (and in every ciphertext blob), so ciphertexts stay
decryptable when the default profile changes.
"""

from __future__ import annotations

import enum


class MechanismProfile(enum.Enum):
    """A symmetric AEAD construction built from mechanisms the token offers."""

    AES_256_GCM = "AES_256_GCM"
    """CKM_AES_GCM, 96-bit IV, 128-bit tag appended to the ciphertext. One AES key object."""

    AES_256_CBC_HMAC_SHA_256 = "AES_256_CBC_HMAC_SHA_256"
    """Encrypt-then-MAC: CKM_AES_CBC_PAD with a 128-bit IV, then CKM_SHA256_HMAC over
    ``len64(aad) || aad || iv || ciphertext``, tag (32 bytes) appended. Two key objects (AES
    and generic secret), both in the token. Portable: what a YubiHSM 2 can do."""

    @property
    def wire_id(self) -> int:
        """The one-byte identifier used in the ciphertext blob. Frozen: never renumber."""
        return _WIRE_IDS[self]

    @classmethod
    def from_wire_id(cls, value: int) -> MechanismProfile:
        """The profile for a wire id; ``ValueError`` when unknown."""
        for profile, wire in _WIRE_IDS.items():
            if wire == value:
                return profile
        raise ValueError(f"unknown profile id {value}")

    @property
    def iv_length(self) -> int:
        """Length in bytes of the IV this profile uses."""
        return 12 if self is MechanismProfile.AES_256_GCM else 16

    @property
    def tag_length(self) -> int:
        """Length in bytes of the authentication tag appended to the ciphertext."""
        return 16 if self is MechanismProfile.AES_256_GCM else 32

    def max_body_length(self, max_plaintext: int) -> int:
        """Largest ``ciphertext || tag`` this profile produces for ``max_plaintext`` bytes."""
        if self is MechanismProfile.AES_256_GCM:
            return max_plaintext + self.tag_length
        # CBC with PKCS#7 padding adds 1..16 bytes.
        return (max_plaintext // 16 + 1) * 16 + self.tag_length


_WIRE_IDS: dict[MechanismProfile, int] = {
    MechanismProfile.AES_256_GCM: 1,
    MechanismProfile.AES_256_CBC_HMAC_SHA_256: 2,
}
