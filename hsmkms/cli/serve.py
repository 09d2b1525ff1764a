"""``hsmkms serve``: the AWS KMS-compatible HTTP API on the configured token."""

from __future__ import annotations

import argparse
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
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="warning",
        help="log level of the server and its workers (default warning)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hsmkms.api.server import serve
    from hsmkms.config import Settings

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
    return serve(Settings.load(args.data_dir), options)
