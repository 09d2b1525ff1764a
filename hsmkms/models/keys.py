"""Key lifecycle and metadata operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription,
EnableKey, DisableKey, ScheduleKeyDeletion, CancelKeyDeletion."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from hsmkms.models import enums
from hsmkms.models.base import GrantTokenList, KeyIdType, KmsModel, MarkerType
from hsmkms.models.constraints import Length, Range
from hsmkms.models.tags import Tag


class KeyMetadata(KmsModel):
    """What DescribeKey and CreateKey return about a key (reference §3.3)."""

    AWSAccountId: str
    KeyId: str
    Arn: str
    CreationDate: dt.datetime
    Enabled: bool
    Description: str
    KeyUsage: enums.KeyUsage
    KeyState: enums.KeyState
    DeletionDate: dt.datetime | None = None
    ValidTo: dt.datetime | None = None
    Origin: enums.OriginType
    KeyManager: enums.KeyManager
    CustomerMasterKeySpec: enums.KeySpec
    KeySpec: enums.KeySpec
    ExpirationModel: enums.ExpirationModel | None = None
    EncryptionAlgorithms: list[enums.EncryptionAlgorithmSpec] | None = None
    MacAlgorithms: list[enums.MacAlgorithmSpec] | None = None
    MultiRegion: bool = False
    PendingDeletionWindowInDays: int | None = None
    CurrentKeyMaterialId: str | None = None


KeyMetadataShape = KeyMetadata
"""The same class, for members named ``KeyMetadata`` (a member may not shadow its own type)."""


class CreateKeyRequest(KmsModel):
    Policy: Annotated[str | None, Length(1, 131072)] = None
    Description: Annotated[str | None, Length(0, 8192)] = None
    KeyUsage: enums.KeyUsage | None = None
    CustomerMasterKeySpec: enums.KeySpec | None = None
    KeySpec: enums.KeySpec | None = None
    Origin: enums.OriginType | None = None
    CustomKeyStoreId: Annotated[str | None, Length(1, 64)] = None
    BypassPolicyLockoutSafetyCheck: bool | None = None
    Tags: list[Tag] | None = None
    MultiRegion: bool | None = None
    XksKeyId: Annotated[str | None, Length(1, 128)] = None


class CreateKeyResponse(KmsModel):
    KeyMetadata: KeyMetadataShape


class DescribeKeyRequest(KmsModel):
    KeyId: KeyIdType
    GrantTokens: GrantTokenList | None = None


class DescribeKeyResponse(KmsModel):
    KeyMetadata: KeyMetadataShape


class ListKeysRequest(KmsModel):
    Limit: Annotated[int | None, Range(1, 1000)] = None
    Marker: MarkerType | None = None


class KeyListEntry(KmsModel):
    KeyId: str
    KeyArn: str


class ListKeysResponse(KmsModel):
    Keys: list[KeyListEntry]
    NextMarker: str | None = None
    Truncated: bool


class UpdateKeyDescriptionRequest(KmsModel):
    KeyId: KeyIdType
    Description: Annotated[str, Length(0, 8192)]


class EmptyResponse(KmsModel):
    """The response of operations that return nothing."""


class EnableKeyRequest(KmsModel):
    KeyId: KeyIdType


class DisableKeyRequest(KmsModel):
    KeyId: KeyIdType


class ScheduleKeyDeletionRequest(KmsModel):
    KeyId: KeyIdType
    # spec: the model says 1-365 but the service (and its docs) take 7-30 (reference §8).
    PendingWindowInDays: Annotated[int | None, Range(7, 30)] = None


class ScheduleKeyDeletionResponse(KmsModel):
    KeyId: str
    DeletionDate: dt.datetime
    KeyState: enums.KeyState
    PendingWindowInDays: int


class CancelKeyDeletionRequest(KmsModel):
    KeyId: KeyIdType


class CancelKeyDeletionResponse(KmsModel):
    KeyId: str
