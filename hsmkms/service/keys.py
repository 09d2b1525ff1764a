"""Key operations: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, EnableKey,
DisableKey, ScheduleKeyDeletion, CancelKeyDeletion."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any, Final

from hsmkms.errors import (
    AlreadyExistsException,
    CustomKeyStoreInvalidStateException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
    XksKeyInvalidConfigurationException,
    XksKeyNotFoundException,
)
from hsmkms.keystore.base import Keystore, MaterialName
from hsmkms.keystore.config import KeyPlacement
from hsmkms.keystore.errors import UnsupportedByToken
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
    OperatorCreateKeyRequest,
    ScheduleKeyDeletionRequest,
    ScheduleKeyDeletionResponse,
    UpdateKeyDescriptionRequest,
)
from hsmkms.models.enums import (
    ExpirationModel,
    KeyManager,
    KeySpec,
    KeyState,
    KeyUsage,
    OriginType,
    RotationType,
)
from hsmkms.policy import ContextInput, default_key_policy, parse_policy
from hsmkms.service import xks_client
from hsmkms.service.aliases import check_tags, tag_conditions
from hsmkms.service.authorize import key_policy
from hsmkms.service.core import (
    Call,
    Prepared,
    ServiceCore,
    log,
    material_ref,
    operation,
    page_limit,
)
from hsmkms.service.custom_stores import CONNECTED
from hsmkms.service.custom_stores import EXTERNAL as EXTERNAL_STORE_TYPE
from hsmkms.service.key_types import KEY_TYPES, customer_master_key_spec
from hsmkms.service.states import Access
from hsmkms.store import IMPORTED, ImportedMaterialRecord, KeyRecord, KeyVersionRecord
from hsmkms.types import Caller

DEFAULT_PENDING_WINDOW_DAYS = 30
_XKS_KEY_ID: Final = re.compile(r"[a-zA-Z0-9._-]{1,128}")
"""botocore's XksKeyIdType."""


