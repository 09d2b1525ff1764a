"""``hsmkms seed export|check|apply``: seed files (``docs/seed-file.md``).

``export`` writes a data directory's custom key stores, keys, aliases and credentials as a seed
file (never a secret); ``check FILE`` says what applying it would do, changing nothing;
``apply FILE`` applies it, as ``hsmkms serve --seed FILE`` does at every start
(:func:`apply_seed_file`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from hsmkms.config import Settings
from hsmkms.db import database_exists, database_location
from hsmkms.errors import ClientError
from hsmkms.seed import SeedReport, apply_seed, export_seed, load_seed, plan_seed
from hsmkms.system import System, initialize

SEED_ENV = "HSMKMS_SEED"
"""The seed file ``hsmkms serve`` applies when ``--seed`` is not given."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "seed",
        help="export, check or apply a seed file (key stores, keys, aliases, credentials)",
        description="Seed files declare the custom key stores, keys, aliases and credentials a "
        "data directory must hold (docs/seed-file.md). hsmkms serve --seed FILE (or "
        "HSMKMS_SEED) applies one at every start.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    export = actions.add_parser(
        "export",
        help="write the data directory's definitions as a seed file (never secrets)",
        description="Write the custom key stores, the keys (ids, aliases, description, spec, "
        "usage, policy, tags, rotation, state, key store) and credentials (name, access key "
        "id, identity policy) of the data directory as a seed file. Secrets are never "
        "exported. Keys pending deletion are left out.",
    )
    add_data_dir(export)
    export.add_argument(
        "--out", type=Path, default=None, help="write to this file (default: standard output)"
    )
    export.set_defaults(run=run_export)

    check = actions.add_parser(
        "check",
        help="check a seed file against the data directory; change nothing",
        description="Check FILE completely (schema, every request it implies, conflicts with "
        "what the data directory holds) and print what applying it would do. Changes nothing; "
        "a data directory that does not exist counts as empty.",
    )
    add_data_dir(check)
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=run_check)

    apply = actions.add_parser(
        "apply",
        help="apply a seed file to the data directory (as serve --seed does)",
        description="Check FILE completely, then create what the data directory lacks; what "
        "exists as declared is left alone, and a conflicting definition is an error naming the "
        "entry (then nothing is changed). Each key operation is recorded in the audit trail.",
    )
    add_data_dir(apply)
    apply.add_argument("file", type=Path, metavar="FILE")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    apply.set_defaults(run=run_apply)


def seed_path_from_env() -> Path | None:
    """``HSMKMS_SEED`` as a path (an empty value counts as unset)."""
    value = os.environ.get(SEED_ENV)
    return Path(value) if value else None


def apply_seed_file(
    settings: Settings, path: Path, say: Callable[[str], object] = print
) -> SeedReport:
    """Read and check the seed file first (a bad file touches nothing: when the data directory
    does not exist yet, the file is checked against an empty one before it is made),
    initialize the data directory, then apply the file; ``say`` gets one line per change and a
    summary."""
    document = load_seed(path)
    if not _existing(settings):
        plan_seed(document, None)
    initialize(settings)
    with System.open(settings, audit="direct", identity=True) as system:
        report = apply_seed(document, system)
    for line in report.applied:
        say(f"hsmkms: seed: {line}")
    say(f"hsmkms: {report.summary()}")
    return report


def _existing(settings: Settings) -> bool:
    return database_exists(settings.effective_database_url)


def run_export(args: argparse.Namespace) -> int:
    settings = Settings.load(args.data_dir)
    if not _existing(settings):
        location = database_location(settings.effective_database_url)
        raise ClientError(f"no data directory at {settings.data_dir} (no database {location})")
    with System.open(settings, audit=None, identity=True, prepare=False) as system:
        text = export_seed(system)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    tmp = args.out.with_name(args.out.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"hsmkms seed export: wrote {args.out}", file=sys.stderr)
    return 0


def run_check(args: argparse.Namespace) -> int:
    document = load_seed(args.file)
    settings = Settings.load(args.data_dir)
    if _existing(settings):
        with System.open(settings, audit=None, identity=True, prepare=False) as system:
            plan = plan_seed(document, system)
    else:
        plan = plan_seed(document, None)
    if args.json:
        print(json.dumps({"Valid": True, "Changes": list(plan.lines())}))
        return 0
    for line in plan.lines():
        print(line)
    print(f"seed {document.source}: valid; applying it makes {len(plan.steps)} change(s)")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    if not args.json:
        apply_seed_file(Settings.load(args.data_dir), args.file)
        return 0
    report = apply_seed_file(Settings.load(args.data_dir), args.file, say=lambda _: None)
    print(json.dumps({"Applied": list(report.applied), "Summary": report.summary()}))
    return 0
