"""Rotation operations: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand, ListKeyRotations. A rotation makes a new key version current
(:meth:`~hsmkms.service.core.ServiceCore._rotate`); old versions keep decrypting."""

from __future__ import annotations

import datetime as dt

from hsmkms.errors import (
    ConflictException,
    LimitExceededException,
    UnsupportedOperationException,
)
from hsmkms.models import (
    DisableKeyRotationRequest,
    EmptyResponse,
    EnableKeyRotationRequest,
    GetKeyRotationStatusRequest,
    GetKeyRotationStatusResponse,
    ListKeyRotationsRequest,
    ListKeyRotationsResponse,
    RotateKeyOnDemandRequest,
    RotateKeyOnDemandResponse,
    RotationsListEntry,
)
from hsmkms.models.enums import IncludeKeyMaterial, KeyMaterialState, KeyState, RotationType
from hsmkms.service.core import Call, Prepared, ServiceCore, operation, page_limit
from hsmkms.service.identifiers import key_material_id
from hsmkms.service.states import Access
from hsmkms.store import KeyRecord

MAX_ON_DEMAND_ROTATIONS = 25
DEFAULT_ROTATION_PERIOD_DAYS = 365
ON_DEMAND_CONFLICT_WINDOW = dt.timedelta(minutes=20)
# spec: AWS's answer to a rotation operation on an asymmetric or HMAC key (seen in terraform
# reports of AWS responses, hashicorp/terraform-provider-aws users and floci-io/floci #586).
NOT_ROTATABLE_MESSAGE = (
    "You cannot perform this operation on a non-symmetric key or a key with non-ENCRYPT_DECRYPT "
    "key usage."
)


def _check_rotatable(key: KeyRecord) -> None:
    """UnsupportedOperationException unless the key is a symmetric encryption key: only those
    rotate (asymmetric and HMAC keys have one key material for life)."""
    if key.key_spec != "SYMMETRIC_DEFAULT" or key.key_usage != "ENCRYPT_DECRYPT":
        raise UnsupportedOperationException(NOT_ROTATABLE_MESSAGE)


def _prepare_enable_key_rotation(request: EnableKeyRotationRequest) -> Prepared:
    period = page_limit(request.RotationPeriodInDays, DEFAULT_ROTATION_PERIOD_DAYS)
    return Prepared({"kms:RotationPeriodInDays": period})


class RotationOperations(ServiceCore):
    """The rotation operations of :class:`~hsmkms.service.KmsService`."""

    @operation("EnableKeyRotation", prepare=_prepare_enable_key_rotation)
    def enable_key_rotation(self, call: Call[EnableKeyRotationRequest]) -> EmptyResponse:
        """EnableKeyRotation: rotate every RotationPeriodInDays (90-2560, default 365); the first
        rotation comes one period after this call."""
        _check_rotatable(call.key)
        period = page_limit(call.request.RotationPeriodInDays, DEFAULT_ROTATION_PERIOD_DAYS)
        self._store.set_rotation(
            call.key.key_id,
            enabled=True,
            period_days=period,
            next_rotation_date=self._clock() + dt.timedelta(days=period),
        )
        return EmptyResponse()

    @operation("DisableKeyRotation")
    def disable_key_rotation(self, call: Call[DisableKeyRotationRequest]) -> EmptyResponse:
        """DisableKeyRotation: no more automatic rotations (existing versions stay)."""
        _check_rotatable(call.key)
        self._store.set_rotation(
            call.key.key_id, enabled=False, period_days=None, next_rotation_date=None
        )
        return EmptyResponse()

    @operation("GetKeyRotationStatus")
    def get_key_rotation_status(
        self, call: Call[GetKeyRotationStatusRequest]
    ) -> GetKeyRotationStatusResponse:
        """GetKeyRotationStatus: in every state; reads disabled while pending deletion (the
        setting comes back on cancel, as AWS)."""
        key = call.key
        if not key.rotation_enabled or key.state == KeyState.PendingDeletion:
            return GetKeyRotationStatusResponse(KeyRotationEnabled=False, KeyId=key.arn)
        return GetKeyRotationStatusResponse(
            KeyRotationEnabled=True,
            KeyId=key.arn,
            RotationPeriodInDays=key.rotation_period_days,
            NextRotationDate=key.next_rotation_date,
        )

    @operation("RotateKeyOnDemand")
    def rotate_key_on_demand(
        self, call: Call[RotateKeyOnDemandRequest]
    ) -> RotateKeyOnDemandResponse:
        """RotateKeyOnDemand: a new key version now (at most 25 per key); the automatic
        schedule is unchanged."""
        key = call.key
        _check_rotatable(key)
        now = self._clock()

        def allowed(current: KeyRecord) -> None:
            if current.state != KeyState.Enabled:
                self._resolve(current.key_id, aliases=False, access=Access.USE)
            if current.on_demand_rotations >= MAX_ON_DEMAND_ROTATIONS:
                # spec: LocalStack's AWS-modelled wording of the limit.
                raise LimitExceededException(
                    "The on-demand rotations limit has been reached for the given keyId. "
                    f"No more on-demand rotations can be performed for this key: {current.arn}"
                )
            if (
                current.rotation_enabled
                and current.next_rotation_date is not None
                and current.next_rotation_date - now <= ON_DEMAND_CONFLICT_WINDOW
            ):
                # spec: ConflictException when an automatic rotation is due within 20 minutes.
                raise ConflictException(
                    f"{current.arn} has an automatic rotation due; try again later."
                )

        allowed(key)
        for _ in range(5):
            if self._rotate(key, RotationType.ON_DEMAND, allowed) is not None:
                return RotateKeyOnDemandResponse(KeyId=key.arn)
            # Another writer rotated meanwhile: rotate on top of the new current version.
            key = self._resolve(key.key_id, aliases=False, access=Access.USE)
        raise ConflictException(f"{key.arn} is being rotated concurrently; try again later.")

    @operation("ListKeyRotations")
    def list_key_rotations(self, call: Call[ListKeyRotationsRequest]) -> ListKeyRotationsResponse:
        """ListKeyRotations: the rotations (AUTOMATIC / ON_DEMAND, with dates); with
        ALL_KEY_MATERIAL also the original material."""
        request, key = call.request, call.key
        everything = request.IncludeKeyMaterial is IncludeKeyMaterial.ALL_KEY_MATERIAL
        page = self._store.list_versions(
            key.key_id,
            page_limit(request.Limit, 100),
            request.Marker,
            min_version=1 if everything else 2,
        )
        entries = [
            RotationsListEntry(
                KeyId=key.key_id,
                KeyMaterialId=key_material_id(key.key_id, v.version),
                KeyMaterialState=(
                    KeyMaterialState.CURRENT
                    if v.version == key.current_version
                    else KeyMaterialState.NON_CURRENT
                ),
                RotationDate=v.created_at if v.rotation_type is not None else None,
                RotationType=RotationType(v.rotation_type) if v.rotation_type else None,
            )
            for v in page.items
        ]
        return ListKeyRotationsResponse(
            Rotations=entries, NextMarker=page.next_marker, Truncated=page.truncated
        )
