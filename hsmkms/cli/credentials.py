"""``hsmkms credentials create|list|rotate|delete|set-policy|get-policy|trust``: the access keys
the API accepts, and the identity policies attached to them.

Changes take effect at once in a running server (each request consults the store). A secret is
printed once, at creation, and never again. Every change (create, rotate, delete, set-policy,
trust) is recorded in the audit trail (:class:`hsmkms.system.OperatorCredentials`) before it
is reported.

The token remembers the credential set it last saw: after an older copy of the database was put
back, no access key of it is accepted (an old backup must not bring deleted keys back) until
``trust`` vouches for the set now in the database (see docs/credentials.md).

Rotation without downtime, as with AWS IAM: ``rotate NAME`` gives the user a second access key
(at most two), the application moves to it, ``delete OLD_ACCESS_KEY_ID`` retires the first. The
same works for ``root``: the new root key also replaces ``root-credentials.json`` when the root
was generated there; a deleted root key is retired for good, so ``HSMKMS_ROOT_*`` still naming it
is ignored rather than bringing it back.

A policy file (``--policy-file F``, ``-`` for stdin) is read and checked before anything is
opened: a file that cannot be read, is not UTF-8 or is not a valid identity policy is one line
on stderr and exit code 2 (as for a usage error), and nothing is stored.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import sys
from collections.abc import Callable, Iterator

from hsmkms.cli.errors import UsageError
from hsmkms.config import Settings
from hsmkms.errors import LimitExceededException, MalformedPolicyDocumentException
from hsmkms.identity import ROOT_NAME, USER_NAME, CredentialStore, IssuedCredential
from hsmkms.policy import MAX_POLICY_BYTES, parse_identity_policy
from hsmkms.system import (
    ROOT_CREDENTIALS_FILE,
    OperatorCredentials,
    System,
    require_data_directory,
    write_root_file,
)

EXIT_BAD_POLICY = 2
"""A policy file that cannot be used (argparse's exit code for a usage error)."""
STDIN = "-"


class PolicyFileError(Exception):
    """A ``--policy-file`` that cannot be used; the message names the file and the problem."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "credentials",
        help="create, list and delete API access keys; set their identity policies",
        description="Manage the access keys (SigV4 credentials) of the KMS API and the identity "
        "policies attached to them. Secrets are stored sealed by a key in the token and shown "
        "only once, at creation.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="add a user principal with a new access key",
        description="Add arn:aws:iam::<account>:user/NAME with a new access key and print "
        "the key id and secret (once). Without --policy-file the user has no identity policy: "
        "it may do only what key policies allow it by name.",
    )
    add_data_dir(create)
    create.add_argument("--name", required=True, help="user name (1-64 of A-Za-z0-9+=,.@_-)")
    add_policy_file(create, "attach this identity policy (IAM JSON; - for stdin)")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(run=run_create)

    listing = actions.add_parser("list", help="list access keys (never secrets)")
    add_data_dir(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=run_list)

    rotate = actions.add_parser(
        "rotate",
        help="give a user (or root) a second access key, for rotation without downtime",
        description="Add a second access key to the user (or 'root') named, with the same "
        "principal and identity policy, and print it (once). The first key keeps working "
        "until 'hsmkms credentials delete OLD_ACCESS_KEY_ID': move the application to the new "
        "key in between. A user holds at most two keys, as in AWS IAM. For root, the new key "
        "also replaces root-credentials.json when the root was generated there.",
    )
    add_data_dir(rotate)
    rotate.add_argument("credential", metavar="NAME_OR_ACCESS_KEY_ID")
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    rotate.set_defaults(run=run_rotate)

    remove = actions.add_parser(
        "delete",
        help="delete an access key; it stops working at once",
        description="Delete an access key (by its id, or by its user's name when the user "
        "holds one key); it stops working at once. The account root's only key cannot be "
        "deleted: rotate it first. A deleted root key is retired for good.",
    )
    add_data_dir(remove)
    remove.add_argument("credential", metavar="ACCESS_KEY_ID_OR_NAME")
    remove.add_argument("--json", action="store_true", help="print one JSON object")
    remove.set_defaults(run=run_delete)

    set_policy = actions.add_parser(
        "set-policy",
        help="replace or remove a user's identity policy; effective at once",
        description="Attach the identity policy in --policy-file to a user credential "
        "(replacing any earlier one), or remove it with --clear. The account root is not "
        "governed by identity policies.",
    )
    add_data_dir(set_policy)
    set_policy.add_argument("credential", metavar="ACCESS_KEY_ID_OR_NAME")
    choice = set_policy.add_mutually_exclusive_group(required=True)
    add_policy_file(choice, "the identity policy (IAM JSON; - for stdin)")
    choice.add_argument("--clear", action="store_true", help="remove the identity policy")
    set_policy.add_argument("--json", action="store_true", help="print one JSON object")
    set_policy.set_defaults(run=run_set_policy)

    get_policy = actions.add_parser(
        "get-policy",
        help="print a user's identity policy",
        description="Print the identity policy of a credential exactly as stored. A "
        "credential without one prints nothing on stdout, a note on stderr, and exits 0.",
    )
    add_data_dir(get_policy)
    get_policy.add_argument("credential", metavar="ACCESS_KEY_ID_OR_NAME")
    get_policy.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: the credential and its policy (null when it has none)",
    )
    get_policy.set_defaults(run=run_get_policy)

    trust = actions.add_parser(
        "trust",
        help="accept the access keys now in the database after restoring an older copy",
        description="The token remembers the set of access keys it last saw; after an older "
        "copy of the database was put back (a restored backup), none of them is accepted, so "
        "that a deleted key cannot come back. Check the keys with 'hsmkms credentials list', "
        "then run this to make the set now in the database the one accepted. Recorded in the "
        "audit trail.",
    )
    add_data_dir(trust)
    trust.add_argument("--json", action="store_true", help="print one JSON object")
    trust.set_defaults(run=run_trust)


def add_policy_file(
    parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, help_text: str
) -> None:
    parser.add_argument("--policy-file", metavar="FILE", default=None, help=help_text)


def read_policy_file(path: str, parse: Callable[[str], object] = parse_identity_policy) -> str:
    """The identity policy (or with ``parse``, another kind) in ``path`` (``-``: stdin),
    exactly as written (less a UTF-8 byte order mark), checked with the same grammar and size
    limit as the store applies.

    Raises PolicyFileError naming the file and what is wrong with it.
    """
    shown = "<stdin>" if path == STDIN else repr(path)
    most = MAX_POLICY_BYTES + len(codecs.BOM_UTF8)
    try:
        if path == STDIN:
            data = sys.stdin.buffer.read(most + 1)
        else:
            with open(path, "rb") as file:
                data = file.read(most + 1)
    except OSError as exc:
        raise PolicyFileError(
            f"cannot read policy file {shown}: {exc.strerror or type(exc).__name__}"
        ) from None
    if len(data) > most:
        raise PolicyFileError(
            f"policy file {shown} is larger than the maximum of {MAX_POLICY_BYTES} bytes"
        )
    try:
        policy = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"policy file {shown} is not UTF-8 text (byte {exc.start})") from None
    try:
        parse(policy)
    except (MalformedPolicyDocumentException, LimitExceededException) as exc:
        raise PolicyFileError(f"policy file {shown}: {exc.message}") from None
    return policy


def _bad_policy(message: str) -> int:
    print(f"hsmkms credentials: {message}", file=sys.stderr)
    return EXIT_BAD_POLICY


@contextlib.contextmanager
def _credentials(args: argparse.Namespace) -> Iterator[CredentialStore]:
    """The credentials store of an existing data directory (``hsmkms init`` or ``hsmkms serve``
    made it, with the root identity); closed on exit."""
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit=None, identity=True, prepare=False) as system:
        yield system.credentials


@contextlib.contextmanager
def _changes(args: argparse.Namespace, command: str) -> Iterator[OperatorCredentials]:
    """The credentials store for changes, each recorded in the audit trail."""
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit="direct", identity=True, prepare=False) as system:
        yield OperatorCredentials(system, command=f"credentials {command}")


def run_create(args: argparse.Namespace) -> int:
    if not USER_NAME.fullmatch(args.name):
        raise UsageError(
            f"--name {args.name!r}: a user name is 1-64 characters of letters, digits and +=,.@_-"
        )
    try:
        policy = None if args.policy_file is None else read_policy_file(args.policy_file)
    except PolicyFileError as exc:
        return _bad_policy(str(exc))
    with _changes(args, "create") as store:
        try:
            issued = store.create(args.name, policy)
        except MalformedPolicyDocumentException as exc:  # pragma: no cover - checked above
            return _bad_policy(exc.message)
    _print_issued(issued, args.json)
    if not args.json:
        if policy is None:
            print("IdentityPolicy:  none (only what key policies or grants give it by name)")
        else:
            print("IdentityPolicy:  attached")
        print("The secret is shown only now; store it safely.")
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _credentials(args) as store:
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
                        "HasPolicy": e.has_policy,
                    }
                    for e in entries
                ]
            )
        )
        return 0
    for e in entries:
        # The root is not governed by identity policies: "-", not "none".
        policy = "-" if e.name == ROOT_NAME else "policy" if e.has_policy else "none"
        print(
            f"{e.access_key_id:<24} {e.name:<24} {e.created_at:<26} {policy:<7} {e.principal_arn}"
        )
    return 0


def _print_issued(issued: IssuedCredential, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "AccessKeyId": issued.access_key_id,
                    "SecretAccessKey": issued.secret_access_key,
                    "Arn": issued.principal_arn,
                }
            )
        )
        return
    print(f"Arn:             {issued.principal_arn}")
    print(f"AccessKeyId:     {issued.access_key_id}")
    print(f"SecretAccessKey: {issued.secret_access_key}")


def run_rotate(args: argparse.Namespace) -> int:
    settings = Settings.load(args.data_dir)
    with _changes(args, "rotate") as store:
        issued = store.rotate(args.credential)
        keys = [c.access_key_id for c in store.list() if c.name == issued.name]
    root_file = settings.data_dir / ROOT_CREDENTIALS_FILE
    wrote = issued.name == ROOT_NAME and root_file.exists()
    if wrote:
        write_root_file(root_file, issued, settings.region)
    _print_issued(issued, args.json)
    if not args.json:
        old = ", ".join(k for k in keys if k != issued.access_key_id)
        print(f"The secret is shown only now; store it safely. {old} keeps working until")
        print(f"'hsmkms credentials delete {old}': move to the new key first.")
        if wrote:
            print(f"{root_file} now holds the new root key.")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    settings = Settings.load(args.data_dir)
    with _changes(args, "delete") as store:
        removed = store.delete(args.credential)
    if args.json:
        print(json.dumps({"Deleted": removed.access_key_id, "Arn": removed.principal_arn}))
    else:
        print(f"deleted {removed.access_key_id} ({removed.principal_arn})")
    root_file = settings.data_dir / ROOT_CREDENTIALS_FILE
    if removed.name == ROOT_NAME and root_file.exists():
        try:
            named = json.loads(root_file.read_text()).get("AccessKeyId")
        except (OSError, ValueError):
            named = None
        if named == removed.access_key_id:
            root_file.unlink()
            print(f"removed {root_file}, which held that key", file=sys.stderr)
    return 0


def run_set_policy(args: argparse.Namespace) -> int:
    try:
        policy = None if args.clear else read_policy_file(args.policy_file)
    except PolicyFileError as exc:
        return _bad_policy(str(exc))
    with _changes(args, "set-policy") as store:
        try:
            info = store.set_policy(args.credential, policy)
        except MalformedPolicyDocumentException as exc:  # pragma: no cover - checked above
            return _bad_policy(exc.message)
    if args.json:
        print(json.dumps({"Arn": info.principal_arn, "HasPolicy": info.has_policy}))
        return 0
    done = "set on" if info.has_policy else "removed from"
    print(f"identity policy {done} {info.access_key_id} ({info.principal_arn})")
    return 0


def run_get_policy(args: argparse.Namespace) -> int:
    with _credentials(args) as store:
        info, policy = store.get_policy(args.credential)
    if args.json:
        document = None if policy is None else json.loads(policy)
        print(json.dumps({"Arn": info.principal_arn, "Name": info.name, "Policy": document}))
        return 0
    if policy is None:
        why = (
            "is the account root, not governed by identity policies"
            if info.name == ROOT_NAME
            else "has no identity policy"
        )
        print(
            f"hsmkms credentials: {info.access_key_id} ({info.principal_arn}) {why}",
            file=sys.stderr,
        )
        return 0
    sys.stdout.write(policy if policy.endswith("\n") else policy + "\n")
    return 0


def run_trust(args: argparse.Namespace) -> int:
    with _changes(args, "trust") as store:
        count = store.trust()
    if args.json:
        print(json.dumps({"AccessKeys": count}))
    else:
        print(f"the {count} access keys now in the database are accepted")
    return 0
