"""The console's pages: what a signed-in principal may see, as server-rendered HTML.

Every page asks the same authorization the API asks (:class:`~hsmkms.service.authorize.
Authorizer`: key policy, identity policy, grants), for the caller of the session:

- the keys page lists only the keys the caller may ``kms:DescribeKey``;
- a key's page needs ``kms:DescribeKey`` (else it is "not found", as for a key that does not
  exist); its policy summary needs ``kms:GetKeyPolicy``, its grants ``kms:ListGrants``, its
  audit records ``cloudtrail:LookupEvents``;
- the audit page needs ``cloudtrail:LookupEvents``, the key stores page
  ``kms:DescribeCustomKeyStores`` (account-level: identity policies decide; the root may).

Nothing here changes anything. The HTTP side (sessions, cookies, CSRF, headers) is
:mod:`hsmkms.api.console`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode

from hsmkms.audit import AuditRecord
from hsmkms.audit.records import key_id_of
from hsmkms.errors import AccessDeniedException
from hsmkms.models.enums import KeyState
from hsmkms.report.build import ReportContext, audit_section, scan_trail
from hsmkms.report.html import (
    STYLE,
    badge,
    esc,
    key_detail,
    key_store_cell,
    key_title,
    state_badge,
    table,
    verdict_badge,
)
from hsmkms.report.render import audit_html, key_stores_html
from hsmkms.service.authorize import Authorizer
from hsmkms.store import KeyRecord
from hsmkms.types import Caller

if TYPE_CHECKING:
    from hsmkms.system import System

__all__ = [
    "AUDIT_ACTION",
    "STORES_ACTION",
    "STYLE",
    "AuditQuery",
    "Console",
    "KeyFilter",
    "page",
    "sign_in_page",
]

AUDIT_ACTION: Final = "cloudtrail:LookupEvents"
STORES_ACTION: Final = "kms:DescribeCustomKeyStores"
_PAGE: Final = 1000
_RECENT: Final = 20
_AUDIT_ROWS: Final = 200


def page(
    title: str, body: str, *, who: str | None = None, csrf: str | None = None, here: str = ""
) -> str:
    """A whole console page. ``who``/``csrf``: the signed-in principal and its sign-out form."""
    nav = ""
    if who is not None:
        links = [("keys", "Keys"), ("audit", "Audit"), ("stores", "Key stores")]
        current = ' class="here"'
        nav = (
            "<nav>"
            + "".join(
                f'<a href="/console/{p}"{current if p == here else ""}>{t}</a>' for p, t in links
            )
            + "</nav>"
        )
        nav += (
            f'<span class="who">{esc(who)}</span>'
            f'<form method="post" action="/console/sign-out"><input type="hidden" name="csrf" '
            f'value="{esc(csrf)}"><button class="link" type="submit">Sign out</button></form>'
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · hsmkms console</title>
<link rel="stylesheet" href="/console/style.css">
</head>
<body>
<header class="top"><a class="brand" href="/console/keys">hsmkms console</a>{nav}</header>
<main>
{body}
</main>
</body>
</html>
"""


def sign_in_page(csrf: str, *, error: str | None = None) -> str:
    """The sign-in form (access key id and secret access key)."""
    notice = f'<p class="notice bad">{esc(error)}</p>' if error else ""
    body = f"""<div class="signin card">
<h1>Sign in</h1>
<p class="sub">Read-only console. Use an access key of this hsmkms: you see what its policies let it see.</p>
{notice}
<form method="post" action="/console/sign-in" autocomplete="off">
<input type="hidden" name="csrf" value="{esc(csrf)}">
<label for="access_key_id">Access key id</label>
<input id="access_key_id" name="access_key_id" required maxlength="128" autocapitalize="off" spellcheck="false">
<label for="secret">Secret access key</label>
<input id="secret" name="secret" type="password" required maxlength="128">
<button type="submit">Sign in</button>
</form>
</div>"""
    return page("Sign in", body)


@dataclasses.dataclass(frozen=True)
class KeyFilter:
    """The keys page's filters (empty: no filter)."""

    alias: str = ""
    tag: str = ""
    state: str = ""
    store: str = ""


@dataclasses.dataclass(frozen=True)
class AuditQuery:
    """The audit page's search."""

    key: str = ""
    principal: str = ""
    event: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None


