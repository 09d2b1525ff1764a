"""Custom key stores of type AWS_CLOUDHSM (``docs/key-stores.md``, "Custom key stores"):
CreateCustomKeyStore, DescribeCustomKeyStores, ConnectCustomKeyStore,
DisconnectCustomKeyStore, UpdateCustomKeyStore, DeleteCustomKeyStore.

A store is backed by one cluster: a further PKCS#11 token the operator registered
(``hsmkms clusters add``), never the API. Its password is the token's user PIN, kept sealed by
a key in the default token. The state rules are AWS's (botocore model and developer guide):

- Connect: DISCONNECTED -> CONNECTING, then CONNECTED or FAILED (asynchronous; callers poll
  DescribeCustomKeyStores); CONNECTED or CONNECTING: nothing to do; FAILED or DISCONNECTING:
  CustomKeyStoreInvalidStateException (disconnect first).
- Disconnect: CONNECTED, CONNECTING or FAILED -> DISCONNECTED; otherwise
  CustomKeyStoreInvalidStateException.
- Update and Delete: only DISCONNECTED. Delete: CustomKeyStoreHasCMKsException while keys
  (pending deletion included) remain.

External key stores (EXTERNAL_KEY_STORE, ``docs/key-stores.md``, "External key stores"):
hsmkms is the XKS client. A store names its proxy (endpoint, path, PUBLIC_ENDPOINT
connectivity) and the credential it signs with; the secret access key is sealed like a
password. Connect calls the proxy's health route (``hsmkms.service.xks_client``).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import uuid
from collections.abc import Callable
from typing import Final

import structlog

from hsmkms.errors import (
    ClientError,
    CloudHsmClusterNotFoundException,
    CloudHsmClusterNotRelatedException,
    CustomKeyStoreHasCMKsException,
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNotFoundException,
    IncorrectTrustAnchorException,
    InvalidMarkerException,
    UnsupportedOperationException,
    ValidationException,
    XksProxyIncorrectAuthenticationCredentialException,
    XksProxyInvalidConfigurationException,
    XksProxyInvalidResponseException,
    XksProxyUriUnreachableException,
)
from hsmkms.models import (
    ConnectCustomKeyStoreRequest,
    CreateCustomKeyStoreRequest,
    CreateCustomKeyStoreResponse,
    CustomKeyStoresListEntry,
    DeleteCustomKeyStoreRequest,
    DescribeCustomKeyStoresRequest,
    DescribeCustomKeyStoresResponse,
    DisconnectCustomKeyStoreRequest,
    EmptyResponse,
    UpdateCustomKeyStoreRequest,
)
from hsmkms.models.enums import CustomKeyStoreType
from hsmkms.service.core import Call, ServiceCore, operation, page_limit
from hsmkms.service.custom_stores import CONNECTED, CONNECTING, DISCONNECTED, EXTERNAL, FAILED
from hsmkms.service.xks_client import XksProxyFailure, XksProxyLocation
from hsmkms.store.key_stores import CustomKeyStoreRecord, XksProxyConfig

__all__ = ["KeyStoreOperations"]

log = structlog.get_logger(__name__)

_CLOUDHSM: Final = CustomKeyStoreType.AWS_CLOUDHSM.value
_PASSWORD_MIN: Final = 7
_PASSWORD_MAX: Final = 32
_XKS_MEMBERS: Final = (
    "XksProxyUriEndpoint",
    "XksProxyUriPath",
    "XksProxyVpcEndpointServiceName",
    "XksProxyVpcEndpointServiceOwner",
    "XksProxyAuthenticationCredential",
    "XksProxyConnectivity",
)
_MARKER_PREFIX: Final = "cks:"
_CLOUDHSM_MEMBERS: Final = ("CloudHsmClusterId", "TrustAnchorCertificate", "KeyStorePassword")
# botocore: XksProxyUriEndpointType (https only; http:// where HSMKMS_XKS_ALLOW_HTTP allows,
# and a port, which AWS's pattern leaves out), XksProxyUriPathType, the credential's members.
_URI_ENDPOINT: Final = re.compile(r"(https?)://[a-zA-Z0-9.-]+(:[0-9]{1,5})?")
_URI_PATH: Final = re.compile(r"(/[a-zA-Z0-9/_-]+/kms/xks/v\d{1,2})|(/kms/xks/v\d{1,2})")
_ACCESS_KEY_ID: Final = re.compile(r"[A-Z2-7]{20,30}")
_SECRET: Final = re.compile(r"[a-zA-Z0-9/+=]{43,64}")
_PUBLIC_ENDPOINT: Final = "PUBLIC_ENDPOINT"
_VPC_ENDPOINT_SERVICE: Final = "VPC_ENDPOINT_SERVICE"


def _check_password(password: str | None, *, required: bool) -> None:
    """KeyStorePassword's constraints (botocore: 7-32 characters), worded as AWS words a
    sensitive member: without its value."""
    if password is None:
        if required:
            raise ValidationException(
                "1 validation error detected: Value null at 'keyStorePassword' failed to satisfy "
                "constraint: Member must not be null"
            )
        return
    if len(password) < _PASSWORD_MIN:
        bound = f"greater than or equal to {_PASSWORD_MIN}"
    elif len(password) > _PASSWORD_MAX:
        bound = f"less than or equal to {_PASSWORD_MAX}"
    else:
        return
    raise ValidationException(
        "1 validation error detected: Value at 'keyStorePassword' failed to satisfy constraint: "
        f"Member must have length {bound}"
    )


def _no_xks_members(request: CreateCustomKeyStoreRequest | UpdateCustomKeyStoreRequest) -> None:
    given = [name for name in _XKS_MEMBERS if getattr(request, name) is not None]
    if given:
        raise ValidationException(
            f"{given[0]} is not valid for a custom key store of type AWS_CLOUDHSM."
        )


def _invalid(member: str, constraint: str) -> ValidationException:
    """A member's value refused, without its value (some are secret)."""
    return ValidationException(
        f"1 validation error detected: Value at '{member}' failed to satisfy constraint: "
        f"{constraint}"
    )


