"""``hsmkms clusters add|list|remove``: the tokens custom key stores of type AWS_CLOUDHSM may
be created on (``docs/key-stores.md``, "Custom key stores (AWS_CLOUDHSM)").

A cluster is a further PKCS#11 token named by a URI (module and token, never a PIN). Only the
operator registers one: an API caller can never make the server load a library. ``add`` opens
the token (without logging in) and prints the cluster id and the trust anchor
(``TrustAnchorCertificate``) CreateCustomKeyStore must be given. A running server sees a
change at once (it reads the table on every use). Every change is recorded in the audit trail
(:class:`hsmkms.system.OperatorClusters`) before it is reported.
"""

from __future__ import annotations

import argparse
import json

from hsmkms.cli.errors import UsageError
from hsmkms.config import ConfigError, Settings
from hsmkms.errors import AlreadyExistsException, CloudHsmClusterNotFoundException
from hsmkms.keystore.base import TokenIdentity
from hsmkms.keystore.errors import KeystoreError
from hsmkms.store.key_stores import CLUSTER_ID, ClusterInUse, trust_anchor_of
from hsmkms.system import OperatorClusters, System, cluster_identity, require_data_directory


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "clusters",
        help="the tokens AWS_CLOUDHSM custom key stores are created on",
        description="Register further PKCS#11 tokens as 'clusters' for custom key stores of "
        "type AWS_CLOUDHSM (CreateCustomKeyStore names one by its id and trust anchor).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="register a token as a cluster",
        description="Open the token PKCS11_URI names (without logging in) and register it as "
        "cluster CLUSTER_ID; print the cluster id and its trust anchor certificate.",
    )
    add_data_dir(add)
    add.add_argument(
        "--cluster-id",
        required=True,
        help="cluster-<11-16 characters of 2-7a-zA-Z>, as a CloudHSM cluster id",
    )
    add.add_argument(
        "--pkcs11-uri",
        required=True,
        help="RFC 7512 URI naming the module (module-path) and the token (token=LABEL); no PIN",
    )
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(run=run_add)

    listing = actions.add_parser("list", help="list the registered clusters")
    add_data_dir(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=run_list)

    remove = actions.add_parser(
        "remove", help="forget a cluster (refused while a custom key store uses it)"
    )
    add_data_dir(remove)
    remove.add_argument("cluster_id", metavar="CLUSTER_ID")
    remove.add_argument("--json", action="store_true", help="print one JSON object")
    remove.set_defaults(run=run_remove)


def _check_cluster_id(cluster_id: str) -> None:
    if not CLUSTER_ID.fullmatch(cluster_id):
        raise UsageError(
            f"{cluster_id[:40]!r} is not a cluster id: cluster- and 11-16 characters of "
            "2-7, a-z and A-Z"
        )


def _open(args: argparse.Namespace) -> System:
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    return System.open(settings, audit=None, prepare=False)


def run_add(args: argparse.Namespace) -> int:
    _check_cluster_id(args.cluster_id)
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    try:
        identity = cluster_identity(settings, args.pkcs11_uri)
    except ConfigError as exc:
        raise UsageError(f"--pkcs11-uri: {exc.message}") from None
    except KeystoreError as exc:
        raise UsageError(f"--pkcs11-uri: the token cannot be opened: {exc.message}") from None
    anchor = trust_anchor_of(identity)
    with System.open(settings, audit="direct", prepare=False) as system:
        if identity == TokenIdentity.of(system.keystore.info()):
            raise UsageError("--pkcs11-uri names the default token: name another token")
        try:
            record = OperatorClusters(system, command="clusters add").add(
                args.cluster_id, args.pkcs11_uri, anchor
            )
        except AlreadyExistsException as exc:
            raise UsageError(exc.message) from None
    if args.json:
        print(
            json.dumps(
                {
                    "CloudHsmClusterId": record.cluster_id,
                    "TrustAnchorCertificate": record.trust_anchor,
                    "TokenLabel": identity.label,
                    "TokenSerial": identity.serial,
                }
            )
        )
        return 0
    print(f"CloudHsmClusterId: {record.cluster_id}")
    print(f"Token:             {identity.label} (serial {identity.serial})")
    print("TrustAnchorCertificate:")
    print(record.trust_anchor)
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _open(args) as system:
        clusters = system.service.custom_key_stores.table.clusters()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "CloudHsmClusterId": c.cluster_id,
                        "Pkcs11Uri": c.pkcs11_uri,
                        "TrustAnchorCertificate": c.trust_anchor,
                        "CreatedAt": c.created_at.isoformat(),
                    }
                    for c in clusters
                ]
            )
        )
        return 0
    for c in clusters:
        print(f"{c.cluster_id:<24} {c.created_at.isoformat():<34} {c.pkcs11_uri}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    _check_cluster_id(args.cluster_id)
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit="direct", prepare=False) as system:
        try:
            removed = OperatorClusters(system, command="clusters remove").remove(args.cluster_id)
        except (ClusterInUse, CloudHsmClusterNotFoundException) as exc:
            raise UsageError(exc.message) from None
    if args.json:
        print(json.dumps({"Removed": removed.cluster_id}))
    else:
        print(f"removed {removed.cluster_id}")
    return 0
