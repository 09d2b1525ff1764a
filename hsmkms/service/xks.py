"""The XKS proxy API's operations (hsmkms as an external key manager for AWS KMS): key
metadata, and AES-GCM encryption and decryption under a KMS key's versions, inside the token.

The XKS front door (:mod:`hsmkms.api.xks`) authenticates the caller with an XKS proxy
credential, which stands for AWS KMS as a whole rather than for a principal of the account: key
policies, identity policies and grants do not apply (spec: XKS proxy API — authorization is
the proxy's, optionally by a secondary policy on ``requestMetadata``). ``caller`` only
collects the keys and versions used, for the audit record.

The external key id is an hsmkms key id: a SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT key whose key
versions are AES-256-GCM. Encryption uses the key's current version; the version travels in
``ciphertextMetadata``, so the key can rotate (RotateKeyOnDemand, automatic rotation) and older
ciphertexts still decrypt. ``ciphertextMetadata`` layout (5 bytes; the spec allows 20)::

    0x01 (format version) || u32be(key version)

The token authenticates, besides KMS's AAD, the metadata (spec: XKS proxy API, the
recommended AAD binding)::

    token AAD = u16be(len(AAD)) || AAD || u8(len(metadata)) || metadata

Security contract: plaintext is passed to the token or returned to the caller only; every
failure of a ciphertext is one :class:`InvalidCiphertextException` without a cause.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

from hsmkms.errors import (
    InvalidCiphertextException,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
)
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.models.enums import KeySpec, KeyUsage
from hsmkms.profiles import MechanismProfile
from hsmkms.service.core import ServiceCore, material_ref
from hsmkms.store import KeyRecord, KeyVersionRecord
from hsmkms.store.uses import VersionExhausted
from hsmkms.types import Caller

__all__ = [
    "IV_LENGTH",
    "MAX_AAD",
    "METADATA_FORMAT",
    "TAG_LENGTH",
    "XksCiphertext",
    "XksKeyMetadata",
    "XksOperations",
    "token_aad",
]

METADATA_FORMAT: Final = 1
IV_LENGTH: Final = 12
TAG_LENGTH: Final = 16
MAX_AAD: Final = 0xFFFF
"""The longest AAD the binding's u16be length can carry (the spec asks for 8,192 bytes)."""
_METADATA: Final = struct.Struct(">BI")
_SYMMETRIC: Final = KeySpec.SYMMETRIC_DEFAULT.value
_ENCRYPT_DECRYPT: Final = KeyUsage.ENCRYPT_DECRYPT.value
_ENABLED: Final = "Enabled"


@dataclasses.dataclass(frozen=True)
class XksKeyMetadata:
    """GetKeyMetadata's answer: the spec's key spec, usages and status of a key."""

    key_spec: str
    key_usage: tuple[str, ...]
    key_status: str


@dataclasses.dataclass(frozen=True)
class XksCiphertext:
    """Encrypt's answer. ``version`` is the key version used (also inside ``metadata``)."""

    ciphertext: bytes
    iv: bytes
    tag: bytes
    metadata: bytes
    version: int


def token_aad(aad: bytes, metadata: bytes) -> bytes:
    """The AAD the token authenticates: ``u16be(len AAD) || AAD || u8(len md) || md``."""
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata


