"""Applying a seed file to a data directory: first a plan, then its steps.

:func:`plan_seed` checks every entry — each request the seed implies is checked by the service
as the operation itself would check it (:meth:`KmsService.check_request`), and each declared
object that exists is compared with the data directory — and changes nothing. Only a plan
without error is applied (:func:`apply_seed`), so a bad seed file changes nothing. Applying is
idempotent: what exists as declared is left alone, what is missing is created, and what exists
differently is a :class:`~hsmkms.seed.document.SeedError` naming the entry.

Keys, aliases, key settings are created through :class:`~hsmkms.system.OperatorService`, so
each step is a ``LocalOperator`` record of the audit trail (user agent ``hsmkms-cli/<v>
(seed)``), like any other local key operation. Credentials go to the credentials store as
``hsmkms credentials create`` puts them there.

Custom key stores come first: each declared store is compared with the one of its name, or
created; then connected (ConnectCustomKeyStore is asynchronous: the outcome is awaited). A
store that does not connect undoes this run's store steps (the stores it created are deleted
again) before the error, so a wrong password or an unreachable proxy leaves the data directory
as it was.

Only the attributes an entry gives are compared with an existing key (``spec`` and ``usage``
always): a CI job may rotate or tag a seeded key without breaking the next start, unless the
seed file declares that attribute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hmac
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from hsmkms.errors import KMSError
from hsmkms.identity import ROOT_NAME, CredentialInfo, check_credential
from hsmkms.models import (
    ConnectCustomKeyStoreRequest,
    CreateAliasRequest,
    CreateCustomKeyStoreRequest,
    DeleteCustomKeyStoreRequest,
    DescribeKeyRequest,
    DisableKeyRequest,
    DisconnectCustomKeyStoreRequest,
    EnableKeyRotationRequest,
    OperatorCreateKeyRequest,
    Tag,
)
from hsmkms.models.enums import CustomKeyStoreType, KeySpec, KeyState, KeyUsage, OriginType
from hsmkms.seed.document import (
    CredentialEntry,
    CustomKeyStoreEntry,
    KeyEntry,
    SeedDocument,
    SeedError,
    policy_text,
    policy_value,
)
from hsmkms.service import OPERATIONS, KmsService, xks_client
from hsmkms.store import DELETING, KeyRecord
from hsmkms.store.key_stores import ClusterRecord, CustomKeyStoreRecord
from hsmkms.system import OperatorService, System

__all__ = ["SeedPlan", "SeedReport", "Step", "apply_seed", "plan_seed"]

SEED_LOCK = ".seed.lock"
"""Held in the data directory while a seed file is planned and applied."""

DEFAULT_USAGE = KeyUsage.ENCRYPT_DECRYPT.value
"""CreateKey's KeyUsage when a request gives none (AWS's default)."""

CONNECT_TIMEOUT: Final = 60.0
"""Seconds a seed waits for a custom key store it connects to leave CONNECTING."""

_PLACEHOLDER_STORE_ID: Final = "cks-00000000000000000"
"""The CustomKeyStoreId a key's request is checked with before its store is created."""

_CONNECTION_HINTS: Final = {
    "INVALID_CREDENTIALS": "the token refused the password",
    "USER_LOCKED_OUT": "the token's user PIN is locked",
    "CLUSTER_NOT_FOUND": "the cluster's token is gone or is not the one registered",
    "NETWORK_ERRORS": "the cluster's token cannot be reached",
    "XKS_PROXY_ACCESS_DENIED": "the proxy refused the access key id or its secret",
    "XKS_PROXY_NOT_REACHABLE": "the proxy cannot be reached",
    "XKS_PROXY_TIMED_OUT": "the proxy did not answer in time",
    "XKS_PROXY_INVALID_CONFIGURATION": "the proxy does not serve this path (or http:// is "
    "not allowed: HSMKMS_XKS_ALLOW_HTTP)",
    "XKS_PROXY_INVALID_TLS_CONFIGURATION": "the proxy's certificate does not verify "
    "(HSMKMS_XKS_CA_BUNDLE)",
    "XKS_PROXY_INVALID_RESPONSE": "the proxy's answer is not the XKS API's",
}


