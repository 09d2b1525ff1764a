"""CloudTrail-shaped audit records (reference/aws-kms-api.md §5.2) and their canonical JSON.

A record is a plain JSON object (``dict``) shaped like an AWS CloudTrail event for KMS. The
builders :func:`api_call_record` and :func:`service_event_record` make every record; nothing else
should.

Security contract: no record holds plaintext, data keys, ciphertext blobs or other secrets.
What goes in is decided by allow-lists, never by a deny-list:

* ``requestParameters`` keeps only request members named in :data:`REQUEST_FIELDS`, each checked
  against its declared shape (a string member holding ``bytes`` is dropped, a map must be
  string to string, ...). Every other member — ``Plaintext``, ``CiphertextBlob``,
  ``GrantTokens``, anything added to the API later — is left out.
* ``responseElements`` is ``null`` for read-only operations (every cryptographic operation is
  one) and otherwise keeps only the members in :data:`RESPONSE_FIELDS`.
* ``additionalEventData`` and ``serviceEventDetails`` take only the names in
  :data:`ADDITIONAL_EVENT_DATA_FIELDS` / :data:`SERVICE_EVENT_DETAIL_FIELDS`, with scalar
  values; anything else is a programming error (``ValueError``).
* ``errorMessage`` has any value of an omitted request member (and its base64) cut out, in case
  an error echoes its input.

The trail stores a record as a :class:`PreparedRecord`: its canonical JSON and its search
columns (:func:`prepare_record`). The API's hot path builds that directly with
:func:`prepare_api_call`, byte for byte what ``prepare_record(api_call_record(...))`` gives,
without the intermediate object and with what repeats between calls encoded once.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import functools
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from pydantic import BaseModel

from hsmkms.types import utc_now

__all__ = [
    "ADDITIONAL_EVENT_DATA_FIELDS",
    "EVENT_VERSION",
    "MAX_ERROR_MESSAGE",
    "MAX_REQUEST_PARAMETERS",
    "REQUEST_FIELDS",
    "RESPONSE_FIELDS",
    "SEARCH_COLUMNS",
    "SERVICE_EVENT_DETAIL_FIELDS",
    "UNAUTHENTICATED_SUMMARY_EVENT",
    "AuditRecord",
    "PreparedRecord",
    "UserIdentity",
    "api_call_record",
    "canonical_json",
    "console_sign_in_record",
    "format_event_time",
    "key_id_of",
    "lower_camel",
    "operator_event_record",
    "prepare_api_call",
    "prepare_record",
    "record_key_ids",
    "request_parameters",
    "response_elements",
    "search_columns",
    "service_event_record",
    "unauthenticated_summary_record",
]

AuditRecord = dict[str, Any]
"""One audit record: a JSON object in the CloudTrail event shape."""

EVENT_VERSION: Final = "1.08"
EVENT_SOURCE: Final = "kms.amazonaws.com"
KEY_RESOURCE_TYPE: Final = "AWS::KMS::Key"
_OMITTED: Final = "[omitted]"
MAX_REQUEST_PARAMETERS: Final = 64 * 1024
"""The most bytes ``requestParameters`` takes in a record's canonical JSON: beyond it, the
largest members are replaced by ``"[omitted: <n> bytes]"`` until it fits (a request of 1 MiB,
escaped, would otherwise make a record of several MB)."""
MAX_ERROR_MESSAGE: Final = 2048
"""The most characters of ``errorMessage`` a record keeps (``"...[truncated]"`` marks a cut)."""
# Values of omitted members shorter than this are not cut out of error messages: too likely to
# match ordinary words.
_MIN_SCRUB_LENGTH: Final = 6


def canonical_json(value: Any) -> bytes:
    """The canonical JSON encoding hashed by the trail: sorted keys, no whitespace, ASCII only
    (``\\uXXXX`` escapes), no NaN or infinities. ``TypeError``/``ValueError`` for anything that is
    not plain JSON — in particular ``bytes`` can never reach a record."""
    return _encode(value).encode("ascii")


# The same settings as canonical_json; ``encode`` of a whole value equals the composition of the
# encodings of its parts, which prepare_api_call relies on.
_encoder: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)
_encode: Final = _encoder.encode
_encode_str: Final = json.encoder.encode_basestring_ascii
# The C encoder JSONEncoder.encode builds on every call, built once: without the circular
# reference check (``markers``), which changes no output. None where the C module is missing.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encoder: Final = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _encoder.default, _encode_str, None, ":", ",", True, False, False)
)


def _json(value: Any) -> str:
    """``_encode(value)``, faster (the API's hot path)."""
    if value is None:
        return "null"
    if type(value) is str:
        return _encode_str(value)
    if _c_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return _encode(value)
    return "".join(_c_encoder(value, 0))


def format_event_time(when: dt.datetime) -> str:
    """CloudTrail's ``eventTime``: ISO-8601 UTC to the second with a ``Z`` (naive = refused)."""
    if when.tzinfo is None:
        raise ValueError("event times must be aware datetimes")
    return _second_text(when.astimezone(dt.UTC).replace(microsecond=0))


@functools.lru_cache(maxsize=8)
def _second_text(second: dt.datetime) -> str:
    # Cached: every record of the same second has the same eventTime (a record per request).
    return second.strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=512)
