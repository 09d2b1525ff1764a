"""``hsmkms doctor``: check the module, the token, login, the crypto path, the metadata's
integrity MACs and the token against the metadata (missing material, orphan objects), and say
what is wrong in one line when something is (exit 1). ``--remove-orphans`` destroys the token
objects that interrupted key creations left behind."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from hsmkms.config import ConfigError, Settings, pin_file_is_private
from hsmkms.errors import KMSInternalException
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.softhsm import conf_state
from hsmkms.system import System, require_data_directory

ORPHAN_GRACE = 15.0
"""Seconds between the two looks of ``--remove-orphans`` (longer than a row's longest wait)."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "doctor",
        help="check the PKCS#11 module, token, login and a self-test",
        description="Print the module, token, mechanisms and chosen profile; check login; run "
        "an encrypt/decrypt self-test with temporary session keys; probe which key specs the "
        "token can host and which wrapping algorithms of imported key material it unwraps (a "
        "real operation each); check the integrity MAC of "
        "every key, key version, grant, alias and tag row in the database; on the embedded "
        "default, that softhsm2.conf points at the data directory's own token directory.",
    )
    add_data_dir(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--remove-orphans",
        action="store_true",
        help="destroy token objects of key versions that no key refers to (left by a "
        "CreateKey or rotation interrupted half-way), after checking twice, "
        "--orphan-grace seconds apart. Not after restoring the database from an older copy: "
        "the objects of keys created since look the same, and are their only material",
    )
    parser.add_argument(
        "--orphan-grace",
        type=float,
        default=ORPHAN_GRACE,
        metavar="SECONDS",
        help=f"seconds between the two looks of --remove-orphans (default {ORPHAN_GRACE:g}: "
        "longer than a key creation waits for the database)",
    )
    parser.set_defaults(run=run)


def _conf_warnings(settings: Settings) -> list[str]:
    """What is wrong with where the embedded default's ``softhsm2.conf`` points: a config left
    naming the directory this one was copied or moved from is repointed when the system opens
    (a warning); one naming another directory while this one holds no token is an error."""
    state = conf_state(settings.data_dir)
    if state is None or not state.outside:
        return []
    named = state.configured if state.configured is not None else "no token directory"
    if state.own_tokens:
        return [
            f"{state.conf} named {named}, outside its data directory (copied or moved from "
            f"there): now points at {state.expected}"
        ]
    raise ConfigError(
        f"{state.conf} points at {named}, outside its data directory {settings.data_dir}, "
        f"whose {state.expected.name}/ holds no token: point it at {state.expected}, or use "
        "that token through HSMKMS_PKCS11_URI and SOFTHSM2_CONF"
    )


def diagnose(
    settings: Settings, *, remove_orphans: bool = False, grace: float = ORPHAN_GRACE
) -> dict[str, Any]:
    """Everything doctor reports, as a dict. Raises a KMSError naming the first problem.
    ``remove_orphans``: destroy orphan objects first (those seen twice, ``grace`` seconds
    apart), reported as ``removed``."""
    report: dict[str, Any] = {"data_dir": str(settings.data_dir)}
    require_data_directory(settings)
    warnings: list[str] = []
    if settings.is_embedded:
        report["softhsm2_conf"] = str(settings.softhsm2_conf)
        report["user_pin_file"] = str(settings.user_pin_file)
        warnings.extend(_conf_warnings(settings))
    # Configuration errors come first, each with its own message. Doctor acts on no key:
    # nothing for the audit trail.
    with System.open(settings, audit=None, prepare=False) as system:
        info = system.keystore.info()  # opens the module, finds the token and logs in
        system.keystore.self_test()
        capabilities = system.keystore.capabilities()
        integrity = system.store.integrity_problems()
        # Comparing the token with rows that failed their check would trust them: skip it.
        removed = []
        if remove_orphans and not integrity:
            removed = system.service.remove_orphans(grace=grace)
        found = None if integrity else system.service.find_inconsistencies()
    report.update(
        module=info.module,
        library=info.library_description,
        manufacturer=info.manufacturer,
        model=info.model,
        token_label=info.label,
        token_serial=info.serial,
        profile=info.profile.value,
        mechanisms=list(info.mechanisms),
        login="ok",
        self_test="ok",
        capabilities={
            "specs": {
                spec.value: sorted(u.value for u in capabilities.usages[spec])
                for spec in KeyMaterialSpec if spec in capabilities.usages
            },
            "profiles": [p.value for p in capabilities.profiles],
            "unverified": sorted(s.value for s in capabilities.unverified),
            "wrapping_algorithms": sorted(a.value for a in capabilities.wrapping_algorithms),
            "unsupported_algorithms": sorted(
                a.value for a in capabilities.unsupported_algorithms
            ),
        },
        integrity=[dataclasses.asdict(p) for p in integrity],
        orphans=[] if found is None else [
            {"object_id": o.object_id, "label": o.label} for o in found.orphans
        ],
        missing=[] if found is None else [
            {"key_id": key_id, "version": version} for key_id, version in found.missing
        ],
        removed=[{"object_id": o.object_id, "label": o.label} for o in removed],
    )  # fmt: skip
    pin_file = settings.user_pin_file if settings.is_embedded else settings.pin_file
    if pin_file is not None and not pin_file_is_private(pin_file):
        warnings.append(f"PIN file {pin_file} is readable by group or others")
    report["warnings"] = warnings
    return report


