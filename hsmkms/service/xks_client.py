"""hsmkms as a client of an XKS proxy (API v1): the calls an external key store makes.

Each call is one POST of compact JSON to ``<endpoint><path>/<route>``, signed with SigV4 for
the service ``kms-xks-proxy`` and the server's region by the store's XKS proxy authentication
credential, signing ``host`` and ``x-amz-date`` only, as AWS KMS does
(``hsmkms.sigv4.sign``: a pure function over a request, shared with the server side —
decision 17). HTTP is the standard library's ``http.client``; HTTPS is verified against
:attr:`XksClientSettings.ca_bundle` when set, else the system's CAs.

Every failure is one :class:`XksProxyFailure` carrying the ConnectionErrorCode that AWS KMS
reports for it (``docs/key-stores.md``, "External key stores"):

=============================================  =====================================
what happened                                  ``code``
=============================================  =====================================
connection refused, name not resolved          XKS_PROXY_NOT_REACHABLE
no answer within the timeout                   XKS_PROXY_TIMED_OUT
the certificate does not verify                XKS_PROXY_INVALID_TLS_CONFIGURATION
401 or 403                                     XKS_PROXY_ACCESS_DENIED
404 ``InvalidUriPathException``                XKS_PROXY_INVALID_CONFIGURATION
an answer that is not the spec's JSON          XKS_PROXY_INVALID_RESPONSE
anything else                                  INTERNAL_ERROR
=============================================  =====================================

Security contract: the secret access key is used to sign and is never logged, put in a
``repr`` or in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import json
import os
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Final

import structlog

from hsmkms.sigv4 import SignedRequest, sign
from hsmkms.types import Clock, Credential, utc_now

__all__ = [
    "CALL_TIMEOUT",
    "HEALTH_TIMEOUT",
    "XksClientSettings",
    "XksProxyClient",
    "XksProxyFailure",
    "XksProxyLocation",
    "XksRequestMetadata",
    "XksSealed",
    "decrypt",
    "encrypt",
    "is_usable_key",
    "key_metadata",
]

log = structlog.get_logger(__name__)

SERVICE: Final = "kms-xks-proxy"
CALL_TIMEOUT: Final = 0.25
"""Seconds an XKS key call may take by default (AWS KMS gives up after 250 ms)."""
HEALTH_TIMEOUT: Final = 2.0
"""Seconds the health check at ConnectCustomKeyStore may take (a first TLS handshake)."""
_MAX_RESPONSE: Final = 1 << 20


@dataclasses.dataclass(frozen=True)
class XksClientSettings:
    """How this server reaches XKS proxies: ``allow_http`` (HSMKMS_XKS_ALLOW_HTTP) accepts
    ``http://`` endpoints (tests, a proxy on loopback); ``ca_bundle`` (HSMKMS_XKS_CA_BUNDLE)
    the CAs HTTPS is verified against, else the system's; ``timeout`` (HSMKMS_XKS_TIMEOUT) how
    long a key call may take."""

    allow_http: bool = False
    ca_bundle: Path | None = None
    timeout: float = CALL_TIMEOUT
    """Seconds a key call may take (HSMKMS_XKS_TIMEOUT)."""


@dataclasses.dataclass(frozen=True)
class XksProxyLocation:
    """Where a store's proxy is and how to sign for it (the secret never in ``repr``)."""

    uri_endpoint: str
    uri_path: str
    access_key_id: str
    secret: str = dataclasses.field(repr=False)


