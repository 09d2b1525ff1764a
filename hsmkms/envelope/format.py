"""The envelope format, version 1: a header, then the payload as AES-256-GCM segments.

Version 1 layout (all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       1     suite, 0x01: AES-256-GCM segments, HKDF-SHA-256 message key, 32-byte commitment
    2       4     segment size S: plaintext bytes per segment, MIN_SEGMENT_SIZE..MAX_SEGMENT_SIZE
    6       32    salt: random per message
    38      2     c: length of the encoded encryption context, 2..MAX_CONTEXT_BYTES
    40      c     encryption context, canonical (``hsmkms.ciphertext.encode_encryption_context``)
    --- end of the *bound prefix* (everything above) ---
    40+c    2     a: length of the key ARN, 1..MAX_KEY_ARN
    42+c    a     key ARN, printable ASCII: the KMS key that wraps the data key
    42+c+a  2     e: length of the encrypted data key, 1..MAX_ENCRYPTED_DATA_KEY
    44+c+a  e     encrypted data key: the KMS ciphertext blob of the 32-byte data key
    44+c+a+e 32   commitment
    H = 76+c+a+e: header length; then the payload

    payload = segment_0 || ... || segment_(n-1), n >= 1
    segment_i = AES-256-GCM(message_key, nonce_i, plaintext_i, aad="") = ciphertext_i || tag_i
    |plaintext_i| = S for i < n-1; 0 < |plaintext_(n-1)| <= S, or 0 only when n = 1
    nonce_i = 7 zero bytes || i as u32 || last flag (0x01 for segment n-1, else 0x00)

Keys::

    okm = HKDF-SHA-256(ikm=data_key, salt=salt, info=LABEL || SHA-256(bound prefix), L=64)
    message_key = okm[0:32]     commitment = okm[32:64]

Why this is safe:

* *Nonce uniqueness.* Every message has its own key (a fresh 32-byte salt goes into HKDF),
  even when one data key is reused for many messages (the data-key cache). Within a message
  the nonces are distinct because the counter is; the counter is at most 2**32-1, which
  bounds a message at 2**32 segments (4 PiB at the default 1 MiB). Across messages under one
  data key, two message keys collide only if two salts collide: about n**2 / 2**257 for n
  messages.
* *Header binding.* The bound prefix (version, suite, segment size, salt, encryption context)
  is hashed into the HKDF info, so changing any of its bytes changes the message key: the
  commitment check fails before any segment is decrypted, and every segment tag would fail
  too. The commitment also makes the data key committing (a ciphertext opens under one data
  key only; AES-GCM alone does not promise that).
* *Key wrap.* The key ARN and encrypted data key are *not* in the bound prefix, so rewrap
  (ReEncrypt of the data key under another KMS key) rewrites them without touching the
  payload. They are authenticated by KMS instead: the encrypted data key is a KMS AEAD blob
  bound to the same encryption context; decryption passes the header's key ARN as Decrypt's
  ``KeyId`` and checks the ARN KMS answers with; a wrap section copied from another message
  yields another data key, which fails the commitment.
* *Segment order and length.* The counter in the nonce pins each segment to its position;
  the last flag marks the end. Reordered, swapped, duplicated, dropped or appended segments,
  truncation at a boundary or inside a segment all fail a tag check.

Parsing is strict: known version and suite, lengths within the hard maxima, a canonical
encryption context (sorted, unique, non-empty keys, valid UTF-8), a printable ASCII ARN;
``EnvelopeHeader.parse(h).to_bytes() == h``. Every failure, in the header or in the payload,
is the same :class:`~hsmkms.envelope.errors.DecryptionFailed`.

Versioning: a changed layout gets a new version byte; released versions stay readable forever
(frozen vectors in ``tests/data/envelope/``). See ``docs/envelope-format.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hsmkms.ciphertext import encode_encryption_context
from hsmkms.envelope.errors import DecryptionFailed
from hsmkms.errors import ValidationException

__all__ = [
    "COMMITMENT_LENGTH",
    "DATA_KEY_LENGTH",
    "DEFAULT_SEGMENT_SIZE",
    "FORMAT_VERSION",
    "MAX_CONTEXT_BYTES",
    "MAX_ENCRYPTED_DATA_KEY",
    "MAX_HEADER_LENGTH",
    "MAX_KEY_ARN",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "SALT_LENGTH",
    "SUITE_AES_256_GCM_HKDF_SHA256_COMMIT",
    "TAG_LENGTH",
    "EnvelopeHeader",
    "MessageCipher",
    "Readable",
    "decode_encryption_context",
    "header_problem",
    "payload_length_fits",
    "read_exact",
]

FORMAT_VERSION: Final = 0x01
SUITE_AES_256_GCM_HKDF_SHA256_COMMIT: Final = 0x01

DATA_KEY_LENGTH: Final = 32
SALT_LENGTH: Final = 32
COMMITMENT_LENGTH: Final = 32
TAG_LENGTH: Final = 16
NONCE_LENGTH: Final = 12

DEFAULT_SEGMENT_SIZE: Final = 1 << 20
MIN_SEGMENT_SIZE: Final = 4096
MAX_SEGMENT_SIZE: Final = 16 << 20
MAX_SEGMENTS: Final = 1 << 32
# spec: the only published size figure for an encryption context is 8192 bytes of AAD (XKS).
MAX_CONTEXT_BYTES: Final = 8192
# spec: AWS KMS KeyIdType is 1-2048 characters; CiphertextType is 1-6144 bytes.
MAX_KEY_ARN: Final = 2048
MAX_ENCRYPTED_DATA_KEY: Final = 6144

_FIXED: Final = struct.Struct(">BBI32sH")  # version, suite, segment size, salt, context length
_U16: Final = struct.Struct(">H")
_NONCE: Final = struct.Struct(">7xIB")
MAX_HEADER_LENGTH: Final = (
    _FIXED.size + MAX_CONTEXT_BYTES + 2 + MAX_KEY_ARN + 2 + MAX_ENCRYPTED_DATA_KEY
) + COMMITMENT_LENGTH
_KDF_LABEL: Final = b"hsmkms envelope v1\x00"


class Readable(Protocol):
    """A binary source: a file, a pipe, ``sys.stdin.buffer``, ``io.BytesIO``."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def read_exact(source: Readable, view: memoryview) -> int:
    """Fill ``view`` from ``source`` until it is full or the source ends; the bytes read.

    Pipes and sockets return short reads; this loops until EOF (a read of 0 bytes)."""
    total = 0
    size = len(view)
    while total < size:
        n = source.readinto(view[total:])
        if not n:
            break
        total += n
    return total


