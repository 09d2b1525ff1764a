"""One descriptor per AWS KMS operation, and every list of operation facts derived from them.

An :class:`Operation` says what the service needs to know about an operation before its worker
runs: its wire models, the IAM action(s) a policy decides, whether it acts on one key or on the
account, how the template finds the key (and whether an alias may name it), which key states
and key types it accepts, which grant operations it maps to, whether CloudTrail marks it
read-only and whether the HTTP layer runs it inline. :data:`ALL_OPERATIONS` holds every operation of
the AWS KMS API (the botocore model is the authority: a test compares the names); those without
models are not implemented yet and answer ``UnsupportedOperationException`` at the HTTP layer
(AWS recognises them: they are not unknown); :data:`OPERATIONS` holds the implemented ones.

Every other list is derived here and nowhere else: the policy actions
(:data:`KEY_RESOURCE_ACTIONS`, :data:`ACCOUNT_ACTIONS`), the grant operations and which key types
admit them (:data:`GRANT_OPERATIONS`, :func:`valid_grant_operations`), the operations grant
constraints restrict (:data:`ENCRYPTION_CONTEXT_OPERATIONS`), CloudTrail's read-only set
(:data:`READ_ONLY_OPERATIONS`), the operations run inline (:data:`INLINE_OPERATIONS`) and
those whose signed requests may be accepted more than once (:data:`REPLAYABLE_OPERATIONS`).

The worker of an operation is the :class:`~hsmkms.service.core.operation`-decorated method of
:class:`~hsmkms.service.KmsService` named by :attr:`Operation.worker`; the template that runs
around it is :meth:`hsmkms.service.core.ServiceCore._execute`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import typing
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel

from hsmkms import models as m
from hsmkms.models.enums import GrantOperation, KeyFamily, KeyUsage, key_family
from hsmkms.service.states import Access

__all__ = [
    "ACCOUNT_ACTIONS",
    "ALL_OPERATIONS",
    "ENCRYPTION_CONTEXT_OPERATIONS",
    "GRANT_OPERATIONS",
    "INLINE_OPERATIONS",
    "KEY_RESOURCE_ACTIONS",
    "OPERATIONS",
    "READ_ONLY_OPERATIONS",
    "REPLAYABLE_OPERATIONS",
    "Operation",
    "Resolution",
    "Resource",
    "blob_members",
    "valid_grant_operations",
]


class Resource(enum.Enum):
    """What a policy decides an operation on."""

    KEY = "key"
    """One key: its key policy (with the caller's identity policy) and its grants decide."""
    ACCOUNT = "account"
    """The account: identity policies alone decide (CreateKey, ListKeys, GenerateRandom, ...)."""


class Resolution(enum.Enum):
    """How the template finds, authorizes and checks the key before the worker runs."""

    ACCOUNT = "account"
    """No key: the caller is authorized for the account-level action."""
    KEY = "key"
    """The key named by the request member :attr:`Operation.key_member`: resolved, authorized
    for the action, its state checked against :attr:`Operation.access` and its type against
    :attr:`Operation.usages` / :attr:`Operation.families`."""
    CURRENT = "current"
    """As KEY, for encryption: also the key's current version (rotating first when an automatic
    rotation is due), authorized with the request's encryption context."""
    MATERIAL = "material"
    """As KEY, and also the key's current version (its key material), read with the key in one
    cached query: the operations that use a key that never rotates (Sign, GenerateMac, ...)."""
    WORKER = "worker"
    """The worker finds and authorizes the key(s) itself: a ciphertext names the key (Decrypt),
    two keys are involved (ReEncrypt, UpdateAlias), or the key is reached through an alias or a
    grant rather than a key identifier (DeleteAlias, RetireGrant)."""


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """What the service knows about one AWS KMS operation before its worker runs."""

    name: str
    request_model: type[BaseModel] | None = None
    """None: not implemented yet (the descriptor still feeds the derived lists)."""
    response_model: type[BaseModel] | None = None
    resource: Resource = Resource.KEY
    resolution: Resolution = Resolution.KEY
    key_member: str = "KeyId"
    """The request member naming the key (KEY, CURRENT and MATERIAL resolutions)."""
    aliases: bool = False
    """Whether the key may be named by an alias name or alias ARN (spec: §1.3)."""
    access: Access = Access.READ
    """The key states the operation accepts (:mod:`hsmkms.service.states`)."""
    usages: frozenset[KeyUsage] | None = None
    """The key usages the operation accepts; None: any."""
    families: frozenset[KeyFamily] | None = None
    """The key spec families the operation accepts; None: any."""
    actions: tuple[str, ...] = ()
    """IAM actions a policy decides (``kms:<name>`` unless given: ReEncrypt has two)."""
    grants: tuple[GrantOperation, ...] = ()
    """The grant operations that allow it (empty: no grant can)."""
    encryption_context: bool = False
    """Whether the request carries an encryption context (grant constraints restrict it)."""
    grant_tokens: bool = False
    """Whether the request carries GrantTokens (checked by the template)."""
    read_only: bool = False
    """CloudTrail's ``readOnly``: its ``responseElements`` are null."""
    inline: bool = False
    """Run on the HTTP event loop (fast token work) rather than the administration thread."""
    api: bool = True
    """False for an IAM action that no API operation has (kms:SynchronizeMultiRegionKey)."""
    action: str = dataclasses.field(init=False, compare=False)
    """The IAM action the template authorizes (the first, for ReEncrypt)."""
    _accepted: dict[tuple[str, str], bool] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """:meth:`accepts` answers by (spec, usage): it runs on every request."""

    def __post_init__(self) -> None:
        if not self.actions:
            object.__setattr__(self, "actions", (f"kms:{self.name}",))
        object.__setattr__(self, "action", self.actions[0])

    @property
    def worker(self) -> str:
        """The name of the service method that runs the operation: ``encrypt`` for Encrypt."""
        return _SNAKE.sub("_", self.name).lower()

    @property
    def implemented(self) -> bool:
        """Whether the service has the operation (its models exist)."""
        return self.request_model is not None

    def accepts(self, key_spec: str, key_usage: str) -> bool:
        """Whether a key of this spec and usage can take part in the operation."""
        known = self._accepted.get((key_spec, key_usage))
        if known is not None:
            return known
        ok = (self.usages is None or key_usage in self.usages) and (
            self.families is None or key_family(key_spec) in self.families
        )
        self._accepted[(key_spec, key_usage)] = ok
        return ok


def _op(
    name: str,
    request: type[BaseModel] | None,
    response: type[BaseModel] | None,
    *presets: Mapping[str, Any],
    **facts: Any,
) -> Operation:
    """A descriptor from shared presets (merged in order), then its own facts."""
    merged: dict[str, Any] = {}
    for preset in presets:
        merged.update(preset)
    merged.update(facts)
    return Operation(name, request, response, **merged)


_ENCRYPT_DECRYPT: Final = frozenset({KeyUsage.ENCRYPT_DECRYPT})
_SIGN_VERIFY: Final = frozenset({KeyUsage.SIGN_VERIFY})
_MAC: Final = frozenset({KeyUsage.GENERATE_VERIFY_MAC})
_AGREEMENT: Final = frozenset({KeyUsage.KEY_AGREEMENT})
_ENCAPSULATION: Final = frozenset({KeyUsage.ENCAPSULATE_DECAPSULATE})
_SYMMETRIC: Final = frozenset({KeyFamily.SYMMETRIC})
# Key types that encrypt: symmetric keys, RSA (OAEP) and SM2 (SM2PKE).
_ENCRYPTING: Final = frozenset({KeyFamily.SYMMETRIC, KeyFamily.RSA, KeyFamily.SM2})
_SIGNING: Final = frozenset({KeyFamily.RSA, KeyFamily.ECC, KeyFamily.SM2, KeyFamily.ML_DSA})
_ASYMMETRIC: Final = frozenset(
    {KeyFamily.RSA, KeyFamily.ECC, KeyFamily.SM2, KeyFamily.ML_DSA, KeyFamily.ML_KEM}
)
_G = GrantOperation
# Shorthands for the table below.
_ACCOUNT: Final[dict[str, Any]] = {"resource": Resource.ACCOUNT, "resolution": Resolution.ACCOUNT}
_CRYPTO: Final[dict[str, Any]] = {"read_only": True, "inline": True, "grant_tokens": True}
# The operations on a key pair or HMAC key: the key and its material in one query.
_KEY_USE: Final[dict[str, Any]] = {
    **_CRYPTO, "resolution": Resolution.MATERIAL, "aliases": True, "access": Access.USE,
}  # fmt: skip
_DATA_KEY: Final[dict[str, Any]] = {
    **_CRYPTO, "resolution": Resolution.CURRENT, "aliases": True, "access": Access.USE,
    "usages": _ENCRYPT_DECRYPT, "families": _SYMMETRIC, "encryption_context": True,
}  # fmt: skip

ALL_OPERATIONS: Final[dict[str, Operation]] = {
    op.name: op
    for op in (
        # -- keys -------------------------------------------------------------------------------
        _op("CreateKey", m.CreateKeyRequest, m.CreateKeyResponse, _ACCOUNT),
        _op(
            "DescribeKey",
            m.DescribeKeyRequest,
            m.DescribeKeyResponse,
            aliases=True,
            grant_tokens=True,
            read_only=True,
            grants=(_G.DescribeKey,),
        ),
        _op("ListKeys", m.ListKeysRequest, m.ListKeysResponse, _ACCOUNT, read_only=True),
        _op(
            "UpdateKeyDescription",
            m.UpdateKeyDescriptionRequest,
            m.EmptyResponse,
            access=Access.MANAGE,
        ),
        _op("EnableKey", m.EnableKeyRequest, m.EmptyResponse, access=Access.MANAGE_MATERIAL),
        _op("DisableKey", m.DisableKeyRequest, m.EmptyResponse, access=Access.MANAGE_MATERIAL),
        _op(
            "ScheduleKeyDeletion",
            m.ScheduleKeyDeletionRequest,
            m.ScheduleKeyDeletionResponse,
            access=Access.MANAGE,
        ),
        _op(
            "CancelKeyDeletion",
            m.CancelKeyDeletionRequest,
            m.CancelKeyDeletionResponse,
            access=Access.CANCEL_DELETION,
        ),
        _op(
            "GetKeyLastUsage",
            m.GetKeyLastUsageRequest,
            m.GetKeyLastUsageResponse,
            read_only=True,
        ),
        _op("ReplicateKey", m.ReplicateKeyRequest, m.ReplicateKeyResponse, access=Access.MANAGE),
        _op(
            "UpdatePrimaryRegion",
            m.UpdatePrimaryRegionRequest,
            m.EmptyResponse,
            access=Access.MANAGE,
        ),
        _op("SynchronizeMultiRegionKey", None, None, api=False),
        # -- aliases and tags -------------------------------------------------------------------
        _op(
            "CreateAlias",
            m.CreateAliasRequest,
            m.EmptyResponse,
            key_member="TargetKeyId",
            access=Access.MANAGE,
        ),
        _op("UpdateAlias", m.UpdateAliasRequest, m.EmptyResponse, resolution=Resolution.WORKER),
        _op("DeleteAlias", m.DeleteAliasRequest, m.EmptyResponse, resolution=Resolution.WORKER),
        _op("ListAliases", m.ListAliasesRequest, m.ListAliasesResponse, _ACCOUNT, read_only=True),
        _op("TagResource", m.TagResourceRequest, m.EmptyResponse, access=Access.MANAGE),
        _op("UntagResource", m.UntagResourceRequest, m.EmptyResponse, access=Access.MANAGE),
        _op(
            "ListResourceTags",
            m.ListResourceTagsRequest,
            m.ListResourceTagsResponse,
            read_only=True,
        ),
        # -- cryptographic operations -----------------------------------------------------------
        _op(
            "Encrypt",
            m.EncryptRequest,
            m.EncryptResponse,
            _DATA_KEY,
            families=_ENCRYPTING,
            grants=(_G.Encrypt,),
        ),
        _op(
            "Decrypt",
            m.DecryptRequest,
            m.DecryptResponse,
            _CRYPTO,
            resolution=Resolution.WORKER,
            aliases=True,
            access=Access.USE,
            usages=_ENCRYPT_DECRYPT,
            families=_ENCRYPTING,
            encryption_context=True,
            grants=(_G.Decrypt,),
        ),
        _op(
            "ReEncrypt",
            m.ReEncryptRequest,
            m.ReEncryptResponse,
            _CRYPTO,
            resolution=Resolution.WORKER,
            aliases=True,
            access=Access.USE,
            usages=_ENCRYPT_DECRYPT,
            families=_ENCRYPTING,
            encryption_context=True,
            actions=("kms:ReEncryptFrom", "kms:ReEncryptTo"),
            grants=(_G.ReEncryptFrom, _G.ReEncryptTo),
        ),
        _op(
            "GenerateDataKey",
            m.GenerateDataKeyRequest,
            m.GenerateDataKeyResponse,
            _DATA_KEY,
            grants=(_G.GenerateDataKey,),
        ),
        _op(
            "GenerateDataKeyWithoutPlaintext",
            m.GenerateDataKeyWithoutPlaintextRequest,
            m.GenerateDataKeyWithoutPlaintextResponse,
            _DATA_KEY,
            grants=(_G.GenerateDataKeyWithoutPlaintext,),
        ),
        _op(
            "GenerateDataKeyPair",
            m.GenerateDataKeyPairRequest,
            m.GenerateDataKeyPairResponse,
            _DATA_KEY,
            grants=(_G.GenerateDataKeyPair,),
        ),
        _op(
            "GenerateDataKeyPairWithoutPlaintext",
            m.GenerateDataKeyPairWithoutPlaintextRequest,
            m.GenerateDataKeyPairWithoutPlaintextResponse,
            _DATA_KEY,
            grants=(_G.GenerateDataKeyPairWithoutPlaintext,),
        ),
        _op(
            "GenerateRandom",
            m.GenerateRandomRequest,
            m.GenerateRandomResponse,
            _ACCOUNT,
            read_only=True,
            inline=True,
        ),
        _op(
            "Sign",
            m.SignRequest,
            m.SignResponse,
            _KEY_USE,
            usages=_SIGN_VERIFY,
            families=_SIGNING,
            grants=(_G.Sign,),
        ),
        _op(
            "Verify",
            m.VerifyRequest,
            m.VerifyResponse,
            _KEY_USE,
            usages=_SIGN_VERIFY,
            families=_SIGNING,
            grants=(_G.Verify,),
        ),
        _op(
            "GenerateMac",
            m.GenerateMacRequest,
            m.GenerateMacResponse,
            _KEY_USE,
            usages=_MAC,
            families=frozenset({KeyFamily.HMAC}),
            grants=(_G.GenerateMac,),
        ),
        _op(
            "VerifyMac",
            m.VerifyMacRequest,
            m.VerifyMacResponse,
            _KEY_USE,
            usages=_MAC,
            families=frozenset({KeyFamily.HMAC}),
            grants=(_G.VerifyMac,),
        ),
        _op(
            "DeriveSharedSecret",
            m.DeriveSharedSecretRequest,
            m.DeriveSharedSecretResponse,
            _KEY_USE,
            usages=_AGREEMENT,
            families=frozenset({KeyFamily.ECC, KeyFamily.SM2}),
            grants=(_G.DeriveSharedSecret,),
        ),
        _op(
            "GetPublicKey",
            m.GetPublicKeyRequest,
            m.GetPublicKeyResponse,
            _KEY_USE,
            families=_ASYMMETRIC,
            grants=(_G.GetPublicKey,),
        ),
        _op(
            "Encapsulate",
            m.EncapsulateRequest,
            m.EncapsulateResponse,
            _KEY_USE,
            usages=_ENCAPSULATION,
            families=frozenset({KeyFamily.ML_KEM}),
            grants=(_G.Encapsulate,),
        ),
        _op(
            "Decapsulate",
            m.DecapsulateRequest,
            m.DecapsulateResponse,
            _KEY_USE,
            usages=_ENCAPSULATION,
            families=frozenset({KeyFamily.ML_KEM}),
            grants=(_G.Decapsulate,),
        ),
        # -- imported key material --------------------------------------------------------------
        _op(
            "GetParametersForImport",
            m.GetParametersForImportRequest,
            m.GetParametersForImportResponse,
            read_only=True,
            access=Access.MANAGE,
        ),
        _op(
            "ImportKeyMaterial",
            m.ImportKeyMaterialRequest,
            m.ImportKeyMaterialResponse,
            access=Access.MANAGE,
        ),
        _op(
            "DeleteImportedKeyMaterial",
            m.DeleteImportedKeyMaterialRequest,
            m.DeleteImportedKeyMaterialResponse,
            access=Access.DELETE_MATERIAL,
        ),
        # -- rotation ---------------------------------------------------------------------------
        # Their worker checks the state (USE) after the origin: a key with imported material is
        # UnsupportedOperationException in every state (spec: §3.5 note 6).
        _op("EnableKeyRotation", m.EnableKeyRotationRequest, m.EmptyResponse, access=Access.READ),
        _op("DisableKeyRotation", m.DisableKeyRotationRequest, m.EmptyResponse, access=Access.READ),
        _op(
            "GetKeyRotationStatus",
            m.GetKeyRotationStatusRequest,
            m.GetKeyRotationStatusResponse,
            read_only=True,
        ),
        _op(
            "RotateKeyOnDemand",
            m.RotateKeyOnDemandRequest,
            m.RotateKeyOnDemandResponse,
            access=Access.USE,
        ),
        _op(
            "ListKeyRotations",
            m.ListKeyRotationsRequest,
            m.ListKeyRotationsResponse,
            read_only=True,
        ),
        # -- key policies -----------------------------------------------------------------------
        _op("GetKeyPolicy", m.GetKeyPolicyRequest, m.GetKeyPolicyResponse, read_only=True),
        _op("PutKeyPolicy", m.PutKeyPolicyRequest, m.EmptyResponse),
        _op("ListKeyPolicies", m.ListKeyPoliciesRequest, m.ListKeyPoliciesResponse, read_only=True),
        # -- grants -----------------------------------------------------------------------------
        _op(
            "CreateGrant",
            m.CreateGrantRequest,
            m.CreateGrantResponse,
            access=Access.MANAGE_MATERIAL,
            grant_tokens=True,
            grants=(_G.CreateGrant,),
        ),
        _op("ListGrants", m.ListGrantsRequest, m.ListGrantsResponse, read_only=True),
        _op(
            "ListRetirableGrants",
            m.ListRetirableGrantsRequest,
            m.ListGrantsResponse,
            _ACCOUNT,
            read_only=True,
        ),
        _op(
            "RetireGrant",
            m.RetireGrantRequest,
            m.EmptyResponse,
            resolution=Resolution.WORKER,
            grants=(_G.RetireGrant,),
        ),
        _op("RevokeGrant", m.RevokeGrantRequest, m.EmptyResponse),
        # -- custom key stores (account-level) --------------------------------------------------
        _op(
            "CreateCustomKeyStore",
            m.CreateCustomKeyStoreRequest,
            m.CreateCustomKeyStoreResponse,
            _ACCOUNT,
        ),
        _op("ConnectCustomKeyStore", m.ConnectCustomKeyStoreRequest, m.EmptyResponse, _ACCOUNT),
        _op(
            "DescribeCustomKeyStores",
            m.DescribeCustomKeyStoresRequest,
            m.DescribeCustomKeyStoresResponse,
            _ACCOUNT,
            read_only=True,
        ),
        _op(
            "DisconnectCustomKeyStore",
            m.DisconnectCustomKeyStoreRequest,
            m.EmptyResponse,
            _ACCOUNT,
        ),
        _op("UpdateCustomKeyStore", m.UpdateCustomKeyStoreRequest, m.EmptyResponse, _ACCOUNT),
        _op("DeleteCustomKeyStore", m.DeleteCustomKeyStoreRequest, m.EmptyResponse, _ACCOUNT),
    )
}
"""Every AWS KMS operation (and the one IAM action without an operation), by name."""

OPERATIONS: Final = {name: op for name, op in ALL_OPERATIONS.items() if op.implemented}
"""The operations this service implements (each has a worker: a test checks it)."""


def _actions(resource: Resource) -> tuple[str, ...]:
    return tuple(
        sorted(a for op in ALL_OPERATIONS.values() if op.resource is resource for a in op.actions)
    )


KEY_RESOURCE_ACTIONS: Final = _actions(Resource.KEY)
"""Every KMS action authorized against a particular key (and so by its key policy)."""

ACCOUNT_ACTIONS: Final = _actions(Resource.ACCOUNT)
"""KMS actions not tied to one key: identity policies alone decide them."""

GRANT_OPERATIONS: Final = tuple(
    dict.fromkeys(g for op in ALL_OPERATIONS.values() for g in op.grants)
)
"""Every grant operation some operation maps to (a test holds it equal to the wire enum)."""

ENCRYPTION_CONTEXT_OPERATIONS: Final = frozenset(
    g.value for op in ALL_OPERATIONS.values() if op.encryption_context for g in op.grants
)
"""Grant operations whose requests carry an encryption context: the only ones grant
constraints restrict (spec: §4.4)."""

READ_ONLY_OPERATIONS: Final = frozenset(op.name for op in ALL_OPERATIONS.values() if op.read_only)
"""Operations CloudTrail marks ``readOnly: true``."""

INLINE_OPERATIONS: Final = frozenset(op.name for op in ALL_OPERATIONS.values() if op.inline)
"""Operations the HTTP layer runs on the event loop; all others run on its worker thread."""

REPLAYABLE_OPERATIONS: Final = READ_ONLY_OPERATIONS | {"CreateKey"}
"""Operations whose signed request the HTTP layer accepts more than once (every other request
is accepted once per signature: ``docs/authentication.md``, "Replays"). The read-only ones
change nothing. CreateKey changes no existing state — a replay adds an unused key with the
policy the signer chose, giving no one anything new — while refusing it would break every
client that creates two keys with the same parameters within one second (SigV4 dates have
one-second steps, and boto3 leaves its per-call headers unsigned, so the two requests are
byte for byte the same signed request)."""

_ACTION_TO_OPERATION: Final = {
    action: op for op in ALL_OPERATIONS.values() for action in op.actions if op.grants
}


@functools.cache
def valid_grant_operations(key_spec: str, key_usage: str) -> frozenset[str]:
    """The grant operations CreateGrant may name for a key of this spec and usage (spec: §4.4,
    DG "grant operations"): those of every operation the key can take part in."""
    return frozenset(
        g.value
        for op in ALL_OPERATIONS.values()
        if op.grants and op.accepts(key_spec, key_usage)
        for g in op.grants
    )


def bound_to_encryption_context(action: str) -> bool:
    """Whether grant constraints restrict ``action`` (``kms:Decrypt`` or ``Decrypt``): its
    requests carry an encryption context."""
    op = _ACTION_TO_OPERATION.get(action if action.startswith("kms:") else f"kms:{action}")
    return op is not None and op.encryption_context


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from a field type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = typing.get_args(annotation)
        if args and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) == 1:
                annotation = rest[0]
                continue
        return annotation


@functools.cache
def blob_members(model: type[BaseModel]) -> frozenset[str]:
    """Names of the ``bytes`` members of ``model`` (base64 strings on the wire)."""
    return frozenset(
        name for name, field in model.model_fields.items() if _unwrap(field.annotation) is bytes
    )
