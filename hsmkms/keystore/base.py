"""The keystore seam: what the service needs from a token, as a Protocol.

The only implementation is :class:`hsmkms.keystore.pkcs11.Pkcs11Keystore`; the Protocol exists
so the layers above never import ``pkcs11``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Protocol

from hsmkms.profiles import MechanismProfile

_KEY_VERSION_LABEL = re.compile(r"hsmkms:[0-9a-f]{20}:[0-9]{1,10}:[ah]")


@dataclasses.dataclass(frozen=True)
class KeyMaterialRef:
    """Names the token object(s) holding one key version. Stored in the metadata store.

    ``object_ids`` are the ``CKA_ID`` values (hex) of the objects, in profile order:
    ``[aes]`` for AES_256_GCM, ``[aes, hmac]`` for AES_256_CBC_HMAC_SHA_256. No secret here.
    """

    profile: MechanismProfile
    object_ids: tuple[str, ...]

    @functools.cached_property
    def raw_ids(self) -> tuple[bytes, ...]:
        """``object_ids`` as bytes (``CKA_ID`` values)."""
        return tuple(bytes.fromhex(i) for i in self.object_ids)

    def to_str(self) -> str:
        """Serialized form for the metadata store: ``PROFILE:id[,id]``."""
        return f"{self.profile.value}:{','.join(self.object_ids)}"

    @classmethod
    def from_str(cls, value: str) -> KeyMaterialRef:
        """Parse :meth:`to_str` output; ``ValueError`` when malformed."""
        profile, _, ids = value.partition(":")
        object_ids = tuple(i for i in ids.split(",") if i)
        prof = MechanismProfile(profile)
        expected = 1 if prof is MechanismProfile.AES_256_GCM else 2
        if len(object_ids) != expected:
            raise ValueError("wrong number of object ids for profile")
        return cls(prof, object_ids)


@dataclasses.dataclass(frozen=True)
class MacKeyRef:
    """Names one HMAC-SHA-256 key object in the token (``CKA_ID`` hex). No secret here.

    Used for keys that authenticate rather than encrypt: the audit trail's seal, integrity tags
    on security-relevant database rows.
    """

    object_id: str

    PREFIX = "HMAC_SHA_256"

    def to_str(self) -> str:
        """Serialized form for the metadata store: ``HMAC_SHA_256:id``."""
        return f"{self.PREFIX}:{self.object_id}"

    @classmethod
    def from_str(cls, value: str) -> MacKeyRef:
        """Parse :meth:`to_str` output; ``ValueError`` when malformed."""
        prefix, _, object_id = value.partition(":")
        if prefix != cls.PREFIX or not object_id:
            raise ValueError("not a MAC key reference")
        bytes.fromhex(object_id)
        return cls(object_id)


@dataclasses.dataclass(frozen=True)
class Sealed:
    """Output of :meth:`Keystore.encrypt`: the IV and ``ciphertext || tag``."""

    iv: bytes
    body: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class TokenObject:
    """One object of this project on the token (from :meth:`Keystore.list_objects`)."""

    object_id: str
    label: str
    key_type: str

    @property
    def is_key_version(self) -> bool:
        """Whether the label marks a KMS key version's object
        (``hsmkms:<20 hex of the key id>:<version>:<a|h>``), as opposed to a service key such
        as the audit or credentials key."""
        return _KEY_VERSION_LABEL.fullmatch(self.label) is not None


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What the token and module say about themselves."""

    module: str
    library_description: str
    manufacturer: str
    model: str
    serial: str
    label: str
    mechanisms: tuple[str, ...]
    profile: MechanismProfile


class Keystore(Protocol):
    """A token holding root keys. Every method is safe to call from any thread."""

    @property
    def profile(self) -> MechanismProfile:
        """The profile new key versions get (probed, or forced by configuration)."""
        ...

    def info(self) -> TokenInfo:
        """Module, token and mechanism information."""
        ...

    def create_key(
        self, key_id: str, version: int, profile: MechanismProfile | None = None
    ) -> KeyMaterialRef:
        """Generate the token object(s) for one key version: token, private, sensitive,
        non-extractable, only the capabilities the profile needs. Returns their reference."""
        ...

    def encrypt(self, ref: KeyMaterialRef, plaintext: bytes, aad: bytes) -> Sealed:
        """Encrypt inside the token with a fresh IV from the token's generator."""
        ...

    def decrypt(self, ref: KeyMaterialRef, iv: bytes, body: bytes, aad: bytes) -> bytes:
        """Decrypt and authenticate. Raises ``DecryptionFailed`` on any mismatch."""
        ...

    def random(self, n: int) -> bytes:
        """``n`` bytes from the token's random generator."""
        ...

    def create_mac_key(self, name: str) -> MacKeyRef:
        """Generate a non-extractable HMAC-SHA-256 token key (sign/verify only), labelled
        ``hsmkms:<name>``."""
        ...

    def mac(self, ref: MacKeyRef, data: bytes) -> bytes:
        """HMAC-SHA-256 of ``data`` computed inside the token (32 bytes)."""
        ...

    def verify_mac(self, ref: MacKeyRef, data: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the HMAC-SHA-256 of ``data``, checked inside the token."""
        ...

    def destroy(self, ref: KeyMaterialRef) -> None:
        """Destroy the token object(s); objects already gone are not an error."""
        ...

    def exists(self, ref: KeyMaterialRef) -> bool:
        """Whether every object of ``ref`` is on the token."""
        ...

    def list_objects(self) -> list[TokenObject]:
        """Every object on the token that this project created."""
        ...

    def self_test(self) -> None:
        """Round trip with temporary keys of the current profile; raises on any failure."""
        ...

    def close(self) -> None:
        """Log out and release the module (end of process)."""
        ...


def mac_key_label(name: str) -> str:
    """The token label :meth:`Keystore.create_mac_key` gives the key created as ``name``."""
    return f"hsmkms:{name}"


def checked_mac_key(keystore: Keystore, ref_text: str, name: str) -> MacKeyRef:
    """Parse a MAC key reference read from the (untrusted) database and check, on the
    (trusted) token, that it names the key created as ``create_mac_key(name)``.

    Raises ``ValueError`` naming the problem: malformed, no such object, or an object with
    another label (a reference swapped for another service key's). One token listing per call:
    callers check once and remember the result.
    """
    ref = MacKeyRef.from_str(ref_text)
    labels = {o.object_id: o.label for o in keystore.list_objects()}
    label = labels.get(ref.object_id)
    if label is None:
        raise ValueError(f"the {name} key reference names no object on the token")
    if label != mac_key_label(name):
        raise ValueError(f"the {name} key reference names a token object labelled {label!r}")
    return ref
