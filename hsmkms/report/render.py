"""Writing a report as JSON, HTML or Markdown, signed inside the token.

:func:`render` returns the bytes of a signed report file; :mod:`hsmkms.report.signing` explains
the signature and verifies it. The HTML and Markdown views are generated from the same report
object as the JSON; the signature covers the file's own bytes, so each format is checked as it
is, without re-rendering.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from hsmkms.audit.records import canonical_json
from hsmkms.keystore.base import Keystore
from hsmkms.report.html import (
    STYLE,
    badge,
    esc,
    facts,
    key_detail,
    key_store_cell,
    key_store_of,
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

__all__ = [
    "audit_html",
    "connection_badge",
    "integrity_html",
    "key_stores_html",
    "render",
    "signature_block",
    "store_location",
    "store_type",
]

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


_STATE_CLASS: Final = {
    "CONNECTED": "ok",
    "CONNECTING": "",
    "DISCONNECTED": "warn",
    "DISCONNECTING": "warn",
    "FAILED": "bad",
}


def store_type(store: Mapping[str, Any]) -> str:
    """A key store's type as a reader says it."""
    if store["default"]:
        return "default token"
    return str(store["type"] or store["kind"])


def connection_badge(store: Mapping[str, Any]) -> str:
    """The connection state (and error code) of a key store, as a badge."""
    state = store["connectionState"]
    if state is None:  # the default token (or a store the configuration registers)
        return badge("in use", "ok") if store["connected"] else badge("not readable", "bad")
    text = state + (f" ({store['connectionErrorCode']})" if store["connectionErrorCode"] else "")
    return badge(text, _STATE_CLASS.get(state, ""))


def store_location(store: Mapping[str, Any]) -> str:
    """Where a key store lives, in one line of text: its cluster and recorded token, its
    XKS proxy, or its token."""
    cluster, proxy, token = store["cluster"], store["xksProxy"], store["token"]
    if proxy is not None:
        return f"XKS proxy {proxy['uriEndpoint']}{proxy['uriPath']}"
    if cluster is not None:
        anchor = cluster["trustAnchor"]
        recorded = (
            f"token {anchor['label']} (serial {anchor['serial']})"
            if anchor
            else "no readable trust anchor"
        )
        return f"cluster {cluster['cloudHsmClusterId']}, {recorded}"
    if token is not None:
        return f"token {token['label']} (serial {token['serial']})"
    return "unknown"


def _token_facts(token: Mapping[str, Any]) -> list[tuple[str, str]]:
    specs = token["capabilities"]["specs"]
    return [
        ("manufacturer", esc(token["manufacturer"])),
        ("model", esc(token["model"])),
        ("serial", f"<code>{esc(token['serial'])}</code>"),
        ("label", esc(token["label"])),
        (
            "firmware / hardware",
            esc(f"{token['firmwareVersion'] or '?'} / {token['hardwareVersion'] or '?'}"),
        ),
        ("module", f"<code>{esc(token['module'])}</code>"),
        ("library", esc(token["libraryDescription"])),
        ("profile", esc(token["profile"])),
        ("hosts", esc(", ".join(f"{s} ({', '.join(u)})" for s, u in specs.items()) or None)),
        (
            "mechanisms",
            f"<details><summary>{len(token['mechanisms'])} mechanisms</summary>"
            f'<p class="mono">{esc(", ".join(token["mechanisms"]))}</p></details>',
        ),
    ]


def _cluster_facts(cluster: Mapping[str, Any]) -> list[tuple[str, str]]:
    anchor = cluster["trustAnchor"]
    matches = cluster["tokenMatchesTrustAnchor"]
    pairs = [
        ("CloudHSM cluster id", f"<code>{esc(cluster['cloudHsmClusterId'])}</code>"),
        (
            "cluster registered",
            esc(cluster["registeredAt"])
            if cluster["registered"]
            else badge("not registered (removed)", "bad"),
        ),
        ("PKCS#11 URI", f"<code>{esc(cluster['pkcs11Uri'])}</code>"),
    ]
    if anchor is None:
        pairs.append(("trust anchor", badge("unreadable (not a token identity)", "bad")))
    else:
        pairs += [
            ("recorded manufacturer", esc(anchor["manufacturer"])),
            ("recorded model", esc(anchor["model"])),
            ("recorded serial", f"<code>{esc(anchor['serial'])}</code>"),
            ("recorded label", esc(anchor["label"])),
        ]
    pairs.append(
        (
            "token now",
            esc("not read (the store is not connected)")
            if matches is None
            else badge("matches the trust anchor", "ok")
            if matches
            else badge("differs from the trust anchor", "bad"),
        )
    )
    return pairs


def _proxy_facts(proxy: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        ("XKS proxy endpoint", f"<code>{esc(proxy['uriEndpoint'])}</code>"),
        ("XKS proxy path", f"<code>{esc(proxy['uriPath'])}</code>"),
        ("connectivity", esc(proxy["connectivity"])),
        ("access key id", f"<code>{esc(proxy['accessKeyId'])}</code>"),
        ("secret access key", '<span class="na">sealed in the default token; never shown</span>'),
    ]


