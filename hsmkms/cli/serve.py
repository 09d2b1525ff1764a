"""``hsmkms serve``: the AWS KMS-compatible HTTP API on the configured token.

Every option but ``--data-dir`` may also come from the environment (:class:`ServeSettings`:
``HSMKMS_HOST``, ``HSMKMS_PORT``, ``HSMKMS_WORKERS``, ``HSMKMS_TLS_CERT``, ``HSMKMS_TLS_KEY``,
``HSMKMS_TASK_INTERVAL``, ``HSMKMS_CONSOLE``), for containers and systemd units; an option
given on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
from pathlib import Path

from hsmkms.api.server import DEFAULT_HOST, DEFAULT_PORT, ServeOptions, default_workers
from hsmkms.cli.errors import UsageError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "serve",
        help="serve the AWS KMS-compatible API",
        description="Initialize the data directory when needed (embedded SoftHSM2 token, "
        "database, root credentials) and check it (module, token, PIN, a self-test, the "
        "databases), then serve the AWS KMS JSON API with SigV4 authentication, /healthz and "
        "/metrics; 'serving' is printed once every worker is ready. Stops gracefully on "
        "SIGTERM or SIGINT. Every option also reads HSMKMS_<OPTION> (HSMKMS_PORT, ...).",
    )
    add_data_dir(parser)
    parser.add_argument(
        "--host", default=None, help=f"address (default $HSMKMS_HOST, else {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port, 0 for any free one (default $HSMKMS_PORT, else {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default $HSMKMS_WORKERS, else one per CPU)",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="TLS certificate (PEM; $HSMKMS_TLS_CERT)"
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, help="TLS private key (PEM; $HSMKMS_TLS_KEY)"
    )
    parser.add_argument(
        "--task-interval",
        type=float,
        default=None,
        help="seconds between runs of due rotations and deletions; 0 disables "
        "(default $HSMKMS_TASK_INTERVAL, else 60)",
    )
    parser.add_argument(
        "--console",
        action="store_true",
        default=None,
        help="also serve the read-only web console at /console/ (off unless this or "
        "HSMKMS_CONSOLE=true)",
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
    from hsmkms.config import ServeSettings, Settings

    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError("--port must be from 0 to 65535")
    if (args.tls_cert is None) != (args.tls_key is None) and not (
        os.environ.get("HSMKMS_TLS_CERT") or os.environ.get("HSMKMS_TLS_KEY")
    ):
        raise UsageError("--tls-cert and --tls-key must be given together")
    env = ServeSettings.load()
    workers: int | None = args.workers if args.workers is not None else env.workers
    settings = Settings.load(data_dir)
    seed = args.seed if args.seed is not None else seed_path_from_env()
    if seed is not None:
        apply_seed_file(settings, seed, lambda line: print(line, flush=True))
    options = ServeOptions(
        host=args.host if args.host is not None else env.host,
        port=args.port if args.port is not None else env.port,
        workers=workers if workers is not None else default_workers(),
        tls_cert=args.tls_cert if args.tls_cert is not None else env.tls_cert,
        tls_key=args.tls_key if args.tls_key is not None else env.tls_key,
        task_interval=args.task_interval if args.task_interval is not None else env.task_interval,
        log_level=args.log_level,
        log_format=args.log_format,
        console=args.console if args.console is not None else env.console,
    )
    return serve(settings, options)