def _xks_credential(value: dict[str, object] | None) -> tuple[str, str]:
    """XksProxyAuthenticationCredential's (AccessKeyId, RawSecretAccessKey), checked against
    botocore's patterns; the secret never echoed."""
    if value is None:
        raise ValidationException(
            "XksProxyAuthenticationCredential is required for an EXTERNAL_KEY_STORE key store."
        )
    key_id = value.get("AccessKeyId")
    secret = value.get("RawSecretAccessKey")
    if not isinstance(key_id, str) or _ACCESS_KEY_ID.fullmatch(key_id) is None:
        raise _invalid(
            "xksProxyAuthenticationCredential.accessKeyId",
            "Member must satisfy regular expression pattern: ^[A-Z2-7]{20,30}$",
        )
    if not isinstance(secret, str) or _SECRET.fullmatch(secret) is None:
        raise _invalid(
            "xksProxyAuthenticationCredential.rawSecretAccessKey",
            "Member must satisfy regular expression pattern: ^[a-zA-Z0-9/+=]{43,64}$",
        )
    return key_id, secret


def _xks_proxy(
    request: CreateCustomKeyStoreRequest | UpdateCustomKeyStoreRequest,
    current: XksProxyConfig | None = None,
) -> XksProxyConfig:
    """The proxy an EXTERNAL_KEY_STORE request names (patterns and connectivity checked); for
    an update, the members not given are ``current``'s."""
    connectivity = request.XksProxyConnectivity or (current and current.connectivity)
    if not connectivity:
        raise ValidationException(
            "XksProxyConnectivity is required for an EXTERNAL_KEY_STORE key store."
        )
    if connectivity == _VPC_ENDPOINT_SERVICE or request.XksProxyVpcEndpointServiceName:
        raise UnsupportedOperationException(
            "XksProxyConnectivity VPC_ENDPOINT_SERVICE is not supported: hsmkms reaches XKS "
            "proxies over PUBLIC_ENDPOINT only."
        )
    if connectivity != _PUBLIC_ENDPOINT:
        raise _invalid(
            "xksProxyConnectivity",
            "Member must satisfy enum value set: [PUBLIC_ENDPOINT, VPC_ENDPOINT_SERVICE]",
        )
    endpoint = request.XksProxyUriEndpoint or (current and current.uri_endpoint)
    path = request.XksProxyUriPath or (current and current.uri_path)
    if not endpoint or not path:
        raise ValidationException(
            "XksProxyUriEndpoint and XksProxyUriPath are required for an EXTERNAL_KEY_STORE "
            "key store."
        )
    if _URI_ENDPOINT.fullmatch(endpoint) is None:
        raise _invalid(
            "xksProxyUriEndpoint",
            "Member must satisfy regular expression pattern: ^https://[a-zA-Z0-9.-]+$",
        )
    if _URI_PATH.fullmatch(path) is None:
        raise _invalid(
            "xksProxyUriPath",
            "Member must satisfy regular expression pattern: "
            "^(/[a-zA-Z0-9\\/_-]+/kms/xks/v\\d{1,2})$|^(/kms/xks/v\\d{1,2})$",
        )
    if current is not None and request.XksProxyAuthenticationCredential is None:
        key_id = current.access_key_id
    else:
        key_id, _secret = _xks_credential(request.XksProxyAuthenticationCredential)
    return XksProxyConfig(endpoint, path, key_id, connectivity)