def _key_type(request: CreateKeyRequest) -> tuple[KeySpec, KeyUsage, OriginType]:
    """The spec, usage and origin CreateKey asks for; the errors of what is not supported."""
    if request.KeySpec is not None and request.CustomerMasterKeySpec is not None:
        raise ValidationException(
            "You cannot specify KeySpec and CustomerMasterKeySpec in the same request. "
            "CustomerMasterKeySpec is deprecated."
        )
    spec = KeySpec(request.KeySpec or request.CustomerMasterKeySpec or KeySpec.SYMMETRIC_DEFAULT)
    usage = request.KeyUsage
    if usage is None:
        if spec is not KeySpec.SYMMETRIC_DEFAULT:
            # spec: LocalStack's AWS-validated snapshot test_hmac_create_key_invalid_operations.
            raise ValidationException(
                "You must specify a KeyUsage value for all KMS keys except for symmetric "
                "encryption keys."
            )
        usage = KeyUsage.ENCRYPT_DECRYPT
    key_type = KEY_TYPES[spec]
    if usage not in key_type.usages:
        raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
    if key_type.material is None:
        raise UnsupportedOperationException(
            f"KeySpec {spec} is not supported: it exists in the AWS China Regions only, and no "
            "PKCS#11 token holds it."
        )
    origin = request.Origin or OriginType.AWS_KMS
    if origin is OriginType.AWS_CLOUDHSM:
        # spec: AWS KMS CreateKey — a key in an AWS CloudHSM key store is a symmetric
        # encryption key, single-Region, named by CustomKeyStoreId.
        if request.CustomKeyStoreId is None:
            raise ValidationException("CustomKeyStoreId is required when Origin is AWS_CLOUDHSM.")
        if spec is not KeySpec.SYMMETRIC_DEFAULT or usage is not KeyUsage.ENCRYPT_DECRYPT:
            raise UnsupportedOperationException(
                f"KeySpec {spec} with KeyUsage {usage} is not supported in a custom key store: "
                "only SYMMETRIC_DEFAULT ENCRYPT_DECRYPT keys are."
            )
        if request.XksKeyId is not None:
            raise ValidationException("XksKeyId is valid only with Origin EXTERNAL_KEY_STORE.")
        if request.MultiRegion:
            raise UnsupportedOperationException(
                "Multi-Region keys cannot be created in a custom key store."
            )
        return spec, usage, origin
    if origin is OriginType.EXTERNAL_KEY_STORE:
        # spec: AWS KMS CreateKey — a key in an external key store: SYMMETRIC_DEFAULT,
        # single-Region, CustomKeyStoreId and XksKeyId required.
        if request.CustomKeyStoreId is None or request.XksKeyId is None:
            raise ValidationException(
                "CustomKeyStoreId and XksKeyId are required when Origin is EXTERNAL_KEY_STORE."
            )
        if _XKS_KEY_ID.fullmatch(request.XksKeyId) is None:
            raise ValidationException(
                "1 validation error detected: Value at 'xksKeyId' failed to satisfy constraint: "
                "Member must satisfy regular expression pattern: ^[a-zA-Z0-9-_.]+$"
            )
        if spec is not KeySpec.SYMMETRIC_DEFAULT or usage is not KeyUsage.ENCRYPT_DECRYPT:
            raise UnsupportedOperationException(
                f"KeySpec {spec} with KeyUsage {usage} is not supported in an external key "
                "store: only SYMMETRIC_DEFAULT ENCRYPT_DECRYPT keys are."
            )
        if request.MultiRegion:
            raise UnsupportedOperationException(
                "Multi-Region keys cannot be created in a custom key store."
            )
        return spec, usage, origin
    if origin not in (OriginType.AWS_KMS, OriginType.EXTERNAL):
        raise UnsupportedOperationException(f"Origin {origin} is not supported.")
    if origin is OriginType.EXTERNAL and spec is KeySpec.ECC_NIST_EDWARDS25519:
        # The keystore cannot rebuild an imported Ed25519 key's public half in the token.
        raise UnsupportedOperationException(
            f"KeySpec {spec} with Origin EXTERNAL is not supported by this key store."
        )
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
        key_type = KEY_TYPES[KeySpec(key.key_spec)]
        usage = KeyUsage(key.key_usage)
        model, valid_to = _expiration(self._materials(key), key.current_version)
        return KeyMetadata.model_validate(
            {
                "AWSAccountId": self.account_id,
                "KeyId": key.key_id,
                "Arn": key.arn,
                "CreationDate": key.created_at,
                "Enabled": key.state == KeyState.Enabled,
                "Description": key.description,
                "KeyUsage": usage,
                "KeyState": KeyState(key.state),
                "DeletionDate": key.deletion_date if pending else None,
                "ValidTo": valid_to,
                "ExpirationModel": model,
                "Origin": OriginType(key.origin),
                "KeyManager": KeyManager.CUSTOMER,
                "CustomerMasterKeySpec": customer_master_key_spec(key.key_spec),
                "KeySpec": key_type.spec,
                **key_type.algorithm_lists(usage),
                "MultiRegion": False,
                "PendingDeletionWindowInDays": key.pending_window_days if pending else None,
                # spec: only symmetric encryption keys have a current key material id.
                "CurrentKeyMaterialId": (
                    self._key_material_id(key, key.current_version) if key_type.symmetric else None
                ),
                **self._custom_store_members(key),
            }
        )

    def _check_xks_key(self, call: Call[CreateKeyRequest], key_id: str) -> str:
        """CreateKey in an external key store: the store is an EXTERNAL_KEY_STORE and CONNECTED,
        the proxy says the external key is an enabled AES_256 key for ENCRYPT and DECRYPT, and
        no other key of the store uses it (then bound to ``key_id``). The store's id."""
        request, caller = call.request, call.caller
        assert request.CustomKeyStoreId is not None
        assert request.XksKeyId is not None
        stores = self.custom_key_stores
        record = stores.table.require(request.CustomKeyStoreId)
        if caller is not None:
            caller.custom_key_store_id = record.store_id
        if record.store_type != EXTERNAL_STORE_TYPE:
            raise UnsupportedOperationException(
                f"The custom key store {record.store_id} is not an EXTERNAL_KEY_STORE."
            )
        if record.connection_state != CONNECTED:
            raise CustomKeyStoreInvalidStateException(
                f"The custom key store {record.store_id} is {record.connection_state}: keys "
                "can be created only in a CONNECTED custom key store."
            )
        # The local operator (a seed file) as the template names it: the account's root.
        principal = (
            caller.principal_arn if caller is not None else f"arn:aws:iam::{self.account_id}:root"
        )
        request_id = caller.request_id if caller is not None else None
        meta = xks_client.XksRequestMetadata(
            principal, "CreateKey", request_id or str(uuid.uuid4())
        )
        failure: xks_client.XksProxyFailure | None = None
        answer: dict[str, Any] = {}
        try:
            answer = xks_client.key_metadata(
                stores.xks, stores.location(record), request.XksKeyId, meta
            )
        except xks_client.XksProxyFailure as exc:
            failure = exc
        if failure is not None:
            log.warning("xks_key_metadata_failed", code=failure.code, status=failure.status)
            if failure.error_name == "KeyNotFoundException":
                raise XksKeyNotFoundException(
                    f"The external key {request.XksKeyId} was not found by the proxy."
                )
            raise CustomKeyStoreInvalidStateException(
                f"The external key store's proxy failed ({failure.code})."
            )
        if not xks_client.is_usable_key(answer):
            raise XksKeyInvalidConfigurationException(
                f"The external key {request.XksKeyId} must be an ENABLED AES_256 key for "
                "ENCRYPT and DECRYPT."
            )
        stores.table.add_xks_key(
            key_id,
            record.store_id,
            request.XksKeyId,
            exists=lambda other: self._store.get_key(other) is not None,
        )
        return record.store_id

    def _custom_store_members(self, key: KeyRecord) -> dict[str, Any]:
        """KeyMetadata's CustomKeyStoreId and CloudHsmClusterId (a key in a custom key
        store: the store its current material is in)."""
        if key.origin == OriginType.EXTERNAL_KEY_STORE and self._custom is not None:
            binding = self._custom.table.xks_key(key.key_id)
            if binding is None:
                return {}
            return {
                "CustomKeyStoreId": binding[0],
                "XksKeyConfiguration": {"Id": binding[1]},
            }
        if key.origin != OriginType.AWS_CLOUDHSM or self._custom is None:
            return {}
        version = self._store.get_version(key.key_id, key.current_version)
        if version is None:
            return {}
        store_id = material_ref(version.material_ref).store
        record = self._custom.table.get(store_id)
        return {
            "CustomKeyStoreId": store_id,
            "CloudHsmClusterId": None if record is None else record.cluster_id,
        }

    def _custom_store_backend(self, store_id: str, caller: Caller | None) -> Keystore:
        """The keystore of the CONNECTED custom key store new material goes to
        (CustomKeyStoreNotFoundException, CustomKeyStoreInvalidStateException)."""
        stores = self.custom_key_stores
        record = stores.table.require(store_id)
        if caller is not None:
            caller.custom_key_store_id = record.store_id
        if record.store_type != "AWS_CLOUDHSM":
            raise UnsupportedOperationException(
                f"The custom key store {record.store_id} is an EXTERNAL_KEY_STORE: Origin "
                "AWS_CLOUDHSM names an AWS_CLOUDHSM key store (use Origin EXTERNAL_KEY_STORE)."
            )
        if record.connection_state != CONNECTED:
            raise CustomKeyStoreInvalidStateException(
                f"The custom key store {record.store_id} is {record.connection_state}: keys "
                "can be created only in a CONNECTED custom key store."
            )
        try:
            return stores.backend(record.store_id)
        except KMSInvalidStateException as exc:
            raise CustomKeyStoreInvalidStateException(exc.message) from None

    def _new_key_id(self, request: CreateKeyRequest, caller: Caller | None) -> str:
        """A fresh UUID; the local operator (a seed file) may choose it instead."""
        if not isinstance(request, OperatorCreateKeyRequest):
            return str(uuid.uuid4())
        if caller is not None:
            raise ValidationException("Only the local operator may choose a key id.")
        if self._store.get_key(request.KeyId) is not None:
            raise AlreadyExistsException(f"Key '{self.arns.key(request.KeyId)}' already exists")
        return request.KeyId

    @operation("CreateKey", prepare=_prepare_create_key)
    def create_key(self, call: Call[CreateKeyRequest]) -> CreateKeyResponse:
        """CreateKey: a key of any spec and usage the token can host, its first version
        generated inside the token (a symmetric key under the store's mechanism profile; a key
        pair or HMAC key with only the capabilities its usage needs).
        UnsupportedOperationException names what a token lacks."""
        request, caller = call.request, call.caller
        spec, usage, origin = _key_type(request)
        now = self._clock()
        key_id = self._new_key_id(request, caller)
        if request.Policy is not None and not request.BypassPolicyLockoutSafetyCheck:
            self._authz.check_lockout(caller, key_policy(request.Policy), self.arns.key(key_id))
        if origin is OriginType.EXTERNAL:
            return self._create_external_key(call, key_id, spec, usage, now)
        xks_store: str | None = None
        if origin is OriginType.EXTERNAL_KEY_STORE:
            xks_store = self._check_xks_key(call, key_id)
        key_type = KEY_TYPES[spec]
        assert key_type.material is not None  # checked by _key_type
        name = MaterialName.key_version(key_id, 1)
        try:
            if origin is OriginType.AWS_CLOUDHSM:
                assert request.CustomKeyStoreId is not None  # checked by _key_type
                ref = self._custom_store_backend(request.CustomKeyStoreId, caller).create(
                    key_type.material, name, placement=KeyPlacement.TOKEN
                )
            elif key_type.symmetric:
                ref = self._stores.default.create(key_type.material, name)
            else:
                material_usage = key_type.material_usage(usage)
                ref = self._stores.default.create(key_type.material, name, usage=material_usage)
        except UnsupportedByToken as exc:
            raise UnsupportedOperationException(
                f"KeySpec {spec} with KeyUsage {usage} is not supported by this key store: "
                f"{exc.message}."
            ) from None
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
        # Key pairs and HMAC keys have no mechanism profile: "-", as in their reference text.
        profile = ref.profile.value if ref.profile is not None else "-"
        version = KeyVersionRecord(key_id, 1, ref.to_str(), profile, now, None)
        try:
            self._store.create_key(key, version, check_tags(request.Tags or []))
        except BaseException:
            self._discard_uncommitted(ref, key_id, 1)
            if xks_store is not None:
                self.custom_key_stores.table.remove_xks_key(key_id)
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
