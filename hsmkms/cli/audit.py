"""``hsmkms audit``: verify the audit trail against the token, show its tail, search it.

``verify`` exits 0 when the trail is intact, 1 when it finds tampering (naming the first bad
record; a tail cut back past the seal the token's anchor names is tampering) or no trail, 3
when the trail is intact as far as it goes but its end is not proven: a writer stopped without
a clean shutdown (a crash, a kill), a seal's write was interrupted, or the token holds no
anchor. ``resume`` lets writers go on after a cut, recording it for ever. ``tail`` and
``search`` print one JSON record per line and need no token.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from hsmkms.audit.records import canonical_json
from hsmkms.audit.trail import AuditTrail, VerifyStatus
from hsmkms.config import Settings
from hsmkms.system import open_audit_reader, open_audit_resumer, open_audit_verifier

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_STALE = 3


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
    resume.set_defaults(run=run_resume)

    tail = actions.add_parser("tail", help="print the newest records, one JSON per line")
    add_data_dir(tail)
    tail.add_argument("-n", type=int, default=10, metavar="N", help="how many (default 10)")
    tail.set_defaults(run=run_tail)

    search = actions.add_parser(
        "search",
        help="print matching records, oldest first, one JSON per line",
        description="Every filter given must match. Results are not proof of integrity: run "
        "'hsmkms audit verify' for that.",
    )
    add_data_dir(search)
    search.add_argument("--key-id", help="a key id or key ARN the call used")
    search.add_argument("--principal", help="the caller's ARN or access key id")
    search.add_argument("--event-name", help="the operation, e.g. Decrypt")
    search.add_argument("--since", type=_when, help="ISO-8601 time, inclusive (UTC if no zone)")
    search.add_argument("--until", type=_when, help="ISO-8601 time, inclusive (UTC if no zone)")
    search.add_argument("--limit", type=int, default=None, help="at most this many records")
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


def run_verify(args: argparse.Namespace) -> int:
    with open_audit_verifier(Settings.load(args.data_dir)) as trail:
        result = trail.verify(expect_seal=args.expect_seal)
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
        return EXIT_OK
    print(f"hsmkms audit verify: {result.problem}", file=sys.stderr)
    unproven = (VerifyStatus.STALE, VerifyStatus.UNCLEAN)
    return EXIT_STALE if result.status in unproven else EXIT_TAMPERED


def run_resume(args: argparse.Namespace) -> int:
    with open_audit_resumer(Settings.load(args.data_dir)) as trail:
        seal = trail.resume()
    print(
        f"audit trail resumed: seal {seal.seal_seq} records that the token's anchor named "
        f"seal {(seal.supersedes or '?').partition(':')[0]}, which the trail no longer holds"
    )
    return EXIT_OK


def _reader(args: argparse.Namespace) -> AuditTrail:
    return open_audit_reader(Settings.load(args.data_dir))


def run_tail(args: argparse.Namespace) -> int:
    trail = _reader(args)
    try:
        for record in trail.tail(args.n):
            print(canonical_json(record).decode())
    finally:
        trail.close()
    return EXIT_OK


def run_search(args: argparse.Namespace) -> int:
    trail = _reader(args)
    try:
        for record in trail.search(
            key_id=args.key_id,
            principal=args.principal,
            event_name=args.event_name,
            since=args.since,
            until=args.until,
            limit=args.limit,
        ):
            print(canonical_json(record).decode())
    finally:
        trail.close()
    return EXIT_OK