def run(args: argparse.Namespace) -> int:
    report = diagnose(
        Settings.load(args.data_dir),
        remove_orphans=args.remove_orphans,
        grace=max(0.0, args.orphan_grace),
    )
    missing = report["missing"]
    integrity = report["integrity"]
    orphans = report["orphans"]
    if args.json:
        print(json.dumps(report, sort_keys=True))
        _raise_for(missing, integrity, orphans)
        return 0
    width = 16
    for key in ("data_dir", "softhsm2_conf", "user_pin_file", "module", "library",
                "manufacturer", "model", "token_label", "token_serial", "profile", "login",
                "self_test"):  # fmt: skip
        if key in report:
            print(f"{key + ':':<{width}} {report[key]}")
    print(f"{'capabilities:':<{width}} {_capabilities_line(report['capabilities'])}")
    wrapping = report["capabilities"]["wrapping_algorithms"]
    print(f"{'key import:':<{width}} {', '.join(wrapping) or 'none'} (unwrapped in the token)")
    print(
        f"{'mechanisms:':<{width}} {len(report['mechanisms'])} ({', '.join(report['mechanisms'])})"
    )
    print(f"{'integrity:':<{width}} {'ok' if not integrity else f'{len(integrity)} bad rows'}")
    for problem in integrity:
        print(f"  {problem['table']} row of key {problem['key_id']}: {problem['detail']}")
    if integrity:
        print(f"{'orphans:':<{width}} not checked (rows failed their integrity check)")
    else:
        print(f"{'orphans:':<{width}} {len(report['orphans'])}")
    for orphan in report["orphans"]:
        print(f"  token object {orphan['object_id']} ({orphan['label']}) belongs to no key")
    for gone in report["removed"]:
        print(f"  removed token object {gone['object_id']} ({gone['label']})")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _raise_for(missing, integrity, orphans)
    return 0


def _capabilities_line(capabilities: dict[str, Any]) -> str:
    """The specs the token hosts; symmetric material with its profiles, a spec with several
    usages with them (``ECC_NIST_P256 (KEY_AGREEMENT, SIGN_VERIFY)``)."""
    parts = []
    for spec, usages in capabilities["specs"].items():
        if KeyMaterialSpec(spec).facts.takes_profile:
            parts.append(f"{spec} ({', '.join(capabilities['profiles'])})")
        elif len(usages) > 1:
            parts.append(f"{spec} ({', '.join(usages)})")
        else:
            parts.append(spec)
    line = ", ".join(parts) or "none"
    if capabilities["unverified"]:
        line += f"; listed, not probed: {', '.join(capabilities['unverified'])}"
    if capabilities["unsupported_algorithms"]:
        line += f"; not performed: {', '.join(capabilities['unsupported_algorithms'])}"
    return line


def _raise_for(
    missing: list[dict[str, Any]], integrity: list[dict[str, Any]], orphans: list[dict[str, Any]]
) -> None:
    if integrity:
        raise KMSInternalException(_integrity_message(integrity))
    if missing:
        raise KMSInternalException(_missing_message(missing))
    if orphans:
        raise KMSInternalException(_orphan_message(orphans))


def _orphan_message(orphans: list[dict[str, Any]]) -> str:
    first = orphans[0]
    more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
    return (
        f"token object {first['object_id']} ({first['label']}) belongs to no key{more}: left "
        "by a key creation interrupted half-way; remove with hsmkms doctor --remove-orphans "
        "(unless the database was restored from an older copy)"
    )


def _integrity_message(integrity: list[dict[str, Any]]) -> str:
    keys = sorted({p["key_id"] for p in integrity})
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return (
        f"key {keys[0]}{more}: metadata changed outside hsmkms ({len(integrity)} rows failed "
        "their integrity check); the keys are refused until the rows are restored"
    )


def _missing_message(missing: list[dict[str, Any]]) -> str:
    first = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return (
        f"key {first['key_id']} version {first['version']}: token object missing{more}; "
        "its ciphertexts cannot be decrypted"
    )
