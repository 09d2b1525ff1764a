"""Custom key store operations: CreateCustomKeyStore, DescribeCustomKeyStores,
ConnectCustomKeyStore, DisconnectCustomKeyStore, UpdateCustomKeyStore, DeleteCustomKeyStore
(botocore's KMS model is the authority for names and lengths).

``KeyStorePassword`` has no length constraint here: the service checks it with a message that
never echoes the value (AWS marks the member sensitive), and it never shows in a ``repr``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import Field

from hsmkms.models import enums
from hsmkms.models.base import KmsModel, MarkerType
from hsmkms.models.constraints import Length, Pattern, Range

CLUSTER_ID_PATTERN = r"^cluster-[2-7a-zA-Z]{11,16}$"
"""A CloudHSM cluster id (botocore: ``cluster-[2-7a-zA-Z]{11,16}``, 19-24 characters)."""

CustomKeyStoreIdType = Annotated[str, Length(1, 64)]
CustomKeyStoreNameType = Annotated[str, Length(1, 256)]
CloudHsmClusterIdType = Annotated[str, Length(19, 24), Pattern(CLUSTER_ID_PATTERN)]
TrustAnchorCertificateType = Annotated[str, Length(1, 5000)]


class CreateCustomKeyStoreRequest(KmsModel):
    CustomKeyStoreName: CustomKeyStoreNameType
    CloudHsmClusterId: CloudHsmClusterIdType | None = None
    TrustAnchorCertificate: TrustAnchorCertificateType | None = None
    KeyStorePassword: str | None = Field(default=None, repr=False)
    CustomKeyStoreType: enums.CustomKeyStoreType | None = None
    # The external key store members (EXTERNAL_KEY_STORE).
    XksProxyUriEndpoint: Annotated[str | None, Length(10, 128)] = None
    XksProxyUriPath: Annotated[str | None, Length(10, 128)] = None
    XksProxyVpcEndpointServiceName: Annotated[str | None, Length(20, 64)] = None
    XksProxyVpcEndpointServiceOwner: Annotated[str | None, Length(0, 12)] = None
    XksProxyAuthenticationCredential: dict[str, Any] | None = Field(default=None, repr=False)
    XksProxyConnectivity: str | None = None


class CreateCustomKeyStoreResponse(KmsModel):
    CustomKeyStoreId: str


class DescribeCustomKeyStoresRequest(KmsModel):
    CustomKeyStoreId: CustomKeyStoreIdType | None = None
    CustomKeyStoreName: CustomKeyStoreNameType | None = None
    Limit: Annotated[int | None, Range(1, 1000)] = None
    Marker: MarkerType | None = None


class XksProxyConfigurationType(KmsModel):
    """An external key store's proxy as DescribeCustomKeyStores shows it (never the secret)."""

    Connectivity: str | None = None
    AccessKeyId: str | None = None
    UriEndpoint: str | None = None
    UriPath: str | None = None
    VpcEndpointServiceName: str | None = None
    VpcEndpointServiceOwner: str | None = None


class CustomKeyStoresListEntry(KmsModel):
    CustomKeyStoreId: str
    CustomKeyStoreName: str
    CloudHsmClusterId: str | None = None
    TrustAnchorCertificate: str | None = None
    ConnectionState: enums.ConnectionStateType
    ConnectionErrorCode: enums.ConnectionErrorCodeType | None = None
    CreationDate: dt.datetime
    CustomKeyStoreType: enums.CustomKeyStoreType
    XksProxyConfiguration: XksProxyConfigurationType | None = None


class DescribeCustomKeyStoresResponse(KmsModel):
    CustomKeyStores: list[CustomKeyStoresListEntry]
    NextMarker: str | None = None
    Truncated: bool = False


class ConnectCustomKeyStoreRequest(KmsModel):
    CustomKeyStoreId: CustomKeyStoreIdType


class DisconnectCustomKeyStoreRequest(KmsModel):
    CustomKeyStoreId: CustomKeyStoreIdType


class DeleteCustomKeyStoreRequest(KmsModel):
    CustomKeyStoreId: CustomKeyStoreIdType


class UpdateCustomKeyStoreRequest(KmsModel):
    CustomKeyStoreId: CustomKeyStoreIdType
    NewCustomKeyStoreName: CustomKeyStoreNameType | None = None
    KeyStorePassword: str | None = Field(default=None, repr=False)
    CloudHsmClusterId: CloudHsmClusterIdType | None = None
    XksProxyUriEndpoint: Annotated[str | None, Length(10, 128)] = None
    XksProxyUriPath: Annotated[str | None, Length(10, 128)] = None
    XksProxyVpcEndpointServiceName: Annotated[str | None, Length(20, 64)] = None
    XksProxyVpcEndpointServiceOwner: Annotated[str | None, Length(0, 12)] = None
    XksProxyAuthenticationCredential: dict[str, Any] | None = Field(default=None, repr=False)
    XksProxyConnectivity: str | None = None