class Console:
    """The console's view of one worker's system. Thread-safe (it only reads)."""

    def __init__(self, system: System) -> None:
        self._system = system
        store = system.store
        self._store = store
        self._authz = Authorizer(
            store.grants_for,
            clock=lambda: dt.datetime.now(dt.UTC),
            tags_of=lambda key_id: dict(store.tags_of(key_id)),
            aliases_of=store.alias_names_of,
        )

    # -- authorization ------------------------------------------------------------------------

    def may(self, caller: Caller, action: str, key: KeyRecord) -> bool:
        """Whether ``caller`` may do ``action`` on ``key`` (policies, then grants)."""
        try:
            self._authz.check_key(caller, action, key)
        except AccessDeniedException:
            return False
        return True

    def may_account(self, caller: Caller, action: str) -> bool:
        """Whether ``caller``'s identity policy allows an account-level action (the root:
        unless denied)."""
        try:
            self._authz.check_account(caller, action)
        except AccessDeniedException:
            return False
        return True

    def _context(self) -> ReportContext:
        return ReportContext.of(self._system)

    def key_exists(self, key_id: str) -> bool:
        """Whether a key of this id exists (for the audit record of a refused page)."""
        key = self._store.get_key(key_id)
        return key is not None and key.state != "Deleting"

    def visible_key(self, caller: Caller, key_id: str) -> KeyRecord | None:
        """The key, when it exists and ``caller`` may DescribeKey it."""
        key = self._store.get_key(key_id)
        if key is None or key.state == "Deleting" or not self.may(caller, "kms:DescribeKey", key):
            return None
        return key

    # -- pages ----------------------------------------------------------------------------------

    def keys_page(self, caller: Caller, filters: KeyFilter) -> str:
        """The keys the caller may DescribeKey, filtered."""
        keys: list[KeyRecord] = []
        marker = None
        while True:
            found = self._store.list_keys(_PAGE, marker)
            keys.extend(k for k in found.items if self.may(caller, "kms:DescribeKey", k))
            if found.next_marker is None:
                break
            marker = found.next_marker
        context = self._context()
        rows = []
        stores: set[str] = set()
        for key in keys:
            aliases = self._store.alias_names_of(key.key_id)
            tags = dict(self._store.tags_of(key.key_id))
            current = self._store.get_version(key.key_id, key.current_version)
            place = context.place_of(key, [current] if current is not None else [])
            store_id = place.store or "?"
            stores.add(store_id)
            if filters.alias and not any(filters.alias.lower() in a.lower() for a in aliases):
                continue
            if filters.tag and not _tag_matches(tags, filters.tag):
                continue
            if filters.state and key.state != filters.state:
                continue
            if filters.store and store_id != filters.store:
                continue
            custody = (
                context.version_section(key, current)["custody"] if current is not None else None
            )
            rows.append(
                [
                    f'<a href="/console/keys/{quote(key.key_id)}">{esc(aliases[0] if aliases else key.key_id)}</a>'
                    + (f'<br><span class="na mono">{esc(key.key_id)}</span>' if aliases else ""),
                    state_badge(key.state),
                    esc(f"{key.key_spec} / {key.key_usage}"),
                    key_store_cell(
                        {
                            "keyStore": store_id,
                            "cloudHsmClusterId": place.cloud_hsm_cluster_id,
                            "xksKeyId": place.xks_key_id,
                        }
                    ),
                    esc(", ".join(f"{k}={v}" for k, v in tags.items()) or None),
                    verdict_badge(custody) if custody else esc(None),
                ]
            )
        states = "".join(
            f'<option value="{esc(s.value)}"{" selected" if filters.state == s.value else ""}>{esc(s.value)}</option>'
            for s in (KeyState.Enabled, KeyState.Disabled, KeyState.PendingDeletion)
        )
        store_options = "".join(
            f'<option value="{esc(s)}"{" selected" if filters.store == s else ""}>{esc(s)}</option>'
            for s in sorted(stores | ({filters.store} if filters.store else set()))
        )
        return f"""<h1>Keys</h1>
<p class="sub">{len(keys)} key(s) you may describe; {len(rows)} shown.</p>
<form class="filters" method="get" action="/console/keys">
<label>Alias<input name="alias" value="{esc(filters.alias)}" placeholder="alias/…"></label>
<label>Tag<input name="tag" value="{esc(filters.tag)}" placeholder="key or key=value"></label>
<label>State<select name="state"><option value="">any</option>{states}</select></label>
<label>Key store<select name="store"><option value="">any</option>{store_options}</select></label>
<button type="submit">Filter</button>
</form>
{table(["key", "state", "spec / usage", "key store", "tags", "custody (current version)"], rows)}"""

    def key_page(self, caller: Caller, key: KeyRecord) -> str:
        """One key: the report's view of it, with what the caller may see."""
        context = self._context()
        may_audit = self.may_account(caller, AUDIT_ACTION)
        recent: list[AuditRecord] = []
        last_used = None
        if may_audit:
            with self._system.audit_reader() as trail:
                matching = list(trail.search(key_id=key.key_id))
            recent = matching[-_RECENT:]
            last_used = scan_trail(matching, since=None, until=None).last_used.get(key.key_id)
        section = context.key_section(key, last_used=last_used)
        sections: dict[str, str] = {}
        if not self.may(caller, "kms:GetKeyPolicy", key):
            sections["access"] = _not_permitted("kms:GetKeyPolicy")
        if not self.may(caller, "kms:ListGrants", key):
            sections["grants"] = _not_permitted("kms:ListGrants")
        if not may_audit:
            section["lastUsed"] = None
        body = [
            f"<h1>{esc(key_title(section))}</h1>",
            f'<p class="sub"><a href="/console/keys">Keys</a> / {esc(key.key_id)}</p>',
            key_detail(section, sections=sections, store_href="/console/stores#store-"),
        ]
        if "access" not in sections:
            body.append(
                f'<details><summary>Key policy document</summary><pre class="mono">'
                f"{esc(key.policy)}</pre></details>"
            )
        body.append("<h3>Recent audit records</h3>")
        if not may_audit:
            body.append(_not_permitted(AUDIT_ACTION))
            body.append('<p class="na">(last used is shown with the audit records)</p>')
        else:
            body.append(_records_table(list(reversed(recent))))
            body.append(
                f'<p><a href="/console/audit?{urlencode({"key": key.key_id})}">'
                "All records of this key</a></p>"
            )
        return "\n".join(body)

    def audit_page(self, caller: Caller, query: AuditQuery) -> str:
        """The audit trail's status and a search of it."""
        head = f"""<h1>Audit trail</h1>
<form class="filters" method="get" action="/console/audit">
<label>Key<input name="key" value="{esc(query.key)}" placeholder="key id or ARN"></label>
<label>Principal<input name="principal" value="{esc(query.principal)}" placeholder="ARN or access key id"></label>
<label>Event<input name="event" value="{esc(query.event)}" placeholder="Decrypt"></label>
<label>Since<input name="since" type="datetime-local" step="1" value="{esc(_local(query.since))}"></label>
<label>Until<input name="until" type="datetime-local" step="1" value="{esc(_local(query.until))}"></label>
<button type="submit">Search</button>
</form>"""
        with self._system.audit_reader() as trail:
            status = audit_section(trail.verify())
            found = list(
                trail.search(
                    key_id=key_id_of(query.key) if query.key else None,
                    principal=query.principal or None,
                    event_name=query.event or None,
                    since=query.since,
                    until=query.until,
                )
            )
        shown = list(reversed(found[-_AUDIT_ROWS:]))
        note = f'<p class="sub">{len(found)} matching record(s); the newest {len(shown)} shown, newest first. UTC.</p>'
        return "\n".join(
            ["<h2>Chain status</h2>", audit_html(status), head, note, _records_table(shown)]
        )

    def stores_page(self) -> str:
        """The key stores: the default token and every custom key store, with their
        connection state, cluster and recorded token or XKS proxy, and key counts (never a
        password or a secret)."""
        context = self._context()
        stores = context.key_stores_section()
        return (
            "<h1>Key stores and tokens</h1>"
            f'<p class="sub">{len(stores)} key store(s). Key counts include every key, '
            "pending deletion too; the keys page lists those you may describe.</p>"
            + key_stores_html(
                stores, keys_href=lambda store_id: "/console/keys?" + urlencode({"store": store_id})
            )
        )


