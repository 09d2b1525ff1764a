"""``hsmkms encrypt-file``, ``decrypt-file`` and ``rewrap``: envelope encryption of files and
streams (:mod:`hsmkms.envelope`).

Data keys come from the local data directory (the KMS service in this process; each call is
recorded in the audit trail as the local operator's) or, with ``--endpoint-url`` — or
``AWS_ENDPOINT_URL_KMS`` / ``AWS_ENDPOINT_URL`` in the environment, as every AWS tool reads them,
unless ``--data-dir`` is given — from any KMS endpoint through botocore, boto3's core
(credentials and region from the usual AWS environment variables or profile). ``-`` means
stdin or stdout.

Output files are written atomically: nothing appears under the output name unless the whole
operation succeeded (an interrupted or failed run, even ``kill -9``, leaves no partial file).
Decrypting to stdout writes nothing until every segment has authenticated (stdin is spooled as
ciphertext to an anonymous temporary file for that), unless ``--stream-unverified``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO

from hsmkms.cli.errors import UsageError
from hsmkms.envelope.client import EnvelopeClient
from hsmkms.envelope.errors import DecryptionFailed
from hsmkms.envelope.files import atomic_output
from hsmkms.envelope.format import (
    DEFAULT_SEGMENT_SIZE,
    MAX_HEADER_LENGTH,
    TAG_LENGTH,
    EnvelopeHeader,
    Readable,
    header_problem,
    payload_length_fits,
)
from hsmkms.envelope.providers import Boto3Provider
from hsmkms.envelope.stream import Progress, Writable
from hsmkms.errors import ClientError, NotFoundException, ValidationException

if TYPE_CHECKING:
    from hsmkms.service import KmsService
    from hsmkms.system import System

# The local data directory's modules (the service, the store, the token) are imported where
# they are used, so that --endpoint-url does not pay for them at start-up.

STDIO = "-"
PROGRESS_MIN_BYTES = 64 << 20
_PROGRESS_INTERVAL = 0.1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    def common(parser: argparse.ArgumentParser) -> None:
        add_data_dir(parser)
        parser.add_argument(
            "--endpoint-url",
            metavar="URL",
            help="use this KMS endpoint (an hsmkms server or AWS KMS) through boto3 instead of "
            "the local data directory (default: $AWS_ENDPOINT_URL_KMS, else $AWS_ENDPOINT_URL, "
            "unless --data-dir is given)",
        )
        parser.add_argument("--region", help="AWS region for --endpoint-url")
        parser.add_argument(
            "--no-fsync",
            dest="fsync",
            action="store_false",
            help="do not wait for the output to reach the disk",
        )

    encrypt = sub.add_parser(
        "encrypt-file",
        help="encrypt a file or stream under a new data key",
        description="Encrypt IN to OUT (- for stdin/stdout) as segmented AES-256-GCM under a "
        "fresh data key from KEY; the output carries the encrypted data key.",
    )
    encrypt.add_argument("input", metavar="IN")
    encrypt.add_argument("output", metavar="OUT")
    encrypt.add_argument("--key-id", required=True, help="key id, key ARN, alias or alias ARN")
    encrypt.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="encryption context pair (repeatable), bound to the file: decrypt-file needs "
        "none of it, but refuses the file when a --context pair it is given is missing from "
        "the file's context or has another value (pairs it is not given are not checked)",
    )
    encrypt.add_argument(
        "--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE, help=argparse.SUPPRESS
    )
    common(encrypt)
    encrypt.set_defaults(run=run_encrypt)

    decrypt = sub.add_parser(
        "decrypt-file",
        help="decrypt a file or stream made by encrypt-file",
        description="Decrypt IN to OUT (- for stdin/stdout). The key comes from IN's header. "
        "OUT (mode 0600) appears only if the whole input authenticates.",
    )
    decrypt.add_argument("input", metavar="IN")
    decrypt.add_argument("output", metavar="OUT")
    decrypt.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="require this encryption context pair in the file (repeatable): every pair "
        "given must be in the file's context with this value; the file may hold more",
    )
    decrypt.add_argument("--key-id", help="require the input to be encrypted under this key")
    decrypt.add_argument(
        "--stream-unverified",
        action="store_true",
        help="to stdout: write each segment as soon as it authenticates, in one pass; a "
        "truncated input is then detected only at its end, after output was written "
        "(the exit status is non-zero: discard the output)",
    )
    common(decrypt)
    decrypt.set_defaults(run=run_decrypt)

    rewrap = sub.add_parser(
        "rewrap",
        help="re-encrypt a file's data key under another key",
        description="Re-encrypt FILE's data key under KEY (KMS ReEncrypt) and replace FILE "
        "atomically. The payload is copied as it is, never decrypted.",
    )
    rewrap.add_argument("file", metavar="FILE")
    rewrap.add_argument("--key-id", required=True, help="the new key")
    common(rewrap)
    rewrap.set_defaults(run=run_rewrap)


def parse_context(pairs: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict; :class:`UsageError` for a malformed or repeated key."""
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--context needs KEY=VALUE, got {pair!r}")
        if key in context:
            raise UsageError(f"--context key {key!r} given twice")
        context[key] = value
    return context


