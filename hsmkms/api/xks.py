"""The XKS proxy API front door: hsmkms as an external key manager for AWS KMS
(``docs/key-stores.md``; architecture decision 17: another front door, not another core).

Routes, all POST, under ``/<prefix>/kms/xks/v1`` for each prefix that holds an XKS proxy
credential (``hsmkms xks credentials create --prefix PREFIX``)::

    /keys/{externalKeyId}/metadata   GetKeyMetadata
    /keys/{externalKeyId}/encrypt    Encrypt (AES_GCM)
    /keys/{externalKeyId}/decrypt    Decrypt
    /health                          GetHealthStatus (a real operation in the token)

An unknown prefix or route is 404 ``InvalidUriPathException``; another method 405. Requests
are SigV4-signed for the service ``kms-xks-proxy`` and the server's region, verified by the
same :func:`hsmkms.sigv4.verify` as the KMS API with the XKS rule (``host`` and
``x-amz-date`` signed, whatever else the request's SignedHeaders name is honoured), by a
credential of the path's prefix; anything else is 401 ``AuthenticationFailedException``.
When the prefix has a secondary authorization policy (``hsmkms xks policy put``), a request
it does not allow is 403 ``AccessDeniedException`` (health is exempt). The external key id is
an hsmkms key id; the operations are
:class:`hsmkms.service.xks.XksOperations`.

Answers are compact one-line JSON; errors ``{"errorName": ..., "errorMessage": ...}`` with
the spec's HTTP status (:func:`xks_error`). Every authenticated call is recorded in the audit
trail (``eventSource`` ``kms-xks-proxy.hsmkms``; the XKS access key id as the identity;
``requestMetadata`` flattened into ``requestParameters``; never plaintext, ciphertext or AAD)
before its answer leaves, as for the KMS API. A request that did not authenticate is recorded
within its source's budget, as there. Answered calls are counted in ``/metrics`` like the KMS
API's, with the operation label ``xks:<operation>`` (``xks:Encrypt``, ``xks:GetHealthStatus``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog

from hsmkms import __version__, sigv4
from hsmkms.api.metrics import observe_request
from hsmkms.audit import PreparedRecord, UserIdentity, prepare_api_call
from hsmkms.errors import (
    AccessDeniedException,
    DependencyTimeoutException,
    DisabledException,
    IncompleteSignatureException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidSignatureException,
    KMSError,
    KMSInvalidStateException,
    MissingAuthenticationTokenException,
    NotFoundException,
    UnrecognizedClientException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.types import Caller

if TYPE_CHECKING:
    from hsmkms.api.app import KmsApp, Receive, Scope, Send

__all__ = ["SERVICE", "XKS_PATH", "XksFrontDoor", "xks_error"]

log = structlog.get_logger(__name__)

SERVICE: Final = "kms-xks-proxy"
"""The SigV4 service name of the XKS proxy API."""
XKS_PATH: Final = re.compile(r"/(?P<prefix>[A-Za-z0-9/_-]{1,128}?)/kms/xks/v1(?P<rest>/.*)?")
"""A path of the XKS proxy API: the prefix, and the route below ``/kms/xks/v1``."""
# spec: XKS proxy API — externalKeyId is 1-128 of [A-Za-z0-9._-].
_ROUTE: Final = re.compile(r"/keys/(?P<key>[A-Za-z0-9._-]{1,128})/(?P<op>metadata|encrypt|decrypt)")
_OPERATIONS: Final = {"metadata": "GetKeyMetadata", "encrypt": "Encrypt", "decrypt": "Decrypt"}
EVENT_SOURCE: Final = "kms-xks-proxy.hsmkms"
MAX_PLAINTEXT: Final = 65_536
"""The largest plaintext (and ciphertext) handled: the spec asks for 4,300 bytes; above it,
UnsupportedOperationException (spec: also for input above the implemented size)."""
MAX_AAD: Final = 0xFFFF
_XKS_RULE: Final = sigv4.require_signed(headers=("x-amz-date",))
_JSON: Final = [(b"content-type", b"application/json")]
_MAX_MESSAGE: Final = 500
_UNPRINTABLE: Final = re.compile(r"[^\x20-\x7e]")
# spec: XKS proxy API requestMetadata — required members per operation.
_REQUIRED_METADATA: Final = {
    "GetKeyMetadata": ("awsPrincipalArn", "kmsOperation", "kmsRequestId"),
    "Encrypt": ("awsPrincipalArn", "kmsOperation", "kmsRequestId", "kmsKeyArn"),
    "Decrypt": ("awsPrincipalArn", "kmsOperation", "kmsRequestId", "kmsKeyArn"),
    "GetHealthStatus": ("kmsOperation", "kmsRequestId"),
}
_RECORDED_METADATA: Final = (
    "kmsRequestId",
    "kmsOperation",
    "awsPrincipalArn",
    "kmsKeyArn",
    "kmsViaService",
    "awsSourceVpc",
    "awsSourceVpce",
)
_CLAIMED_KEY: Final = re.compile(r"Credential=([A-Z2-7]{20,30})/")


class AuthenticationFailedException(KMSError):
    code = "AuthenticationFailedException"
    status = 401


class InvalidUriPathException(KMSError):
    code = "InvalidUriPathException"
    status = 404


# (errorName, HTTP status) of the KMS errors the service raises; the first match wins.
_ERRORS: Final[tuple[tuple[type[Exception], str, int], ...]] = (
    (AuthenticationFailedException, "AuthenticationFailedException", 401),
    (InvalidUriPathException, "InvalidUriPathException", 404),
    (NotFoundException, "KeyNotFoundException", 404),
    (DisabledException, "InvalidStateException", 400),
    (KMSInvalidStateException, "InvalidStateException", 400),
    (InvalidCiphertextException, "InvalidCiphertextException", 400),
    (InvalidKeyUsageException, "InvalidKeyUsageException", 400),
    (AccessDeniedException, "AccessDeniedException", 403),
    (UnsupportedOperationException, "UnsupportedOperationException", 501),
    (DependencyTimeoutException, "DependencyTimeoutException", 503),
)
_AUTH_ERRORS: Final = (
    MissingAuthenticationTokenException,
    IncompleteSignatureException,
    UnrecognizedClientException,
    InvalidSignatureException,
)


def xks_error(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, errorName, errorMessage) of an error, as the XKS proxy API names it: a
    client mistake carries its message (printable ASCII, under 512 characters); a fault says
    nothing of its cause."""
    if isinstance(exc, _AUTH_ERRORS):
        exc = AuthenticationFailedException(exc.message)
    found = next(((n, st) for kind, n, st in _ERRORS if isinstance(exc, kind)), None)
    if found is not None:
        name, status = found
    elif isinstance(exc, KMSError) and exc.status < 500:
        name, status = "ValidationException", 400
    else:
        name, status = "InternalException", 500
    if status >= 500 and not (isinstance(exc, KMSError) and exc.shows_cause):
        message = "The XKS proxy could not complete the request."
    else:
        message = exc.message if isinstance(exc, KMSError) and exc.message else name
    message = _UNPRINTABLE.sub("?", message)[:_MAX_MESSAGE]
    return status, name, message


