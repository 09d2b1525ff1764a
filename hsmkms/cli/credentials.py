"""``hsmkms credentials create|list|delete``: the access keys the API accepts.

Changes take effect at once in a running server (each request consults the store). A secret is
printed once, at creation, and never again.
"""

from __future__ import annotations

import argparse
import json
import logging

from hsmkms.config import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "credentials",
        help="create, list and delete API access keys",
        description="Manage the access keys (SigV4 credentials) of the KMS API. Secrets are "
        "stored sealed by a key in the token and shown only once, at creation.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="add a user principal with a new access key",
        description="Add arn:aws:iam::<account>:user/NAME with a new access key and print "
        "the key id and secret (once).",
    )
    add_data_dir(create)
    create.add_argument("--name", required=True, help="user name (1-64 of A-Za-z0-9+=,.@_-)")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(run=run_create)

    listing = actions.add_parser("list", help="list access keys (never secrets)")
    add_data_dir(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=run_list)

    remove = actions.add_parser("delete", help="delete an access key; it stops working at once")
    add_data_dir(remove)
    remove.add_argument("credential", metavar="ACCESS_KEY_ID_OR_NAME")
    remove.set_defaults(run=run_delete)


def _settings(args: argparse.Namespace) -> Settings:
    from hsmkms.api.bootstrap import configure_logging, initialize

    configure_logging(logging.WARNING)
    settings = Settings.load(args.data_dir)
    initialize(settings)
    return settings


def run_create(args: argparse.Namespace) -> int:
    from hsmkms.api.bootstrap import open_credentials

    settings = _settings(args)
    with open_credentials(settings) as (_, store):
        issued = store.create(args.name)
    if args.json:
        print(
            json.dumps(
                {
                    "AccessKeyId": issued.access_key_id,
                    "SecretAccessKey": issued.secret_access_key,
                    "Arn": issued.principal_arn,
                }
            )
        )
    else:
        print(f"Arn:             {issued.principal_arn}")
        print(f"AccessKeyId:     {issued.access_key_id}")
        print(f"SecretAccessKey: {issued.secret_access_key}")
        print("The secret is shown only now; store it safely.")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from hsmkms.api.bootstrap import open_credentials

    settings = _settings(args)
    with open_credentials(settings) as (_, store):
        entries = store.list()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "AccessKeyId": e.access_key_id,
                        "Name": e.name,
                        "Arn": e.principal_arn,
                        "CreatedAt": e.created_at,
                    }
                    for e in entries
                ]
            )
        )
        return 0
    for e in entries:
        print(f"{e.access_key_id:<24} {e.name:<24} {e.created_at:<26} {e.principal_arn}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from hsmkms.api.bootstrap import open_credentials

    settings = _settings(args)
    with open_credentials(settings) as (_, store):
        removed = store.delete(args.credential)
    print(f"deleted {removed.access_key_id} ({removed.principal_arn})")
    return 0