def _take(source: Readable, n: int) -> bytes:
    buf = bytearray(n)
    if read_exact(source, memoryview(buf)) != n:
        raise DecryptionFailed
    return bytes(buf)


def decode_encryption_context(data: bytes) -> dict[str, str]:
    """Decode a canonical encryption context; ``DecryptionFailed`` unless ``data`` is exactly
    what ``encode_encryption_context`` makes (sorted unique non-empty keys, valid UTF-8)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise DecryptionFailed
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    def u16() -> int:
        value: int = _U16.unpack(take(2))[0]
        return value

    count = u16()
    context: dict[str, str] = {}
    previous: bytes | None = None
    for _ in range(count):
        key = take(u16())
        value = take(u16())
        if not key or (previous is not None and key <= previous):
            raise DecryptionFailed
        previous = key
        try:
            context[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionFailed from None
    if pos != len(data):
        raise DecryptionFailed
    return context


def _check_arn(key_arn: str) -> bytes:
    raw = key_arn.encode("ascii") if isinstance(key_arn, str) and key_arn.isascii() else b""
    if not 1 <= len(raw) <= MAX_KEY_ARN or not all(0x21 <= b <= 0x7E for b in raw):
        raise ValidationException(
            f"key ARN must be 1-{MAX_KEY_ARN} printable ASCII characters without spaces"
        )
    return raw


def _check_segment_size(segment_size: int) -> None:
    if isinstance(segment_size, bool) or not isinstance(segment_size, int):
        raise ValidationException("segment size must be an int")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValidationException(
            f"segment size must be in {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE} bytes"
        )


def _check_data_key(data_key: bytes | bytearray | memoryview) -> None:
    if len(data_key) != DATA_KEY_LENGTH:
        raise ValidationException(f"the data key must be {DATA_KEY_LENGTH} bytes")


def _encode_context(context: Mapping[str, str]) -> bytes:
    encoded = encode_encryption_context(context)
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise ValidationException(
            f"the encoded encryption context must be at most {MAX_CONTEXT_BYTES} bytes"
        )
    return encoded


@dataclasses.dataclass(frozen=True, slots=True)
class EnvelopeHeader:
    """A parsed (or about to be written) version 1 header.

    Construct with :meth:`create` (which derives the commitment from the data key) or
    :meth:`parse` / :meth:`read`. Not secret: nothing here needs redacting.
    """

    segment_size: int
    salt: bytes
    encryption_context: Mapping[str, str]
    key_arn: str
    encrypted_data_key: bytes = dataclasses.field(repr=False)
    commitment: bytes
    _context_bytes: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_segment_size(self.segment_size)
        if not isinstance(self.salt, bytes) or len(self.salt) != SALT_LENGTH:
            raise ValidationException(f"salt must be {SALT_LENGTH} bytes")
        if not isinstance(self.commitment, bytes) or len(self.commitment) != COMMITMENT_LENGTH:
            raise ValidationException(f"commitment must be {COMMITMENT_LENGTH} bytes")
        _check_arn(self.key_arn)
        if (
            not isinstance(self.encrypted_data_key, bytes)
            or not 1 <= len(self.encrypted_data_key) <= MAX_ENCRYPTED_DATA_KEY
        ):
            raise ValidationException(
                f"encrypted data key must be 1-{MAX_ENCRYPTED_DATA_KEY} bytes"
            )
        encoded = _encode_context(self.encryption_context)
        object.__setattr__(self, "_context_bytes", encoded)
        ordered = sorted(self.encryption_context.items(), key=lambda kv: kv[0].encode())
        object.__setattr__(self, "encryption_context", MappingProxyType(dict(ordered)))

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        data_key: bytes | bytearray | memoryview,
        *,
        key_arn: str,
        encrypted_data_key: bytes,
        encryption_context: Mapping[str, str] | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        salt: bytes | None = None,
    ) -> EnvelopeHeader:
        """A new header for a message under ``data_key`` (32 bytes), with a fresh random salt
        unless one is given (frozen test vectors only: a reused salt with a reused data key
        reuses the message key and its nonces)."""
        _check_data_key(data_key)
        _check_segment_size(segment_size)
        salt = os.urandom(SALT_LENGTH) if salt is None else salt
        context = dict(encryption_context or {})
        prefix = _bound_prefix(segment_size, salt, _encode_context(context))
        _, commitment = _derive(data_key, salt, prefix, want_cipher=False)
        return cls(segment_size, salt, context, key_arn, encrypted_data_key, commitment)

    def with_wrapped_key(self, key_arn: str, encrypted_data_key: bytes) -> EnvelopeHeader:
        """The same header with another wrap of the same data key (rewrap): the bound prefix
        and commitment are unchanged, so the payload stays valid."""
        return dataclasses.replace(self, key_arn=key_arn, encrypted_data_key=encrypted_data_key)

    # -- bytes -----------------------------------------------------------------------------------

    def bound_prefix(self) -> bytes:
        """The header bytes hashed into the message key: version through encryption context."""
        return _bound_prefix(self.segment_size, self.salt, self._context_bytes)

    def to_bytes(self) -> bytes:
        """The serialized header (the first :attr:`length` bytes of the message)."""
        arn = self.key_arn.encode("ascii")
        return b"".join(
            (
                self.bound_prefix(),
                _U16.pack(len(arn)),
                arn,
                _U16.pack(len(self.encrypted_data_key)),
                self.encrypted_data_key,
                self.commitment,
            )
        )

    @property
    def length(self) -> int:
        """Bytes of the serialized header."""
        return (
            _FIXED.size
            + len(self._context_bytes)
            + 4
            + len(self.key_arn)
            + len(self.encrypted_data_key)
            + COMMITMENT_LENGTH
        )

    @classmethod
    def read(cls, source: Readable) -> EnvelopeHeader:
        """Read exactly one header off the front of ``source`` (which is left at the first
        payload byte). ``DecryptionFailed`` for anything but a well-formed v1 header."""
        version, suite, segment_size, salt, context_length = _FIXED.unpack(
            _take(source, _FIXED.size)
        )
        if version != FORMAT_VERSION or suite != SUITE_AES_256_GCM_HKDF_SHA256_COMMIT:
            raise DecryptionFailed
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise DecryptionFailed
        if not 2 <= context_length <= MAX_CONTEXT_BYTES:
            raise DecryptionFailed
        context_bytes = _take(source, context_length)
        context = decode_encryption_context(context_bytes)
        (arn_length,) = _U16.unpack(_take(source, 2))
        if not 1 <= arn_length <= MAX_KEY_ARN:
            raise DecryptionFailed
        arn = _take(source, arn_length)
        if not all(0x21 <= b <= 0x7E for b in arn):
            raise DecryptionFailed
        (edk_length,) = _U16.unpack(_take(source, 2))
        if not 1 <= edk_length <= MAX_ENCRYPTED_DATA_KEY:
            raise DecryptionFailed
        edk = _take(source, edk_length)
        commitment = _take(source, COMMITMENT_LENGTH)
        try:
            header = cls(segment_size, salt, context, arn.decode("ascii"), edk, commitment)
        except ValidationException:  # pragma: no cover - every field was checked above
            raise DecryptionFailed from None
        if header._context_bytes != context_bytes:  # pragma: no cover - decode is canonical
            raise DecryptionFailed
        return header

    @classmethod
    def parse(cls, data: bytes) -> tuple[EnvelopeHeader, int]:
        """Parse the header at the start of ``data``; returns it and its length."""
        view = memoryview(data)
        reader = _BytesReader(view)
        header = cls.read(reader)
        return header, reader.pos

    # -- keys ------------------------------------------------------------------------------------

    def open_cipher(self, data_key: bytes | bytearray | memoryview) -> MessageCipher:
        """The segment cipher for this message, after checking the commitment in constant time.

        ``DecryptionFailed`` when ``data_key`` is not the key this header was made with, or
        when a byte of the bound prefix changed."""
        if len(data_key) != DATA_KEY_LENGTH:
            raise DecryptionFailed
        aead, commitment = _derive(data_key, self.salt, self.bound_prefix(), want_cipher=True)
        if not hmac.compare_digest(commitment, self.commitment) or aead is None:
            raise DecryptionFailed
        return MessageCipher(aead)

    def seal_cipher(self, data_key: bytes | bytearray | memoryview) -> MessageCipher:
        """The segment cipher to encrypt this message with (``create`` made the header from
        the same data key)."""
        _check_data_key(data_key)
        aead, commitment = _derive(data_key, self.salt, self.bound_prefix(), want_cipher=True)
        if not hmac.compare_digest(commitment, self.commitment) or aead is None:
            raise ValidationException("the data key does not match the header")
        return MessageCipher(aead)


def header_problem(data: bytes) -> str | None:
    """Why ``data`` — the first bytes of a file, at least :data:`MAX_HEADER_LENGTH` of them
    unless the file is shorter — does not start with a v1 header: ``"not-envelope"`` (another
    format, or a header no encoder makes), ``"truncated"`` (a v1 header cut short), or None
    when it does. For the command line's explanation of a failure; decryption itself answers
    every failure with the same :class:`DecryptionFailed`. Reads only what is not secret."""
    if len(data) >= 2 and (
        data[0] != FORMAT_VERSION or data[1] != SUITE_AES_256_GCM_HKDF_SHA256_COMMIT
    ):
        return "not-envelope"
    if len(data) < 2:
        return "truncated" if data in (b"", bytes([FORMAT_VERSION])) else "not-envelope"
    try:
        EnvelopeHeader.parse(data)
        return None
    except DecryptionFailed:
        pass
    # Well-formed as far as it goes, or not? Follow the lengths until the data ends.
    need = _FIXED.size
    if len(data) < need:
        return "truncated"
    _, _, segment_size, _, context_length = _FIXED.unpack_from(data)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE or not (
        2 <= context_length <= MAX_CONTEXT_BYTES
    ):
        return "not-envelope"
    for limit_low, limit_high in ((1, MAX_KEY_ARN), (1, MAX_ENCRYPTED_DATA_KEY)):
        need += context_length if limit_high == MAX_KEY_ARN else 0
        if len(data) < need + 2:
            return "truncated"
        (length,) = _U16.unpack_from(data, need)
        if not limit_low <= length <= limit_high:
            return "not-envelope"
        need += 2 + length
        context_length = 0
    if len(data) < need + COMMITMENT_LENGTH:
        return "truncated"
    return "not-envelope"


def payload_length_fits(length: int, segment_size: int) -> bool:
    """Whether a payload of ``length`` bytes is a whole number of segments of a message with
    ``segment_size``-byte segments: full segments of ``segment_size + 16`` bytes, then a last
    one of 17 to ``segment_size + 16`` bytes — or a lone 16-byte segment (an empty message).
    False proves a payload cut short or extended; True proves nothing."""
    if length == TAG_LENGTH:
        return True
    rest = length % (segment_size + TAG_LENGTH)
    return length > 0 and (rest == 0 or rest > TAG_LENGTH)


class _BytesReader:
    def __init__(self, view: memoryview) -> None:
        self._view = view
        self.pos = 0

    def readinto(self, buffer: memoryview, /) -> int:
        n = min(len(buffer), len(self._view) - self.pos)
        buffer[:n] = self._view[self.pos : self.pos + n]
        self.pos += n
        return n


def _bound_prefix(segment_size: int, salt: bytes, context_bytes: bytes) -> bytes:
    head = _FIXED.pack(
        FORMAT_VERSION,
        SUITE_AES_256_GCM_HKDF_SHA256_COMMIT,
        segment_size,
        salt,
        len(context_bytes),
    )
    return head + context_bytes


def _derive(
    data_key: bytes | bytearray | memoryview, salt: bytes, prefix: bytes, *, want_cipher: bool
) -> tuple[AESGCM | None, bytes]:
    okm = bytearray(DATA_KEY_LENGTH + COMMITMENT_LENGTH)
    try:
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=len(okm),
            salt=salt,
            info=_KDF_LABEL + hashlib.sha256(prefix).digest(),
        )
        hkdf.derive_into(data_key, okm)
        view = memoryview(okm)
        aead = AESGCM(view[:DATA_KEY_LENGTH]) if want_cipher else None
        commitment = bytes(view[DATA_KEY_LENGTH:])
        view.release()
        return aead, commitment
    finally:
        okm[:] = bytes(len(okm))


class MessageCipher:
    """AES-256-GCM under one message key, with the STREAM nonce schedule. Holds the key only
    inside the AEAD object; its repr shows nothing."""

    __slots__ = ("_aead",)

    def __init__(self, aead: AESGCM) -> None:
        self._aead = aead

    def __repr__(self) -> str:
        return "MessageCipher(<redacted>)"

    @staticmethod
    def nonce(index: int, last: bool) -> bytes:
        """``7 zero bytes || index:u32 || last``."""
        return _NONCE.pack(index, 1 if last else 0)

    def seal_into(self, index: int, last: bool, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt one segment into ``out`` (exactly ``len(plaintext) + TAG_LENGTH`` bytes)."""
        if not 0 <= index < MAX_SEGMENTS:
            raise ValidationException("message too long: more than 2**32 segments")
        self._aead.encrypt_into(self.nonce(index, last), plaintext, None, out)

    def open_into(self, index: int, last: bool, segment: memoryview, out: memoryview) -> None:
        """Decrypt and authenticate one segment into ``out`` (``len(segment) - TAG_LENGTH``
        bytes). ``DecryptionFailed`` when the tag does not verify."""
        if not 0 <= index < MAX_SEGMENTS or len(segment) < TAG_LENGTH:
            raise DecryptionFailed
        try:
            self._aead.decrypt_into(self.nonce(index, last), segment, None, out)
        except Exception:  # cryptography's InvalidTag, or a length it refuses
            raise DecryptionFailed from None
