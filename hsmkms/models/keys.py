"""Key lifecycle and metadata operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription,
EnableKey, DisableKey, ScheduleKeyDeletion, CancelKeyDeletion, GetKeyLastUsage; ReplicateKey and
UpdatePrimaryRegion (multi-Region keys, which hsmkms does not make)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from hsmkms.models import enums
from hsmkms.models.base import GrantTokenList, KeyIdType, KmsModel, MarkerType
from hsmkms.models.constraints import Length, Pattern, Range
from hsmkms.models.tags import Tag

KEY_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
"""A key id as AWS makes them: a UUID in lower case."""


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
    CustomerMasterKeySpec: enums.CustomerMasterKeySpec | None = None
    """Absent for the specs that came after it was deprecated (Ed25519, ML-DSA, ML-KEM)."""
    KeySpec: enums.KeySpec
    ExpirationModel: enums.ExpirationModel | None = None
    EncryptionAlgorithms: list[enums.EncryptionAlgorithmSpec] | None = None
    SigningAlgorithms: list[enums.SigningAlgorithmSpec] | None = None
    KeyAgreementAlgorithms: list[enums.KeyAgreementAlgorithmSpec] | None = None
    EncapsulationAlgorithms: list[enums.EncapsulationAlgorithmSpec] | None = None
    MacAlgorithms: list[enums.MacAlgorithmSpec] | None = None
    MultiRegion: bool = False
    PendingDeletionWindowInDays: int | None = None
    CurrentKeyMaterialId: str | None = None
    CustomKeyStoreId: str | None = None
    CloudHsmClusterId: str | None = None
    XksKeyConfiguration: dict[str, str] | None = None


KeyMetadataShape = KeyMetadata
"""The same class, for members named ``KeyMetadata`` (a member may not shadow its own type)."""


class CreateKeyRequest(KmsModel):
    Policy: Annotated[str | None, Length(1, 131072)] = None
    Description: Annotated[str | None, Length(0, 8192)] = None
    KeyUsage: enums.KeyUsage | None = None
    CustomerMasterKeySpec: enums.CustomerMasterKeySpec | None = None
    KeySpec: enums.KeySpec | None = None
    Origin: enums.OriginType | None = None
    CustomKeyStoreId: Annotated[str | None, Length(1, 64)] = None
    BypassPolicyLockoutSafetyCheck: bool | None = None
    Tags: list[Tag] | None = None
    MultiRegion: bool | None = None
    XksKeyId: Annotated[str | None, Length(1, 128)] = None


class OperatorCreateKeyRequest(CreateKeyRequest):
    """CreateKey as the local operator asks it (a seed file), with the key id chosen: no request
    of the API parses into this class (``CreateKeyRequest`` ignores an unknown ``KeyId``), and
    the service refuses it from any caller but the local operator."""

    KeyId: Annotated[str, Length(36, 36), Pattern(KEY_ID_PATTERN)]


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


class GetKeyLastUsageRequest(KmsModel):
    KeyId: KeyIdType


class KeyLastUsageData(KmsModel):
    """The last successful cryptographic operation with a key."""

    Operation: enums.KeyLastUsageOperation | None = None
    Timestamp: dt.datetime | None = None
    CloudTrailEventId: str | None = None
    KmsRequestId: str | None = None


class GetKeyLastUsageResponse(KmsModel):
    KeyId: str
    KeyLastUsage: KeyLastUsageData | None = None
    TrackingStartDate: dt.datetime
    KeyCreationDate: dt.datetime


RegionType = Annotated[str, Length(1, 32), Pattern(r"^([a-z]+-){2,3}\d+$")]


class ReplicateKeyRequest(KmsModel):
    KeyId: KeyIdType
    ReplicaRegion: RegionType
    Policy: Annotated[str | None, Length(1, 131072)] = None
    BypassPolicyLockoutSafetyCheck: bool | None = None
    Description: Annotated[str | None, Length(0, 8192)] = None
    Tags: list[Tag] | None = None


class ReplicateKeyResponse(KmsModel):
    ReplicaKeyMetadata: KeyMetadataShape | None = None
    ReplicaPolicy: str | None = None
    ReplicaTags: list[Tag] | None = None


class UpdatePrimaryRegionRequest(KmsModel):
    KeyId: KeyIdType
    PrimaryRegion: RegionType