@dataclasses.dataclass(frozen=True)
class Step:
    """One change a plan makes: a service operation run as the local operator, or a
    credential created. ``secret`` never shows in a ``repr``."""

    entry: str
    action: str
    operation: str | None = None
    request: BaseModel | None = None
    credential: CredentialEntry | None = None
    secret: str | None = dataclasses.field(default=None, repr=False)
    policy: str | None = None
    store: str | None = None
    """The name of the custom key store the step's request names, when its id is known only
    once the store is created (then filled in as ``CustomKeyStoreId``)."""


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    """What applying a seed file would do: its steps, in order, and the entries found as
    declared."""

    source: str
    steps: tuple[Step, ...]
    unchanged: tuple[str, ...]
    store_ids: tuple[tuple[str, str], ...] = ()
    """The declared custom key stores that exist: (name, id)."""

    def lines(self) -> list[str]:
        """One line per step and per unchanged entry (``seed check``)."""
        return [f"{s.entry}: {s.action}" for s in self.steps] + [
            f"{entry}: exists as declared" for entry in self.unchanged
        ]


@dataclasses.dataclass(frozen=True)
class SeedReport:
    """What :func:`apply_seed` did."""

    source: str
    applied: tuple[str, ...]
    unchanged: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"seed {self.source}: {len(self.applied)} change(s), "
            f"{len(self.unchanged)} entr{'y' if len(self.unchanged) == 1 else 'ies'} "
            "unchanged"
        )


class _Directory:
    """What the plan reads of a data directory (nothing at all for one that does not exist)."""

    def __init__(self, system: System | None) -> None:
        self._system = system
        self._credentials: list[CredentialInfo] | None = None

    def key(self, key_id: str) -> KeyRecord | None:
        return None if self._system is None else self._system.store.get_key(key_id)

    def alias_target(self, name: str) -> str | None:
        if self._system is None:
            return None
        alias = self._system.store.get_alias(name)
        return None if alias is None else alias.key_id

    def tags(self, key_id: str) -> dict[str, str]:
        assert self._system is not None
        return dict(self._system.store.tags_of(key_id))

    def credentials(self) -> list[CredentialInfo]:
        if self._system is None:
            return []
        if self._credentials is None:
            self._credentials = self._system.credentials.list()
        return self._credentials

    def credential_policy(self, name: str) -> str | None:
        assert self._system is not None
        return self._system.credentials.get_policy(name)[1]

    def credential_secret(self, access_key_id: str) -> str | None:
        assert self._system is not None
        found = self._system.credentials.lookup(access_key_id)
        return None if found is None else found.secret

    # Custom key stores: their table is read only when the seed names one (or a key is in
    # one), so that checking a plain seed creates no table.

    def stores(self) -> list[CustomKeyStoreRecord]:
        if self._system is None:
            return []
        return self._system.service.custom_key_stores.table.stores()

    def store(self, store_id: str) -> CustomKeyStoreRecord | None:
        if self._system is None:
            return None
        return self._system.service.custom_key_stores.table.get(store_id)

    def cluster(self, cluster_id: str) -> ClusterRecord | None:
        if self._system is None:
            return None
        return self._system.service.custom_key_stores.table.cluster(cluster_id)

    def store_secret(self, store_id: str) -> str:
        assert self._system is not None
        return self._system.service.custom_key_stores.table.password(store_id)

    def allow_http(self) -> bool:
        return self._system is None or self._system.settings.xks_allow_http

    def key_store_of(self, key: KeyRecord) -> tuple[str | None, str | None]:
        """(CustomKeyStoreId, XksKeyId) of an existing key, as DescribeKey reports them."""
        if key.origin not in (OriginType.AWS_CLOUDHSM, OriginType.EXTERNAL_KEY_STORE):
            return None, None
        assert self._system is not None
        worker = getattr(self._system.service, OPERATIONS["DescribeKey"].worker)
        meta = worker(DescribeKeyRequest(KeyId=key.key_id), None).KeyMetadata
        xks = meta.XksKeyConfiguration
        return meta.CustomKeyStoreId, None if xks is None else xks.get("Id")


def _enum(document: SeedDocument, label: str, field: str, value: str, values: Sequence[str]) -> str:
    if value not in values:
        raise document.error(f"{label}: {field} {value!r} is not one of {', '.join(values)}")
    return value


def _checked(document: SeedDocument, label: str, operation: str, request: BaseModel) -> None:
    """The service's own checks of a request this entry implies (AWS's error, named)."""
    try:
        KmsService.check_request(operation, request)
    except KMSError as exc:
        raise document.error(f"{label}: {exc.message or exc.code} ({exc.code})") from None


def _same_policy(stored: str | None, declared: str) -> bool:
    return stored is not None and policy_value(stored) == policy_value(declared)


@dataclasses.dataclass(frozen=True)
class _StoreRef:
    """A custom key store a key entry names: its type, and its id when it exists."""

    name: str
    store_type: str
    store_id: str | None
    state: str | None = None
    """The connection state of a store the file does not declare (None: the seed connects
    it)."""


def _same_secret(stored: str, declared: str) -> bool:
    return hmac.compare_digest(stored.encode(), declared.encode())


