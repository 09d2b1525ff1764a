"""``hsmkms audit``: verify the audit trail against the token, show its tail, search it.

``verify`` exits 0 when the trail is intact, 1 when it finds tampering (naming the first bad
record; a tail cut back past the seal the token's anchor names is tampering) or no trail, 3
when the trail is intact as far as it goes but its end is not proven: a writer stopped without
a clean shutdown (a crash, a kill), a seal's write was interrupted, the newest seal is overdue,
or the token holds no anchor. ``resume`` lets writers go on after a cut, recording it for
ever. ``tail`` and ``search`` print one JSON record per line (``--json``: one JSON array) and
need no token; ``tail -f`` follows the trail as it grows. ``search`` takes a key by id, ARN or
alias (resolved, with the token, to the key the alias names now) and a principal by ARN, access
key id or user name (``root`` for the account root); when nothing matches it says which filter
matched nothing and exits 1, as ``grep`` does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from typing import Any

from hsmkms.audit.records import canonical_json
from hsmkms.audit.trail import AuditTrail, VerifyResult, VerifyStatus
from hsmkms.cli.errors import UsageError
from hsmkms.config import Settings
from hsmkms.errors import ClientError
from hsmkms.service.operations import ALL_OPERATIONS
from hsmkms.system import (
    System,
    open_audit_reader,
    open_audit_resumer,
    open_audit_verifier,
    require_data_directory,
)

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_NO_MATCH = 1
EXIT_STALE = 3
FOLLOW_INTERVAL = 0.5

# Event names the trail holds besides the API operations' (to hint at a misspelt --event-name).
_OTHER_EVENTS = frozenset(
    {
        "RotateKey",
        "DeleteKey",
        "ConsoleLogin",
        "ConsoleLogout",
        "BackupDataDirectory",
        "RestoreDataDirectory",
        "UnknownOperation",
    }
)
# An access key id as AWS shapes them (AKIA... for users, ASIA... for sessions), or any other
# id an operator chose for the root (HSMKMS_ROOT_ACCESS_KEY_ID) of at least 16 characters.
_ACCESS_KEY_ID = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]+|[A-Z0-9_]{16,128}")
_KEY_ID = re.compile(r"[0-9a-fA-F-]{36}|mrk-[0-9a-fA-F]{32}")


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from hsmkms.cli.main import add_data_dir

    parser = sub.add_parser(
        "audit",
        help="verify, tail and search the tamper-evident audit trail",
        description="The audit trail holds one CloudTrail-shaped record per API call and "
        "service event, hash-chained and sealed by an HMAC key inside the token.",
    )
    actions = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    verify = actions.add_parser(
        "verify",
        help="check the trail against the token's audit key",
        description="Check every seal (inside the token), the hash chain of every record, that "
        "the trail ends at the seal the token's anchor names, and that every writer either "
        "shut down cleanly or is still sealing. Exit 0: intact; 1: tampering found (the first "
        "bad record is named) or no trail; 3: intact as far as it goes, but its end is not "
        "proven (a writer stopped without a clean shutdown, an interrupted seal, no anchor).",
    )
    add_data_dir(verify)
    verify.add_argument(
        "--expect-seal",
        type=_expected_seal,
        metavar="N:TAG",
        help="a seal (number:tag hex) printed by an earlier verify and kept outside the "
        "database; fail when the trail no longer holds it (rolled back)",
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (the same exit codes)",
    )
    verify.set_defaults(run=run_verify)

    resume = actions.add_parser(
        "resume",
        help="let writers go on after the trail's tail was cut",
        description="When 'hsmkms audit verify' reports that seals and records were removed "
        "from the tail (the token's anchor names a seal the trail no longer holds), writers "
        "refuse to seal it and the server answers 503. Restore the trail from a copy that "
        "holds the missing tail if you can; otherwise this writes a 'resume' seal recording "
        "the lost anchor — verify reports the cut for ever after — and lets writers go on.",
    )
    add_data_dir(resume)
    resume.add_argument("--json", action="store_true", help="print one JSON object")
    resume.set_defaults(run=run_resume)

    tail = actions.add_parser(
        "tail",
        help="print the newest records, one JSON per line; -f follows the trail",
        description="Print the newest N records, oldest first, one JSON object per line. "
        "With -f, go on printing records as they are appended (until interrupted).",
    )
    add_data_dir(tail)
    tail.add_argument("-n", type=_positive, default=10, metavar="N", help="how many (default 10)")
    tail.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help=f"then print new records as they come (checked every {FOLLOW_INTERVAL} s)",
    )
    tail.add_argument("--json", action="store_true", help="print one JSON array (not with -f)")
    tail.set_defaults(run=run_tail)

    search = actions.add_parser(
        "search",
        help="print matching records, oldest first, one JSON per line",
        description="Every filter given must match. When nothing matches, say which filter "
        "matched nothing and exit 1. Results are not proof of integrity: run "
        "'hsmkms audit verify' for that.",
    )
    add_data_dir(search)
    search.add_argument(
        "--key-id",
        help="a key id, key ARN, alias name or alias ARN the call used (an alias is resolved "
        "to the key it names now, which needs the token)",
    )
    search.add_argument(
        "--principal",
        help="the caller: an ARN, an access key id, or a user name of this account ('root' "
        "for the account root)",
    )
    search.add_argument("--event-name", help="the operation or event, e.g. Decrypt")
    search.add_argument("--since", type=_when, help="ISO-8601 time, inclusive (UTC if no zone)")
    search.add_argument("--until", type=_when, help="ISO-8601 time, inclusive (UTC if no zone)")
    search.add_argument("--limit", type=_positive, default=None, help="at most this many records")
    search.add_argument("--json", action="store_true", help="print one JSON array")
    search.set_defaults(run=run_search)


def _when(value: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _expected_seal(value: str) -> tuple[int, bytes]:
    number, _, tag = value.partition(":")
    try:
        parsed = (int(number), bytes.fromhex(tag))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N:TAG (tag in hex): {value!r}") from None
    if len(parsed[1]) != 32:
        raise argparse.ArgumentTypeError("the tag is 64 hex digits")
    return parsed


def _settings(args: argparse.Namespace, *, token: bool) -> Settings:
    settings = Settings.load(args.data_dir)
    require_data_directory(settings, token=token)
    return settings


def _verify_json(result: VerifyResult) -> dict[str, Any]:
    seal = result.newest_seal
    return {
        "Status": result.status.value,
        "Records": result.records,
        "Seals": result.seals,
        "SealedThrough": result.sealed_through,
        "Unsealed": result.unsealed,
        "NewestSeal": f"{seal.seal_seq}:{seal.tag.hex()}" if seal else None,
        "NewestSealAt": seal.sealed_at if seal else None,
        "FirstBadRecord": result.first_bad_seq,
        "Problem": result.problem,
        "Gaps": [
            {"AfterSeal": g.after_seal, "Seconds": round(g.seconds, 3), "Allowed": g.allowed}
            for g in result.gaps
        ],
    }


def run_verify(args: argparse.Namespace) -> int:
    with open_audit_verifier(_settings(args, token=True)) as trail:
        result = trail.verify(expect_seal=args.expect_seal)
    code = (
        EXIT_OK
        if result.status is VerifyStatus.OK
        else EXIT_STALE
        if result.status in (VerifyStatus.STALE, VerifyStatus.UNCLEAN)
        else EXIT_TAMPERED
    )
    if args.json:
        print(json.dumps(_verify_json(result), sort_keys=True))
        return code
    for gap in result.gaps:
        print(
            f"warning: no seal for {gap.seconds:.0f} s after seal {gap.after_seal} (at most "
            f"{gap.allowed:g} s expected): its writer stalled or stopped without a shutdown seal",
            file=sys.stderr,
        )
    for stop in result.unclean:
        if stop.noted_by is not None:
            print(
                f"warning: writer {stop.writer} stopped without a clean shutdown after seal "
                f"{stop.last_seal} ({stop.last_seal_at}), noted by seal {stop.noted_by}: calls "
                "it had not answered may be missing; every answered call was committed first",
                file=sys.stderr,
            )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.status is VerifyStatus.OK:
        seal = result.newest_seal
        newest = f"{seal.seal_seq}:{seal.tag.hex()} at {seal.sealed_at}" if seal else "-"
        print(
            f"audit trail intact: {result.records} records, {result.seals} seals, sealed "
            f"through record {result.sealed_through} ({result.unsealed} unsealed), newest "
            f"seal {newest}"
        )
        return code
    print(f"hsmkms audit verify: {result.problem}", file=sys.stderr)
    return code


def run_resume(args: argparse.Namespace) -> int:
    with open_audit_resumer(_settings(args, token=True)) as trail:
        seal = trail.resume()
    lost = (seal.supersedes or "?").partition(":")[0]
    if args.json:
        print(json.dumps({"ResumeSeal": seal.seal_seq, "LostAnchorSeal": lost}, sort_keys=True))
        return EXIT_OK
    print(
        f"audit trail resumed: seal {seal.seal_seq} records that the token's anchor named "
        f"seal {lost}, which the trail no longer holds"
    )
    return EXIT_OK


def _reader(args: argparse.Namespace) -> AuditTrail:
    return open_audit_reader(_settings(args, token=False))


def _line(record: Any) -> None:
    sys.stdout.write(canonical_json(record).decode() + "\n")


def run_tail(args: argparse.Namespace) -> int:
    if args.json and args.follow:
        raise UsageError("--json prints one array, which never ends with -f: use one or other")
    trail = _reader(args)
    try:
        if args.json:
            print(json.dumps(trail.tail(args.n), sort_keys=True))
            return EXIT_OK
        last, _ = trail.head()
        for record in trail.tail(args.n):
            _line(record)
        sys.stdout.flush()
        while args.follow:
            found = trail.records_after(last)
            for seq, record in found:
                _line(record)
                last = seq
            sys.stdout.flush()
            if not found:
                time.sleep(FOLLOW_INTERVAL)
    finally:
        trail.close()
    return EXIT_OK


def _resolved_key(args: argparse.Namespace, settings: Settings) -> str | None:
    """``--key-id`` as a key id: an alias (name or ARN) is resolved, with the token, to the
    key it names now."""
    given: str | None = args.key_id
    if given is None:
        return None
    name = given
    if given.startswith("arn:") and ":alias/" in given:
        name = "alias/" + given.split(":alias/", 1)[1]
    if not name.startswith("alias/"):
        return given
    with System.open(settings, audit=None, prepare=False) as system:
        key = system.store.resolve_alias(name)
    if key is None:
        raise ClientError(
            f"no alias {name} (now): an alias is resolved to the key it names now; search a "
            "deleted alias's key by its key id"
        )
    return str(key.key_id)


def _resolved_principal(principal: str | None, settings: Settings) -> str | None:
    """``--principal`` as the trail holds it: an ARN or an access key id as given; ``root``
    and other user names as the account's ARNs."""
    if principal is None or principal.startswith("arn:") or _ACCESS_KEY_ID.fullmatch(principal):
        return principal
    if principal == "root":
        return f"arn:aws:iam::{settings.account_id}:root"
    return f"arn:aws:iam::{settings.account_id}:user/{principal}"