def configured_endpoint(args: argparse.Namespace) -> str | None:
    """The KMS endpoint to use instead of the local data directory: ``--endpoint-url``; else,
    unless ``--data-dir`` was given, the one every AWS tool takes from the environment —
    ``AWS_ENDPOINT_URL_KMS``, then ``AWS_ENDPOINT_URL`` — unless
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true (botocore's rule)."""
    if args.endpoint_url:
        return str(args.endpoint_url)
    if args.data_dir is not None:
        return None
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_KMS") or os.environ.get("AWS_ENDPOINT_URL") or None


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[EnvelopeClient]:
    segment_size = getattr(args, "segment_size", DEFAULT_SEGMENT_SIZE)
    endpoint = configured_endpoint(args)
    if endpoint is not None:
        args.endpoint_url = endpoint
        yield EnvelopeClient(Boto3Provider(_boto3_client(args)), segment_size=segment_size)
        return
    from hsmkms.envelope.providers import ServiceProvider
    from hsmkms.system import OperatorService

    with _local_system(args.data_dir) as system:
        # The local operator's GenerateDataKey, Decrypt and ReEncrypt calls are recorded in
        # the audit trail like the server's (docs/audit.md, "Local operator records").
        operator = OperatorService(system, command=args.command)
        yield EnvelopeClient(ServiceProvider(operator), segment_size=segment_size)


def _boto3_client(args: argparse.Namespace) -> Any:
    try:
        # botocore's session is what boto3.client uses (the same credential and region
        # chain); importing boto3 itself would add s3transfer and its resources to start-up.
        import botocore.session
        from botocore import exceptions as boto_errors
    except ImportError:
        raise ValidationException(
            "--endpoint-url needs boto3: pip install 'hsmkms[client]'"
        ) from None
    from hsmkms.envelope.providers import map_boto_error

    try:
        session = botocore.session.get_session()
        return session.create_client("kms", endpoint_url=args.endpoint_url, region_name=args.region)
    except (boto_errors.BotoCoreError, ValueError) as exc:
        if isinstance(exc, ValueError):
            raise UsageError(f"invalid --endpoint-url: {args.endpoint_url}") from None
        raise map_boto_error(exc) from exc


@contextlib.contextmanager
def _local_system(data_dir: Path | None, *, create: bool = False) -> Iterator[System]:
    """The system on an existing data directory (``create``: made when missing, for tests and
    benchmarks), its audit records appended to the trail as they are made."""
    from hsmkms.config import Settings
    from hsmkms.system import System, require_data_directory

    settings = Settings.load(data_dir)
    if not create:
        require_data_directory(settings)
    with System.open(settings, audit="direct", prepare=create) as system:
        yield system


