"""HTML fragments of the report, shared by the signed HTML report and the console.

Every value is escaped (:func:`esc`); nothing here runs script. The stylesheet (:data:`STYLE`)
is small, self-contained and works on a laptop screen and a phone: wide tables scroll inside
their own box, cards wrap.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "STYLE",
    "VERDICT_CLASS",
    "attributes_table",
    "badge",
    "esc",
    "facts",
    "key_detail",
    "key_store_cell",
    "key_store_of",
    "table",
    "verdict_badge",
]

STYLE: Final = """
:root{--fg:#1d2733;--muted:#5b6876;--line:#dfe4ea;--bg:#f6f8fa;--card:#fff;--accent:#1f5fa8;
--ok:#17663a;--ok-bg:#e3f4ea;--warn:#8a5a00;--warn-bg:#fdf1d8;--bad:#a1261d;--bad-bg:#fbe5e3;
--info-bg:#e8eff8}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,
sans-serif;color:var(--fg);background:var(--bg)}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
header.top{background:#14283f;color:#fff;padding:.7rem 1.2rem;display:flex;flex-wrap:wrap;
align-items:center;gap:.4rem 1.2rem}
header.top .brand{font-weight:700;letter-spacing:.02em;color:#fff;margin-right:auto}
header.top nav{display:flex;flex-wrap:wrap;gap:.2rem .9rem}
header.top nav a{color:#cfe0f5}header.top nav a.here{color:#fff;font-weight:600}
header.top form{margin:0}header.top .who{color:#cfe0f5;font-size:.85rem}
main{max-width:72rem;margin:0 auto;padding:1rem 1.2rem 3rem}
h1{font-size:1.5rem;margin:.6rem 0 .2rem}h2{font-size:1.15rem;margin:1.6rem 0 .5rem}
h3{font-size:1rem;margin:1rem 0 .4rem}
.sub{color:var(--muted);margin:0 0 1rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.9rem 1rem;
margin:0 0 1rem}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(11rem,1fr));gap:.7rem;
margin:0 0 1rem}
.stat{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.6rem .8rem}
.stat b{display:block;font-size:1.35rem}.stat span{color:var(--muted);font-size:.85rem}
.table-wrap{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:0 0 .6rem}
table{border-collapse:collapse;width:100%;background:var(--card);font-size:.9rem}
th,td{text-align:left;padding:.4rem .55rem;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#eef2f6;font-weight:600;white-space:nowrap}
td.mono,code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:.82rem;word-break:break-all}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0;min-width:0;overflow-wrap:anywhere}
.badge{display:inline-block;border-radius:999px;padding:.05rem .55rem;font-size:.78rem;
font-weight:600;white-space:nowrap;background:var(--info-bg);color:var(--accent)}
dl.facts .badge{white-space:normal;max-width:100%;border-radius:.7rem}
.badge.ok{background:var(--ok-bg);color:var(--ok)}.badge.warn{background:var(--warn-bg);
color:var(--warn)}.badge.bad{background:var(--bad-bg);color:var(--bad)}
.yes{color:var(--ok);font-weight:600}.no{color:var(--bad);font-weight:600}.na{color:var(--muted)}
ul.reasons{margin:.3rem 0 0 1.1rem;padding:0}
.notice{border-left:4px solid var(--accent);background:var(--info-bg);padding:.5rem .8rem;
border-radius:4px;margin:0 0 1rem}
.notice.bad{border-color:var(--bad);background:var(--bad-bg)}
.notice.ok{border-color:var(--ok);background:var(--ok-bg)}
form.filters{display:flex;flex-wrap:wrap;gap:.5rem;align-items:flex-end;margin:0 0 1rem}
form.filters label{display:flex;flex-direction:column;font-size:.8rem;color:var(--muted);
flex:1 1 9rem}
input,select,button{font:inherit;padding:.4rem .5rem;border:1px solid #b9c3ce;border-radius:6px;
background:#fff;color:var(--fg)}
button{background:var(--accent);color:#fff;border-color:var(--accent);cursor:pointer}
button.link{background:none;border:none;color:#cfe0f5;padding:0}
.signin{max-width:24rem;margin:3rem auto}.signin label{display:block;margin:.6rem 0 .2rem}
.signin input{width:100%}.signin button{width:100%;margin-top:1rem}
details>summary{cursor:pointer;color:var(--accent)}
footer.sig{color:var(--muted);font-size:.85rem;margin-top:2rem}
@media (max-width:40rem){main{padding:.6rem .7rem 2rem}h1{font-size:1.25rem}
.table-wrap table{min-width:38rem}
th,td{padding:.35rem .4rem}dl.facts{grid-template-columns:1fr}dl.facts dt{margin-top:.3rem}}
"""

VERDICT_CLASS: Final = {
    "GENERATED_IN_HSM_NEVER_EXTRACTABLE": "ok",
    "NOT_EXTRACTABLE": "warn",
    "EXTRACTABLE": "bad",
    "UNVERIFIED": "warn",
    "MISSING": "bad",
}
_STATE_CLASS: Final = {"Enabled": "ok", "Disabled": "warn", "PendingDeletion": "bad"}
_ROTATION_CLASS: Final = {"ON_TIME": "ok", "OVERDUE": "bad", "PAUSED": "warn"}


def esc(value: object) -> str:
    """``value`` as HTML text (``None`` as an em dash)."""
    if value is None:
        return "&#8212;"
    return html.escape(str(value), quote=True)


def badge(text: object, kind: str = "") -> str:
    return f'<span class="badge {esc(kind)}">{esc(text)}</span>'


def verdict_badge(custody: Mapping[str, Any]) -> str:
    return badge(custody["text"], VERDICT_CLASS.get(str(custody["verdict"]), ""))


def state_badge(state: str) -> str:
    return badge(state, _STATE_CLASS.get(state, ""))


def facts(pairs: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are HTML already."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="facts">{rows}</dl>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table in a scrolling box; cells are HTML already."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="na">none</td></tr>'
    return f'<div class="table-wrap"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# The custody value of each attribute; others are shown without colour.
_GOOD: Final = {
    "TOKEN": True,
    "PRIVATE": True,
    "SENSITIVE": True,
    "ALWAYS_SENSITIVE": True,
    "EXTRACTABLE": False,
    "NEVER_EXTRACTABLE": True,
    "LOCAL": True,
    "MODIFIABLE": False,
}


def _bool(name: str, value: object) -> str:
    if value is None:
        return '<span class="na">not reported</span>'
    text = "true" if value else "false"
    good = _GOOD.get(name)
    if good is None:
        return text
    return f'<span class="{"yes" if value is good else "no"}">{text}</span>'


def attributes_table(objects: Sequence[Mapping[str, Any]]) -> str:
    """The token attributes of one version's objects, one column per object."""
    if not objects:
        return '<p class="na">No token attributes could be read.</p>'
    names: list[str] = []
    for obj in objects:
        for name in obj["attributes"]:
            if name not in names:
                names.append(name)
    headers = ["CKA_"] + [
        f"{o['objectClass'].replace('_', ' ').lower()} {o['objectId'][:8]}" for o in objects
    ]
    rows = [
        [f"<code>{esc(name)}</code>"]
        + [
            _bool(name, o["attributes"].get(name))
            if o["present"]
            else '<span class="no">missing</span>'
            for o in objects
        ]
        for name in names
    ]
    rows.append(
        ["permitted operations"]
        + [esc(", ".join(o["permittedOperations"]) or "none") for o in objects]
    )
    return table(headers, rows, cls="attributes")


def _reasons(custody: Mapping[str, Any]) -> str:
    items = [esc(r) for r in custody.get("reasons", [])] + [
        f'<span class="na">note: {esc(n)}</span>' for n in custody.get("notes", [])
    ]
    if not items:
        return ""
    return '<ul class="reasons">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def access_table(access: Mapping[str, Any]) -> str:
    rows = []
    for group in access["groups"]:
        who = []
        for p in group["principals"]:
            scope = (
                "all"
                if p["allActions"]
                else ", ".join(a.removeprefix("kms:") for a in p["actions"])
            )
            extra = (
                f" (conditional: {', '.join(a.removeprefix('kms:') for a in p['conditional'])})"
                if p["conditional"]
                else ""
            )
            who.append(
                f'<code>{esc(p["arn"])}</code> &#8212; {esc(scope)} <span class="na">via {esc(", ".join(p["via"]))}{esc(extra)}</span>'
            )
        delegated = (
            "yes: any principal of the account whose identity policy allows it"
            if group["identityPoliciesMayGrant"]
            else "no"
        )
        rows.append(
            [
                f"<b>{esc(group['group'])}</b>",
                "<br>".join(who) or '<span class="na">nobody known</span>',
                esc(delegated),
                badge("yes", "bad") if group["otherAccounts"] else esc("no"),
            ]
        )
    out = table(
        ["group", "principals (actions)", "identity policies may grant", "other accounts"], rows
    )
    if access.get("findings"):
        out += (
            '<ul class="reasons">'
            + "".join(f"<li>{esc(f)}</li>" for f in access["findings"])
            + "</ul>"
        )
    return out


def grants_table(grants: Sequence[Mapping[str, Any]]) -> str:
    return table(
        ["grant", "grantee", "operations", "constraints", "created"],
        [
            [
                f"<code>{esc(g['grantId'][:16])}</code>{' ' + esc(g['name']) if g['name'] else ''}",
                f"<code>{esc(g['granteePrincipal'])}</code>",
                esc(", ".join(g["operations"])),
                f"<code>{esc(g['constraints'])}</code>" if g["constraints"] else esc(None),
                esc(g["createdAt"]),
            ]
            for g in grants
        ],
    )


def versions_table(versions: Sequence[Mapping[str, Any]]) -> str:
    return table(
        ["version", "created", "how", "profile", "key store", "custody"],
        [
            [
                esc(v["version"]) + (" " + badge("current", "ok") if v["current"] else ""),
                esc(v["createdAt"]),
                esc(v["rotationType"] or "created"),
                esc(v["profile"]),
                esc(v["keyStore"]),
                verdict_badge(v["custody"]) + _reasons(v["custody"]),
            ]
            for v in versions
        ],
    )


def rotation_facts(rotation: Mapping[str, Any]) -> str:
    status = rotation["status"]
    return facts(
        [
            (
                "status",
                badge(status.replace("_", " ").lower(), _ROTATION_CLASS.get(status, ""))
                + " "
                + esc(rotation["detail"]),
            ),
            ("period", esc(f"{rotation['periodDays']} days" if rotation["periodDays"] else None)),
            ("next rotation", esc(rotation["nextRotationDate"])),
            (
                "current material age",
                esc(
                    f"{rotation['currentMaterialAgeDays']} days"
                    if rotation["currentMaterialAgeDays"] is not None
                    else None
                ),
            ),
            ("on-demand rotations", esc(rotation["onDemandRotations"])),
        ]
    )


def key_title(key: Mapping[str, Any]) -> str:
    aliases = key.get("aliases") or []
    return str(aliases[0]) if aliases else str(key["keyId"])


def key_store_of(key: Mapping[str, Any]) -> str | None:
    """The key store a key is in: its custom key store, else the store of its material."""
    return key.get("customKeyStoreId") or key.get("keyStore")


def key_store_cell(key: Mapping[str, Any]) -> str:
    """A key's store for a table cell: the store id, and its cluster id or XKS key id."""
    store = esc(key_store_of(key))
    if key.get("cloudHsmClusterId"):
        return f'{store}<br><span class="na mono">{esc(key["cloudHsmClusterId"])}</span>'
    if key.get("xksKeyId"):
        return f'{store}<br><span class="na mono">XKS key {esc(key["xksKeyId"])}</span>'
    return store


def _store_facts(key: Mapping[str, Any], store_href: str) -> list[tuple[str, str]]:
    store = key_store_of(key)
    link = (
        f'<a href="{esc(store_href)}{esc(store)}"><code>{esc(store)}</code></a>'
        if store is not None
        else esc(None)
    )
    pairs = [("custom key store id" if key.get("customKeyStoreId") else "key store", link)]
    if key.get("cloudHsmClusterId"):
        pairs.append(("CloudHSM cluster id", f"<code>{esc(key['cloudHsmClusterId'])}</code>"))
    if key.get("xksKeyId"):
        pairs.append(("XKS key id", f"<code>{esc(key['xksKeyId'])}</code>"))
        pairs.append(("inner layer", esc(f"key store {key['keyStore']} (double encryption)")))
    return pairs


def key_detail(
    key: Mapping[str, Any],
    *,
    sections: Mapping[str, str] | None = None,
    store_href: str = "#store-",
) -> str:
    """One key as the report shows it. ``sections`` replaces a part (``access``, ``grants``)
    with other HTML (the console's "not permitted" notes). ``store_href``: the link to a key
    store's section, before its id."""
    sections = sections or {}
    last = key.get("lastUsed")
    last_text = (
        f"{esc(last['eventTime'])} &#8212; {esc(last['eventName'])} by <code>{esc(last['principal'])}</code>"
        if last
        else esc("never (in the audit trail)")
    )
    tags = ", ".join(f"{k}={v}" for k, v in key["tags"].items()) or None
    parts = [
        '<div class="card">',
        facts(
            [
                ("custody", verdict_badge(key["custody"])),
                (
                    "state",
                    state_badge(key["state"])
                    + (
                        f" deletion on {esc(key['deletionDate'])}"
                        if key.get("deletionDate")
                        else ""
                    ),
                ),
                ("key id", f"<code>{esc(key['keyId'])}</code>"),
                ("ARN", f"<code>{esc(key['arn'])}</code>"),
                ("aliases", esc(", ".join(key["aliases"]) or None)),
                ("description", esc(key["description"] or None)),
                ("tags", esc(tags)),
                ("spec / usage", esc(f"{key['keySpec']} / {key['keyUsage']}")),
                ("origin", esc(key["origin"])),
                *_store_facts(key, store_href),
                ("created", esc(key["createdAt"])),
                ("last used", last_text),
            ]
        ),
        "</div>",
        "<h3>Versions and rotation</h3>",
        '<div class="card">',
        rotation_facts(key["rotation"]),
        "</div>",
        versions_table(key["versions"]),
    ]
    for v in key["versions"]:
        parts.append(
            f"<details><summary>Token attributes of version {esc(v['version'])} "
            f"(read from the token at report time)</summary>{attributes_table(v['objects'])}</details>"
        )
    parts.append("<h3>Who may use and administer it</h3>")
    parts.append(sections.get("access") or access_table(key["access"]))
    parts.append("<h3>Grants</h3>")
    parts.append(sections.get("grants") or grants_table(key["grants"]))
    return "\n".join(parts)