def run_search(args: argparse.Namespace) -> int:
    settings = _settings(args, token=False)
    key_id = _resolved_key(args, settings)
    principal = _resolved_principal(args.principal, settings)
    filters: dict[str, Any] = {
        "key_id": key_id,
        "principal": principal,
        "event_name": args.event_name,
        "since": args.since,
        "until": args.until,
    }
    trail = open_audit_reader(settings)
    try:
        found = 0
        records = []
        for record in trail.search(**filters, limit=args.limit):
            found += 1
            if args.json:
                records.append(record)
            else:
                _line(record)
        if args.json:
            print(json.dumps(records, sort_keys=True))
        if found:
            return EXIT_OK
        print(f"hsmkms audit search: {_why_nothing(trail, filters, args)}", file=sys.stderr)
        return EXIT_NO_MATCH
    finally:
        trail.close()


_SHOWN = {
    "key_id": "--key-id",
    "principal": "--principal",
    "event_name": "--event-name",
    "since": "--since",
    "until": "--until",
}


def _why_nothing(trail: AuditTrail, filters: dict[str, Any], args: argparse.Namespace) -> str:
    """Which filter matched nothing by itself, or that they match nothing together."""
    given = {k: v for k, v in filters.items() if v is not None}
    if not given:
        return "the trail holds no record"

    def shown(name: str) -> str:
        value = given[name]
        text = value.isoformat() if isinstance(value, dt.datetime) else str(value)
        original = getattr(args, name, None)
        if isinstance(original, str) and original != text:
            text = f"{original} ({text})"
        return f"{_SHOWN[name]} {text}"

    alone = [n for n in given if next(iter(trail.search(**{n: given[n]}, limit=1)), None) is None]
    hint = ""
    event = given.get("event_name")
    if "event_name" in alone and event not in ALL_OPERATIONS and event not in _OTHER_EVENTS:
        hint = " (hsmkms records no event of that name: names are CloudTrail's, e.g. Decrypt)"
    if alone:
        return "no record matches " + ", nor ".join(shown(n) for n in alone) + hint
    return "no record matches " + " and ".join(shown(n) for n in given) + " together"
