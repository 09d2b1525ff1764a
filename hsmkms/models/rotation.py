"""Rotation operations: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand, ListKeyRotations."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from hsmkms.models import enums
from hsmkms.models.base import KeyIdType, KmsModel, MarkerType
from hsmkms.models.constraints import Range


class EnableKeyRotationRequest(KmsModel):
    KeyId: KeyIdType
    RotationPeriodInDays: Annotated[int | None, Range(90, 2560)] = None


class DisableKeyRotationRequest(KmsModel):
    KeyId: KeyIdType


class GetKeyRotationStatusRequest(KmsModel):
    KeyId: KeyIdType


class GetKeyRotationStatusResponse(KmsModel):
    KeyRotationEnabled: bool
    KeyId: str
    RotationPeriodInDays: int | None = None
    NextRotationDate: dt.datetime | None = None
    OnDemandRotationStartDate: dt.datetime | None = None


class RotateKeyOnDemandRequest(KmsModel):
    KeyId: KeyIdType


class RotateKeyOnDemandResponse(KmsModel):
    KeyId: str


class ListKeyRotationsRequest(KmsModel):
    KeyId: KeyIdType
    IncludeKeyMaterial: enums.IncludeKeyMaterial | None = None
    Limit: Annotated[int | None, Range(1, 1000)] = None
    Marker: MarkerType | None = None


class RotationsListEntry(KmsModel):
    KeyId: str
    KeyMaterialId: str | None = None
    KeyMaterialDescription: str | None = None
    ImportState: enums.ImportState | None = None
    KeyMaterialState: enums.KeyMaterialState | None = None
    ExpirationModel: enums.ExpirationModel | None = None
    ValidTo: dt.datetime | None = None
    RotationDate: dt.datetime | None = None
    RotationType: enums.RotationType | None = None


class ListKeyRotationsResponse(KmsModel):
    Rotations: list[RotationsListEntry]
    NextMarker: str | None = None
    Truncated: bool
