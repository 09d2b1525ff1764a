"""Key policy operations: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies."""

from __future__ import annotations

from typing import Annotated

from hsmkms.models.base import KeyIdType, KmsModel, MarkerType
from hsmkms.models.constraints import Length, Pattern, Range

PolicyNameType = Annotated[str, Length(1, 128), Pattern(r"^[\w]+$")]
PolicyType = Annotated[str, Length(1, 131072), Pattern(r"[\u0009\u000A\u000D\u0020-\u00FF]+")]


class GetKeyPolicyRequest(KmsModel):
    KeyId: KeyIdType
    PolicyName: PolicyNameType | None = None


class GetKeyPolicyResponse(KmsModel):
    Policy: str
    PolicyName: str


class PutKeyPolicyRequest(KmsModel):
    KeyId: KeyIdType
    Policy: PolicyType
    PolicyName: PolicyNameType | None = None
    BypassPolicyLockoutSafetyCheck: bool | None = None


class ListKeyPoliciesRequest(KmsModel):
    KeyId: KeyIdType
    Limit: Annotated[int | None, Range(1, 1000)] = None
    Marker: MarkerType | None = None


class ListKeyPoliciesResponse(KmsModel):
    PolicyNames: list[str]
    NextMarker: str | None = None
    Truncated: bool
