"""``hsmkms serve``: the AWS KMS-compatible HTTP API on the configured token."""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
from pathlib import Path

from hsmkms.api.server import DEFAULT_HOST, DEFAULT_PORT, ServeOptions, default_workers


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "serve",
        help="serve the AWS KMS-compatible API",
        description="Initialize the data directory when needed (embedded SoftHSM2 token, "
        "database, root credentials), then serve the AWS KMS JSON API with SigV4 "
        "authentication, /healthz and /metrics. Stops gracefully on SIGTERM or SIGINT.",
    )
    add_data_dir(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port, 0 for any free one (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: one per CPU)",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM)")
    parser.add_argument(
        "--task-interval",
        type=float,
        default=60.0,
        help="seconds between runs of due rotations and deletions; 0 disables (default 60)",
    )
    parser.add_argument(
        "--console",
        action="store_true",
        help="also serve the read-only web console at /console/ (off by default)",
    )
    parser.add_argument(
        "--seed",
        type=Path,
        default=None,
        metavar="FILE",
        help="apply this seed file at start: keys, aliases, credentials (default $HSMKMS_SEED; "
        "docs/seed-file.md)",
    )
    parser.add_argument(
        "--ephemeral",
        action="store_true",
        help="use a new temporary data directory, removed at exit (not with --data-dir)",
    )
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="warning",
        help="log level of the server and its workers (default warning)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hsmkms.config import ConfigError

    if not args.ephemeral:
        return _serve(args, args.data_dir)
    if args.data_dir is not None:
        raise ConfigError("--ephemeral makes its own data directory: do not give --data-dir")
    data_dir = Path(tempfile.mkdtemp(prefix="hsmkms-ephemeral-"))
    print(f"hsmkms: ephemeral data directory {data_dir} (removed at exit)", flush=True)
    # A SIGTERM before the server takes the signals over (while seeding) must still clean up.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return _serve(args, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace, data_dir: Path | None) -> int:
    from hsmkms.api.server import serve
    from hsmkms.cli.seed import apply_seed_file, seed_path_from_env
    from hsmkms.config import Settings

    settings = Settings.load(data_dir)
    seed = args.seed if args.seed is not None else seed_path_from_env()
    if seed is not None:
        apply_seed_file(settings, seed, lambda line: print(line, flush=True))
    options = ServeOptions(
        host=args.host,
        port=args.port,
        workers=args.workers if args.workers is not None else default_workers(),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        task_interval=args.task_interval,
        log_level=args.log_level,
        console=args.console,
    )
    return serve(settings, options)
