"""Grant operations: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant
(reference §1.5, §4.4)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from hsmkms.models import enums
from hsmkms.models.base import (
    EncryptionContextType,
    GrantTokenList,
    KeyIdType,
    KmsModel,
    MarkerType,
)
from hsmkms.models.constraints import Length, Pattern, Range

PrincipalIdType = Annotated[str, Length(1, 256), Pattern(r"^[\w+=,.@:/-]+$")]
GrantIdType = Annotated[str, Length(1, 128)]
GrantTokenType = Annotated[str, Length(1, 8192)]
GrantNameType = Annotated[str, Length(1, 256), Pattern(r"^[a-zA-Z0-9:/_-]+$")]


class GrantConstraints(KmsModel):
    """At most one of the two is meaningful per grant in practice; AWS accepts both."""

    EncryptionContextSubset: EncryptionContextType | None = None
    EncryptionContextEquals: EncryptionContextType | None = None


class CreateGrantRequest(KmsModel):
    KeyId: KeyIdType
    GranteePrincipal: PrincipalIdType | None = None
    GranteeServicePrincipal: PrincipalIdType | None = None
    RetiringPrincipal: PrincipalIdType | None = None
    RetiringServicePrincipal: PrincipalIdType | None = None
    Operations: list[enums.GrantOperation]
    Constraints: GrantConstraints | None = None
    GrantTokens: GrantTokenList | None = None
    Name: GrantNameType | None = None
    DryRun: bool | None = None


class CreateGrantResponse(KmsModel):
    GrantToken: str | None = None
    GrantId: str | None = None


class GrantListEntry(KmsModel):
    KeyId: str | None = None
    GrantId: str | None = None
    Name: str | None = None
    CreationDate: dt.datetime | None = None
    GranteePrincipal: str | None = None
    RetiringPrincipal: str | None = None
    IssuingAccount: str | None = None
    Operations: list[enums.GrantOperation] | None = None
    Constraints: GrantConstraints | None = None


class ListGrantsRequest(KmsModel):
    Limit: Annotated[int | None, Range(1, 100)] = None
    Marker: MarkerType | None = None
    KeyId: KeyIdType
    GrantId: GrantIdType | None = None
    GranteePrincipal: PrincipalIdType | None = None


class ListGrantsResponse(KmsModel):
    Grants: list[GrantListEntry] | None = None
    NextMarker: str | None = None
    Truncated: bool | None = None


class ListRetirableGrantsRequest(KmsModel):
    Limit: Annotated[int | None, Range(1, 100)] = None
    Marker: MarkerType | None = None
    RetiringPrincipal: PrincipalIdType


class RetireGrantRequest(KmsModel):
    GrantToken: GrantTokenType | None = None
    KeyId: KeyIdType | None = None
    GrantId: GrantIdType | None = None
    DryRun: bool | None = None


class RevokeGrantRequest(KmsModel):
    KeyId: KeyIdType
    GrantId: GrantIdType
    DryRun: bool | None = None
