"""AWS Signature Version 4 (``AWS4-HMAC-SHA256``) request verification and signing, on plain
values. Below both the HTTP layer (which verifies the KMS and XKS APIs' requests) and the
service (whose XKS client signs its calls to a proxy).

No web framework is imported here: the server hands :func:`verify` a :class:`SignedRequest`
built from what it received, and gets back the authenticated :class:`Credential` or one of
the four authentication errors of :mod:`hsmkms.errors`.

The signature is recomputed the way the signer computed it::

    canonical request = METHOD LF canonical URI LF canonical query LF
                        canonical headers LF LF signed headers LF hex(SHA-256(body))
    string to sign    = AWS4-HMAC-SHA256 LF <X-Amz-Date> LF <scope> LF
                        hex(SHA-256(canonical request))
    scope             = <YYYYMMDD>/<region>/<service>/aws4_request
    signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service),
                             "aws4_request")
    signature         = hex(HMAC(signing key, string to sign))

Checks, in order (error code in brackets; see ``docs/authentication.md``):

1. an ``Authorization`` header is present [MissingAuthenticationTokenException];
2. it reads ``AWS4-HMAC-SHA256 Credential=<id>/<date>/<region>/<service>/aws4_request,
   SignedHeaders=<a;b;c>, Signature=<hex>`` and a date header (``X-Amz-Date`` or ``Date``)
   exists and parses [IncompleteSignatureException];
3. no ``X-Amz-Security-Token``: hsmkms issues no session credentials
   [UnrecognizedClientException];
4. the scope names this region, this service and ``aws4_request``; ``host`` and the date
   header are signed; the service's signed-header rule holds (for the KMS API,
   :data:`KMS_SIGNED_HEADER_RULE`: ``Content-Type`` and every ``X-Amz-*`` header present are
   signed); the scope date is the request's date; the request time is within ``max_skew`` of
   ``now``; ``X-Amz-Content-Sha256``, when sent, is the body's hash
   [InvalidSignatureException];
5. the access key id is known [UnrecognizedClientException];
6. every signed header is present, and the signature matches, compared in constant time
   [InvalidSignatureException].

Security contract: no exception message ever contains the secret, the expected signature,
the signing key or the string to sign; :class:`Credential` hides its secret in ``repr``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

from hsmkms.errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)
from hsmkms.types import Credential

__all__ = [
    "ALGORITHM",
    "KMS_SIGNED_HEADER_RULE",
    "Credential",
    "SignedHeaderRule",
    "SignedRequest",
    "canonical_request",
    "sign",
    "signing_key",
    "string_to_sign",
    "verify",
]

ALGORITHM = "AWS4-HMAC-SHA256"
TERMINATOR = "aws4_request"
DEFAULT_MAX_SKEW = timedelta(minutes=5)

# spec: AWS error messages, as returned by AWS services (seen in SDK issue reports).
MISSING_TOKEN_MESSAGE = "Missing Authentication Token"  # noqa: S105 (a message)
UNRECOGNIZED_CLIENT_MESSAGE = "The security token included in the request is invalid."
SIGNATURE_MISMATCH_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)

# Headers a signer leaves out (botocore does the same): proxies add or rewrite them.
_UNSIGNED_HEADERS = frozenset(
    {"authorization", "user-agent", "expect", "x-amzn-trace-id", "transfer-encoding"}
)
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_QUOTE_SAFE = "-_.~"  # with ASCII letters and digits: RFC 3986 unreserved characters
_MAX_ECHO = 64  # longest client-supplied value repeated in an error message


SignedHeaderRule = Callable[[Collection[str], Collection[str]], None]
"""A service's own rule on what must be signed: called with the (lowercased) names of the
request's headers and of its signed headers; raises InvalidSignatureException to refuse. The
KMS API and the XKS proxy API (``kms-xks-proxy``) share :func:`verify`, each with its service
name and rule."""


def _shown_name(name: str) -> str:
    """A lowercased header name as AWS writes it in messages: ``X-Amz-Target``."""
    return _clip("-".join(part.capitalize() for part in name.split("-")))


def require_signed(
    *, headers: Collection[str] = (), prefixes: Collection[str] = ()
) -> SignedHeaderRule:
    """A :data:`SignedHeaderRule`: every header of ``headers`` that the request carries, and
    every header whose name starts with one of ``prefixes``, must be signed (names lowercase).
    Unsigned headers are otherwise ignored, so a header that must not be altered on the way
    has to be in one of the two."""
    named = frozenset(headers)
    starts = tuple(prefixes)

    def rule(present: Collection[str], signed: Collection[str]) -> None:
        signed_set = signed if isinstance(signed, frozenset | set) else frozenset(signed)
        for name in sorted(present):
            if name not in signed_set and (name in named or name.startswith(starts)):
                raise InvalidSignatureException(
                    f"'{_shown_name(name)}' must be a 'SignedHeader' in the AWS Authorization."
                )

    return rule


KMS_SIGNED_HEADER_RULE: SignedHeaderRule = require_signed(
    headers=("content-type",), prefixes=("x-amz-",)
)
"""The KMS API's rule: ``Content-Type`` and every ``X-Amz-*`` header present must be signed.

