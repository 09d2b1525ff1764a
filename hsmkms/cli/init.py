"""``hsmkms init``: create the data directory — the embedded SoftHSM2 token (on the embedded
default), the database, and the account's root credential. ``hsmkms serve`` does the same when
the directory is missing; every other command refuses a missing one (exit 2) instead of making
a new token wherever it happens to run.

Idempotent: on an initialized directory it checks it (opens the token, migrates the database)
and says that nothing was created.
"""

from __future__ import annotations

import argparse
import json

from hsmkms.config import Settings
from hsmkms.system import initialize


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "init",
        help="create the data directory (token, database, root credential)",
        description="Create the data directory: on the embedded default a SoftHSM2 token with "
        "random PINs in owner-only files; the database; the account's root credential "
        "(written to root-credentials.json, mode 0600, unless HSMKMS_ROOT_ACCESS_KEY_ID and "
        "HSMKMS_ROOT_SECRET_ACCESS_KEY define it). On an existing data directory it creates "
        "nothing and says so.",
    )
    add_data_dir(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load(args.data_dir)
    report = initialize(settings)
    root_file = str(report.root_credentials_file) if report.root_credentials_file else None
    if args.json:
        print(
            json.dumps(
                {
                    "DataDirectory": str(report.data_dir),
                    "Created": report.created,
                    "RootAccessKeyId": report.root_access_key_id,
                    "RootCredentialsFile": root_file,
                    "RootCreated": report.root_created,
                    "AccountId": settings.account_id,
                    "Region": settings.region,
                },
                sort_keys=True,
            )
        )
        return 0
    if report.created:
        print(f"hsmkms: created the data directory {report.data_dir}")
    else:
        print(f"hsmkms: {report.data_dir} is a data directory already; nothing created")
    print(f"hsmkms: account {settings.account_id}, region {settings.region}")
    if root_file is not None:
        new = "new " if report.root_created else ""
        print(f"hsmkms: {new}root credentials in {root_file}")
    else:
        print(
            f"hsmkms: root access key {report.root_access_key_id} (from HSMKMS_ROOT_ACCESS_KEY_ID)"
        )
    return 0
