"""``hsmkms xks credentials create|list|delete|trust``: the SigV4 credentials of the XKS proxy API
(hsmkms as an external key manager for AWS KMS; ``docs/key-stores.md``); ``hsmkms xks policy
put|get|delete``: a prefix's optional secondary authorization policy.

Each credential belongs to a URI path prefix: the proxy answers at ``/<prefix>/kms/xks/v1``
for the prefixes that hold a credential. A prefix holds at most two credentials, so that they
can be rotated: create the second, give it to KMS (UpdateCustomKeyStore), delete the first.
Secrets are sealed by a key in the token and printed once, at creation. Every change is
recorded in the audit trail (:class:`hsmkms.system.OperatorXksCredentials`) before it is
reported. Changes take effect at once in a running server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

from hsmkms.cli.credentials import PolicyFileError, read_policy_file
from hsmkms.cli.errors import UsageError
from hsmkms.config import Settings
from hsmkms.errors import NotFoundException
from hsmkms.identity.xks import PREFIX, uri_path
from hsmkms.policy.document import parse_policy
from hsmkms.system import OperatorXksCredentials, System, require_data_directory


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "xks",
        help="hsmkms as an XKS proxy: the credentials AWS KMS signs its requests with",
        description="hsmkms answers the XKS proxy API (AWS KMS external key stores) at "
        "/<prefix>/kms/xks/v1 for each prefix that holds a credential.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    credentials = groups.add_parser(
        "credentials",
        help="create, list and delete XKS proxy credentials",
        description="Manage the SigV4 credentials (service kms-xks-proxy) of the XKS proxy "
        "API. Secrets are stored sealed by a key in the token and shown only once.",
    )
    actions = credentials.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="add a credential for a URI path prefix",
        description="Add a credential for PREFIX and print its access key id, secret (once) "
        "and URI path /<prefix>/kms/xks/v1. A prefix holds at most two credentials (rotation).",
    )
    add_data_dir(create)
    create.add_argument(
        "--prefix", required=True, help="URI path prefix (1-128 of A-Za-z0-9/_-, no empty segment)"
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(run=run_create)

    listing = actions.add_parser("list", help="list XKS proxy credentials (never secrets)")
    add_data_dir(listing)
    listing.add_argument("--prefix", default=None, help="only those of this prefix")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=run_list)

    remove = actions.add_parser(
        "delete", help="delete an XKS proxy credential; it stops working at once"
    )
    add_data_dir(remove)
    remove.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
    remove.add_argument("--json", action="store_true", help="print one JSON object")
    remove.set_defaults(run=run_delete)

    trust = actions.add_parser(
        "trust",
        help="accept the XKS credentials now in the database after restoring an older copy",
        description="The token remembers the set of XKS credentials it last saw; after an "
        "older copy of the database was put back, none of them is accepted, so that a deleted "
        "credential cannot come back. Check them with 'hsmkms xks credentials list', then run "
        "this to make the set now in the database the one accepted. Recorded in the audit "
        "trail.",
    )
    add_data_dir(trust)
    trust.add_argument("--json", action="store_true", help="print one JSON object")
    trust.set_defaults(run=run_trust)

    policy = groups.add_parser(
        "policy",
        help="set, show and delete a prefix's secondary authorization policy",
        description="An optional policy per prefix, in a key policy's form, decided against "
        "each request's requestMetadata: kms:<kmsOperation> by awsPrincipalArn on kmsKeyArn "
        "(docs/key-stores.md). Without one, every authenticated request is served.",
    )
    policy_actions = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = policy_actions.add_parser(
        "put", help="set the policy of a prefix (replacing any); takes effect at once"
    )
    add_data_dir(put)
    put.add_argument("--prefix", required=True, help="URI path prefix")
    put.add_argument(
        "--policy-file", required=True, metavar="FILE", help="the policy (JSON; - for stdin)"
    )
    put.add_argument("--json", action="store_true", help="print one JSON object")
    put.set_defaults(run=run_policy_put)
    get = policy_actions.add_parser("get", help="print the policy of a prefix")
    add_data_dir(get)
    get.add_argument("--prefix", required=True, help="URI path prefix")
    get.add_argument("--json", action="store_true", help="print one JSON object")
    get.set_defaults(run=run_policy_get)
    drop = policy_actions.add_parser(
        "delete", help="remove the policy of a prefix: every authenticated request is served"
    )
    add_data_dir(drop)
    drop.add_argument("--prefix", required=True, help="URI path prefix")
    drop.add_argument("--json", action="store_true", help="print one JSON object")
    drop.set_defaults(run=run_policy_delete)


@contextlib.contextmanager
def _changes(args: argparse.Namespace, command: str) -> Iterator[OperatorXksCredentials]:
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit="direct", prepare=False) as system:
        yield OperatorXksCredentials(system, command=f"xks {command}")


def _check_prefix(prefix: str) -> None:
    if not PREFIX.fullmatch(prefix):
        raise UsageError(
            f"--prefix {prefix[:140]!r}: a prefix is 1-128 characters of letters, digits and "
            "/_- without a leading, trailing or double slash"
        )


def run_create(args: argparse.Namespace) -> int:
    _check_prefix(args.prefix)
    with _changes(args, "credentials create") as store:
        issued = store.create(args.prefix)
    if args.json:
        print(
            json.dumps(
                {
                    "AccessKeyId": issued.access_key_id,
                    "SecretAccessKey": issued.secret_access_key,
                    "UriPath": issued.uri_path,
                }
            )
        )
        return 0
    print(f"UriPath:         {issued.uri_path}")
    print(f"AccessKeyId:     {issued.access_key_id}")
    print(f"SecretAccessKey: {issued.secret_access_key}")
    print("The secret is shown only now; store it safely.")
    return 0


def run_list(args: argparse.Namespace) -> int:
    if args.prefix is not None:
        _check_prefix(args.prefix)
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit=None, prepare=False) as system:
        entries = system.xks_credentials.list(args.prefix)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "AccessKeyId": e.access_key_id,
                        "UriPath": e.uri_path,
                        "CreatedAt": e.created_at,
                    }
                    for e in entries
                ]
            )
        )
        return 0
    for e in entries:
        print(f"{e.access_key_id:<30} {e.created_at:<34} {e.uri_path}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with _changes(args, "credentials delete") as store:
        removed = store.delete(args.access_key_id)
    if args.json:
        print(json.dumps({"Deleted": removed.access_key_id, "UriPath": removed.uri_path}))
    else:
        print(f"deleted {removed.access_key_id} ({removed.uri_path})")
    return 0


def run_policy_put(args: argparse.Namespace) -> int:
    _check_prefix(args.prefix)
    try:
        text = read_policy_file(args.policy_file, parse=parse_policy)
    except PolicyFileError as exc:
        raise UsageError(str(exc)) from None
    with _changes(args, "policy put") as store:
        store.put_policy(args.prefix, text)
    if args.json:
        print(json.dumps({"UriPath": uri_path(args.prefix), "PolicySet": True}))
    else:
        print(f"policy set for {uri_path(args.prefix)}")
    return 0


def run_policy_get(args: argparse.Namespace) -> int:
    _check_prefix(args.prefix)
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit=None, prepare=False) as system:
        text = system.xks_credentials.policy(args.prefix)
    if text is None:
        raise NotFoundException(f"no policy for {uri_path(args.prefix)}")
    if args.json:
        print(json.dumps({"UriPath": uri_path(args.prefix), "Policy": text}))
    else:
        print(text)
    return 0


def run_policy_delete(args: argparse.Namespace) -> int:
    _check_prefix(args.prefix)
    with _changes(args, "policy delete") as store:
        removed = store.delete_policy(args.prefix)
    if not removed:
        raise NotFoundException(f"no policy for {uri_path(args.prefix)}")
    if args.json:
        print(json.dumps({"UriPath": uri_path(args.prefix), "PolicyDeleted": True}))
    else:
        print(f"policy removed from {uri_path(args.prefix)}")
    return 0


def run_trust(args: argparse.Namespace) -> int:
    with _changes(args, "credentials trust") as store:
        count = store.trust()
    if args.json:
        print(json.dumps({"AccessKeys": count}))
    else:
        print(f"the {count} XKS credentials now in the database are accepted")
    return 0
