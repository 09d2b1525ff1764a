"""The write lock of a token that several processes share through files (SoftHSM2; the
embedded default): ``KeystoreConfig.write_lock``.

SoftHSM2 2.6.1 keeps each object in a file of its own, finishes a new object in many
writes, and lets every process rewrite an object's file from what it holds in memory. Two of
its ways (read in its source, then reproduced here) lose objects across processes:

- ``C_GetAttributeValue`` first writes the default value of every attribute missing from the
  calling process's copy of the object (``P11Object::init``), the whole file rewritten from
  that copy. A process reading an object another process is still making (found by class, as
  a listing does) writes an early state over it: the creator answered ``CKR_OK``, keeps the
  whole object in memory, and every other process, and the next start, finds it without its
  ``CKA_ID``. (A process listing objects in a loop while another created AES keys: 1 lost of
  2,721 in 30 s; ``pkcs11-tool --login --list-objects`` in a loop: 1 of about 1,800, twice.)
- A writer releases its ``fcntl`` lock before ``fclose`` writes the buffered data, after
  truncating the file: a reader may find the file empty (an anchor, ``token.object`` while
  another process logs in).

So every hsmkms process holds this lock:

- shared while it creates or destroys objects, or reads an anchor
  (:meth:`TokenWriteLock.shared`);
- exclusively while it opens the token and logs in, reads attributes of objects found by
  anything but their ``CKA_ID`` (listings, the KEK by label), or changes an anchor
  (:meth:`TokenWriteLock.exclusive`, taken with the process's PKCS#11 lock held);
- exclusively while ``hsmkms backup`` copies the token's files, which must not hold a
  half-written object.

Tools outside hsmkms do not take it: list a live token's objects with ``pkcs11-tool`` only
while no hsmkms process creates keys.

``flock`` locks belong to an open file description, and two descriptors of one process
conflict like two processes. So one descriptor per lock file serves every thread of a process:
shared holders count on it, and an exclusive section converts it to exclusive and back. A
thread logging in while another thread of the same process waits, holding the lock shared, for
the process's PKCS#11 lock therefore does not wait for itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator

from hsmkms.keystore.errors import TokenConfigError


class TokenWriteLock:
    """One lock file, as this process holds it (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self._path = path
        # Guards the descriptor and the count; held through an exclusive section, so no thread
        # of this process takes or drops the shared lock meanwhile.
        self._guard = threading.Lock()
        self._fd: int | None = None
        self._shared = 0
        # The thread in the exclusive section: a section it enters inside that one is free.
        self._owner: int | None = None

    def _open(self) -> int:
        try:
            return os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            # For SoftHSM2 the file is in the token directory (hsmkms.config.token_write_lock):
            # a configuration naming a directory that is not there ends here, before the module.
            raise TokenConfigError(
                f"cannot open the token write lock {self._path}: {exc.strerror} (is "
                f"{os.path.dirname(self._path) or '.'} the token directory, there and writable?)"
            ) from None

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared: other processes' shared holders go on, an exclusive holder
        (a login, a backup's copy) is waited for. Inside this thread's exclusive section,
        the section covers it."""
        if self._owner == threading.get_ident():
            yield
            return
        with self._guard:
            if self._shared == 0:
                fd = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._shared += 1
        try:
            yield
        finally:
            with self._guard:
                self._shared -= 1
                if self._shared == 0 and self._fd is not None:
                    os.close(self._fd)  # releases the lock
                    self._fd = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock exclusively: waits for every other process's holders, shared or not.
        Threads of this process holding it shared keep their count and get it back shared.
        The thread holding it may enter it again."""
        if self._owner == threading.get_ident():
            yield
            return
        with self._guard:
            fd = self._fd if self._fd is not None else self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # from shared, a conversion
                self._owner = threading.get_ident()
                try:
                    yield
                finally:
                    self._owner = None
                    if self._shared:
                        fcntl.flock(fd, fcntl.LOCK_SH)
            finally:
                if fd != self._fd:
                    os.close(fd)  # releases the lock


_REGISTRY_GUARD = threading.Lock()
_LOCKS: dict[str, TokenWriteLock] = {}


def token_write_lock(path: str | os.PathLike[str]) -> TokenWriteLock:
    """This process's :class:`TokenWriteLock` of the lock file at ``path``."""
    key = os.path.realpath(path)
    with _REGISTRY_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = TokenWriteLock(key)
        return lock


def _forget_after_fork() -> None:
    # A forked child starts with no lock held of its own (an inherited descriptor shares the
    # parent's lock, which the child must not release or convert).
    global _REGISTRY_GUARD
    _REGISTRY_GUARD = threading.Lock()
    _LOCKS.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
