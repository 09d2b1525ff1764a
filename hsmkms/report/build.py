"""Building the key-custody report from the running system: the deployment, the audit trail,
integrity findings, and per key its versions with the token's attributes read now, its rotation
schedule, who may use and administer it, and when it was last used.

The result is a plain JSON-able ``dict`` (the ``report`` object of ``docs/report.md``, whose
JSON Schema is ``hsmkms/report/report.schema.json``); :mod:`hsmkms.report.render` writes and signs
it. The pieces are also available one by one (:class:`ReportContext`), which is what the console
shows for one key.

Nothing here writes anything, except that :func:`hsmkms.report.signing.signing_key` makes the
signing key on first use.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import structlog

from hsmkms import __version__
from hsmkms.audit import AuditRecord
from hsmkms.audit.records import format_event_time, key_id_of
from hsmkms.audit.trail import AuditTrail, VerifyResult
from hsmkms.errors import ClientError, KMSError, KMSInvalidStateException
from hsmkms.keystore.base import DEFAULT_STORE, KeyMaterialRef, Keystore, TokenIdentity
from hsmkms.keystore.errors import KeyMaterialMissing, KeystoreError, TokenRejected
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.keystore.stores import KeyStores
from hsmkms.models.enums import KeySpec, KeyState
from hsmkms.policy import root_arn
from hsmkms.profiles import ObjectRole
from hsmkms.report.access import KeyAccess, Principal, summarize_access
from hsmkms.report.custody import (
    CUSTODY_ATTRIBUTES,
    OPERATION_ATTRIBUTES,
    PUBLIC_KEY_ATTRIBUTES,
    Custody,
    ObjectReading,
    Placement,
    Verdict,
    judge,
)
from hsmkms.service.authorize import key_policy
from hsmkms.service.maintenance import Inconsistencies
from hsmkms.service.operations import ALL_OPERATIONS
from hsmkms.service.states import Access
from hsmkms.store import GrantRecord, KeyRecord, KeyVersionRecord, MetadataStore
from hsmkms.store.key_stores import (
    ClusterRecord,
    CustomKeyStoreRecord,
    CustomKeyStoreTable,
    token_identity_of,
)

if TYPE_CHECKING:
    from hsmkms.identity import CredentialStore
    from hsmkms.service.custom_stores import CustomKeyStores
    from hsmkms.system import System

log = structlog.get_logger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "ROTATION_GRACE",
    "Deployment",
    "KeyPlace",
    "ReportContext",
    "build_report",
    "iso",
]

FORMAT_VERSION: Final = 2
"""2: key stores with their type, connection state, cluster or XKS proxy and key count;
keys naming their custom key store. 1: the default token only."""
ROTATION_GRACE: Final = dt.timedelta(days=1)
"""How late an automatic rotation may be before the report calls it overdue (the server runs
due rotations every minute, but may have been stopped for a while)."""
_PAGE: Final = 1000
_USE_EVENTS: Final = frozenset(
    op.name for op in ALL_OPERATIONS.values() if op.access is Access.USE and op.read_only
)
"""Operations that use key material: what "last used" looks for."""
_ROTATABLE: Final = frozenset({KeySpec.SYMMETRIC_DEFAULT.value})
_EXTERNAL_KEY_STORE: Final = "EXTERNAL_KEY_STORE"


def iso(when: dt.datetime | None) -> str | None:
    """A time as the report writes it: UTC, to the second, ``Z``."""
    return None if when is None else format_event_time(when)


@dataclasses.dataclass(frozen=True)
class Deployment:
    """What the entry point knows from the settings (the report reads no settings itself)."""

    data_dir: str
    database: str
    audit_database: str
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class KeyPlace:
    """Which key store a key is in: ``store`` is the custom key store's id for a key in one
    (AWS_CLOUDHSM: the store of its material; EXTERNAL_KEY_STORE: the store of its external
    key, whose inner layer is in the default token), else the store of its current version."""

    store: str | None
    custom_key_store_id: str | None = None
    cloud_hsm_cluster_id: str | None = None
    xks_key_id: str | None = None


def _object_class(role: ObjectRole) -> str:
    return "SECRET_KEY" if role is not ObjectRole.KEY_PAIR else "PRIVATE_KEY"


def _read(
    keystore: Keystore, object_id: str, names: Sequence[str], *, public: bool
) -> dict[str, bool | None]:
    """Each attribute on its own: a token that does not report one (``AttributeTypeInvalid``)
    leaves it ``None`` rather than hiding the others. ``KeyMaterialMissing`` propagates."""
    values: dict[str, bool | None] = {}
    for name in names:
        try:
            value = keystore.attributes(object_id, [name], public=public)[name]
        except TokenRejected:
            value = None
        values[name] = bool(value) if value is not None else None
    return values


class ReportContext:
    """What a report (or one console page) reads from the running system, gathered once.

    ``credentials``: the credentials store, for the known principals (None: only the account
    root and the principals the keys' policies and grants name). ``now``: the report's time.
    ``find_inconsistencies``: the service's comparison of the token with the store (doctor's).
    ``custom_key_stores``: the service's custom key stores (None where they are not available).
    """

    def __init__(
        self,
        *,
        store: MetadataStore,
        key_stores: KeyStores,
        account_id: str,
        region: str,
        credentials: CredentialStore | None,
        now: dt.datetime,
        find_inconsistencies: Callable[[], Inconsistencies],
        custom_key_stores: CustomKeyStores | None = None,
    ) -> None:
        self._find_inconsistencies = find_inconsistencies
        self._custom = custom_key_stores
        self.store = store
        self.key_stores = key_stores
        self.account_id = account_id
        self.region = region
        self.now = now
        self.findings: list[str] = []
        self._credentials = credentials

    @functools.cached_property
    def principals(self) -> dict[str, Principal]:
        """The account root and every credential's principal, with its identity policy (read
        on first use: each credential is unsealed in the token)."""
        return self._principals(self._credentials)

    @classmethod
    def of(cls, system: System, *, now: dt.datetime | None = None) -> ReportContext:
        """The context of an open :class:`~hsmkms.system.System` (its credentials store when
        it was opened with ``identity=True``)."""
        try:
            credentials: CredentialStore | None = system.credentials
        except KMSError:
            credentials = None
        try:
            custom: CustomKeyStores | None = system.service.custom_key_stores
        except KMSError:  # built without a way to open their tokens
            custom = None
        return cls(
            store=system.store,
            key_stores=system.service.key_stores,
            account_id=system.settings.account_id,
            region=system.settings.region,
            credentials=credentials,
            now=now or dt.datetime.now(dt.UTC),
            find_inconsistencies=system.service.find_inconsistencies,
            custom_key_stores=custom,
        )

    @functools.cached_property
    def _custom_table(self) -> CustomKeyStoreTable | None:
        return None if self._custom is None else self._custom.table

    # -- principals ---------------------------------------------------------------------------

    def _principals(self, credentials: CredentialStore | None) -> dict[str, Principal]:
        root = root_arn(self.account_id)
        found: dict[str, Principal] = {root: Principal(root, None, ("root",), "root")}
        for info in credentials.list() if credentials is not None else []:
            try:
                _, policy = credentials.get_policy(info.access_key_id)  # type: ignore[union-attr]
            except KMSError:
                self.findings.append(
                    f"credential {info.name} ({info.access_key_id}) does not open: its row was "
                    "altered; it is refused at sign-in and left out of the access summaries"
                )
                continue
            if info.principal_arn == root:
                continue
            earlier = found.get(info.principal_arn)
            if earlier is not None:  # several access keys of one user: their policies differ
                self.findings.append(
                    f"{info.principal_arn} has several credentials; the summary uses "
                    f"{earlier.name}'s identity policy"
                )
                continue
            found[info.principal_arn] = Principal(
                info.principal_arn, policy, ("credential",), info.name
            )
        return found

    def principals_for(self, key: KeyRecord, grants: Sequence[GrantRecord]) -> list[Principal]:
        """The known principals, and those the key's policy statements and grants name."""
        found = dict(self.principals)
        for statement in key_policy(key.policy).statements:
            for element in (statement.principal, statement.not_principal):
                for arn in sorted(element.aws) if element is not None else []:
                    if arn not in found:
                        found[arn] = Principal(arn, None, ("key-policy",))
        for grant in grants:
            if grant.grantee_principal not in found:
                found[grant.grantee_principal] = Principal(
                    grant.grantee_principal, None, ("grantee",)
                )
        return list(found.values())

    # -- keys ---------------------------------------------------------------------------------

    def keys(self, key_ids: Sequence[str] | None = None) -> list[KeyRecord]:
        """The keys of the report: every key (not being purged), or the ones named (key id,
        key ARN or alias name; :class:`ClientError` for one that does not exist)."""
        if key_ids is None:
            found, marker = [], None
            while True:
                page = self.store.list_keys(_PAGE, marker)
                found.extend(page.items)
                if page.next_marker is None:
                    return found
                marker = page.next_marker
        chosen: dict[str, KeyRecord] = {}
        for name in key_ids:
            key = (
                self.store.resolve_alias(name)
                if name.startswith("alias/")
                else self.store.get_key(key_id_of(name))
            )
            if key is None:
                raise ClientError(f"no key {name}")
            chosen[key.key_id] = key
        return list(chosen.values())

    def version_section(self, key: KeyRecord, version: KeyVersionRecord) -> dict[str, Any]:
        """One version: where its material is, the token's attributes now, the verdict."""
        ref = KeyMaterialRef.from_str(version.material_ref)
        objects, custody = self._custody(key, ref)
        return {
            "version": version.version,
            "current": version.version == key.current_version,
            "createdAt": iso(version.created_at),
            "rotationType": version.rotation_type,
            "profile": ref.profile.value if ref.profile is not None else None,
            "keyStore": ref.store,
            "placement": (Placement.WRAPPED if ref.is_wrapped else Placement.TOKEN_OBJECT).value,
            "materialSpec": ref.spec.value,
            "objects": objects,
            "custody": _custody_dict(custody),
        }

    def _custody(self, key: KeyRecord, ref: KeyMaterialRef) -> tuple[list[dict[str, Any]], Custody]:
        readings: list[ObjectReading] = []
        try:
            keystore = self.key_stores.backend_for(ref)
        except (KeystoreError, KMSInvalidStateException):  # a custom key store disconnected
            return [], judge(
                (),
                origin=key.origin,
                unavailable=(
                    f"key store {ref.store!r} is not connected to this hsmkms: its token's "
                    "attributes "
                    "could not be read"
                ),
            )
        if ref.kek_id is not None:
            return self._wrapped_custody(key, ref, keystore, ref.kek_id)
        try:
            for object_id, role in zip(ref.object_ids, ref.roles, strict=True):
                readings.append(self._reading(keystore, object_id, role, public=False))
                if role is ObjectRole.KEY_PAIR:
                    readings.append(self._reading(keystore, object_id, role, public=True))
        except KeystoreError as exc:
            return _objects(readings), judge(
                readings,
                origin=key.origin,
                unavailable=(
                    f"the token of key store {ref.store!r} did not answer ({type(exc).__name__})"
                ),
            )
        return _objects(readings), judge(readings, origin=key.origin)

    def _wrapped_custody(
        self, key: KeyRecord, ref: KeyMaterialRef, keystore: Keystore, kek_id: str
    ) -> tuple[list[dict[str, Any]], Custody]:
        """Wrapped material: the KEK's attributes are the evidence (role ``kek``)."""
        try:
            reading = self._reading(keystore, kek_id, ObjectRole.ENCRYPT, public=False)
            reading = dataclasses.replace(reading, role="kek")
        except KeystoreError as exc:
            return [], judge(
                (),
                origin=key.origin,
                placement=Placement.WRAPPED,
                unavailable=(
                    f"the token of key store {ref.store!r} did not answer ({type(exc).__name__})"
                ),
            )
        custody = judge(
            [reading], origin=key.origin, placement=Placement.WRAPPED, wrapped_local=ref.local
        )
        return _objects([reading]), custody

    @staticmethod
    def _reading(
        keystore: Keystore, object_id: str, role: ObjectRole, *, public: bool
    ) -> ObjectReading:
        names = (
            (*PUBLIC_KEY_ATTRIBUTES, "VERIFY")
            if public
            else CUSTODY_ATTRIBUTES + OPERATION_ATTRIBUTES
        )
        object_class = "PUBLIC_KEY" if public else _object_class(role)
        try:
            attributes = _read(keystore, object_id, names, public=public)
        except KeyMaterialMissing as exc:
            log.warning("token_object_missing", object_id=object_id, detail=exc.message)
            return ObjectReading(role.value, object_id, object_class, {}, present=False)
        return ObjectReading(role.value, object_id, object_class, attributes)

    def rotation_section(
        self, key: KeyRecord, versions: Sequence[KeyVersionRecord]
    ) -> dict[str, Any]:
        """The automatic rotation schedule and whether it is kept."""
        current = next((v for v in versions if v.version == key.current_version), None)
        age = None if current is None else (self.now - current.created_at).days
        section: dict[str, Any] = {
            "enabled": key.rotation_enabled,
            "periodDays": key.rotation_period_days,
            "nextRotationDate": iso(key.next_rotation_date),
            "onDemandRotations": key.on_demand_rotations,
            "currentMaterialAgeDays": age,
        }
        if key.key_spec not in _ROTATABLE or key.origin != "AWS_KMS":
            status, detail = (
                "NOT_SUPPORTED",
                (
                    f"automatic rotation is not available for {key.key_spec} keys of origin "
                    f"{key.origin}"
                ),
            )
        elif not key.rotation_enabled:
            status, detail = "DISABLED", "automatic rotation is off"
        elif key.state != KeyState.Enabled:
            status, detail = "PAUSED", f"the key is {key.state}: rotations wait until it is enabled"
        elif (
            key.next_rotation_date is not None
            and key.next_rotation_date < self.now - ROTATION_GRACE
        ):
            late = (self.now - key.next_rotation_date).days
            status, detail = (
                "OVERDUE",
                (f"rotation was due {iso(key.next_rotation_date)}, {late} days ago"),
            )
        else:
            status, detail = "ON_TIME", f"next rotation {iso(key.next_rotation_date)}"
        section.update(status=status, detail=detail)
        return section

    def access_section(self, key: KeyRecord, grants: Sequence[GrantRecord]) -> dict[str, Any]:
        """Who may use, administer and view the key (the policy engine's decisions)."""
        access = summarize_access(
            key_arn=key.arn,
            key_spec=key.key_spec,
            key_usage=key.key_usage,
            policy_text=key.policy,
            principals=self.principals_for(key, grants),
            grants=grants,
            tags=dict(self.store.tags_of(key.key_id)),
            aliases=self.store.alias_names_of(key.key_id),
        )
        return _access_dict(access)

    def grants(self, key: KeyRecord) -> list[GrantRecord]:
        """Every grant of the key."""
        found: list[GrantRecord] = []
        marker = None
        while True:
            page = self.store.list_grants(key.key_id, _PAGE, marker)
            found.extend(page.items)
            if page.next_marker is None:
                return found
            marker = page.next_marker

    def place_of(
        self, key: KeyRecord, versions: Sequence[KeyVersionRecord] | None = None
    ) -> KeyPlace:
        """The key store ``key`` is in (``versions``: its versions, when already read)."""
        table = self._custom_table
        if key.origin == _EXTERNAL_KEY_STORE and table is not None:
            binding = table.xks_key(key.key_id)
            if binding is not None:
                return KeyPlace(binding[0], binding[0], None, binding[1])
        if versions is None:
            current = self.store.get_version(key.key_id, key.current_version)
        else:
            current = next((v for v in versions if v.version == key.current_version), None)
        if current is None:
            return KeyPlace(None)
        store_id = KeyMaterialRef.from_str(current.material_ref).store
        record = None
        if store_id != DEFAULT_STORE and table is not None:
            record = table.get(store_id)
        if record is None:
            return KeyPlace(store_id)
        return KeyPlace(store_id, store_id, record.cluster_id)

    def key_section(
        self, key: KeyRecord, *, last_used: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Everything the report says about one key."""
        versions = self.store.list_versions(key.key_id).items
        place = self.place_of(key, versions)
        grants = self.grants(key)
        version_sections = [self.version_section(key, v) for v in versions]
        worst = max(
            (Verdict(v["custody"]["verdict"]) for v in version_sections),
            key=lambda verdict: verdict.rank,
            default=Verdict.MISSING,
        )
        current = next((v for v in version_sections if v["current"]), None)
        return {
            "keyId": key.key_id,
            "arn": key.arn,
            "description": key.description,
            "aliases": list(self.store.alias_names_of(key.key_id)),
            "tags": dict(self.store.tags_of(key.key_id)),
            "keySpec": key.key_spec,
            "keyUsage": key.key_usage,
            "origin": key.origin,
            "keyStore": current["keyStore"] if current is not None else None,
            "customKeyStoreId": place.custom_key_store_id,
            "cloudHsmClusterId": place.cloud_hsm_cluster_id,
            "xksKeyId": place.xks_key_id,
            "state": key.state,
            "createdAt": iso(key.created_at),
            "deletionDate": iso(key.deletion_date),
            "rotation": self.rotation_section(key, versions),
            "versions": version_sections,
            "custody": {
                "verdict": worst.value,
                "text": next(
                    (
                        v["custody"]["text"]
                        for v in version_sections
                        if v["custody"]["verdict"] == worst.value
                    ),
                    "no key material",
                ),
            },
            "access": self.access_section(key, grants),
            "grants": [_grant_dict(g) for g in grants],
            "lastUsed": dict(last_used) if last_used is not None else None,
        }

    # -- the deployment -----------------------------------------------------------------------

    def key_counts(self) -> dict[str, int]:
        """How many keys (every key not being purged, pending deletion included) each key
        store holds, by :meth:`place_of`."""
        counts: dict[str, int] = {}
        for key in self.keys():
            store_id = self.place_of(key).store
            if store_id is not None:
                counts[store_id] = counts.get(store_id, 0) + 1
        return counts

    def key_stores_section(self) -> list[dict[str, Any]]:
        """Each key store — the default token, custom key stores of both types — with its
        connection state, where it lives (its token, cluster or XKS proxy; never a password
        or a secret) and how many keys it holds."""
        counts = self.key_counts()
        sections = []
        for store_id, keystore in self.key_stores.items():
            entry = _store_entry(store_id, counts.get(store_id, 0))
            entry.update(default=store_id == DEFAULT_STORE, connected=True)
            self._read_token(entry, keystore)
            sections.append(entry)
        table = self._custom_table
        if table is None:
            return sections
        for record in table.stores():
            if record.store_id not in self.key_stores:
                sections.append(self._custom_store_section(table, record, counts))
        return sections

    def _custom_store_section(
        self, table: CustomKeyStoreTable, record: CustomKeyStoreRecord, counts: Mapping[str, int]
    ) -> dict[str, Any]:
        external = record.store_type == _EXTERNAL_KEY_STORE
        entry = _store_entry(record.store_id, counts.get(record.store_id, 0))
        failed = record.connection_state == "FAILED"
        entry.update(
            name=record.name,
            type=record.store_type,
            kind=_EXTERNAL_KEY_STORE if external else "PKCS11_TOKEN",
            createdAt=iso(record.created_at),
            connectionState=record.connection_state,
            connectionErrorCode=record.connection_error_code if failed else None,
        )
        connected = record.connection_state == "CONNECTED"
        if record.xks is not None:
            # The access key id only: the secret stays sealed in the database.
            entry["xksProxy"] = {
                "uriEndpoint": record.xks.uri_endpoint,
                "uriPath": record.xks.uri_path,
                "accessKeyId": record.xks.access_key_id,
                "connectivity": record.xks.connectivity,
            }
        if external:
            entry["connected"] = connected  # the report does not call the proxy
            return entry
        cluster = None if record.cluster_id is None else table.cluster(record.cluster_id)
        anchor = None if cluster is None else token_identity_of(cluster.trust_anchor)
        entry["cluster"] = _cluster_dict(record.cluster_id, cluster, anchor)
        if not connected:
            return entry
        try:
            keystore = self.key_stores.get(record.store_id)
        except KMSError as exc:
            entry["error"] = f"{type(exc).__name__}: {exc.message}"
            return entry
        if self._read_token(entry, keystore):
            entry["connected"] = True
            token = entry["token"]
            found = TokenIdentity(
                token["manufacturer"], token["model"], token["serial"], token["label"]
            )
            entry["cluster"]["tokenMatchesTrustAnchor"] = found == anchor
        return entry

    @staticmethod
    def _read_token(entry: dict[str, Any], keystore: Keystore) -> bool:
        """Put what the token says about itself into ``entry``; False (and the error) when it
        cannot be read."""
        try:
            info = keystore.info()
            capabilities = keystore.capabilities()
        except KMSError as exc:
            entry.update(connected=False, error=f"{type(exc).__name__}: {exc.message}")
            return False
        identity = TokenIdentity.of(info)
        entry["token"] = {
            "manufacturer": identity.manufacturer,
            "model": identity.model,
            "serial": identity.serial,
            "label": identity.label,
            "firmwareVersion": info.firmware_version or None,
            "hardwareVersion": info.hardware_version or None,
            "module": info.module,
            "libraryDescription": info.library_description,
            "profile": info.profile.value,
            "mechanisms": list(info.mechanisms),
            "capabilities": {
                "specs": {
                    spec.value: sorted(u.value for u in capabilities.usages[spec])
                    for spec in KeyMaterialSpec
                    if spec in capabilities.usages
                },
                "profiles": [p.value for p in capabilities.profiles],
                "unverified": sorted(s.value for s in capabilities.unverified),
            },
        }
        return True

    def integrity_section(self, deployment: Deployment | None = None) -> dict[str, Any]:
        """``hsmkms doctor``'s findings: rows failing their token MAC, token objects no key
        refers to, key versions whose objects are missing, and the warnings."""
        problems = self.store.integrity_problems()
        found = None if problems else self._find_inconsistencies()
        section = {
            "rowsFailing": [dataclasses.asdict(p) for p in problems],
            "orphanObjects": []
            if found is None
            else [{"objectId": o.object_id, "label": o.label} for o in found.orphans],
            "missingObjects": []
            if found is None
            else [{"keyId": key_id, "version": version} for key_id, version in found.missing],
            "orphansChecked": found is not None,
            "warnings": list(deployment.warnings if deployment is not None else ())
            + list(self.findings),
        }
        section["ok"] = not (
            section["rowsFailing"] or section["orphanObjects"] or section["missingObjects"]
        )
        return section


def _store_entry(store_id: str, keys: int) -> dict[str, Any]:
    """A key store's section with nothing known yet (the members every store has)."""
    return {
        "id": store_id,
        "default": False,
        "name": None,
        "type": None,
        "kind": "PKCS11_TOKEN",
        "createdAt": None,
        "connectionState": None,
        "connectionErrorCode": None,
        "connected": False,
        "error": None,
        "keys": keys,
        "cluster": None,
        "xksProxy": None,
        "token": None,
    }


def _cluster_dict(
    cluster_id: str | None, cluster: ClusterRecord | None, anchor: TokenIdentity | None
) -> dict[str, Any]:
    """An AWS_CLOUDHSM store's cluster: its registration and the token identity its trust
    anchor records (``hsmkms clusters add``)."""
    return {
        "cloudHsmClusterId": cluster_id,
        "registered": cluster is not None,
        "pkcs11Uri": None if cluster is None else cluster.pkcs11_uri,
        "registeredAt": None if cluster is None else iso(cluster.created_at),
        "trustAnchor": None
        if anchor is None
        else {
            "manufacturer": anchor.manufacturer,
            "model": anchor.model,
            "serial": anchor.serial,
            "label": anchor.label,
        },
        "tokenMatchesTrustAnchor": None,
    }


def _objects(readings: Iterable[ObjectReading]) -> list[dict[str, Any]]:
    return [
        {
            "role": r.role,
            "objectId": r.object_id,
            "objectClass": r.object_class,
            "present": r.present,
            "attributes": dict(r.attributes),
            "permittedOperations": r.permitted_operations,
            "unreported": r.unreported,
        }
        for r in readings
    ]


def _custody_dict(custody: Custody) -> dict[str, Any]:
    return {
        "verdict": custody.verdict.value,
        "text": custody.text,
        "reasons": list(custody.reasons),
        "notes": list(custody.notes),
    }


def _access_dict(access: KeyAccess) -> dict[str, Any]:
    return {
        "groups": [
            {
                "group": g.group.value,
                "actions": list(g.actions),
                "identityPoliciesMayGrant": g.identity_policies_may_grant,
                "otherAccounts": g.other_accounts,
                "principals": [
                    {
                        "arn": p.arn,
                        "allActions": p.all_actions,
                        "actions": list(p.actions),
                        "via": list(p.via),
                        "conditional": list(p.conditional),
                    }
                    for p in g.principals
                ],
            }
            for g in access.groups
        ],
        "findings": list(access.findings),
    }


def _grant_dict(grant: GrantRecord) -> dict[str, Any]:
    return {
        "grantId": grant.grant_id,
        "name": grant.name,
        "granteePrincipal": grant.grantee_principal,
        "retiringPrincipal": grant.retiring_principal,
        "operations": list(grant.operations),
        "constraints": grant.constraints,
        "createdAt": iso(grant.created_at),
    }


# -- the audit trail ----------------------------------------------------------------------------


def audit_section(result: VerifyResult) -> dict[str, Any]:
    """``hsmkms audit verify``'s result."""
    seal = result.newest_seal
    return {
        "status": result.status.value,
        "records": result.records,
        "seals": result.seals,
        "sealedThrough": result.sealed_through,
        "unsealed": result.unsealed,
        "newestSeal": None
        if seal is None
        else {
            "seal": seal.seal_seq,
            "tag": seal.tag.hex(),
            "sealedAt": seal.sealed_at,
            "recordSeq": seal.record_seq,
        },
        "newestSealTime": iso(result.last_seal_at),
        "problem": result.problem,
        "firstBadRecord": result.first_bad_seq,
        "gaps": [
            {"afterSeal": g.after_seal, "seconds": int(g.seconds), "allowedSeconds": int(g.allowed)}
            for g in result.gaps
        ],
    }


def _who(record: Mapping[str, Any]) -> str | None:
    identity = record.get("userIdentity")
    if not isinstance(identity, Mapping):
        return None
    for name in ("arn", "principalId", "invokedBy", "type"):
        value = identity.get(name)
        if isinstance(value, str):
            return value
    return None


@dataclasses.dataclass
class TrailScan:
    """What one pass over the audit trail finds for the report."""

    last_used: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    deleted: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def scan_trail(
    records: Iterable[AuditRecord], *, since: dt.datetime | None, until: dt.datetime | None
) -> TrailScan:
    """Last use of every key (successful calls of operations that use key material), and the
    keys deleted (``DeleteKey`` service events) between ``since`` and ``until``, each with the
    ``ScheduleKeyDeletion`` that preceded it."""
    scan = TrailScan()
    scheduled: dict[str, AuditRecord] = {}
    low = None if since is None else format_event_time(since)
    high = None if until is None else format_event_time(until)
    for record in records:
        name = record.get("eventName")
        when = record.get("eventTime")
        if not isinstance(name, str) or not isinstance(when, str):
            continue
        resources = record.get("resources")
        key_ids = [
            key_id_of(r["ARN"])
            for r in (resources if isinstance(resources, list) else [])
            if isinstance(r, Mapping) and isinstance(r.get("ARN"), str)
        ]
        failed = record.get("errorCode") is not None
        if name in _USE_EVENTS and not failed:
            for key_id in key_ids:
                scan.last_used[key_id] = {
                    "eventTime": when,
                    "eventName": name,
                    "principal": _who(record),
                    "eventId": record.get("eventID"),
                }
        elif name == "ScheduleKeyDeletion" and not failed:
            for key_id in key_ids:
                scheduled[key_id] = record
        elif name == "CancelKeyDeletion" and not failed:
            for key_id in key_ids:
                scheduled.pop(key_id, None)
        elif name == "DeleteKey" and record.get("eventType") == "AwsServiceEvent":
            if (low is not None and when < low) or (high is not None and when > high):
                continue
            for key_id, arn in zip(key_ids, [r["ARN"] for r in resources], strict=False):  # type: ignore[union-attr]
                before = scheduled.pop(key_id, None)
                params = (before or {}).get("requestParameters") or {}
                response = (before or {}).get("responseElements") or {}
                scan.deleted.append(
                    {
                        "keyId": key_id,
                        "arn": arn,
                        "deletedAt": when,
                        "purgeRecord": {
                            "eventId": record.get("eventID"),
                            "eventTime": when,
                            "eventName": name,
                        },
                        "scheduledAt": None if before is None else before.get("eventTime"),
                        "scheduledBy": None if before is None else _who(before),
                        "pendingWindowInDays": response.get(
                            "pendingWindowInDays", params.get("pendingWindowInDays")
                        ),
                        "lastUsed": scan.last_used.get(key_id),
                    }
                )
    return scan


def _records(trail: AuditTrail) -> Iterator[AuditRecord]:
    yield from trail.search()


# -- the whole report ---------------------------------------------------------------------------


def build_report(
    system: System,
    *,
    deployment: Deployment,
    key_ids: Sequence[str] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The report object (unsigned) for ``system``: every key, or those of ``key_ids``;
    deleted keys between ``since`` and ``until`` (default: the whole trail, up to now)."""
    now = now or dt.datetime.now(dt.UTC)
    until = until or now
    if since is not None and since > until:
        raise ClientError("--since is after --until")
    context = ReportContext.of(system, now=now)
    keys = context.keys(key_ids)
    with system.audit_reader() as trail:
        verified = trail.verify(now=now)
        scan = scan_trail(_records(trail), since=since, until=until)
    chosen = {k.key_id for k in keys}
    deleted = [d for d in scan.deleted if key_ids is None or d["keyId"] in chosen]
    key_sections = [context.key_section(k, last_used=scan.last_used.get(k.key_id)) for k in keys]
    verdicts: dict[str, int] = {}
    for section in key_sections:
        verdict = section["custody"]["verdict"]
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    integrity = context.integrity_section(deployment)
    return {
        "formatVersion": FORMAT_VERSION,
        "reportId": str(uuid.uuid4()),
        "generatedAt": iso(now),
        "generator": {"product": "hsmkms", "version": __version__},
        "account": {"accountId": context.account_id, "region": context.region},
        "period": {"since": iso(since), "until": iso(until)},
        "scope": {"keyIds": None if key_ids is None else sorted(chosen)},
        "deployment": {
            "dataDirectory": deployment.data_dir,
            "database": deployment.database,
            "auditDatabase": deployment.audit_database,
            "keyStores": context.key_stores_section(),
        },
        "auditTrail": audit_section(verified),
        "integrity": integrity,
        "principals": [
            {
                "arn": p.arn,
                "name": p.name,
                "sources": list(p.sources),
                "hasIdentityPolicy": p.identity_policy is not None,
            }
            for p in context.principals.values()
        ],
        "keys": key_sections,
        "deletedKeys": deleted,
        "summary": {
            "keys": len(key_sections),
            "byVerdict": dict(sorted(verdicts.items())),
            "rotationOverdue": sum(1 for s in key_sections if s["rotation"]["status"] == "OVERDUE"),
            "deletedKeys": len(deleted),
            "auditTrailIntact": verified.ok,
            "integrityOk": integrity["ok"],
        },
    }