spec: AWS SigV4, "Create a canonical request" — the signed headers must include ``host``, the
``Content-Type`` header when the request has one, and every ``x-amz-*`` header the request
carries. Unsigned, ``X-Amz-Target`` (the operation) could be changed on the way: a signed
DescribeKey became a ScheduleKeyDeletion. botocore, the AWS SDKs for Go, Java and JavaScript
sign every header but a few (``User-Agent``, ``X-Amzn-Trace-Id``, ``Expect``, ...), so real
clients pass."""


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """An HTTP request exactly as received.

    ``path`` is the raw path without the query (``/`` for KMS); ``query`` the raw query string
    without ``?``; ``headers`` the (name, value) pairs in the order received, names in any
    case, possibly repeated; ``body`` the raw body bytes.
    """

    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: str  # verbatim from the header: it goes into the canonical request as is
    signed_names: tuple[str, ...]  # lowercased
    signature: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{self.terminator}"


# --------------------------------------------------------------------------------------------
# Canonical form
# --------------------------------------------------------------------------------------------


def _header_map(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Lowercased header name -> values in the order received."""
    result: dict[str, list[str]] = {}
    for name, value in headers:
        result.setdefault(name.lower(), []).append(value)
    return result


def _canonical_uri(path: str) -> str:
    # spec: SigV4 "canonical URI" for services other than S3: remove empty and "." segments,
    # resolve "..", then URI-encode each segment (the raw path is encoded once more).
    if path == "/" or not path:
        return "/"
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(quote(segment, safe=_QUOTE_SAFE, errors="surrogatepass"))
    if not segments:
        return "/"
    # A trailing slash survives normalization, as in botocore and the AWS test suite.
    trailing = "/" if path.endswith("/") else ""
    return "/" + "/".join(segments) + trailing


def _encode_query_part(part: str) -> str:
    raw = unquote_to_bytes(part.encode("utf-8", "surrogatepass"))
    return quote_from_bytes(raw, safe=_QUOTE_SAFE)


def _canonical_query(query: str) -> str:
    # spec: SigV4 "canonical query string": decode what the client sent, encode each name and
    # value with the RFC 3986 unreserved set, sort by encoded name then value.
    if not query:
        return ""
    pairs: list[tuple[str, str]] = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((_encode_query_part(name), _encode_query_part(value)))
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def _canonical_header_value(values: list[str]) -> str:
    # spec: trim, collapse runs of whitespace to one space; repeated headers joined with ","
    # in the order received. str.split() collapses whitespace exactly as botocore does.
    return ",".join(" ".join(value.split()) for value in values)


def _canonical_request(
    method: str,
    path: str,
    query: str,
    header_map: Mapping[str, list[str]],
    signed_headers: str,
    signed_names: Sequence[str],
    payload_hash: str,
) -> str:
    lines = [method, _canonical_uri(path), _canonical_query(query)]
    for name in sorted(set(signed_names)):
        values = header_map.get(name)
        if values is None:
            raise InvalidSignatureException(
                f"Header '{_clip(name)}' is listed in SignedHeaders but is not in the request."
            )
        lines.append(f"{name}:{_canonical_header_value(values)}")
    lines.append("")
    lines.append(signed_headers)
    lines.append(payload_hash)
    return "\n".join(lines)


