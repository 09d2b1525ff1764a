"""The versioned ciphertext blob returned by Encrypt / GenerateDataKey and taken by Decrypt.

Version 1 layout (all integers big-endian)::

    offset      size  field
    0           1     format version, 0x01
    1           16    key id: the UUID's 16 raw bytes
    17          4     key version: u32, >= 1
    21          1     profile: its wire id in hsmkms.profiles.PROFILES (1 = AES_256_GCM,
                      2 = AES_256_CBC_HMAC_SHA_256)
    22          n     IV; n = profile.iv_length (12 for GCM, 16 for CBC-HMAC)
    22 + n      rest  body = ciphertext || tag (tag = profile.tag_length bytes)

The *header* is every byte before the body. The associated data bound by the AEAD is::

    aad = blob[0:22] || encode_encryption_context(encryption_context)

that is the version, key id, key version and profile, then the canonical encryption context.
The IV is not part of the AAD because the keystore draws it inside the encrypt call, after the
AAD has been fixed; it is authenticated by the AEAD itself (the GCM tag depends on the IV; the
CBC-HMAC profile MACs ``iv || ciphertext``). So every byte of the blob is authenticated.

Canonical encryption context: the pairs sorted by the UTF-8 bytes of the key, then
``count:u16 || (len:u16 || key || len:u16 || value) * count``. An empty context is ``00 00``.

Parsing is strict: 1..MAX_CIPHERTEXT_BLOB bytes, a known version and profile, the exact IV
length, a body of a shape the profile produces for at most MAX_PLAINTEXT bytes
(``SymmetricProfile.body_check``: at least one tag; for a block profile such as CBC-HMAC a
positive multiple of the block before the tag). Every parse is canonical
(``parse(b).to_bytes() == b``), and every failure is the same bare
:class:`~hsmkms.errors.InvalidCiphertextException`.

Versioning: a changed layout gets a new version byte; every released version stays parseable
forever (frozen vectors in ``tests/test_ciphertext.py``). See ``docs/ciphertext.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import struct
import uuid
from collections.abc import Mapping
from typing import Final

from hsmkms.errors import InvalidCiphertextException, ValidationException
from hsmkms.profiles import PROFILES, MechanismProfile

__all__ = [
    "FORMAT_VERSION",
    "MAX_CIPHERTEXT_BLOB",
    "MAX_PLAINTEXT",
    "XKS_FORMAT_VERSION",
    "CiphertextBlob",
    "XksCiphertext",
    "aad_for",
    "blob_bytes",
    "blob_prefix",
    "blob_version",
    "encode_encryption_context",
]

FORMAT_VERSION: Final = 0x01
"""The version byte this module writes (and the only one it reads so far)."""

# spec: AWS KMS CiphertextType is 1-6144 bytes, PlaintextType 1-4096 bytes.
MAX_CIPHERTEXT_BLOB: Final = 6144
MAX_PLAINTEXT: Final = 4096

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U16: Final = struct.Struct(">H")
# version, key id, key version, profile id: the authenticated prefix of the header.
_PREFIX: Final = struct.Struct(">B16sIB")


class _Malformed(ValueError):
    """Internal: the bytes are not a valid blob. Never leaves :meth:`CiphertextBlob.parse`."""


def _key_id_bytes(key_id: str) -> bytes:
    """The 16 raw bytes of a key id; ``ValueError`` unless it is a canonical lowercase UUID."""
    if not isinstance(key_id, str):
        raise TypeError("key_id must be a str")
    return _canonical_uuid_bytes(key_id)


@functools.lru_cache(maxsize=8192)
def _key_id_str(raw: bytes) -> str:
    # Cached for Decrypt, like _canonical_uuid_bytes for Encrypt.
    return str(uuid.UUID(bytes=raw))


@functools.lru_cache(maxsize=8192)
def _canonical_uuid_bytes(key_id: str) -> bytes:
    # Cached: the hot path (every Encrypt/Decrypt) converts the same few key ids over and over.
    parsed = uuid.UUID(key_id)
    if str(parsed) != key_id:
        raise ValueError("key_id must be a canonical lowercase UUID string")
    return parsed.bytes


def _check_key_version(key_version: int) -> None:
    if isinstance(key_version, bool) or not isinstance(key_version, int):
        raise TypeError("key_version must be an int")
    if not 1 <= key_version <= _U32_MAX:
        raise ValueError("key_version must be in 1..2**32-1")


def _check_body(profile: MechanismProfile, body: bytes) -> None:
    # The limits are worked out once per profile (every Encrypt and Decrypt checks a body).
    if not _BODY_OK[profile](len(body)):
        raise ValueError("body length out of range for the profile")


# Per profile, the body-shape check for MAX_PLAINTEXT bytes; per wire id, (profile, IV length,
# body-shape check), for parsing.
_BODY_OK: Final = {p.name: p.body_check(MAX_PLAINTEXT) for p in PROFILES}
_BY_WIRE_ID: Final = {p.wire_id: (p.name, p.iv_length, _BODY_OK[p.name]) for p in PROFILES}


_EMPTY_CONTEXT = b"\x00\x00"
_first = operator.itemgetter(0)


def encode_encryption_context(ctx: Mapping[str, str]) -> bytes:
    """The canonical, order-independent encoding of an encryption context.

    Pairs sorted by the UTF-8 bytes of the key; ``count:u16``, then each key and value as
    ``len:u16 || utf8``. Equal contexts (in any order) give equal bytes; different contexts give
    different bytes. Raises ``ValidationException`` for non-str keys or values, an empty key,
    more than 65535 pairs, a key or value over 65535 UTF-8 bytes, or a lone surrogate.
    """
    if type(ctx) is not dict and not isinstance(ctx, Mapping):
        raise ValidationException("encryption context must be a map of strings to strings")
    if not ctx:
        return _EMPTY_CONTEXT
    if len(ctx) > _U16_MAX:
        raise ValidationException(f"encryption context must have at most {_U16_MAX} pairs")
    pairs: list[tuple[bytes, bytes]] = []
    try:
        for key, value in ctx.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValidationException("encryption context keys and values must be strings")
            if not key:
                raise ValidationException("encryption context keys must not be empty")
            # A lone surrogate raises UnicodeEncodeError here (handled below).
            key_bytes, value_bytes = key.encode("utf-8"), value.encode("utf-8")
            if len(key_bytes) > _U16_MAX or len(value_bytes) > _U16_MAX:
                raise ValidationException(
                    f"encryption context keys and values must be at most {_U16_MAX} UTF-8 bytes"
                )
            pairs.append((key_bytes, value_bytes))
    except UnicodeEncodeError:
        raise ValidationException(
            "encryption context keys and values must be valid Unicode (no lone surrogates)"
        ) from None
    # Keys of a mapping are distinct strings, so their UTF-8 encodings are distinct too.
    pairs.sort(key=_first)
    pack = _U16.pack
    parts = [pack(len(pairs))]
    for key_bytes, value_bytes in pairs:
        parts += (pack(len(key_bytes)), key_bytes, pack(len(value_bytes)), value_bytes)
    return b"".join(parts)


def aad_for(
    key_id: str,
    key_version: int,
    profile: MechanismProfile,
    encryption_context: Mapping[str, str],
) -> bytes:
    """The associated data to encrypt under, before the IV exists.

    ``version || key id || key version || profile id || encode_encryption_context(ctx)``; the
    blob built from the result has ``blob.aad(ctx) == aad_for(...)``. ``ValueError`` for a
    non-canonical key id or a key version outside 1..2**32-1; ``ValidationException`` for a bad
    encryption context.
    """
    return blob_prefix(key_id, key_version, profile) + encode_encryption_context(encryption_context)


@functools.lru_cache(maxsize=8192)
def blob_prefix(key_id: str, key_version: int, profile: MechanismProfile) -> bytes:
    """``version || key id || key version || profile id``: the first bytes of every blob of one
    key version, and the start of its AAD. Cached (every Encrypt needs it). ``ValueError`` for a
    non-canonical key id or a key version outside 1..2**32-1."""
    _check_key_version(key_version)
    return _PREFIX.pack(FORMAT_VERSION, _key_id_bytes(key_id), key_version, profile.wire_id)


def blob_bytes(prefix: bytes, profile: MechanismProfile, iv: bytes, body: bytes) -> bytes:
    """The wire form of a blob from its :func:`blob_prefix` and the keystore's IV and body,
    without building a :class:`CiphertextBlob` (the Encrypt hot path). Checks the same length
    invariants (``ValueError``)."""
    if len(iv) != profile.iv_length:
        raise ValueError("iv length does not match the profile")
    _check_body(profile, body)
    return b"".join((prefix, iv, body))


@dataclasses.dataclass(frozen=True)
class CiphertextBlob:
    """One parsed (or about to be serialized) ciphertext blob, format version 1.

    Construction checks every invariant :meth:`parse` checks (``ValueError``/``TypeError``
    otherwise), so any instance serializes to bytes that parse back to an equal instance.
    The body is left out of ``repr``.
    """

    key_id: str
    """The key id, a canonical lowercase UUID string."""
    key_version: int
    """The key version that encrypted the body, 1..2**32-1."""
    profile: MechanismProfile
    """The mechanism profile that encrypted the body."""
    iv: bytes
    """The IV, ``profile.iv_length`` bytes."""
    body: bytes = dataclasses.field(repr=False)
    """``ciphertext || tag``."""

    def __post_init__(self) -> None:
        _key_id_bytes(self.key_id)
        _check_key_version(self.key_version)
        if not isinstance(self.profile, MechanismProfile):
            raise TypeError("profile must be a MechanismProfile")
        if not isinstance(self.iv, bytes) or not isinstance(self.body, bytes):
            raise TypeError("iv and body must be bytes")
        if len(self.iv) != self.profile.iv_length:
            raise ValueError("iv length does not match the profile")
        _check_body(self.profile, self.body)

    def _prefix(self) -> bytes:
        return blob_prefix(self.key_id, self.key_version, self.profile)

    def header(self) -> bytes:
        """Every byte of the blob before the body (version .. IV)."""
        return self._prefix() + self.iv

    def to_bytes(self) -> bytes:
        """The wire form: ``header() || body``."""
        return self.header() + self.body

    def aad(self, encryption_context: Mapping[str, str]) -> bytes:
        """The associated data the body was sealed with, given the caller's encryption context.

        Same as :func:`aad_for` with this blob's fields: the header without the IV, then the
        canonical encryption context.
        """
        return self._prefix() + encode_encryption_context(encryption_context)

    @classmethod
    def parse(cls, data: bytes) -> CiphertextBlob:
        """Parse a blob strictly. Any failure raises a bare ``InvalidCiphertextException``.

        The exception carries no message, cause or context, so the reason a blob was refused
        cannot reach the caller (or a traceback shown to it).
        """
        blob: CiphertextBlob | None
        try:
            blob = cls._parse(data)
        except ValueError:
            blob = None
        if blob is None:
            # Raised outside the except block, so not even __context__ points at the reason.
            raise InvalidCiphertextException() from None
        return blob

    @classmethod
    def _parse(cls, data: bytes) -> CiphertextBlob:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise _Malformed
        data = bytes(data)
        if not 1 <= len(data) <= MAX_CIPHERTEXT_BLOB:
            raise _Malformed
        if data[0] != FORMAT_VERSION or len(data) < _PREFIX.size:
            raise _Malformed
        _, raw_key_id, key_version, wire_id = _PREFIX.unpack_from(data)
        known = _BY_WIRE_ID.get(wire_id)
        if known is None:
            raise _Malformed
        profile, iv_length, body_ok = known
        body_start = _PREFIX.size + iv_length
        if len(data) < body_start:
            raise _Malformed
        body = data[body_start:]
        # Of __post_init__'s checks, the layout already guarantees a canonical key id, a key
        # version <= 2**32-1 and the IV length; the other two are made here. Skipping
        # __post_init__ keeps Decrypt cheap without accepting anything more (see
        # tests/test_ciphertext_reference_parse.py).
        if key_version < 1 or not body_ok(len(body)):
            raise _Malformed
        blob = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(blob, "key_id", _key_id_str(raw_key_id))
        setattr_(blob, "key_version", key_version)
        setattr_(blob, "profile", profile)
        setattr_(blob, "iv", data[_PREFIX.size : body_start])
        setattr_(blob, "body", body)
        return blob


XKS_FORMAT_VERSION: Final = 0x02
"""The version byte of an external-key-store ciphertext (:class:`XksCiphertext`)."""
_XKS_HEAD: Final = struct.Struct(">B16sB")
_XKS_AAD_LABEL: Final = b"hsmkms:xks:v1\x00"
_XKS_MAX_METADATA: Final = 20
_XKS_TAG: Final = 16


@dataclasses.dataclass(frozen=True)
class XksCiphertext:
    """The ciphertext of a key in an external key store (format version 2): a version-1 blob
    made in our token (``inner``), encrypted again by the external key through the XKS
    proxy. Layout (big-endian)::

        0x02 ‖ key id (16) ‖ u8 len(iv) ‖ iv (12 or 16) ‖ tag (16)
             ‖ u8 len(metadata) ‖ metadata (0-20) ‖ outer ciphertext (rest, 1 ..)

    The outer ciphertext is the proxy's AES-GCM of the inner blob (same length). The proxy
    authenticates :meth:`proxy_aad`, which binds the key ARN and the encryption context, so
    the outer layer cannot be moved to another key or context; IV, tag and metadata are
    authenticated by the proxy. Parsing refuses anything else with a bare
    ``InvalidCiphertextException``."""

    key_id: str
    iv: bytes
    tag: bytes
    metadata: bytes
    outer: bytes = dataclasses.field(repr=False)

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                _XKS_HEAD.pack(XKS_FORMAT_VERSION, _key_id_bytes(self.key_id), len(self.iv)),
                self.iv,
                self.tag,
                bytes([len(self.metadata)]),
                self.metadata,
                self.outer,
            )
        )

    @staticmethod
    def proxy_aad(key_arn: str, encryption_context: Mapping[str, str]) -> bytes:
        """What the proxy authenticates: a label, the KMS key ARN and the canonical context."""
        return (
            _XKS_AAD_LABEL
            + key_arn.encode()
            + b"\x00"
            + encode_encryption_context(encryption_context)
        )

    @classmethod
    def parse(cls, data: bytes) -> XksCiphertext:
        """Parse strictly; any failure is a bare ``InvalidCiphertextException``."""
        found: XksCiphertext | None
        try:
            found = cls._parse(data)
        except ValueError:
            found = None
        if found is None:
            raise InvalidCiphertextException() from None
        return found

    @classmethod
    def _parse(cls, data: bytes) -> XksCiphertext:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise _Malformed
        data = bytes(data)
        if not 1 <= len(data) <= MAX_CIPHERTEXT_BLOB or len(data) < _XKS_HEAD.size:
            raise _Malformed
        version, raw_key_id, iv_length = _XKS_HEAD.unpack_from(data)
        if version != XKS_FORMAT_VERSION or iv_length not in (12, 16):
            raise _Malformed
        at = _XKS_HEAD.size
        iv, at = data[at : at + iv_length], at + iv_length
        tag, at = data[at : at + _XKS_TAG], at + _XKS_TAG
        if len(data) < at + 1:
            raise _Malformed
        md_length, at = data[at], at + 1
        if md_length > _XKS_MAX_METADATA:
            raise _Malformed
        metadata, at = data[at : at + md_length], at + md_length
        outer = data[at:]
        if not outer:
            raise _Malformed
        return cls(_key_id_str(raw_key_id), iv, tag, metadata, outer)


def blob_version(data: bytes) -> int:
    """The format version byte of a ciphertext blob (0 when empty or not bytes)."""
    if isinstance(data, bytes | bytearray) and data:
        return int(data[0])
    return 0
