"""Settings, PIN sources, and their resolution, with an RFC 7512 PKCS#11 URI
(:mod:`hsmkms.pkcs11_uri`, whose names this module re-exports), into a KeystoreConfig.

Everything an operator configures arrives here: environment variables (prefix ``HSMKMS_``)
become :class:`Settings`; :func:`keystore_config` resolves the settings, the optional PKCS#11
URI and the embedded SoftHSM2 default into the :class:`~hsmkms.keystore.config.KeystoreConfig`
the keystore opens. ``docs/configuration.md`` is the operator's view of the same rules.

Precedence, highest first (explicit settings always beat the URI):

* module:  ``HSMKMS_MODULE_PATH`` > URI ``module-path`` > URI ``module-name`` (searched in
  :data:`MODULE_SEARCH_DIRS`) > the embedded SoftHSM2 module (only when neither
  ``HSMKMS_PKCS11_URI`` nor ``HSMKMS_MODULE_PATH`` is set)
* token:   ``HSMKMS_TOKEN_LABEL`` > URI ``token`` > ``hsmkms`` (embedded only); likewise
  ``HSMKMS_TOKEN_SERIAL`` > URI ``serial`` and ``HSMKMS_SLOT_ID`` > URI ``slot-id``
* PIN:     ``HSMKMS_PIN_FILE`` > ``HSMKMS_PIN_ENV`` > URI ``pin-source`` > URI ``pin-value`` >
  ``<data_dir>/user.pin`` (embedded only). Never from the command line.

Security contract: a PIN never appears in an exception message, a ``repr`` or ``str`` of any
object defined here (:class:`Pkcs11Uri`, :class:`PinSource`, :class:`Settings`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import re
import stat
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hsmkms import log, softhsm
from hsmkms.errors import ConfigError
from hsmkms.keystore.config import KeyPlacement, KeystoreConfig
from hsmkms.pkcs11_uri import (
    CK_ULONG_MAX,
    OBJECT_TYPES,
    Pkcs11Uri,
    format_pkcs11_uri,
    parse_pkcs11_uri,
    pin_source_path,
    redact_pkcs11_uri,
)
from hsmkms.profiles import MechanismProfile

__all__ = [
    "EMBEDDED_TOKEN_LABEL",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MODULE_SEARCH_DIRS",
    "OBJECT_TYPES",
    "SOFTHSM2_MODULE_CANDIDATES",
    "ConfigError",
    "PinSource",
    "Pkcs11Uri",
    "ServeSettings",
    "Settings",
    "cluster_keystore_config",
    "embedded_module_path",
    "find_module_by_name",
    "format_pkcs11_uri",
    "keystore_config",
    "parse_pkcs11_uri",
    "pin_file_is_private",
    "read_pin",
    "redact_pkcs11_uri",
    "resolve_pin_source",
]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

EMBEDDED_TOKEN_LABEL = softhsm.DEFAULT_LABEL
_MAX_PIN_FILE_BYTES = 4096
_ENV_PREFIX = "HSMKMS_"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REGION = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
_ACCOUNT_ID = re.compile(r"[0-9]{12}")


class _EnvironmentSettings(BaseSettings):
    """Settings read from constructor arguments and the environment only: no ``.env`` file,
    no secrets directory."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)