def _prepare_create(request: CreateCustomKeyStoreRequest) -> None:
    kind = request.CustomKeyStoreType or CustomKeyStoreType.AWS_CLOUDHSM
    if kind is CustomKeyStoreType.EXTERNAL_KEY_STORE:
        given = [name for name in _CLOUDHSM_MEMBERS if getattr(request, name) is not None]
        if given:
            raise ValidationException(
                f"{given[0]} is not valid for a custom key store of type EXTERNAL_KEY_STORE."
            )
        _xks_proxy(request)
        return
    _no_xks_members(request)
    if request.CloudHsmClusterId is None:
        raise ValidationException("CloudHsmClusterId is required for an AWS_CLOUDHSM key store.")
    if request.TrustAnchorCertificate is None:
        raise ValidationException(
            "TrustAnchorCertificate is required for an AWS_CLOUDHSM key store."
        )
    _check_password(request.KeyStorePassword, required=True)


def _prepare_update(request: UpdateCustomKeyStoreRequest) -> None:
    _check_password(request.KeyStorePassword, required=False)
    xks_given = any(getattr(request, name) is not None for name in _XKS_MEMBERS)
    if (
        request.NewCustomKeyStoreName is None
        and request.KeyStorePassword is None
        and request.CloudHsmClusterId is None
        and not xks_given
    ):
        raise ValidationException(
            "Specify NewCustomKeyStoreName, KeyStorePassword, CloudHsmClusterId or an XKS "
            "proxy member."
        )


def _new_store_id() -> str:
    """``cks-`` and 17 hex digits, as AWS's ids look."""
    return "cks-" + secrets.token_hex(9)[:17]


def _encode_marker(store_id: str) -> str:
    return base64.urlsafe_b64encode((_MARKER_PREFIX + store_id).encode()).decode("ascii")