def _error_body(exc: BaseException) -> tuple[int, bytes]:
    status, name, message = xks_error(exc)
    body = json.dumps({"errorName": name, "errorMessage": message}, separators=(",", ":"))
    return status, body.encode()


def _b64(value: Any, member: str, *, required: bool) -> bytes:
    """A base64 member (empty when absent and not required)."""
    if value is None:
        if required:
            raise ValidationException(f"{member} is required.")
        return b""
    if not isinstance(value, str):
        raise ValidationException(f"{member} must be a base64 string.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationException(f"{member} is not valid base64.") from None


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _metadata(body: Mapping[str, Any], operation: str) -> dict[str, str]:
    """The request's ``requestMetadata``: an object with the operation's required members as
    strings (unknown members and kmsOperation values tolerated)."""
    found = body.get("requestMetadata")
    if not isinstance(found, dict):
        raise ValidationException("requestMetadata is required and must be an object.")
    for member in _REQUIRED_METADATA[operation]:
        value = found.get(member)
        if not isinstance(value, str) or not value:
            raise ValidationException(f"requestMetadata.{member} is required.")
    return {k: v for k, v in found.items() if k in _RECORDED_METADATA and isinstance(v, str)}


def _algorithm(body: Mapping[str, Any]) -> None:
    algorithm = body.get("encryptionAlgorithm")
    if algorithm is None:
        raise ValidationException("encryptionAlgorithm is required.")
    if algorithm != "AES_GCM":
        raise UnsupportedOperationException("encryptionAlgorithm must be AES_GCM.")


def _sized(data: bytes, member: str, most: int) -> bytes:
    if len(data) > most:
        raise UnsupportedOperationException(f"{member} longer than {most} bytes is not supported.")
    return data


def _check_integrity_algorithm(value: Any) -> bool:
    if value is None:
        return False
    if value != "SHA_256":
        raise ValidationException("ciphertextDataIntegrityValueAlgorithm must be SHA_256.")
    return True


class XksFrontDoor:
    """The XKS proxy API inside :class:`~hsmkms.api.app.KmsApp` (which owns the runtime, the
    audit path and the HTTP plumbing this uses)."""

    def __init__(self, app: KmsApp) -> None:
        self._app = app

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, match: re.Match[str]
    ) -> int:
        """Answer one request to an XKS path; the HTTP status sent."""
        app = self._app
        runtime = app.runtime
        prefix, rest = match.group("prefix"), match.group("rest") or ""
        route = _ROUTE.fullmatch(rest)
        if not runtime.xks_credentials.has_prefix(prefix) or (route is None and rest != "/health"):
            return await self._answer(send, request_id, InvalidUriPathException(
                "No XKS proxy API route has this path."
            ))  # fmt: skip
        if scope["method"] != "POST":
            body = json.dumps(
                {
                    "errorName": "ValidationException",
                    "errorMessage": "Method not allowed: use POST.",
                },
                separators=(",", ":"),
            ).encode()
            await app._respond(send, 405, body, request_id, [*_JSON, (b"allow", b"POST")])
            return 405
        began = time.perf_counter()
        operation = "GetHealthStatus" if route is None else _OPERATIONS[route.group("op")]
        key_id = None if route is None else route.group("key")
        caller: Caller | None = None
        params: dict[str, Any] = {} if key_id is None else {"ExternalKeyId": key_id}
        extra: dict[str, Any] | None = None
        failure: BaseException | None = None
        answer: dict[str, Any] | None = None
        refused = False
        try:
            body = await app._read_body(scope, receive)
            try:
                runtime.check_audit()
            except KMSError:
                refused = True
                raise
            caller = self._authenticate(scope, body, prefix)
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise ValidationException("The request body is not JSON.") from None
            if not isinstance(request, dict):
                raise ValidationException("The request body must be a JSON object.")
            metadata = _metadata(request, operation)
            params.update({k[0].upper() + k[1:]: v for k, v in metadata.items()})
            if operation != "GetHealthStatus":  # spec: health is exempt
                runtime.xks_credentials.authorize(prefix, operation, metadata)
            answer, version = self._run(operation, key_id, request, caller, params)
            if version is not None:
                extra = {"keyVersion": version}
        except Exception as exc:
            if not isinstance(exc, KMSError):
                log.exception("xks_request_failed", operation=operation, request_id=request_id)
            elif exc.status >= 500:
                log.error("xks_request_failed", operation=operation, request_id=request_id,
                          error=type(exc).__name__)  # fmt: skip
            failure = exc
        try:
            if not refused and (
                caller is not None or app._unauthenticated.admit(_peer(scope), _code(failure))
            ):
                record = self._record(scope, operation, request_id, caller, params, failure, extra)
                await runtime.commit_audit(record, retain=False)
        except Exception as exc:
            # No record, no result: the caller gets the error instead of an unaudited answer.
            log.error("audit_failed", operation=operation, request_id=request_id,
                      error=type(exc).__name__)  # fmt: skip
            failure = exc
        observe_request(f"xks:{operation}", _code(failure), time.perf_counter() - began)
        if failure is not None:
            return await self._answer(send, request_id, failure)
        payload = json.dumps(answer, separators=(",", ":")).encode()
        await app._respond(send, 200, payload, request_id, _JSON)
        return 200

    async def _answer(self, send: Send, request_id: str, exc: BaseException) -> int:
        status, body = _error_body(exc)
        await self._app._respond(send, status, body, request_id, _JSON)
        return status

    def _authenticate(self, scope: Scope, body: bytes, prefix: str) -> Caller:
        """SigV4 (service kms-xks-proxy) by a credential of ``prefix``; the XKS caller."""
        runtime = self._app.runtime
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        request = sigv4.SignedRequest(
            method=scope["method"],
            path=path,
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=body,
        )
        store = runtime.xks_credentials

        def lookup(access_key_id: str) -> sigv4.Credential | None:
            found = store.lookup(access_key_id)
            # A credential of another prefix does not open this one.
            return found.credential if found is not None and found.prefix == prefix else None

        credential = sigv4.verify(
            request,
            lookup,
            region=runtime.region,
            service=SERVICE,
            now=dt.datetime.now(dt.UTC),
            signed_header_rule=_XKS_RULE,
        )
        return Caller(
            principal_arn=credential.principal_arn,
            account_id=runtime.account_id,
            access_key_id=credential.access_key_id,
            source_ip=_peer(scope),
            secure_transport=scope.get("scheme") == "https",
            user_agent=_header(scope, b"user-agent"),
        )

    def _run(
        self,
        operation: str,
        key_id: str | None,
        request: Mapping[str, Any],
        caller: Caller,
        params: dict[str, Any],
    ) -> tuple[dict[str, Any], int | None]:
        """Run one operation; its answer and the key version used (None: none)."""
        runtime = self._app.runtime
        service = runtime.service
        if operation == "GetHealthStatus":
            return self._health(), None
        assert key_id is not None
        if operation == "GetKeyMetadata":
            meta = service.xks_metadata(key_id, caller)
            answer = {
                "keySpec": meta.key_spec,
                "keyUsage": list(meta.key_usage),
                "keyStatus": meta.key_status,
            }
            return answer, None
        _algorithm(request)
        params["EncryptionAlgorithm"] = "AES_GCM"
        aad = _b64(request.get("additionalAuthenticatedData"), "additionalAuthenticatedData",
                   required=False)  # fmt: skip
        _sized(aad, "additionalAuthenticatedData", MAX_AAD)
        if operation == "Encrypt":
            plaintext = _b64(request.get("plaintext"), "plaintext", required=True)
            _sized(plaintext, "plaintext", MAX_PLAINTEXT)
            integrity = _check_integrity_algorithm(
                request.get("ciphertextDataIntegrityValueAlgorithm")
            )
            if integrity:
                params["CiphertextDataIntegrityValueAlgorithm"] = "SHA_256"
            sealed = service.xks_encrypt(key_id, plaintext, aad, caller)
            answer = {
                "authenticationTag": _b64e(sealed.tag),
                "ciphertext": _b64e(sealed.ciphertext),
                "ciphertextMetadata": _b64e(sealed.metadata),
                "initializationVector": _b64e(sealed.iv),
            }
            if integrity:
                # spec: SHA-256(AAD || metadata || IV || ciphertext || tag).
                digest = hashlib.sha256(
                    aad + sealed.metadata + sealed.iv + sealed.ciphertext + sealed.tag
                ).digest()
                answer["ciphertextDataIntegrityValue"] = _b64e(digest)
            return answer, sealed.version
        ciphertext = _b64(request.get("ciphertext"), "ciphertext", required=True)
        iv = _b64(request.get("initializationVector"), "initializationVector", required=True)
        tag = _b64(request.get("authenticationTag"), "authenticationTag", required=True)
        md = _b64(request.get("ciphertextMetadata"), "ciphertextMetadata", required=False)
        _sized(ciphertext, "ciphertext", MAX_PLAINTEXT)
        plaintext = service.xks_decrypt(key_id, ciphertext, iv, tag, aad, md, caller)
        versions = [v for v in caller.keys_used.values() if v is not None]
        return {"plaintext": _b64e(plaintext)}, versions[0] if len(versions) == 1 else None

    def _health(self) -> dict[str, Any]:
        """GetHealthStatus: a real operation in the token (seal and open a probe)."""
        runtime = self._app.runtime
        began = time.perf_counter()
        try:
            runtime.xks_credentials.self_test()
            status = "ACTIVE"
        except KMSError as exc:
            log.warning("xks_health_failed", error=type(exc).__name__)
            status = "UNAVAILABLE"
        took = time.perf_counter() - began
        log.debug("xks_health", status=status, seconds=round(took, 6))
        info = runtime.keystore.info()
        return {
            "xksProxyFleetSize": 1,
            "xksProxyVendor": "hsmkms",
            "xksProxyModel": f"hsmkms {__version__}",
            "ekmVendor": info.manufacturer or "PKCS#11 token",
            "ekmFleetDetails": [
                {"id": info.serial or info.label or "token", "model": info.model or "PKCS#11",
                 "healthStatus": status}
            ],
        }  # fmt: skip

    def _record(
        self,
        scope: Scope,
        operation: str,
        request_id: str,
        caller: Caller | None,
        params: Mapping[str, Any],
        failure: BaseException | None,
        extra: Mapping[str, Any] | None,
    ) -> PreparedRecord:
        runtime = self._app.runtime
        if caller is not None:
            identity = UserIdentity(
                "XksProxyCredential",
                principal_id=caller.principal_arn,
                access_key_id=caller.access_key_id,
                account_id=runtime.account_id,
            )
            source_ip, user_agent, keys = (
                caller.source_ip,
                caller.user_agent,
                list(caller.keys_used),
            )
        else:
            found = _CLAIMED_KEY.search(_header(scope, b"authorization") or "")
            identity = UserIdentity("Unknown", access_key_id=found.group(1) if found else None)
            source_ip, user_agent, keys = _peer(scope), _header(scope, b"user-agent"), []
        error_code = error_message = None
        if failure is not None:
            _, error_code, error_message = xks_error(failure)
        return prepare_api_call(
            operation,
            read_only=True,
            identity=identity,
            account_id=runtime.account_id,
            region=runtime.region,
            request_id=request_id,
            request=params,
            key_arns=keys,
            source_ip=source_ip,
            user_agent=(user_agent or "")[:1024] or None,
            error_code=error_code,
            error_message=error_message,
            additional_event_data=extra,
            event_source=EVENT_SOURCE,
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _peer(scope: Scope) -> str | None:
    from hsmkms.api.app import client_address

    client = scope.get("client")
    return client_address(client[0]) if client else None


def _code(failure: BaseException | None) -> str:
    return "OK" if failure is None else xks_error(failure)[1]
