"""The credentials store: access key id -> principal ARN, secret and identity policy, in the
metadata database.

SigV4 needs each secret in the clear to recompute signatures, so secrets are kept *sealed* by
a dedicated key inside the token (created on first use, like any key version) and unsealed
only in memory. The database never holds a secret in the clear.

Tables (own schema version in ``identity_meta``; created with ``CREATE TABLE IF NOT EXISTS``,
independent of the metadata store's migrations)::

    identity_meta         name -> value: ``schema_version`` ("2"), ``wrapping_key``
                          (KeyMaterialRef text: SYMMETRIC_DEFAULT material of the default
                          store's profile; older databases hold the pre-v2 text, still read)
    identity_credentials  access_key_id (PK), name (unique), principal_arn, secret_iv,
                          secret_sealed, wrapping_key, row_version, created_at,
                          policy (v2: the identity policy JSON as given, or NULL)

Schema v1 -> v2 adds the nullable ``policy`` column in place (``ALTER TABLE ... ADD COLUMN``,
under the write lock); v1 rows have no policy and open unchanged.

Sealing: ``(iv, sealed) = keystore.encrypt(wrapping_key, secret, aad)`` with::

    aad = b"hsmkms:identity:v1" 0x00 access_key_id 0x00 principal_arn      policy NULL
    aad = <the same> 0x00 b"policy" 0x00 SHA-256(policy, UTF-8)             policy set

so a sealed secret copied onto another row (another key id or principal) does not open, and
neither does a row whose policy was edited, added or removed in the database: such a row is
treated as an unknown access key (fail closed; logged as ``credential_integrity_failed``).

Freshness: :meth:`CredentialStore.lookup` answers from memory only while the database is
unchanged (SQLite ``PRAGMA data_version`` on a probe connection, which moves on every commit
by any connection or process); otherwise it reads the row again, and unseals only when the
row's sealed contents (``row_version``, principal, policy, sealed secret) changed. A credential
created, deleted or given a new policy by ``hsmkms credentials`` in another process therefore
takes effect on the next request.

Security contract: no secret appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import sqlite3
import string
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from hsmkms.errors import (
    AlreadyExistsException,
    DependencyTimeoutException,
    KMSError,
    KMSInternalException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    ValidationException,
)
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.policy import parse_identity_policy
from hsmkms.store.sqlite import install_sqlite_hooks
from hsmkms.types import Clock, Credential, utc_now

__all__ = [
    "IDENTITY_KEY_ID",
    "ROOT_NAME",
    "CredentialInfo",
    "CredentialIntegrityError",
    "CredentialStore",
    "DuplicateCredential",
    "IssuedCredential",
    "UnknownCredential",
    "generate_access_key_id",
    "generate_secret",
    "validate_identity_policy",
]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 2
ROOT_NAME = "root"
IDENTITY_KEY_ID = "identity-credentials"
"""The ``key_id`` of the wrapping key (token label ``hsmkms:identitycredentials:1``)."""

_AAD_PREFIX = b"hsmkms:identity:v1"
_AAD_POLICY = b"\x00policy\x00"
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
# spec: IAM user names: 1-64 of letters, digits and +=,.@_-
_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,64}")
# What this store accepts as an access key id: its own (AKIA + 16 base32) and any an operator
# sets through HSMKMS_ROOT_ACCESS_KEY_ID (AWS: 16-128 word characters; we allow from 1).
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9_]{1,128}")
_MAX_NEGATIVE = 4096  # unknown key ids remembered between database changes
_WRITE = "hsmkms_identity_write"  # execution option: begin with BEGIN IMMEDIATE (SQLite)

_meta = MetaData()
identity_meta = Table(
    "identity_meta",
    _meta,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
identity_credentials = Table(
    "identity_credentials",
    _meta,
    Column("access_key_id", String(128), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("principal_arn", String(2048), nullable=False),
    Column("secret_iv", LargeBinary, nullable=False),
    Column("secret_sealed", LargeBinary, nullable=False),
    Column("wrapping_key", Text, nullable=False),
    Column("row_version", BigInteger, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("policy", Text, nullable=True),  # schema v2
)
_C = identity_credentials
_INFO = (
    _C.c.access_key_id,
    _C.c.name,
    _C.c.principal_arn,
    _C.c.created_at,
    _C.c.policy.is_not(None).label("has_policy"),
)


class DuplicateCredential(AlreadyExistsException):
    """A credential with this name or access key id exists already."""


class UnknownCredential(NotFoundException):
    """No credential has this access key id or name."""


class CredentialIntegrityError(KMSInternalException):
    """A stored credential does not open: its row was altered in the database (its policy
    edited, its sealed secret moved). Lookups treat it as unknown; delete and re-create it."""


@dataclasses.dataclass(frozen=True)
class CredentialInfo:
    """A stored credential without its secret (what ``hsmkms credentials list`` shows)."""

    access_key_id: str
    name: str
    principal_arn: str
    created_at: str
    has_policy: bool


@dataclasses.dataclass(frozen=True)
class IssuedCredential:
    """A credential just created: the only time its secret is shown."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    principal_arn: str
    name: str


