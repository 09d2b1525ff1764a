"""``hsmkms backup --out FILE`` and ``hsmkms restore FILE --data-dir D``
(:mod:`hsmkms.system.backup`; ``docs/operations.md``).

``backup`` works while the server runs and prints the manifest's SHA-256: keep that line
somewhere else, it is what proves later that a file is the one made here. ``restore`` refuses a
target that exists and is not empty, checks everything before the directory appears, then runs
what ``hsmkms doctor`` and ``hsmkms audit verify`` run on the result and exits 1 if either fails.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Any

from hsmkms.audit.trail import VerifyStatus
from hsmkms.cli.errors import UsageError
from hsmkms.config import Settings
from hsmkms.errors import KMSError
from hsmkms.system import open_audit_verifier
from hsmkms.system.backup import backup_data_directory, restore_data_directory

EXIT_OK = 0
EXIT_CHECK_FAILED = 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    backup = sub.add_parser(
        "backup",
        help="write a consistent, sealed backup of the data directory (the server may run)",
        description="Copy the token files (embedded SoftHSM2 default), the database and the "
        "audit trail into one file, consistently while the server runs, with a manifest of "
        "SHA-256 hashes MAC'd by a key in the token. The file holds every key and the PINs: "
        "keep it as you keep the token. With a hardware token the key material stays in the "
        "HSM (its vendor's backup). Prints the manifest's SHA-256: keep it elsewhere and give "
        "it to 'hsmkms restore --expect-digest'.",
    )
    add_data_dir(backup)
    backup.add_argument("--out", type=Path, required=True, metavar="FILE", help="the new file")
    backup.add_argument("--json", action="store_true", help="print one JSON object")
    backup.set_defaults(run=run_backup)

    restore = sub.add_parser(
        "restore",
        help="restore a backup into a new data directory and check it",
        description="Restore FILE into --data-dir, which must not exist or be empty: every "
        "file is checked against the manifest, the databases against SQLite's integrity check "
        "and the manifest's MAC in the token before the directory appears; then doctor and "
        "audit verify run on it. Exit 0 only when both pass.",
    )
    restore.add_argument("file", type=Path, metavar="FILE")
    add_data_dir(restore)
    restore.add_argument(
        "--expect-digest",
        metavar="SHA256",
        help="the manifest SHA-256 'hsmkms backup' printed; refuse any other backup",
    )
    restore.add_argument("--json", action="store_true", help="print one JSON object")
    restore.set_defaults(run=run_restore)


def run_backup(args: argparse.Namespace) -> int:
    settings = Settings.load(args.data_dir)
    result = backup_data_directory(settings, args.out)
    manifest = result.manifest
    token = manifest["token"]
    audit = manifest["auditTrail"]
    if args.json:
        print(
            json.dumps(
                {
                    "File": str(result.path),
                    "ManifestSha256": result.digest,
                    "Files": len(manifest["files"]),
                    "KeyMaterialIncluded": token["keyMaterialIncluded"],
                    "AuditRecords": audit["records"],
                    "AuditNewestSeal": audit["newestSeal"],
                    "Skipped": list(result.skipped),
                    "WritesPausedMs": round(result.paused * 1000, 1),
                },
                sort_keys=True,
            )
        )
        return EXIT_OK
    print(
        f"hsmkms: backup of {settings.data_dir} in {result.path}: {len(manifest['files'])} "
        f"files, audit trail of {audit['records']} records (newest seal "
        f"{audit['newestSeal'] or '-'})"
    )
    print(
        f"hsmkms: writes waited {result.paused * 1000:.0f} ms while the databases and the "
        "token were copied"
    )
    if token["keyMaterialIncluded"]:
        print(f"hsmkms: includes token {token['serial']} and its PINs: keep it as the token")
    else:
        print(
            f"hsmkms: key material NOT included: it stays in {token['manufacturer']} "
            f"{token['model']} serial {token['serial']}; back that up with its vendor's tools "
            "(docs/operations.md)"
        )
    for name in result.skipped:
        print(
            f"warning: token object file {name} was being created and is left out", file=sys.stderr
        )
    print(f"manifest SHA-256 {result.digest}")
    return EXIT_OK


def _checks(settings: Settings) -> dict[str, Any]:
    """What doctor and audit verify say about the restored data directory."""
    from hsmkms.cli.doctor import diagnose

    checks: dict[str, Any] = {}
    try:
        report = diagnose(settings)
        failing, missing = len(report["integrity"]), len(report["missing"])
        if failing or missing:
            checks["doctor"] = (
                f"fail: {failing} rows fail their integrity check, {missing} key versions "
                "miss their token material (hsmkms doctor says which)"
            )
        else:
            checks["doctor"] = "ok"
        checks["orphans"] = len(report["orphans"])
    except KMSError as exc:
        checks["doctor"] = f"fail: {exc.message}"
    try:
        with open_audit_verifier(settings) as trail:
            result = trail.verify()
        checks["audit"] = "ok" if result.status is VerifyStatus.OK else f"fail: {result.problem}"
        checks["auditRecords"] = result.records
    except KMSError as exc:
        checks["audit"] = f"fail: {exc.message}"
    return checks


def run_restore(args: argparse.Namespace) -> int:
    digest = args.expect_digest
    if digest is not None and (len(digest) != 64 or not all(c in string.hexdigits for c in digest)):
        raise UsageError("--expect-digest takes the 64 hex digits 'hsmkms backup' printed")
    settings = Settings.load(args.data_dir)
    result = restore_data_directory(args.file, settings, expect_digest=args.expect_digest)
    checks = _checks(settings)
    ok = checks["doctor"] == "ok" and checks["audit"] == "ok"
    manifest = result.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "DataDirectory": str(result.data_dir),
                    "ManifestSha256": result.digest,
                    "BackupCreatedAt": manifest.get("createdAt"),
                    "Doctor": checks["doctor"],
                    "AuditVerify": checks["audit"],
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"hsmkms: restored {args.file} (made {manifest.get('createdAt')} from "
            f"{manifest.get('source')}) into {result.data_dir}"
        )
        print(f"hsmkms: manifest SHA-256 {result.digest}: every file checked, MAC verified")
        print(f"doctor:       {checks['doctor']}")
        print(f"audit verify: {checks['audit']}")
    return EXIT_OK if ok else EXIT_CHECK_FAILED