class Settings(_EnvironmentSettings):
    """hsmkms settings, read from ``HSMKMS_*`` environment variables (no ``.env`` file).

    An empty variable counts as unset. ``data_dir`` is made absolute at load time. Prefer
    :meth:`load`, which turns validation failures into :class:`ConfigError`. The ``repr``
    redacts a ``pin-value`` inside ``pkcs11_uri``.
    """

    model_config = SettingsConfigDict(
        env_prefix=_ENV_PREFIX,
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # pkcs11_uri may carry a pin-value
    )

    data_dir: Path = Path(".hsmkms")
    pkcs11_uri: str | None = None
    module_path: str | None = None
    token_label: str | None = None
    token_serial: str | None = None
    slot_id: int | None = None
    pin_file: Path | None = None
    pin_env: str | None = None
    profile: Literal["auto", "AES_256_GCM", "AES_256_CBC_HMAC_SHA_256"] = "auto"
    key_placement: Literal["token", "wrapped"] = "token"
    """Where new symmetric and HMAC key versions live: ``token`` (one token object each) or
    ``wrapped`` (wrapped under the token's KEK, in the database; ``docs/keystore.md``)."""
    unwrapped_keys: int = Field(default=1024, ge=1, le=10_000_000)
    """How many wrapped key versions each process keeps unwrapped in the token (session
    objects; the least recently used one beyond is destroyed, and unwrapped again on its next
    use): ``docs/keystore.md``, "Many keys"."""
    region: str = "us-east-1"
    account_id: str = "111122223333"
    database_url: str | None = None
    unauthenticated_audit_interval: float = 60.0
    allow_weak_root_secret: bool = False
    refuse_replays: bool = False
    """Refuse a second request with the signature of a state-changing request this node
    accepted (``docs/authentication.md``, "Replays"): off by default, because the AWS SDKs
    sign two identical calls made within one second identically."""
    xks_allow_http: bool = False
    """Accept ``http://`` XKS proxy endpoints for external key stores (HSMKMS_XKS_ALLOW_HTTP;
    AWS accepts only https)."""
    xks_ca_bundle: Path | None = None
    """PEM file of the CAs an XKS proxy's certificate is verified against
    (HSMKMS_XKS_CA_BUNDLE); the system's CAs when unset."""
    xks_timeout: float = Field(default=0.25, gt=0, le=10)
    """Seconds a call to an external key store's XKS proxy (GetKeyMetadata, Encrypt, Decrypt)
    may take (HSMKMS_XKS_TIMEOUT); AWS KMS gives up after 250 ms."""
    audit_seal_interval: float = Field(default=10.0, gt=0, le=3600)
    """Seconds between a server writer session's seals (its heartbeat; a session silent for
    twice this long has stopped without a clean shutdown)."""

    @classmethod
    def load(cls, data_dir: Path | None = None) -> Settings:
        """Read the settings from the environment; ``data_dir`` overrides ``HSMKMS_DATA_DIR``.

        Raises :class:`ConfigError` with a one-line message naming the variable at fault.
        """
        try:
            return cls() if data_dir is None else cls(data_dir=data_dir)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from exc

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("pkcs11_uri")
    @classmethod
    def _valid_uri(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_pkcs11_uri(value)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("slot_id")
    @classmethod
    def _valid_slot_id(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= CK_ULONG_MAX:
            raise ValueError("must be a slot number from 0 to 2^64-1")
        return value

    @field_validator("pin_env")
    @classmethod
    def _valid_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable")
        return value

    @field_validator("region")
    @classmethod
    def _valid_region(cls, value: str) -> str:
        if len(value) > 32 or not _REGION.fullmatch(value):
            raise ValueError("must look like an AWS region name, such as us-east-1")
        return value

    @field_validator("unauthenticated_audit_interval")
    @classmethod
    def _positive_interval(cls, value: float) -> float:
        if not 0.1 <= value <= 86_400:
            raise ValueError("must be a number of seconds from 0.1 to 86400")
        return value

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str | None) -> str | None:
        # Messages never repeat the URL: it may carry a password.
        if value is None:
            return None
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL (sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)"
            ) from None
        backend, driver = url.get_backend_name(), url.get_driver_name()
        if backend == "postgresql":
            if driver != "psycopg":
                raise ValueError("PostgreSQL is reached through psycopg 3: postgresql+psycopg://")
            if importlib.util.find_spec("psycopg") is None:
                raise ValueError("PostgreSQL needs psycopg: pip install 'hsmkms[postgresql]'")
        elif backend != "sqlite":
            raise ValueError("must be a SQLite or PostgreSQL URL")
        return value

    @field_validator("account_id")
    @classmethod
    def _valid_account_id(cls, value: str) -> str:
        if not _ACCOUNT_ID.fullmatch(value):
            raise ValueError("must be exactly 12 digits")
        return value

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "pkcs11_uri" and isinstance(value, str):
                yield name, redact_pkcs11_uri(value)
            else:
                yield name, value

    @property
    def is_embedded(self) -> bool:
        """True when neither a PKCS#11 URI nor a module path is set: use the SoftHSM2 default."""
        return self.pkcs11_uri is None and self.module_path is None

    @property
    def parsed_uri(self) -> Pkcs11Uri | None:
        """``pkcs11_uri`` parsed, or ``None`` when unset."""
        return None if self.pkcs11_uri is None else parse_pkcs11_uri(self.pkcs11_uri)

    @property
    def softhsm2_conf(self) -> Path:
        """The SoftHSM2 config file of the embedded default."""
        return self.data_dir / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        """The SoftHSM2 token directory of the embedded default."""
        return self.data_dir / "tokens"

    @property
    def user_pin_file(self) -> Path:
        """The user PIN file of the embedded default (owner-only)."""
        return self.data_dir / "user.pin"

    @property
    def so_pin_file(self) -> Path:
        """The security-officer PIN file of the embedded default (owner-only)."""
        return self.data_dir / "so.pin"

    @property
    def sqlite_url(self) -> str:
        """SQLAlchemy URL of the default SQLite database, ``<data_dir>/hsmkms.db``."""
        return f"sqlite:///{(self.data_dir / 'hsmkms.db').as_posix()}"

    @property
    def effective_database_url(self) -> str:
        """``database_url`` if set, else :attr:`sqlite_url`."""
        return self.database_url if self.database_url is not None else self.sqlite_url

    @property
    def audit_database_url(self) -> str:
        """Where the audit trail lives: ``database_url`` if set, else its own SQLite file
        ``<data_dir>/audit.db``. A separate file keeps the trail's frequent commits from
        making the metadata and credential caches read their change counter (which they do
        whenever SQLite's per-file ``data_version`` moves), and lets the trail be shipped on
        its own."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'audit.db').as_posix()}"


# Defined with the logging set-up, which the command line reads without this module.
LOG_LEVELS, LOG_FORMATS = log.LOG_LEVELS, log.LOG_FORMATS


class ServeSettings(_EnvironmentSettings):
    """The settings of ``hsmkms serve`` that may come from the environment — for containers and
    systemd units, which configure a service that way: ``HSMKMS_HOST``, ``HSMKMS_PORT``,
    ``HSMKMS_WORKERS``, ``HSMKMS_TLS_CERT``, ``HSMKMS_TLS_KEY``, ``HSMKMS_TASK_INTERVAL``,
    ``HSMKMS_CONSOLE``. A command-line option wins over its variable. Read by ``serve`` only,
    so that a bad value stops the server, not every other command."""

    model_config = SettingsConfigDict(
        env_prefix=_ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    task_interval: float = 60.0
    console: bool = False

    @classmethod
    def load(cls) -> ServeSettings:
        """From the environment; :class:`ConfigError` naming the variable at fault."""
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from exc

    @field_validator("port")
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError("must be a port number from 0 to 65535")
        return value

    @field_validator("workers")
    @classmethod
    def _valid_workers(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 1024:
            raise ValueError("must be a number of worker processes from 1 to 1024")
        return value

    @field_validator("task_interval")
    @classmethod
    def _valid_interval(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError("must be a number of seconds, 0 or more")
        return value


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:  # pragma: no cover - pydantic always reports at least one
        return "invalid settings"
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    where = f"{_ENV_PREFIX}{field.upper()}" if field else "settings"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid {where}: {message}{more}"


# --------------------------------------------------------------------------------------------
# PINs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PinSource:
    """Where the user PIN comes from. ``value`` (only for ``kind="value"``) never shows.

    ``location`` is the file path, the variable name, or ``"pin-value"``; ``origin`` says which
    setting chose it (for messages and ``hsmkms doctor``).
    """

    kind: Literal["file", "env", "value"]
    location: str
    origin: str
    value: str | None = dataclasses.field(default=None, repr=False)


def resolve_pin_source(settings: Settings) -> PinSource:
    """Choose the PIN source by precedence: ``pin_file`` > ``pin_env`` > URI ``pin-source`` >
    URI ``pin-value`` > ``<data_dir>/user.pin`` (embedded default only).

    Raises :class:`ConfigError` when no source applies.
    """
    if settings.pin_file is not None:
        return PinSource("file", str(settings.pin_file), f"{_ENV_PREFIX}PIN_FILE")
    if settings.pin_env is not None:
        return PinSource("env", settings.pin_env, f"{_ENV_PREFIX}PIN_ENV")
    uri = settings.parsed_uri
    if uri is not None and uri.pin_source is not None:
        path = pin_source_path(uri.pin_source)
        return PinSource("file", str(path), "pin-source in HSMKMS_PKCS11_URI")
    if uri is not None and uri.pin_value is not None:
        return PinSource("value", "pin-value", "pin-value in HSMKMS_PKCS11_URI", uri.pin_value)
    if settings.is_embedded:
        return PinSource("file", str(settings.user_pin_file), "embedded default")
    raise ConfigError(
        "no PIN source: set HSMKMS_PIN_FILE or HSMKMS_PIN_ENV, "
        "or add pin-source=file:/path to the PKCS#11 URI"
    )


def read_pin(source: PinSource) -> str:
    """Read the PIN from ``source``. One trailing newline (``\\n`` or ``\\r\\n``) is stripped
    from a file. Missing, unreadable, oversized or empty sources raise :class:`ConfigError`
    naming the file or variable, never the PIN. File permissions are not enforced here; see
    :func:`pin_file_is_private`.
    """
    if source.kind == "value":
        if not source.value:
            raise ConfigError(f"the PIN from {source.origin} is empty")
        return source.value
    if source.kind == "env":
        pin = os.environ.get(source.location)
        if pin is None:
            raise ConfigError(
                f"environment variable {source.location} (named by {source.origin}) is not set"
            )
        if not pin:
            raise ConfigError(f"environment variable {source.location} is empty")
        return pin
    return _read_pin_file(Path(source.location), source.origin)


def _read_pin_file(path: Path, origin: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_PIN_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"PIN file {path} (from {origin}) does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"PIN file {path} (from {origin}) is a directory") from None
    except PermissionError:
        raise ConfigError(f"PIN file {path} (from {origin}) is not readable") from None
    except OSError as exc:
        raise ConfigError(f"PIN file {path} cannot be read: {exc.strerror}") from None
    if len(data) > _MAX_PIN_FILE_BYTES:
        raise ConfigError(f"PIN file {path} is larger than {_MAX_PIN_FILE_BYTES} bytes")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ConfigError(f"PIN file {path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"PIN file {path} is not valid UTF-8") from None


def pin_file_is_private(path: Path) -> bool:
    """True when ``path`` grants no permission to group or others (mode ``0o600`` or tighter).

    A PIN file open to others still works; ``hsmkms doctor`` uses this to warn. Raises
    :class:`ConfigError` when the file cannot be examined.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"PIN file {path} cannot be examined: {exc.strerror}") from None
    return stat.S_IMODE(mode) & 0o077 == 0


