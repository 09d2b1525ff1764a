"""The shared machinery of :class:`~hsmkms.service.KmsService`: the template every operation
runs through, key resolution, state and usage checks, sealing and opening ciphertexts, creating
key versions crash-safely.

The template (:meth:`ServiceCore._execute`): validate the request (AWS-worded
ValidationException) -> check its grant tokens -> the worker's ``prepare`` hook (checks of the
request alone, and the extra condition context the operation adds) -> resolve the key (key id,
key ARN, and alias name / alias ARN where the operation accepts them; NotFoundException) ->
authorize the caller (key policy, identity policy, grants: AccessDeniedException) -> check the
key state (:mod:`hsmkms.service.states`) and type -> the worker. The keys used are noted on the
caller for the API's audit record. What each operation needs is in its descriptor
(:mod:`hsmkms.service.operations`); a worker is a method decorated with :func:`operation` and
holds only what is specific to its operation.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import functools
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, overload

import structlog
from pydantic import BaseModel

from hsmkms.ciphertext import (
    XKS_FORMAT_VERSION,
    CiphertextBlob,
    XksCiphertext,
    blob_bytes,
    blob_prefix,
    blob_version,
    encode_encryption_context,
)
from hsmkms.errors import (
    DependencyTimeoutException,
    DryRunOperationException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KeyUnavailableException,
    KMSInvalidStateException,
    NotFoundException,
    ServerError,
    UnsupportedOperationException,
)
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.keystore.stores import KeyStores, key_stores
from hsmkms.models import validate_request
from hsmkms.models.enums import EncryptionAlgorithmSpec, KeyState, OriginType, RotationType
from hsmkms.policy import ContextInput
from hsmkms.profiles import MechanismProfile
from hsmkms.service import xks_client
from hsmkms.service.authorize import Authorizer, GrantCheck
from hsmkms.service.blocking import leave_the_event_loop
from hsmkms.service.custom_stores import CONNECTED as CONNECTED_STATE
from hsmkms.service.custom_stores import CustomKeyStores, TokenOpener, not_connected
from hsmkms.service.identifiers import Arns, key_material_id, parse_grant_token
from hsmkms.service.operations import OPERATIONS, Operation, Resolution
from hsmkms.service.states import Access, check_state
from hsmkms.service.xks_client import XksClientSettings
from hsmkms.store import (
    DELETING,
    IMPORTED,
    ImportedMaterialRecord,
    KeyRecord,
    KeyVersionRecord,
    MetadataStore,
    VersionConflict,
)
from hsmkms.store.uses import KeyVersionUses, VersionExhausted
from hsmkms.types import Caller, Clock, utc_now

if TYPE_CHECKING:
    from hsmkms.service.last_usage import KeyUsageHistory

log = structlog.get_logger(__name__)

SYMMETRIC_DEFAULT = EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT.value
_ENABLED = KeyState.Enabled.value
_EXTERNAL = OriginType.EXTERNAL.value
_CLOUDHSM = OriginType.AWS_CLOUDHSM.value
_EXTERNAL_KEY_STORE = OriginType.EXTERNAL_KEY_STORE.value
_CURRENT_CALL: contextvars.ContextVar[tuple[str, str, str | None]] = contextvars.ContextVar(
    "hsmkms_current_call", default=("", "", None)
)
"""(caller's principal ARN, operation name, API request id) of the operation this thread runs:
an XKS call's ``requestMetadata``."""

DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."


@functools.lru_cache(maxsize=250_000)
def material_ref(value: str) -> KeyMaterialRef:
    """The parsed :class:`KeyMaterialRef` of a stored string (immutable, so cached). As many
    as the metadata store's read cache keeps answers (``hsmkms/store/metadata.py``): with
    8,192, Encrypt spread over 20,000 wrapped keys parsed a reference on 60% of requests, at
    about 90 µs each."""
    return KeyMaterialRef.from_str(value)


@dataclasses.dataclass(frozen=True)
class ServiceEvent:
    """Something the service did by itself, for the audit trail: ``RotateKey`` (an automatic
    rotation; ``key_version`` is the new version) or ``DeleteKey`` (a purge at the end of the
    waiting period)."""

    name: str
    key_arn: str
    time: dt.datetime
    key_version: int | None = None


EventSink = Callable[[ServiceEvent], None]


def check_algorithm(algorithm: EncryptionAlgorithmSpec | None) -> EncryptionAlgorithmSpec:
    """The encryption algorithm of a request to a symmetric key (SYMMETRIC_DEFAULT when
    absent); InvalidKeyUsageException for any other."""
    if algorithm is None or algorithm is EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT:
        return EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
    raise InvalidKeyUsageException(
        f"Algorithm {algorithm} is incompatible with key spec SYMMETRIC_DEFAULT."
    )


def page_limit(value: int | None, default: int) -> int:
    """A request's Limit (or another optional count), or the operation's default."""
    return default if value is None else value


class RotationNotDue(Exception):
    """Internal: a scheduled rotation found the key no longer due (someone else rotated)."""


_Req = TypeVar("_Req", bound=BaseModel)
_Resp = TypeVar("_Resp", bound=BaseModel)
_Svc = TypeVar("_Svc", bound="ServiceCore")
_T = TypeVar("_T")
_ReqIn = TypeVar("_ReqIn", bound=BaseModel, contravariant=True)
_RespOut = TypeVar("_RespOut", bound=BaseModel, covariant=True)


class Call(Generic[_Req]):
    """One operation call as its worker sees it: the validated request, the caller, and what
    the template resolved for it (the key, authorized and in an accepted state; for
    encryption also the key's current version)."""

    __slots__ = ("_key", "_version", "caller", "request")

    def __init__(
        self,
        request: _Req,
        caller: Caller | None,
        key: KeyRecord | None = None,
        version: KeyVersionRecord | None = None,
    ) -> None:
        self.request = request
        self.caller = caller
        self._key = key
        self._version = version

    @property
    def key(self) -> KeyRecord:
        """The key (operations with the KEY or CURRENT resolution)."""
        if self._key is None:
            raise AssertionError("this operation's template resolves no key")
        return self._key

    @property
    def version(self) -> KeyVersionRecord:
        """The key's current version (operations with the CURRENT resolution)."""
        if self._version is None:
            raise AssertionError("this operation's template resolves no key version")
        return self._version


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """What a worker's ``prepare`` hook adds to the template: condition keys of the request
    (``kms:ScheduleKeyDeletionPendingWindowInDays``, ``aws:RequestTag/<k>``, ...) and, for
    CreateGrant, how a grant of the caller's may allow it."""

    conditions: Mapping[str, ContextInput] | None = None
    grant_check: GrantCheck | None = None


Prepare = Callable[[Any], Prepared | None]
"""A worker's hook run on the request before the key is resolved: checks that need the
request only (raising the operation's own errors), and the :class:`Prepared` extras."""


class BoundOperation(Protocol[_ReqIn, _RespOut]):
    """A service operation as callers see it: ``service.encrypt(request, caller=None)``."""

    def __call__(self, request: _ReqIn, caller: Caller | None = None) -> _RespOut: ...


class OperationMethod(Generic[_Svc, _Req, _Resp]):
    """The worker of one operation, as a method of the service class: accessed on a service,
    it is the public operation (the template around the worker). Made by :func:`operation`."""

    def __init__(
        self,
        op: Operation,
        worker: Callable[[_Svc, Call[_Req]], _Resp],
        prepare: Prepare | None,
    ) -> None:
        self.op = op
        self.worker: Callable[[Any, Call[_Req]], _Resp] = worker
        self.prepare = prepare
        self.__doc__ = worker.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        if name != self.op.worker:
            raise TypeError(f"the worker of {self.op.name} must be named {self.op.worker}")

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> OperationMethod[_Svc, _Req, _Resp]: ...

    @overload
    def __get__(self, instance: _Svc, owner: type[Any]) -> BoundOperation[_Req, _Resp]: ...

    def __get__(self, instance: _Svc | None, owner: type[Any]) -> Any:
        if instance is None:
            return self
        # Kept in the instance's __dict__, which a non-data descriptor yields to: every later
        # call finds it there without allocating (the hot path).
        bound = functools.partial(instance._execute, self)
        instance.__dict__[self.op.worker] = bound
        return bound


def operation(
    name: str, *, prepare: Prepare | None = None
) -> Callable[[Callable[[_Svc, Call[_Req]], _Resp]], OperationMethod[_Svc, _Req, _Resp]]:
    """Make the decorated method the worker of the operation ``name`` (a ``KeyError`` at import
    when no descriptor exists; a ``TypeError`` when the method is not named as the descriptor
    says). ``prepare`` runs on the request before the key is resolved."""
    op = OPERATIONS[name]

    def decorate(worker: Callable[[_Svc, Call[_Req]], _Resp]) -> OperationMethod[_Svc, _Req, _Resp]:
        return OperationMethod(op, worker, prepare)

    return decorate


def _half_used(key_id: str, version: int) -> None:
    log.warning(
        "key_version_half_used",
        key_id=key_id,
        version=version,
        note="half of the 2^32 AES-GCM encryptions one version allows: rotate the key",
    )


class ServiceCore:
    """State and helpers shared by every operation group."""

    def __init__(
        self,
        keystore: Keystore | KeyStores,
        store: MetadataStore,
        *,
        region: str,
        account_id: str,
        clock: Clock = utc_now,
        on_event: EventSink | None = None,
        usage_history: KeyUsageHistory | None = None,
        uses: KeyVersionUses | None = None,
        token_opener: TokenOpener | None = None,
        xks: XksClientSettings | None = None,
    ) -> None:
        # A single keystore is the default store of a registry of one.
        self._stores = key_stores(keystore)
        self._keystore = self._stores.default
        # Custom key stores (AWS_CLOUDHSM): only where the composition root says how a
        # cluster's token is opened. Their material is found through the registry's resolver.
        self._custom: CustomKeyStores | None = None
        if token_opener is not None:
            self._custom = CustomKeyStores(
                store.database, self._keystore, token_opener, clock=clock, region=region, xks=xks
            )
            self._stores = self._stores.with_resolver(self._custom.backend)
        self._on_event = on_event
        # Where GetKeyLastUsage reads (the audit trail); None: not available in this process.
        self._usage_history = usage_history
        self._authz = Authorizer(
            store.grants_for,
            clock=clock,
            tags_of=lambda key_id: dict(store.tags_of(key_id)),
            aliases_of=store.alias_names_of,
        )
        self._store = store
        self._clock = clock
        # Encryptions per AES-GCM key version, refused past 2^32 (random 96-bit IVs).
        self._uses = uses or KeyVersionUses(store.database, clock=clock, on_half=_half_used)
        self.arns = Arns(region, account_id)
        self.region = region
        self.account_id = account_id
        # Token objects this process made for a key version whose row did not commit, and
        # could not destroy then (the token or the database away): retried by
        # clean_leftovers(), which the periodic work calls.
        self._leftovers: list[tuple[KeyMaterialRef, str, int]] = []
        self._leftovers_lock = threading.Lock()

    def _emit(self, name: str, key_arn: str, key_version: int | None = None) -> None:
        """Report a service event; a failing sink is logged, never fatal to the work."""
        if self._on_event is None:
            return
        try:
            self._on_event(ServiceEvent(name, key_arn, self._clock(), key_version))
        except Exception:
            log.exception("service_event_failed", event=name, key_arn=key_arn)

    @property
    def store(self) -> MetadataStore:
        """The metadata store (for administrative tools and tests)."""
        return self._store

    @property
    def keystore(self) -> Keystore:
        """The default key store (for administrative tools and tests)."""
        return self._keystore

    @property
    def key_stores(self) -> KeyStores:
        """Every key store, by id."""
        return self._stores

    @property
    def custom_key_stores(self) -> CustomKeyStores:
        """The custom key stores (AWS_CLOUDHSM); UnsupportedOperationException where this
        service was built without a way to open their tokens."""
        if self._custom is None:
            raise UnsupportedOperationException("Custom key stores are not supported.")
        return self._custom

    def close_custom_key_stores(self) -> None:
        """Close this process's connections to custom key stores (end of process: before
        the default keystore logs out)."""
        if self._custom is not None:
            self._custom.close()

    def _note_custom_store(self, caller: Caller | None, key: KeyRecord, ref_text: str) -> None:
        """Name the custom key store a key's material is in on the caller (its audit record's
        ``additionalEventData.customKeyStoreId``)."""
        if caller is not None and key.origin == _CLOUDHSM:
            caller.custom_key_store_id = material_ref(ref_text).store
        elif caller is not None and key.origin == _EXTERNAL_KEY_STORE and self._custom:
            binding = self._custom.table.xks_key(key.key_id)
            if binding is not None:
                caller.custom_key_store_id = binding[0]

    # -- the template -------------------------------------------------------------------------

    def _execute(
        self,
        method: OperationMethod[Any, _Req, _Resp],
        request: _Req,
        caller: Caller | None = None,
    ) -> _Resp:
        """Run one operation: validate -> grant tokens -> prepare -> resolve, authorize and
        check the key (per the descriptor's :class:`Resolution`) -> the worker. ``caller=None``
        is the local operator: not authorized."""
        op = method.op
        principal = (
            caller.principal_arn if caller is not None else f"arn:aws:iam::{self.account_id}:root"
        )
        request_id = caller.request_id if caller is not None else None
        token = _CURRENT_CALL.set((principal, op.name, request_id))
        try:
            return self._execute_op(method, request, caller)
        finally:
            _CURRENT_CALL.reset(token)

    def _execute_op(
        self,
        method: OperationMethod[Any, _Req, _Resp],
        request: _Req,
        caller: Caller | None,
    ) -> _Resp:
        op = method.op
        validate_request(request)
        if op.grant_tokens:
            tokens = getattr(request, "GrantTokens", None)
            if tokens:
                self._check_grant_tokens(tokens)
        prepared = method.prepare(request) if method.prepare is not None else None
        resolution = op.resolution
        if resolution is Resolution.CURRENT:
            key, version = self._resolve_current(
                getattr(request, op.key_member),
                op=op,
                caller=caller,
                action=op.action,
                encryption_context=getattr(request, "EncryptionContext", None),
                encryption_algorithm=getattr(request, "EncryptionAlgorithm", None),
            )
            return method.worker(self, Call(request, caller, key, version))
        if resolution is Resolution.MATERIAL:
            key, version = self._resolve_material(
                getattr(request, op.key_member),
                op=op,
                caller=caller,
                extra=prepared.conditions if prepared is not None else None,
            )
            return method.worker(self, Call(request, caller, key, version))
        if resolution is Resolution.KEY:
            key = self._resolve(
                getattr(request, op.key_member),
                aliases=op.aliases,
                access=op.access,
                caller=caller,
                action=op.action,
                extra=prepared.conditions if prepared is not None else None,
                grant_check=prepared.grant_check if prepared is not None else None,
            )
            self._check_usage(op, key)
            return method.worker(self, Call(request, caller, key))
        if resolution is Resolution.ACCOUNT:
            self._authz.check_account(
                caller, op.action, extra=prepared.conditions if prepared is not None else None
            )
        return method.worker(self, Call(request, caller))

    @classmethod
    def check_request(cls, name: str, request: BaseModel) -> None:
        """Check ``request`` for the operation ``name`` as the template does before it resolves
        a key (the model's constraints, grant tokens, the operation's own ``prepare`` checks),
        without running it; raises the operation's errors. For a seed file, checked whole
        before anything is applied."""
        method: OperationMethod[Any, Any, Any] = getattr(cls, OPERATIONS[name].worker)
        validate_request(request)
        tokens = getattr(request, "GrantTokens", None)
        if method.op.grant_tokens and tokens:
            cls._check_grant_tokens(tokens)
        if method.prepare is not None:
            method.prepare(request)

    # -- resolution -----------------------------------------------------------------------------

    def _gone(self, key: KeyRecord, now: dt.datetime) -> bool:
        """Whether a key no longer exists for callers: being purged, or its deletion date has
        come (the purge may not have run yet)."""
        if key.state == DELETING:
            return True
        return (
            key.state == KeyState.PendingDeletion
            and key.deletion_date is not None
            and key.deletion_date <= now
        )

    def _not_found(self, key_id: str) -> NotFoundException:
        return NotFoundException(f"Key '{self.arns.key(key_id)}' does not exist")

    def _resolve_name(self, identifier: str, *, aliases: bool) -> tuple[str, str | None]:
        """The key id named by ``identifier`` (without checking the key exists, for key ids),
        and the alias name when the request used an alias (``kms:RequestAlias``)."""
        name = self.arns.parse(identifier, aliases=aliases)
        if name.key_id is not None:
            return name.key_id, None
        assert name.alias is not None
        alias = self._store.get_alias(name.alias)
        if alias is None:
            raise NotFoundException(f"Alias {self.arns.alias(name.alias)} is not found.")
        return alias.key_id, name.alias

    def _resolve_id(self, identifier: str, *, aliases: bool) -> str:
        """The key id named by ``identifier`` (without checking the key exists, for key ids)."""
        return self._resolve_name(identifier, aliases=aliases)[0]

    def _resolve(
        self,
        identifier: str,
        *,
        aliases: bool,
        access: Access,
        caller: Caller | None = None,
        action: str = "",
        extra: Mapping[str, ContextInput] | None = None,
        grant_check: GrantCheck | None = None,
    ) -> KeyRecord:
        """Resolve ``identifier`` to an existing key, authorize ``caller`` for ``action`` on it
        (key policy, identity policy, grants), then check its state for ``access``."""
        key_id, alias = self._resolve_name(identifier, aliases=aliases)
        key = self._store.get_key(key_id)
        if key is None or self._gone(key, self._clock()):
            raise self._not_found(key_id)
        if caller is not None:
            caller.note_key(key.arn)
            self._authz.check_key(
                caller, action, key, request_alias=alias, extra=extra, grant_check=grant_check
            )
        check_state(access, key)
        return key

    def _resolve_material(
        self,
        identifier: str,
        *,
        op: Operation,
        caller: Caller | None,
        action: str | None = None,
        extra: Mapping[str, ContextInput] | None = None,
    ) -> tuple[KeyRecord, KeyVersionRecord]:
        """As :meth:`_resolve` for ``op`` (authorized for ``action``, ``op``'s own by default),
        also returning the key's current version (its key material), both from one cached
        query: the hot path of Sign, GenerateMac and the other operations on a key that never
        rotates."""
        key_id, alias = self._resolve_name(identifier, aliases=op.aliases)
        found = self._store.get_key_and_version(key_id)
        if found is None or (found[0].state != _ENABLED and self._gone(found[0], self._clock())):
            raise self._not_found(key_id)
        key, version = found
        if caller is not None:
            caller.note_key(key.arn)
            self._authz.check_key(
                caller, action or op.action, key, request_alias=alias, extra=extra
            )
        check_state(op.access, key)
        self._check_usage(op, key)
        if version is None:  # the row of the current version must exist (same transaction)
            raise self._not_found(key_id)
        if caller is not None:
            caller.note_key(key.arn, version.version)
            self._note_custom_store(caller, key, version.material_ref)
        return key, version

    def _resolve_current(
        self,
        identifier: str,
        *,
        op: Operation,
        caller: Caller | None,
        action: str,
        encryption_context: Mapping[str, str] | None,
        encryption_algorithm: str | None = None,
    ) -> tuple[KeyRecord, KeyVersionRecord]:
        """For encryption: the usable key and its current version, rotating first when an
        automatic rotation is due (rotation is checked on use). Authorizes ``caller`` for
        ``action`` with the request's encryption context and algorithm (SYMMETRIC_DEFAULT when
        absent); the key must suit ``op``."""
        key_id, alias = self._resolve_name(identifier, aliases=True)
        found = self._store.get_key_and_version(key_id)
        # The hot path: an Enabled key is never gone, and rotates only when rotation is on; it
        # does not read the clock.
        if found is None or (found[0].state != _ENABLED and self._gone(found[0], self._clock())):
            raise self._not_found(key_id)
        key, version = found
        if caller is not None:
            caller.note_key(key.arn)
            self._authz.check_key(
                caller,
                action,
                key,
                encryption_context=encryption_context,
                encryption_algorithm=encryption_algorithm or SYMMETRIC_DEFAULT,
                request_alias=alias,
            )
        check_state(Access.USE, key)
        if not op.accepts(key.key_spec, key.key_usage):
            self._check_usage(op, key)
        if key.rotation_enabled and self._rotation_due(key, self._clock()):
            try:
                self._rotate(key, RotationType.AUTOMATIC)
            except ServerError:
                # A failed rotation must not stop encryption: keep the current version; the
                # periodic task (run_due_tasks) tries again.
                log.warning("rotation_on_use_failed", key_id=key_id)
            found = self._store.get_key_and_version(key_id)
            if found is None:
                raise self._not_found(key_id)
            key, version = found
            check_state(Access.USE, key)
        if version is None:  # the row of the current version must exist (same transaction)
            raise self._not_found(key_id)
        if caller is not None:
            caller.note_key(key.arn, version.version)
            self._note_custom_store(caller, key, version.material_ref)
        return key, version

    @staticmethod
    def _check_usage(op: Operation, key: KeyRecord) -> None:
        """InvalidKeyUsageException unless the key's spec and usage suit the operation."""
        if not op.accepts(key.key_spec, key.key_usage):
            # spec: "<arn> key usage is SIGN_VERIFY which is not valid for Encrypt." (§1.9)
            raise InvalidKeyUsageException(
                f"{key.arn} key usage is {key.key_usage} which is not valid for {op.name}."
            )

    @staticmethod
    def _check_grant_tokens(tokens: Sequence[str] | None) -> None:
        """spec: §1.8 — a GrantTokens member that is not a grant token of ours is refused
        (InvalidGrantTokenException). Grants are strongly consistent here, so a valid token
        adds nothing to the decision."""
        for token in tokens or ():
            parse_grant_token(token)

    @staticmethod
    def _dry_run(flag: bool | None) -> None:
        if flag:
            raise DryRunOperationException(DRY_RUN_MESSAGE)

    # -- sealing --------------------------------------------------------------------------------

    def _seal(
        self,
        key: KeyRecord,
        version: KeyVersionRecord,
        plaintext: bytes,
        context: Mapping[str, str],
    ) -> bytes:
        """Encrypt ``plaintext`` under one key version inside the token; the blob bytes."""
        ref = material_ref(version.material_ref)
        profile = ref.encryption_profile
        prefix = blob_prefix(key.key_id, version.version, profile)
        aad = prefix + encode_encryption_context(context)
        if profile is MechanismProfile.AES_256_GCM:
            try:
                self._uses.take(key.key_id, version.version)
            except VersionExhausted:
                # Not in AWS (whose keys derive a key per request): an AES-GCM key version
                # with random 96-bit IVs is good for 2^32 encryptions (NIST SP 800-38D 8.3).
                raise KMSInvalidStateException(
                    f"{key.arn} key version {version.version} has made the "
                    f"{self._uses.limit} encryptions AES-GCM with random IVs allows: rotate the "
                    "key (RotateKeyOnDemand) to encrypt with it again"
                ) from None
        iv, body = self._stores.backend_for(ref).encrypt(ref, plaintext, aad)
        inner = blob_bytes(prefix, profile, iv, body)
        if key.origin != _EXTERNAL_KEY_STORE:
            return inner
        # spec: AWS KMS external key stores — double encryption: our key first, then the
        # external key through the XKS proxy (docs/ciphertext.md, version 2).
        location, xks_key_id = self._xks_binding(key)
        sealed = self._xks_call(
            key,
            lambda meta: xks_client.encrypt(
                self.custom_key_stores.xks,
                location,
                xks_key_id,
                inner,
                XksCiphertext.proxy_aad(key.arn, context),
                meta,
            ),
        )
        return XksCiphertext(
            key.key_id, sealed.iv, sealed.tag, sealed.metadata, sealed.ciphertext
        ).to_bytes()

    def _xks_binding(self, key: KeyRecord) -> tuple[xks_client.XksProxyLocation, str]:
        """The proxy and external key of a key in an external key store, which must be
        CONNECTED (KMSInvalidStateException)."""
        stores = self.custom_key_stores
        binding = stores.table.xks_key(key.key_id)
        if binding is None:
            raise KMSInvalidStateException(f"{key.arn} has no external key.")
        store_id, xks_key_id = binding
        record = stores.table.get(store_id)
        if record is None or record.connection_state != CONNECTED_STATE:
            raise not_connected(store_id, "unknown" if record is None else record.connection_state)
        return stores.location(record), xks_key_id

    def _xks_call(self, key: KeyRecord, do: Callable[[xks_client.XksRequestMetadata], _T]) -> _T:
        """Run one XKS call for ``key``, its failures as AWS's errors."""
        leave_the_event_loop("an XKS proxy call")
        principal, operation_name, request_id = _CURRENT_CALL.get()
        meta = xks_client.XksRequestMetadata(
            principal, operation_name or "Encrypt", request_id or str(uuid.uuid4()), key.arn
        )
        failure: xks_client.XksProxyFailure | None = None
        try:
            return do(meta)
        except xks_client.XksProxyFailure as exc:
            failure = exc
        log.warning("xks_call_failed", key_id=key.key_id, **failure.facts())
        name = failure.error_name
        if name == "InvalidCiphertextException":
            raise InvalidCiphertextException()
        if name in ("InvalidStateException", "KeyNotFoundException", "InvalidKeyUsageException"):
            raise KMSInvalidStateException(
                f"{key.arn}: the external key store's proxy refused the external key ({name})."
            )
        if failure.code == "XKS_PROXY_TIMED_OUT":
            raise DependencyTimeoutException(
                f"{key.arn}: the external key store's proxy did not answer in time."
            )
        raise KeyUnavailableException(
            f"{key.arn}: the external key store's proxy failed ({failure.code})."
        )

    def _open(
        self,
        data: bytes,
        context: Mapping[str, str],
        expected_key_id: str | None,
        incorrect_key: Callable[[], Exception],
        *,
        op: Operation,
        caller: Caller | None = None,
        action: str = "kms:Decrypt",
        given_context: Mapping[str, str] | None = None,
    ) -> tuple[KeyRecord, KeyVersionRecord, bytes]:
        """Decrypt a blob with the key version it names (never by trial). Every failure of the
        blob is one InvalidCiphertextException; a known key in a refusing state gives its state
        error, as AWS. ``caller`` is authorized for ``action`` on the key the blob names, with
        ``given_context`` (the context as the request carried it, None when absent)."""
        if blob_version(data) == XKS_FORMAT_VERSION:
            data = self._xks_open(
                data,
                context,
                expected_key_id,
                incorrect_key,
                op=op,
                caller=caller,
                action=action,
                given_context=given_context,
            )
        blob = CiphertextBlob.parse(data)
        if expected_key_id is not None and expected_key_id != blob.key_id:
            # spec: AWS KMS Decrypt — IncorrectKeyException when KeyId does not match.
            raise incorrect_key()
        found = self._store.get_key_and_version(blob.key_id, blob.key_version)
        if found is None or self._gone(found[0], self._clock()):
            raise InvalidCiphertextException()
        key, version = found
        if caller is not None:
            caller.note_key(key.arn, blob.key_version)
        self._may_decrypt(op, caller, action, key, given_context)
        if version is None:
            raise InvalidCiphertextException()
        self._note_custom_store(caller, key, version.material_ref)
        ref = material_ref(version.material_ref)
        if ref.profile is not blob.profile:
            raise InvalidCiphertextException()
        plaintext: bytes | None
        try:
            backend = self._stores.backend_for(ref)
            plaintext = backend.decrypt(ref, blob.iv, blob.body, blob.aad(context))
        except DecryptionFailed:
            plaintext = None
        if plaintext is None:
            # Raised outside the handler: no cause or context reaches the caller.
            raise InvalidCiphertextException()
        return key, version, plaintext

    def _may_decrypt(
        self,
        op: Operation,
        caller: Caller | None,
        action: str,
        key: KeyRecord,
        given_context: Mapping[str, str] | None,
    ) -> None:
        """The caller may ``action`` with ``key`` (symmetric), whose state and usage allow
        ``op``."""
        if caller is not None:
            self._authz.check_key(
                caller,
                action,
                key,
                encryption_context=given_context,
                encryption_algorithm=SYMMETRIC_DEFAULT,
            )
        check_state(Access.USE, key)
        self._check_usage(op, key)

    def _xks_open(
        self,
        data: bytes,
        context: Mapping[str, str],
        expected_key_id: str | None,
        incorrect_key: Callable[[], Exception],
        *,
        op: Operation,
        caller: Caller | None,
        action: str,
        given_context: Mapping[str, str] | None,
    ) -> bytes:
        """The outer layer of a version-2 blob removed by the external key (after the caller
        was authorized on the key it names): the inner version-1 blob."""
        outer = XksCiphertext.parse(data)
        if expected_key_id is not None and expected_key_id != outer.key_id:
            raise incorrect_key()
        key = self._store.get_key(outer.key_id)
        if key is None or self._gone(key, self._clock()) or key.origin != _EXTERNAL_KEY_STORE:
            raise InvalidCiphertextException()
        self._may_decrypt(op, caller, action, key, given_context)
        location, xks_key_id = self._xks_binding(key)
        sealed = xks_client.XksSealed(outer.outer, outer.iv, outer.tag, outer.metadata)
        inner = self._xks_call(
            key,
            lambda meta: xks_client.decrypt(
                self.custom_key_stores.xks,
                location,
                xks_key_id,
                sealed,
                XksCiphertext.proxy_aad(key.arn, context),
                meta,
            ),
        )
        if blob_version(inner) != 1:
            raise InvalidCiphertextException()
        return inner

    # -- imported key material ------------------------------------------------------------------

    def _materials(self, key: KeyRecord) -> tuple[ImportedMaterialRecord, ...]:
        """The key materials imported into a key (none unless its origin is EXTERNAL)."""
        if key.origin != _EXTERNAL:
            return ()
        return self._store.imported_materials(key.key_id)

    def _key_material_id(self, key: KeyRecord, version: int) -> str | None:
        """The KeyMaterialId of one of a key's versions: derived from the key id and version
        for material made in the token, the imported material's own id (derived from the key
        id and the material) for imported material; None when no material has that version."""
        if key.origin != _EXTERNAL:
            return key_material_id(key.key_id, version)
        for material in self._store.imported_materials(key.key_id):
            if material.version == version:
                return material.key_material_id
        return None

    def _all_material_imported(self, key: KeyRecord) -> bool:
        """Whether every key material of the key is in the token (always, unless its origin is
        EXTERNAL): AWS enables a key with imported material only then."""
        if key.origin != _EXTERNAL:
            return True
        materials = self._store.imported_materials(key.key_id)
        return bool(materials) and all(m.import_state == IMPORTED for m in materials)

    def _forget_material(self, key_id: str, version: int) -> bool:
        """Delete an imported key material from the token: its row says PENDING_IMPORT and the
        key becomes PendingImport (a key pending deletion stays so) in one transaction, then
        the token objects are destroyed. False when it was not imported (nothing done)."""

        def state(key: KeyRecord) -> str | None:
            if key.state in (KeyState.Enabled, KeyState.Disabled):
                return KeyState.PendingImport.value
            return None

        removed = self._store.remove_material(key_id, version, state=state)
        if removed is None:
            return False
        self._destroy_quietly(material_ref(removed.material_ref), key_id, version)
        return True

    # -- versions -------------------------------------------------------------------------------

    def _rotation_due(self, key: KeyRecord, now: dt.datetime) -> bool:
        return (
            key.state == KeyState.Enabled
            and key.rotation_enabled
            and key.next_rotation_date is not None
            and key.next_rotation_date <= now
        )

    def _destroy_quietly(self, ref: KeyMaterialRef, key_id: str, version: int) -> None:
        try:
            self._stores.backend_for(ref).destroy(ref)
        except Exception as exc:  # kept, and destroyed by clean_leftovers() once it can be
            log.warning("destroy_failed", key_id=key_id, version=version, error=type(exc).__name__)
            self._leave(ref, key_id, version)

    def _committed(self, key_id: str, version: int, ref: KeyMaterialRef) -> bool | None:
        """Whether the store holds ``ref`` for this version (a commit that reported failure
        may still have happened: never destroy material the store refers to); None when the
        store cannot tell now."""
        try:
            row = self._store.get_version(key_id, version)
        except Exception:
            return None
        return row is not None and row.material_ref == ref.to_str()

    def _discard_uncommitted(self, ref: KeyMaterialRef, key_id: str, version: int) -> None:
        """After a failed write of a version's row: destroy the version's new token object
        unless the row did commit; when that cannot be told now, keep it for
        :meth:`clean_leftovers`."""
        committed = self._committed(key_id, version, ref)
        if committed is None:
            self._leave(ref, key_id, version)
        elif not committed:
            self._destroy_quietly(ref, key_id, version)

    def _leave(self, ref: KeyMaterialRef, key_id: str, version: int) -> None:
        with self._leftovers_lock:
            self._leftovers.append((ref, key_id, version))

    def clean_leftovers(self) -> int:
        """Destroy the token objects this process made for key versions whose rows did not
        commit, now that the store and the token answer; returns how many were destroyed
        (those still unanswered are kept for the next call), and what creations that failed
        inside a token left on it (``settle_abandoned``). A CreateKey or rotation that failed
        half-way (the token or the database away) leaves no orphan behind."""
        for store_id, backend in self._stores.items():
            try:
                backend.settle_abandoned()
            except Exception as exc:  # the token still away: the next call tries again
                log.warning("settle_failed", store=store_id, error=type(exc).__name__)
        with self._leftovers_lock:
            pending, self._leftovers = self._leftovers, []
        destroyed = 0
        for ref, key_id, version in pending:
            committed = self._committed(key_id, version, ref)
            if committed:
                continue  # the row committed after all: not an orphan
            try:
                if committed is None:
                    raise LookupError("the store cannot tell")
                self._stores.backend_for(ref).destroy(ref)
            except Exception:
                self._leave(ref, key_id, version)
                continue
            destroyed += 1
            log.info("orphan_destroyed", key_id=key_id, version=version)
        return destroyed

    def _rotate(
        self,
        key: KeyRecord,
        rotation_type: RotationType,
        precondition: Callable[[KeyRecord], None] | None = None,
    ) -> KeyRecord | None:
        """Make a new key version current. Crash-safe order: token object first, then the row
        (one transaction); on failure the object is destroyed.

        Returns the updated key, or ``None`` when another writer changed the current version
        first (or, for an automatic rotation, the key is no longer due): nothing was rotated.
        """
        now = self._clock()
        new_version = key.current_version + 1
        ref = self._stores.default.create(
            KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(key.key_id, new_version)
        )
        record = KeyVersionRecord(
            key_id=key.key_id,
            version=new_version,
            material_ref=ref.to_str(),
            profile=ref.encryption_profile.value,
            created_at=now,
            rotation_type=rotation_type.value,
        )
        next_date: dt.datetime | None = None
        check: Callable[[KeyRecord], None] | None = precondition
        if rotation_type is RotationType.AUTOMATIC:
            period = key.rotation_period_days or 365
            next_date = now + dt.timedelta(days=period)

            def due(current: KeyRecord) -> None:
                if not self._rotation_due(current, now):
                    raise RotationNotDue
                if precondition is not None:
                    precondition(current)

            check = due
        try:
            updated = self._store.add_version(
                record,
                precondition=check,
                next_rotation_date=next_date,
                on_demand=rotation_type is RotationType.ON_DEMAND,
            )
        except (VersionConflict, RotationNotDue):
            # Another writer rotated first: our object is surplus.
            self._destroy_quietly(ref, key.key_id, new_version)
            return None
        except BaseException:
            self._discard_uncommitted(ref, key.key_id, new_version)
            raise
        log.info(
            "key_rotated", key_id=key.key_id, version=new_version, rotation_type=rotation_type.value
        )
        if rotation_type is RotationType.AUTOMATIC:
            # spec: §5.2 — automatic rotations are RotateKey service events; on-demand ones are
            # the RotateKeyOnDemand API call's own record.
            self._emit("RotateKey", key.arn, new_version)
        return updated
