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

Only the attributes an entry gives are compared with an existing key (``spec`` and ``usage``
always): a CI job may rotate or tag a seeded key without breaking the next start, unless the
seed file declares that attribute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hmac
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel

from hsmkms.errors import KMSError
from hsmkms.identity import ROOT_NAME, CredentialInfo, check_credential
from hsmkms.models import (
    CreateAliasRequest,
    DisableKeyRequest,
    EnableKeyRotationRequest,
    OperatorCreateKeyRequest,
    Tag,
)
from hsmkms.models.enums import KeySpec, KeyState, KeyUsage
from hsmkms.seed.document import (
    CredentialEntry,
    KeyEntry,
    SeedDocument,
    SeedError,
    policy_text,
    policy_value,
)
from hsmkms.service import OPERATIONS, KmsService
from hsmkms.store import DELETING, KeyRecord
from hsmkms.system import OperatorService, System

__all__ = ["SeedPlan", "SeedReport", "Step", "apply_seed", "plan_seed"]

SEED_LOCK = ".seed.lock"
"""Held in the data directory while a seed file is planned and applied."""

DEFAULT_USAGE = KeyUsage.ENCRYPT_DECRYPT.value
"""CreateKey's KeyUsage when a request gives none (AWS's default)."""


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


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    """What applying a seed file would do: its steps, in order, and the entries found as
    declared."""

    source: str
    steps: tuple[Step, ...]
    unchanged: tuple[str, ...]

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


class _Planner:
    def __init__(self, document: SeedDocument, directory: _Directory) -> None:
        self.document = document
        self.directory = directory
        self.steps: list[Step] = []
        self.unchanged: list[str] = []

    def conflict(self, label: str, message: str) -> SeedError:
        return self.document.error(f"{label}: {message}; the data directory is left unchanged")

    # -- keys ---------------------------------------------------------------------------------

    def key(self, index: int, entry: KeyEntry) -> None:
        document, label = self.document, entry.label(index)
        if entry.custom_key_store is not None:
            raise document.error(
                f"{label}: custom_key_store: custom key stores are not available in this hsmkms"
            )
        spec = _enum(document, label, "spec", entry.spec, [s.value for s in KeySpec])
        usage = _enum(
            document, label, "usage", entry.usage or DEFAULT_USAGE, [u.value for u in KeyUsage]
        )
        policy = policy_text(entry.policy)
        # Every request the entry implies is checked first, whether or not the key exists.
        key_id = entry.id or str(uuid.uuid4())
        create = OperatorCreateKeyRequest(
            KeyId=key_id,
            Description=entry.description,
            KeySpec=KeySpec(spec),
            KeyUsage=KeyUsage(usage),
            Policy=policy,
            Tags=[Tag(TagKey=k, TagValue=v) for k, v in (entry.tags or {}).items()],
        )
        _checked(document, label, "CreateKey", create)
        rotation: EnableKeyRotationRequest | None = None
        if entry.rotation is not None and entry.rotation.enabled:
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
            self._create_key(label, entry, create, rotation)
            return
        self._compare(label, entry, existing, spec, usage, policy)
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

    def _create_key(
        self,
        label: str,
        entry: KeyEntry,
        create: OperatorCreateKeyRequest,
        rotation: EnableKeyRotationRequest | None,
    ) -> None:
        key_id = create.KeyId
        if entry.id is None and self.directory.key(key_id) is not None:  # pragma: no cover
            raise self.conflict(label, f"the new key id {key_id} exists")
        self.steps.append(
            Step(label, f"create key {key_id} ({create.KeySpec})", "CreateKey", create)
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
    if document.custom_key_stores:
        raise document.error(
            f"{document.custom_key_stores[0].label(0)}: custom key stores are not available in "
            "this hsmkms"
        )
    planner = _Planner(document, _Directory(system))
    for index, key in enumerate(document.keys):
        planner.key(index, key)
    for index, credential in enumerate(document.credentials):
        planner.credential(index, credential)
    return SeedPlan(document.source, tuple(planner.steps), tuple(planner.unchanged))


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


def _apply(document: SeedDocument, system: System, plan: SeedPlan) -> SeedReport:
    operator = OperatorService(system, command="seed")
    applied: list[str] = []
    for step in plan.steps:
        try:
            if step.operation is not None and step.request is not None:
                operator.invoke(step.operation, step.request)
            elif step.credential is not None:
                system.credentials.create(
                    step.credential.name,
                    step.policy,
                    access_key_id=step.credential.access_key_id,
                    secret=step.secret,
                )
        except KMSError as exc:
            done = f" (after {len(applied)} change(s))" if applied else ""
            raise document.error(
                f"{step.entry}: {step.action} failed: {exc.message or exc.code}{done}"
            ) from None
        applied.append(f"{step.entry}: {step.action}")
    return SeedReport(plan.source, tuple(applied), plan.unchanged)
