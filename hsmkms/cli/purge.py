"""``hsmkms purge``: delete keys whose deletion window has ended, now (the server also does this
periodically). Destroys every token object of every version, then the rows; an interrupted purge
finishes on the next run."""

from __future__ import annotations

import argparse

from hsmkms.audit import AuditTrail
from hsmkms.config import Settings
from hsmkms.service import ServiceEvent
from hsmkms.service.local import open_service, service_event_sink


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
    settings = Settings.load(args.data_dir)
    events: list[ServiceEvent] = []
    service = open_service(settings, on_event=events.append)
    try:
        purged = service.purge_due()
        if events:  # one DeleteKey service event per purged key, as the server records them
            trail = AuditTrail(settings.audit_database_url, service.keystore)
            try:
                record = service_event_sink(
                    trail.append, region=settings.region, account_id=settings.account_id
                )
                for event in events:
                    record(event)
            finally:
                trail.close()
    finally:
        service.close()
    for key_id in purged:
        print(f"deleted {key_id}")
    print(f"{len(purged)} key(s) deleted")
    return 0