def _not_permitted(action: str) -> str:
    return (
        f'<p class="notice">Not shown: your policies do not allow <code>{esc(action)}</code>.</p>'
    )


def _tag_matches(tags: Mapping[str, str], wanted: str) -> bool:
    key, sep, value = wanted.partition("=")
    if key not in tags:
        return False
    return not sep or tags[key] == value


def _local(when: dt.datetime | None) -> str:
    return "" if when is None else when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _records_table(records: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for r in records:
        identity = r.get("userIdentity") or {}
        who = (
            identity.get("arn")
            or identity.get("principalId")
            or identity.get("invokedBy")
            or identity.get("type")
        )
        keys = [
            key_id_of(x.get("ARN", "")) for x in r.get("resources") or [] if isinstance(x, Mapping)
        ]
        error = r.get("errorCode") or r.get("errorMessage")
        rows.append(
            [
                esc(r.get("eventTime")),
                esc(r.get("eventName")),
                f"<code>{esc(who)}</code>",
                "<br>".join(
                    f'<a href="/console/keys/{quote(k)}"><code>{esc(k[:8])}…</code></a>'
                    for k in keys
                )
                or esc(None),
                esc(r.get("sourceIPAddress")),
                badge(error, "bad") if error else badge("ok", "ok"),
            ]
        )
    return table(["time", "event", "principal", "keys", "source", "result"], rows)