class XksProxyFailure(Exception):
    """An XKS call failed; ``code`` is the ConnectionErrorCode, ``status`` the HTTP status and
    ``error_name`` the proxy's ``errorName`` when it answered."""

    def __init__(self, code: str, message: str, *, status: int = 0, error_name: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.error_name = error_name

    def facts(self) -> dict[str, str | int]:
        """What a log line says of the failure (never a secret: the proxy's words are not in
        it)."""
        return {"code": self.code, "status": self.status, "error_name": self.error_name}


class XksProxyClient:
    """Calls to XKS proxies, signed for ``region``."""

    def __init__(self, settings: XksClientSettings, *, region: str, clock: Clock = utc_now) -> None:
        self.settings = settings
        self._region = region
        self._clock = clock
        self._tls: ssl.SSLContext | None = None
        # Per thread: the pid that made the pool, and (scheme, netloc) -> a kept-alive connection.
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"XksProxyClient(region={self._region!r})"

    def _context(self) -> ssl.SSLContext:
        """The TLS context, made once: loading the CA certificates takes milliseconds, and an
        SSLContext may be shared by threads."""
        context = self._tls
        if context is None:
            ca = self.settings.ca_bundle
            context = ssl.create_default_context(cafile=None if ca is None else str(ca))
            self._tls = context
        return context

    def health(self, location: XksProxyLocation, request_id: str) -> dict[str, Any]:
        """GetHealthStatus; the answer checked against the spec's shape."""
        metadata = {"kmsRequestId": request_id, "kmsOperation": "ConnectCustomKeyStore"}
        body: dict[str, Any] = {"requestMetadata": metadata}
        answer = self.call(location, "/health", body, timeout=HEALTH_TIMEOUT)
        fleet = answer.get("xksProxyFleetSize")
        details = answer.get("ekmFleetDetails")
        if (
            not isinstance(fleet, int)
            or isinstance(fleet, bool)
            or fleet < 1
            or not isinstance(details, list)
            or not 1 <= len(details) <= 10
            or not all(isinstance(d, dict) and "healthStatus" in d for d in details)
        ):
            raise XksProxyFailure("XKS_PROXY_INVALID_RESPONSE", "the health answer is malformed")
        return answer

    def call(
        self,
        location: XksProxyLocation,
        route: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``route`` of the proxy within ``timeout`` seconds (the settings'
        when None); its JSON answer (an object) on 200, else :class:`XksProxyFailure`."""
        if timeout is None:
            timeout = self.settings.timeout
        parts = urllib.parse.urlsplit(location.uri_endpoint)
        path = location.uri_path + route
        payload = json.dumps(body, separators=(",", ":")).encode()
        signed = sign(
            SignedRequest("POST", path, "", [("Host", parts.netloc)], payload),
            Credential(location.access_key_id, location.secret, ""),
            region=self._region,
            service=SERVICE,
            when=self._clock(),
        )
        headers = dict(signed.headers)
        headers["Content-Type"] = "application/json"  # not signed, as AWS KMS does
        try:
            status, data = self._exchange(parts, path, payload, headers, timeout)
        except ssl.SSLCertVerificationError:
            raise XksProxyFailure(
                "XKS_PROXY_INVALID_TLS_CONFIGURATION", "the proxy's certificate does not verify"
            ) from None
        except ssl.SSLError:
            raise XksProxyFailure(
                "XKS_PROXY_INVALID_TLS_CONFIGURATION", "the TLS handshake failed"
            ) from None
        except TimeoutError:
            raise XksProxyFailure("XKS_PROXY_TIMED_OUT", "the proxy did not answer") from None
        except (ConnectionError, socket.gaierror, OSError, http.client.HTTPException):
            raise XksProxyFailure(
                "XKS_PROXY_NOT_REACHABLE", "the proxy cannot be reached"
            ) from None
        return _answer(status, data)

    def _exchange(
        self,
        parts: urllib.parse.SplitResult,
        path: str,
        payload: bytes,
        headers: dict[str, str],
        timeout: float,
    ) -> tuple[int, bytes]:
        """One POST on a kept-alive connection of this thread to the proxy (a new one when
        there is none, or when the kept one turns out closed by the proxy: then once more)."""
        pool: dict[tuple[str, str], http.client.HTTPConnection]
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.pid = os.getpid()  # a forked child never shares its parent's sockets
            self._local.pool = {}
        pool = self._local.pool
        where = (parts.scheme, parts.netloc)
        kept = pool.pop(where, None)
        conn = kept or self._connect(parts, timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request("POST", path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read(_MAX_RESPONSE)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conn.close()
            if kept is None:
                raise
            return self._exchange(parts, path, payload, headers, timeout)
        except BaseException:
            conn.close()
            raise
        if response.will_close or not response.isclosed():
            conn.close()  # the proxy closes it, or more than _MAX_RESPONSE was sent
        else:
            pool[where] = conn
        return response.status, data

    def _connect(
        self, parts: urllib.parse.SplitResult, timeout: float
    ) -> http.client.HTTPConnection:
        host = parts.hostname or ""
        if parts.scheme == "https":
            return http.client.HTTPSConnection(
                host, parts.port, timeout=timeout, context=self._context()
            )
        return http.client.HTTPConnection(host, parts.port, timeout=timeout)


def _answer(status: int, data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeError):
        parsed = None
    if status == 200:
        if not isinstance(parsed, dict):
            raise XksProxyFailure("XKS_PROXY_INVALID_RESPONSE", "the answer is not JSON")
        return parsed
    name = ""
    if isinstance(parsed, dict) and isinstance(parsed.get("errorName"), str):
        name = str(parsed["errorName"])[:64]
    if status in (401, 403):
        code = "XKS_PROXY_ACCESS_DENIED"
    elif status == 404 and name in ("InvalidUriPathException", ""):
        code = "XKS_PROXY_INVALID_CONFIGURATION"
    elif status == 503 or name == "DependencyTimeoutException":
        code = "XKS_PROXY_TIMED_OUT"
    elif not name:
        code = "XKS_PROXY_INVALID_RESPONSE"
    else:
        code = "INTERNAL_ERROR"
    raise XksProxyFailure(
        code, f"the proxy answered {status} {name}".strip(), status=status, error_name=name
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(answer: dict[str, Any], member: str) -> bytes:
    value = answer.get(member)
    if not isinstance(value, str):
        raise XksProxyFailure("XKS_PROXY_INVALID_RESPONSE", f"the answer lacks {member}")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise XksProxyFailure("XKS_PROXY_INVALID_RESPONSE", f"{member} is not base64") from None


@dataclasses.dataclass(frozen=True)
class XksRequestMetadata:
    """``requestMetadata`` of an XKS call: who asked AWS KMS (here: hsmkms) for what."""

    principal_arn: str
    operation: str
    request_id: str
    key_arn: str = ""

    def to_json(self) -> dict[str, str]:
        found = {
            "awsPrincipalArn": self.principal_arn,
            "kmsOperation": self.operation,
            "kmsRequestId": self.request_id,
        }
        if self.key_arn:
            found["kmsKeyArn"] = self.key_arn
        return found


@dataclasses.dataclass(frozen=True)
class XksSealed:
    """What the proxy's encrypt returned."""

    ciphertext: bytes = dataclasses.field(repr=False)
    iv: bytes
    tag: bytes
    metadata: bytes


def _path_key(xks_key_id: str) -> str:
    return "/keys/" + urllib.parse.quote(xks_key_id, safe="")


def key_metadata(
    client: XksProxyClient, location: XksProxyLocation, xks_key_id: str, meta: XksRequestMetadata
) -> dict[str, Any]:
    """GetKeyMetadata of an external key."""
    return client.call(
        location, _path_key(xks_key_id) + "/metadata", {"requestMetadata": meta.to_json()}
    )


def is_usable_key(answer: dict[str, Any]) -> bool:
    """Whether GetKeyMetadata's ``answer`` describes a key a KMS key can use: an ENABLED
    AES_256 key for ENCRYPT and DECRYPT (AWS's rule for XksKeyId)."""
    usages = answer.get("keyUsage")
    return (
        answer.get("keySpec") == "AES_256"
        and isinstance(usages, list)
        and {"ENCRYPT", "DECRYPT"} <= set(usages)
        and answer.get("keyStatus") == "ENABLED"
    )


def encrypt(
    client: XksProxyClient,
    location: XksProxyLocation,
    xks_key_id: str,
    plaintext: bytes,
    aad: bytes,
    meta: XksRequestMetadata,
) -> XksSealed:
    """Encrypt with an external key (AES_GCM, ``aad`` authenticated)."""
    answer = client.call(
        location,
        _path_key(xks_key_id) + "/encrypt",
        {
            "requestMetadata": meta.to_json(),
            "plaintext": _b64(plaintext),
            "encryptionAlgorithm": "AES_GCM",
            "additionalAuthenticatedData": _b64(aad),
        },
    )
    ciphertext = _unb64(answer, "ciphertext")
    iv = _unb64(answer, "initializationVector")
    tag = _unb64(answer, "authenticationTag")
    metadata = _unb64(answer, "ciphertextMetadata") if "ciphertextMetadata" in answer else b""
    if len(ciphertext) != len(plaintext) or len(iv) not in (12, 16) or len(tag) != 16:
        raise XksProxyFailure("XKS_PROXY_INVALID_RESPONSE", "the encrypt answer is malformed")
    if len(metadata) > 20:
        raise XksProxyFailure("XKS_PROXY_INVALID_RESPONSE", "ciphertextMetadata is too long")
    return XksSealed(ciphertext, iv, tag, metadata)


def decrypt(
    client: XksProxyClient,
    location: XksProxyLocation,
    xks_key_id: str,
    sealed: XksSealed,
    aad: bytes,
    meta: XksRequestMetadata,
) -> bytes:
    """Decrypt with an external key; the plaintext."""
    body: dict[str, Any] = {
        "requestMetadata": meta.to_json(),
        "ciphertext": _b64(sealed.ciphertext),
        "initializationVector": _b64(sealed.iv),
        "authenticationTag": _b64(sealed.tag),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": _b64(aad),
    }
    if sealed.metadata:
        body["ciphertextMetadata"] = _b64(sealed.metadata)
    answer = client.call(location, _path_key(xks_key_id) + "/decrypt", body)
    return _unb64(answer, "plaintext")
