"""The seed file: its schema, reading it from YAML, and the checks that need no data directory.

A seed file declares keys (with their aliases), credentials and custom key stores that a data
directory must hold (``docs/seed-file.md`` is the user's view)::

    version: 1
    keys:
      - id: 6f1d5c9e-8a7b-4c3d-9e2f-0a1b2c3d4e5f   # optional: a fixed key id
        aliases: [alias/app-key]
        description: the application's data key
        spec: SYMMETRIC_DEFAULT                    # KeySpec; default SYMMETRIC_DEFAULT
        usage: ENCRYPT_DECRYPT                     # KeyUsage; default ENCRYPT_DECRYPT
        policy: {...}                              # key policy (a mapping, or JSON text)
        tags: {team: payments}
        rotation: {enabled: true, period_days: 90}
        enabled: true
    credentials:
      - name: app
        access_key_id: AKIAAPPEXAMPLE000001
        secret_access_key_env: APP_SECRET          # or secret_access_key / _file
        policy: {...}                              # identity policy
    custom_key_stores:
      - name: second-token                       # CreateCustomKeyStore's members
        cluster_id: cluster-seedoneaaaaa         # (AWS_CLOUDHSM, or EXTERNAL_KEY_STORE with
        trust_anchor_certificate_file: t.pem     # xks_proxy_*); secrets from the environment
        key_store_password_env: SECOND_TOKEN_PIN # or a file only

Keys name a store with ``custom_key_store`` (and ``xks_key_id`` in an external one).

Reading is strict: unknown fields, duplicate mapping keys, YAML aliases and wrongly typed
values (``tags: {build: 42}`` without quotes) are errors naming the entry, and no check here
reads a data directory (:mod:`hsmkms.seed.plan` does that). A secret given in the file shows in
no ``repr``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from hsmkms.errors import ClientError

__all__ = [
    "MAX_SEED_BYTES",
    "MIN_SECRET_LENGTH",
    "SEED_VERSION",
    "CredentialEntry",
    "CustomKeyStoreEntry",
    "KeyEntry",
    "RotationEntry",
    "SeedDocument",
    "SeedError",
    "load_seed",
    "parse_seed",
]

SEED_VERSION = 1
MAX_SEED_BYTES = 4 * 1024 * 1024
MIN_SECRET_LENGTH = 20
"""A seeded credential's secret must have at least this many characters (AWS's are 40)."""


class SeedError(ClientError):
    """The seed file cannot be applied: unreadable, invalid, or in conflict with the data
    directory. The message is one line naming the file and the entry; it never contains a
    secret."""

    code = "ValidationException"


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PolicyValue = dict[str, Any] | StrictStr
"""A policy document: a mapping (written as YAML or JSON) or its JSON text."""


def policy_text(value: PolicyValue | None) -> str | None:
    """The policy as the service stores it: JSON text (a mapping is serialized, indented)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, indent=2)


