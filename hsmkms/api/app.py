"""The ASGI application: AWS KMS JSON 1.1 over HTTP with SigV4 on every request.

Routes::

    POST /          a KMS operation (X-Amz-Target), SigV4-authenticated
    GET  /healthz   deep health check, unauthenticated: 200 or 503
    GET  /metrics   Prometheus text, unauthenticated
    /console/...    the read-only web console, with ``console=True`` (hsmkms.api.console)

Every response carries ``x-amzn-RequestId`` (a UUID) and ``x-hsmkms-worker`` (the pid of the
worker that answered). Operations are dispatched generically through their descriptors
(:data:`hsmkms.service.OPERATIONS`), so a new operation needs no change here.

Audit: every ``POST /`` — allowed or denied, successful or failed, authenticated or not —
produces exactly one audit record (:func:`hsmkms.audit.prepare_api_call`), queued through
:meth:`Backend.audit` before the response is sent; a request whose record cannot be queued is
answered with that error instead of its result. ``/healthz``, ``/metrics`` and requests to
other paths or with other methods are not audited (``docs/audit.md``).

Execution model (``docs/http-api.md``): service calls are synchronous. The cryptographic
operations (whose descriptor says ``inline``, :mod:`hsmkms.service.operations`) run inline on
the event loop: they take a fraction of a millisecond, PKCS#11 calls are serialized per process
anyway, and a thread hop would cost as much as the work. Everything else (key administration,
which writes the database and may wait on SQLite's write lock) runs on one worker thread, so a
slow write does not stall the crypto fast path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic import BaseModel

from hsmkms.api import protocol, sigv4
from hsmkms.api.metrics import NO_OPERATION, exposition, observe_request
from hsmkms.audit import AuditRecord, PreparedRecord, UserIdentity, prepare_api_call
from hsmkms.errors import (
    KMSError,
    KMSInternalException,
    UnknownOperationException,
    caller_error_fields,
)
from hsmkms.policy import account_of
from hsmkms.service import OPERATIONS
from hsmkms.service.operations import ALL_OPERATIONS
from hsmkms.types import Caller

__all__ = ["UNKNOWN_EVENT_NAME", "Backend", "KmsApp", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_TASK_INTERVAL = 60.0

UNKNOWN_EVENT_NAME = "UnknownOperation"
"""The ``eventName`` of a request whose ``X-Amz-Target`` is missing or is not
``TrentService.<Name>`` with a plausible operation name (letters and digits, at most 64)."""

_TARGET_NAME = re.compile(r"TrentService\.([A-Za-z][A-Za-z0-9]{0,63})")
# An access key id as AWS shapes them (uppercase letters and digits): only such a value from an
# unverified Authorization header goes into a record, so a secret pasted there by mistake never
# does.
_CLAIMED_KEY = re.compile(r"Credential=([A-Z0-9]{16,128})/")
_MAX_USER_AGENT = 1024

log = structlog.get_logger(__name__)

_PID = str(os.getpid()).encode()
_JSON_HEADERS = [(b"content-type", protocol.CONTENT_TYPE.encode())]


class _BodyTooLarge(Exception):
    pass


class Backend(Protocol):
    """What the app needs from a worker's runtime (:class:`hsmkms.api.runtime.Runtime`, a
    server's view of :class:`hsmkms.system.System`)."""

    @property
    def service(self) -> Any:
        """The KMS service: one method per operation, named in ``OPERATIONS``."""

    @property
    def region(self) -> str: ...

    @property
    def account_id(self) -> str:
        """The account the service's keys belong to (``recipientAccountId``)."""

    def lookup(self, access_key_id: str) -> sigv4.Credential | None:
        """The SigV4 credential of an access key id, or None."""

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Queue one audit record; a :class:`KMSError` when it cannot be queued."""

    def warm_up(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def run_due_tasks(self) -> object: ...

    def close(self) -> None: ...


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _event_name(target: str | None) -> str:
    """The operation a request named, for its audit record, even when unknown or unusable."""
    found = _TARGET_NAME.fullmatch(target) if target is not None else None
    return found.group(1) if found else UNKNOWN_EVENT_NAME


@functools.lru_cache(maxsize=1024)
def _identity(principal_arn: str, account_id: str, access_key_id: str | None) -> UserIdentity:
    """CloudTrail's ``userIdentity`` of an authenticated caller: ``Root`` for the account's
    root principal, else ``IAMUser`` (the only two kinds of principal hsmkms has)."""
    if principal_arn.endswith(":root"):
        return UserIdentity("Root", account_id, principal_arn, account_id, access_key_id)
    user_name = principal_arn.rpartition("/")[2] or None
    return UserIdentity(
        "IAMUser", None, principal_arn, account_id, access_key_id, user_name=user_name
    )


def _unknown_identity(scope: Scope) -> UserIdentity:
    """``userIdentity`` of a caller that did not authenticate: type ``Unknown``, with the
    access key id the ``Authorization`` header claimed when it has the shape of one."""
    authorization = _header(scope, b"authorization")
    found = _CLAIMED_KEY.search(authorization) if authorization else None
    return UserIdentity("Unknown", access_key_id=found.group(1) if found else None)


_error_fields = caller_error_fields
"""(errorCode, errorMessage) as the caller saw them (shared with the local operator's records)."""


class KmsApp:
    """The ASGI callable. ``runtime_factory`` builds the worker's runtime at lifespan startup
    (in the worker process, after spawn); see :class:`hsmkms.api.runtime.Runtime`."""

    def __init__(
        self,
        runtime_factory: Callable[[], Backend],
        *,
        max_body: int = protocol.MAX_BODY,
        task_interval: float = DEFAULT_TASK_INTERVAL,
        console: bool = False,
    ) -> None:
        self._factory = runtime_factory
        self._runtime: Backend | None = None
        self._max_body = max_body
        self._task_interval = task_interval
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hsmkms")
        self._tasks: asyncio.Task[None] | None = None
        self._console: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
        if console:  # the read-only web console at /console/ (hsmkms serve --console)
            from hsmkms.api.console import ConsoleApp

            self._console = ConsoleApp(lambda: self.runtime, self._executor)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # -- lifespan ---------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                loop = asyncio.get_running_loop()
                try:
                    self._runtime = await loop.run_in_executor(self._executor, self._open)
                except Exception as exc:
                    text = exc.message if isinstance(exc, KMSError) else type(exc).__name__
                    print(f"hsmkms serve: worker cannot start: {text}", file=sys.stderr)
                    await send({"type": "lifespan.startup.failed", "message": text})
                    return
                if self._task_interval > 0:
                    self._tasks = asyncio.create_task(self._periodic())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._tasks is not None:
                    self._tasks.cancel()
                loop = asyncio.get_running_loop()
                if self._runtime is not None:
                    await loop.run_in_executor(self._executor, self._runtime.close)
                self._executor.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _open(self) -> Backend:
        runtime = self._factory()
        runtime.warm_up()
        return runtime

    @property
    def runtime(self) -> Backend:
        """The worker's runtime (after lifespan startup)."""
        if self._runtime is None:
            raise KMSInternalException("the worker has not started")
        return self._runtime

    async def _periodic(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._task_interval)
            try:
                await loop.run_in_executor(self._executor, self.runtime.run_due_tasks)
            except Exception:
                log.exception("due_tasks_failed")

    # -- HTTP -------------------------------------------------------------------------------

    async def _respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        request_id: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        all_headers = [
            (b"x-amzn-requestid", request_id.encode()),
            (b"x-hsmkms-worker", _PID),
            (b"content-length", str(len(body)).encode()),
            *(headers if headers is not None else _JSON_HEADERS),
        ]
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self._max_body:
                    raise _BodyTooLarge
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4())
        path = scope["path"]
        method = scope["method"]
        if path == "/healthz" or path == "/metrics":
            await self._internal(path, method, send, request_id)
            return
        if self._console is not None and (path == "/console" or path.startswith("/console/")):
            await self._console(scope, receive, send)
            return
        if path != "/":
            exc: KMSError = UnknownOperationException(
                "hsmkms serves the KMS API at / (POST), /healthz and /metrics."
            )
            _, body = protocol.encode_error(exc)
            await self._respond(send, 404, body, request_id)
            return
        if method != "POST":
            exc = UnknownOperationException("The KMS API takes POST requests at /.")
            _, body = protocol.encode_error(exc)
            headers = [*_JSON_HEADERS, (b"allow", b"POST")]
            await self._respond(send, 405, body, request_id, headers)
            return
        start = time.perf_counter()
        operation = NO_OPERATION
        target = _header(scope, b"x-amz-target")
        caller: Caller | None = None
        request: BaseModel | None = None
        response: BaseModel | None = None
        failure: BaseException | None = None
        payload = b""
        try:
            try:
                body = await self._read_body(scope, receive)
            except _BodyTooLarge:
                raise protocol.oversize_error(self._max_body) from None
            caller = self._authenticate(scope, body)
            operation = protocol.operation_name(target, OPERATIONS)
            protocol.check_content_type(_header(scope, b"content-type"))
            op = OPERATIONS[operation]
            assert op.request_model is not None  # operation_name admits implemented ones only
            request = protocol.decode_request(op.request_model, body)
            method_fn = getattr(self.runtime.service, op.worker)
            if op.inline:
                result = method_fn(request, caller=caller)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self._executor, functools.partial(method_fn, request, caller=caller)
                )
            payload = protocol.encode_response(result)
            response = result
        except KMSError as exc:
            if exc.status >= 500:
                # The caller sees no detail; the operator gets the class and message.
                log.error(
                    "server_fault",
                    operation=operation,
                    request_id=request_id,
                    error=type(exc).__name__,
                    detail=exc.message,
                )
            failure = exc
        except Exception as exc:
            log.exception("request_failed", operation=operation, request_id=request_id)
            failure = exc
        try:
            name = operation if operation != NO_OPERATION else _event_name(target)
            record = self._record(scope, name, request_id, caller, request, response, failure)
            self.runtime.audit(record)
        except Exception as exc:
            # No record, no result: the caller gets the error instead of an unaudited answer.
            if isinstance(exc, KMSError):
                error = type(exc).__name__
                log.error("audit_failed", operation=operation, request_id=request_id, error=error)
            else:
                log.exception("audit_failed", operation=operation, request_id=request_id)
            failure = exc
        if failure is None:
            status, answer, code = 200, payload, "OK"
        else:
            status, answer = protocol.encode_error(failure)
            code = failure.code if isinstance(failure, KMSError) else "KMSInternalException"
        # Counted before the answer leaves, so a client that reads /metrics right after its
        # request (from either worker) finds it counted.
        observe_request(operation, code, time.perf_counter() - start)
        await self._respond(send, status, answer, request_id)

    def _record(
        self,
        scope: Scope,
        event_name: str,
        request_id: str,
        caller: Caller | None,
        request: BaseModel | None,
        response: BaseModel | None,
        failure: BaseException | None,
    ) -> PreparedRecord:
        """The audit record of one ``POST /`` (see ``docs/audit.md``, "What is recorded")."""
        runtime = self.runtime
        extra: dict[str, Any] | None = None
        key_arns: list[str] = []
        if caller is not None:
            identity = _identity(caller.principal_arn, caller.account_id, caller.access_key_id)
            source_ip, user_agent = caller.source_ip, caller.user_agent
            used = caller.keys_used
            if used:
                key_arns = list(used)
                versions = [v for v in used.values() if v is not None]
                if len(versions) == 1:
                    extra = {"keyVersion": versions[0]}
        else:
            identity = _unknown_identity(scope)
            client = scope.get("client")
            source_ip = client[0] if client else None
            user_agent = _header(scope, b"user-agent")
        if user_agent is not None and len(user_agent) > _MAX_USER_AGENT:
            user_agent = user_agent[:_MAX_USER_AGENT]
        error_code = error_message = None
        if failure is not None:
            error_code, error_message = _error_fields(failure)
            response = None
        op = ALL_OPERATIONS.get(event_name)
        return prepare_api_call(
            event_name,
            read_only=op is not None and op.read_only,
            identity=identity,
            account_id=runtime.account_id,
            region=runtime.region,
            request_id=request_id,
            request=request,
            response=response,
            key_arns=key_arns,
            source_ip=source_ip,
            user_agent=user_agent,
            error_code=error_code,
            error_message=error_message,
            additional_event_data=extra,
        )

    def _authenticate(self, scope: Scope, body: bytes) -> Caller:
        """SigV4-verify the request; the caller (identity, identity policy, origin)."""
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        request = sigv4.SignedRequest(
            method=scope["method"],
            path=path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=body,
        )
        credential = sigv4.verify(
            request,
            self.runtime.lookup,
            region=self.runtime.region,
            now=dt.datetime.now(dt.UTC),
        )
        client = scope.get("client")
        return Caller(
            principal_arn=credential.principal_arn,
            account_id=account_of(credential.principal_arn),
            identity_policy=credential.identity_policy,
            access_key_id=credential.access_key_id,
            source_ip=client[0] if client else None,
            secure_transport=scope.get("scheme") == "https",
            user_agent=_header(scope, b"user-agent"),
        )

    async def _internal(self, path: str, method: str, send: Send, request_id: str) -> None:
        if method not in ("GET", "HEAD"):
            exc = UnknownOperationException(f"{path} takes GET requests.")
            _, body = protocol.encode_error(exc)
            await self._respond(send, 405, body, request_id, [*_JSON_HEADERS, (b"allow", b"GET")])
            return
        loop = asyncio.get_running_loop()
        if path == "/metrics":
            text = await loop.run_in_executor(None, exposition)
            headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
            await self._respond(send, 200, text, request_id, headers)
            return
        try:
            report = await loop.run_in_executor(self._executor, self.runtime.health)
        except Exception as exc:  # the check itself failed
            report = {"status": "fail", "error": type(exc).__name__}
        status = 200 if report.get("status") == "ok" else 503
        body = json.dumps(report, separators=(",", ":")).encode()
        await self._respond(
            send, status, body, request_id, [(b"content-type", b"application/json")]
        )


def create_app(
    data_dir: Path | None = None,
    task_interval: float = DEFAULT_TASK_INTERVAL,
    log_level: str = "warning",
    console: bool = False,
) -> KmsApp:
    """The application for one worker (uvicorn factory). Settings come from the environment
    (``HSMKMS_*``); ``data_dir`` overrides ``HSMKMS_DATA_DIR``. Logging is set up as for every
    entry point (:func:`hsmkms.log.configure_logging`), at ``log_level``."""
    from hsmkms.api.runtime import Runtime
    from hsmkms.config import Settings
    from hsmkms.log import configure_logging

    configure_logging(log_level)
    settings = Settings.load(data_dir)
    return KmsApp(lambda: Runtime.open(settings), task_interval=task_interval, console=console)