# --------------------------------------------------------------------------------------------
# Module discovery and resolution into a KeystoreConfig
# --------------------------------------------------------------------------------------------


def _multiarch_triplets() -> tuple[str, ...]:
    detected = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    return tuple(dict.fromkeys((str(detected), "x86_64-linux-gnu")))


_TRIPLETS = _multiarch_triplets()

MODULE_SEARCH_DIRS: tuple[Path, ...] = (
    Path("/usr/lib"),
    *(Path("/usr/lib") / t for t in _TRIPLETS),
    *(Path("/usr/lib") / t / "pkcs11" for t in _TRIPLETS),
    Path("/usr/lib/pkcs11"),
    Path("/usr/lib/softhsm"),
    *(Path("/usr/lib") / t / "softhsm" for t in _TRIPLETS),
    Path("/usr/local/lib"),
)
"""Where a URI's ``module-name`` is looked up, in order, as ``lib<name>.so`` then ``<name>.so``."""

SOFTHSM2_MODULE_CANDIDATES: tuple[Path, ...] = tuple(Path(p) for p in softhsm.MODULE_CANDIDATES)
"""The embedded default's SoftHSM2 module: the first that exists (else the first)."""


def find_module_by_name(name: str, search_dirs: Sequence[Path] | None = None) -> Path:
    """Find the PKCS#11 library for a URI ``module-name`` (``softhsm2`` -> ``libsofthsm2.so``).

    Looks for ``lib<name>.so`` then ``<name>.so`` in each of ``search_dirs`` (default
    :data:`MODULE_SEARCH_DIRS`). Raises :class:`ConfigError` when none exists.
    """
    if not name or "/" in name or "\0" in name:
        raise ConfigError("module-name must be a bare library name such as 'softhsm2'")
    dirs = MODULE_SEARCH_DIRS if search_dirs is None else tuple(search_dirs)
    for directory in dirs:
        for filename in (f"lib{name}.so", f"{name}.so"):
            candidate = directory / filename
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"PKCS#11 module-name {name!r} not found as lib{name}.so or {name}.so in "
        f"{', '.join(str(d) for d in dirs)}; give module-path instead"
    )


