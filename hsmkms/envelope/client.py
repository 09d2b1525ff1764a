"""EnvelopeClient: encrypt and decrypt files and streams with data keys from a KMS.

Security contract:

* Decryption takes the KMS key from the header (never trial decryption) and passes it as
  Decrypt's ``KeyId``; a caller-given ``key_id`` is passed instead, so KMS checks it. The
  ARN KMS answers with must equal the header's.
* An expected encryption context, when given, must be contained in the header's (every
  given pair present with the same value, the Encryption SDK's rule); it is checked before
  KMS is called. KMS then checks the whole context again, as AAD of the data key.
* Every failure to open a message is the same :class:`DecryptionFailed`.
* :meth:`EnvelopeClient.decrypt_file` releases no plaintext unless the whole message
  authenticates: it writes an unnamed file that is linked into place only at the end. To a
  stream (stdout, a pipe), ``authenticate_first=True`` reads the whole message once to check
  every tag before writing anything; a non-seekable source is spooled as *ciphertext* to an
  anonymous temporary file for that.
* Data keys are wiped as soon as the message key is derived.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from hsmkms.envelope.cache import DataKeyCache
from hsmkms.envelope.errors import DecryptionFailed
from hsmkms.envelope.files import atomic_output, copy_range
from hsmkms.envelope.format import DEFAULT_SEGMENT_SIZE, EnvelopeHeader, Readable
from hsmkms.envelope.providers import DataKey, DataKeyProvider
from hsmkms.envelope.stream import (
    Progress,
    Writable,
    decrypt_payload,
    encrypt_payload,
    verify_payload,
    write_all,
)
from hsmkms.errors import (
    IncorrectKeyException,
    InvalidArnException,
    InvalidCiphertextException,
    ValidationException,
)

__all__ = ["EnvelopeClient", "EnvelopeInfo"]


@dataclasses.dataclass(frozen=True, slots=True)
class EnvelopeInfo:
    """What one encrypt, decrypt or rewrap did: the message header and the plaintext length
    (``None`` for rewrap, which never reads the payload)."""

    header: EnvelopeHeader
    plaintext_length: int | None

    @property
    def key_arn(self) -> str:
        return self.header.key_arn

    @property
    def encryption_context(self) -> Mapping[str, str]:
        return self.header.encryption_context


def _check_expected_context(expected: Mapping[str, str] | None, header: EnvelopeHeader) -> None:
    if not expected:
        return
    actual = header.encryption_context
    for key, value in expected.items():
        if actual.get(key) != value:
            raise DecryptionFailed


class _Tee:
    """Reads from ``source`` and copies what it read to ``spool``."""

    def __init__(self, source: Readable, spool: BinaryIO) -> None:
        self._source = source
        self._spool = spool

    def readinto(self, buffer: memoryview, /) -> int:
        n = self._source.readinto(buffer) or 0
        if n:
            write_all(self._spool, buffer[:n])
        return n


def _is_regular_path(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return True


class EnvelopeClient:
    """Envelope encryption over a :class:`DataKeyProvider`, with an optional
    :class:`DataKeyCache` (off by default). Thread-safe when its provider is."""

    def __init__(
        self,
        provider: DataKeyProvider,
        *,
        cache: DataKeyCache | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        self.provider = provider
        self.cache = cache
        self.segment_size = segment_size

    def __repr__(self) -> str:
        return f"EnvelopeClient({self.provider!r}, cache={self.cache!r})"

    # -- keys --------------------------------------------------------------------------------------

    def _new_data_key(
        self, key_id: str, context: Mapping[str, str], plaintext_length: int | None
    ) -> DataKey:
        if self.cache is not None:
            return self.cache.data_key(self.provider, key_id, context, plaintext_length)
        return self.provider.generate_data_key(key_id, context)

    def _open_header(self, header: EnvelopeHeader, key_id: str | None) -> DataKey:
        try:
            data_key = self.provider.decrypt_data_key(
                header.encrypted_data_key,
                header.encryption_context,
                key_id if key_id is not None else header.key_arn,
            )
        except (
            InvalidCiphertextException,
            IncorrectKeyException,
            InvalidArnException,
            ValidationException,
        ) as exc:
            # spec: KMS answers a wrong key, context or blob with these; to the caller of
            # envelope decryption they are all one failure.
            raise DecryptionFailed from exc
        if data_key.key_arn != header.key_arn:
            data_key.wipe()
            raise DecryptionFailed
        return data_key

    # -- streams -----------------------------------------------------------------------------------

    def encrypt(
        self,
        source: Readable,
        sink: Writable,
        key_id: str,
        context: Mapping[str, str] | None = None,
        *,
        plaintext_length: int | None = None,
        progress: Progress | None = None,
    ) -> EnvelopeInfo:
        """Encrypt ``source`` to ``sink`` under a new data key from ``key_id``.

        ``plaintext_length`` (when known) lets the data-key cache serve the message. The
        output is complete only when this returns; a partial output never decrypts."""
        context = dict(context or {})
        data_key = self._new_data_key(key_id, context, plaintext_length)
        try:
            header = EnvelopeHeader.create(
                data_key.plaintext,
                key_arn=data_key.key_arn,
                encrypted_data_key=data_key.encrypted,
                encryption_context=context,
                segment_size=self.segment_size,
            )
            cipher = header.seal_cipher(data_key.plaintext)
        finally:
            data_key.wipe()
        write_all(sink, header.to_bytes())
        length = encrypt_payload(source, sink, cipher, header.segment_size, progress=progress)
        return EnvelopeInfo(header, length)

    def decrypt(
        self,
        source: Readable,
        sink: Writable,
        context: Mapping[str, str] | None = None,
        *,
        key_id: str | None = None,
        authenticate_first: bool = False,
        progress: Progress | None = None,
    ) -> EnvelopeInfo:
        """Decrypt one message from ``source`` to ``sink``.

        Without ``authenticate_first``, segments reach ``sink`` as they verify, and a
        truncated message is detected only at its end (after earlier segments were written):
        use it only when ``sink`` is discarded on failure. With it, nothing is written until
        every segment has verified (the source is read twice, or spooled as ciphertext to an
        anonymous temporary file when it cannot seek)."""
        header = EnvelopeHeader.read(source)
        _check_expected_context(context, header)
        data_key = self._open_header(header, key_id)
        try:
            cipher = header.open_cipher(data_key.plaintext)
        finally:
            data_key.wipe()
        if not authenticate_first:
            length = decrypt_payload(source, sink, cipher, header.segment_size, progress=progress)
            return EnvelopeInfo(header, length)
        start = _tell(source)
        if start is not None:
            verify_payload(source, cipher, header.segment_size)
            source.seek(start)  # type: ignore[attr-defined]
            length = decrypt_payload(source, sink, cipher, header.segment_size, progress=progress)
            return EnvelopeInfo(header, length)
        with tempfile.TemporaryFile(prefix="hsmkms-ciphertext-") as spool:
            verify_payload(_Tee(source, spool), cipher, header.segment_size)
            spool.seek(0)
            length = decrypt_payload(spool, sink, cipher, header.segment_size, progress=progress)
        return EnvelopeInfo(header, length)

    def encrypt_bytes(
        self, plaintext: bytes, key_id: str, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Encrypt a small object in memory (the data-key cache applies)."""
        out = io.BytesIO()
        self.encrypt(io.BytesIO(plaintext), out, key_id, context, plaintext_length=len(plaintext))
        return out.getvalue()

    def decrypt_bytes(
        self, message: bytes, context: Mapping[str, str] | None = None, *, key_id: str | None = None
    ) -> bytes:
        """Decrypt a message held in memory; returns the plaintext only if it all verifies."""
        out = io.BytesIO()
        source = io.BytesIO(message)
        self.decrypt(source, out, context, key_id=key_id)
        if source.read(1):  # pragma: no cover - decrypt reads to the end
            raise DecryptionFailed
        return out.getvalue()

    # -- files -------------------------------------------------------------------------------------

    def encrypt_file(
        self,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        key_id: str,
        context: Mapping[str, str] | None = None,
        *,
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> EnvelopeInfo:
        """Encrypt the file ``source`` to ``destination`` atomically: on any failure the
        destination is left as it was (absent, or the old file)."""
        destination = Path(destination)
        with open(source, "rb", buffering=0) as src:
            length = os.fstat(src.fileno()).st_size
            if not _is_regular_path(destination):
                with open(destination, "wb", buffering=0) as dst:
                    return self.encrypt(
                        src, dst, key_id, context, plaintext_length=length, progress=progress
                    )
            with atomic_output(destination, mode=0o666, fsync=fsync) as dst:
                return self.encrypt(
                    src, dst, key_id, context, plaintext_length=length, progress=progress
                )

    def decrypt_file(
        self,
        source: str | os.PathLike[str],
        destination: str | os.PathLike[str],
        context: Mapping[str, str] | None = None,
        *,
        key_id: str | None = None,
        progress: Progress | None = None,
        fsync: bool = True,
    ) -> EnvelopeInfo:
        """Decrypt the file ``source`` to ``destination`` (mode 0600) atomically: the plaintext
        appears under its name only after the whole message authenticated. A destination that
        is not a regular file (a FIFO, ``/dev/null``) is written only after a first pass
        authenticated every segment."""
        destination = Path(destination)
        with open(source, "rb", buffering=0) as src:
            if not _is_regular_path(destination):
                with open(destination, "wb", buffering=0) as dst:
                    return self.decrypt(
                        src, dst, context, key_id=key_id, authenticate_first=True, progress=progress
                    )
            with atomic_output(destination, mode=0o600, fsync=fsync) as dst:
                return self.decrypt(src, dst, context, key_id=key_id, progress=progress)

    def rewrap_file(
        self, path: str | os.PathLike[str], new_key_id: str, *, fsync: bool = True
    ) -> EnvelopeInfo:
        """Re-encrypt the file's data key under ``new_key_id`` (KMS ReEncrypt) and replace the
        file atomically. The payload is copied as it is, inside the kernel: it is neither
        read into this process nor decrypted, and the plaintext data key is never seen here.
        The encryption context stays the same; the file keeps its permissions."""
        path = Path(path)
        with open(path, "rb", buffering=0) as src:
            info = os.fstat(src.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValidationException(f"rewrap needs a regular file: {path}")
            header = EnvelopeHeader.read(src)
            try:
                wrapped = self.provider.re_encrypt(
                    header.encrypted_data_key, header.encryption_context, new_key_id
                )
            except (InvalidCiphertextException, IncorrectKeyException) as exc:
                raise DecryptionFailed from exc
            new_header = header.with_wrapped_key(wrapped.key_arn, wrapped.encrypted)
            with atomic_output(path, mode=0o600, fsync=fsync) as dst:
                os.fchmod(dst.fileno(), stat.S_IMODE(info.st_mode))
                write_all(dst, new_header.to_bytes())
                copy_range(src, dst, header.length, info.st_size - header.length)
        return EnvelopeInfo(new_header, None)


def _tell(source: object) -> int | None:
    """The position of a seekable regular file, else ``None``."""
    seekable = getattr(source, "seekable", None)
    fileno = getattr(source, "fileno", None)
    if seekable is None or fileno is None:
        return None
    try:
        if not seekable() or not stat.S_ISREG(os.fstat(fileno()).st_mode):
            return None
        position: int = source.tell()  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return None
    return position
