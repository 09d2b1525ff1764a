"""``hsmkms purge``: delete keys whose deletion window has ended, now (the server also does this
periodically). Destroys every token object of every version, then the rows; an interrupted purge
finishes on the next run. Each purged key is a ``DeleteKey`` service event in the audit trail."""

from __future__ import annotations

import argparse
import json

from hsmkms.config import Settings
from hsmkms.errors import KMSInternalException
from hsmkms.system import System, require_data_directory


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "purge",
        help="delete keys whose deletion window has ended",
        description="Destroy the token objects and rows of every key whose scheduled deletion "
        "date has passed. Safe to run at any time and to re-run after an interruption.",
    )
    add_data_dir(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # One DeleteKey service event per purged key goes to the audit trail as it happens, the
    # way the server's periodic purge records them.
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit="direct", prepare=False) as system:
        purged = system.service.purge_due()
        lost = system.lost_service_events
    if args.json:
        print(json.dumps({"Deleted": list(purged), "LostAuditRecords": lost}, sort_keys=True))
    else:
        for key_id in purged:
            print(f"deleted {key_id}")
        print(f"{len(purged)} key(s) deleted")
    if lost:
        raise KMSInternalException(
            f"{lost} DeleteKey record(s) could not be written to the audit trail (see the log)"
        )
    return 0