def embedded_module_path(candidates: Sequence[Path] | None = None) -> Path:
    """The SoftHSM2 module of the embedded default: the first candidate that exists.

    When none exists the first candidate is returned, and opening the keystore reports it.
    """
    paths = SOFTHSM2_MODULE_CANDIDATES if candidates is None else tuple(candidates)
    for path in paths:
        if path.is_file():
            return path
    return paths[0]


def _resolve_module(settings: Settings, uri: Pkcs11Uri | None) -> str:
    if settings.module_path is not None:
        return settings.module_path
    if uri is not None and uri.module_path is not None:
        module_path = Path(uri.module_path)
        # RFC 7512 §2.3: module-path may name a directory; then module-name picks the file.
        if module_path.is_dir():
            if uri.module_name is None:
                raise ConfigError(
                    f"PKCS#11 URI: module-path {module_path} is a directory; "
                    "add module-name or name the library file"
                )
            return str(find_module_by_name(uri.module_name, [module_path]))
        return uri.module_path
    if uri is not None and uri.module_name is not None:
        return str(find_module_by_name(uri.module_name))
    if settings.is_embedded:
        return str(embedded_module_path())
    raise ConfigError(
        "no PKCS#11 module: add module-path or module-name to HSMKMS_PKCS11_URI, "
        "or set HSMKMS_MODULE_PATH"
    )