class XksOperations(ServiceCore):
    """The XKS proxy API's operations of :class:`~hsmkms.service.KmsService`."""

    def _xks_key(
        self, key_id: str, version: int | None = None
    ) -> tuple[KeyRecord, KeyVersionRecord | None]:
        """The key an external key id names (with one version: the current one by default);
        NotFoundException unless it exists and is a SYMMETRIC_DEFAULT encryption key."""
        found = self._store.get_key_and_version(key_id, version)
        if (
            found is None
            or self._gone(found[0], self._clock())
            or found[0].key_spec != _SYMMETRIC
            or found[0].key_usage != _ENCRYPT_DECRYPT
        ):
            raise NotFoundException(f"External key {key_id[:128]!r} does not exist.")
        return found

    @staticmethod
    def _xks_usable(key: KeyRecord) -> None:
        # spec: XKS proxy API — InvalidStateException when the key is not enabled.
        if key.state != _ENABLED:
            raise KMSInvalidStateException(f"The external key {key.key_id} is not enabled.")

    def xks_metadata(self, key_id: str, caller: Caller | None = None) -> XksKeyMetadata:
        """GetKeyMetadata: AES_256, ENCRYPT and DECRYPT, ENABLED or DISABLED (any state but
        Enabled)."""
        key, _ = self._xks_key(key_id)
        if caller is not None:
            caller.note_key(key.arn)
        status = "ENABLED" if key.state == _ENABLED else "DISABLED"
        return XksKeyMetadata("AES_256", ("ENCRYPT", "DECRYPT"), status)

    def xks_encrypt(
        self, key_id: str, plaintext: bytes, aad: bytes, caller: Caller | None = None
    ) -> XksCiphertext:
        """AES-256-GCM under the key's current version, inside the token (a 12-byte IV from
        the token's generator, a 16-byte tag); the AAD binding of the module docstring."""
        key, version = self._xks_key(key_id)
        if caller is not None:
            caller.note_key(key.arn)
        self._xks_usable(key)
        if version is None:
            raise NotFoundException(f"External key {key_id!r} has no key material.")
        if len(aad) > MAX_AAD:
            raise UnsupportedOperationException(
                f"additionalAuthenticatedData longer than {MAX_AAD} bytes is not supported."
            )
        ref = material_ref(version.material_ref)
        if ref.profile is not MechanismProfile.AES_256_GCM:
            raise UnsupportedOperationException(
                f"The external key {key.key_id} is not an AES-GCM key (its key store's profile "
                f"is {ref.profile.value if ref.profile else 'none'})."
            )
        if caller is not None:
            caller.note_key(key.arn, version.version)
        try:
            self._uses.take(key.key_id, version.version)
        except VersionExhausted:
            raise KMSInvalidStateException(
                f"{key.arn} key version {version.version} has made the {self._uses.limit} "
                "encryptions AES-GCM with random IVs allows: rotate the key"
            ) from None
        metadata = _METADATA.pack(METADATA_FORMAT, version.version)
        iv, body = self._stores.backend_for(ref).encrypt(ref, plaintext, token_aad(aad, metadata))
        if len(iv) != IV_LENGTH or len(body) != len(plaintext) + TAG_LENGTH:  # pragma: no cover
            raise UnsupportedOperationException("The token's AES-GCM output is not 96/128-bit.")
        return XksCiphertext(body[:-TAG_LENGTH], iv, body[-TAG_LENGTH:], metadata, version.version)

    def xks_decrypt(
        self,
        key_id: str,
        ciphertext: bytes,
        iv: bytes,
        tag: bytes,
        aad: bytes,
        metadata: bytes,
        caller: Caller | None = None,
    ) -> bytes:
        """Decrypt with the key version ``metadata`` names (never by trial). A disabled key:
        InvalidStateException; any failure of the ciphertext, IV, tag, AAD or metadata:
        InvalidCiphertextException."""
        current, _ = self._xks_key(key_id)
        if caller is not None:
            caller.note_key(current.arn)
        self._xks_usable(current)
        if len(metadata) != _METADATA.size or len(aad) > MAX_AAD:
            raise InvalidCiphertextException()
        fmt, number = _METADATA.unpack(metadata)
        if fmt != METADATA_FORMAT or number < 1:
            raise InvalidCiphertextException()
        found = self._store.get_key_and_version(key_id, number)
        if found is None or found[1] is None:
            raise InvalidCiphertextException()
        version = found[1]
        if caller is not None:
            caller.note_key(current.arn, number)
        if len(iv) != IV_LENGTH or len(tag) != TAG_LENGTH:
            raise InvalidCiphertextException()
        ref = material_ref(version.material_ref)
        if ref.profile is not MechanismProfile.AES_256_GCM:
            raise InvalidCiphertextException()
        plaintext: bytes | None
        try:
            plaintext = self._stores.backend_for(ref).decrypt(
                ref, iv, ciphertext + tag, token_aad(aad, metadata)
            )
        except DecryptionFailed:
            plaintext = None
        if plaintext is None:
            raise InvalidCiphertextException()  # outside the handler: no cause reaches anyone
        return plaintext