class _Planner:
    def __init__(self, document: SeedDocument, directory: _Directory) -> None:
        self.document = document
        self.directory = directory
        self.steps: list[Step] = []
        self.unchanged: list[str] = []
        self.stores: dict[str, _StoreRef] = {}

    # -- custom key stores --------------------------------------------------------------------

    def store(self, index: int, entry: CustomKeyStoreEntry) -> None:
        """A declared store: compared when one of its name exists (then connected unless it is
        CONNECTED), else created and connected. Its secret is read here, never shown."""
        document, label = self.document, entry.label(index)
        secret = document.read_store_secret(entry, index)
        anchor = document.read_trust_anchor(entry, index)
        existing = next((s for s in self.directory.stores() if s.name == entry.name), None)
        if existing is None:
            self._create_store(label, entry, secret, anchor)
        else:
            self._compare_store(label, entry, existing, secret, anchor)
        self.stores[entry.name] = _StoreRef(
            entry.name, entry.type, None if existing is None else existing.store_id
        )

    def _store_request(
        self, entry: CustomKeyStoreEntry, secret: str | None, anchor: str | None
    ) -> CreateCustomKeyStoreRequest:
        if entry.external:
            return CreateCustomKeyStoreRequest(
                CustomKeyStoreName=entry.name,
                CustomKeyStoreType=CustomKeyStoreType.EXTERNAL_KEY_STORE,
                XksProxyUriEndpoint=entry.xks_proxy_uri_endpoint,
                XksProxyUriPath=entry.xks_proxy_uri_path,
                XksProxyConnectivity=entry.xks_proxy_connectivity or "PUBLIC_ENDPOINT",
                XksProxyVpcEndpointServiceName=entry.xks_proxy_vpc_endpoint_service_name,
                XksProxyAuthenticationCredential={
                    "AccessKeyId": entry.xks_proxy_access_key_id,
                    "RawSecretAccessKey": secret,
                },
            )
        return CreateCustomKeyStoreRequest(
            CustomKeyStoreName=entry.name,
            CloudHsmClusterId=entry.cluster_id,
            TrustAnchorCertificate=anchor,
            KeyStorePassword=secret,
        )

    def _create_store(
        self, label: str, entry: CustomKeyStoreEntry, secret: str | None, anchor: str | None
    ) -> None:
        document = self.document
        if secret is None:
            fields = (
                "xks_proxy_secret_access_key_env or xks_proxy_secret_access_key_file"
                if entry.external
                else "key_store_password_env or key_store_password_file"
            )
            raise document.error(f"{label}: no secret to create it with: give {fields}")
        if not entry.external and anchor is None:
            raise document.error(
                f"{label}: trust_anchor_certificate_file (or trust_anchor_certificate) is "
                "required to create it"
            )
        request = self._store_request(entry, secret, anchor)
        _checked(document, label, "CreateCustomKeyStore", request)
        # What CreateCustomKeyStore would refuse, checked before anything is changed.
        others = self.directory.stores()
        if entry.external:
            endpoint = entry.xks_proxy_uri_endpoint or ""
            if endpoint.startswith("http://") and not self.directory.allow_http():
                raise document.error(
                    f"{label}: xks_proxy_uri_endpoint: http:// is accepted only with "
                    "HSMKMS_XKS_ALLOW_HTTP=1"
                )
            for other in others:
                if other.xks is not None and (other.xks.uri_endpoint, other.xks.uri_path) == (
                    endpoint,
                    entry.xks_proxy_uri_path,
                ):
                    raise self.conflict(
                        label,
                        f"the proxy {endpoint}{entry.xks_proxy_uri_path} is the custom key "
                        f"store {other.name!r}'s ({other.store_id})",
                    )
            what = f"{entry.xks_proxy_uri_endpoint}{entry.xks_proxy_uri_path}"
        else:
            assert entry.cluster_id is not None
            cluster = self.directory.cluster(entry.cluster_id)
            if cluster is None:
                raise document.error(
                    f"{label}: cluster_id {entry.cluster_id} is not registered (hsmkms clusters "
                    "add)"
                )
            if (anchor or "").strip() != cluster.trust_anchor.strip():
                raise document.error(
                    f"{label}: the trust anchor is not cluster {entry.cluster_id}'s (hsmkms "
                    "clusters list)"
                )
            for other in others:
                other_cluster = (
                    None if other.cluster_id is None else self.directory.cluster(other.cluster_id)
                )
                if other_cluster is not None and other_cluster.trust_anchor == cluster.trust_anchor:
                    raise self.conflict(
                        label,
                        f"cluster {entry.cluster_id}'s token is used by the custom key store "
                        f"{other.name!r} ({other.store_id})",
                    )
            what = f"cluster {entry.cluster_id}"
        self.steps.append(
            Step(
                label,
                f"create custom key store {entry.name} ({entry.type}, {what})",
                "CreateCustomKeyStore",
                request,
                store=entry.name,
            )
        )
        self._connect(label, entry.name)

    def _connect(self, label: str, name: str) -> None:
        self.steps.append(
            Step(label, f"connect custom key store {name}", "ConnectCustomKeyStore", store=name)
        )

    def _compare_store(
        self,
        label: str,
        entry: CustomKeyStoreEntry,
        store: CustomKeyStoreRecord,
        secret: str | None,
        anchor: str | None,
    ) -> None:
        """A conflict for each declared field the existing store does not have; else connect
        it unless it is CONNECTED (a FAILED one is disconnected first)."""
        what = f"the custom key store {store.store_id}"

        def differs(field: str, has: object, declared: object) -> SeedError:
            return self.conflict(
                label, f"{field}: {what} has {has!r}, the seed declares {declared!r}"
            )

        if store.store_type != entry.type:
            raise differs("type", store.store_type, entry.type)
        if entry.external:
            assert store.xks is not None
            connectivity = entry.xks_proxy_connectivity or "PUBLIC_ENDPOINT"
            for field, has, declared in (
                ("xks_proxy_uri_endpoint", store.xks.uri_endpoint, entry.xks_proxy_uri_endpoint),
                ("xks_proxy_uri_path", store.xks.uri_path, entry.xks_proxy_uri_path),
                ("xks_proxy_access_key_id", store.xks.access_key_id, entry.xks_proxy_access_key_id),
                ("xks_proxy_connectivity", store.xks.connectivity, connectivity),
            ):
                if has != declared:
                    raise differs(field, has, declared)
        else:
            if store.cluster_id != entry.cluster_id:
                raise differs("cluster_id", store.cluster_id, entry.cluster_id)
            cluster = None if store.cluster_id is None else self.directory.cluster(store.cluster_id)
            if anchor is not None and (
                cluster is None or anchor.strip() != cluster.trust_anchor.strip()
            ):
                raise self.conflict(
                    label, f"{what} has another trust anchor than the seed declares"
                )
        if secret is not None and not _same_secret(
            self.directory.store_secret(store.store_id), secret
        ):
            field = entry.secret_sources()[0]
            raise self.conflict(label, f"{field}: {what} has another secret than the seed declares")
        state = store.connection_state
        if state == "CONNECTED":
            self.unchanged.append(label)
            return
        if state == "FAILED":
            self.steps.append(
                Step(
                    label,
                    f"disconnect custom key store {entry.name} (FAILED, "
                    f"{store.connection_error_code})",
                    "DisconnectCustomKeyStore",
                    store=entry.name,
                )
            )
        elif state not in ("DISCONNECTED", "CONNECTING"):
            raise self.conflict(label, f"{what} is {state}")
        self._connect(label, entry.name)

    def _store_ref(self, label: str, entry: KeyEntry) -> _StoreRef | None:
        """The custom key store a key entry names (a declared one, or an existing id)."""
        name = entry.custom_key_store
        if name is None:
            return None
        if name in self.stores:
            return self.stores[name]
        record = self.directory.store(name)  # a cks- id, not declared in this file
        if record is None:
            raise self.document.error(f"{label}: custom key store {name} does not exist")
        return _StoreRef(record.name, record.store_type, record.store_id, record.connection_state)

    def conflict(self, label: str, message: str) -> SeedError:
        return self.document.error(f"{label}: {message}; the data directory is left unchanged")

    # -- keys ---------------------------------------------------------------------------------

    def key(self, index: int, entry: KeyEntry) -> None:
        document, label = self.document, entry.label(index)
        store = self._store_ref(label, entry)
        spec = _enum(document, label, "spec", entry.spec, [s.value for s in KeySpec])
        usage = _enum(
            document, label, "usage", entry.usage or DEFAULT_USAGE, [u.value for u in KeyUsage]
        )
        policy = policy_text(entry.policy)
        # Every request the entry implies is checked first, whether or not the key exists.
        key_id = entry.id or str(uuid.uuid4())
        origin: OriginType | None = None
        if store is not None:
            external = store.store_type == CustomKeyStoreType.EXTERNAL_KEY_STORE.value
            if external and entry.xks_key_id is None:
                raise document.error(
                    f"{label}: a key in the external key store {store.name!r} needs xks_key_id"
                )
            if not external and entry.xks_key_id is not None:
                raise document.error(
                    f"{label}: xks_key_id is only for keys in an EXTERNAL_KEY_STORE"
                )
            origin = OriginType.EXTERNAL_KEY_STORE if external else OriginType.AWS_CLOUDHSM
        create = OperatorCreateKeyRequest(
            KeyId=key_id,
            Description=entry.description,
            KeySpec=KeySpec(spec),
            KeyUsage=KeyUsage(usage),
            Policy=policy,
            Tags=[Tag(TagKey=k, TagValue=v) for k, v in (entry.tags or {}).items()],
            Origin=origin,
            CustomKeyStoreId=None if store is None else store.store_id or _PLACEHOLDER_STORE_ID,
            XksKeyId=entry.xks_key_id,
        )
        _checked(document, label, "CreateKey", create)
        rotation: EnableKeyRotationRequest | None = None
        if entry.rotation is not None and entry.rotation.enabled:
            if store is not None:
                # spec: AWS KMS EnableKeyRotation — keys in custom key stores do not rotate.
                raise document.error(
                    f"{label}: rotation: keys in a custom key store do not rotate automatically"
                )
            if not OPERATIONS["EnableKeyRotation"].accepts(spec, usage):
                raise document.error(
                    f"{label}: rotation: automatic rotation is not available for {spec} keys"
                )
            rotation = EnableKeyRotationRequest(
                KeyId=key_id, RotationPeriodInDays=entry.rotation.period_days
            )
            _checked(document, label, "EnableKeyRotation", rotation)
        for alias in entry.aliases:
            _checked(
                document,
                label,
                "CreateAlias",
                CreateAliasRequest(AliasName=alias, TargetKeyId=key_id),
            )

        existing = self._find(label, entry)
        if existing is None:
            if store is not None and store.state not in (None, "CONNECTED"):
                raise document.error(
                    f"{label}: custom_key_store: the custom key store {store.store_id} is "
                    f"{store.state}: connect it, or declare it in custom_key_stores"
                )
            self._create_key(label, entry, create, rotation, store)
            return
        self._compare(label, entry, existing, spec, usage, policy)
        self._compare_key_store(label, entry, existing, store)
        missing = [a for a in entry.aliases if self.directory.alias_target(a) is None]
        for alias in missing:
            self._alias(label, alias, existing.key_id)
        if not missing:
            self.unchanged.append(label)

    def _find(self, label: str, entry: KeyEntry) -> KeyRecord | None:
        """The existing key the entry declares: by id, else by the aliases that exist (which
        must all name one key, and the id when one is given)."""
        targets = {a: t for a in entry.aliases if (t := self.directory.alias_target(a))}
        if entry.id is not None:
            for alias, target in targets.items():
                if target != entry.id:
                    raise self.conflict(
                        label, f"{alias} exists and names key {target}, not {entry.id}"
                    )
            return self.directory.key(entry.id)
        found = set(targets.values())
        if len(found) > 1:
            named = ", ".join(f"{a} -> {t}" for a, t in sorted(targets.items()))
            raise self.conflict(label, f"its aliases name different keys ({named})")
        if not found:
            return None
        key = self.directory.key(found.pop())
        if key is None:  # pragma: no cover - an alias row always names an existing key
            raise self.conflict(label, "its alias names a key that does not exist")
        return key

    def _compare(
        self,
        label: str,
        entry: KeyEntry,
        key: KeyRecord,
        spec: str,
        usage: str,
        policy: str | None,
    ) -> None:
        """A conflict for each declared attribute the existing key does not have."""
        what = f"key {key.key_id}"
        if key.state in (DELETING, KeyState.PendingDeletion.value):
            raise self.conflict(
                label, f"{what} is pending deletion (cancel it with CancelKeyDeletion)"
            )
        if key.key_spec != spec or key.key_usage != usage:
            raise self.conflict(
                label,
                f"{what} is {key.key_spec}/{key.key_usage}, the seed declares {spec}/{usage}",
            )
        if entry.description is not None and key.description != entry.description:
            raise self.conflict(
                label,
                f"{what} has the description {key.description!r}, the seed declares "
                f"{entry.description!r}",
            )
        if policy is not None and not _same_policy(key.policy, policy):
            raise self.conflict(label, f"{what} has another key policy than the seed declares")
        if entry.tags is not None:
            tags = self.directory.tags(key.key_id)
            if tags != entry.tags:
                raise self.conflict(
                    label, f"{what} has the tags {tags}, the seed declares {entry.tags}"
                )
        if entry.rotation is not None:
            declared = entry.rotation
            if key.rotation_enabled != declared.enabled:
                state = "enabled" if key.rotation_enabled else "disabled"
                raise self.conflict(label, f"{what} has automatic rotation {state}")
            period = declared.period_days
            if declared.enabled and period is not None and key.rotation_period_days != period:
                raise self.conflict(
                    label,
                    f"{what} rotates every {key.rotation_period_days} days, the seed declares "
                    f"{period}",
                )
        if entry.enabled is not None and (key.state == KeyState.Enabled.value) != entry.enabled:
            raise self.conflict(label, f"{what} is {key.state}")

    def _compare_key_store(
        self, label: str, entry: KeyEntry, key: KeyRecord, store: _StoreRef | None
    ) -> None:
        """An existing key is in the declared custom key store (or in the default token when
        the entry names none), bound to the declared external key."""
        store_id, xks_key_id = self.directory.key_store_of(key)
        what = f"key {key.key_id}"
        if store is None:
            if store_id is not None:
                raise self.conflict(
                    label,
                    f"custom_key_store: {what} is in the custom key store {store_id}, the seed "
                    "declares the default token",
                )
            return
        if store_id is None or store_id != store.store_id:
            where = "the default token" if store_id is None else f"the custom key store {store_id}"
            raise self.conflict(
                label, f"custom_key_store: {what} is in {where}, the seed declares {store.name!r}"
            )
        if entry.xks_key_id is not None and xks_key_id != entry.xks_key_id:
            raise self.conflict(
                label,
                f"xks_key_id: {what} is bound to the external key {xks_key_id!r}, the seed "
                f"declares {entry.xks_key_id!r}",
            )

    def _create_key(
        self,
        label: str,
        entry: KeyEntry,
        create: OperatorCreateKeyRequest,
        rotation: EnableKeyRotationRequest | None,
        store: _StoreRef | None,
    ) -> None:
        key_id = create.KeyId
        if entry.id is None and self.directory.key(key_id) is not None:  # pragma: no cover
            raise self.conflict(label, f"the new key id {key_id} exists")
        in_store = "" if store is None else f" in the custom key store {store.name}"
        self.steps.append(
            Step(
                label,
                f"create key {key_id} ({create.KeySpec}){in_store}",
                "CreateKey",
                create,
                store=None if store is None or store.store_id is not None else store.name,
            )
        )
        if entry.enabled is False:
            self.steps.append(
                Step(label, f"disable key {key_id}", "DisableKey", DisableKeyRequest(KeyId=key_id))
            )
        if rotation is not None:
            period = rotation.RotationPeriodInDays
            every = f" every {period} days" if period is not None else ""
            self.steps.append(
                Step(label, f"enable rotation of {key_id}{every}", "EnableKeyRotation", rotation)
            )
        for alias in entry.aliases:
            self._alias(label, alias, key_id)

    def _alias(self, label: str, alias: str, key_id: str) -> None:
        request = CreateAliasRequest(AliasName=alias, TargetKeyId=key_id)
        self.steps.append(Step(label, f"create {alias} -> {key_id}", "CreateAlias", request))

    # -- credentials --------------------------------------------------------------------------

    def credential(self, index: int, entry: CredentialEntry) -> None:
        document, label = self.document, entry.label(index)
        if entry.name == ROOT_NAME:
            raise document.error(
                f"{label}: the account root is set with HSMKMS_ROOT_ACCESS_KEY_ID and "
                "HSMKMS_ROOT_SECRET_ACCESS_KEY, not in a seed file"
            )
        policy = policy_text(entry.policy)
        secret = document.read_secret(entry, index)
        try:
            # A placeholder secret when none is given: the checks are of the other fields.
            check_credential(
                entry.name,
                policy,
                access_key_id=entry.access_key_id,
                secret=secret if secret is not None else "-",
            )
        except KMSError as exc:
            raise document.error(f"{label}: {exc.message}") from None
        existing = self.directory.credentials()
        by_name = next((c for c in existing if c.name == entry.name), None)
        by_key = next((c for c in existing if c.access_key_id == entry.access_key_id), None)
        if by_name is None:
            if by_key is not None:
                raise self.conflict(
                    label,
                    f"access key id {entry.access_key_id} belongs to the credential "
                    f"{by_key.name!r}",
                )
            if secret is None:
                raise document.error(
                    f"{label}: no secret to create it with: give secret_access_key_env, "
                    "secret_access_key_file or secret_access_key"
                )
            self.steps.append(
                Step(
                    label,
                    f"create credential {entry.access_key_id} ({entry.name})",
                    credential=entry,
                    secret=secret,
                    policy=policy,
                )
            )
            return
        what = f"the credential {entry.name!r}"
        if by_name.access_key_id != entry.access_key_id:
            raise self.conflict(
                label,
                f"{what} has the access key id {by_name.access_key_id}, the seed declares "
                f"{entry.access_key_id}",
            )
        if policy is not None and not _same_policy(
            self.directory.credential_policy(entry.name), policy
        ):
            raise self.conflict(label, f"{what} has another identity policy than the seed declares")
        if secret is not None:
            stored = self.directory.credential_secret(entry.access_key_id)
            if stored is None or not hmac.compare_digest(stored.encode(), secret.encode()):
                raise self.conflict(label, f"{what} has another secret than the seed declares")
        self.unchanged.append(label)