def token_write_lock(settings: Settings, module_path: str) -> Path:
    """The write lock of a token on the module at ``module_path`` (KeystoreConfig.write_lock,
    ``hsmkms backup``; :mod:`hsmkms.keystore.token_lock`).

    For SoftHSM2: ``.token-writes.lock`` in the token directory of the configuration the
    process loads the module with (the data directory's ``softhsm2.conf`` for the embedded
    default, which hsmkms exports; otherwise ``SOFTHSM2_CONF`` or SoftHSM2's default), so
    every process on one token directory takes one lock, whatever its data directory: nodes
    sharing a SoftHSM2 token directory, the tools of one node, and custom key stores' tokens
    beside the default one. For another module, ``<data_dir>/.token-writes.lock``: the
    processes of one data directory."""
    if softhsm.is_softhsm2(module_path):
        if settings.is_embedded:
            conf = settings.softhsm2_conf
            fallback: Path | None = settings.token_dir / softhsm.TOKEN_WRITE_LOCK
        else:
            conf = Path(os.environ.get("SOFTHSM2_CONF") or softhsm.DEFAULT_CONF)
            fallback = None
        found = softhsm.token_dir_write_lock(conf) or fallback
        if found is not None:
            return found
    return settings.data_dir / softhsm.TOKEN_WRITE_LOCK


def _check_token_field(value: str | None, what: str, limit: int) -> str | None:
    # An empty URI value ("serial=") selects nothing useful: treat it as unset.
    if not value:
        return None
    if len(value.encode("utf-8")) > limit:
        raise ConfigError(
            f"{what} is longer than {limit} bytes, the PKCS#11 maximum, so no token can match"
        )
    return value