def canonical_request(
    request: SignedRequest, signed_headers: str, *, payload_hash: str | None = None
) -> str:
    """The SigV4 canonical request of ``request``.

    ``signed_headers`` is the ``SignedHeaders`` value (``host;x-amz-date``); ``payload_hash``
    defaults to the hex SHA-256 of the body. Raises InvalidSignatureException when a signed
    header is absent from the request.
    """
    names = tuple(name.lower() for name in signed_headers.split(";"))
    return _canonical_request(
        request.method,
        request.path,
        request.query,
        _header_map(request.headers),
        signed_headers,
        names,
        payload_hash if payload_hash is not None else _sha256_hex(request.body),
    )


def string_to_sign(amz_date: str, scope: str, canonical_request: str) -> str:
    """The SigV4 string to sign for a canonical request made at ``amz_date`` within ``scope``."""
    digest = hashlib.sha256(canonical_request.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


@functools.lru_cache(maxsize=1024)
def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The SigV4 signing key for one day, region and service. Cached: it changes once a day.

    The key is as powerful as the secret for that day, region and service: never log it.
    """
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, TERMINATOR)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if data else _EMPTY_SHA256


def _signature(secret: str, auth_scope: tuple[str, str, str], to_sign: str) -> str:
    key = signing_key(secret, *auth_scope)
    return hmac.new(key, to_sign.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _clip(value: str) -> str:
    """A client-supplied value, shortened for an error message."""
    return value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "..."


def _parse_authorization(value: str, has_date: bool) -> _Authorization:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureException(
            f"Unsupported Authorization scheme; only '{ALGORITHM}' is accepted."
        )
    parts: dict[str, str] = {}
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        key, equals, val = item.partition("=")
        if not equals:
            raise IncompleteSignatureException(
                "An Authorization header component is not a valid key=value pair "
                "(missing equal-sign)."
            )
        if key not in ("Credential", "SignedHeaders", "Signature"):
            raise IncompleteSignatureException(
                f"Unknown Authorization header component '{_clip(key)}'."
            )
        if key in parts:
            raise IncompleteSignatureException(
                f"Authorization header has more than one '{key}' parameter."
            )
        parts[key] = val.strip()
    # spec: AWS lists every missing part in one message.
    problems = [
        f"Authorization header requires '{key}' parameter."
        for key in ("Credential", "Signature", "SignedHeaders")
        if not parts.get(key)
    ]
    if not has_date:
        problems.append(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
        )
    if problems:
        raise IncompleteSignatureException(" ".join(problems))

    scope = parts["Credential"].split("/")
    if len(scope) != 5 or not all(scope):
        raise IncompleteSignatureException(
            "Credential must have the form <AccessKeyId>/<YYYYMMDD>/<region>/<service>/"
            "aws4_request."
        )
    access_key_id, date, region, service, terminator = scope
    if len(date) != 8 or not date.isascii() or not date.isdigit():
        raise IncompleteSignatureException("The date in the Credential scope must be YYYYMMDD.")

    signed_headers = parts["SignedHeaders"]
    names = tuple(name.lower() for name in signed_headers.split(";"))
    if not all(names):
        raise IncompleteSignatureException("SignedHeaders has an empty header name.")

    return _Authorization(
        access_key_id=access_key_id,
        date=date,
        region=region,
        service=service,
        terminator=terminator,
        signed_headers=signed_headers,
        signed_names=names,
        signature=parts["Signature"],
    )


def _parse_amz_date(value: str) -> datetime | None:
    """``YYYYMMDDTHHMMSSZ`` (ISO 8601 basic, UTC) as an aware datetime, or None."""
    if len(value) != 16 or value[8] != "T" or value[15] != "Z":
        return None
    digits = value[:8] + value[9:15]
    if not (digits.isascii() and digits.isdigit()):
        return None
    try:
        return datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[9:11]),
            int(value[11:13]),
            int(value[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _parse_http_date(value: str) -> datetime | None:
    """An RFC 7231 ``Date`` (or an ISO 8601 basic one) as an aware UTC datetime, or None."""
    parsed = _parse_amz_date(value)
    if parsed is not None:
        return parsed
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _format_amz_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _request_time(header_map: Mapping[str, list[str]]) -> tuple[str, str, datetime]:
    """(date header name, ISO basic timestamp, parsed time). ``X-Amz-Date`` wins over ``Date``."""
    # spec: SigV4 — the request date is X-Amz-Date, or the HTTP Date header when absent.
    amz = header_map.get("x-amz-date")
    if amz is not None:
        parsed = _parse_amz_date(amz[0]) if len(amz) == 1 else None
        if parsed is None:
            raise IncompleteSignatureException(
                "X-Amz-Date must be one timestamp of the form YYYYMMDD'T'HHMMSS'Z'."
            )
        return "x-amz-date", amz[0], parsed
    http_date = header_map["date"]
    parsed = _parse_http_date(http_date[0]) if len(http_date) == 1 else None
    if parsed is None:
        raise IncompleteSignatureException("The Date header is not a valid HTTP date.")
    return "date", _format_amz_date(parsed), parsed


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def verify(
    request: SignedRequest,
    lookup: Callable[[str], Credential | None],
    *,
    region: str,
    service: str = "kms",
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    signed_header_rule: SignedHeaderRule | None = KMS_SIGNED_HEADER_RULE,
) -> Credential:
    """Authenticate a SigV4-signed request; return the credential that signed it.

    ``lookup`` maps an access key id to its credential (None when unknown). ``service`` is the
    scope's service name (``kms``; ``kms-xks-proxy`` for the XKS proxy API) and
    ``signed_header_rule`` the service's own rule on signed headers, beyond ``host`` and the
    date (the KMS API's by default; ``None``: no further rule). ``now`` should be an aware
    datetime; a naive one is taken as UTC. Raises MissingAuthenticationTokenException,
    IncompleteSignatureException, UnrecognizedClientException or InvalidSignatureException;
    the messages never reveal the secret, the expected signature or the string to sign.

    A valid request can be replayed until the window closes; the server refuses replays of
    requests that change state (``docs/authentication.md``), using :func:`signature_of`.
    """
    header_map = _header_map(request.headers)

    authorization = header_map.get("authorization")
    if authorization is None:
        raise MissingAuthenticationTokenException(MISSING_TOKEN_MESSAGE)
    if len(authorization) != 1:
        raise IncompleteSignatureException("The request has more than one Authorization header.")
    auth = _parse_authorization(
        authorization[0], "x-amz-date" in header_map or "date" in header_map
    )
    date_header, amz_date, request_time = _request_time(header_map)

    if "x-amz-security-token" in header_map:
        # hsmkms issues no temporary credentials, so no session token can be valid.
        raise UnrecognizedClientException(UNRECOGNIZED_CLIENT_MESSAGE)

    if auth.terminator != TERMINATOR:
        raise InvalidSignatureException(
            f"Credential should be scoped with a valid terminator: '{TERMINATOR}', "
            f"not '{_clip(auth.terminator)}'."
        )
    if auth.service != service:
        raise InvalidSignatureException(
            f"Credential should be scoped to correct service: '{service}'."
        )
    if auth.region != region:
        raise InvalidSignatureException(
            f"Credential should be scoped to a valid region, not '{_clip(auth.region)}'."
        )
    if "host" not in auth.signed_names:
        raise InvalidSignatureException("'Host' must be a 'SignedHeader' in the AWS Authorization.")
    if date_header not in auth.signed_names:
        shown = "X-Amz-Date" if date_header == "x-amz-date" else "Date"
        raise InvalidSignatureException(
            f"'{shown}' must be a 'SignedHeader' in the AWS Authorization."
        )
    if signed_header_rule is not None:
        signed_header_rule(header_map.keys(), auth.signed_names)
    if auth.date != amz_date[:8]:
        raise InvalidSignatureException(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{auth.date}' != '{amz_date[:8]}', from '{amz_date}'."
        )

    _check_skew(amz_date, request_time, now, max_skew)

    payload_hash = _sha256_hex(request.body)
    content_sha256 = header_map.get("x-amz-content-sha256")
    # spec: KMS payloads are always signed; UNSIGNED-PAYLOAD is a mismatch like any other.
    if content_sha256 is not None and (
        len(content_sha256) != 1 or content_sha256[0].strip() != payload_hash
    ):
        raise InvalidSignatureException(
            "The provided 'x-amz-content-sha256' header does not match what was computed."
        )

    credential = lookup(auth.access_key_id)
    if credential is None or credential.access_key_id != auth.access_key_id:
        raise UnrecognizedClientException(UNRECOGNIZED_CLIENT_MESSAGE)

    creq = _canonical_request(
        request.method,
        request.path,
        request.query,
        header_map,
        auth.signed_headers,
        auth.signed_names,
        payload_hash,
    )
    to_sign = string_to_sign(amz_date, auth.scope, creq)
    expected = _signature(credential.secret, (auth.date, auth.region, auth.service), to_sign)
    provided = auth.signature.encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(expected.encode("ascii"), provided):
        raise InvalidSignatureException(SIGNATURE_MISMATCH_MESSAGE)
    return credential


def signature_of(request: SignedRequest) -> str | None:
    """The ``Signature`` of the request's ``Authorization`` header (lowercase hex, as
    :func:`verify` accepts it), or None when it has none. For the replay check, after
    :func:`verify` accepted the request: equal signatures are the same signed request."""
    values = [v for k, v in request.headers if k.lower() == "authorization"]
    if len(values) != 1:
        return None
    for part in values[0].split(","):
        name, equals, value = part.strip().rpartition(" ")[2].partition("=")
        if equals and name == "Signature":
            return value.strip().lower()
    return None


def _check_skew(amz_date: str, request_time: datetime, now: datetime, max_skew: timedelta) -> None:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    minutes = f"{max_skew.total_seconds() / 60:g} min."
    # spec: AWS wording, e.g. "Signature expired: 20160610T180547Z is now earlier than
    # 20160610T180612Z (20160610T181112Z - 5 min.)" and "Signature not yet current:
    # 20181120T211543Z is still later than 20181120T211529Z (20181120T211029Z + 5 min.)".
    earliest = now - max_skew
    if request_time < earliest:
        raise InvalidSignatureException(
            f"Signature expired: {amz_date} is now earlier than {_format_amz_date(earliest)} "
            f"({_format_amz_date(now)} - {minutes})"
        )
    latest = now + max_skew
    if request_time > latest:
        raise InvalidSignatureException(
            f"Signature not yet current: {amz_date} is still later than "
            f"{_format_amz_date(latest)} ({_format_amz_date(now)} + {minutes})"
        )


# --------------------------------------------------------------------------------------------
# Signing (tests, benchmarks, internal clients)
# --------------------------------------------------------------------------------------------


def sign(
    request: SignedRequest,
    credential: Credential,
    *,
    region: str,
    service: str = "kms",
    when: datetime,
    content_sha256: bool = False,
) -> SignedRequest:
    """Return ``request`` with ``X-Amz-Date`` and a SigV4 ``Authorization`` header added.

    Signs every header present (like botocore: not User-Agent, Expect, X-Amzn-Trace-Id,
    Transfer-Encoding), always including ``host`` (required in ``request``) and
    ``x-amz-date``. With ``content_sha256`` an ``X-Amz-Content-Sha256`` header is added and
    signed. Any previous ``Authorization``, ``X-Amz-Date`` or ``X-Amz-Content-Sha256`` is
    replaced.
    """
    replaced = {"authorization", "x-amz-date", "x-amz-content-sha256"}
    headers = [(name, value) for name, value in request.headers if name.lower() not in replaced]
    if not any(name.lower() == "host" for name, _ in headers):
        raise ValueError("a SigV4 request needs a Host header")
    amz_date = _format_amz_date(when if when.tzinfo is not None else when.replace(tzinfo=UTC))
    payload_hash = _sha256_hex(request.body)
    headers.append(("X-Amz-Date", amz_date))
    if content_sha256:
        headers.append(("X-Amz-Content-Sha256", payload_hash))
    header_map = _header_map(headers)
    names = sorted(name for name in header_map if name not in _UNSIGNED_HEADERS)
    signed_headers = ";".join(names)
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/{TERMINATOR}"
    creq = _canonical_request(
        request.method,
        request.path,
        request.query,
        header_map,
        signed_headers,
        names,
        payload_hash,
    )
    signature = _signature(
        credential.secret, (date, region, service), string_to_sign(amz_date, scope, creq)
    )
    headers.append(
        (
            "Authorization",
            f"{ALGORITHM} Credential={credential.access_key_id}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}",
        )
    )
    return SignedRequest(request.method, request.path, request.query, headers, request.body)
