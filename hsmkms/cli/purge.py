"""``hsmkms purge``: delete keys whose deletion window has ended, now (the server also does this
periodically). Destroys every token object of every version, then the rows; an interrupted purge
finishes on the next run."""

from __future__ import annotations

import argparse

from hsmkms.config import Settings
from hsmkms.service.local import open_service


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "purge",
        help="delete keys whose deletion window has ended",
        description="Destroy the token objects and rows of every key whose scheduled deletion "
        "date has passed. Safe to run at any time and to re-run after an interruption.",
    )
    add_data_dir(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    service = open_service(Settings.load(args.data_dir))
    try:
        purged = service.purge_due()
    finally:
        service.close()
    for key_id in purged:
        print(f"deleted {key_id}")
    print(f"{len(purged)} key(s) deleted")
    return 0