def key_stores_html(
    stores: Sequence[Mapping[str, Any]], *, keys_href: Callable[[str], str] | None = None
) -> str:
    """The key stores: an overview table, then each store's facts — its connection, its
    cluster and the token identity recorded for it, or its XKS proxy, and its token as read
    now. ``keys_href(store id)``: a link for a store's key count (the console's keys page)."""

    def count(store: Mapping[str, Any]) -> str:
        text = esc(store["keys"])
        return f'<a href="{esc(keys_href(store["id"]))}">{text}</a>' if keys_href else text

    overview = table(
        ["key store", "name", "type", "connection", "lives in", "keys"],
        [
            [
                f'<a href="#store-{esc(s["id"])}"><code>{esc(s["id"])}</code></a>',
                esc(s["name"]),
                esc(store_type(s)),
                connection_badge(s),
                esc(store_location(s)),
                count(s),
            ]
            for s in stores
        ],
        cls="stores",
    )
    parts = [overview]
    for store in stores:
        title = f"Key store {store['id']}" + (" (default)" if store["default"] else "")
        parts.append(f'<h3 id="store-{esc(store["id"])}">{esc(title)}</h3><div class="card">')
        pairs = [
            ("id", f"<code>{esc(store['id'])}</code>"),
            ("name", esc(store["name"])),
            ("type", esc(store_type(store))),
            ("kind", esc(store["kind"])),
            ("created", esc(store["createdAt"])),
            ("connection", connection_badge(store)),
            ("keys", count(store)),
        ]
        if store["cluster"] is not None:
            pairs += _cluster_facts(store["cluster"])
        if store["xksProxy"] is not None:
            pairs += _proxy_facts(store["xksProxy"])
        parts.append(facts(pairs))
        token = store["token"]
        if token is not None:
            parts.append("<h4>Its token, as read now</h4>" + facts(_token_facts(token)))
        elif store["error"]:
            parts.append(f'<p class="notice bad">Token not read: {esc(store["error"])}</p>')
        elif store["kind"] == "PKCS11_TOKEN":
            parts.append(
                '<p class="notice">Token not read: the store is not connected, so this hsmkms '
                "does not open its token.</p>"
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
                key_store_cell(k),
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
    stores = report["deployment"]["keyStores"]
    add(
        _md_table(
            ["store", "name", "type", "connection", "error code", "lives in", "keys"],
            [
                [
                    s["id"],
                    s["name"],
                    store_type(s),
                    s["connectionState"] or ("in use" if s["connected"] else "not readable"),
                    s["connectionErrorCode"],
                    store_location(s),
                    s["keys"],
                ]
                for s in stores
            ],
        )
    )
    for store in stores:
        add(f"\n### Key store {_md(store['id'])}\n")
        cluster, proxy = store["cluster"], store["xksProxy"]
        if cluster is not None:
            anchor = cluster["trustAnchor"] or {}
            matches = cluster["tokenMatchesTrustAnchor"]
            add(
                _md_table(
                    ["cluster", "PKCS#11 URI", "registered", "recorded token", "token now"],
                    [
                        [
                            cluster["cloudHsmClusterId"],
                            cluster["pkcs11Uri"],
                            cluster["registeredAt"] if cluster["registered"] else "not registered",
                            (
                                f"{anchor['manufacturer']} / {anchor['model']} / serial "
                                f"{anchor['serial']} / label {anchor['label']}"
                            )
                            if anchor
                            else "unreadable trust anchor",
                            "not read"
                            if matches is None
                            else "matches the trust anchor"
                            if matches
                            else "differs from the trust anchor",
                        ]
                    ],
                )
            )
        if proxy is not None:
            add(
                _md_table(
                    ["XKS proxy endpoint", "path", "connectivity", "access key id"],
                    [
                        [
                            proxy["uriEndpoint"],
                            proxy["uriPath"],
                            proxy["connectivity"],
                            proxy["accessKeyId"],
                        ]
                    ],
                )
            )
        token = store["token"]
        if token is not None:
            add(
                ("\n" if cluster is not None or proxy is not None else "")
                + _md_table(
                    [
                        "token manufacturer",
                        "model",
                        "serial",
                        "firmware",
                        "label",
                        "profile",
                        "mechanisms",
                    ],
                    [
                        [
                            token["manufacturer"],
                            token["model"],
                            token["serial"],
                            token["firmwareVersion"],
                            token["label"],
                            token["profile"],
                            len(token["mechanisms"]),
                        ]
                    ],
                )
            )
        if store["error"]:
            add(f"\nToken not read: {_md(store['error'])}")
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
                    "cluster / XKS key",
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
                        key_store_of(k),
                        k["cloudHsmClusterId"] or k["xksKeyId"],
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
