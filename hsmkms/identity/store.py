"""The credentials store: access key id -> principal ARN and secret, in the metadata database.

SigV4 needs each secret in the clear to recompute signatures, so secrets are kept *sealed* by
a dedicated key inside the token (created on first use, like any key version) and unsealed
only in memory. The database never holds a secret in the clear.

Tables (own schema version in ``identity_meta``; created with ``CREATE TABLE IF NOT EXISTS``,
independent of the metadata store's migrations)::

    identity_meta         name -> value: ``schema_version``, ``wrapping_key`` (KeyMaterialRef)
    identity_credentials  access_key_id (PK), name (unique), principal_arn, secret_iv,
                          secret_sealed, wrapping_key, row_version, created_at

Sealing: ``keystore.encrypt(wrapping_key, secret, aad)`` with
``aad = b"hsmkms:identity:v1" 0x00 access_key_id 0x00 principal_arn``, so a sealed secret
copied onto another row (another key id or principal) does not open.

Freshness: :meth:`CredentialStore.lookup` answers from memory only while the database is
unchanged (SQLite ``PRAGMA data_version`` on a probe connection, which moves on every commit
by any connection or process); otherwise it reads the row again, and unseals only when the
row's ``row_version`` changed. A credential created or deleted by ``hsmkms credentials`` in
another process therefore takes effect on the next request.

Security contract: no secret appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
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
    event,
    insert,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from hsmkms.errors import (
    AlreadyExistsException,
    DependencyTimeoutException,
    KMSError,
    KMSInternalException,
    NotFoundException,
    ValidationException,
)
from hsmkms.keystore.base import KeyMaterialRef, Keystore
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.types import Clock, Credential, utc_now

__all__ = [
    "IDENTITY_KEY_ID",
    "ROOT_NAME",
    "CredentialInfo",
    "CredentialStore",
    "DuplicateCredential",
    "IssuedCredential",
    "UnknownCredential",
    "generate_access_key_id",
    "generate_secret",
]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
ROOT_NAME = "root"
IDENTITY_KEY_ID = "identity-credentials"
"""The ``key_id`` of the wrapping key (token label ``hsmkms:identitycredentials:1``)."""

_AAD_PREFIX = b"hsmkms:identity:v1"
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
# spec: IAM user names: 1-64 of letters, digits and +=,.@_-
_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,64}")
# What this store accepts as an access key id: its own (AKIA + 16 base32) and any an operator
# sets through HSMKMS_ROOT_ACCESS_KEY_ID (AWS: 16-128 word characters; we allow from 1).
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9_]{1,128}")
_MAX_NEGATIVE = 4096  # unknown key ids remembered between database changes

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
)
_C = identity_credentials


class DuplicateCredential(AlreadyExistsException):
    """A credential with this name or access key id exists already."""


class UnknownCredential(NotFoundException):
    """No credential has this access key id or name."""


@dataclasses.dataclass(frozen=True)
class CredentialInfo:
    """A stored credential without its secret (what ``hsmkms credentials list`` shows)."""

    access_key_id: str
    name: str
    principal_arn: str
    created_at: str


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


def _aad(access_key_id: str, principal_arn: str) -> bytes:
    return b"\x00".join((_AAD_PREFIX, access_key_id.encode(), principal_arn.encode()))


class CredentialStore:
    """Access keys in SQL, secrets sealed by a key in the token. Thread-safe.

    ``url`` is a SQLAlchemy URL (the metadata store's database). Tables are created when
    missing. The wrapping key is created in the token on the first credential.
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
        self._unsealed: dict[str, tuple[int, Credential]] = {}
        self._confirmed: dict[str, Credential | None] = {}
        self._data_version: int | None = None
        self._probe: sqlite3.Connection | None = None
        self._wrapping_key: KeyMaterialRef | None = None
        if self._engine.dialect.name == "sqlite":
            self._install_sqlite_hooks(busy_timeout_ms)
        with self._guard(), self._engine.begin() as conn:
            _meta.create_all(conn, checkfirst=True)
            found = conn.execute(
                select(identity_meta.c.value).where(identity_meta.c.name == "schema_version")
            ).scalar()
            if found is None:
                conn.execute(
                    insert(identity_meta).values(name="schema_version", value=str(SCHEMA_VERSION))
                )
            elif int(found) > SCHEMA_VERSION:
                raise KMSInternalException(
                    f"the identity tables are of schema version {found}; this hsmkms knows "
                    f"{SCHEMA_VERSION}: upgrade hsmkms"
                )
        database = self._engine.url.database
        if self._engine.dialect.name == "sqlite" and database and database != ":memory:":
            self._probe = sqlite3.connect(database, check_same_thread=False, isolation_level=None)

    def _install_sqlite_hooks(self, busy_timeout_ms: int) -> None:
        @event.listens_for(self._engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                cur.execute("PRAGMA journal_mode = WAL")
            finally:
                cur.close()

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
            text = str(exc.orig).lower() if exc.orig is not None else ""
            if "locked" in text or "busy" in text:
                raise DependencyTimeoutException("The credentials store is busy.") from exc
            raise KMSInternalException("The credentials store failed.") from exc
        except SQLAlchemyError as exc:
            raise KMSInternalException("The credentials store failed.") from exc

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
                ref = self._keystore.create_key(IDENTITY_KEY_ID, 1)
                try:
                    with self._engine.begin() as conn:
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

    def _row_values(self, access_key_id: str, name: str, arn: str, secret: str) -> dict[str, Any]:
        ref = self._wrapping()
        sealed = self._keystore.encrypt(ref, secret.encode(), _aad(access_key_id, arn))
        return {
            "access_key_id": access_key_id,
            "name": name,
            "principal_arn": arn,
            "secret_iv": sealed.iv,
            "secret_sealed": sealed.body,
            "wrapping_key": ref.to_str(),
            "row_version": secrets.randbits(62),
            "created_at": self._clock().astimezone(dt.UTC).isoformat(timespec="seconds"),
        }

    # -- administration ---------------------------------------------------------------------

    def create(self, name: str) -> IssuedCredential:
        """Add a user principal ``name`` with a new access key; the secret is returned once.

        Raises ValidationException for a malformed name, DuplicateCredential when the name
        is taken.
        """
        if not _NAME.fullmatch(name):
            raise ValidationException(
                "the name must be 1-64 characters of letters, digits and +=,.@_-"
            )
        access_key_id = generate_access_key_id()
        secret = generate_secret()
        arn = self.user_arn(name)
        values = self._row_values(access_key_id, name, arn, secret)
        try:
            with self._guard(), self._engine.begin() as conn:
                conn.execute(insert(_C).values(**values))
        except IntegrityError:
            raise DuplicateCredential(f"a credential named {name!r} already exists") from None
        log.info("credential_created", access_key_id=access_key_id, principal=arn)
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
        values = self._row_values(access_key_id, ROOT_NAME, self.root_arn, secret)
        try:
            with self._guard(), self._engine.begin() as conn:
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
            rows = conn.execute(
                select(_C.c.access_key_id, _C.c.name, _C.c.principal_arn, _C.c.created_at).order_by(
                    _C.c.name
                )
            ).all()
        return [CredentialInfo(r[0], r[1], r[2], r[3]) for r in rows]

    def delete(self, access_key_id_or_name: str) -> CredentialInfo:
        """Delete a credential named by its access key id or its name; it stops working at once.

        The root credential cannot be deleted (set ``HSMKMS_ROOT_*`` to replace it).
        """
        with self._guard(), self._engine.begin() as conn:
            row = conn.execute(
                select(_C.c.access_key_id, _C.c.name, _C.c.principal_arn, _C.c.created_at).where(
                    or_(
                        _C.c.access_key_id == access_key_id_or_name,
                        _C.c.name == access_key_id_or_name,
                    )
                )
            ).first()
            if row is None:
                raise UnknownCredential(f"no credential {access_key_id_or_name!r}")
            if row[1] == ROOT_NAME:
                raise ValidationException(
                    "the root credential cannot be deleted (set HSMKMS_ROOT_ACCESS_KEY_ID and "
                    "HSMKMS_ROOT_SECRET_ACCESS_KEY to replace it)"
                )
            conn.execute(delete(_C).where(_C.c.access_key_id == row[0]))
        with self._lock:
            self._unsealed.pop(row[0], None)
            self._confirmed.pop(row[0], None)
        log.info("credential_deleted", access_key_id=row[0], principal=row[2])
        return CredentialInfo(row[0], row[1], row[2], row[3])

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
        """The credential of ``access_key_id``, or None when unknown (the SigV4 lookup).

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

    def _unseal_row(self, row: Any) -> Credential | None:
        access_key_id = str(row["access_key_id"])
        row_version = int(row["row_version"])
        with self._lock:
            cached = self._unsealed.get(access_key_id)
        if cached is not None and cached[0] == row_version:
            return cached[1]
        arn = str(row["principal_arn"])
        ref = KeyMaterialRef.from_str(str(row["wrapping_key"]))
        try:
            secret = self._keystore.decrypt(
                ref, bytes(row["secret_iv"]), bytes(row["secret_sealed"]), _aad(access_key_id, arn)
            )
        except DecryptionFailed:
            secret = None
        if secret is None:
            # A row that does not open was altered or copied: the key id is not accepted.
            log.warning("credential_unseal_failed", access_key_id=access_key_id)
            return None
        credential = Credential(access_key_id, secret.decode(), arn)
        with self._lock:
            self._unsealed[access_key_id] = (row_version, credential)
        return credential
