"""Asymmetric and key agreement operations: Sign, Verify, GetPublicKey, DeriveSharedSecret,
GenerateDataKeyPair, GenerateDataKeyPairWithoutPlaintext, Encapsulate, Decapsulate.

Security contract: members carrying messages, private keys or shared secrets never appear in a
model's ``repr`` or ``str``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from hsmkms.models import enums
from hsmkms.models.base import EncryptionContextType, GrantTokenList, KeyIdType, KmsModel
from hsmkms.models.constraints import Length
from hsmkms.models.crypto import CiphertextType, PlaintextType

PublicKeyType = Annotated[bytes, Length(1, 8192)]


class SignRequest(KmsModel):
    KeyId: KeyIdType
    Message: PlaintextType = Field(repr=False)
    MessageType: enums.MessageType | None = None
    GrantTokens: GrantTokenList | None = None
    SigningAlgorithm: enums.SigningAlgorithmSpec
    DryRun: bool | None = None


class SignResponse(KmsModel):
    KeyId: str
    Signature: bytes
    SigningAlgorithm: enums.SigningAlgorithmSpec


class VerifyRequest(KmsModel):
    KeyId: KeyIdType
    Message: PlaintextType = Field(repr=False)
    MessageType: enums.MessageType | None = None
    Signature: CiphertextType
    SigningAlgorithm: enums.SigningAlgorithmSpec
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class VerifyResponse(KmsModel):
    KeyId: str
    SignatureValid: bool
    SigningAlgorithm: enums.SigningAlgorithmSpec


class GetPublicKeyRequest(KmsModel):
    KeyId: KeyIdType
    GrantTokens: GrantTokenList | None = None


class GetPublicKeyResponse(KmsModel):
    KeyId: str
    PublicKey: bytes
    CustomerMasterKeySpec: enums.CustomerMasterKeySpec | None = None
    KeySpec: enums.KeySpec
    KeyUsage: enums.KeyUsage
    EncryptionAlgorithms: list[enums.EncryptionAlgorithmSpec] | None = None
    SigningAlgorithms: list[enums.SigningAlgorithmSpec] | None = None
    KeyAgreementAlgorithms: list[enums.KeyAgreementAlgorithmSpec] | None = None
    EncapsulationAlgorithms: list[enums.EncapsulationAlgorithmSpec] | None = None


class DeriveSharedSecretRequest(KmsModel):
    KeyId: KeyIdType
    KeyAgreementAlgorithm: enums.KeyAgreementAlgorithmSpec
    PublicKey: PublicKeyType
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None
    Recipient: dict[str, Any] | None = None


class DeriveSharedSecretResponse(KmsModel):
    KeyId: str
    SharedSecret: bytes = Field(repr=False)
    KeyAgreementAlgorithm: enums.KeyAgreementAlgorithmSpec
    KeyOrigin: enums.OriginType


class GenerateDataKeyPairRequest(KmsModel):
    EncryptionContext: EncryptionContextType | None = None
    KeyId: KeyIdType
    KeyPairSpec: enums.DataKeyPairSpec
    GrantTokens: GrantTokenList | None = None
    Recipient: dict[str, Any] | None = None
    DryRun: bool | None = None


class GenerateDataKeyPairResponse(KmsModel):
    PrivateKeyCiphertextBlob: bytes
    PrivateKeyPlaintext: bytes = Field(repr=False)
    PublicKey: bytes
    KeyId: str
    KeyPairSpec: enums.DataKeyPairSpec
    KeyMaterialId: str | None = None


class GenerateDataKeyPairWithoutPlaintextRequest(KmsModel):
    EncryptionContext: EncryptionContextType | None = None
    KeyId: KeyIdType
    KeyPairSpec: enums.DataKeyPairSpec
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class GenerateDataKeyPairWithoutPlaintextResponse(KmsModel):
    PrivateKeyCiphertextBlob: bytes
    PublicKey: bytes
    KeyId: str
    KeyPairSpec: enums.DataKeyPairSpec
    KeyMaterialId: str | None = None


class EncapsulateRequest(KmsModel):
    KeyId: KeyIdType
    EncapsulationAlgorithm: enums.EncapsulationAlgorithmSpec
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class EncapsulateResponse(KmsModel):
    KeyId: str
    SharedSecret: bytes = Field(repr=False)
    SharedSecretCiphertextBlob: bytes
    EncapsulationAlgorithm: enums.EncapsulationAlgorithmSpec


class DecapsulateRequest(KmsModel):
    KeyId: KeyIdType
    SharedSecretCiphertextBlob: CiphertextType
    EncapsulationAlgorithm: enums.EncapsulationAlgorithmSpec
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class DecapsulateResponse(KmsModel):
    KeyId: str
    SharedSecret: bytes = Field(repr=False)
    EncapsulationAlgorithm: enums.EncapsulationAlgorithmSpec
