"""How the command line reports what went wrong: exit codes, and errno text as a sentence.

Exit codes, for every command (``docs/operations.md``; a command documents any of its own):

====  =================================================================================
0     done
1     the command ran and failed (a KMS error, a check that failed, a file it could not
      read or write)
2     a usage error: a bad option or argument, a missing data directory — nothing was done
3     ``audit verify``: the trail is stale
70    an internal error (a bug: one line, never a traceback)
130   interrupted (Ctrl-C)
141   stdout was closed early (``| head``): the command stops quietly, as ``yes | head`` does
====  =================================================================================
"""

from __future__ import annotations

import errno
import os

from hsmkms.errors import ClientError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PIPE_CLOSED",
    "EXIT_USAGE",
    "UsageError",
    "describe_os_error",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 128 + 13  # SIGPIPE


class UsageError(ClientError):
    """The command line itself is wrong (an option's value, a combination of options):
    exit code 2, like argparse's own usage errors."""


_SENTENCES = {
    errno.ENOENT: "{path} does not exist",
    errno.EACCES: "no permission to use {path}",
    errno.EPERM: "no permission to use {path}",
    errno.EISDIR: "{path} is a directory",
    errno.ENOTDIR: "a part of {path} is not a directory",
    errno.EEXIST: "{path} exists already",
    errno.ENOSPC: "no space left on the device holding {path}",
    errno.EDQUOT: "the disk quota is used up on the device holding {path}",
    errno.EROFS: "{path} is on a read-only file system",
    errno.ENAMETOOLONG: "the name {path} is too long",
    errno.ELOOP: "{path} is a loop of symbolic links",
    errno.EMFILE: "too many open files (opening {path})",
    errno.EIO: "input/output error on {path}",
    errno.ETXTBSY: "{path} is busy",
    errno.EXDEV: "{path} is on another file system",
}


def describe_os_error(exc: OSError) -> str:
    """An operating-system error as a sentence naming the path, e.g. ``in.bin does not
    exist`` rather than ``No such file or directory in.bin``."""
    path = exc.filename if exc.filename is not None else None
    if path is None:
        text = exc.strerror or type(exc).__name__
        return text[:1].lower() + text[1:]
    shown = os.fsdecode(path)
    if exc.filename2 is not None:
        shown = f"{shown} -> {os.fsdecode(exc.filename2)}"
    template = _SENTENCES.get(exc.errno or 0)
    if template is not None:
        return template.format(path=shown)
    text = (exc.strerror or type(exc).__name__).lower()
    return f"{shown}: {text}"
