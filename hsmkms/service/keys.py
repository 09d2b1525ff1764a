"""Key operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, EnableKey,
DisableKey, ScheduleKeyDeletion, CancelKeyDeletion."""

from __future__ import annotations

import datetime as dt
import uuid

from hsmkms.errors import (
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.base import MaterialName
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.models import (
    CancelKeyDeletionRequest,
    CancelKeyDeletionResponse,
    CreateKeyRequest,
    CreateKeyResponse,
    DescribeKeyRequest,
    DescribeKeyResponse,
    DisableKeyRequest,
    EmptyResponse,
    EnableKeyRequest,
    KeyListEntry,
    KeyMetadata,
    ListKeysRequest,
    ListKeysResponse,
    ScheduleKeyDeletionRequest,
    ScheduleKeyDeletionResponse,
    UpdateKeyDescriptionRequest,
)
from hsmkms.models.enums import (
    EncryptionAlgorithmSpec,
    ExpirationModel,
    KeyFamily,
    KeyManager,
    KeySpec,
    KeyState,
    KeyUsage,
    MacAlgorithmSpec,
    OriginType,
    RotationType,
    key_family,
)
from hsmkms.policy import ContextInput, default_key_policy, parse_policy
from hsmkms.service.aliases import check_tags, tag_conditions
from hsmkms.service.authorize import key_policy
from hsmkms.service.core import Call, Prepared, ServiceCore, log, operation, page_limit
from hsmkms.service.states import Access
from hsmkms.store import IMPORTED, ImportedMaterialRecord, KeyRecord, KeyVersionRecord

DEFAULT_PENDING_WINDOW_DAYS = 30


def _key_type(request: CreateKeyRequest) -> tuple[KeySpec, KeyUsage, OriginType]:
    """The spec, usage and origin CreateKey asks for; the errors of what is not supported."""
    if request.KeySpec is not None and request.CustomerMasterKeySpec is not None:
        raise ValidationException(
            "You cannot specify KeySpec and CustomerMasterKeySpec in the same request. "
            "CustomerMasterKeySpec is deprecated."
        )
    spec = request.KeySpec or request.CustomerMasterKeySpec or KeySpec.SYMMETRIC_DEFAULT
    origin = request.Origin or OriginType.AWS_KMS
    if origin not in (OriginType.AWS_KMS, OriginType.EXTERNAL):
        raise UnsupportedOperationException(f"Origin {origin} is not supported.")
    if spec is not KeySpec.SYMMETRIC_DEFAULT and request.KeyUsage is None:
        raise ValidationException(
            "You must specify a KeyUsage value for all KMS keys except for symmetric "
            "encryption keys."
        )
    usage = request.KeyUsage or KeyUsage.ENCRYPT_DECRYPT
    if spec is KeySpec.SYMMETRIC_DEFAULT and usage is not KeyUsage.ENCRYPT_DECRYPT:
        raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
    if spec is not KeySpec.SYMMETRIC_DEFAULT:
        # HMAC keys for imported material (issue 18); other specs are the key-types work.
        if key_family(spec) is not KeyFamily.HMAC or origin is not OriginType.EXTERNAL:
            raise UnsupportedOperationException(f"KeySpec {spec} is not supported.")
        if usage is not KeyUsage.GENERATE_VERIFY_MAC:
            raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
    if request.CustomKeyStoreId is not None or request.XksKeyId is not None:
        raise UnsupportedOperationException("Custom key stores are not supported.")
    if request.MultiRegion:
        raise UnsupportedOperationException("Multi-Region keys are not supported.")
    return spec, usage, origin


def _expiration(
    materials: tuple[ImportedMaterialRecord, ...], current_version: int
) -> tuple[ExpirationModel | None, dt.datetime | None]:
    """KeyMetadata's ExpirationModel and ValidTo for a key's imported material: absent until
    material was imported; ValidTo is the earliest expiry of the material in the token."""
    if not materials:
        return None, None
    expiring = [
        m.valid_to
        for m in materials
        if m.import_state == IMPORTED
        and m.expiration_model == ExpirationModel.KEY_MATERIAL_EXPIRES
        and m.valid_to is not None
    ]
    if expiring:
        return ExpirationModel.KEY_MATERIAL_EXPIRES, min(expiring)
    current = next((m for m in materials if m.version == current_version), materials[-1])
    return ExpirationModel(current.expiration_model), None


def _prepare_create_key(request: CreateKeyRequest) -> Prepared:
    spec, usage, origin = _key_type(request)
    if request.Policy is not None:
        parse_policy(request.Policy)  # validates: size, grammar, conditions
    tags = check_tags(request.Tags or [])
    conditions: dict[str, ContextInput] = {
        "kms:KeySpec": spec.value,
        "kms:KeyUsage": usage.value,
        "kms:KeyOrigin": origin.value,
        "kms:MultiRegion": False,
        "kms:BypassPolicyLockoutSafetyCheck": bool(request.BypassPolicyLockoutSafetyCheck),
    }
    if tags:
        conditions.update(tag_conditions(tags))
    return Prepared(conditions)


def _prepare_schedule_key_deletion(request: ScheduleKeyDeletionRequest) -> Prepared:
    days = page_limit(request.PendingWindowInDays, DEFAULT_PENDING_WINDOW_DAYS)
    return Prepared({"kms:ScheduleKeyDeletionPendingWindowInDays": days})


class KeyOperations(ServiceCore):
    """The key lifecycle operations of :class:`~hsmkms.service.KmsService`."""

    def _metadata(self, key: KeyRecord) -> KeyMetadata:
        pending = key.state == KeyState.PendingDeletion
        spec = KeySpec(key.key_spec)
        symmetric = spec is KeySpec.SYMMETRIC_DEFAULT
        model, valid_to = _expiration(self._materials(key), key.current_version)
        return KeyMetadata(
            AWSAccountId=self.account_id,
            KeyId=key.key_id,
            Arn=key.arn,
            CreationDate=key.created_at,
            Enabled=key.state == KeyState.Enabled,
            Description=key.description,
            KeyUsage=KeyUsage(key.key_usage),
            KeyState=KeyState(key.state),
            DeletionDate=key.deletion_date if pending else None,
            ValidTo=valid_to,
            Origin=OriginType(key.origin),
            KeyManager=KeyManager.CUSTOMER,
            CustomerMasterKeySpec=spec,
            KeySpec=spec,
            ExpirationModel=model,
            EncryptionAlgorithms=[EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT] if symmetric else None,
            MacAlgorithms=[MacAlgorithmSpec(f"HMAC_SHA_{spec.value[5:]}")]
            if key_family(spec.value) is KeyFamily.HMAC
            else None,
            MultiRegion=False,
            PendingDeletionWindowInDays=key.pending_window_days if pending else None,
            # spec: KeyMetadata — CurrentKeyMaterialId is present for symmetric keys only.
            CurrentKeyMaterialId=self._key_material_id(key, key.current_version)
            if symmetric
            else None,
        )

    @operation("CreateKey", prepare=_prepare_create_key)
    def create_key(self, call: Call[CreateKeyRequest]) -> CreateKeyResponse:
        """CreateKey: a symmetric encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT) whose first
        version is generated inside the token."""
        request, caller = call.request, call.caller
        spec, usage, origin = _key_type(request)
        now = self._clock()
        key_id = str(uuid.uuid4())
        if request.Policy is not None and not request.BypassPolicyLockoutSafetyCheck:
            self._authz.check_lockout(caller, key_policy(request.Policy), self.arns.key(key_id))
        if origin is OriginType.EXTERNAL:
            return self._create_external_key(call, key_id, spec, usage, now)
        ref = self._stores.default.create(
            KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(key_id, 1)
        )
        key = KeyRecord(
            key_id=key_id,
            arn=self.arns.key(key_id),
            description=request.Description or "",
            key_usage=usage.value,
            key_spec=spec.value,
            origin=origin.value,
            state=KeyState.Enabled.value,
            created_at=now,
            policy=request.Policy or default_key_policy(self.account_id),
            current_version=1,
        )
        profile = ref.encryption_profile.value
        version = KeyVersionRecord(key_id, 1, ref.to_str(), profile, now, None)
        try:
            self._store.create_key(key, version, check_tags(request.Tags or []))
        except BaseException:
            if not self._committed(key_id, 1, ref):
                self._destroy_quietly(ref, key_id, 1)
            raise
        log.info("key_created", key_id=key_id, profile=profile)
        if caller is not None:
            caller.note_key(key.arn, 1)  # spec: §5.2 — the CreateKey record names the new key
        return CreateKeyResponse(KeyMetadata=self._metadata(key))

    def _create_external_key(
        self,
        call: Call[CreateKeyRequest],
        key_id: str,
        spec: KeySpec,
        usage: KeyUsage,
        now: dt.datetime,
    ) -> CreateKeyResponse:
        """CreateKey with Origin EXTERNAL: a key without material, PendingImport until
        ImportKeyMaterial brings it (:mod:`hsmkms.service.imports`)."""
        request, caller = call.request, call.caller
        key = KeyRecord(
            key_id=key_id,
            arn=self.arns.key(key_id),
            description=request.Description or "",
            key_usage=usage.value,
            key_spec=spec.value,
            origin=OriginType.EXTERNAL.value,
            state=KeyState.PendingImport.value,
            created_at=now,
            policy=request.Policy or default_key_policy(self.account_id),
            current_version=0,
        )
        self._store.create_key(key, None, check_tags(request.Tags or []))
        log.info("key_created", key_id=key_id, origin=OriginType.EXTERNAL.value)
        if caller is not None:
            caller.note_key(key.arn)
        return CreateKeyResponse(KeyMetadata=self._metadata(key))

    @operation("DescribeKey")
    def describe_key(self, call: Call[DescribeKeyRequest]) -> DescribeKeyResponse:
        """DescribeKey: the key's metadata, in every state; aliases accepted."""
        return DescribeKeyResponse(KeyMetadata=self._metadata(call.key))

    @operation("ListKeys")
    def list_keys(self, call: Call[ListKeysRequest]) -> ListKeysResponse:
        """ListKeys: key ids and ARNs, Limit 1-1000 (default 100), opaque Marker."""
        request = call.request
        page = self._store.list_keys(
            page_limit(request.Limit, 100), request.Marker, now=self._clock()
        )
        return ListKeysResponse(
            Keys=[KeyListEntry(KeyId=k.key_id, KeyArn=k.arn) for k in page.items],
            NextMarker=page.next_marker,
            Truncated=page.truncated,
        )

    @operation("UpdateKeyDescription")
    def update_key_description(self, call: Call[UpdateKeyDescriptionRequest]) -> EmptyResponse:
        """UpdateKeyDescription (0-8192 characters); refused while pending deletion."""
        if not self._store.set_description(call.key.key_id, call.request.Description):
            raise self._not_found(call.key.key_id)
        return EmptyResponse()

    def _transition(
        self,
        key: KeyRecord,
        from_states: tuple[KeyState, ...],
        to_state: KeyState,
        access: Access,
        *,
        deletion_date: dt.datetime | None = None,
        pending_window_days: int | None = None,
        deletion_after: dt.datetime | None = None,
    ) -> None:
        """Compare-and-set a state change; if the key changed meanwhile, report its new state."""
        ok = self._store.transition(
            key.key_id,
            [s.value for s in from_states],
            to_state.value,
            deletion_date=deletion_date,
            pending_window_days=pending_window_days,
            deletion_after=deletion_after,
        )
        if not ok:
            # Raises the state error for whatever the key became (or NotFound).
            current = self._resolve(key.key_id, aliases=False, access=access)
            if current.state == to_state and to_state in (KeyState.Enabled, KeyState.Disabled):
                return  # a concurrent request did the same: EnableKey/DisableKey are idempotent
            raise KMSInvalidStateException(f"{key.arn} changed state; retry the request.")

    @operation("EnableKey")
    def enable_key(self, call: Call[EnableKeyRequest]) -> EmptyResponse:
        """EnableKey: Disabled -> Enabled (no-op when Enabled). A key whose automatic rotation
        fell due while disabled rotates at once."""
        key = call.key
        if key.state != KeyState.Enabled:
            self._transition(key, (KeyState.Disabled,), KeyState.Enabled, Access.MANAGE_MATERIAL)
        current = self._store.get_key(key.key_id)
        if current is not None and self._rotation_due(current, self._clock()):
            self._rotate(current, RotationType.AUTOMATIC)
        return EmptyResponse()

    @operation("DisableKey")
    def disable_key(self, call: Call[DisableKeyRequest]) -> EmptyResponse:
        """DisableKey: Enabled -> Disabled (no-op when Disabled)."""
        key = call.key
        if key.state != KeyState.Disabled:
            self._transition(key, (KeyState.Enabled,), KeyState.Disabled, Access.MANAGE_MATERIAL)
        return EmptyResponse()

    @operation("ScheduleKeyDeletion", prepare=_prepare_schedule_key_deletion)
    def schedule_key_deletion(
        self, call: Call[ScheduleKeyDeletionRequest]
    ) -> ScheduleKeyDeletionResponse:
        """ScheduleKeyDeletion: PendingDeletion for 7-30 days (default 30); then the purge
        destroys every token object of every version."""
        key = call.key
        days = page_limit(call.request.PendingWindowInDays, DEFAULT_PENDING_WINDOW_DAYS)
        deletion_date = self._clock() + dt.timedelta(days=days)
        self._transition(
            key,
            (KeyState.Enabled, KeyState.Disabled, KeyState.PendingImport),
            KeyState.PendingDeletion,
            Access.MANAGE,
            deletion_date=deletion_date,
            pending_window_days=days,
        )
        log.info("key_deletion_scheduled", key_id=key.key_id, deletion_date=deletion_date)
        return ScheduleKeyDeletionResponse(
            KeyId=key.arn,
            DeletionDate=deletion_date,
            KeyState=KeyState.PendingDeletion,
            PendingWindowInDays=days,
        )

    @operation("CancelKeyDeletion")
    def cancel_key_deletion(
        self, call: Call[CancelKeyDeletionRequest]
    ) -> CancelKeyDeletionResponse:
        """CancelKeyDeletion: PendingDeletion -> Disabled (always Disabled, as AWS), or
        PendingImport for a key whose imported material is not all in the token."""
        key = call.key
        self._transition(
            key,
            (KeyState.PendingDeletion,),
            KeyState.Disabled if self._all_material_imported(key) else KeyState.PendingImport,
            Access.CANCEL_DELETION,
            deletion_after=self._clock(),
        )
        return CancelKeyDeletionResponse(KeyId=key.arn)
