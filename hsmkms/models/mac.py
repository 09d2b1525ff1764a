"""MAC operations: GenerateMac, VerifyMac.

Security contract: the message never appears in a model's ``repr`` or ``str``.
"""

from __future__ import annotations

from pydantic import Field

from hsmkms.models import enums
from hsmkms.models.base import GrantTokenList, KeyIdType, KmsModel
from hsmkms.models.crypto import CiphertextType, PlaintextType


class GenerateMacRequest(KmsModel):
    Message: PlaintextType = Field(repr=False)
    KeyId: KeyIdType
    MacAlgorithm: enums.MacAlgorithmSpec
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class GenerateMacResponse(KmsModel):
    Mac: bytes
    MacAlgorithm: enums.MacAlgorithmSpec
    KeyId: str


class VerifyMacRequest(KmsModel):
    Message: PlaintextType = Field(repr=False)
    KeyId: KeyIdType
    MacAlgorithm: enums.MacAlgorithmSpec
    Mac: CiphertextType
    GrantTokens: GrantTokenList | None = None
    DryRun: bool | None = None


class VerifyMacResponse(KmsModel):
    KeyId: str
    MacValid: bool
    MacAlgorithm: enums.MacAlgorithmSpec
