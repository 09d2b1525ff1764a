"""``hsmkms report``: the signed key-custody report, its verification, and its signing key.

``hsmkms report`` writes the report (HTML by default; JSON and Markdown too) to a file or to
stdout, signed inside the token; ``hsmkms report verify FILE`` exits 0 when the file is exactly
as signed by a report key of the token (or by ``--public-key``), 1 otherwise;
``hsmkms report key`` prints the signing key's fingerprint and public key (PEM), which an auditor
keeps to verify reports without the token. See ``docs/report.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from hsmkms.cli.errors import UsageError
from hsmkms.config import Settings, pin_file_is_private
from hsmkms.db import database_location
from hsmkms.errors import ClientError
from hsmkms.report import (
    Deployment,
    InvalidReportSignature,
    ReportFormat,
    UnsignedDocument,
    build_report,
    find_signing_keys,
    render,
    signing_key,
    verify_document,
)
from hsmkms.report.signing import public_key_pem
from hsmkms.system import System, require_data_directory

EXIT_OK = 0
EXIT_INVALID = 1
_SUFFIXES = {
    ".json": ReportFormat.JSON,
    ".html": ReportFormat.HTML,
    ".htm": ReportFormat.HTML,
    ".md": ReportFormat.MARKDOWN,
}
_MAX_FILE = 256 * 1024 * 1024


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "report",
        help="write the signed key-custody report; verify one",
        description="Write a key-custody report: the token(s) and key stores, the audit "
        "trail's verification, integrity findings, and per key its versions with the token "
        "attributes read now, rotation, who may use and administer it, and when it was last "
        "used; deleted keys in the period. Signed inside the token. 'hsmkms report verify "
        "FILE' checks a report.",
    )
    add_data_dir(parser)
    parser.add_argument(
        "--format",
        choices=ReportFormat.ALL,
        default=None,
        help="html (default, or from --out's suffix), json or md",
    )
    parser.add_argument(
        "--json", action="store_true", help="the report in JSON (the same as --format json)"
    )
    parser.add_argument("--out", type=Path, default=None, help="file to write (default stdout)")
    parser.add_argument(
        "--key-id",
        action="append",
        default=None,
        metavar="K",
        help="only this key (key id, key ARN or alias name); repeatable",
    )
    parser.add_argument(
        "--since",
        type=_when,
        default=None,
        help="deleted keys from this ISO-8601 time (default: the whole trail)",
    )
    parser.add_argument(
        "--until",
        type=_when,
        default=None,
        help="deleted keys until this ISO-8601 time (default: now)",
    )
    parser.set_defaults(run=run_report)
    actions = parser.add_subparsers(dest="report_command", metavar="ACTION")

    verify = actions.add_parser(
        "verify",
        help="check a report file's signature; exit 1 on any edit",
        description="Check that FILE (any format) is exactly as it was signed, by a report "
        "signing key of the token of --data-dir, or by --public-key without the token. Exit 0: "
        "intact; 1: edited, not signed, or signed by another key.",
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    add_data_dir(verify)
    verify.add_argument(
        "--public-key",
        type=Path,
        default=None,
        metavar="PEM",
        help="trust this public key (from 'hsmkms report key') instead of asking the token",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(run=run_verify)

    key = actions.add_parser(
        "key",
        help="print the report signing key (fingerprint and PEM), making it on first use",
    )
    add_data_dir(key)
    key.add_argument(
        "--json", action="store_true", help="print one JSON object (fingerprint, PEM, token)"
    )
    key.set_defaults(run=run_key)


def _when(value: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _deployment(settings: Settings) -> Deployment:
    warnings = []
    pin_file = settings.user_pin_file if settings.is_embedded else settings.pin_file
    if pin_file is not None and not pin_file_is_private(pin_file):
        warnings.append(f"PIN file {pin_file} is readable by group or others")
    return Deployment(
        data_dir=str(settings.data_dir),
        database=database_location(settings.effective_database_url),
        audit_database=database_location(settings.audit_database_url),
        warnings=tuple(warnings),
    )


def run_report(args: argparse.Namespace) -> int:
    fmt = args.format
    if args.json:
        if fmt not in (None, ReportFormat.JSON):
            raise UsageError(f"--json and --format {fmt} ask for two formats")
        fmt = ReportFormat.JSON
    if fmt is None:
        fmt = (
            _SUFFIXES.get(args.out.suffix.lower(), ReportFormat.HTML)
            if args.out
            else ReportFormat.HTML
        )
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit=None, identity=True, prepare=False) as system:
        report = build_report(
            system,
            deployment=_deployment(settings),
            key_ids=args.key_id,
            since=args.since,
            until=args.until,
        )
        keystore = system.keystore
        key = signing_key(keystore)
        assert key is not None
        data = render(report, fmt, keystore=keystore, key=key, token_serial=keystore.info().serial)
    if args.out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        args.out.write_bytes(data)
        summary = report["summary"]
        print(
            f"hsmkms report: {args.out} ({fmt}): {summary['keys']} keys, signed by "
            f"{key.fingerprint}",
            file=sys.stderr,
        )
    return EXIT_OK


def _read(path: Path) -> bytes:
    if path.stat().st_size > _MAX_FILE:
        raise ClientError(f"{path} is larger than any report ({_MAX_FILE} bytes)")
    return path.read_bytes()


def _invalid(args: argparse.Namespace, problem: str) -> int:
    if args.json:
        print(json.dumps({"File": str(args.file), "Intact": False, "Problem": problem}))
    print(f"hsmkms report verify: {args.file}: {problem}", file=sys.stderr)
    return EXIT_INVALID


def run_verify(args: argparse.Namespace) -> int:
    data = _read(args.file)
    try:
        found = verify_document(data)
    except InvalidReportSignature as exc:
        return _invalid(args, f"{exc} (edited after signing)")
    except UnsignedDocument as exc:
        return _invalid(args, f"not a signed report: {exc}")
    if args.public_key is not None:
        try:
            pinned = serialization.load_pem_public_key(_read(args.public_key))
        except (ValueError, UnsupportedAlgorithm):
            raise ClientError(f"{args.public_key} is not a PEM public key") from None
        trusted = [
            pinned.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ]
        source = f"the key in {args.public_key}"
    else:
        settings = Settings.load(args.data_dir)
        require_data_directory(settings)
        with System.open(settings, audit=None, prepare=False) as system:
            trusted = [k.public_key for k in find_signing_keys(system.keystore)]
            source = f"a report signing key of token {system.keystore.info().serial}"
    if not found.trusted(trusted):
        return _invalid(
            args, f"the signature is valid but made by {found.fingerprint}, which is not {source}"
        )
    if args.json:
        report = found.report or {}
        print(
            json.dumps(
                {
                    "File": str(args.file),
                    "Intact": True,
                    "Format": found.format,
                    "SignedBy": found.fingerprint,
                    "TrustedAs": source,
                    "ReportId": report.get("reportId"),
                    "GeneratedAt": report.get("generatedAt"),
                }
            )
        )
        return EXIT_OK
    detail = ""
    if found.report is not None:
        detail = f", report {found.report.get('reportId')} of {found.report.get('generatedAt')}"
    print(
        f"report intact: {args.file} ({found.format}) signed by {found.fingerprint}, "
        f"{source}{detail}"
    )
    return EXIT_OK


def run_key(args: argparse.Namespace) -> int:
    settings = Settings.load(args.data_dir)
    require_data_directory(settings)
    with System.open(settings, audit=None, prepare=False) as system:
        key = signing_key(system.keystore)
        assert key is not None
        serial = system.keystore.info().serial
    if args.json:
        print(
            json.dumps(
                {
                    "Fingerprint": key.fingerprint,
                    "KeySpec": "ECC_NIST_P256",
                    "TokenSerial": serial,
                    "Label": "hsmkms:report",
                    "PublicKeyPem": public_key_pem(key.public_key),
                }
            )
        )
        return EXIT_OK
    print(
        f"report signing key {key.fingerprint} (ECC_NIST_P256, token {serial}, label "
        "hsmkms:report)",
        file=sys.stderr,
    )
    sys.stdout.write(public_key_pem(key.public_key))
    return EXIT_OK
