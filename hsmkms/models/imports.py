"""Imported key material: GetParametersForImport, ImportKeyMaterial, DeleteImportedKeyMaterial.

Security contract: the wrapped key material and the import token never appear in a model's
``repr`` or ``str`` (nor, being blobs, in validation messages or audit records).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import Field

from hsmkms.models import enums
from hsmkms.models.base import KeyIdType, KmsModel
from hsmkms.models.constraints import Length, Pattern

CiphertextType = Annotated[bytes, Length(1, 6144)]
KeyMaterialIdType = Annotated[str, Length(64, 64), Pattern(r"^[a-f0-9]+$")]
KeyMaterialDescriptionType = Annotated[str, Length(0, 256), Pattern(r"^[a-zA-Z0-9:/_\s.-]+$")]


class GetParametersForImportRequest(KmsModel):
    KeyId: KeyIdType
    WrappingAlgorithm: enums.WrappingAlgorithmSpec
    WrappingKeySpec: enums.WrappingKeySpec


class GetParametersForImportResponse(KmsModel):
    KeyId: str
    ImportToken: bytes = Field(repr=False)
    PublicKey: bytes = Field(repr=False)
    ParametersValidTo: dt.datetime


class ImportKeyMaterialRequest(KmsModel):
    KeyId: KeyIdType
    ImportToken: CiphertextType = Field(repr=False)
    EncryptedKeyMaterial: CiphertextType = Field(repr=False)
    ValidTo: dt.datetime | None = None
    ExpirationModel: enums.ExpirationModel | None = None
    ImportType: enums.ImportType | None = None
    KeyMaterialDescription: KeyMaterialDescriptionType | None = None
    KeyMaterialId: KeyMaterialIdType | None = None


class ImportKeyMaterialResponse(KmsModel):
    KeyId: str
    KeyMaterialId: str | None = None


class DeleteImportedKeyMaterialRequest(KmsModel):
    KeyId: KeyIdType
    KeyMaterialId: KeyMaterialIdType | None = None


class DeleteImportedKeyMaterialResponse(KmsModel):
    KeyId: str
    KeyMaterialId: str | None = None
