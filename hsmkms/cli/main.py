"""``hsmkms``: the command line. Every command takes ``--data-dir`` (default
``$HSMKMS_DATA_DIR``, else ``./.hsmkms``) and fails with one line naming the problem, never a
traceback. Every command logs through the one set-up of :mod:`hsmkms.log` (JSON lines on
stderr, secrets redacted; warnings and errors, or ``serve --log-level``), and opens what it
works on through :mod:`hsmkms.system`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from hsmkms import __version__
from hsmkms.cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PIPE_CLOSED,
    EXIT_USAGE,
    UsageError,
    describe_os_error,
)
from hsmkms.errors import KMSError
from hsmkms.log import LOG_FORMATS, LOG_LEVELS, configure_logging

# Each command module offers ``add_parser(subparsers) -> None``; the parser's ``run`` default
# is called with the parsed arguments and returns the exit code. Modules are imported by
# name, and only the one of the command being run: importing them all (the service, the
# database layer, the server) would cost every command about half a second of start-up.
COMMANDS: dict[str, str] = {
    "init": "init", "doctor": "doctor", "serve": "serve", "purge": "purge",
    "credentials": "credentials", "encrypt-file": "envelope", "decrypt-file": "envelope",
    "rewrap": "envelope", "audit": "audit", "report": "report", "seed": "seed",
    "backup": "backup", "restore": "backup", "xks": "xks", "clusters": "clusters",
}  # fmt: skip


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"hsmkms.cli.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser: every command, or only ``command``'s module's (what
    :func:`main` builds to run a command: the same parser for that command, without importing
    the others)."""
    parser = argparse.ArgumentParser(
        prog="hsmkms",
        description="A key management service whose root keys live in a PKCS#11 token.",
    )
    parser.add_argument("--version", action="version", version=f"hsmkms {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for module in modules:
        _command_module(module).add_parser(sub)
    for leaf in _leaves(parser):
        add_log_options(leaf)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (has a ``run`` default), nested ones included."""
    found = [parser] if parser.get_default("run") is not None else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_leaves(child))
    return found


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``, which every command takes (defaults from
    ``HSMKMS_LOG_LEVEL`` and ``HSMKMS_LOG_FORMAT``)."""
    level = os.environ.get("HSMKMS_LOG_LEVEL", "").lower() or "warning"
    fmt = os.environ.get("HSMKMS_LOG_FORMAT", "").lower() or None
    group = parser.add_argument_group("logging (stderr)")
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=level,
        type=str.lower,
        help="the least severe level logged (default $HSMKMS_LOG_LEVEL, else warning); for "
        "serve, of the server and its workers",
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=fmt,
        type=str.lower,
        help="json lines, or console lines (default $HSMKMS_LOG_FORMAT, else console on a "
        "terminal and json otherwise)",
    )


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """The ``--data-dir`` option every command takes."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (default: $HSMKMS_DATA_DIR, else ./.hsmkms)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Start-up makes many long-lived objects (modules, classes, the parser) and no garbage:
    # the cyclic collector would only walk them again and again.
    gc.disable()
    try:
        parser = build_parser(argv[0] if argv else None)
        args = parser.parse_args(argv)
    finally:
        gc.enable()
    try:
        # stdout may carry command output (a decrypted file, JSON): logs go to stderr.
        configure_logging(args.log_level, fmt=args.log_format)
    except ValueError as exc:  # a bad HSMKMS_LOG_LEVEL / HSMKMS_LOG_FORMAT
        parser.error(str(exc))
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here at the latest
        return code
    except BrokenPipeError:
        return _pipe_closed()
    except KMSError as exc:
        if _is_usage_error(exc):
            print(f"hsmkms {args.command}: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        print(f"hsmkms {args.command}: {exc.message or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return _pipe_closed()
        print(f"hsmkms {args.command}: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, never a traceback
        print(f"hsmkms {args.command}: internal error ({type(exc).__name__})", file=sys.stderr)
        return EXIT_INTERNAL


def _is_usage_error(exc: KMSError) -> bool:
    """A usage error (exit 2): :class:`UsageError`, or no data directory where the command
    was pointed (which only a command that imported :mod:`hsmkms.system` can raise)."""
    if isinstance(exc, UsageError):
        return True
    datadir = sys.modules.get("hsmkms.system.datadir")
    return datadir is not None and isinstance(exc, datadir.NoDataDirectory)


def _pipe_closed() -> int:
    """stdout's reader went away (``hsmkms audit tail -n 1000 | head``): stop quietly. What is
    still buffered for stdout can never be written: point stdout at /dev/null so that the
    interpreter's own flush at exit does not report it again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    raise SystemExit(main())