def _decode_marker(marker: str) -> str:
    try:
        text = base64.urlsafe_b64decode(marker.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidMarkerException("The marker is not valid.") from None
    if not text.startswith(_MARKER_PREFIX):
        raise InvalidMarkerException("The marker is not valid.")
    return text[len(_MARKER_PREFIX) :]


def _invalid_state(
    record: CustomKeyStoreRecord, wanted: str
) -> CustomKeyStoreInvalidStateException:
    return CustomKeyStoreInvalidStateException(
        f"The custom key store {record.store_id} is {record.connection_state}; this operation "
        f"requires it to be {wanted}."
    )


def _require_disconnected(record: CustomKeyStoreRecord) -> None:
    if record.connection_state != DISCONNECTED:
        raise _invalid_state(record, DISCONNECTED)


def _require_settled(record: CustomKeyStoreRecord) -> None:
    """botocore: the name, and an external store's path and credential, may change while the
    store is connected or disconnected (not while it is connecting, failed or disconnecting)."""
    if record.connection_state not in (CONNECTED, DISCONNECTED):
        raise _invalid_state(record, f"{CONNECTED} or {DISCONNECTED}")


# botocore UpdateCustomKeyStoreRequest: the members that need a DISCONNECTED store; the name,
# XksProxyUriPath and XksProxyAuthenticationCredential do not.
_NEED_DISCONNECTED: Final = (
    "KeyStorePassword",
    "CloudHsmClusterId",
    "XksProxyUriEndpoint",
    "XksProxyVpcEndpointServiceName",
    "XksProxyVpcEndpointServiceOwner",
    "XksProxyConnectivity",
)

# A proxy's health check failing before an update of a connected store: AWS's exception for
# each ConnectionErrorCode (XKS_PROXY_INVALID_CONFIGURATION and TLS: the configuration).
_UPDATE_REFUSALS: Final[dict[str, type[ClientError]]] = {
    "XKS_PROXY_ACCESS_DENIED": XksProxyIncorrectAuthenticationCredentialException,
    "XKS_PROXY_NOT_REACHABLE": XksProxyUriUnreachableException,
    "XKS_PROXY_TIMED_OUT": XksProxyUriUnreachableException,
    "XKS_PROXY_INVALID_RESPONSE": XksProxyInvalidResponseException,
}


class KeyStoreOperations(ServiceCore):
    """The custom key store operations of :class:`~hsmkms.service.KmsService`."""

    def _store_entry(self, record: CustomKeyStoreRecord) -> CustomKeyStoresListEntry:
        xks = None
        if record.xks is not None:
            xks = {
                "Connectivity": record.xks.connectivity,
                "AccessKeyId": record.xks.access_key_id,
                "UriEndpoint": record.xks.uri_endpoint,
                "UriPath": record.xks.uri_path,
            }
        cluster = (
            None
            if record.cluster_id is None
            else self.custom_key_stores.table.cluster(record.cluster_id)
        )
        failed = record.connection_state == FAILED
        return CustomKeyStoresListEntry.model_validate(
            {
                "CustomKeyStoreId": record.store_id,
                "CustomKeyStoreName": record.name,
                "CloudHsmClusterId": record.cluster_id,
                "TrustAnchorCertificate": None if cluster is None else cluster.trust_anchor,
                "ConnectionState": record.connection_state,
                "ConnectionErrorCode": record.connection_error_code if failed else None,
                "CreationDate": record.created_at,
                "CustomKeyStoreType": record.store_type,
                "XksProxyConfiguration": xks,
            }
        )

    @operation("CreateCustomKeyStore", prepare=_prepare_create)
    def create_custom_key_store(
        self, call: Call[CreateCustomKeyStoreRequest]
    ) -> CreateCustomKeyStoreResponse:
        """CreateCustomKeyStore (AWS_CLOUDHSM): a DISCONNECTED store on a registered cluster
        whose trust anchor the caller names; the password is sealed, never checked here (AWS
        checks it on connecting)."""
        request = call.request
        if request.CustomKeyStoreType is CustomKeyStoreType.EXTERNAL_KEY_STORE:
            return self._create_external_key_store(call)
        assert request.CloudHsmClusterId is not None  # checked by the prepare hook
        assert request.KeyStorePassword is not None
        table = self.custom_key_stores.table
        cluster = table.cluster(request.CloudHsmClusterId)
        if cluster is None:
            raise CloudHsmClusterNotFoundException(
                f"Cluster '{request.CloudHsmClusterId}' does not exist."
            )
        if (request.TrustAnchorCertificate or "").strip() != cluster.trust_anchor.strip():
            raise IncorrectTrustAnchorException(
                f"The trust anchor certificate does not match cluster {cluster.cluster_id}'s."
            )
        store_id = _new_store_id()
        table.create(
            store_id,
            request.CustomKeyStoreName,
            _CLOUDHSM,
            cluster.cluster_id,
            request.KeyStorePassword,
        )
        if call.caller is not None:
            call.caller.custom_key_store_id = store_id
        return CreateCustomKeyStoreResponse(CustomKeyStoreId=store_id)

    def _create_external_key_store(
        self, call: Call[CreateCustomKeyStoreRequest]
    ) -> CreateCustomKeyStoreResponse:
        """CreateCustomKeyStore (EXTERNAL_KEY_STORE): a DISCONNECTED store naming its XKS proxy;
        the credential's secret is sealed, the proxy first called on connecting."""
        request = call.request
        proxy = _xks_proxy(request)
        if (
            proxy.uri_endpoint.startswith("http://")
            and not self.custom_key_stores.xks.settings.allow_http
        ):
            raise XksProxyInvalidConfigurationException(
                "XksProxyUriEndpoint must use https:// (http:// is accepted only where the "
                "server runs with HSMKMS_XKS_ALLOW_HTTP=1)."
            )
        _key_id, secret = _xks_credential(request.XksProxyAuthenticationCredential)
        store_id = _new_store_id()
        self.custom_key_stores.table.create_external(
            store_id, request.CustomKeyStoreName, proxy, secret
        )
        if call.caller is not None:
            call.caller.custom_key_store_id = store_id
        return CreateCustomKeyStoreResponse(CustomKeyStoreId=store_id)

    @operation("DescribeCustomKeyStores")
    def describe_custom_key_stores(
        self, call: Call[DescribeCustomKeyStoresRequest]
    ) -> DescribeCustomKeyStoresResponse:
        """DescribeCustomKeyStores: one store by id or name (CustomKeyStoreNotFoundException
        when none), or every store, oldest first, Limit/Marker paginated."""
        request = call.request
        table = self.custom_key_stores.table
        if request.CustomKeyStoreId is not None and request.CustomKeyStoreName is not None:
            raise ValidationException(
                "Specify either CustomKeyStoreId or CustomKeyStoreName, not both."
            )
        if request.CustomKeyStoreId is not None:
            records = [table.require(request.CustomKeyStoreId)]
        else:
            records = table.stores()
            if request.CustomKeyStoreName is not None:
                records = [r for r in records if r.name == request.CustomKeyStoreName]
                if not records:
                    raise CustomKeyStoreNotFoundException(
                        f"Custom key store '{request.CustomKeyStoreName}' does not exist."
                    )
        if request.Marker is not None:
            after = _decode_marker(request.Marker)
            ids = [r.store_id for r in records]
            if after not in ids:
                raise InvalidMarkerException("The marker is not valid.")
            records = records[ids.index(after) + 1 :]
        limit = page_limit(request.Limit, 1000)
        page, rest = records[:limit], records[limit:]
        return DescribeCustomKeyStoresResponse(
            CustomKeyStores=[self._store_entry(r) for r in page],
            NextMarker=_encode_marker(page[-1].store_id) if rest else None,
            Truncated=bool(rest),
        )

    @operation("ConnectCustomKeyStore")
    def connect_custom_key_store(self, call: Call[ConnectCustomKeyStoreRequest]) -> EmptyResponse:
        """ConnectCustomKeyStore: CONNECTING now, CONNECTED or FAILED once the token was tried
        (in the background)."""
        stores = self.custom_key_stores
        record = stores.table.require(call.request.CustomKeyStoreId)
        if call.caller is not None:
            call.caller.custom_key_store_id = record.store_id
        state = record.connection_state
        if state in (CONNECTED, CONNECTING):
            return EmptyResponse()
        if state != DISCONNECTED:
            # spec: AWS KMS ConnectCustomKeyStore — a FAILED store must be disconnected first.
            raise _invalid_state(record, DISCONNECTED)
        if not stores.table.set_state(
            record.store_id, CONNECTING, expect=(DISCONNECTED,), generation=record.generation
        ):
            raise _invalid_state(stores.table.require(record.store_id), DISCONNECTED)
        stores.start_connecting(record)
        return EmptyResponse()

    @operation("DisconnectCustomKeyStore")
    def disconnect_custom_key_store(
        self, call: Call[DisconnectCustomKeyStoreRequest]
    ) -> EmptyResponse:
        """DisconnectCustomKeyStore: DISCONNECTED; the store's keys cannot be used until it is
        connected again (every process notices on its next use)."""
        stores = self.custom_key_stores
        record = stores.table.require(call.request.CustomKeyStoreId)
        if call.caller is not None:
            call.caller.custom_key_store_id = record.store_id
        connected = (CONNECTED, CONNECTING, FAILED)
        if record.connection_state not in connected or not stores.table.set_state(
            record.store_id, DISCONNECTED, expect=connected
        ):
            current = stores.table.require(record.store_id)
            raise CustomKeyStoreInvalidStateException(
                f"The custom key store {current.store_id} is {current.connection_state}: it "
                "cannot be disconnected."
            )
        stores.drop(record.store_id)
        return EmptyResponse()

    @operation("UpdateCustomKeyStore", prepare=_prepare_update)
    def update_custom_key_store(self, call: Call[UpdateCustomKeyStoreRequest]) -> EmptyResponse:
        """UpdateCustomKeyStore: a new name, password, or cluster — the same token registered
        under another cluster id (CloudHsmClusterNotRelatedException otherwise); only while
        DISCONNECTED."""
        request = call.request
        table = self.custom_key_stores.table
        record = table.require(request.CustomKeyStoreId)
        if call.caller is not None:
            call.caller.custom_key_store_id = record.store_id
        check = (
            _require_disconnected
            if any(getattr(request, name) is not None for name in _NEED_DISCONNECTED)
            else _require_settled
        )
        check(record)
        if record.store_type == EXTERNAL:
            return self._update_external_key_store(call, record, check)
        _no_xks_members(request)
        new_cluster = None
        if request.CloudHsmClusterId is not None and request.CloudHsmClusterId != record.cluster_id:
            new_cluster = table.cluster(request.CloudHsmClusterId)
            if new_cluster is None:
                raise CloudHsmClusterNotFoundException(
                    f"Cluster '{request.CloudHsmClusterId}' does not exist."
                )
            old = None if record.cluster_id is None else table.cluster(record.cluster_id)
            if old is None or old.trust_anchor != new_cluster.trust_anchor:
                raise CloudHsmClusterNotRelatedException(
                    f"Cluster '{new_cluster.cluster_id}' is not related to the custom key "
                    f"store's cluster '{record.cluster_id}'."
                )
        table.update(
            record.store_id,
            check=check,
            name=request.NewCustomKeyStoreName,
            password=request.KeyStorePassword,
            cluster_id=None if new_cluster is None else new_cluster.cluster_id,
        )
        return EmptyResponse()

    def _update_external_key_store(
        self,
        call: Call[UpdateCustomKeyStoreRequest],
        record: CustomKeyStoreRecord,
        check: Callable[[CustomKeyStoreRecord], None],
    ) -> EmptyResponse:
        """UpdateCustomKeyStore of an EXTERNAL_KEY_STORE: a new name, path or credential (the
        secret sealed anew) in any settled state — a CONNECTED store's proxy must first answer
        GetHealthStatus with the new values, as AWS asks it; the endpoint and connectivity
        only while DISCONNECTED."""
        request = call.request
        if request.KeyStorePassword is not None or request.CloudHsmClusterId is not None:
            raise ValidationException(
                "KeyStorePassword and CloudHsmClusterId are not valid for a custom key store of "
                "type EXTERNAL_KEY_STORE."
            )
        xks_given = any(getattr(request, name) is not None for name in _XKS_MEMBERS)
        proxy = _xks_proxy(request, record.xks) if xks_given else None
        if (
            proxy is not None
            and proxy.uri_endpoint.startswith("http://")
            and not self.custom_key_stores.xks.settings.allow_http
        ):
            raise XksProxyInvalidConfigurationException(
                "XksProxyUriEndpoint must use https:// (http:// is accepted only where the "
                "server runs with HSMKMS_XKS_ALLOW_HTTP=1)."
            )
        secret = None
        if request.XksProxyAuthenticationCredential is not None:
            _key_id, secret = _xks_credential(request.XksProxyAuthenticationCredential)
        if proxy is not None and record.connection_state == CONNECTED:
            self._check_new_proxy(record, proxy, secret)
        self.custom_key_stores.table.update(
            record.store_id,
            check=check,
            name=request.NewCustomKeyStoreName,
            password=secret,
            xks=proxy,
        )
        return EmptyResponse()

    def _check_new_proxy(
        self, record: CustomKeyStoreRecord, proxy: XksProxyConfig, secret: str | None
    ) -> None:
        """The proxy answers GetHealthStatus with a connected store's new path or credential
        before they replace the ones its keys use now; AWS's exception otherwise."""
        stores = self.custom_key_stores
        current = stores.location(record)
        location = XksProxyLocation(
            proxy.uri_endpoint,
            proxy.uri_path,
            proxy.access_key_id,
            current.secret if secret is None else secret,
        )
        try:
            stores.xks.health(location, str(uuid.uuid4()))
        except XksProxyFailure as exc:
            log.warning(
                "external_key_store_update_refused", store_id=record.store_id, **exc.facts()
            )
            refusal = _UPDATE_REFUSALS.get(exc.code, XksProxyInvalidConfigurationException)
            raise refusal(
                f"The XKS proxy did not accept the new settings of custom key store "
                f"{record.store_id} ({exc.code}); nothing was changed."
            ) from None

    @operation("DeleteCustomKeyStore")
    def delete_custom_key_store(self, call: Call[DeleteCustomKeyStoreRequest]) -> EmptyResponse:
        """DeleteCustomKeyStore: only DISCONNECTED, and only once no key (pending deletion
        included) has material in it."""
        table = self.custom_key_stores.table
        store_id = call.request.CustomKeyStoreId
        if call.caller is not None:
            call.caller.custom_key_store_id = store_id

        def check(record: CustomKeyStoreRecord) -> None:
            _require_disconnected(record)
            external = [
                key_id
                for key_id in self.custom_key_stores.table.xks_keys_of(record.store_id)
                if self._store.get_key(key_id) is not None
            ]
            if self._store.count_keys_in_store(record.store_id) or external:
                raise CustomKeyStoreHasCMKsException(
                    f"Custom key store {record.store_id} contains KMS keys: schedule their "
                    "deletion and wait until they are deleted."
                )

        table.delete(store_id, check=check)
        self.custom_key_stores.drop(store_id)
        return EmptyResponse()
