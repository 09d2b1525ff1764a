"""Atomic file output: a file appears under its name complete, or not at all.

On Linux the data is written to an *unnamed* file in the target's directory (``O_TMPFILE``)
and linked into place only when complete, so a failure at any point — a decryption error, a
full disk, Ctrl-C, even ``kill -9`` — leaves nothing behind. Elsewhere (or on file systems
without ``O_TMPFILE``) a hidden temporary file in the same directory is renamed over the target
and removed on failure (``kill -9`` can then leave the hidden file, never the target).
Replacing an existing file uses ``rename``, which is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_output", "copy_range"]

_PROC_FD = "/proc/self/fd"


def _open_unnamed(directory: Path, mode: int) -> int | None:
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir(_PROC_FD):
        return None
    try:
        return os.open(directory, flag | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            if exc.errno == errno.ENOENT and not directory.is_dir():
                raise
            return None
        raise


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, mode: int = 0o666, fsync: bool = True
) -> Iterator[BinaryIO]:
    """Yield an unbuffered binary file that becomes ``path`` when the block exits normally.

    ``mode`` is filtered by the umask (use ``0o600`` for plaintext). With ``fsync``, the data
    and the directory entry are on disk before this returns."""
    target = Path(path).absolute()
    directory = target.parent
    fd = _open_unnamed(directory, mode)
    named: Path | None = None
    if fd is None:
        while True:
            named = _temp_name(target)
            try:
                fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                break
            except FileExistsError:  # pragma: no cover - 48 random bits
                continue
    file = open(fd, "wb", buffering=0, closefd=True)  # noqa: SIM115 - closed below
    try:
        yield file
        if fsync:
            os.fsync(fd)
        if named is None:
            _link_unnamed(fd, target)
        else:
            os.replace(named, target)
            named = None
        if fsync:
            _fsync_dir(directory)
    finally:
        file.close()
        if named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(named)


def _link_unnamed(fd: int, target: Path) -> None:
    source = f"{_PROC_FD}/{fd}"
    # linkat(AT_SYMLINK_FOLLOW) through /proc names the open file; os.link only uses linkat
    # (rather than link, which would link the /proc symlink itself) when given a dir fd.
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.link(source, target.name, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            pass
        else:
            return
        # The target exists: link under a hidden name, then rename over it (atomic replace).
        while True:
            staging = _temp_name(target)
            try:
                os.link(source, staging.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                break
            except FileExistsError:  # pragma: no cover - 48 random bits
                continue
        try:
            os.replace(staging.name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging.name, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def copy_range(source: BinaryIO, sink: BinaryIO, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``source`` from ``offset`` to the current end of ``sink``
    inside the kernel (``copy_file_range``: no read into this process; a reflink on file
    systems that share extents), falling back to ``sendfile`` and then to a buffered copy."""
    src, dst = source.fileno(), sink.fileno()
    done = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while done < length:
                n = copy_file_range(src, dst, length - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
    if done < length:
        source.seek(offset + done)
        while done < length:
            chunk = source.read(min(1 << 20, length - done))
            if not chunk:
                raise EOFError("the file ended early")
            view = memoryview(chunk)
            while view:
                written = sink.write(view)
                view = view[written or 0 :]
            done += len(chunk)
