"""The read-only web console over HTTP: ``/console/`` (``hsmkms serve --console``; off by default).

Sign-in takes an access key id and its secret access key — the credentials the API takes, with
the same policies — and opens a session (:mod:`hsmkms.console.sessions`). Pages are rendered on
the server (:mod:`hsmkms.console.pages`); there is no script.

Routes::

    GET  /console/                 -> the keys page, or the sign-in page
    GET  /console/sign-in          the form           POST /console/sign-in   sign in
    POST /console/sign-out         sign out
    GET  /console/keys             keys (filters: alias, tag, state, store)
    GET  /console/keys/<key id>    one key
    GET  /console/audit            the audit trail (key, principal, event, since, until)
    GET  /console/stores           key stores and tokens
    GET  /console/style.css        the stylesheet

Nothing can be changed from the console: the only POSTs open and close a session; every other
method is 405. Security:

- the session cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/console``, and ``Secure``
  when served over TLS; it holds only a random session id (the database keeps its hash);
- both forms carry a CSRF token (sign-in: a double-submit cookie; sign-out: the session's) and a
  POST whose ``Origin`` is another site, or whose ``Sec-Fetch-Site`` is ``cross-site`` or
  ``same-site``, is refused;
- every response has a Content-Security-Policy without script, ``frame-ancestors 'none'``,
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` (so a form post
  carries its ``Origin``), ``Cache-Control:
  no-store``;
- every sign-in attempt, and every sign-out, is an audit record (``ConsoleLogin`` /
  ``ConsoleLogout``, shaped as CloudTrail's); a key's page is recorded as the ``DescribeKey``
  it is; no record, no page: when the record cannot be written the answer is 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hmac
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final
from urllib.parse import parse_qs

import structlog

from hsmkms import __version__
from hsmkms.api.app import Receive, Scope, Send, _identity
from hsmkms.audit import UserIdentity, prepare_api_call
from hsmkms.audit.records import console_sign_in_record, prepare_record
from hsmkms.console.pages import (
    AUDIT_ACTION,
    STORES_ACTION,
    STYLE,
    AuditQuery,
    Console,
    KeyFilter,
    page,
    sign_in_page,
)
from hsmkms.console.sessions import ConsoleSessions
from hsmkms.errors import KMSError
from hsmkms.models import DescribeKeyRequest
from hsmkms.policy import account_of
from hsmkms.types import Caller

__all__ = ["ConsoleApp"]

log = structlog.get_logger(__name__)

SESSION_COOKIE: Final = "hsmkms_session"
CSRF_COOKIE: Final = "hsmkms_csrf"
PREFIX: Final = "/console"
_MAX_FORM: Final = 8 * 1024
_MAX_QUERY: Final = 4 * 1024
_ACCESS_KEY_SHAPE: Final = re.compile(r"[A-Z0-9]{16,128}")
_KEY_PATH: Final = re.compile(r"/console/keys/([A-Za-z0-9-]{1,64})")
_CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS: Final = [
    (b"content-security-policy", _CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
_HTML: Final = (b"content-type", b"text/html; charset=utf-8")
_BAD_SIGN_IN: Final = "The access key id or the secret access key is not valid."


class _Response:
    def __init__(
        self,
        status: int,
        body: str | bytes = b"",
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        cookies: list[str] | None = None,
    ) -> None:
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.headers = headers if headers is not None else [_HTML]
        self.cookies = cookies or []


def _redirect(location: str, cookies: list[str] | None = None) -> _Response:
    return _Response(303, b"", headers=[(b"location", location.encode())], cookies=cookies)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _cookies(scope: Scope) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    raw = _header(scope, b"cookie")
    if raw:
        try:
            jar.load(raw)
        except CookieError:
            return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> str:
    parts = [f"{name}={value}", f"Path={PREFIX}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"")[:_MAX_QUERY].decode("utf-8", "replace")
    return {k: v[0].strip() for k, v in parse_qs(raw, max_num_fields=20).items()}


def _when(value: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


class _RecordFailed(Exception):
    pass


class ConsoleApp:
    """The console's routes inside a worker's ASGI app (:class:`hsmkms.api.app.KmsApp`).

    ``runtime``: returns the worker's runtime (:class:`hsmkms.api.runtime.Runtime`) once the
    worker has started. ``executor``: where page work runs (it reads the database and the
    token), off the event loop."""

    def __init__(self, runtime: Callable[[], Any], executor: concurrent.futures.Executor) -> None:
        self._runtime = runtime
        self._executor = executor
        self._parts: tuple[Console, ConsoleSessions] | None = None

    def _open(self) -> tuple[Console, ConsoleSessions]:
        if self._parts is None:
            system = self._runtime().system
            self._parts = (
                Console(system),
                ConsoleSessions(system.store.database, system.keystore),
            )
        return self._parts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        body = b""
        if scope["method"] == "POST":
            body = await self._read(scope, receive)
        try:
            response = await loop.run_in_executor(self._executor, self._route, scope, body)
        except _RecordFailed:
            response = _Response(
                503,
                page(
                    "Unavailable",
                    "<h1>Unavailable</h1><p>The audit "
                    "trail cannot record this request; try again later.</p>",
                ),
            )
        except Exception:
            log.exception("console_failed", path=scope.get("path"))
            response = _Response(500, page("Error", "<h1>Something went wrong</h1>"))
        headers = [
            *response.headers,
            *_SECURITY_HEADERS,
            (b"content-length", str(len(response.body)).encode()),
        ]
        headers += [(b"set-cookie", c.encode("latin-1")) for c in response.cookies]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    @staticmethod
    async def _read(scope: Scope, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_FORM:
                return b"\x00too-large"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    # -- routing ------------------------------------------------------------------------------

    def _route(self, scope: Scope, body: bytes) -> _Response:
        path = scope["path"]
        method = scope["method"]
        if path == f"{PREFIX}/style.css":
            if method != "GET":
                return self._not_allowed("GET")
            return _Response(200, STYLE, headers=[(b"content-type", b"text/css; charset=utf-8")])
        if path in (f"{PREFIX}/sign-in", f"{PREFIX}/sign-out"):
            if method != "POST" and not (path.endswith("sign-in") and method == "GET"):
                return self._not_allowed("GET, POST" if path.endswith("sign-in") else "POST")
            if method == "GET":
                return self._sign_in_form(scope)
            refused = self._cross_site(scope)
            if refused is not None:
                return refused
            return (
                self._sign_in(scope, body)
                if path.endswith("sign-in")
                else self._sign_out(scope, body)
            )
        if method != "GET":
            return self._not_allowed("GET")
        console, sessions = self._open()
        caller, csrf = self._caller(scope, sessions)
        if caller is None:
            return _redirect(f"{PREFIX}/sign-in")
        who = caller.principal_arn

        def done(title: str, html: str, here: str, status: int = 200) -> _Response:
            return _Response(status, page(title, html, who=who, csrf=csrf, here=here))

        if path in (PREFIX, f"{PREFIX}/"):
            return _redirect(f"{PREFIX}/keys")
        if path == f"{PREFIX}/keys":
            q = _query(scope)
            filters = KeyFilter(
                q.get("alias", ""), q.get("tag", ""), q.get("state", ""), q.get("store", "")
            )
            return done("Keys", console.keys_page(caller, filters), "keys")
        found = _KEY_PATH.fullmatch(path)
        if found is not None:
            key_id = found.group(1)
            key = console.visible_key(caller, key_id)
            self._record_describe(scope, caller, key_id, key is not None, console)
            if key is None:
                return done(
                    "Not found",
                    "<h1>Not found</h1><p>No such key, or your policies do "
                    "not let you describe it.</p>",
                    "keys",
                    404,
                )
            return done(key_id, console.key_page(caller, key), "keys")
        if path == f"{PREFIX}/audit":
            if not console.may_account(caller, AUDIT_ACTION):
                return done(
                    "Audit",
                    '<h1>Audit trail</h1><p class="notice">Not shown: your '
                    f"policies do not allow <code>{AUDIT_ACTION}</code>.</p>",
                    "audit",
                    403,
                )
            q = _query(scope)
            query = AuditQuery(
                q.get("key", ""),
                q.get("principal", ""),
                q.get("event", ""),
                _when(q.get("since", "")),
                _when(q.get("until", "")),
            )
            return done("Audit", console.audit_page(caller, query), "audit")
        if path == f"{PREFIX}/stores":
            if not console.may_account(caller, STORES_ACTION):
                return done(
                    "Key stores",
                    '<h1>Key stores</h1><p class="notice">Not shown: your '
                    f"policies do not allow <code>{STORES_ACTION}</code>.</p>",
                    "stores",
                    403,
                )
            return done("Key stores", console.stores_page(), "stores")
        return done("Not found", "<h1>Not found</h1>", "", 404)

    @staticmethod
    def _not_allowed(allow: str) -> _Response:
        return _Response(
            405,
            page("Not allowed", "<h1>Not allowed</h1><p>The console is read-only.</p>"),
            headers=[_HTML, (b"allow", allow.encode())],
        )

    @staticmethod
    def _cross_site(scope: Scope) -> _Response | None:
        """A POST from another site is refused (CSRF, with the tokens below)."""
        fetch_site = _header(scope, b"sec-fetch-site")
        origin = _header(scope, b"origin")
        host = _header(scope, b"host")
        scheme = scope.get("scheme", "http")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return _Response(403, page("Refused", "<h1>Refused</h1><p>Cross-site request.</p>"))
        if origin is not None and origin != f"{scheme}://{host}":
            return _Response(403, page("Refused", "<h1>Refused</h1><p>Cross-site request.</p>"))
        return None

    def _caller(self, scope: Scope, sessions: ConsoleSessions) -> tuple[Caller | None, str | None]:
        session = sessions.get(_cookies(scope).get(SESSION_COOKIE))
        if session is None:
            return None, None
        credential = self._runtime().lookup(session.access_key_id)
        if credential is None:  # deleted, or its row altered, since sign-in
            return None, None
        client = scope.get("client")
        return Caller(
            principal_arn=credential.principal_arn,
            account_id=account_of(credential.principal_arn),
            identity_policy=credential.identity_policy,
            access_key_id=credential.access_key_id,
            source_ip=client[0] if client else None,
            secure_transport=scope.get("scheme") == "https",
            user_agent=self._user_agent(scope),
        ), session.csrf

    @staticmethod
    def _user_agent(scope: Scope) -> str:
        browser = (_header(scope, b"user-agent") or "")[:512]
        return f"hsmkms-console/{__version__}" + (f" ({browser})" if browser else "")

    # -- sign-in and sign-out -----------------------------------------------------------------

    def _sign_in_form(self, scope: Scope, error: str | None = None, status: int = 200) -> _Response:
        _, sessions = self._open()
        caller, _ = self._caller(scope, sessions)
        if caller is not None and error is None:
            return _redirect(f"{PREFIX}/keys")
        token = secrets.token_urlsafe(24)
        secure = scope.get("scheme") == "https"
        return _Response(
            status,
            sign_in_page(token, error=error),
            cookies=[_cookie(CSRF_COOKIE, token, secure=secure)],
        )

    def _sign_in(self, scope: Scope, body: bytes) -> _Response:
        form = _form(body)
        expected = _cookies(scope).get(CSRF_COOKIE, "")
        given = form.get("csrf", "")
        if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
            return self._sign_in_form(scope, "The form expired; please sign in again.", 403)
        access_key_id = form.get("access_key_id", "").strip()
        secret = form.get("secret", "")
        runtime = self._runtime()
        credential = (
            runtime.lookup(access_key_id) if _ACCESS_KEY_SHAPE.fullmatch(access_key_id) else None
        )
        ok = credential is not None and hmac.compare_digest(
            credential.secret.encode(), secret.encode()
        )
        client = scope.get("client")
        if ok:
            assert credential is not None
            identity = _identity(
                credential.principal_arn,
                account_of(credential.principal_arn),
                credential.access_key_id,
            )
        else:
            shaped = access_key_id if _ACCESS_KEY_SHAPE.fullmatch(access_key_id) else None
            identity = UserIdentity("Unknown", access_key_id=shaped)
        self._audit(
            console_sign_in_record(
                identity=identity,
                account_id=runtime.account_id,
                region=runtime.region,
                success=ok,
                source_ip=client[0] if client else None,
                user_agent=self._user_agent(scope),
            )
        )
        if not ok:
            return self._sign_in_form(scope, _BAD_SIGN_IN, 401)
        _, sessions = self._open()
        token, _session = sessions.open(access_key_id)
        secure = scope.get("scheme") == "https"
        return _redirect(
            f"{PREFIX}/keys",
            cookies=[
                _cookie(SESSION_COOKIE, token, secure=secure),
                _cookie(CSRF_COOKIE, "", secure=secure, max_age=0),
            ],
        )

    def _sign_out(self, scope: Scope, body: bytes) -> _Response:
        _, sessions = self._open()
        token = _cookies(scope).get(SESSION_COOKIE)
        session = sessions.get(token)
        secure = scope.get("scheme") == "https"
        cleared = [_cookie(SESSION_COOKIE, "", secure=secure, max_age=0)]
        if session is None:
            return _redirect(f"{PREFIX}/sign-in", cookies=cleared)
        if not hmac.compare_digest(session.csrf.encode(), _form(body).get("csrf", "").encode()):
            return _Response(403, page("Refused", "<h1>Refused</h1><p>The form expired.</p>"))
        sessions.close(token)
        runtime = self._runtime()
        credential = runtime.lookup(session.access_key_id)
        client = scope.get("client")
        identity = (
            _identity(
                credential.principal_arn,
                account_of(credential.principal_arn),
                credential.access_key_id,
            )
            if credential is not None
            else UserIdentity("Unknown", access_key_id=session.access_key_id)
        )
        self._audit(
            console_sign_in_record(
                identity=identity,
                account_id=runtime.account_id,
                region=runtime.region,
                success=True,
                source_ip=client[0] if client else None,
                user_agent=self._user_agent(scope),
                event_name="ConsoleLogout",
            )
        )
        return _redirect(f"{PREFIX}/sign-in", cookies=cleared)

    # -- audit ----------------------------------------------------------------------------------

    def _audit(self, record: Mapping[str, Any]) -> None:
        try:
            self._runtime().audit(prepare_record(dict(record)))
        except KMSError as exc:
            log.error("audit_failed", operation=record.get("eventName"), error=type(exc).__name__)
            raise _RecordFailed from exc

    def _record_describe(
        self, scope: Scope, caller: Caller, key_id: str, allowed: bool, console: Console
    ) -> None:
        runtime = self._runtime()
        arn = f"arn:aws:kms:{runtime.region}:{runtime.account_id}:key/{key_id}"
        exists = console.key_exists(key_id)
        error_code = error_message = None
        if not allowed:
            if exists:
                error_code = "AccessDeniedException"
                error_message = (
                    f"User: {caller.principal_arn} is not authorized to perform: "
                    f"kms:DescribeKey on resource: {arn}"
                )
            else:
                error_code, error_message = "NotFoundException", f"Key '{arn}' does not exist"
        record = prepare_api_call(
            "DescribeKey",
            read_only=True,
            identity=_identity(caller.principal_arn, caller.account_id, caller.access_key_id),
            account_id=runtime.account_id,
            region=runtime.region,
            request_id=str(uuid.uuid4()),
            request=DescribeKeyRequest(KeyId=key_id),
            response=None,
            key_arns=[arn] if exists else [],
            source_ip=caller.source_ip,
            user_agent=caller.user_agent,
            error_code=error_code,
            error_message=error_message,
        )
        try:
            runtime.audit(record)
        except KMSError as exc:
            raise _RecordFailed from exc


def _form(body: bytes) -> dict[str, str]:
    if body.startswith(b"\x00"):
        return {}
    text = body.decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(text, max_num_fields=10, keep_blank_values=True).items()}
