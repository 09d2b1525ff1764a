"""Writing a report as JSON, HTML or Markdown, signed inside the token.

:func:`render` returns the bytes of a signed report file; :mod:`hsmkms.report.signing` explains
the signature and verifies it. The HTML and Markdown views are generated from the same report
object as the JSON; the signature covers the file's own bytes, so each format is checked as it
is, without re-rendering.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any, Final

from hsmkms.audit.records import canonical_json
from hsmkms.keystore.base import Keystore
from hsmkms.report.html import (
    STYLE,
    esc,
    facts,
    key_detail,
    key_title,
    table,
    verdict_badge,
)
from hsmkms.report.signing import (
    ALGORITHM,
    ReportFormat,
    SigningKey,
    html_trailer_prefix,
)

__all__ = ["audit_html", "integrity_html", "key_stores_html", "render", "signature_block"]

_TITLE: Final = "Key custody report"


def signature_block(key: SigningKey, token_serial: str) -> dict[str, str]:
    """The ``signature`` object of a JSON report, before its value."""
    return {
        "algorithm": ALGORITHM.value,
        "keyStore": key.ref.store,
        "publicKey": base64.b64encode(key.public_key).decode("ascii"),
        "publicKeyFingerprint": key.fingerprint,
        "tokenSerial": token_serial,
        "value": "",
    }


def render(
    report: Mapping[str, Any],
    fmt: str,
    *,
    keystore: Keystore,
    key: SigningKey,
    token_serial: str,
) -> bytes:
    """The signed report file in ``fmt`` (:class:`ReportFormat`): the signature is made inside
    the token with ``key``."""
    if fmt == ReportFormat.JSON:
        document = canonical_json(
            {"report": report, "signature": signature_block(key, token_serial)}
        )
        signed = document[: -len(b'"}}')]  # ends with "value":"
        value = base64.b64encode(key.sign(keystore, signed)).decode("ascii")
        return signed + value.encode("ascii") + b'"}}\n'
    if fmt == ReportFormat.HTML:
        body = _html(report, key, token_serial)
    elif fmt == ReportFormat.MARKDOWN:
        body = _markdown(report, key, token_serial)
    else:
        raise ValueError(f"unknown report format {fmt!r}")
    signed = body.encode("utf-8") + html_trailer_prefix(key)
    value = base64.b64encode(key.sign(keystore, signed)).decode("ascii")
    return signed + value.encode("ascii") + b" -->\n"


# -- HTML ----------------------------------------------------------------------------------------


def _summary_cards(report: Mapping[str, Any]) -> str:
    summary = report["summary"]
    by_verdict = summary["byVerdict"]
    good = by_verdict.get("GENERATED_IN_HSM_NEVER_EXTRACTABLE", 0)
    cards = [
        (str(summary["keys"]), "keys in scope"),
        (f"{good} / {summary['keys']}", "generated in the HSM, never extractable"),
        (str(summary["rotationOverdue"]), "rotations overdue"),
        (
            "intact" if summary["auditTrailIntact"] else report["auditTrail"]["status"],
            "audit trail",
        ),
        ("ok" if summary["integrityOk"] else "findings", "metadata integrity"),
        (str(summary["deletedKeys"]), "keys deleted in the period"),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="stat"><b>{esc(value)}</b><span>{esc(label)}</span></div>'
            for value, label in cards
        )
        + "</div>"
    )


def key_stores_html(stores: Sequence[Mapping[str, Any]]) -> str:
    """The key stores and their tokens."""
    parts = []
    for store in stores:
        token = store.get("token")
        title = f"Key store {store['id']}" + (" (default)" if store["default"] else "")
        parts.append(f'<h3>{esc(title)}</h3><div class="card">')
        if token is None:
            parts.append(f'<p class="notice bad">Not connected: {esc(store["error"])}</p></div>')
            continue
        specs = token["capabilities"]["specs"]
        parts.append(
            facts(
                [
                    ("kind", esc(store["kind"])),
                    ("manufacturer", esc(token["manufacturer"])),
                    ("model", esc(token["model"])),
                    ("serial", f"<code>{esc(token['serial'])}</code>"),
                    ("label", esc(token["label"])),
                    (
                        "firmware / hardware",
                        esc(
                            f"{token['firmwareVersion'] or '?'} / {token['hardwareVersion'] or '?'}"
                        ),
                    ),
                    ("module", f"<code>{esc(token['module'])}</code>"),
                    ("library", esc(token["libraryDescription"])),
                    ("profile", esc(token["profile"])),
                    (
                        "hosts",
                        esc(", ".join(f"{s} ({', '.join(u)})" for s, u in specs.items()) or None),
                    ),
                    (
                        "mechanisms",
                        f"<details><summary>{len(token['mechanisms'])} mechanisms</summary>"
                        f'<p class="mono">{esc(", ".join(token["mechanisms"]))}</p></details>',
                    ),
                ]
            )
        )
        parts.append("</div>")
    return "\n".join(parts)


def audit_html(audit: Mapping[str, Any]) -> str:
    """The audit trail's verification result."""
    seal = audit["newestSeal"]
    ok = audit["status"] == "ok"
    head = (
        '<p class="notice ok">The audit trail verifies against the token: every seal, every record.</p>'
        if ok
        else f'<p class="notice bad">Audit trail {esc(audit["status"])}: {esc(audit["problem"])}</p>'
    )
    return (
        head
        + '<div class="card">'
        + facts(
            [
                ("records", esc(audit["records"])),
                ("seals", esc(audit["seals"])),
                ("sealed through record", esc(audit["sealedThrough"])),
                ("unsealed records", esc(audit["unsealed"])),
                (
                    "newest seal",
                    f"<code>{esc(seal['seal'])}:{esc(seal['tag'])}</code>" if seal else esc(None),
                ),
                ("newest seal time", esc(audit["newestSealTime"])),
                ("seal gaps", esc(len(audit["gaps"]))),
            ]
        )
        + "</div>"
    )