def generate_access_key_id() -> str:
    """An access key id shaped like AWS's: ``AKIA`` + 16 characters of A-Z2-7."""
    return "AKIA" + "".join(secrets.choice(_BASE32) for _ in range(16))


def generate_secret() -> str:
    """A secret access key shaped like AWS's: 40 characters of the base64 alphabet."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


def validate_identity_policy(policy: str) -> str:
    """``policy`` unchanged when it is a valid identity policy (grammar, at most 32,768 bytes).

    Raises MalformedPolicyDocumentException naming what is wrong, also for an oversized
    document.
    """
    try:
        parse_identity_policy(policy)
    except LimitExceededException as exc:
        raise MalformedPolicyDocumentException(exc.message) from exc
    return policy


def _aad(access_key_id: str, principal_arn: str, policy: str | None) -> bytes:
    aad = b"\x00".join((_AAD_PREFIX, access_key_id.encode(), principal_arn.encode()))
    if policy is None:
        return aad  # schema v1 rows and credentials without a policy
    return aad + _AAD_POLICY + hashlib.sha256(policy.encode()).digest()


def _info(row: Any) -> CredentialInfo:
    return CredentialInfo(
        str(row.access_key_id),
        str(row.name),
        str(row.principal_arn),
        str(row.created_at),
        bool(row.has_policy),
    )


class CredentialStore:
    """Access keys in SQL, secrets sealed by a key in the token. Thread-safe.

    ``url`` is a SQLAlchemy URL (the metadata store's database). Tables are created when
    missing and migrated to the current schema. The wrapping key is created in the token on
    the first credential.
    """

    def __init__(
        self,
        url: str,
        keystore: Keystore,
        *,
        account_id: str,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 10_000,
    ) -> None:
        self._keystore = keystore
        self._account_id = account_id
        self._clock = clock
        self._engine: Engine = create_engine(url)
        self._lock = threading.Lock()
        # access key id -> (the row's sealed contents, what they opened to)
        self._unsealed: dict[str, tuple[tuple[Any, ...], Credential]] = {}
        self._confirmed: dict[str, Credential | None] = {}
        self._data_version: int | None = None
        self._probe: sqlite3.Connection | None = None
        self._wrapping_key: KeyMaterialRef | None = None
        if self._engine.dialect.name == "sqlite":
            install_sqlite_hooks(self._engine, busy_timeout_ms=busy_timeout_ms, write_option=_WRITE)
        with self._write() as conn:
            self._migrate(conn)
        database = self._engine.url.database
        if self._engine.dialect.name == "sqlite" and database and database != ":memory:":
            self._probe = sqlite3.connect(database, check_same_thread=False, isolation_level=None)

    @staticmethod
    def _migrate(conn: Connection) -> None:
        """Create the tables, or bring them to :data:`SCHEMA_VERSION`. Write lock held."""
        _meta.create_all(conn, checkfirst=True)
        found = conn.execute(
            select(identity_meta.c.value).where(identity_meta.c.name == "schema_version")
        ).scalar()
        if found is not None and (not found.isdigit() or int(found) > SCHEMA_VERSION):
            raise KMSInternalException(
                f"the identity tables are of schema version {found}; this hsmkms knows "
                f"{SCHEMA_VERSION}: upgrade hsmkms"
            )
        columns = {c["name"] for c in inspect(conn).get_columns(_C.name)}
        if "policy" not in columns:
            # v1 -> v2: existing rows get a NULL policy, which keeps their v1 AAD.
            exists = " IF NOT EXISTS" if conn.dialect.name == "postgresql" else ""
            conn.execute(text(f"ALTER TABLE {_C.name} ADD COLUMN{exists} policy TEXT"))
            log.info("identity_schema_migrated", from_version=found, to_version=SCHEMA_VERSION)
        if found is None:
            conn.execute(
                insert(identity_meta).values(name="schema_version", value=str(SCHEMA_VERSION))
            )
        elif int(found) != SCHEMA_VERSION:
            conn.execute(
                update(identity_meta)
                .where(identity_meta.c.name == "schema_version")
                .values(value=str(SCHEMA_VERSION))
            )

    def close(self) -> None:
        """Release the database connections and forget every unsealed secret."""
        with self._lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None
            self._unsealed.clear()
            self._confirmed.clear()
        self._engine.dispose()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (KMSError, IntegrityError):
            raise  # an IntegrityError means a duplicate: the caller says which
        except OperationalError as exc:
            reason = str(exc.orig).lower() if exc.orig is not None else ""
            if "locked" in reason or "busy" in reason:
                raise DependencyTimeoutException("The credentials store is busy.") from exc
            raise KMSInternalException("The credentials store failed.") from exc
        except SQLAlchemyError as exc:
            raise KMSInternalException("The credentials store failed.") from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: ``BEGIN IMMEDIATE``, so read-then-write is atomic)."""
        with self._guard(), self._engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    def _forget(self, access_key_id: str) -> None:
        """Drop what this process remembers of a credential just changed by this process."""
        with self._lock:
            self._unsealed.pop(access_key_id, None)
            self._confirmed.pop(access_key_id, None)

    # -- principals -------------------------------------------------------------------------

    @property
    def root_arn(self) -> str:
        """The account root principal, ``arn:aws:iam::<account>:root``."""
        return f"arn:aws:iam::{self._account_id}:root"

    def user_arn(self, name: str) -> str:
        """The principal of a named user, ``arn:aws:iam::<account>:user/<name>``."""
        return f"arn:aws:iam::{self._account_id}:user/{name}"

    # -- the wrapping key -------------------------------------------------------------------

    def _wrapping(self) -> KeyMaterialRef:
        """The wrapping key's reference, creating the key in the token the first time."""
        if self._wrapping_key is not None:
            return self._wrapping_key
        with self._guard():
            with self._engine.connect() as conn:
                stored = self._read_wrapping(conn)
            if stored is None:
                ref = self._keystore.create(
                    KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(IDENTITY_KEY_ID, 1)
                )
                try:
                    with self._write() as conn:
                        conn.execute(
                            insert(identity_meta).values(name="wrapping_key", value=ref.to_str())
                        )
                    stored = ref
                except IntegrityError:
                    # Another process created it first: ours is surplus.
                    self._keystore.destroy(ref)
                    with self._engine.connect() as conn:
                        stored = self._read_wrapping(conn)
                    if stored is None:  # pragma: no cover - the row was just seen
                        raise KMSInternalException("the identity wrapping key vanished") from None
        self._wrapping_key = stored
        return stored

    @staticmethod
    def _read_wrapping(conn: Connection) -> KeyMaterialRef | None:
        value = conn.execute(
            select(identity_meta.c.value).where(identity_meta.c.name == "wrapping_key")
        ).scalar()
        return None if value is None else KeyMaterialRef.from_str(value)

    def wrapping_key_ref(self) -> KeyMaterialRef | None:
        """The wrapping key's reference, or None before the first credential (for doctor)."""
        with self._guard(), self._engine.connect() as conn:
            return self._read_wrapping(conn)

    def _sealed_values(
        self, ref: KeyMaterialRef, access_key_id: str, arn: str, secret: str, policy: str | None
    ) -> dict[str, Any]:
        """The columns that seal ``secret`` (bound to key id, principal and policy)."""
        iv, body = self._keystore.encrypt(ref, secret.encode(), _aad(access_key_id, arn, policy))
        return {
            "secret_iv": iv,
            "secret_sealed": body,
            # The text as read (an old row keeps its old form): rows are never rewritten.
            "wrapping_key": ref.to_str(),
            "policy": policy,
            "row_version": secrets.randbits(62),
        }

    def _row_values(
        self, access_key_id: str, name: str, arn: str, secret: str, policy: str | None = None
    ) -> dict[str, Any]:
        return {
            "access_key_id": access_key_id,
            "name": name,
            "principal_arn": arn,
            "created_at": self._clock().astimezone(dt.UTC).isoformat(timespec="seconds"),
            **self._sealed_values(self._wrapping(), access_key_id, arn, secret, policy),
        }

    # -- administration ---------------------------------------------------------------------

    def create(self, name: str, policy: str | None = None) -> IssuedCredential:
        """Add a user principal ``name`` with a new access key; the secret is returned once.

        ``policy`` is the user's identity policy (IAM JSON, stored as given); without one the
        user is allowed nothing that a key policy does not grant it by name.

        Raises ValidationException for a malformed name, MalformedPolicyDocumentException for
        an invalid policy (nothing is stored), DuplicateCredential when the name is taken.
        """
        if not _NAME.fullmatch(name):
            raise ValidationException(
                "the name must be 1-64 characters of letters, digits and +=,.@_-"
            )
        if policy is not None:
            validate_identity_policy(policy)
        access_key_id = generate_access_key_id()
        secret = generate_secret()
        arn = self.user_arn(name)
        values = self._row_values(access_key_id, name, arn, secret, policy)
        try:
            with self._write() as conn:
                conn.execute(insert(_C).values(**values))
        except IntegrityError:
            raise DuplicateCredential(f"a credential named {name!r} already exists") from None
        log.info(
            "credential_created",
            access_key_id=access_key_id,
            principal=arn,
            has_policy=policy is not None,
        )
        return IssuedCredential(access_key_id, secret, arn, name)

    def ensure_root(
        self, access_key_id: str | None = None, secret: str | None = None
    ) -> IssuedCredential | None:
        """Make sure the account root identity exists.

        With ``access_key_id`` and ``secret`` (``HSMKMS_ROOT_*``), the root identity is set to
        them (replacing a different one). Without, a root identity is generated when none
        exists. Returns the credential when this call created or replaced it, else None.
        """
        if (access_key_id is None) != (secret is None):
            raise ValidationException(
                "HSMKMS_ROOT_ACCESS_KEY_ID and HSMKMS_ROOT_SECRET_ACCESS_KEY must be set together"
            )
        if access_key_id is not None and not _ACCESS_KEY_ID.fullmatch(access_key_id):
            raise ValidationException(
                "HSMKMS_ROOT_ACCESS_KEY_ID must be 1-128 letters, digits or underscores"
            )
        if secret is not None and not 1 <= len(secret) <= 128:
            raise ValidationException("HSMKMS_ROOT_SECRET_ACCESS_KEY must be 1-128 characters")
        with self._guard(), self._engine.connect() as conn:
            row = conn.execute(select(_C).where(_C.c.name == ROOT_NAME)).first()
        if row is not None:
            if access_key_id is None:
                return None
            current = self._unseal_row(row._mapping)
            if current is not None and (current.access_key_id, current.secret) == (
                access_key_id,
                secret,
            ):
                return None
        if access_key_id is None or secret is None:
            access_key_id, secret = generate_access_key_id(), generate_secret()
        # The account root is never governed by an identity policy.
        values = self._row_values(access_key_id, ROOT_NAME, self.root_arn, secret)
        try:
            with self._write() as conn:
                conn.execute(delete(_C).where(_C.c.name == ROOT_NAME))
                conn.execute(insert(_C).values(**values))
        except IntegrityError:
            raise DuplicateCredential(
                f"access key id {access_key_id} already belongs to another credential"
            ) from None
        log.info("root_credential_set", access_key_id=access_key_id)
        return IssuedCredential(access_key_id, secret, self.root_arn, ROOT_NAME)

    def list(self) -> list[CredentialInfo]:
        """Every credential, without secrets, by name."""
        with self._guard(), self._engine.connect() as conn:
            rows = conn.execute(select(*_INFO).order_by(_C.c.name)).all()
        return [_info(r) for r in rows]

    @staticmethod
    def _named(access_key_id_or_name: str) -> Any:
        return or_(_C.c.access_key_id == access_key_id_or_name, _C.c.name == access_key_id_or_name)

    def delete(self, access_key_id_or_name: str) -> CredentialInfo:
        """Delete a credential named by its access key id or its name; it stops working at once.

        The root credential cannot be deleted (set ``HSMKMS_ROOT_*`` to replace it).
        """
        with self._write() as conn:
            row = conn.execute(select(*_INFO).where(self._named(access_key_id_or_name))).first()
            if row is None:
                raise UnknownCredential(f"no credential {access_key_id_or_name!r}")
            if row.name == ROOT_NAME:
                raise ValidationException(
                    "the root credential cannot be deleted (set HSMKMS_ROOT_ACCESS_KEY_ID and "
                    "HSMKMS_ROOT_SECRET_ACCESS_KEY to replace it)"
                )
            conn.execute(delete(_C).where(_C.c.access_key_id == row.access_key_id))
        info = _info(row)
        self._forget(info.access_key_id)
        log.info(
            "credential_deleted", access_key_id=info.access_key_id, principal=info.principal_arn
        )
        return info

    def set_policy(self, access_key_id_or_name: str, policy: str | None) -> CredentialInfo:
        """Attach ``policy`` (IAM JSON, stored as given) to a user credential, replacing its
        identity policy; ``None`` removes it. Takes effect at once, in every process.

        The secret is unsealed and sealed again under the new policy in one transaction.
        Raises MalformedPolicyDocumentException for an invalid policy, UnknownCredential,
        ValidationException for the account root (not governed by identity policies), and
        CredentialIntegrityError when the stored credential does not open (altered row).
        """
        if policy is not None:
            validate_identity_policy(policy)
        with self._write() as conn:
            row = (
                conn.execute(select(_C).where(self._named(access_key_id_or_name)).with_for_update())
                .mappings()
                .first()
            )
            if row is None:
                raise UnknownCredential(f"no credential {access_key_id_or_name!r}")
            access_key_id = str(row["access_key_id"])
            arn = str(row["principal_arn"])
            if row["name"] == ROOT_NAME or arn == self.root_arn:
                raise ValidationException(
                    "the account root is not governed by identity policies: it may do "
                    "whatever key policies allow the account"
                )
            secret = self._open(row, warn=False)
            if secret is None:
                raise CredentialIntegrityError(
                    f"the credential {access_key_id} does not open (its database row was "
                    "altered): delete it and create a new one"
                )
            ref = KeyMaterialRef.from_str(str(row["wrapping_key"]))
            values = self._sealed_values(ref, access_key_id, arn, secret, policy)
            conn.execute(update(_C).where(_C.c.access_key_id == access_key_id).values(**values))
        self._forget(access_key_id)
        log.info(
            "credential_policy_set",
            access_key_id=access_key_id,
            principal=arn,
            has_policy=policy is not None,
        )
        return CredentialInfo(
            access_key_id, str(row["name"]), arn, str(row["created_at"]), policy is not None
        )

    def get_policy(self, access_key_id_or_name: str) -> tuple[CredentialInfo, str | None]:
        """A credential and its identity policy (None: it has none), checked to be the policy
        the credential was sealed with.

        Raises UnknownCredential, and CredentialIntegrityError when the row was altered.
        """
        with self._guard(), self._engine.connect() as conn:
            row = conn.execute(select(_C).where(self._named(access_key_id_or_name))).first()
        if row is None:
            raise UnknownCredential(f"no credential {access_key_id_or_name!r}")
        credential = self._unseal_row(row._mapping, warn=False)
        if credential is None:
            raise CredentialIntegrityError(
                f"the credential {row.access_key_id} does not open (its database row was "
                "altered): delete it and create a new one"
            )
        info = CredentialInfo(
            credential.access_key_id,
            str(row.name),
            credential.principal_arn,
            str(row.created_at),
            credential.identity_policy is not None,
        )
        return info, credential.identity_policy

    # -- lookup (every request) -------------------------------------------------------------

    def _unchanged(self) -> bool:
        """Whether the database is unchanged since the last call. Lock held."""
        if self._probe is None:
            return False
        try:
            version = int(self._probe.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self._data_version = None
            return False
        if version != self._data_version:
            self._data_version = version
            self._confirmed.clear()
            return False
        return True

    def lookup(self, access_key_id: str) -> Credential | None:
        """The credential of ``access_key_id`` with its identity policy, or None when unknown
        or when its row does not open (altered in the database) — the SigV4 lookup.

        Reads the database unless nothing changed since the answer was last confirmed; unseals
        (one token call) only when the row is new or changed.
        """
        if not _ACCESS_KEY_ID.fullmatch(access_key_id):
            return None
        with self._lock:
            if self._unchanged() and access_key_id in self._confirmed:
                return self._confirmed[access_key_id]
        with self._guard(), self._engine.connect() as conn:
            row = conn.execute(select(_C).where(_C.c.access_key_id == access_key_id)).first()
        credential = None if row is None else self._unseal_row(row._mapping)
        with self._lock:
            if len(self._confirmed) >= _MAX_NEGATIVE:
                self._confirmed.clear()
            self._confirmed[access_key_id] = credential
            if credential is None:
                self._unsealed.pop(access_key_id, None)
        return credential

    def _open(self, row: Any, *, warn: bool = True) -> str | None:
        """The secret sealed in ``row``, or None when the row does not open (logged as a
        warning unless ``warn`` is false: the caller raises CredentialIntegrityError)."""
        access_key_id = str(row["access_key_id"])
        arn = str(row["principal_arn"])
        policy = row["policy"]
        secret = None
        # A NUL inside a field would let one AAD be read as another (field boundaries).
        if "\x00" not in access_key_id + arn:
            ref = KeyMaterialRef.from_str(str(row["wrapping_key"]))
            aad = _aad(access_key_id, arn, None if policy is None else str(policy))
            try:
                secret = self._keystore.decrypt(
                    ref, bytes(row["secret_iv"]), bytes(row["secret_sealed"]), aad
                )
            except DecryptionFailed:
                secret = None
        if secret is None:
            # A row that does not open was altered or copied: the key id is not accepted.
            if warn:
                log.warning("credential_integrity_failed", access_key_id=access_key_id)
            return None
        return secret.decode()

    def _unseal_row(self, row: Any, *, warn: bool = True) -> Credential | None:
        access_key_id = str(row["access_key_id"])
        # Everything the seal covers: any change to it (even with row_version kept) unseals anew.
        sealed = (
            int(row["row_version"]),
            str(row["principal_arn"]),
            row["policy"],
            bytes(row["secret_iv"]),
            bytes(row["secret_sealed"]),
            str(row["wrapping_key"]),
        )
        with self._lock:
            cached = self._unsealed.get(access_key_id)
        if cached is not None and cached[0] == sealed:
            return cached[1]
        secret = self._open(row, warn=warn)
        if secret is None:
            return None
        credential = Credential(
            access_key_id,
            secret,
            str(row["principal_arn"]),
            identity_policy=None if row["policy"] is None else str(row["policy"]),
        )
        with self._lock:
            self._unsealed[access_key_id] = (sealed, credential)
        return credential
