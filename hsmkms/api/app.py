"""The ASGI application: AWS KMS JSON 1.1 over HTTP with SigV4 on every request.

Routes::

    POST /          a KMS operation (X-Amz-Target), SigV4-authenticated
    GET  /healthz   deep health check, unauthenticated: 200 or 503
    GET  /metrics   Prometheus text, unauthenticated
    /console/...    the read-only web console, with ``console=True`` (hsmkms.api.console)

Every response carries ``x-amzn-RequestId`` (a UUID) and ``x-hsmkms-worker`` (the pid of the
worker that answered). Operations are dispatched generically through their descriptors
(:data:`hsmkms.service.OPERATIONS`), so a new operation needs no change here.

Audit: every authenticated ``POST /`` — allowed or denied, successful or failed — produces
exactly one audit record (:func:`hsmkms.audit.prepare_api_call`), and its answer is
sent only once the record is committed (:meth:`Backend.commit_audit`: group commit with the
records of the other requests waiting). While the trail cannot be written, a request is
refused at once (:meth:`Backend.check_audit`: 503 naming the cause) before anything is done;
a request whose record then fails to commit is answered with that error instead of its
result. ``/healthz``, ``/metrics`` and requests to other paths or with other methods are not
audited (``docs/audit.md``). A request that did not authenticate gets its own record only
while its source's budget lasts; beyond it, it is counted into a summary record per source
and interval (:mod:`hsmkms.api.unauthenticated`), so a flood cannot fill the disk.

Security: the client address (``aws:SourceIp``, ``sourceIPAddress``) is the connection's peer,
an IPv4-mapped IPv6 address (a server on ``::``) written as IPv4; the request must sign
``Content-Type`` and every ``X-Amz-*`` header (:data:`sigv4.KMS_SIGNED_HEADER_RULE`); a
signature of a request that changes state is accepted once per node when the operator turns
that on (``HSMKMS_REFUSE_REPLAYS``; all operations but
:data:`~hsmkms.service.operations.REPLAYABLE_OPERATIONS`; :meth:`Backend.first_use`,
``docs/authentication.md``).

Execution model (``docs/http-api.md``): service calls are synchronous. The cryptographic
operations (whose descriptor says ``inline``, :mod:`hsmkms.service.operations`) run inline on
the event loop: they take a fraction of a millisecond, PKCS#11 calls are serialized per process
anyway, and a thread hop would cost as much as the work. Everything else (key administration,
which writes the database and may wait on SQLite's write lock) runs on one worker thread, so a
slow write does not stall the crypto fast path. ``/healthz`` and ``/metrics`` run on threads of
their own and answer within :data:`HEALTH_TIMEOUT` whatever the token or the admin thread do.

A body over the limit is read and discarded (up to :data:`DRAIN_LIMIT` bytes, for at most
:data:`DRAIN_SECONDS`) before the 400 is sent with ``Connection: close``, so a client still
sending sees the answer rather than a reset connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import ipaddress
import json
import logging
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

from hsmkms import sigv4
from hsmkms.api import protocol
from hsmkms.api.metrics import NO_OPERATION, exposition, observe_request
from hsmkms.api.unauthenticated import UnauthenticatedRecords
from hsmkms.api.xks import XKS_PATH, XksFrontDoor
from hsmkms.audit import (
    AuditRecord,
    PreparedRecord,
    UserIdentity,
    prepare_api_call,
    unauthenticated_summary_record,
)
from hsmkms.errors import (
    InvalidSignatureException,
    KMSError,
    KMSInternalException,
    UnknownOperationException,
    UnsupportedOperationException,
    caller_error_fields,
)
from hsmkms.identity.xks import XksCredentialStore
from hsmkms.policy import account_of
from hsmkms.service import OPERATIONS
from hsmkms.service.blocking import MustLeaveTheEventLoop, on_event_loop
from hsmkms.service.operations import ALL_OPERATIONS, REPLAYABLE_OPERATIONS
from hsmkms.types import Caller

__all__ = ["UNKNOWN_EVENT_NAME", "Backend", "KmsApp", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_TASK_INTERVAL = 60.0
HEALTH_TIMEOUT = 1.0
"""Seconds ``/healthz`` waits for its checks before answering 503 without them."""
DRAIN_LIMIT = 16 << 20
"""How much of an oversized body is read and discarded before the 400 is sent (beyond it, the
answer goes out and the connection is closed while the client may still be sending)."""
DRAIN_SECONDS = 10.0
"""How long draining an oversized body may take."""
_FAULT_LOG_EVERY = 10.0

UNKNOWN_EVENT_NAME = "UnknownOperation"
"""The ``eventName`` of a request whose ``X-Amz-Target`` is missing or is not
``TrentService.<Name>`` with a plausible operation name (letters and digits, at most 64)."""

_TARGET_NAME = re.compile(r"TrentService\.([A-Za-z][A-Za-z0-9]{0,63})")
# An access key id as AWS shapes them (uppercase letters and digits): only such a value from an
# unverified Authorization header goes into a record, so a secret pasted there by mistake never
# does.
_CLAIMED_KEY = re.compile(r"Credential=([A-Z0-9]{16,128})/")
_MAX_USER_AGENT = 1024
DEFAULT_UNAUTHENTICATED_INTERVAL = 60.0
REPLAY_MESSAGE = (
    "This request was received before: a request that changes state is accepted once per "
    "signature. Sign it again to repeat it."
)

log = structlog.get_logger(__name__)
access_log = structlog.get_logger("hsmkms.access")
_ROOT = logging.getLogger()

# Every operation of the AWS KMS API: one this service does not implement is recognised (AWS
# knows it) and answered UnsupportedOperationException, not UnknownOperationException.
_API_OPERATIONS = frozenset(name for name, op in ALL_OPERATIONS.items() if op.api)

_PID = str(os.getpid()).encode()
_JSON_HEADERS = [(b"content-type", protocol.CONTENT_TYPE.encode())]


class _BodyTooLarge(Exception):
    pass


class _Replayed(Exception):
    """The signature of a request that changes state was accepted before on this node."""


def _failure_code(failure: BaseException | None) -> str:
    if isinstance(failure, KMSError):
        return failure.code
    return "KMSInternalException" if failure is not None else "OK"


_fault_logged: dict[str, tuple[float, int]] = {}


def _log_fault(exc: KMSError, operation: str, request_id: str) -> None:
    """Log a server fault: every one, except faults whose cause the caller is told (a full
    disk, the token away), which come in floods while they last — at most one line per cause
    every few seconds, with the number of requests it stands for."""
    fields: dict[str, Any] = {
        "operation": operation, "request_id": request_id, "error": type(exc).__name__,
        "detail": exc.message,
    }  # fmt: skip
    if exc.shows_cause:
        now = time.monotonic()
        since, count = _fault_logged.get(exc.message, (0.0, 0))
        if now - since < _FAULT_LOG_EVERY:
            _fault_logged[exc.message] = (since, count + 1)
            return
        _fault_logged[exc.message] = (now, 0)
        fields["requests_since_last_line"] = count
    log.error("server_fault", **fields)


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

    def first_use(self, signature: str) -> bool:
        """Record the signature of a request that changes state; False when this node accepted
        it already within the signature's window (a replay)."""

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Write one audit record, returning once it is committed (a thread); a
        :class:`KMSError` when it cannot be."""

    async def commit_audit(self, record: AuditRecord | PreparedRecord, *, retain: bool) -> None:
        """Write one audit record without blocking the event loop, returning once it is
        committed; a :class:`KMSError` when it cannot be. ``retain``: the call may have
        changed state (keep the record if its batch fails)."""

    def check_audit(self) -> None:
        """Raise at once (503 naming the cause) while the audit trail cannot be written."""

    @property
    def keystore(self) -> Any:
        """The default keystore (the XKS health check reads its token's description)."""

    @property
    def xks_credentials(self) -> XksCredentialStore:
        """The XKS proxy credentials (the XKS front door's SigV4 lookup and routing)."""

    def warm_up(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def run_due_tasks(self) -> object: ...

    def close(self) -> None: ...


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


@functools.lru_cache(maxsize=4096)
def client_address(host: str) -> str:
    """The client's address as policies and the audit trail see it: an IPv4-mapped IPv6
    address (``::ffff:192.0.2.1``, how a server on ``::`` sees an IPv4 client) as the IPv4
    address, so that IPv4 ``aws:SourceIp`` conditions (an IP deny list) apply to it."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return host


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client_address(client[0]) if client else None


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
        unauthenticated_interval: float = DEFAULT_UNAUTHENTICATED_INTERVAL,
        refuse_replays: bool = False,
        console: bool = False,
    ) -> None:
        self._factory = runtime_factory
        self._runtime: Backend | None = None
        self._max_body = max_body
        self._task_interval = task_interval
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hsmkms")
        # Inline operations that must not block the loop (hsmkms.service.blocking).
        self._blocking_executor = concurrent.futures.ThreadPoolExecutor(
            8, thread_name_prefix="hsmkms-blocking"
        )
        # /healthz and /metrics: never behind admin operations or the token.
        self._internal_executor = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="hsmkms-internal"
        )
        self._tasks: asyncio.Task[None] | None = None
        self._unauthenticated = UnauthenticatedRecords(
            interval=unauthenticated_interval, clock=time.time
        )
        self._summaries: asyncio.Task[None] | None = None
        self._summary_interval = unauthenticated_interval
        self._refuse_replays = refuse_replays
        self._xks = XksFrontDoor(self)
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
                self._summaries = asyncio.create_task(self._write_summaries())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._tasks is not None:
                    self._tasks.cancel()
                if self._summaries is not None:
                    self._summaries.cancel()
                loop = asyncio.get_running_loop()
                self._blocking_executor.shutdown(wait=True)
                if self._runtime is not None:
                    await self._audit_summaries(self._unauthenticated.drain())
                    await loop.run_in_executor(self._executor, self._runtime.close)
                self._executor.shutdown(wait=True)
                self._internal_executor.shutdown(wait=False, cancel_futures=True)
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

    async def _write_summaries(self) -> None:
        """Write the summary records of unauthenticated requests as their intervals end."""
        while True:
            await asyncio.sleep(self._summary_interval / 2)
            await self._audit_summaries(self._unauthenticated.due())

    async def _audit_summaries(self, summaries: list[Any]) -> None:
        runtime = self.runtime
        for summary in summaries:
            record = unauthenticated_summary_record(
                account_id=runtime.account_id,
                region=runtime.region,
                source_ip=summary.source,
                count=summary.count,
                first=dt.datetime.fromtimestamp(summary.first, dt.UTC),
                last=dt.datetime.fromtimestamp(summary.last, dt.UTC),
                error_codes=summary.error_codes,
            )
            try:
                await runtime.commit_audit(record, retain=True)
            except Exception as exc:
                log.error(
                    "audit_summary_failed",
                    source=summary.source,
                    requests=summary.count,
                    error=type(exc).__name__,
                )

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
            if int(declared) <= DRAIN_LIMIT:
                await _drain(receive, 0)
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if chunk:
                size += len(chunk)
                if size > self._max_body:
                    if more:
                        await _drain(receive, size)
                    raise _BodyTooLarge
                chunks.append(chunk)
            if not more:
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4())
        path = scope["path"]
        method = scope["method"]
        if path == "/healthz" or path == "/metrics":
            began = time.perf_counter()
            status = await self._internal(path, method, send, request_id)
            # Probes and scrapes come every few seconds: their lines are debug.
            if _ROOT.isEnabledFor(logging.DEBUG):
                _access_line(logging.DEBUG, scope, request_id, status, began, path=path)
            return
        if self._console is not None and (path == "/console" or path.startswith("/console/")):
            if not _ROOT.isEnabledFor(logging.INFO):
                await self._console(scope, receive, send)
                return
            began, answered = time.perf_counter(), [0]

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    answered[0] = int(message["status"])
                await send(message)

            await self._console(scope, receive, sending)
            _access_line(logging.INFO, scope, request_id, answered[0], began, path=path)
            return
        xks = XKS_PATH.fullmatch(path) if path != "/" else None
        if xks is not None:  # the XKS proxy API (hsmkms.api.xks)
            began = time.perf_counter()
            status = await self._xks.handle(scope, receive, send, request_id, xks)
            if _ROOT.isEnabledFor(logging.INFO):
                _access_line(logging.INFO, scope, request_id, status, began, path=path)
            return
        if path != "/" or method != "POST":
            began = time.perf_counter()
            if path != "/":
                exc: KMSError = UnknownOperationException(
                    "hsmkms serves the KMS API at / (POST), /healthz and /metrics."
                )
                status, headers = 404, None
            else:
                exc = UnknownOperationException("The KMS API takes POST requests at /.")
                status, headers = 405, [*_JSON_HEADERS, (b"allow", b"POST")]
            _, body = protocol.encode_error(exc)
            await self._respond(send, status, body, request_id, headers)
            if _ROOT.isEnabledFor(logging.INFO):
                _access_line(logging.INFO, scope, request_id, status, began, path=path)
            return
        start = time.perf_counter()
        operation = NO_OPERATION
        target = _header(scope, b"x-amz-target")
        caller: Caller | None = None
        request: BaseModel | None = None
        response: BaseModel | None = None
        failure: BaseException | None = None
        payload = b""
        refused = False  # the audit trail cannot be written: nothing done, nothing recorded
        extra_headers: list[tuple[bytes, bytes]] = []
        try:
            try:
                body = await self._read_body(scope, receive)
            except _BodyTooLarge:
                extra_headers.append((b"connection", b"close"))
                raise protocol.oversize_error(self._max_body) from None
            try:
                self.runtime.check_audit()
            except KMSError:
                refused = True
                raise
            caller, signed = self._authenticate(scope, body, request_id)
            operation = protocol.operation_name(target, _API_OPERATIONS)
            protocol.check_content_type(_header(scope, b"content-type"))
            op = OPERATIONS.get(operation)
            if op is None:
                raise UnsupportedOperationException(f"hsmkms does not support {operation}.")
            assert op.request_model is not None  # OPERATIONS holds implemented ones only
            request = protocol.decode_request(op.request_model, body)
            method_fn = getattr(self.runtime.service, op.worker)
            once = self._refuse_replays and op.name not in REPLAYABLE_OPERATIONS
            if op.inline and not once:
                try:
                    with on_event_loop():
                        result = method_fn(request, caller=caller)
                except MustLeaveTheEventLoop:
                    # An XKS proxy call or a custom key store's token to open: again, on a
                    # thread of their own, neither behind admin operations nor on the loop.
                    loop = asyncio.get_running_loop()
                    run = functools.partial(method_fn, request, caller=caller)
                    result = await loop.run_in_executor(self._blocking_executor, run)
            else:
                loop = asyncio.get_running_loop()
                run = functools.partial(method_fn, request, caller=caller)
                if once:
                    run = functools.partial(self._once, sigv4.signature_of(signed), run)
                try:
                    result = await loop.run_in_executor(self._executor, run)
                except _Replayed:
                    # Recorded like a request that did not authenticate: a replay flood is
                    # counted, not recorded request by request.
                    caller = None
                    raise InvalidSignatureException(REPLAY_MESSAGE) from None
            payload = protocol.encode_response(result)
            response = result
        except KMSError as exc:
            if exc.status >= 500:
                # The caller sees no detail (unless the fault names its cause, a full disk or
                # the token away); the operator gets the class and message.
                _log_fault(exc, operation, request_id)
            failure = exc
        except Exception as exc:
            log.exception("request_failed", operation=operation, request_id=request_id)
            failure = exc
        try:
            if not refused:
                name = operation if operation != NO_OPERATION else _event_name(target)
                if caller is not None or self._unauthenticated.admit(
                    _peer(scope), _failure_code(failure)
                ):
                    record = self._record(
                        scope, name, request_id, caller, request, response, failure
                    )
                    descriptor = ALL_OPERATIONS.get(name)
                    retain = descriptor is None or not descriptor.read_only
                    # The answer leaves only once its record is committed (group commit).
                    await self.runtime.commit_audit(record, retain=retain)
                else:
                    await self._audit_summaries(self._unauthenticated.due())
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
        headers = [*_JSON_HEADERS, *extra_headers] if extra_headers else _JSON_HEADERS
        await self._respond(send, status, answer, request_id, headers)
        # The access line is written after the answer left: it adds nothing to its latency.
        if _ROOT.isEnabledFor(logging.INFO):
            _access_line(
                logging.INFO,
                scope,
                request_id,
                status,
                start,
                operation=operation if operation != NO_OPERATION else _event_name(target),
                code=code,
                caller=caller,
            )

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
            if caller.custom_key_store_id is not None:
                extra = {**(extra or {}), "customKeyStoreId": caller.custom_key_store_id}
        else:
            identity = _unknown_identity(scope)
            source_ip = _peer(scope)
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

    def _once(self, signature: str | None, run: Callable[[], Any]) -> Any:
        """``run()`` unless this node accepted ``signature`` before (a replay: _Replayed)."""
        if signature is None or not self.runtime.first_use(signature):
            raise _Replayed
        return run()

    def _authenticate(
        self, scope: Scope, body: bytes, request_id: str
    ) -> tuple[Caller, sigv4.SignedRequest]:
        """SigV4-verify the request; the caller (identity, identity policy, origin) and the
        request as verified (its signature is taken only when the replay check needs it)."""
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
            signed_header_rule=sigv4.KMS_SIGNED_HEADER_RULE,
        )
        caller = Caller(
            principal_arn=credential.principal_arn,
            account_id=account_of(credential.principal_arn),
            identity_policy=credential.identity_policy,
            access_key_id=credential.access_key_id,
            source_ip=_peer(scope),
            secure_transport=scope.get("scheme") == "https",
            user_agent=_header(scope, b"user-agent"),
            request_id=request_id,
        )
        return caller, request

    async def _internal(self, path: str, method: str, send: Send, request_id: str) -> int:
        """Answer ``/healthz`` or ``/metrics``; the status sent."""
        if method not in ("GET", "HEAD"):
            exc = UnknownOperationException(f"{path} takes GET requests.")
            _, body = protocol.encode_error(exc)
            await self._respond(send, 405, body, request_id, [*_JSON_HEADERS, (b"allow", b"GET")])
            return 405
        loop = asyncio.get_running_loop()
        if path == "/metrics":
            text = await loop.run_in_executor(self._internal_executor, exposition)
            headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
            await self._respond(send, 200, text, request_id, headers)
            return 200
        try:
            report = await asyncio.wait_for(
                loop.run_in_executor(self._internal_executor, self.runtime.health),
                HEALTH_TIMEOUT,
            )
        except TimeoutError:
            report = {
                "status": "fail",
                "error": f"the health checks did not finish within {HEALTH_TIMEOUT:g} s",
            }
        except Exception as exc:  # the check itself failed
            report = {"status": "fail", "error": type(exc).__name__}
        status = 200 if report.get("status") == "ok" else 503
        body = json.dumps(report, separators=(",", ":")).encode()
        await self._respond(
            send, status, body, request_id, [(b"content-type", b"application/json")]
        )
        return status


def _access_line(
    level: int,
    scope: Scope,
    request_id: str,
    status: int,
    began: float,
    *,
    path: str | None = None,
    operation: str | None = None,
    code: str | None = None,
    caller: Caller | None = None,
) -> None:
    """The access log line of one request (event ``request``): who asked for what and how it
    ended — request id, operation (or method and path), HTTP status, error code, latency,
    principal and access key id, client address. Never a body, a header or a secret."""
    client = scope.get("client")
    fields: dict[str, Any] = {
        "request_id": request_id,
        "status": status,
        "latency_ms": round((time.perf_counter() - began) * 1000, 3),
        "source_ip": client[0] if client else None,
    }
    if operation is not None:
        fields["operation"] = operation
        fields["code"] = code
        fields["principal"] = caller.principal_arn if caller is not None else None
        fields["access_key_id"] = caller.access_key_id if caller is not None else None
    else:
        fields["method"] = scope.get("method")
        fields["path"] = path
    if level == logging.DEBUG:
        access_log.debug("request", **fields)
    else:
        access_log.info("request", **fields)


async def _drain(receive: Receive, received: int) -> None:
    """Read and discard the rest of an oversized body (up to :data:`DRAIN_LIMIT` bytes in
    all, for at most :data:`DRAIN_SECONDS`), so that the client, still sending, reads the
    answer instead of a reset connection."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while received <= DRAIN_LIMIT:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            return
        if message["type"] == "http.disconnect":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def create_app(
    data_dir: Path | None = None,
    task_interval: float = DEFAULT_TASK_INTERVAL,
    log_level: str = "warning",
    console: bool = False,
    log_format: str | None = None,
) -> KmsApp:
    """The application for one worker (uvicorn factory). Settings come from the environment
    (``HSMKMS_*``); ``data_dir`` overrides ``HSMKMS_DATA_DIR``. Logging is set up as for every
    entry point (:func:`hsmkms.log.configure_logging`), at ``log_level``, in ``log_format``."""
    import faulthandler

    from hsmkms.api.metrics import reserve_files
    from hsmkms.api.runtime import Runtime
    from hsmkms.config import Settings
    from hsmkms.log import configure_logging

    # A worker killed by a fatal signal (SIGSEGV, SIGBUS) prints where, for the operator.
    faulthandler.enable()
    configure_logging(log_level, fmt=log_format)
    reserve_files()
    settings = Settings.load(data_dir)
    return KmsApp(
        lambda: Runtime.open(settings),
        task_interval=task_interval,
        unauthenticated_interval=settings.unauthenticated_audit_interval,
        refuse_replays=settings.refuse_replays,
        console=console,
    )