@contextlib.contextmanager
def _local_service(data_dir: Path | None) -> Iterator[KmsService]:
    """The KmsService on the data directory, as the local operator's calls reach it (for
    tests and benchmarks that set up keys; calls made on it directly are not audited). Makes
    the data directory when missing."""
    with _local_system(data_dir, create=True) as system:
        yield system.service


class _ProgressBar:
    """``[#####.....]  42%  430/1024 MiB  1.2 GB/s`` on stderr, redrawn at most 10 times a
    second."""

    def __init__(self, total: int) -> None:
        self._total = max(total, 1)
        self._start = time.monotonic()
        self._drawn = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self._drawn < _PROGRESS_INTERVAL and done < self._total:
            return
        self._drawn = now
        fraction = min(done / self._total, 1.0)
        filled = int(fraction * 30)
        rate = done / max(now - self._start, 1e-6) / 1e9
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}  "
            f"{done >> 20}/{self._total >> 20} MiB  {rate:.1f} GB/s"
        )
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


@contextlib.contextmanager
def _progress(path: str) -> Iterator[Progress | None]:
    """A progress bar when stderr is a terminal and ``path`` is a large regular file."""
    size = 0
    if path != STDIO and sys.stderr.isatty():
        with contextlib.suppress(OSError):
            info = os.stat(path)
            if stat.S_ISREG(info.st_mode):
                size = info.st_size
    if size < PROGRESS_MIN_BYTES:
        yield None
        return
    bar = _ProgressBar(size)
    try:
        yield bar
    finally:
        bar.finish()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that cleanup runs (no partial output)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """The command's few objects are freed by reference counting (the segment loop makes no
    cycles); the cyclic collector would only walk the modules imported at start-up (botocore
    or the local service) again and again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _InterruptibleInput:
    """Reads a pipe or terminal with one ``read`` per call, after ``poll`` says data is there.

    A signal that arrives just before a blocking ``read`` would otherwise leave it blocked
    with the Python handler never run (and ``BufferedReader`` loops over several reads in C,
    widening that window): here ``read`` never blocks, and ``poll`` wakes up every
    half second, so SIGTERM and Ctrl-C always take effect."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def readinto(self, buffer: memoryview, /) -> int:
        while not self._poll.poll(500):
            pass
        return os.readv(self._fd, [buffer])


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[tuple[Readable, int | None]]:
    """The source and, for a regular file, its length."""
    if path == STDIO:
        fd = sys.stdin.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):  # a redirected file: read it as one
            with open(fd, "rb", buffering=0, closefd=False) as source:
                yield source, None
            return
        yield _InterruptibleInput(fd), None
        return
    with open(path, "rb", buffering=0) as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            yield source, None
            return
        # Read once, front to back (as cp says): a larger read-ahead on disks.
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(source.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield source, info.st_size


class _Preallocated:
    """An output file whose blocks are allocated (``posix_fallocate``) on a helper thread
    while the command starts up and asks KMS for the key, so that writing the data later
    only copies it: on tmpfs, allocating the pages costs as much as writing them.

    The allocation finishes before the first write (so glibc's emulation on file systems
    without ``fallocate``, which writes a zero into each block, never races a write), and
    before the file is closed. It is only a hint: a failure (no space, a file size limit) is
    ignored and left to the writes to report. :meth:`finish` cuts the file to what was
    written (``size`` is an upper bound)."""

    def __init__(self, sink: BinaryIO, size: int) -> None:
        self._sink = sink
        self._thread: threading.Thread | None = threading.Thread(
            target=self._allocate, args=(sink.fileno(), size), daemon=True
        )
        self._thread.start()

    @staticmethod
    def _allocate(fd: int, size: int) -> None:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def write(self, data: memoryview, /) -> int | None:
        self.wait()
        return self._sink.write(data)

    def finish(self) -> None:
        self.wait()
        os.ftruncate(self._sink.fileno(), self._sink.tell())


@contextlib.contextmanager
def _open_output(
    path: str, mode: int, fsync: bool, *, size_bound: int | None = None
) -> Iterator[tuple[Writable, bool]]:
    """The sink, and whether it is atomic (a regular file, linked into place on success).
    stdout, ``/dev/null`` or a FIFO are written in place. ``size_bound``: at most this many
    bytes will be written (the output file is preallocated while the command starts)."""
    if path == STDIO:
        yield sys.stdout.buffer, False
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(target.stat().st_mode):
            with open(target, "wb", buffering=0) as sink:
                yield sink, False
            return
    with atomic_output(target, mode=mode, fsync=fsync) as sink:
        if not size_bound or not hasattr(os, "posix_fallocate"):
            yield sink, True
            return
        preallocated = _Preallocated(sink, size_bound)
        try:
            yield preallocated, True
            preallocated.finish()
        finally:
            preallocated.wait()  # before the file is closed


def _ciphertext_bound(length: int | None, args: argparse.Namespace) -> int | None:
    """The most bytes ``encrypt-file`` writes for a plaintext of ``length`` bytes."""
    if length is None:
        return None
    segment_size = max(int(args.segment_size), 1)
    segments = max(1, -(-length // segment_size))
    return MAX_HEADER_LENGTH + length + TAG_LENGTH * segments


@dataclasses.dataclass
class _Run:
    """What an encrypt-file or decrypt-file run works with."""

    client: EnvelopeClient
    source: Readable
    length: int | None
    sink: Writable
    atomic: bool
    progress: Progress | None


@contextlib.contextmanager
def _running(
    args: argparse.Namespace, mode: int, output_bound: Callable[[int | None], int | None]
) -> Iterator[_Run]:
    """The client, the input, the output (at most ``output_bound(input length)`` bytes) and
    the progress bar of one run. With a KMS endpoint the files are opened first, so that the
    output is preallocated while the client starts (imports botocore, reads its models); on
    the local data directory the client comes first, so that a missing data directory is
    the usage error it is before anything else is looked at."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_as_interrupt())
        stack.enter_context(_without_cyclic_gc())
        local = configured_endpoint(args) is None
        client = stack.enter_context(_client(args)) if local else None
        source, length = stack.enter_context(_open_input(args.input))
        sink, atomic = stack.enter_context(
            _open_output(args.output, mode, args.fsync, size_bound=output_bound(length))
        )
        if client is None:
            client = stack.enter_context(_client(args))
        progress = stack.enter_context(_progress(args.input))
        yield _Run(client, source, length, sink, atomic, progress)


def run_encrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    with _running(args, 0o666, lambda length: _ciphertext_bound(length, args)) as run:
        run.client.encrypt(
            run.source,
            run.sink,
            args.key_id,
            context,
            plaintext_length=run.length,
            progress=run.progress,
        )
    return 0


def run_decrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    try:
        return _decrypt(args, context)
    except (DecryptionFailed, NotFoundException):
        # (NotFoundException: a header naming a key ARN of another account or region.)
        reason = _why_not(args, context)
        if reason is None:
            raise
        raise DecryptionFailedBecause(f"decryption failed: {reason}") from None


class DecryptionFailedBecause(ClientError):
    """What the command line says when the file's header tells why it cannot be decrypted.
    The payload's own failure stays the one fixed message (:class:`DecryptionFailed`); an API
    caller never sees this (it is the command line's, after the failure)."""

    code = "InvalidCiphertextException"


def _why_not(args: argparse.Namespace, context: dict[str, str]) -> str | None:
    """Why ``args.input`` cannot be decrypted, from what the file shows without any key: not
    an hsmkms file; cut short in its header or its payload; another key than ``--key-id``; a
    ``--context`` pair the file does not hold; a key this data directory (or endpoint) does
    not hold. None when the header tells nothing: the payload failed to authenticate
    (modified, cut at a segment boundary, or the data key's), which stays one opaque failure."""
    if args.input == STDIO:
        return None  # read once, not kept: nothing to look at again
    path = Path(args.input)
    try:
        size = path.stat().st_size
        with path.open("rb") as source:
            prefix = source.read(MAX_HEADER_LENGTH)
    except OSError:
        return None
    from hsmkms.audit.records import key_id_of

    problem = header_problem(prefix)
    if problem == "not-envelope":
        return f"{args.input} is not a file made by hsmkms encrypt-file"
    if problem == "truncated":
        return f"{args.input} is cut short: its header is incomplete ({size} bytes)"
    header, header_length = EnvelopeHeader.parse(prefix)
    arn = header.key_arn
    given = args.key_id
    is_alias = given is not None and (given.startswith("alias/") or ":alias/" in given)
    if given and not is_alias and given not in (arn, key_id_of(arn)):
        return f"{args.input} was encrypted under key {arn}, not {given}"
    actual = header.encryption_context
    differing = sorted(k for k, v in context.items() if actual.get(k) != v)
    if differing:
        keys = ", ".join(sorted(actual)) or "none"
        return (
            f"{args.input}'s encryption context does not hold --context "
            f"{', '.join(f'{k}=...' for k in differing)} as given (its keys: {keys})"
        )
    missing = _missing_key(args, arn)
    if missing is not None:
        return missing
    if not payload_length_fits(size - header_length, header.segment_size):
        return (
            f"{args.input} is cut short or has bytes added after its end (its payload is no "
            "whole number of segments)"
        )
    return None


def _missing_key(args: argparse.Namespace, arn: str) -> str | None:
    """That the key ``arn`` is not where the command looked, when that is so."""
    from hsmkms.config import Settings
    from hsmkms.system import System

    parts = arn.split(":")
    if len(parts) < 6 or not parts[5].startswith("key/"):
        return None
    region, account, key_id = parts[3], parts[4], parts[5].removeprefix("key/")
    endpoint = configured_endpoint(args)
    if endpoint is not None:
        try:
            _boto3_client(args).describe_key(KeyId=arn)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code == "NotFoundException":
                return f"{args.input} was encrypted under key {arn}, which {endpoint} does not hold"
        return None
    settings = Settings.load(args.data_dir)
    if (account, region) != (settings.account_id, settings.region):
        return (
            f"{args.input} was encrypted under a key of account {account} in {region}; this data "
            f"directory is account {settings.account_id} in {settings.region} (another data "
            "directory, or --endpoint-url)"
        )
    with System.open(settings, audit=None, prepare=False) as system:
        known = system.store.get_key(key_id) is not None
    if not known:
        return (
            f"{args.input} was encrypted under key {arn}, which the data directory "
            f"{settings.data_dir} does not hold (another data directory, or --endpoint-url)"
        )
    return None


def _decrypt(args: argparse.Namespace, context: dict[str, str]) -> int:
    # The plaintext is at most as long as the input.
    with _running(args, 0o600, lambda length: length) as run:
        # An atomic output is never seen unless complete; any other must not receive a byte
        # before the whole input has authenticated.
        run.client.decrypt(
            run.source,
            run.sink,
            context,
            key_id=args.key_id,
            authenticate_first=not run.atomic and not args.stream_unverified,
            progress=run.progress,
        )
    return 0


def run_rewrap(args: argparse.Namespace) -> int:
    if args.file == STDIO:
        raise UsageError("rewrap needs a file, not -")
    with _terminate_as_interrupt(), _without_cyclic_gc(), _client(args) as client:
        client.rewrap_file(args.file, args.key_id, fsync=args.fsync)
    return 0
