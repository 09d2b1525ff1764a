"""Alias operations: CreateAlias, UpdateAlias, DeleteAlias, ListAliases."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from hsmkms.models.base import AliasNameType, KeyIdType, KmsModel, MarkerType
from hsmkms.models.constraints import Range


class CreateAliasRequest(KmsModel):
    AliasName: AliasNameType
    TargetKeyId: KeyIdType


class UpdateAliasRequest(KmsModel):
    AliasName: AliasNameType
    TargetKeyId: KeyIdType


class DeleteAliasRequest(KmsModel):
    AliasName: AliasNameType


class ListAliasesRequest(KmsModel):
    KeyId: KeyIdType | None = None
    Limit: Annotated[int | None, Range(1, 100)] = None
    Marker: MarkerType | None = None


class AliasListEntry(KmsModel):
    AliasName: str
    AliasArn: str
    TargetKeyId: str | None = None
    CreationDate: dt.datetime | None = None
    LastUpdatedDate: dt.datetime | None = None


class ListAliasesResponse(KmsModel):
    Aliases: list[AliasListEntry]
    NextMarker: str | None = None
    Truncated: bool