def keystore_config(settings: Settings) -> KeystoreConfig:
    """Resolve ``settings`` (and its PKCS#11 URI) into the keystore's :class:`KeystoreConfig`.

    Explicit settings win over the URI; the embedded SoftHSM2 default fills the rest when
    :attr:`Settings.is_embedded`. Reads the PIN. Does not check that the module exists.
    Raises :class:`ConfigError`.
    """
    uri = settings.parsed_uri
    module_path = _resolve_module(settings, uri)
    label = settings.token_label
    if label is None and uri is not None:
        label = uri.token
    if label is None and settings.is_embedded:
        label = EMBEDDED_TOKEN_LABEL
    serial = settings.token_serial
    if serial is None and uri is not None:
        serial = uri.serial
    slot_id = settings.slot_id
    if slot_id is None and uri is not None:
        slot_id = uri.slot_id
    pin = read_pin(resolve_pin_source(settings))
    return KeystoreConfig(
        module_path=module_path,
        pin=pin,
        token_label=_check_token_field(label, "the token label", 32),
        token_serial=_check_token_field(serial, "the token serial", 16),
        slot_id=slot_id,
        profile=None if settings.profile == "auto" else MechanismProfile(settings.profile),
        placement=KeyPlacement(settings.key_placement),
        unwrapped_cache=settings.unwrapped_keys,
        softhsm2_conf=str(settings.softhsm2_conf) if settings.is_embedded else None,
        # Every token, not only the embedded one: an external SoftHSM2 token served by several
        # workers or nodes loses objects to the same races (hsmkms/keystore/token_lock.py).
        write_lock=str(token_write_lock(settings, module_path)),
    )


def cluster_keystore_config(
    settings: Settings, pkcs11_uri: str, pin: str, store_id: str
) -> KeystoreConfig:
    """The :class:`KeystoreConfig` of a custom key store's token (a cluster of ``hsmkms
    clusters``): module and token from ``pkcs11_uri`` (``module-path`` or ``module-name``, and
    ``token``, ``serial`` or ``slot-id``), the PIN given (the store's password; a URI carrying
    a PIN is refused), new material named by ``store_id``, always token objects.

    On the same module as the default token the token must be in the same SoftHSM2
    configuration: a process loads a module once, and SoftHSM2 reads its configuration only
    when initialized, so the cluster's keystore shares the default token's (the embedded data
    directory's ``softhsm2.conf``). Every token takes its token write lock
    (:func:`token_write_lock`). Raises :class:`ConfigError`.
    """
    uri = parse_pkcs11_uri(pkcs11_uri)
    if uri.pin_source is not None or uri.pin_value is not None:
        raise ConfigError(
            "PKCS#11 URI: a cluster's URI carries no PIN (the key store password is its PIN)"
        )
    if uri.module_path is None and uri.module_name is None:
        raise ConfigError("PKCS#11 URI: a cluster's URI must name its module (module-path)")
    if uri.token is None and uri.serial is None and uri.slot_id is None:
        raise ConfigError("PKCS#11 URI: a cluster's URI must name its token (token=<label>)")
    if uri.module_path is not None and not Path(uri.module_path).is_dir():
        module_path = uri.module_path
    else:
        # module-name alone, or a directory with module-name (as for the default token).
        module_path = _resolve_module(settings.model_copy(update={"module_path": None}), uri)
    default_module = _resolve_module(settings, settings.parsed_uri)
    shared = settings.is_embedded and os.path.realpath(module_path) == os.path.realpath(
        default_module
    )
    return KeystoreConfig(
        module_path=module_path,
        pin=pin,
        token_label=_check_token_field(uri.token, "the token label", 32),
        token_serial=_check_token_field(uri.serial, "the token serial", 16),
        slot_id=uri.slot_id,
        profile=None if settings.profile == "auto" else MechanismProfile(settings.profile),
        placement=KeyPlacement.TOKEN,
        softhsm2_conf=str(settings.softhsm2_conf) if shared else None,
        write_lock=str(token_write_lock(settings, module_path)),
        store_id=store_id,
    )