def lower_camel(name: str) -> str:
    """``KeyId`` -> ``keyId``; ``AWSAccountId`` -> ``aWSAccountId`` (what CloudTrail writes)."""
    return name[:1].lower() + name[1:]


def key_id_of(key: str) -> str:
    """The key id in a key ARN (``arn:aws:kms:r:a:key/<id>`` -> ``<id>``); other values as is."""
    prefix, sep, rest = key.partition(":key/")
    return rest if sep and prefix.startswith("arn:") else key


# --------------------------------------------------------------------------------------------
# Field shapes: each returns the sanitized value, or _DROP when the value has another shape.
# --------------------------------------------------------------------------------------------


class _Drop:
    pass


_DROP: Final = _Drop()
_Shape = Callable[[Any], Any]


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _str(value: Any) -> Any:
    if type(value) is str:  # the common case, first
        return value
    value = _plain(value)
    return value if isinstance(value, str) else _DROP


def _int(value: Any) -> Any:
    value = _plain(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else _DROP


def _bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _DROP


def _str_map(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return _DROP
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return _DROP
    return dict(value)


def _str_list(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        return _DROP
    items = [_plain(v) for v in value]
    return items if all(isinstance(v, str) for v in items) else _DROP


def _time(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            when = dt.datetime.fromtimestamp(value, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return _DROP
        return when.isoformat().replace("+00:00", "Z")
    return _DROP


def _structure(fields: Mapping[str, _Shape]) -> _Shape:
    def shape(value: Any) -> Any:
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_none=True)
        if not isinstance(value, Mapping):
            return _DROP
        return _select(value, fields)

    return shape


def _list_of(item: _Shape) -> _Shape:
    def shape(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            return _DROP
        items = [item(v) for v in value]
        return _DROP if any(i is _DROP for i in items) else items

    return shape


def _select(values: Mapping[str, Any], fields: Mapping[str, _Shape]) -> dict[str, Any]:
    """The allow-listed members of ``values``, lowerCamelCased; ``None`` members are skipped."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        shape = fields.get(name)
        if shape is None or value is None:
            continue
        kept = shape(value)
        if kept is not _DROP:
            out[lower_camel(name)] = kept
    return out


_TAG = _structure({"TagKey": _str, "TagValue": _str})
_CONSTRAINTS = _structure(
    {"EncryptionContextEquals": _str_map, "EncryptionContextSubset": _str_map}
)

REQUEST_FIELDS: Final[Mapping[str, _Shape]] = {
    # keys, aliases, grants: identifiers and settings, never secret
    "KeyId": _str,
    "SourceKeyId": _str,
    "DestinationKeyId": _str,
    "TargetKeyId": _str,
    "AliasName": _str,
    "GrantId": _str,
    "GranteePrincipal": _str,
    "GranteeServicePrincipal": _str,
    "RetiringPrincipal": _str,
    "RetiringServicePrincipal": _str,
    "Operations": _str_list,
    "Constraints": _CONSTRAINTS,
    "Name": _str,
    # cryptographic parameters (spec: §5.1 — the encryption context is not secret, AWS logs it)
    "EncryptionContext": _str_map,
    "SourceEncryptionContext": _str_map,
    "DestinationEncryptionContext": _str_map,
    "EncryptionAlgorithm": _str,
    "SourceEncryptionAlgorithm": _str,
    "DestinationEncryptionAlgorithm": _str,
    "KeySpec": _str,
    "KeyPairSpec": _str,
    "NumberOfBytes": _int,
    "SigningAlgorithm": _str,
    "MessageType": _str,
    "MacAlgorithm": _str,
    "KeyAgreementAlgorithm": _str,
    "EncapsulationAlgorithm": _str,
    "Recipient": _structure({"KeyEncryptionAlgorithm": _str}),
    "DryRun": _bool,
    "DryRunModifiers": _str_list,
    # key creation and lifecycle
    "Description": _str,
    "KeyUsage": _str,
    "CustomerMasterKeySpec": _str,
    "Origin": _str,
    "CustomKeyStoreId": _str,
    "XksKeyId": _str,
    # custom key stores (never KeyStorePassword nor XksProxyAuthenticationCredential)
    "CustomKeyStoreName": _str,
    "NewCustomKeyStoreName": _str,
    "CustomKeyStoreType": _str,
    "CloudHsmClusterId": _str,
    "TrustAnchorCertificate": _str,
    "Pkcs11Uri": _str,  # hsmkms clusters add (a cluster's URI carries no PIN)
    "XksProxyUriEndpoint": _str,
    "XksProxyUriPath": _str,
    "XksProxyVpcEndpointServiceName": _str,
    "XksProxyVpcEndpointServiceOwner": _str,
    "XksProxyConnectivity": _str,
    "MultiRegion": _bool,
    "BypassPolicyLockoutSafetyCheck": _bool,
    "Policy": _str,
    "PolicyName": _str,
    "Tags": _list_of(_TAG),
    "TagKeys": _str_list,
    "PendingWindowInDays": _int,
    "RotationPeriodInDays": _int,
    "IncludeKeyMaterial": _str,
    # imported key material (never the ImportToken or the EncryptedKeyMaterial)
    "WrappingAlgorithm": _str,
    "WrappingKeySpec": _str,
    "ExpirationModel": _str,
    "ValidTo": _time,
    "ImportType": _str,
    "KeyMaterialDescription": _str,
    "KeyMaterialId": _str,
    "ReplicaRegion": _str,
    "PrimaryRegion": _str,
    # pagination
    "Limit": _int,
    "Marker": _str,
    # credential changes by ``hsmkms credentials`` (IAM's member names; never a secret)
    "UserName": _str,
    "AccessKeyId": _str,
    "PolicyDocument": _str,
    # the XKS proxy API (``hsmkms xks credentials``; a call's requestMetadata, flattened, and
    # what names its key: never plaintext, ciphertext, IV, tag or AAD)
    "Prefix": _str,
    "ExternalKeyId": _str,
    "KmsRequestId": _str,
    "KmsOperation": _str,
    "AwsPrincipalArn": _str,
    "KmsKeyArn": _str,
    "KmsViaService": _str,
    "AwsSourceVpc": _str,
    "AwsSourceVpce": _str,
    "CiphertextDataIntegrityValueAlgorithm": _str,
}
"""Request members that may be copied into ``requestParameters``, with their shapes.

``Plaintext``, ``CiphertextBlob``, ``Message``, ``Mac``, ``Signature``, ``GrantTokens``,
``GrantToken``, ``PublicKey`` (a peer's key: DeriveSharedSecret), ``SharedSecretCiphertextBlob``,
import material, ``KeyStorePassword``, ``XksProxyAuthenticationCredential`` and any unknown
member are absent on purpose.
"""

_KEY_METADATA = _structure(
    {
        "AWSAccountId": _str,
        "KeyId": _str,
        "Arn": _str,
        "CreationDate": _time,
        "Enabled": _bool,
        "Description": _str,
        "KeyUsage": _str,
        "KeyState": _str,
        "DeletionDate": _time,
        "ValidTo": _time,
        "Origin": _str,
        "KeyManager": _str,
        "CustomerMasterKeySpec": _str,
        "KeySpec": _str,
        "ExpirationModel": _str,
        "EncryptionAlgorithms": _str_list,
        "SigningAlgorithms": _str_list,
        "MacAlgorithms": _str_list,
        "KeyAgreementAlgorithms": _str_list,
        "EncapsulationAlgorithms": _str_list,
        "MultiRegion": _bool,
        "PendingDeletionWindowInDays": _int,
        "CurrentKeyMaterialId": _str,
        "CustomKeyStoreId": _str,
        "CloudHsmClusterId": _str,
    }
)

RESPONSE_FIELDS: Final[Mapping[str, _Shape]] = {
    "AccessKey": _structure(
        {"AccessKeyId": _str, "UserName": _str, "Status": _str, "CreateDate": _str}
    ),  # never SecretAccessKey
    "KeyMetadata": _KEY_METADATA,
    "KeyId": _str,
    "KeyState": _str,
    "DeletionDate": _time,
    "PendingWindowInDays": _int,
    "GrantId": _str,
    "KeyMaterialId": _str,
    "AccessKeyId": _str,  # an XKS proxy credential created (never its secret)
    "UriPath": _str,
    "AccessKeys": _int,  # how many a vouched-for set holds (TrustCredentials, TrustXksCredentials)
    "CustomKeyStoreId": _str,  # CreateCustomKeyStore
    "CloudHsmClusterId": _str,  # hsmkms clusters add
}
"""Response members that may be copied into ``responseElements`` (non-read-only operations).
``GrantToken`` is absent on purpose: it is a bearer token."""

ADDITIONAL_EVENT_DATA_FIELDS: Final = frozenset(
    {
        "keyVersion",
        "sourceKeyVersion",
        "destinationKeyVersion",
        "keyMaterialId",
        "mechanismProfile",
        "customKeyStoreId",
        "grantId",
        "failureReason",
        "authorization",
        "dryRun",
        "requestCount",
        "firstEventTime",
        "lastEventTime",
        "errorCodes",
    }
)
"""Names allowed in ``additionalEventData`` (values: str, int, float, bool or null)."""

SERVICE_EVENT_DETAIL_FIELDS: Final = frozenset(
    {"keyId", "keyVersion", "keyMaterialId", "rotationType", "deletionDate", "keyState"}
    # an operator's act on the data directory (operator_event_record)
    | {"backupDigest", "backupCreatedAt", "backupSource", "backupNewestSeal", "dataDirectory"}
)
"""Names allowed in ``serviceEventDetails`` (values: str, int, float, bool or null)."""


@dataclasses.dataclass(frozen=True)
class UserIdentity:
    """Who made a call: CloudTrail's ``userIdentity``. No secret here (never a secret key).

    ``type`` is ``Root`` (the account's root credential), ``IAMUser`` (a credential made with
    ``hsmkms credentials``), ``Unknown`` (the caller could not be authenticated) or
    ``LocalOperator`` (a command on the data directory: :mod:`hsmkms.system.operator`).
    """

    type: str
    principal_id: str | None = None
    arn: str | None = None
    account_id: str | None = None
    access_key_id: str | None = None
    user_name: str | None = None

    def to_dict(self) -> dict[str, str]:
        """The ``userIdentity`` object; absent parts are left out."""
        values = {
            "type": self.type,
            "principalId": self.principal_id,
            "arn": self.arn,
            "accountId": self.account_id,
            "accessKeyId": self.access_key_id,
            "userName": self.user_name,
        }
        return {k: v for k, v in values.items() if v is not None}


def _members(value: Mapping[str, Any] | BaseModel | None) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        # Python mode: blobs stay ``bytes`` (so no shape accepts them), enums stay enums.
        return value.model_dump(exclude_none=True)
    return value


@functools.cache
def _listed_fields(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(name for name in model.model_fields if name in REQUEST_FIELDS)


def request_parameters(
    event_name: str, request: Mapping[str, Any] | BaseModel | None
) -> dict[str, Any] | None:
    """``requestParameters``: the allow-listed request members, lowerCamelCased, or ``None``."""
    if isinstance(request, BaseModel):
        # Only the allow-listed fields are read: what model_dump would give for them.
        values = {name: getattr(request, name) for name in _listed_fields(type(request))}
        params = _select(values, REQUEST_FIELDS)
    else:
        params = _select(_members(request), REQUEST_FIELDS)
    if event_name == "Decrypt":
        # spec: §5.2 — Decrypt entries always include encryptionAlgorithm, even if not sent.
        params.setdefault("encryptionAlgorithm", "SYMMETRIC_DEFAULT")
    return params or None


def _bounded_parameters(params: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """``params`` and its canonical JSON, its largest members replaced by a marker until the
    JSON is at most :data:`MAX_REQUEST_PARAMETERS` bytes (most records: unchanged, encoded
    once)."""
    encoded = _json(params)
    if params is None or len(encoded) <= MAX_REQUEST_PARAMETERS:
        return params, encoded
    sizes = {name: len(_json(value)) for name, value in params.items()}
    bounded = dict(params)
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        bounded[name] = f"[omitted: {sizes[name]} bytes]"
        encoded = _json(bounded)
        if len(encoded) <= MAX_REQUEST_PARAMETERS:
            break
    return bounded, encoded


def _error_message(message: str, members: Mapping[str, Any]) -> str:
    """The ``errorMessage`` of a record: omitted values cut out, at most
    :data:`MAX_ERROR_MESSAGE` characters."""
    message = _scrub(message, _omitted_values(members))
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 14] + "...[truncated]"
    return message


def response_elements(
    response: Mapping[str, Any] | BaseModel | None, *, read_only: bool
) -> dict[str, Any] | None:
    """``responseElements``: ``None`` for read-only operations (spec: §5.2 — null for crypto
    operations), else the allow-listed response members."""
    if read_only:
        return None
    return _select(_members(response), RESPONSE_FIELDS) or None


def _omitted_values(members: Mapping[str, Any]) -> set[str]:
    """Text forms of every value the record leaves out, to cut out of error messages."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        value = _plain(value)
        if isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            found.add(base64.b64encode(raw).decode())
            found.add(raw.decode("utf-8", "ignore"))
            found.add(raw.hex())
        elif isinstance(value, str):
            found.add(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    for name, value in members.items():
        if name not in REQUEST_FIELDS or REQUEST_FIELDS[name](value) is _DROP:
            walk(value)
    return {v for v in found if len(v) >= _MIN_SCRUB_LENGTH}


def _scrub(message: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, _OMITTED)
    return message


def _scalars(values: Mapping[str, Any] | None, allowed: frozenset[str], what: str) -> Any:
    if not values:
        return None
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in allowed:
            raise ValueError(f"{what}: {name!r} is not an allowed member")
        value = _plain(value)
        if isinstance(value, dt.datetime):
            value = _time(value)
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ValueError(f"{what}: {name!r} must be a string, number, boolean or null")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what}: {name!r} must be a finite number")
        out[name] = value
    return out


def _resources(key_arns: Sequence[str], account_id: str) -> list[dict[str, str]]:
    return [_resource(arn, account_id) for arn in dict.fromkeys(key_arns)]  # unique, in order


def _resource(arn: str, account_id: str) -> dict[str, str]:
    parts = arn.split(":")
    owner = parts[4] if len(parts) > 5 and parts[0] == "arn" and parts[4] else account_id
    return {"accountId": owner, "type": KEY_RESOURCE_TYPE, "ARN": arn}


def api_call_record(
    event_name: str,
    *,
    identity: UserIdentity,
    account_id: str,
    region: str,
    request_id: str,
    read_only: bool,
    request: Mapping[str, Any] | BaseModel | None = None,
    response: Mapping[str, Any] | BaseModel | None = None,
    key_arns: Sequence[str] = (),
    source_ip: str | None = None,
    user_agent: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    additional_event_data: Mapping[str, Any] | None = None,
    event_time: dt.datetime | None = None,
    event_id: str | None = None,
    event_source: str = EVENT_SOURCE,
) -> AuditRecord:
    """The record of one API call (``eventType`` ``AwsApiCall``), allowed or denied, successful
    or failed. ``event_source`` is ``kms.amazonaws.com`` but for the credential changes of
    ``hsmkms credentials`` (``iam.amazonaws.com``, as IAM's own records).

    ``read_only`` is CloudTrail's ``readOnly`` for the operation (its ``responseElements`` are
    then null); the service's operation descriptors say which operations are.
    ``request``/``response`` are the operation's request and response (a wire model or a dict
    with the AWS PascalCase member names); only allow-listed members are copied (see the module
    docstring). ``key_arns`` are the ARNs of the keys the call used or named (``resources``).
    ``error_code`` is the AWS ``__type`` when the call failed. ``additional_event_data`` carries
    what the service knows beyond the wire (``keyVersion``, ``failureReason``, ...).
    """
    members = _members(request)
    record: AuditRecord = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": identity.to_dict(),
        "eventTime": format_event_time(event_time or utc_now()),
        "eventSource": event_source,
        "eventName": event_name,
        "awsRegion": region,
        "sourceIPAddress": source_ip,
        "userAgent": user_agent,
        "requestParameters": _bounded_parameters(request_parameters(event_name, members))[0],
        "responseElements": None
        if error_code
        else response_elements(response, read_only=read_only),
        "requestID": request_id,
        "eventID": event_id or str(uuid.uuid4()),
        "readOnly": read_only,
        "resources": _resources(key_arns, account_id),
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": account_id,
        "eventCategory": "Management",
    }
    if error_code is not None:
        record["errorCode"] = error_code
        record["errorMessage"] = _error_message(error_message or "", members)
    extra = _scalars(additional_event_data, ADDITIONAL_EVENT_DATA_FIELDS, "additionalEventData")
    if extra is not None:
        record["additionalEventData"] = extra
    return record


UNAUTHENTICATED_SUMMARY_EVENT: Final = "UnauthenticatedRequests"


def unauthenticated_summary_record(
    *,
    account_id: str,
    region: str,
    source_ip: str,
    count: int,
    first: dt.datetime,
    last: dt.datetime,
    error_codes: Sequence[tuple[str, int]],
    event_id: str | None = None,
) -> AuditRecord:
    """The record standing for ``count`` requests from ``source_ip`` that did not authenticate
    and were counted rather than recorded one by one (:mod:`hsmkms.api.unauthenticated`):
    ``eventName`` ``UnauthenticatedRequests``, ``userIdentity`` ``Unknown``, the count, the
    times of the first and last, and the error codes with their counts
    (``"InvalidSignatureException:12,UnrecognizedClientException:3"``)."""
    record: AuditRecord = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": {"type": "Unknown"},
        "eventTime": format_event_time(last),
        "eventSource": EVENT_SOURCE,
        "eventName": UNAUTHENTICATED_SUMMARY_EVENT,
        "awsRegion": region,
        "sourceIPAddress": source_ip,
        "userAgent": None,
        "requestParameters": None,
        "responseElements": None,
        "requestID": None,
        "eventID": event_id or str(uuid.uuid4()),
        "readOnly": True,
        "resources": [],
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": account_id,
        "eventCategory": "Management",
    }
    record["additionalEventData"] = _scalars(
        {
            "requestCount": count,
            "firstEventTime": format_event_time(first),
            "lastEventTime": format_event_time(last),
            "errorCodes": ",".join(f"{code}:{n}" for code, n in error_codes),
        },
        ADDITIONAL_EVENT_DATA_FIELDS,
        "additionalEventData",
    )
    return record


def service_event_record(
    event_name: str,
    *,
    account_id: str,
    region: str,
    key_arn: str,
    details: Mapping[str, Any] | None = None,
    additional_event_data: Mapping[str, Any] | None = None,
    event_time: dt.datetime | None = None,
    event_id: str | None = None,
) -> AuditRecord:
    """The record of something the service did by itself (``eventType`` ``AwsServiceEvent``):
    ``RotateKey`` (automatic rotation), ``DeleteKey`` (end of the deletion waiting period).

    ``details`` becomes ``serviceEventDetails`` (default ``{"keyId": <key id>}``).
    """
    service_details = _scalars(
        details if details is not None else {"keyId": key_id_of(key_arn)},
        SERVICE_EVENT_DETAIL_FIELDS,
        "serviceEventDetails",
    )
    record: AuditRecord = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": {"accountId": account_id, "invokedBy": EVENT_SOURCE},
        "eventTime": format_event_time(event_time or utc_now()),
        "eventSource": EVENT_SOURCE,
        "eventName": event_name,
        "awsRegion": region,
        "sourceIPAddress": EVENT_SOURCE,
        "userAgent": EVENT_SOURCE,
        "requestParameters": None,
        "responseElements": None,
        "eventID": event_id or str(uuid.uuid4()),
        "readOnly": False,
        "resources": _resources([key_arn], account_id),
        "eventType": "AwsServiceEvent",
        "managementEvent": True,
        "recipientAccountId": account_id,
        "eventCategory": "Management",
        "serviceEventDetails": service_details,
    }
    extra = _scalars(additional_event_data, ADDITIONAL_EVENT_DATA_FIELDS, "additionalEventData")
    if extra is not None:
        record["additionalEventData"] = extra
    return record


OPERATOR_EVENTS: Final = frozenset({"BackupDataDirectory", "RestoreDataDirectory"})
"""What an operator does to a data directory that the trail records (``hsmkms backup``,
``hsmkms restore``): every key leaves with a backup, and a restore rolls the keys and the trail
back to the backup's time, so both must be visible in the trail."""


def operator_event_record(
    event_name: str,
    *,
    identity: UserIdentity,
    account_id: str,
    region: str,
    details: Mapping[str, Any],
    user_agent: str,
    event_time: dt.datetime | None = None,
) -> AuditRecord:
    """The record of an operator's act on the whole data directory (:data:`OPERATOR_EVENTS`):
    ``eventType`` ``AwsServiceEvent`` (no API request made it) with the local operator as
    ``userIdentity`` and ``serviceEventDetails`` from ``details`` (allow-listed, scalars)."""
    if event_name not in OPERATOR_EVENTS:
        raise ValueError(f"not an operator event: {event_name!r}")
    return {
        "eventVersion": EVENT_VERSION,
        "userIdentity": identity.to_dict(),
        "eventTime": format_event_time(event_time or utc_now()),
        "eventSource": EVENT_SOURCE,
        "eventName": event_name,
        "awsRegion": region,
        "sourceIPAddress": "hsmkms-cli",
        "userAgent": user_agent,
        "requestParameters": None,
        "responseElements": None,
        "eventID": str(uuid.uuid4()),
        "readOnly": event_name == "BackupDataDirectory",
        "resources": [],
        "eventType": "AwsServiceEvent",
        "managementEvent": True,
        "recipientAccountId": account_id,
        "eventCategory": "Management",
        "serviceEventDetails": _scalars(
            details, SERVICE_EVENT_DETAIL_FIELDS, "serviceEventDetails"
        ),
    }


CONSOLE_EVENT_SOURCE: Final = "signin.amazonaws.com"


def console_sign_in_record(
    *,
    identity: UserIdentity,
    account_id: str,
    region: str,
    success: bool,
    source_ip: str | None,
    user_agent: str | None,
    event_name: str = "ConsoleLogin",
    event_time: dt.datetime | None = None,
) -> AuditRecord:
    """The record of a sign-in to the read-only web console (``eventType``
    ``AwsConsoleSignIn``, shaped as CloudTrail's ``ConsoleLogin``), allowed or refused.
    ``event_name`` ``ConsoleLogout`` records a sign-out. No credential secret is ever passed
    here: ``identity`` holds at most the access key id."""
    if event_name not in ("ConsoleLogin", "ConsoleLogout"):
        raise ValueError(f"not a console sign-in event: {event_name!r}")
    record: AuditRecord = {
        "eventVersion": EVENT_VERSION,
        "userIdentity": identity.to_dict(),
        "eventTime": format_event_time(event_time or utc_now()),
        "eventSource": CONSOLE_EVENT_SOURCE,
        "eventName": event_name,
        "awsRegion": region,
        "sourceIPAddress": source_ip,
        "userAgent": user_agent,
        "requestParameters": None,
        "responseElements": {event_name: "Success" if success else "Failure"},
        "additionalEventData": {"MFAUsed": "No"},
        "eventID": str(uuid.uuid4()),
        "readOnly": False,
        "resources": [],
        "eventType": "AwsConsoleSignIn",
        "managementEvent": True,
        "recipientAccountId": account_id,
        "eventCategory": "Management",
    }
    if not success:
        record["errorMessage"] = "Failed authentication"
    return record


# --------------------------------------------------------------------------------------------
# Records as the trail stores them
# --------------------------------------------------------------------------------------------

SEARCH_COLUMNS: Final = ("event_time", "event_name", "principal", "access_key_id", "key_ids")
"""The trail's search columns, copied from each record (never trusted: see ``trail.py``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A record as the trail stores it: its canonical JSON (``body``) and its search columns
    (``columns``, in :data:`SEARCH_COLUMNS` order)."""

    body: bytes
    columns: tuple[Any, ...]


@functools.lru_cache(maxsize=64)
def _event_time_column(when: str) -> str:
    # Cached: the records of one second share their eventTime.
    parsed = dt.datetime.fromisoformat(when)
    if parsed.tzinfo is None:
        raise ValueError("an audit record's eventTime needs a zone")
    return format_event_time(parsed)


def record_key_ids(record: Mapping[str, Any]) -> set[str]:
    """The key ids of the ARNs among a record's ``resources``."""
    ids = set()
    resources = record.get("resources")
    for res in resources if isinstance(resources, list) else []:
        arn = res.get("ARN") if isinstance(res, Mapping) else None
        if isinstance(arn, str):
            ids.add(key_id_of(arn))
    return ids


def _key_ids_column(key_ids: set[str]) -> str:
    # Space-delimited with a space at each end, so ``LIKE '% <id> %'`` finds whole ids.
    return " " + " ".join(sorted(key_ids)) + " "


def search_columns(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """The search columns of ``record`` (:data:`SEARCH_COLUMNS` order): ``ValueError`` when it
    lacks what every record has (a non-empty ``eventName``, an ``eventTime`` with a zone)."""
    name = record.get("eventName")
    if not isinstance(name, str) or not name:
        raise ValueError("an audit record needs an eventName")
    when = record.get("eventTime")
    if not isinstance(when, str):
        raise ValueError("an audit record needs an eventTime")
    identity = record.get("userIdentity")
    identity = identity if isinstance(identity, Mapping) else {}
    principal = identity.get("arn")
    access_key = identity.get("accessKeyId")
    return (
        _event_time_column(when),
        name,
        principal if isinstance(principal, str) else None,
        access_key if isinstance(access_key, str) else None,
        _key_ids_column(record_key_ids(record)),
    )


def prepare_record(record: AuditRecord) -> PreparedRecord:
    """Encode ``record`` for the trail: everything an append does that needs no lock.
    ``ValueError``/``TypeError`` when it is not a valid record (see :func:`search_columns`; a
    value that is not plain JSON, such as ``bytes``)."""
    return PreparedRecord(canonical_json(record), search_columns(record))


@functools.lru_cache(maxsize=1024)
def _identity_json(identity: UserIdentity) -> str:
    return _json(identity.to_dict())


@functools.lru_cache(maxsize=4096)
def _resources_json(key_arns: tuple[str, ...], account_id: str) -> tuple[str, str]:
    resources = _resources(key_arns, account_id)
    return _json(resources), _key_ids_column(record_key_ids({"resources": resources}))


class _Second:
    """The current second's ``eventTime`` text, formatted once per second."""

    second = -1
    text = ""


def _now_text() -> str:
    """``format_event_time(utc_now())``, formatted once per second (the same clock)."""
    now = time.time()
    second = int(now)
    if second != _Second.second:
        _Second.text = format_event_time(dt.datetime.fromtimestamp(second, dt.UTC))
        _Second.second = second
    return _Second.text


def _uuid4_text() -> str:
    """``str(uuid.uuid4())``, in half the time."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def prepare_api_call(
    event_name: str,
    *,
    identity: UserIdentity,
    account_id: str,
    region: str,
    request_id: str,
    read_only: bool,
    request: Mapping[str, Any] | BaseModel | None = None,
    response: Mapping[str, Any] | BaseModel | None = None,
    key_arns: Sequence[str] = (),
    source_ip: str | None = None,
    user_agent: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    additional_event_data: Mapping[str, Any] | None = None,
    event_time: dt.datetime | None = None,
    event_id: str | None = None,
    event_source: str = EVENT_SOURCE,
) -> PreparedRecord:
    """``prepare_record(api_call_record(...))`` with the same arguments, byte for byte (a test
    holds the two together), at a fraction of the cost: the record's members are encoded one by
    one — the caller's ``userIdentity`` and the ``resources`` of a set of keys once, then from
    a cache — and joined in sorted order, which is what canonical JSON of the whole is."""
    if not isinstance(event_name, str) or not event_name:
        raise ValueError("an audit record needs an eventName")
    when = format_event_time(event_time) if event_time is not None else _now_text()
    resources, key_ids = _resources_json(tuple(key_arns), account_id)
    params = _bounded_parameters(request_parameters(event_name, request))[1]
    if error_code is None:
        errors = ""
        elements = _json(response_elements(response, read_only=read_only))
    else:
        message = _json(_error_message(error_message or "", _members(request)))
        errors = f'"errorCode":{_json(error_code)},"errorMessage":{message},'
        elements = "null" if error_code else _json(response_elements(response, read_only=read_only))
    extra = _scalars(additional_event_data, ADDITIONAL_EVENT_DATA_FIELDS, "additionalEventData")
    head = "" if extra is None else f'"additionalEventData":{_json(extra)},'
    read_only_json = "true" if read_only else "false"
    source = _EVENT_SOURCE_JSON if event_source == EVENT_SOURCE else _json(event_source)
    # The members in sorted order (canonical JSON); the property test checks the order too.
    body = (
        f'{{{head}"awsRegion":{_json(region)},{errors}"eventCategory":"Management",'
        f'"eventID":{_json(event_id or _uuid4_text())},"eventName":{_json(event_name)},'
        f'"eventSource":{source},"eventTime":{_json(when)},'
        f'"eventType":"AwsApiCall","eventVersion":{_EVENT_VERSION_JSON},'
        f'"managementEvent":true,"readOnly":{read_only_json},'
        f'"recipientAccountId":{_json(account_id)},"requestID":{_json(request_id)},'
        f'"requestParameters":{params},"resources":{resources},"responseElements":{elements},'
        f'"sourceIPAddress":{_json(source_ip)},"userAgent":{_json(user_agent)},'
        f'"userIdentity":{_identity_json(identity)}}}'
    )
    principal, access_key = identity.arn, identity.access_key_id
    columns = (
        _event_time_column(when),
        event_name,
        principal if isinstance(principal, str) else None,
        access_key if isinstance(access_key, str) else None,
        key_ids,
    )
    return PreparedRecord(body.encode("ascii"), columns)


_EVENT_SOURCE_JSON: Final = _json(EVENT_SOURCE)
_EVENT_VERSION_JSON: Final = _json(EVENT_VERSION)
