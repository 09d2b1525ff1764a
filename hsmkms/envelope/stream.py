"""The streaming engine: encrypt and decrypt the segment payload in constant memory.

Buffers are allocated once per message (a few segments' worth) and filled with ``readinto``;
AES-GCM writes straight into the output buffer (``encrypt_into`` / ``decrypt_into``), so a
segment is never copied in Python. File reads and writes release the GIL and AES-GCM holds
it, so reading ahead (regular files only) and writing behind run on two helper threads while
the calling thread does the cryptography: on CPython this is the overlap that pays.

Release of plaintext: :func:`decrypt_payload` writes each segment only after its tag has
verified, but the *message* is known to be complete only when the last segment verifies.
Callers that must not release a partial plaintext write to a temporary file and rename it
afterwards (:mod:`hsmkms.envelope.files`), or authenticate first (:func:`verify_payload`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import stat
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, Protocol

from hsmkms.envelope.errors import DecryptionFailed
from hsmkms.envelope.format import (
    MAX_SEGMENTS,
    TAG_LENGTH,
    EnvelopeHeader,
    MessageCipher,
    Readable,
    read_exact,
)
from hsmkms.errors import ValidationException

__all__ = [
    "Progress",
    "Writable",
    "decrypt_payload",
    "decrypt_stream",
    "encrypt_payload",
    "encrypt_stream",
    "verify_payload",
    "write_all",
]

Progress = Callable[[int], None]
"""Called with the number of plaintext bytes done so far, after each segment."""

# Buffers in flight between the reader thread, the crypto loop and the writer thread.
_READ_DEPTH: Final = 4
_WRITE_DEPTH: Final = 3
# Below this segment size the helper threads cost more than they save.
THREAD_MIN_SEGMENT: Final = 64 * 1024


class Writable(Protocol):
    """A binary sink: a file, a pipe, ``sys.stdout.buffer``, ``io.BytesIO``."""

    def write(self, data: memoryview, /) -> int | None: ...


def write_all(sink: Writable, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` (unbuffered files and pipes may write short)."""
    with memoryview(data) as whole:
        view = whole
        while view:
            n = sink.write(view)
            if n is None:
                raise BlockingIOError("the output would block")
            view = view[n:]


def _is_regular_file(stream: object) -> bool:
    fileno = getattr(stream, "fileno", None)
    if fileno is None:
        return False
    try:
        return stat.S_ISREG(os.fstat(fileno()).st_mode)
    except (OSError, ValueError):  # io.BytesIO and friends have no descriptor
        return False


def _start_helper(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread with every signal blocked, so that the kernel delivers SIGINT and
    SIGTERM to the main thread: there they interrupt a blocking read (a pipe) and run the
    Python handler. A signal taken by a helper thread would leave the main thread blocked."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        thread.start()
        return thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()  # the new thread inherits the blocked mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


def _wipe(buffers: list[bytearray]) -> None:
    for buf in buffers:
        buf[:] = bytes(len(buf))


class _Input:
    """Chunks of ``size`` bytes from ``source``, read ahead on a thread for regular files (a
    read there never blocks for long, so the thread always stops promptly), else inline.

    ``next()`` returns ``(buffer, n)``; ``n < size`` means the source ended. ``release(buf)``
    hands a buffer back for reuse."""

    def __init__(self, source: Readable, size: int, *, wipe: bool) -> None:
        self._source = source
        self._size = size
        self._wipe = wipe
        self._threaded = size >= THREAD_MIN_SEGMENT and _is_regular_file(source)
        self._buffers = [bytearray(size) for _ in range(_READ_DEPTH if self._threaded else 2)]
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for buf in self._buffers:
            self._free.put(buf)
        self._filled: queue.SimpleQueue[tuple[bytearray, int] | BaseException] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._threaded:
            self._thread = _start_helper(self._run, "envelope-reader")

    def _read(self, buf: bytearray) -> int:
        with memoryview(buf) as view:
            return read_exact(self._source, view)

    def _run(self) -> None:
        while True:
            buf = self._free.get()
            if buf is None or self._stop.is_set():
                return
            try:
                n = self._read(buf)
            except BaseException as exc:  # handed to the consumer
                self._filled.put(exc)
                return
            self._filled.put((buf, n))
            if n < self._size:
                return

    def next(self) -> tuple[bytearray, int]:
        if not self._threaded:
            buf = self._free.get()
            assert buf is not None
            return buf, self._read(buf)
        item = self._filled.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, buf: bytearray) -> None:
        self._free.put(buf)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._free.put(None)
            self._thread.join()
            self._thread = None
        if self._wipe:
            _wipe(self._buffers)