def policy_value(text: str) -> Any:
    """A stored policy's JSON value (for comparison and export); the text itself when it does
    not parse."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class RotationEntry(_Entry):
    """Automatic rotation: ``enabled`` (default true) and ``period_days`` (90-2560; the
    service's default 365 when absent)."""

    enabled: StrictBool = True
    period_days: StrictInt | None = None


class KeyEntry(_Entry):
    """One KMS key. Found again at the next start by ``id``, else by its first alias that
    exists; only the attributes given are compared with an existing key (``spec`` and
    ``usage`` always)."""

    id: StrictStr | None = None
    aliases: list[StrictStr] = Field(default_factory=list)
    description: StrictStr | None = None
    spec: StrictStr = "SYMMETRIC_DEFAULT"
    usage: StrictStr | None = None
    policy: PolicyValue | None = None
    tags: dict[StrictStr, StrictStr] | None = None
    rotation: RotationEntry | None = None
    enabled: StrictBool | None = None
    custom_key_store: StrictStr | None = None
    xks_key_id: StrictStr | None = None

    @field_validator("id")
    @classmethod
    def _key_id(cls, value: str | None) -> str | None:
        if value is not None and not _is_key_id(value):
            raise ValueError(
                "must be a key id: a UUID in lower case, such as "
                "1234abcd-12ab-34cd-56ef-1234567890ab"
            )
        return value

    def label(self, index: int) -> str:
        """How messages name this entry: ``keys[2] (alias/app-key)``."""
        return f"keys[{index}] ({self.id or (self.aliases[0] if self.aliases else 'no id')})"


class CredentialEntry(_Entry):
    """An IAM-user-like access key with an optional identity policy. The secret comes from
    exactly one of ``secret_access_key``, ``secret_access_key_env`` (an environment variable of
    the process applying the seed) or ``secret_access_key_file`` (relative to the seed file);
    it may be omitted when the credential exists already (it is then not compared)."""

    name: StrictStr
    access_key_id: StrictStr
    secret_access_key: SecretStr | None = None
    secret_access_key_env: StrictStr | None = None
    secret_access_key_file: StrictStr | None = None
    policy: PolicyValue | None = None

    @field_validator("secret_access_key", mode="before")
    @classmethod
    def _strict_secret(cls, value: object) -> object:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string (quote it)")
        return value

    def label(self, index: int) -> str:
        return f"credentials[{index}] ({self.name})"

    def secret_sources(self) -> list[str]:
        return [
            name
            for name in ("secret_access_key", "secret_access_key_env", "secret_access_key_file")
            if getattr(self, name) is not None
        ]


class CustomKeyStoreEntry(_Entry):
    """A custom key store, in the members of AWS's CreateCustomKeyStore (snake case). Secrets
    (the token's user PIN, the XKS proxy's secret) come from an environment variable or a
    file, never from the seed file; they may be left out for a store that exists (then they
    are not compared)."""

    name: StrictStr
    type: Literal["AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"] = "AWS_CLOUDHSM"
    cluster_id: StrictStr | None = None
    trust_anchor_certificate: StrictStr | None = None
    trust_anchor_certificate_file: StrictStr | None = None
    key_store_password_env: StrictStr | None = None
    key_store_password_file: StrictStr | None = None
    xks_proxy_uri_endpoint: StrictStr | None = None
    xks_proxy_uri_path: StrictStr | None = None
    xks_proxy_connectivity: Literal["PUBLIC_ENDPOINT", "VPC_ENDPOINT_SERVICE"] | None = None
    xks_proxy_vpc_endpoint_service_name: StrictStr | None = None
    xks_proxy_access_key_id: StrictStr | None = None
    xks_proxy_secret_access_key_env: StrictStr | None = None
    xks_proxy_secret_access_key_file: StrictStr | None = None

    def label(self, index: int) -> str:
        return f"custom_key_stores[{index}] ({self.name})"

    @property
    def external(self) -> bool:
        return self.type == "EXTERNAL_KEY_STORE"

    def secret_sources(self) -> list[str]:
        """The fields giving this store's secret (the password, or the proxy's secret)."""
        names = (
            ("xks_proxy_secret_access_key_env", "xks_proxy_secret_access_key_file")
            if self.external
            else ("key_store_password_env", "key_store_password_file")
        )
        return [name for name in names if getattr(self, name) is not None]


class SeedDocument(_Entry):
    """A whole seed file, parsed and checked on its own (not yet against a data directory).
    ``source`` names the file in messages; ``base_dir`` is where relative paths start."""

    version: Literal[1]
    keys: list[KeyEntry] = Field(default_factory=list)
    credentials: list[CredentialEntry] = Field(default_factory=list)
    custom_key_stores: list[CustomKeyStoreEntry] = Field(default_factory=list)
    _source: str = PrivateAttr(default="<seed>")
    _base_dir: Path = PrivateAttr(default=Path("."))

    @property
    def source(self) -> str:
        """The file, as messages name it."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """Where the file's relative paths start (its directory)."""
        return self._base_dir

    def error(self, message: str) -> SeedError:
        """A :class:`SeedError` naming this file."""
        return SeedError(f"seed file {self.source}: {message}")

    def read_secret(self, entry: CredentialEntry, index: int) -> str | None:
        """The secret of a credential entry from its source, or None when it gives none.
        A named variable that is unset, a missing file or a short secret is an error naming
        the entry (never the secret)."""
        label = entry.label(index)
        secret: str | None = None
        if entry.secret_access_key is not None:
            secret = entry.secret_access_key.get_secret_value()
        elif entry.secret_access_key_env is not None:
            secret = os.environ.get(entry.secret_access_key_env)
            if not secret:
                raise self.error(
                    f"{label}: environment variable {entry.secret_access_key_env} "
                    "(secret_access_key_env) is not set"
                )
        elif entry.secret_access_key_file is not None:
            path = self.base_dir / entry.secret_access_key_file
            try:
                secret = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise self.error(
                    f"{label}: secret_access_key_file {path} cannot be read ({reason})"
                ) from None
        if secret is not None and not MIN_SECRET_LENGTH <= len(secret) <= 128:
            raise self.error(
                f"{label}: the secret access key must be {MIN_SECRET_LENGTH}-128 characters "
                f"(it has {len(secret)})"
            )
        return secret

    def read_store_secret(self, entry: CustomKeyStoreEntry, index: int) -> str | None:
        """A custom key store's secret (its password, or its proxy's secret access key) from
        the environment variable or file the entry names; None when it names none. An unset
        variable or an unreadable file is an error naming the entry (never the secret)."""
        label = entry.label(index)
        sources = entry.secret_sources()
        if not sources:
            return None
        field = sources[0]
        value = getattr(entry, field)
        if field.endswith("_env"):
            secret = os.environ.get(value)
            if not secret:
                raise self.error(f"{label}: environment variable {value} ({field}) is not set")
            return secret
        return self._read_file(label, field, value).rstrip("\r\n")

    def read_trust_anchor(self, entry: CustomKeyStoreEntry, index: int) -> str | None:
        """The store's trust anchor, given inline or as a file; None when neither is given."""
        if entry.trust_anchor_certificate is not None:
            return entry.trust_anchor_certificate
        if entry.trust_anchor_certificate_file is None:
            return None
        return self._read_file(
            entry.label(index), "trust_anchor_certificate_file", entry.trust_anchor_certificate_file
        )

    def _read_file(self, label: str, field: str, name: str) -> str:
        path = self.base_dir / name
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise self.error(f"{label}: {field} {path} cannot be read ({reason})") from None


# -- reading --------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing what would hide a mistake: a key given twice in one
    mapping (PyYAML keeps the last silently) and aliases (``*name``, also ``<<`` merges)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"not valid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _location(loc: tuple[int | str, ...], raw: Any) -> str:
    """``keys[2].rotation.period_days`` for a pydantic location, with the entry's name."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    if len(loc) >= 2 and isinstance(loc[1], int) and isinstance(raw, dict):
        entries = raw.get(loc[0])
        if isinstance(entries, list) and loc[1] < len(entries):
            name = _entry_name(entries[loc[1]])
            if name:
                head = f"{loc[0]}[{loc[1]}]"
                text = f"{head} ({name}){text[len(head) :]}"
    return text


def _entry_name(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    for field in ("id", "name"):
        if isinstance(entry.get(field), str):
            return str(entry[field])
    aliases = entry.get("aliases")
    if isinstance(aliases, list) and aliases and isinstance(aliases[0], str):
        return str(aliases[0])
    return None


_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required",
    "string_type": "must be a string (quote values such as 42, true or 2024-01-01)",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
}


def parse_seed(text: str, *, source: str = "<seed>", base_dir: Path | None = None) -> SeedDocument:
    """Parse and check a seed file's text: YAML, the schema, and every rule that needs no data
    directory (duplicates, references, secret sources). Raises :class:`SeedError`."""
    where = f"seed file {source}"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SEED_BYTES:
        raise SeedError(f"{where}: larger than {MAX_SEED_BYTES // (1024 * 1024)} MiB")
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise SeedError(f"{where}: {_yaml_error(exc)}") from None
    if not isinstance(raw, dict):
        raise SeedError(f"{where}: must be a mapping with 'version: {SEED_VERSION}' and keys, ...")
    if raw.get("version") != SEED_VERSION:
        raise SeedError(
            f"{where}: 'version: {SEED_VERSION}' is required (this hsmkms reads seed files of "
            f"version {SEED_VERSION})"
        )
    try:
        document = SeedDocument.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        message = _MESSAGES.get(first["type"]) or str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SeedError(f"{where}: {_location(first['loc'], raw)}: {message}{more}") from None
    document._source = source
    document._base_dir = base_dir or Path(".")
    _check_document(document)
    return document


def load_seed(path: Path) -> SeedDocument:
    """Read and check the seed file at ``path`` (:func:`parse_seed`). Raises
    :class:`SeedError` naming the file when it cannot be read."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SEED_BYTES + 1)
    except OSError as exc:
        raise SeedError(f"seed file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SEED_BYTES:
        raise SeedError(f"seed file {path}: larger than {MAX_SEED_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SeedError(f"seed file {path}: not UTF-8 text") from None
    return parse_seed(text, source=str(path), base_dir=path.parent)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_key_id(value: str) -> bool:
    if not _UUID.fullmatch(value):
        return False
    try:
        uuid.UUID(value)
    except ValueError:  # pragma: no cover - the pattern admits only valid UUID text
        return False
    return True


def _check_document(document: SeedDocument) -> None:
    """The rules between entries: nothing declared twice, every key findable again, every
    reference resolvable, one secret source per credential."""
    key_ids: dict[str, str] = {}
    alias_owner: dict[str, str] = {}
    store_types = {store.name: store.type for store in document.custom_key_stores}
    for index, key in enumerate(document.keys):
        label = key.label(index)
        if key.id is None and not key.aliases:
            raise document.error(
                f"{label}: give an id or an alias, so that the key is found again at the next "
                "start instead of created once more"
            )
        if key.id is not None:
            if key.id in key_ids:
                raise document.error(f"{label}: key id {key.id} is also {key_ids[key.id]}")
            key_ids[key.id] = label
        for alias in key.aliases:
            if alias in alias_owner:
                raise document.error(f"{label}: {alias} is also declared by {alias_owner[alias]}")
            alias_owner[alias] = label
        if (
            key.custom_key_store is not None
            and key.custom_key_store not in store_types
            and not key.custom_key_store.startswith("cks-")
        ):
            raise document.error(
                f"{label}: custom_key_store {key.custom_key_store!r} names no entry of "
                "custom_key_stores (nor a custom key store id cks-...)"
            )
        if key.xks_key_id is not None and key.custom_key_store is None:
            raise document.error(
                f"{label}: xks_key_id is given for a key in an external key store: give its "
                "custom_key_store too"
            )
        store_type = store_types.get(key.custom_key_store or "")
        if store_type == "EXTERNAL_KEY_STORE" and key.xks_key_id is None:
            raise document.error(
                f"{label}: a key in the external key store {key.custom_key_store!r} needs "
                "xks_key_id (the proxy's key, AWS's XksKeyId)"
            )
        if store_type == "AWS_CLOUDHSM" and key.xks_key_id is not None:
            raise document.error(
                f"{label}: xks_key_id is only for keys in an EXTERNAL_KEY_STORE; "
                f"{key.custom_key_store!r} is an AWS_CLOUDHSM store"
            )
    names: dict[str, str] = {}
    access_keys: dict[str, str] = {}
    for index, credential in enumerate(document.credentials):
        label = credential.label(index)
        if credential.name in names:
            raise document.error(f"{label}: the name is also {names[credential.name]}")
        names[credential.name] = label
        if credential.access_key_id in access_keys:
            raise document.error(
                f"{label}: access key id {credential.access_key_id} is also "
                f"{access_keys[credential.access_key_id]}"
            )
        access_keys[credential.access_key_id] = label
        sources = credential.secret_sources()
        if len(sources) > 1:
            raise document.error(f"{label}: give one of {', '.join(sources)}, not several")
    seen_stores: dict[str, str] = {}
    places: dict[str, str] = {}
    for index, store in enumerate(document.custom_key_stores):
        label = store.label(index)
        if store.name in seen_stores:
            raise document.error(f"{label}: the name is also {seen_stores[store.name]}")
        seen_stores[store.name] = label
        _check_store(document, label, store)
        place = (
            f"the proxy {store.xks_proxy_uri_endpoint}{store.xks_proxy_uri_path}"
            if store.external
            else f"cluster_id {store.cluster_id}"
        )
        if place in places:
            raise document.error(f"{label}: {place} is also {places[place]}")
        places[place] = label


_CLOUDHSM_FIELDS = (
    "cluster_id",
    "trust_anchor_certificate",
    "trust_anchor_certificate_file",
    "key_store_password_env",
    "key_store_password_file",
)
_XKS_FIELDS = (
    "xks_proxy_uri_endpoint",
    "xks_proxy_uri_path",
    "xks_proxy_connectivity",
    "xks_proxy_vpc_endpoint_service_name",
    "xks_proxy_access_key_id",
    "xks_proxy_secret_access_key_env",
    "xks_proxy_secret_access_key_file",
)


def _check_store(document: SeedDocument, label: str, store: CustomKeyStoreEntry) -> None:
    """A store entry gives the members of its type (and none of the other's), and at most one
    source of each value."""
    required, foreign = (
        (
            ("xks_proxy_uri_endpoint", "xks_proxy_uri_path", "xks_proxy_access_key_id"),
            _CLOUDHSM_FIELDS,
        )
        if store.external
        else (("cluster_id",), _XKS_FIELDS)
    )
    for name in foreign:
        if getattr(store, name) is not None:
            raise document.error(f"{label}.{name}: not a field of a store of type {store.type}")
    for name in required:
        if getattr(store, name) is None:
            raise document.error(f"{label}.{name}: required for a store of type {store.type}")
    sources = store.secret_sources()
    if len(sources) > 1:
        raise document.error(f"{label}: give one of {', '.join(sources)}, not several")
    if store.trust_anchor_certificate is not None and store.trust_anchor_certificate_file:
        raise document.error(
            f"{label}: give one of trust_anchor_certificate, trust_anchor_certificate_file, "
            "not both"
        )
