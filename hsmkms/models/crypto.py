"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey,
GenerateDataKeyWithoutPlaintext, GenerateRandom.

Security contract: members carrying plaintext or data keys (``Plaintext``) never appear in a
model's ``repr`` or ``str``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from hsmkms.models.base import (
    EncryptionContextType,
    GrantTokenList,
    KeyIdType,
    KmsModel,
)
from hsmkms.models.constraints import Length, Range
from hsmkms.models.enums import DataKeySpec, EncryptionAlgorithmSpec

PlaintextType = Annotated[bytes, Length(1, 4096)]
CiphertextType = Annotated[bytes, Length(1, 6144)]


class EncryptRequest(KmsModel):
    KeyId: KeyIdType
    Plaintext: PlaintextType = Field(repr=False)
    EncryptionContext: EncryptionContextType | None = None
    GrantTokens: GrantTokenList | None = None
    EncryptionAlgorithm: EncryptionAlgorithmSpec | None = None
    DryRun: bool | None = None


class EncryptResponse(KmsModel):
    CiphertextBlob: bytes
    KeyId: str
    EncryptionAlgorithm: EncryptionAlgorithmSpec


class DecryptRequest(KmsModel):
    # spec: Decrypt has no required member in the model; CiphertextBlob is logically required.
    CiphertextBlob: CiphertextType | None = None
    EncryptionContext: EncryptionContextType | None = None
    GrantTokens: GrantTokenList | None = None
    KeyId: KeyIdType | None = None
    EncryptionAlgorithm: EncryptionAlgorithmSpec | None = None
    Recipient: dict[str, Any] | None = None
    DryRun: bool | None = None
    DryRunModifiers: list[str] | None = None


class DecryptResponse(KmsModel):
    KeyId: str
    Plaintext: bytes = Field(repr=False)
    EncryptionAlgorithm: EncryptionAlgorithmSpec
    KeyMaterialId: str | None = None


class ReEncryptRequest(KmsModel):
    CiphertextBlob: CiphertextType | None = None
    SourceEncryptionContext: EncryptionContextType | None = None
    SourceKeyId: KeyIdType | None = None
    DestinationKeyId: KeyIdType
    DestinationEncryptionContext: EncryptionContextType | None = None
    SourceEncryptionAlgorithm: EncryptionAlgorithmSpec | None = None
    DestinationEncryptionAlgorithm: EncryptionAlgorithmSpec | None = None
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None
    DryRunModifiers: list[str] | None = None


class ReEncryptResponse(KmsModel):
    CiphertextBlob: bytes
    SourceKeyId: str
    KeyId: str
    SourceEncryptionAlgorithm: EncryptionAlgorithmSpec
    DestinationEncryptionAlgorithm: EncryptionAlgorithmSpec
    SourceKeyMaterialId: str | None = None
    DestinationKeyMaterialId: str | None = None


class GenerateDataKeyRequest(KmsModel):
    KeyId: KeyIdType
    EncryptionContext: EncryptionContextType | None = None
    NumberOfBytes: Annotated[int | None, Range(1, 1024)] = None
    KeySpec: DataKeySpec | None = None
    GrantTokens: GrantTokenList | None = None
    Recipient: dict[str, Any] | None = None
    DryRun: bool | None = None


class GenerateDataKeyResponse(KmsModel):
    CiphertextBlob: bytes
    Plaintext: bytes = Field(repr=False)
    KeyId: str
    KeyMaterialId: str | None = None


class GenerateDataKeyWithoutPlaintextRequest(KmsModel):
    KeyId: KeyIdType
    EncryptionContext: EncryptionContextType | None = None
    KeySpec: DataKeySpec | None = None
    NumberOfBytes: Annotated[int | None, Range(1, 1024)] = None
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class GenerateDataKeyWithoutPlaintextResponse(KmsModel):
    CiphertextBlob: bytes
    KeyId: str
    KeyMaterialId: str | None = None


class GenerateRandomRequest(KmsModel):
    # spec: optional in the model, required by the service (reference §1.9).
    NumberOfBytes: Annotated[int | None, Range(1, 1024)] = None
    CustomKeyStoreId: Annotated[str | None, Length(1, 64)] = None
    Recipient: dict[str, Any] | None = None


class GenerateRandomResponse(KmsModel):
    Plaintext: bytes = Field(repr=False)