def integrity_html(integrity: Mapping[str, Any]) -> str:
    rows = (
        [
            [
                esc("row failing its token MAC"),
                esc(f"{p['table']} row of key {p['key_id']}: {p['detail']}"),
            ]
            for p in integrity["rowsFailing"]
        ]
        + [
            [esc("token object of no key"), esc(f"{o['objectId']} ({o['label']})")]
            for o in integrity["orphanObjects"]
        ]
        + [
            [
                esc("key version without its token object"),
                esc(f"key {m['keyId']} version {m['version']}"),
            ]
            for m in integrity["missingObjects"]
        ]
        + [[esc("warning"), esc(w)] for w in integrity["warnings"]]
    )
    head = (
        '<p class="notice ok">Every metadata row passes its token MAC; the token and the database agree.</p>'
        if integrity["ok"]
        else '<p class="notice bad">Integrity findings (below).</p>'
    )
    return head + (table(["finding", "detail"], rows) if rows else "")


def _html(report: Mapping[str, Any], key: SigningKey, token_serial: str) -> str:
    account = report["account"]
    scope = report["scope"]["keyIds"]
    period = report["period"]
    keys_index = table(
        ["key", "state", "spec", "key store", "rotation", "custody"],
        [
            [
                f'<a href="#key-{esc(k["keyId"])}">{esc(key_title(k))}</a>',
                esc(k["state"]),
                esc(k["keySpec"]),
                esc(k["keyStore"]),
                esc(k["rotation"]["status"]),
                verdict_badge(k["custody"]),
            ]
            for k in report["keys"]
        ],
    )
    key_cards = "\n".join(
        f'<section id="key-{esc(k["keyId"])}"><h2>{esc(key_title(k))}</h2>{key_detail(k)}</section>'
        for k in report["keys"]
    )
    deleted = table(
        ["key", "deleted (purge record)", "scheduled", "by", "window"],
        [
            [
                f"<code>{esc(d['keyId'])}</code>",
                f"{esc(d['deletedAt'])}<br><code>{esc(d['purgeRecord']['eventId'])}</code>",
                esc(d["scheduledAt"]),
                f"<code>{esc(d['scheduledBy'])}</code>",
                esc(f"{d['pendingWindowInDays']} days" if d["pendingWindowInDays"] else None),
            ]
            for d in report["deletedKeys"]
        ],
    )
    principals = table(
        ["principal", "name", "known from", "identity policy"],
        [
            [
                f"<code>{esc(p['arn'])}</code>",
                esc(p["name"]),
                esc(", ".join(p["sources"])),
                esc("yes" if p["hasIdentityPolicy"] else "no"),
            ]
            for p in report["principals"]
        ],
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="hsmkms-report-id" content="{esc(report["reportId"])}">
<title>{esc(_TITLE)} {esc(report["generatedAt"])}</title>
<style>{STYLE}</style>
</head>
<body>
<header class="top"><span class="brand">hsmkms</span><span>{esc(_TITLE)}</span></header>
<main>
<h1>{esc(_TITLE)}</h1>
<p class="sub">Account {esc(account["accountId"])}, region {esc(account["region"])}. Generated {esc(report["generatedAt"])} by {esc(report["generator"]["product"])} {esc(report["generator"]["version"])}. Scope: {esc("keys " + ", ".join(scope) if scope else "every key")}. Deletions from {esc(period["since"] or "the start of the audit trail")} to {esc(period["until"])}. Report {esc(report["reportId"])}.</p>
{_summary_cards(report)}
<h2>Keys</h2>
{keys_index}
<h2>Deployment</h2>
<div class="card">{facts([("data directory", f"<code>{esc(report['deployment']['dataDirectory'])}</code>"), ("database", f"<code>{esc(report['deployment']['database'])}</code>"), ("audit database", f"<code>{esc(report['deployment']['auditDatabase'])}</code>")])}</div>
{key_stores_html(report["deployment"]["keyStores"])}
<h2>Audit trail</h2>
{audit_html(report["auditTrail"])}
<h2>Integrity</h2>
{integrity_html(report["integrity"])}
<h2>Principals</h2>
{principals}
{key_cards}
<h2>Keys deleted in the period</h2>
{deleted}
<h2>Signature</h2>
<div class="card">{facts([("algorithm", esc(ALGORITHM.value)), ("signing key", f"<code>{esc(key.fingerprint)}</code>"), ("held in", esc(f"key store {key.ref.store}, token {token_serial}, label hsmkms:report")), ("check", "<code>hsmkms report verify FILE</code> (exits non-zero on any edit)")])}</div>
<footer class="sig">The signature in the last line of this file covers every byte before it.</footer>
</main>
</body>
</html>
"""


# -- Markdown ------------------------------------------------------------------------------------


def _md(value: object) -> str:
    """A value for a Markdown table cell: one line, pipes and markup escaped."""
    if value is None:
        return "—"
    text = " ".join(str(value).split())
    for char in "\\|*_`[]<>#":
        text = text.replace(char, "\\" + char)
    return text


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    if not rows:
        lines.append("| " + " | ".join(["none"] + [""] * (len(headers) - 1)) + " |")
    return "\n".join(lines)


def _markdown(report: Mapping[str, Any], key: SigningKey, token_serial: str) -> str:
    out: list[str] = []
    add = out.append
    account = report["account"]
    summary = report["summary"]
    add(f"# {_TITLE}\n")
    add(
        f"Account {_md(account['accountId'])}, region {_md(account['region'])}. Generated "
        f"{_md(report['generatedAt'])} by hsmkms {_md(report['generator']['version'])}. "
        f"Report {_md(report['reportId'])}.\n"
    )
    add(
        _md_table(
            [
                "keys",
                "never extractable",
                "rotations overdue",
                "audit trail",
                "integrity",
                "deleted",
            ],
            [
                [
                    summary["keys"],
                    summary["byVerdict"].get("GENERATED_IN_HSM_NEVER_EXTRACTABLE", 0),
                    summary["rotationOverdue"],
                    "intact" if summary["auditTrailIntact"] else report["auditTrail"]["status"],
                    "ok" if summary["integrityOk"] else "findings",
                    summary["deletedKeys"],
                ]
            ],
        )
    )
    add("\n## Key stores\n")
    for store in report["deployment"]["keyStores"]:
        token = store.get("token") or {}
        add(
            _md_table(
                [
                    "store",
                    "manufacturer",
                    "model",
                    "serial",
                    "firmware",
                    "label",
                    "profile",
                    "mechanisms",
                ],
                [
                    [
                        store["id"],
                        token.get("manufacturer"),
                        token.get("model"),
                        token.get("serial"),
                        token.get("firmwareVersion"),
                        token.get("label"),
                        token.get("profile"),
                        len(token.get("mechanisms", [])),
                    ]
                ],
            )
        )
        if store.get("error"):
            add(f"\nNot connected: {_md(store['error'])}")
    audit = report["auditTrail"]
    seal = audit["newestSeal"]
    add("\n## Audit trail\n")
    add(
        _md_table(
            ["status", "records", "seals", "sealed through", "newest seal", "newest seal time"],
            [
                [
                    audit["status"],
                    audit["records"],
                    audit["seals"],
                    audit["sealedThrough"],
                    f"{seal['seal']}:{seal['tag']}" if seal else None,
                    audit["newestSealTime"],
                ]
            ],
        )
    )
    if audit["problem"]:
        add(f"\nProblem: {_md(audit['problem'])}")
    integrity = report["integrity"]
    add("\n## Integrity\n")
    add(
        "Every metadata row passes its token MAC; the token and the database agree."
        if integrity["ok"]
        else "Findings:"
    )
    for p in integrity["rowsFailing"]:
        add(
            f"- row failing its MAC: {_md(p['table'])} row of key {_md(p['key_id'])}: {_md(p['detail'])}"
        )
    for o in integrity["orphanObjects"]:
        add(f"- token object of no key: {_md(o['objectId'])} ({_md(o['label'])})")
    for m in integrity["missingObjects"]:
        add(f"- key {_md(m['keyId'])} version {_md(m['version'])}: token object missing")
    for w in integrity["warnings"]:
        add(f"- warning: {_md(w)}")
    add("\n## Keys\n")
    for k in report["keys"]:
        add(f"### {_md(key_title(k))}\n")
        add(
            _md_table(
                [
                    "key id",
                    "state",
                    "spec",
                    "usage",
                    "origin",
                    "key store",
                    "created",
                    "custody",
                    "last used",
                ],
                [
                    [
                        k["keyId"],
                        k["state"],
                        k["keySpec"],
                        k["keyUsage"],
                        k["origin"],
                        k["keyStore"],
                        k["createdAt"],
                        k["custody"]["text"],
                        (k["lastUsed"] or {}).get("eventTime", "never"),
                    ]
                ],
            )
        )
        rotation = k["rotation"]
        add(f"\nRotation: {_md(rotation['status'])} — {_md(rotation['detail'])}.\n")
        add(
            _md_table(
                ["version", "created", "how", "custody", "reasons"],
                [
                    [
                        v["version"],
                        v["createdAt"],
                        v["rotationType"] or "created",
                        v["custody"]["text"],
                        "; ".join(v["custody"]["reasons"]) or "—",
                    ]
                    for v in k["versions"]
                ],
            )
        )
        for v in k["versions"]:
            for o in v["objects"]:
                attributes = ", ".join(
                    f"{name}={'?' if value is None else str(value).lower()}"
                    for name, value in o["attributes"].items()
                )
                add(
                    f"\n- version {v['version']} {_md(o['objectClass'])} {_md(o['objectId'])}: "
                    f"{_md(attributes) if o['present'] else 'MISSING'}"
                )
        add("\nAccess:\n")
        for g in k["access"]["groups"]:
            who = "; ".join(
                f"{p['arn']} ({'all' if p['allActions'] else ', '.join(p['actions'])})"
                for p in g["principals"]
            )
            add(
                f"- {_md(g['group'])}: {_md(who or 'nobody known')}"
                f"{' — identity policies may grant it' if g['identityPoliciesMayGrant'] else ''}"
            )
        for finding in k["access"]["findings"]:
            add(f"- finding: {_md(finding)}")
        add(f"\nGrants: {len(k['grants'])}.\n")
    add("## Keys deleted in the period\n")
    add(
        _md_table(
            ["key", "deleted", "purge record", "scheduled", "by"],
            [
                [
                    d["keyId"],
                    d["deletedAt"],
                    d["purgeRecord"]["eventId"],
                    d["scheduledAt"],
                    d["scheduledBy"],
                ]
                for d in report["deletedKeys"]
            ],
        )
    )
    add("\n## Signature\n")
    add(
        f"ECDSA_SHA_256 by the key {_md(key.fingerprint)} (key store {_md(key.ref.store)}, "
        f"token {_md(token_serial)}, label hsmkms:report). The last line of this file signs "
        "every byte before it: `hsmkms report verify FILE`.\n"
    )
    return "\n".join(out) + "\n"