def plan_seed(document: SeedDocument, system: System | None) -> SeedPlan:
    """Check ``document`` against the data directory of ``system`` (None: a data directory
    that does not exist yet) and return what applying it would do. Changes nothing; raises
    :class:`~hsmkms.seed.document.SeedError` at the first entry that cannot be applied."""
    planner = _Planner(document, _Directory(system))
    try:
        for index, store in enumerate(document.custom_key_stores):
            planner.store(index, store)
        for index, key in enumerate(document.keys):
            planner.key(index, key)
    except KMSError as exc:
        if isinstance(exc, SeedError):
            raise
        # The data directory's service without custom key stores (never in hsmkms serve).
        raise document.error(f"custom key stores: {exc.message or exc.code}") from None
    for index, credential in enumerate(document.credentials):
        planner.credential(index, credential)
    store_ids = tuple(
        (ref.name, ref.store_id) for ref in planner.stores.values() if ref.store_id is not None
    )
    return SeedPlan(document.source, tuple(planner.steps), tuple(planner.unchanged), store_ids)


def apply_seed(document: SeedDocument, system: System) -> SeedReport:
    """Plan ``document`` against ``system``'s data directory, then apply the plan: each key
    step as the local operator (audited), each credential into the credentials store. The
    system must be opened with ``identity=True`` and an audit mode. A step that fails stops
    the rest (what was applied stays, and the next application goes on from there)."""
    # Two servers starting on one data directory must not both create an id-less key.
    with _locked(system.settings.data_dir / SEED_LOCK):
        plan = plan_seed(document, system)
        return _apply(document, system, plan)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _StoreFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _KeyRefused(Exception):
    def __init__(self, step: Step, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.message = message


class _Applier:
    """The custom key store steps of a plan: the ids of the stores created, each connection
    awaited, and the undoing of the store steps when one store cannot be connected."""

    def __init__(self, system: System, operator: OperatorService, plan: SeedPlan) -> None:
        self.system = system
        self.operator = operator
        self.ids = dict(plan.store_ids)
        self.created: list[str] = []
        self.connected: list[str] = []  # existing stores this run connected

    def request(self, step: Step) -> BaseModel | None:
        if step.operation == "ConnectCustomKeyStore":
            return ConnectCustomKeyStoreRequest(CustomKeyStoreId=self.ids[step.store or ""])
        if step.operation == "DisconnectCustomKeyStore":
            return DisconnectCustomKeyStoreRequest(CustomKeyStoreId=self.ids[step.store or ""])
        if step.operation == "CreateKey" and step.store is not None and step.request is not None:
            return step.request.model_copy(update={"CustomKeyStoreId": self.ids[step.store]})
        return step.request

    def run(self, step: Step, request: BaseModel) -> None:
        assert step.operation is not None
        response = self.operator.invoke(step.operation, request)
        if step.operation == "CreateCustomKeyStore":
            store_id: str = response.CustomKeyStoreId
            self.ids[step.store or ""] = store_id
            self.created.append(store_id)
        elif step.operation == "ConnectCustomKeyStore":
            store_id = self.ids[step.store or ""]
            if store_id not in self.created:
                self.connected.append(store_id)
            self._await(store_id)

    def _await(self, store_id: str) -> None:
        """Wait for ConnectCustomKeyStore's outcome (asynchronous, as in AWS)."""
        stores = self.system.service.custom_key_stores
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            record = stores.table.get(store_id)
            state = "" if record is None else record.connection_state
            if state == "CONNECTED":
                return
            if state != "CONNECTING":
                code = None if record is None else record.connection_error_code
                hint = _CONNECTION_HINTS.get(code or "")
                raise _StoreFailed(
                    f"the connection {state or 'ended'}"
                    + (f" with {code}" if code else "")
                    + (f" ({hint})" if hint else "")
                )
            if time.monotonic() >= deadline:
                raise _StoreFailed(f"still CONNECTING after {CONNECT_TIMEOUT:.0f} s")
            stores.wait(0.5)
            time.sleep(0.05)

    def check_external_keys(self, steps: Sequence[Step]) -> None:
        """Before any key is created: each external key a CreateKey step names is known to its
        (connected) store's proxy as an enabled AES_256 key for ENCRYPT and DECRYPT, as
        CreateKey will require, so that an unknown ``xks_key_id`` stops the seed while only
        store steps were applied (and can be undone). Raises :class:`_KeyRefused`."""
        stores = self.system.service.custom_key_stores
        principal = f"arn:aws:iam::{self.system.settings.account_id}:root"
        for step in steps:
            request = self.request(step)
            if (
                step.operation != "CreateKey"
                or not isinstance(request, OperatorCreateKeyRequest)
                or request.Origin is not OriginType.EXTERNAL_KEY_STORE
                or request.CustomKeyStoreId is None
                or request.XksKeyId is None
            ):
                continue
            record = stores.table.get(request.CustomKeyStoreId)
            if record is None or record.connection_state != "CONNECTED":
                continue  # CreateKey says why
            meta = xks_client.XksRequestMetadata(principal, "CreateKey", str(uuid.uuid4()))
            try:
                answer = xks_client.key_metadata(
                    stores.xks, stores.location(record), request.XksKeyId, meta
                )
            except xks_client.XksProxyFailure as exc:
                reason = (
                    "the proxy does not know it"
                    if exc.error_name == "KeyNotFoundException"
                    else f"the proxy failed ({exc.code})"
                )
                raise _KeyRefused(step, f"xks_key_id {request.XksKeyId}: {reason}") from None
            if not xks_client.is_usable_key(answer):
                raise _KeyRefused(
                    step,
                    f"xks_key_id {request.XksKeyId}: the proxy's key is not an ENABLED AES_256 "
                    "key for ENCRYPT and DECRYPT",
                )

    def undo(self) -> str:
        """Undo this run's store steps (no key was made in a store yet): the stores it created
        are disconnected and deleted, the existing ones it connected disconnected. What was
        done, for the message."""
        table = self.system.service.custom_key_stores.table
        for store_id in [*self.created, *self.connected]:
            record = table.get(store_id)
            if record is not None and record.connection_state != "DISCONNECTED":
                with contextlib.suppress(KMSError):
                    self.operator.invoke(
                        "DisconnectCustomKeyStore",
                        DisconnectCustomKeyStoreRequest(CustomKeyStoreId=store_id),
                    )
        deleted = 0
        for store_id in self.created:
            with contextlib.suppress(KMSError):
                self.operator.invoke(
                    "DeleteCustomKeyStore", DeleteCustomKeyStoreRequest(CustomKeyStoreId=store_id)
                )
                deleted += 1
        parts = []
        if self.created:
            parts.append(
                f"the {len(self.created)} custom key store(s) this run created "
                + (
                    "were deleted again"
                    if deleted == len(self.created)
                    else "could not all be deleted"
                )
            )
        if self.connected:
            parts.append(f"{len(self.connected)} existing store(s) were disconnected again")
        return "; ".join(parts) or "nothing was changed"


def _apply(document: SeedDocument, system: System, plan: SeedPlan) -> SeedReport:
    operator = OperatorService(system, command="seed")
    stores = _Applier(system, operator, plan)
    applied: list[str] = []
    checked = False
    for index, step in enumerate(plan.steps):
        if not checked and step.operation not in _STORE_OPERATIONS:
            checked = True
            try:
                stores.check_external_keys(plan.steps[index:])
            except (KMSError, _KeyRefused) as exc:
                label = exc.step.entry if isinstance(exc, _KeyRefused) else step.entry
                raise document.error(f"{label}: {exc.message}; {stores.undo()}") from None
        try:
            request = stores.request(step)
            if step.operation in _STORE_OPERATIONS and request is not None:
                stores.run(step, request)
            elif step.operation is not None and request is not None:
                operator.invoke(step.operation, request)
            elif step.credential is not None:
                system.credentials.create(
                    step.credential.name,
                    step.policy,
                    access_key_id=step.credential.access_key_id,
                    secret=step.secret,
                )
        except (KMSError, _StoreFailed) as exc:
            reason = exc.message or (exc.code if isinstance(exc, KMSError) else "")
            if step.operation in _STORE_OPERATIONS:
                # The stores come first in a plan: nothing else was applied yet.
                raise document.error(
                    f"{step.entry}: {step.action} failed: {reason}; {stores.undo()}"
                ) from None
            done = f" (after {len(applied)} change(s))" if applied else ""
            raise document.error(f"{step.entry}: {step.action} failed: {reason}{done}") from None
        applied.append(f"{step.entry}: {step.action}")
    return SeedReport(plan.source, tuple(applied), plan.unchanged)


_STORE_OPERATIONS: Final = frozenset(
    {"CreateCustomKeyStore", "ConnectCustomKeyStore", "DisconnectCustomKeyStore"}
)
