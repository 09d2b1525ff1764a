"""``hsmkms``: the command line. Every command takes ``--data-dir`` (default
``$HSMKMS_DATA_DIR``, else ``./.hsmkms``) and fails with one line naming the problem, never a
traceback. Every command logs through the one set-up of :mod:`hsmkms.log` (JSON lines on
stderr, secrets redacted; warnings and errors, or ``serve --log-level``), and opens what it
works on through :mod:`hsmkms.system`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hsmkms import __version__
from hsmkms.cli import (
    audit,
    backup,
    clusters,
    credentials,
    doctor,
    envelope,
    init,
    purge,
    report,
    seed,
    serve,
    xks,
)
from hsmkms.cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PIPE_CLOSED,
    EXIT_USAGE,
    UsageError,
    describe_os_error,
)
from hsmkms.config import LOG_FORMATS, LOG_LEVELS
from hsmkms.errors import KMSError
from hsmkms.log import configure_logging
from hsmkms.system.datadir import NoDataDirectory

# Each command module offers ``add_parser(subparsers) -> None``; the parser's ``run`` default
# is called with the parsed arguments and returns the exit code.
COMMANDS = (
    init, doctor, serve, purge, credentials, envelope, audit, report, seed, backup, xks, clusters,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsmkms",
        description="A key management service whose root keys live in a PKCS#11 token.",
    )
    parser.add_argument("--version", action="version", version=f"hsmkms {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except (NoDataDirectory, UsageError) as exc:
        print(f"hsmkms {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except KMSError as exc:
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
