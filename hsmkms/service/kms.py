"""KmsService: the AWS KMS operations over a keystore (root keys in the token) and a metadata
store. Every public operation takes its request model and returns its response model.

Template of every operation: validate (AWS-worded ValidationException) -> resolve the key (key
id, key ARN, and alias name / alias ARN where AWS accepts them; NotFoundException) -> authorize
the ``caller`` (key policy, identity policy, grants: AccessDeniedException) -> check the key
state against the operation x state matrix (:mod:`hsmkms.service.states`) -> private worker.
The API writes the call's audit record from the result (:mod:`hsmkms.api.app`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import uuid
from collections.abc import Mapping

from hsmkms.errors import (
    AlreadyExistsException,
    ConflictException,
    IncorrectKeyException,
    InvalidAliasNameException,
    InvalidMarkerException,
    KMSInvalidStateException,
    LimitExceededException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName, TokenObject
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.keystore.stores import KeyStores
from hsmkms.models import (
    AliasListEntry,
    CancelKeyDeletionRequest,
    CancelKeyDeletionResponse,
    CreateAliasRequest,
    CreateKeyRequest,
    CreateKeyResponse,
    DecryptRequest,
    DecryptResponse,
    DeleteAliasRequest,
    DescribeKeyRequest,
    DescribeKeyResponse,
    DisableKeyRequest,
    DisableKeyRotationRequest,
    EmptyResponse,
    EnableKeyRequest,
    EnableKeyRotationRequest,
    EncryptRequest,
    EncryptResponse,
    GenerateDataKeyRequest,
    GenerateDataKeyResponse,
    GenerateDataKeyWithoutPlaintextRequest,
    GenerateDataKeyWithoutPlaintextResponse,
    GenerateRandomRequest,
    GenerateRandomResponse,
    GetKeyPolicyRequest,
    GetKeyPolicyResponse,
    GetKeyRotationStatusRequest,
    GetKeyRotationStatusResponse,
    KeyListEntry,
    KeyMetadata,
    ListAliasesRequest,
    ListAliasesResponse,
    ListKeyPoliciesRequest,
    ListKeyPoliciesResponse,
    ListKeyRotationsRequest,
    ListKeyRotationsResponse,
    ListKeysRequest,
    ListKeysResponse,
    ListResourceTagsRequest,
    ListResourceTagsResponse,
    PutKeyPolicyRequest,
    ReEncryptRequest,
    ReEncryptResponse,
    RotateKeyOnDemandRequest,
    RotateKeyOnDemandResponse,
    RotationsListEntry,
    ScheduleKeyDeletionRequest,
    ScheduleKeyDeletionResponse,
    Tag,
    TagResourceRequest,
    UntagResourceRequest,
    UpdateAliasRequest,
    UpdateKeyDescriptionRequest,
    validate_request,
)
from hsmkms.models.constraints import validation_exception
from hsmkms.models.enums import (
    DataKeySpec,
    EncryptionAlgorithmSpec,
    IncludeKeyMaterial,
    KeyManager,
    KeyMaterialState,
    KeySpec,
    KeyState,
    KeyUsage,
    OriginType,
    RotationType,
)
from hsmkms.policy import (
    ContextInput,
    default_key_policy,
    parse_policy,
)
from hsmkms.service.core import EventSink, log
from hsmkms.service.grants import GrantService
from hsmkms.service.identifiers import ALIAS_PREFIX, RESERVED_ALIAS_PREFIX, key_material_id
from hsmkms.service.states import Access
from hsmkms.store import (
    DELETING,
    DuplicateAlias,
    KeyMissing,
    KeyRecord,
    KeyVersionRecord,
    LimitReached,
    MetadataStore,
)
from hsmkms.types import Caller, Clock, utc_now

MAX_TAGS_PER_KEY = 50
MAX_ALIASES_PER_KEY = 50
MAX_ON_DEMAND_ROTATIONS = 25
DEFAULT_ROTATION_PERIOD_DAYS = 365
DEFAULT_PENDING_WINDOW_DAYS = 30
ON_DEMAND_CONFLICT_WINDOW = dt.timedelta(minutes=20)
DEFAULT_POLICY_NAME = "default"
INCORRECT_KEY_MESSAGE = (
    "The key ID in the request does not identify a CMK that can perform this operation."
)


@dataclasses.dataclass(frozen=True)
class DueTaskReport:
    """What one :meth:`KmsService.run_due_tasks` pass did."""

    rotated: list[str]
    purged: list[str]


@dataclasses.dataclass(frozen=True)
class Inconsistencies:
    """Differences between the token and the store (``hsmkms doctor``).

    ``orphans``: token objects of this project that no key version refers to (for example left
    by a crash between creating the object and committing its row). ``missing``: key versions
    whose token object(s) are not on the token.
    """

    orphans: list[TokenObject]
    missing: list[tuple[str, int]]


def _required_blob(blob: bytes | None) -> bytes:
    """CiphertextBlob is optional in the model (DryRun with IGNORE_CIPHERTEXT) but required for
    the operation itself."""
    if blob is None:
        raise validation_exception(
            ["Value null at 'ciphertextBlob' failed to satisfy constraint: Member must not be null"]
        )
    return blob


def _tag_conditions(tags: Mapping[str, str]) -> dict[str, ContextInput]:
    """``aws:RequestTag/<k>`` and ``aws:TagKeys`` of a request carrying tags."""
    values: dict[str, ContextInput] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    values["aws:TagKeys"] = list(tags)
    return values


def _limit(value: int | None, default: int) -> int:
    return default if value is None else value


class KmsService(GrantService):
    """The KMS facade. Thread-safe (the keystore serializes token calls; the store pools
    connections). Every operation takes the request's ``caller`` (None: the local operator,
    not authorized) and authorizes it against the key policy, its identity policy and grants
    (:mod:`hsmkms.service.authorize`)."""

    def __init__(
        self,
        keystore: Keystore | KeyStores,
        store: MetadataStore,
        *,
        region: str,
        account_id: str,
        clock: Clock = utc_now,
        on_event: EventSink | None = None,
    ) -> None:
        super().__init__(
            keystore, store, region=region, account_id=account_id, clock=clock, on_event=on_event
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # == keys ==================================================================================

    def _metadata(self, key: KeyRecord) -> KeyMetadata:
        pending = key.state == KeyState.PendingDeletion
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
            Origin=OriginType(key.origin),
            KeyManager=KeyManager.CUSTOMER,
            CustomerMasterKeySpec=KeySpec(key.key_spec),
            KeySpec=KeySpec(key.key_spec),
            EncryptionAlgorithms=[EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT],
            MultiRegion=False,
            PendingDeletionWindowInDays=key.pending_window_days if pending else None,
            CurrentKeyMaterialId=key_material_id(key.key_id, key.current_version),
        )

    def _check_tags(self, tags: list[Tag]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for tag in tags:
            if tag.TagKey.lower().startswith("aws:"):
                raise TagException("Tags beginning with aws: are reserved")
            if tag.TagKey in seen:
                raise TagException("Duplicate tag keys")
            seen[tag.TagKey] = tag.TagValue
        if len(seen) > MAX_TAGS_PER_KEY:
            raise TagException("Too many tags")
        return seen

    def create_key(
        self, request: CreateKeyRequest, caller: Caller | None = None
    ) -> CreateKeyResponse:
        """CreateKey: a symmetric encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT) whose first
        version is generated inside the token."""
        validate_request(request)
        if request.KeySpec is not None and request.CustomerMasterKeySpec is not None:
            raise ValidationException(
                "You cannot specify KeySpec and CustomerMasterKeySpec in the same request. "
                "CustomerMasterKeySpec is deprecated."
            )
        spec = request.KeySpec or request.CustomerMasterKeySpec or KeySpec.SYMMETRIC_DEFAULT
        usage = request.KeyUsage or KeyUsage.ENCRYPT_DECRYPT
        if spec is KeySpec.SYMMETRIC_DEFAULT and usage is not KeyUsage.ENCRYPT_DECRYPT:
            raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
        if spec is not KeySpec.SYMMETRIC_DEFAULT:
            raise UnsupportedOperationException(f"KeySpec {spec} is not supported.")
        origin = request.Origin or OriginType.AWS_KMS
        if origin is not OriginType.AWS_KMS:
            raise UnsupportedOperationException(f"Origin {origin} is not supported.")
        if request.CustomKeyStoreId is not None or request.XksKeyId is not None:
            raise UnsupportedOperationException("Custom key stores are not supported.")
        if request.MultiRegion:
            raise UnsupportedOperationException("Multi-Region keys are not supported.")
        document = None
        if request.Policy is not None:
            document = parse_policy(request.Policy)  # validates: size, grammar, conditions
        tags = self._check_tags(request.Tags or [])
        bypass = bool(request.BypassPolicyLockoutSafetyCheck)
        conditions: dict[str, ContextInput] = {
            "kms:KeySpec": spec.value,
            "kms:KeyUsage": usage.value,
            "kms:KeyOrigin": origin.value,
            "kms:MultiRegion": False,
            "kms:BypassPolicyLockoutSafetyCheck": bypass,
        }
        if tags:
            conditions.update(_tag_conditions(tags))
        self._authz.check_account(caller, "kms:CreateKey", extra=conditions)

        now = self._clock()
        key_id = str(uuid.uuid4())
        if document is not None and not bypass:
            self._authz.check_lockout(caller, document, self.arns.key(key_id))
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
            self._store.create_key(key, version, tags)
        except BaseException:
            if not self._committed(key_id, 1, ref):
                self._destroy_quietly(ref, key_id, 1)
            raise
        log.info("key_created", key_id=key_id, profile=profile)
        if caller is not None:
            caller.note_key(key.arn, 1)  # spec: §5.2 — the CreateKey record names the new key
        return CreateKeyResponse(KeyMetadata=self._metadata(key))

    def describe_key(
        self, request: DescribeKeyRequest, caller: Caller | None = None
    ) -> DescribeKeyResponse:
        """DescribeKey: the key's metadata, in every state; aliases accepted."""
        validate_request(request)
        self._check_grant_tokens(request.GrantTokens)
        key = self._resolve(
            request.KeyId,
            aliases=True,
            access=Access.READ,
            caller=caller,
            action="kms:DescribeKey",
        )
        return DescribeKeyResponse(KeyMetadata=self._metadata(key))

    def list_keys(self, request: ListKeysRequest, caller: Caller | None = None) -> ListKeysResponse:
        """ListKeys: key ids and ARNs, Limit 1-1000 (default 100), opaque Marker."""
        validate_request(request)
        self._authz.check_account(caller, "kms:ListKeys")
        page = self._store.list_keys(_limit(request.Limit, 100), request.Marker, now=self._clock())
        return ListKeysResponse(
            Keys=[KeyListEntry(KeyId=k.key_id, KeyArn=k.arn) for k in page.items],
            NextMarker=page.next_marker,
            Truncated=page.truncated,
        )

    def update_key_description(
        self, request: UpdateKeyDescriptionRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """UpdateKeyDescription (0-8192 characters); refused while pending deletion."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:UpdateKeyDescription",
        )
        if not self._store.set_description(key.key_id, request.Description):
            raise self._not_found(key.key_id)
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

    def enable_key(self, request: EnableKeyRequest, caller: Caller | None = None) -> EmptyResponse:
        """EnableKey: Disabled -> Enabled (no-op when Enabled). A key whose automatic rotation
        fell due while disabled rotates at once."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:EnableKey",
        )
        if key.state != KeyState.Enabled:
            self._transition(key, (KeyState.Disabled,), KeyState.Enabled, Access.MANAGE)
        current = self._store.get_key(key.key_id)
        if current is not None and self._rotation_due(current, self._clock()):
            self._rotate(current, RotationType.AUTOMATIC)
        return EmptyResponse()

    def disable_key(
        self, request: DisableKeyRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """DisableKey: Enabled -> Disabled (no-op when Disabled)."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:DisableKey",
        )
        if key.state != KeyState.Disabled:
            self._transition(key, (KeyState.Enabled,), KeyState.Disabled, Access.MANAGE)
        return EmptyResponse()

    def schedule_key_deletion(
        self, request: ScheduleKeyDeletionRequest, caller: Caller | None = None
    ) -> ScheduleKeyDeletionResponse:
        """ScheduleKeyDeletion: PendingDeletion for 7-30 days (default 30); then the purge
        destroys every token object of every version."""
        validate_request(request)
        days = _limit(request.PendingWindowInDays, DEFAULT_PENDING_WINDOW_DAYS)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:ScheduleKeyDeletion",
            extra={"kms:ScheduleKeyDeletionPendingWindowInDays": days},
        )
        deletion_date = self._clock() + dt.timedelta(days=days)
        self._transition(
            key,
            (KeyState.Enabled, KeyState.Disabled),
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

    def cancel_key_deletion(
        self, request: CancelKeyDeletionRequest, caller: Caller | None = None
    ) -> CancelKeyDeletionResponse:
        """CancelKeyDeletion: PendingDeletion -> Disabled (always Disabled, as AWS)."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.CANCEL_DELETION,
            caller=caller,
            action="kms:CancelKeyDeletion",
        )
        self._transition(
            key,
            (KeyState.PendingDeletion,),
            KeyState.Disabled,
            Access.CANCEL_DELETION,
            deletion_after=self._clock(),
        )
        return CancelKeyDeletionResponse(KeyId=key.arn)

    # == aliases ===============================================================================

    def _check_alias_name(self, name: str, *, creating: bool) -> None:
        if not name.startswith(ALIAS_PREFIX):
            raise ValidationException(
                'Alias must start with the prefix "alias/". Please see '
                "https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html"
            )
        if name == ALIAS_PREFIX:
            raise InvalidAliasNameException("Alias name must not be empty after alias/.")
        if creating and name.startswith(RESERVED_ALIAS_PREFIX):
            # spec: alias/aws/ is reserved for AWS managed keys (§3.4).
            raise InvalidAliasNameException(
                f"{name} is not a valid alias name: alias/aws/ is reserved for AWS managed keys."
            )

    def create_alias(
        self, request: CreateAliasRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """CreateAlias: a new name for a key (at most 50 per key; ``alias/aws/`` reserved)."""
        validate_request(request)
        self._check_alias_name(request.AliasName, creating=True)
        key = self._resolve(
            request.TargetKeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:CreateAlias",
        )
        try:
            self._store.create_alias(
                request.AliasName, key.key_id, self._clock(), max_per_key=MAX_ALIASES_PER_KEY
            )
        except DuplicateAlias:
            raise AlreadyExistsException(
                f"An alias with the name {self.arns.alias(request.AliasName)} already exists"
            ) from None
        except LimitReached:
            raise LimitExceededException(
                f"Too many aliases for {key.arn}: at most {MAX_ALIASES_PER_KEY} per key."
            ) from None
        except KeyMissing:
            raise self._not_found(key.key_id) from None
        return EmptyResponse()

    def update_alias(
        self, request: UpdateAliasRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """UpdateAlias: point an existing alias at another key of the same type and usage."""
        validate_request(request)
        self._check_alias_name(request.AliasName, creating=False)
        alias = self._store.get_alias(request.AliasName)
        if alias is None:
            raise NotFoundException(f"Alias {self.arns.alias(request.AliasName)} is not found.")
        old = self._store.get_key(alias.key_id)
        if old is not None and caller is not None:
            # spec: UpdateAlias needs kms:UpdateAlias on the current and on the new key (§1.4).
            caller.note_key(old.arn)
            self._authz.check_key(caller, "kms:UpdateAlias", old)
        key = self._resolve(
            request.TargetKeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:UpdateAlias",
        )
        if old is not None and (old.key_spec, old.key_usage) != (key.key_spec, key.key_usage):
            raise ValidationException(
                "The new target key must have the same key spec and key usage as the current one."
            )
        try:
            updated = self._store.update_alias(
                request.AliasName, key.key_id, self._clock(), max_per_key=MAX_ALIASES_PER_KEY
            )
        except LimitReached:
            raise LimitExceededException(
                f"Too many aliases for {key.arn}: at most {MAX_ALIASES_PER_KEY} per key."
            ) from None
        except KeyMissing:
            raise self._not_found(key.key_id) from None
        if not updated:
            raise NotFoundException(f"Alias {self.arns.alias(request.AliasName)} is not found.")
        return EmptyResponse()

    def delete_alias(
        self, request: DeleteAliasRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """DeleteAlias: in every key state."""
        validate_request(request)
        self._check_alias_name(request.AliasName, creating=False)
        if caller is not None:
            alias = self._store.get_alias(request.AliasName)
            target = self._store.get_key(alias.key_id) if alias is not None else None
            if target is not None:
                caller.note_key(target.arn)
                self._authz.check_key(caller, "kms:DeleteAlias", target)
        if not self._store.delete_alias(request.AliasName):
            raise NotFoundException(f"Alias {self.arns.alias(request.AliasName)} is not found.")
        return EmptyResponse()

    def list_aliases(
        self, request: ListAliasesRequest, caller: Caller | None = None
    ) -> ListAliasesResponse:
        """ListAliases: every alias, or those of one key; Limit 1-100 (default 50)."""
        validate_request(request)
        # spec: ListAliases is an account-level action, decided by identity policies (§4.2).
        self._authz.check_account(caller, "kms:ListAliases")
        key_id = None
        if request.KeyId is not None:
            key_id = self._resolve(request.KeyId, aliases=False, access=Access.READ).key_id
        page = self._store.list_aliases(_limit(request.Limit, 50), request.Marker, key_id=key_id)
        return ListAliasesResponse(
            Aliases=[
                AliasListEntry(
                    AliasName=a.name,
                    AliasArn=self.arns.alias(a.name),
                    TargetKeyId=a.key_id,
                    CreationDate=a.created_at,
                    LastUpdatedDate=a.updated_at,
                )
                for a in page.items
            ],
            NextMarker=page.next_marker,
            Truncated=page.truncated,
        )

    # == tags ==================================================================================

    def tag_resource(
        self, request: TagResourceRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """TagResource: add or overwrite tags (at most 50 per key; ``aws:`` reserved)."""
        validate_request(request)
        tags = self._check_tags(request.Tags)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:TagResource",
            extra=_tag_conditions(tags),
        )
        try:
            self._store.put_tags(key.key_id, tags, max_tags=MAX_TAGS_PER_KEY)
        except LimitReached:
            raise TagException("Too many tags") from None
        except KeyMissing:
            raise self._not_found(key.key_id) from None
        return EmptyResponse()

    def untag_resource(
        self, request: UntagResourceRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """UntagResource: remove tags; absent tag keys are ignored."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.MANAGE,
            caller=caller,
            action="kms:UntagResource",
            extra={"aws:TagKeys": list(request.TagKeys)},
        )
        for tag_key in request.TagKeys:
            if tag_key.lower().startswith("aws:"):
                raise TagException("Tags beginning with aws: are reserved")
        self._store.remove_tags(key.key_id, request.TagKeys)
        return EmptyResponse()

    def list_resource_tags(
        self, request: ListResourceTagsRequest, caller: Caller | None = None
    ) -> ListResourceTagsResponse:
        """ListResourceTags: Limit 1-50 (default 50), sorted by tag key."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.READ,
            caller=caller,
            action="kms:ListResourceTags",
        )
        page = self._store.list_tags(key.key_id, _limit(request.Limit, 50), request.Marker)
        return ListResourceTagsResponse(
            Tags=[Tag(TagKey=k, TagValue=v) for k, v in page.items],
            NextMarker=page.next_marker,
            Truncated=page.truncated,
        )

    # == cryptographic operations ==============================================================

    def encrypt(self, request: EncryptRequest, caller: Caller | None = None) -> EncryptResponse:
        """Encrypt 1-4096 bytes under the key's current version, inside the token.

        Security contract: the plaintext is only passed to the token; it is never logged or
        stored. The encryption context is bound as AAD and must be given again to decrypt.
        """
        validate_request(request)
        self._check_grant_tokens(request.GrantTokens)
        algorithm = self._check_algorithm(request.EncryptionAlgorithm)
        key, version = self._resolve_current(
            request.KeyId,
            caller=caller,
            action="kms:Encrypt",
            encryption_context=request.EncryptionContext,
        )
        self._dry_run(request.DryRun)
        blob = self._seal(key, version, request.Plaintext, request.EncryptionContext or {})
        # Built from trusted values: skip re-validation on the hot path.
        return EncryptResponse.model_construct(
            CiphertextBlob=blob, KeyId=key.arn, EncryptionAlgorithm=algorithm
        )

    def decrypt(self, request: DecryptRequest, caller: Caller | None = None) -> DecryptResponse:
        """Decrypt with the key and version the blob names (never trial decryption). A KeyId,
        when given, must identify that key (IncorrectKeyException otherwise)."""
        validate_request(request)
        self._check_grant_tokens(request.GrantTokens)
        algorithm = self._check_algorithm(request.EncryptionAlgorithm)
        if request.Recipient is not None:
            raise UnsupportedOperationException("Recipient (attestation) is not supported.")
        expected = None
        if request.KeyId is not None:
            expected = self._resolve_id(request.KeyId, aliases=True)
        ignore_ciphertext = request.DryRun and "IGNORE_CIPHERTEXT" in (
            request.DryRunModifiers or []
        )
        if ignore_ciphertext:
            if expected is not None:
                self._resolve(
                    expected,
                    aliases=False,
                    access=Access.USE,
                    caller=caller,
                    action="kms:Decrypt",
                )
            self._dry_run(True)
        key, version, plaintext = self._open(
            _required_blob(request.CiphertextBlob),
            request.EncryptionContext or {},
            expected,
            lambda: IncorrectKeyException(INCORRECT_KEY_MESSAGE),
            caller=caller,
            given_context=request.EncryptionContext,
        )
        self._dry_run(request.DryRun)
        # Built from trusted values: skip re-validation on the hot path.
        return DecryptResponse.model_construct(
            KeyId=key.arn,
            Plaintext=plaintext,
            EncryptionAlgorithm=algorithm,
            KeyMaterialId=key_material_id(key.key_id, version.version),
        )

    def re_encrypt(
        self, request: ReEncryptRequest, caller: Caller | None = None
    ) -> ReEncryptResponse:
        """ReEncrypt: decrypt with the source key version the blob names and encrypt under the
        destination key's current version; the plaintext never leaves the service."""
        validate_request(request)
        self._check_grant_tokens(request.GrantTokens)
        source_algorithm = self._check_algorithm(request.SourceEncryptionAlgorithm)
        destination_algorithm = self._check_algorithm(request.DestinationEncryptionAlgorithm)
        expected = None
        if request.SourceKeyId is not None:
            expected = self._resolve_id(request.SourceKeyId, aliases=True)
        destination, destination_version = self._resolve_current(
            request.DestinationKeyId,
            caller=caller,
            action="kms:ReEncryptTo",
            encryption_context=request.DestinationEncryptionContext,
        )
        if request.DryRun and "IGNORE_CIPHERTEXT" in (request.DryRunModifiers or []):
            self._dry_run(True)
        source, source_version, plaintext = self._open(
            _required_blob(request.CiphertextBlob),
            request.SourceEncryptionContext or {},
            expected,
            lambda: IncorrectKeyException(INCORRECT_KEY_MESSAGE),
            caller=caller,
            action="kms:ReEncryptFrom",
            given_context=request.SourceEncryptionContext,
        )
        self._dry_run(request.DryRun)
        blob = self._seal(
            destination,
            destination_version,
            plaintext,
            request.DestinationEncryptionContext or {},
        )
        return ReEncryptResponse(
            CiphertextBlob=blob,
            SourceKeyId=source.arn,
            KeyId=destination.arn,
            SourceEncryptionAlgorithm=source_algorithm,
            DestinationEncryptionAlgorithm=destination_algorithm,
            SourceKeyMaterialId=key_material_id(source.key_id, source_version.version),
            DestinationKeyMaterialId=key_material_id(
                destination.key_id, destination_version.version
            ),
        )

    @staticmethod
    def _data_key_length(key_spec: DataKeySpec | None, number_of_bytes: int | None) -> int:
        # spec: exactly one of KeySpec (AES_256|AES_128) or NumberOfBytes (1-1024) (§1.9).
        if (key_spec is None) == (number_of_bytes is None):
            raise ValidationException("Please specify either number of bytes or key spec.")
        if key_spec is not None:
            return key_spec.length
        assert number_of_bytes is not None
        return number_of_bytes

    def generate_data_key(
        self, request: GenerateDataKeyRequest, caller: Caller | None = None
    ) -> GenerateDataKeyResponse:
        """GenerateDataKey: a fresh data key from the token's generator, returned in plaintext
        and encrypted under the key's current version.

        Security contract: the plaintext data key is returned to the caller only; it is
        never logged or stored.
        """
        validate_request(request)
        self._check_grant_tokens(request.GrantTokens)
        length = self._data_key_length(request.KeySpec, request.NumberOfBytes)
        if request.Recipient is not None:
            raise UnsupportedOperationException("Recipient (attestation) is not supported.")
        key, version = self._resolve_current(
            request.KeyId,
            caller=caller,
            action="kms:GenerateDataKey",
            encryption_context=request.EncryptionContext,
        )
        self._dry_run(request.DryRun)
        data_key = self._keystore.random(length)
        blob = self._seal(key, version, data_key, request.EncryptionContext or {})
        # Built from trusted values: skip re-validation on the hot path.
        return GenerateDataKeyResponse.model_construct(
            CiphertextBlob=blob,
            Plaintext=data_key,
            KeyId=key.arn,
            KeyMaterialId=key_material_id(key.key_id, version.version),
        )

    def generate_data_key_without_plaintext(
        self, request: GenerateDataKeyWithoutPlaintextRequest, caller: Caller | None = None
    ) -> GenerateDataKeyWithoutPlaintextResponse:
        """GenerateDataKeyWithoutPlaintext: as GenerateDataKey, returning only the encrypted
        data key."""
        validate_request(request)
        self._check_grant_tokens(request.GrantTokens)
        length = self._data_key_length(request.KeySpec, request.NumberOfBytes)
        key, version = self._resolve_current(
            request.KeyId,
            caller=caller,
            action="kms:GenerateDataKeyWithoutPlaintext",
            encryption_context=request.EncryptionContext,
        )
        self._dry_run(request.DryRun)
        blob = self._seal(
            key, version, self._keystore.random(length), request.EncryptionContext or {}
        )
        # Built from trusted values: skip re-validation on the hot path.
        return GenerateDataKeyWithoutPlaintextResponse.model_construct(
            CiphertextBlob=blob,
            KeyId=key.arn,
            KeyMaterialId=key_material_id(key.key_id, version.version),
        )

    def generate_random(
        self, request: GenerateRandomRequest, caller: Caller | None = None
    ) -> GenerateRandomResponse:
        """GenerateRandom: 1-1024 bytes from the token's random generator."""
        validate_request(request)
        if request.NumberOfBytes is None:
            raise ValidationException("NumberOfBytes is required.")
        self._authz.check_account(caller, "kms:GenerateRandom")
        if request.CustomKeyStoreId is not None:
            raise UnsupportedOperationException("Custom key stores are not supported.")
        if request.Recipient is not None:
            raise UnsupportedOperationException("Recipient (attestation) is not supported.")
        return GenerateRandomResponse(Plaintext=self._keystore.random(request.NumberOfBytes))

    # == rotation ==============================================================================

    def enable_key_rotation(
        self, request: EnableKeyRotationRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """EnableKeyRotation: rotate every RotationPeriodInDays (90-2560, default 365); the first
        rotation comes one period after this call."""
        validate_request(request)
        period = _limit(request.RotationPeriodInDays, DEFAULT_ROTATION_PERIOD_DAYS)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.USE,
            caller=caller,
            action="kms:EnableKeyRotation",
            extra={"kms:RotationPeriodInDays": period},
        )
        self._store.set_rotation(
            key.key_id,
            enabled=True,
            period_days=period,
            next_rotation_date=self._clock() + dt.timedelta(days=period),
        )
        return EmptyResponse()

    def disable_key_rotation(
        self, request: DisableKeyRotationRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """DisableKeyRotation: no more automatic rotations (existing versions stay)."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.USE,
            caller=caller,
            action="kms:DisableKeyRotation",
        )
        self._store.set_rotation(
            key.key_id, enabled=False, period_days=None, next_rotation_date=None
        )
        return EmptyResponse()

    def get_key_rotation_status(
        self, request: GetKeyRotationStatusRequest, caller: Caller | None = None
    ) -> GetKeyRotationStatusResponse:
        """GetKeyRotationStatus: in every state; reads disabled while pending deletion (the
        setting comes back on cancel, as AWS)."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.READ,
            caller=caller,
            action="kms:GetKeyRotationStatus",
        )
        enabled = key.rotation_enabled and key.state != KeyState.PendingDeletion
        if not enabled:
            return GetKeyRotationStatusResponse(KeyRotationEnabled=False, KeyId=key.arn)
        return GetKeyRotationStatusResponse(
            KeyRotationEnabled=True,
            KeyId=key.arn,
            RotationPeriodInDays=key.rotation_period_days,
            NextRotationDate=key.next_rotation_date,
        )

    def rotate_key_on_demand(
        self, request: RotateKeyOnDemandRequest, caller: Caller | None = None
    ) -> RotateKeyOnDemandResponse:
        """RotateKeyOnDemand: a new key version now (at most 25 per key); the automatic
        schedule is unchanged."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.USE,
            caller=caller,
            action="kms:RotateKeyOnDemand",
        )
        now = self._clock()

        def allowed(current: KeyRecord) -> None:
            if current.state != KeyState.Enabled:
                self._resolve(current.key_id, aliases=False, access=Access.USE)
            if current.on_demand_rotations >= MAX_ON_DEMAND_ROTATIONS:
                raise LimitExceededException(
                    "The on-demand rotations limit has been reached for this key. "
                    f"A key can be rotated on demand at most {MAX_ON_DEMAND_ROTATIONS} times."
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

    def list_key_rotations(
        self, request: ListKeyRotationsRequest, caller: Caller | None = None
    ) -> ListKeyRotationsResponse:
        """ListKeyRotations: the rotations (AUTOMATIC / ON_DEMAND, with dates); with
        ALL_KEY_MATERIAL also the original material."""
        validate_request(request)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.READ,
            caller=caller,
            action="kms:ListKeyRotations",
        )
        everything = request.IncludeKeyMaterial is IncludeKeyMaterial.ALL_KEY_MATERIAL
        page = self._store.list_versions(
            key.key_id,
            _limit(request.Limit, 100),
            request.Marker,
            min_version=1 if everything else 2,
        )
        entries = []
        for v in page.items:
            entry = RotationsListEntry(
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
            entries.append(entry)
        return ListKeyRotationsResponse(
            Rotations=entries, NextMarker=page.next_marker, Truncated=page.truncated
        )

    # == key policies ==========================================================================

    def _check_policy_name(self, name: str | None) -> None:
        if name is not None and name != DEFAULT_POLICY_NAME:
            raise NotFoundException(f"No such policy exists: {name}. The only policy is default.")

    def get_key_policy(
        self, request: GetKeyPolicyRequest, caller: Caller | None = None
    ) -> GetKeyPolicyResponse:
        """GetKeyPolicy: the key policy document (PolicyName ``default`` only)."""
        validate_request(request)
        self._check_policy_name(request.PolicyName)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.READ,
            caller=caller,
            action="kms:GetKeyPolicy",
        )
        return GetKeyPolicyResponse(Policy=key.policy, PolicyName=DEFAULT_POLICY_NAME)

    def put_key_policy(
        self, request: PutKeyPolicyRequest, caller: Caller | None = None
    ) -> EmptyResponse:
        """PutKeyPolicy: replace the policy (JSON, at most 32 KB), refused when the new policy
        would lock the caller out of PutKeyPolicy unless BypassPolicyLockoutSafetyCheck."""
        validate_request(request)
        self._check_policy_name(request.PolicyName)
        bypass = bool(request.BypassPolicyLockoutSafetyCheck)
        key = self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.READ,
            caller=caller,
            action="kms:PutKeyPolicy",
            extra={"kms:BypassPolicyLockoutSafetyCheck": bypass},
        )
        document = parse_policy(request.Policy)  # validates: size, grammar, conditions
        if not bypass:
            self._authz.check_lockout(caller, document, key.arn, key)
        if not self._store.set_policy(key.key_id, request.Policy):
            raise self._not_found(key.key_id)
        return EmptyResponse()

    def list_key_policies(
        self, request: ListKeyPoliciesRequest, caller: Caller | None = None
    ) -> ListKeyPoliciesResponse:
        """ListKeyPolicies: always ``["default"]``."""
        validate_request(request)
        if request.Marker is not None:
            raise InvalidMarkerException("The marker is not valid.")
        self._resolve(
            request.KeyId,
            aliases=False,
            access=Access.READ,
            caller=caller,
            action="kms:ListKeyPolicies",
        )
        return ListKeyPoliciesResponse(PolicyNames=[DEFAULT_POLICY_NAME], Truncated=False)

    # == maintenance ===========================================================================

    def rotate_due(self) -> list[str]:
        """Rotate every Enabled key whose automatic rotation is due. Returns their ids."""
        rotated = []
        for key in self._store.keys_due_for_rotation(self._clock()):
            try:
                updated = self._rotate(key, RotationType.AUTOMATIC)
            except Exception:
                log.exception("rotation_failed", key_id=key.key_id)
                continue
            if updated is not None:
                rotated.append(key.key_id)
        return rotated

    def purge_due(self) -> list[str]:
        """Destroy keys whose deletion date has passed: every token object of every version
        (``C_DestroyObject``), then their rows, aliases and tags. Returns the purged key ids.

        Crash-safe: the key is first marked Deleting (gone for callers), then its objects are
        destroyed (destroying an absent object is not an error), then its rows deleted; a purge
        interrupted anywhere finishes on the next run.
        """
        now = self._clock()
        purged = []
        for key in self._store.keys_to_purge(now):
            if not self._store.mark_deleting(key.key_id, now):
                continue  # cancelled meanwhile
            try:
                for version in self._store.list_versions(key.key_id).items:
                    ref = KeyMaterialRef.from_str(version.material_ref)
                    self._stores.backend_for(ref).destroy(ref)
                self._store.delete_key(key.key_id)
            except Exception:
                log.exception("purge_failed", key_id=key.key_id)
                continue
            log.info("key_deleted", key_id=key.key_id)
            self._emit("DeleteKey", key.arn)
            purged.append(key.key_id)
        return purged

    def run_due_tasks(self) -> DueTaskReport:
        """One pass of the periodic work: due automatic rotations, then due deletions."""
        return DueTaskReport(rotated=self.rotate_due(), purged=self.purge_due())

    def find_inconsistencies(self) -> Inconsistencies:
        """Compare the token's objects with the store's key versions (``hsmkms doctor``).

        The token is listed first, so an object created (and committed) after the listing is
        not reported; an object whose row is not committed yet may be reported as an orphan.
        """
        objects = {store_id: backend.list_objects() for store_id, backend in self._stores.items()}
        present = {s: {o.object_id for o in listed} for s, listed in objects.items()}
        referenced: dict[str, set[str]] = {store_id: set() for store_id in objects}
        missing: list[tuple[str, int]] = []
        for version, state in self._store.all_versions():
            ref = KeyMaterialRef.from_str(version.material_ref)
            referenced.setdefault(ref.store, set()).update(ref.object_ids)
            in_store = present.get(ref.store, set())  # an unregistered store: all missing
            if state != DELETING and not all(oid in in_store for oid in ref.object_ids):
                missing.append((version.key_id, version.version))
        # Service keys (audit seal, credentials) are not key versions and never orphans here.
        orphans = [
            o
            for store_id, listed in objects.items()
            for o in listed
            if o.is_key_version and o.object_id not in referenced[store_id]
        ]
        return Inconsistencies(orphans=orphans, missing=missing)

    def start_background(self, interval: float = 60.0) -> None:
        """Run :meth:`run_due_tasks` every ``interval`` seconds in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.run_due_tasks()
                except Exception:
                    log.exception("due_tasks_failed")

        self._thread = threading.Thread(target=loop, name="hsmkms-due-tasks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the background thread (if running) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop background work, close the store and log the keystore out (end of process)."""
        self.stop()
        self._store.close()
        self._stores.close()