class _Output:
    """Output buffers, written behind on a thread (``threaded``) or inline.

    ``buffer()`` returns a free buffer; ``submit(buf, n)`` writes its first ``n`` bytes. An
    error on the writer thread is raised by the next call and by ``close()``. With no sink,
    nothing is written (verification only)."""

    def __init__(self, sink: Writable | None, size: int, *, threaded: bool, wipe: bool) -> None:
        self._sink = sink
        self._wipe = wipe
        self._threaded = threaded and sink is not None
        self._buffers = [bytearray(size) for _ in range(_WRITE_DEPTH if self._threaded else 1)]
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for buf in self._buffers:
            self._free.put(buf)
        self._pending: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self._threaded:
            self._thread = _start_helper(self._run, "envelope-writer")

    def _write(self, buf: bytearray, n: int) -> None:
        if self._sink is not None:
            with memoryview(buf) as view:
                write_all(self._sink, view[:n])

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            buf, n = item
            try:
                if self._error is None:
                    self._write(buf, n)
            except BaseException as exc:  # handed to the crypto loop
                self._error = exc
            finally:
                self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> bytearray:
        self._check()
        return self._free.get()

    def submit(self, buf: bytearray, n: int) -> None:
        if self._threaded:
            self._pending.put((buf, n))
            return
        try:
            self._write(buf, n)
        finally:
            self._free.put(buf)

    def close(self) -> None:
        """Wait for the queued writes; wipe the buffers when they held plaintext."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()
            self._thread = None
        if self._wipe:
            _wipe(self._buffers)
        self._check()

    def __enter__(self) -> _Output:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The error already being raised is the one to report.
        with contextlib.suppress(BaseException):
            self.close()


def _run_segments(
    source: Readable,
    sink: Writable | None,
    cipher: MessageCipher,
    segment_size: int,
    progress: Progress | None,
    *,
    sealing: bool,
) -> int:
    """The one segment loop, for sealing and for opening. Holds the current chunk and the
    next one: a short or empty next chunk marks the current one as the last."""
    in_size = segment_size if sealing else segment_size + TAG_LENGTH
    out_size = segment_size + TAG_LENGTH if sealing else segment_size
    threaded = segment_size >= THREAD_MIN_SEGMENT
    total = 0
    chunks = _Input(source, in_size, wipe=sealing)
    try:
        with _Output(sink, out_size, threaded=threaded, wipe=not sealing) as out:
            buf, n = chunks.next()
            index = 0
            while True:
                following = chunks.next() if n == in_size else None
                last = following is None or following[1] == 0
                if index >= MAX_SEGMENTS:
                    if sealing:
                        raise ValidationException("message too long: more than 2**32 segments")
                    raise DecryptionFailed
                if sealing:
                    size = n + TAG_LENGTH
                elif n < TAG_LENGTH or (n == TAG_LENGTH and index > 0):
                    # The only segment may be empty; a later one may not (the encoder never
                    # writes an empty last segment after a full one).
                    raise DecryptionFailed
                else:
                    size = n - TAG_LENGTH
                target = out.buffer()
                with memoryview(buf) as src_view, memoryview(target) as dst_view:
                    if sealing:
                        cipher.seal_into(index, last, src_view[:n], dst_view[:size])
                    else:
                        cipher.open_into(index, last, src_view[:n], dst_view[:size])
                out.submit(target, size)
                chunks.release(buf)
                total += n if sealing else size
                if progress is not None:
                    progress(total)
                if following is None or last:
                    return total
                buf, n = following
                index += 1
    finally:
        chunks.close()


def encrypt_payload(
    source: Readable,
    sink: Writable,
    cipher: MessageCipher,
    segment_size: int,
    *,
    progress: Progress | None = None,
) -> int:
    """Encrypt ``source`` to ``sink`` as segments; returns the plaintext length.

    Reads one segment ahead to know which segment is the last, so the input's length need not
    be known. Memory: a few segment buffers, allocated once per call."""
    return _run_segments(source, sink, cipher, segment_size, progress, sealing=True)


def decrypt_payload(
    source: Readable,
    sink: Writable,
    cipher: MessageCipher,
    segment_size: int,
    *,
    progress: Progress | None = None,
) -> int:
    """Decrypt and authenticate the segments of ``source`` to ``sink``; returns the plaintext
    length. ``DecryptionFailed`` on any failure. Each segment reaches ``sink`` only after its
    tag verifies, but the message is whole only when this returns: see the module docstring."""
    return _run_segments(source, sink, cipher, segment_size, progress, sealing=False)


def verify_payload(
    source: Readable,
    cipher: MessageCipher,
    segment_size: int,
    *,
    progress: Progress | None = None,
) -> int:
    """Authenticate every segment of ``source`` without releasing any plaintext; returns the
    plaintext length. ``DecryptionFailed`` when any check fails."""
    return _run_segments(source, None, cipher, segment_size, progress, sealing=False)


def encrypt_stream(
    source: Readable,
    sink: Writable,
    header: EnvelopeHeader,
    data_key: bytes | bytearray | memoryview,
    *,
    progress: Progress | None = None,
) -> int:
    """Write ``header`` and then ``source`` encrypted to ``sink``; returns the plaintext
    length. ``header`` must come from :meth:`EnvelopeHeader.create` with the same data key."""
    cipher = header.seal_cipher(data_key)
    write_all(sink, header.to_bytes())
    return encrypt_payload(source, sink, cipher, header.segment_size, progress=progress)


def decrypt_stream(
    source: Readable,
    sink: Writable,
    data_key: bytes | bytearray | memoryview,
    *,
    header: EnvelopeHeader | None = None,
    progress: Progress | None = None,
) -> int:
    """Decrypt one message from ``source`` with a raw data key (the format layer; applications
    use :class:`~hsmkms.envelope.EnvelopeClient`). Reads the header first unless the caller
    already has. ``DecryptionFailed`` on any failure."""
    if header is None:
        header = EnvelopeHeader.read(source)
    cipher = header.open_cipher(data_key)
    return decrypt_payload(source, sink, cipher, header.segment_size, progress=progress)
