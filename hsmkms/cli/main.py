"""``hsmkms``: the command line. Every command takes ``--data-dir`` (default
``$HSMKMS_DATA_DIR``, else ``./.hsmkms``) and fails with one line naming the problem, never a
traceback. Every command logs through the one set-up of :mod:`hsmkms.log` (JSON lines on
stderr, secrets redacted; warnings and errors, or ``serve --log-level``), and opens what it
works on through :mod:`hsmkms.system`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hsmkms.cli import audit, credentials, doctor, envelope, purge, report, seed, serve
from hsmkms.errors import KMSError
from hsmkms.log import configure_logging

# Each command module offers ``add_parser(subparsers) -> None``; the parser's ``run`` default
# is called with the parsed arguments and returns the exit code.
COMMANDS = (doctor, serve, purge, credentials, envelope, audit, report, seed)

EXIT_FAILURE = 1
EXIT_INTERNAL = 70


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsmkms",
        description="A key management service whose root keys live in a PKCS#11 token.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


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
    args = build_parser().parse_args(argv)
    # stdout may carry command output (a decrypted file, JSON): logs go to stderr.
    configure_logging(getattr(args, "log_level", None) or "WARNING")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KMSError as exc:
        print(f"hsmkms {args.command}: {exc.message or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        target = f" {exc.filename}" if exc.filename else ""
        print(f"hsmkms {args.command}: {exc.strerror or exc}{target}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a traceback
        print(f"hsmkms {args.command}: internal error ({type(exc).__name__})", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
