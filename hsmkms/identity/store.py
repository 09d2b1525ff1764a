"""The credentials store: access key id -> principal ARN, secret and identity policy, in the
metadata database.

SigV4 needs each secret in the clear to recompute signatures, so secrets are kept *sealed* by
a dedicated key inside the token (created on first use, like any key version) and unsealed
only in memory. The database never holds a secret in the clear.

Tables (migrated by the database layer's runner as component ``identity``, whose versions are
in the database's ``schema_migrations``; see :mod:`hsmkms.db.migrations`)::

    identity_meta         name -> value: ``wrapping_key`` (KeyMaterialRef text: SYMMETRIC_DEFAULT
                          material of the default store's profile; older databases hold the
                          pre-v2 text, still read); ``schema_version`` ("2"), the version as
                          hsmkms before the database layer kept it (adopted from there, and kept
                          equal to the latest applied version)
    identity_credentials  access_key_id (PK), name (indexed; v3: at most two rows per name,
                          unique before), principal_arn, secret_iv, secret_sealed, wrapping_key,
                          row_version, created_at, policy (v2: the identity policy JSON as
                          given, or NULL)
    identity_retired      access_key_id (PK), principal_arn, retired_at (v3): access keys of
                          the account root deleted with ``hsmkms credentials delete``, so that
                          HSMKMS_ROOT_ACCESS_KEY_ID naming one cannot bring it back

Migration 2 adds the nullable ``policy`` column in place (``ALTER TABLE ... ADD COLUMN``, under
the write lock); v1 rows have no policy and open unchanged. Migration 3 rebuilds
``identity_credentials`` without the uniqueness of ``name`` (a user may hold two access keys,
as in AWS IAM, to rotate without downtime), keeping every row as it was, and adds
``identity_retired``.

Sealing: ``(iv, sealed) = keystore.encrypt(wrapping_key, secret, aad)`` with::

    aad = b"hsmkms:identity:v1" 0x00 access_key_id 0x00 principal_arn      policy NULL
    aad = <the same> 0x00 b"policy" 0x00 SHA-256(policy, UTF-8)             policy set

so a sealed secret copied onto another row (another key id or principal) does not open, and
neither does a row whose policy was edited, added or removed in the database: such a row is
treated as an unknown access key (fail closed; logged as ``credential_integrity_failed``).

Freshness: :meth:`CredentialStore.lookup` answers from memory only while the database is
unchanged (a :class:`hsmkms.db.ReadCache` asking the database's change signal on every lookup,
which moves on every commit by any connection or process); otherwise it reads the row again,
and unseals only when the row's sealed contents (``row_version``, principal, policy, sealed
secret) changed. A credential created, deleted or given a new policy by ``hsmkms credentials``
in another process therefore takes effect on the next request. Where the database has no
change signal every lookup reads the row.

Freshness against an old copy of the database: a row deleted, rotated away or given a new
policy must not come back to life when an old copy of the tables is put back (the seal alone
binds no time). The token keeps a digest of the whole credential set (every access key id with
its sealed secret and IV, which change at every sealing), anchored under
``identity:<wrapping key id>`` (:meth:`Keystore.write_anchor`, a private data object; the name
follows the wrapping key, so two databases sharing a token keep apart). Every change writes
the new digest as ``identity-pending:<id>`` before its commit and as the anchor after it, so a
crash between the two leaves a set that still verifies. A lookup that reads a row accepts it
only as a row of the anchored set (:class:`hsmkms.identity.anchor.SetAnchor`); a set matching
neither anchor is an older copy, and no credential of it is accepted (``credentials_stale`` in the
log) until the operator vouches for it with ``hsmkms credentials trust``. A database without
an anchor yet (made before this check existed) is anchored as it is on first use. What still
replays: key, grant, alias and tag rows (docs/metadata-store.md).

Security contract: no secret appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import string
import threading
from contextlib import AbstractContextManager
from typing import Any, Final

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from hsmkms.db import (
    Component,
    Database,
    ErrorMessages,
    LegacyMarker,
    Migration,
    add_column,
    drop_unique,
    migrate,
)
from hsmkms.errors import (
    AlreadyExistsException,
    KMSInternalException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    ValidationException,
)
from hsmkms.identity.anchor import SetAnchor
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName
from hsmkms.keystore.config import KeyPlacement
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.policy import parse_identity_policy
from hsmkms.types import Clock, Credential, utc_now

__all__ = [
    "IDENTITY_KEY_ID",
    "MAX_ACCESS_KEYS",
    "MIN_ROOT_SECRET",
    "ROOT_NAME",
    "USER_NAME",
    "CredentialInfo",
    "CredentialIntegrityError",
    "CredentialStore",
    "CredentialsStale",
    "DuplicateCredential",
    "IssuedCredential",
    "UnknownCredential",
    "check_credential",
    "generate_access_key_id",
    "generate_secret",
    "root_account",
    "validate_identity_policy",
]

log = structlog.get_logger(__name__)

ROOT_NAME = "root"
MAX_ACCESS_KEYS = 2
"""Access keys a user (or the account root) may hold at once: AWS IAM's quota, which lets an
application move to a new key before the old one is deleted."""
# Writers of the identity tables take this lock (PostgreSQL: an advisory lock; SQLite's write
# transaction holds the one write lock already), so "at most two keys per name" holds. "hsmkmsI"
_WRITE_LOCK: Final = 0x68736D6B6D7349
IDENTITY_KEY_ID = "identity-credentials"
"""The ``key_id`` of the wrapping key (token label ``hsmkms:identitycredentials:1``)."""

_DIGEST_PREFIX = b"hsmkms:identity-set:v1"
_AAD_PREFIX = b"hsmkms:identity:v1"
_AAD_POLICY = b"\x00policy\x00"
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"
# spec: IAM user names: 1-64 of letters, digits and +=,.@_-
USER_NAME: Final = re.compile(r"[A-Za-z0-9+=,.@_-]{1,64}")
_NAME = USER_NAME
# What this store accepts as an access key id: its own (AKIA + 16 base32) and any an operator
# sets through HSMKMS_ROOT_ACCESS_KEY_ID (AWS: 16-128 word characters; we allow from 1).
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9_]{1,128}")
_MAX_NEGATIVE = 4096  # unknown key ids remembered between database changes
MIN_ROOT_SECRET: Final = 20
"""The shortest root secret accepted without ``allow_weak`` (AWS's are 40 characters)."""
_ERRORS = ErrorMessages(
    busy="The credentials store is busy.",
    failed="The credentials store failed.",
    unavailable="The credentials store is unavailable.",
    handled=(IntegrityError,),  # a duplicate name or key id: the caller says which
)

metadata = MetaData()
identity_meta = Table(
    "identity_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
identity_credentials = Table(
    "identity_credentials",
    metadata,
    Column("access_key_id", String(128), primary_key=True),
    Column("name", String(64), nullable=False),  # unique before schema v3
    Column("principal_arn", String(2048), nullable=False),
    Column("secret_iv", LargeBinary, nullable=False),
    Column("secret_sealed", LargeBinary, nullable=False),
    Column("wrapping_key", Text, nullable=False),
    Column("row_version", BigInteger, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("policy", Text, nullable=True),  # schema v2
    Index("ix_identity_credentials_name", "name"),  # schema v3
)
_C = identity_credentials
identity_retired = Table(
    "identity_retired",
    metadata,
    Column("access_key_id", String(128), primary_key=True),
    Column("principal_arn", String(2048), nullable=False),
    Column("retired_at", String(40), nullable=False),
)
_R = identity_retired


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


def _v2_policy(conn: Connection) -> None:
    # Made by migration 1 of this code, the table has the column already; v1 rows get NULL,
    # which keeps their v1 AAD.
    if add_column(conn, _C.name, Column("policy", Text)):
        log.info("identity_schema_migrated", from_version=1, to_version=2)


def _v3_two_access_keys(conn: Connection) -> None:
    # Made by migration 1 of this code, the table has no uniqueness on name already.
    if drop_unique(conn, _C, ["name"]):
        log.info("identity_schema_migrated", from_version=2, to_version=3)
    for index in _C.indexes:
        index.create(conn, checkfirst=True)
    _R.create(conn, checkfirst=True)


COMPONENT: Final = Component(
    "identity",
    [
        Migration(1, "identity_meta, identity_credentials", _v1_initial),
        Migration(2, "identity policies: identity_credentials.policy", _v2_policy),
        Migration(3, "two access keys per user; identity_retired", _v3_two_access_keys),
    ],
    legacy=LegacyMarker(identity_meta),
    refused="the identity tables are of schema version {found}; this hsmkms knows {latest}: "
    "upgrade hsmkms",
)
"""The identity tables, for :func:`hsmkms.db.migrate`."""
SCHEMA_VERSION: Final = COMPONENT.latest
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


class CredentialsStale(KMSInternalException):
    """The credential set is not the one the token last saw (an older copy of the database):
    nothing was changed."""


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


def check_credential(
    name: str,
    policy: str | None = None,
    *,
    access_key_id: str | None = None,
    secret: str | None = None,
) -> None:
    """What :meth:`CredentialStore.create` checks before it stores anything: the name, the
    identity policy, and a fixed access key id with its secret (both or neither).

    Raises ValidationException or MalformedPolicyDocumentException naming what is wrong (never
    the secret)."""
    if not _NAME.fullmatch(name):
        raise ValidationException("the name must be 1-64 characters of letters, digits and +=,.@_-")
    if (access_key_id is None) != (secret is None):
        raise ValidationException("a fixed access key id needs its secret, and the reverse")
    if access_key_id is not None and not _ACCESS_KEY_ID.fullmatch(access_key_id):
        raise ValidationException("an access key id must be 1-128 letters, digits or _")
    if secret is not None and not 1 <= len(secret) <= 128:
        raise ValidationException("a secret access key must be 1-128 characters")
    if policy is not None:
        validate_identity_policy(policy)


def _aad(access_key_id: str, principal_arn: str, policy: str | None) -> bytes:
    aad = b"\x00".join((_AAD_PREFIX, access_key_id.encode(), principal_arn.encode()))
    if policy is None:
        return aad  # schema v1 rows and credentials without a policy
    return aad + _AAD_POLICY + hashlib.sha256(policy.encode()).digest()


def root_account(database: Database) -> str | None:
    """The account of the stored root credential (``arn:aws:iam::<account>:root``), or None
    when the database has no identity tables or no root yet. Reads only."""
    with database.read(_ERRORS) as conn:
        if not inspect(conn).has_table(_C.name):
            return None
        arn = conn.execute(select(_C.c.principal_arn).where(_C.c.name == ROOT_NAME)).scalar()
    if arn is None:
        return None
    parts = str(arn).split(":")
    return parts[4] if len(parts) >= 6 and parts[4] else None


def _shown(created_at: object) -> str:
    """A creation time as shown: to the second (stored to the microsecond, for order)."""
    return re.sub(r"\.\d+(?=[+-]|Z|$)", "", str(created_at))


def _info(row: Any) -> CredentialInfo:
    return CredentialInfo(
        str(row.access_key_id),
        str(row.name),
        str(row.principal_arn),
        _shown(row.created_at),
        bool(row.has_policy),
    )


def _stale() -> CredentialsStale:
    return CredentialsStale(
        "the credentials in the database are not those the token last saw (an older copy of "
        "the database?): check them with 'hsmkms credentials list', then vouch for them with "
        "'hsmkms credentials trust'"
    )


class CredentialStore:
    """Access keys in SQL, secrets sealed by a key in the token. Thread-safe.

    ``database`` is the metadata store's database: a SQLAlchemy URL (the store opens and owns
    its own :class:`~hsmkms.db.Database`, with ``busy_timeout_ms``) or a shared
    :class:`~hsmkms.db.Database` (then its settings apply, and :meth:`close` leaves it open).
    Tables are created when missing and migrated to the current schema. The wrapping key is
    created in the token on the first credential.
    """

    def __init__(
        self,
        database: str | Database,
        keystore: Keystore,
        *,
        account_id: str,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 10_000,
    ) -> None:
        self._keystore = keystore
        self._account_id = account_id
        self._clock = clock
        self._owns_db = not isinstance(database, Database)
        self._db = (
            database
            if isinstance(database, Database)
            else Database(database, busy_timeout_ms=busy_timeout_ms)
        )
        self._lock = threading.Lock()
        # access key id -> (the row's sealed contents, what they opened to)
        self._unsealed: dict[str, tuple[tuple[Any, ...], Credential]] = {}
        # access key id -> its credential, or None (unknown); asked on every lookup whether
        # the database changed, so a change by any process applies to the next request.
        self._confirmed = self._db.read_cache(
            check_interval=0, max_entries=_MAX_NEGATIVE, keep_none=True
        )
        self._wrapping_key: KeyMaterialRef | None = None
        self._anchor = SetAnchor(
            keystore, _C, id_column="access_key_id", domain=_DIGEST_PREFIX, name="identity",
            event="credentials",
        )  # fmt: skip
        try:
            with self._write() as conn:
                migrate(conn, COMPONENT, clock)
        except BaseException:
            if self._owns_db:
                self._db.close()
            raise

    @property
    def database(self) -> Database:
        """The database the credentials live in."""
        return self._db

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics and tests)."""
        return self._db.engine

    def close(self) -> None:
        """Forget every unsealed secret and, when the store opened its database itself,
        release its connections."""
        with self._lock:
            self._unsealed.clear()
        self._confirmed.invalidate()
        if self._owns_db:
            self._db.close()

    def _write(self) -> AbstractContextManager[Connection]:
        """One write transaction (the write lock taken first, so read-then-write is atomic)."""
        return self._db.write(_ERRORS, lock=_WRITE_LOCK)

    def _changing(self) -> AbstractContextManager[Connection]:
        """A write transaction that changes the credential set, kept anchored in the token
        (:meth:`SetAnchor.changing`): an older copy of the set is not built on."""
        return self._anchor.changing(self._write(), self._wrapping(), _stale)

    def trust(self) -> int:
        """Vouch for the credential set now in the database (``hsmkms credentials trust``,
        after restoring an older copy on purpose): it becomes the anchored set. Returns how
        many access keys it holds."""
        count = self._anchor.trust(self._write(), self._wrapping(), identity_meta)
        self._confirmed.invalidate()
        log.warning("credentials_trusted", access_keys=count)
        return count

    def _read(self) -> AbstractContextManager[Connection]:
        return self._db.read(_ERRORS)

    def _forget(self, access_key_id: str) -> None:
        """Drop the secret this process unsealed for a credential it just changed (its lookup
        answer went with the write)."""
        with self._lock:
            self._unsealed.pop(access_key_id, None)

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
        with self._read() as conn:
            stored = self._read_wrapping(conn)
        if stored is None:
            # Always a token object: a service key, whatever the placement of key versions.
            ref = self._keystore.create(
                KeyMaterialSpec.SYMMETRIC_DEFAULT,
                MaterialName.key_version(IDENTITY_KEY_ID, 1),
                placement=KeyPlacement.TOKEN,
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
                with self._read() as conn:
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
        with self._read() as conn:
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
            # Microseconds: a rotated key is ordered after the key it replaces, even within a
            # second (rows made before keep whole seconds, which sort first within theirs).
            "created_at": self._clock().astimezone(dt.UTC).isoformat(timespec="microseconds"),
            **self._sealed_values(self._wrapping(), access_key_id, arn, secret, policy),
        }

    # -- administration ---------------------------------------------------------------------

    def create(
        self,
        name: str,
        policy: str | None = None,
        *,
        access_key_id: str | None = None,
        secret: str | None = None,
    ) -> IssuedCredential:
        """Add a user principal ``name`` with a new access key; the secret is returned once.

        ``policy`` is the user's identity policy (IAM JSON, stored as given); without one the
        user is allowed nothing that a key policy does not grant it by name. ``access_key_id``
        and ``secret`` (both or neither: a seed file's fixed credential) replace the generated
        ones; the caller decides how strong a secret it accepts.

        Raises ValidationException for a malformed name, access key id or secret,
        MalformedPolicyDocumentException for an invalid policy (nothing is stored),
        DuplicateCredential when the name or the access key id is taken.
        """
        check_credential(name, policy, access_key_id=access_key_id, secret=secret)
        taken = f"named {name!r}"
        if access_key_id is None or secret is None:
            access_key_id, secret = generate_access_key_id(), generate_secret()
        else:
            taken += f" or with access key id {access_key_id}"
        arn = self.user_arn(name)
        values = self._row_values(access_key_id, name, arn, secret, policy)
        try:
            with self._changing() as conn:
                if conn.execute(select(_C.c.access_key_id).where(_C.c.name == name)).first():
                    raise DuplicateCredential(f"a credential named {name!r} already exists")
                conn.execute(insert(_C).values(**values))
        except IntegrityError:
            raise DuplicateCredential(f"a credential {taken} already exists") from None
        log.info(
            "credential_created",
            access_key_id=access_key_id,
            principal=arn,
            has_policy=policy is not None,
        )
        return IssuedCredential(access_key_id, secret, arn, name)

    def ensure_root(
        self,
        access_key_id: str | None = None,
        secret: str | None = None,
        *,
        allow_weak: bool = False,
    ) -> IssuedCredential | None:
        """Make sure the account root identity exists.

        Without ``access_key_id`` and ``secret``, a root access key is generated when the root
        has none. With them (``HSMKMS_ROOT_*``), they become the root's one access key —
        replacing whatever keys it had — unless the root already holds that key (then nothing
        changes: a second key added with :meth:`rotate` stays), or unless that key was retired
        with :meth:`delete` (then the values are ignored, and :meth:`retired_at` says since
        when: rotating the root needs no change to the environment, and a retired key never
        comes back). Returns the credential when this call created or replaced it, else None.

        A root secret shorter than :data:`MIN_ROOT_SECRET` characters — given, or kept from an
        earlier start — is refused (ValidationException) unless ``allow_weak``
        (``HSMKMS_ALLOW_WEAK_ROOT_SECRET``, for throwaway test servers); then it is logged as
        a warning (``weak_root_secret``, its length only).
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
        if secret is not None:
            self._check_root_secret(len(secret), allow_weak, given=True)
        with self._read() as conn:
            rows = conn.execute(select(_C).where(_C.c.name == ROOT_NAME)).all()
        if rows and access_key_id is None:
            for row in rows:
                current = self._unseal_row(row._mapping)
                if current is not None:
                    self._check_root_secret(len(current.secret), allow_weak, given=False)
            return None
        if access_key_id is not None:
            for row in rows:
                current = self._unseal_row(row._mapping)
                if current is not None and (current.access_key_id, current.secret) == (
                    access_key_id,
                    secret,
                ):
                    return None
            if self.retired_at(access_key_id) is not None:
                log.warning("root_environment_key_retired", access_key_id=access_key_id)
                return None
        if access_key_id is None or secret is None:
            access_key_id, secret = generate_access_key_id(), generate_secret()
        # The account root is never governed by an identity policy.
        values = self._row_values(access_key_id, ROOT_NAME, self.root_arn, secret)
        try:
            # The write lock: two processes setting the root at once take turns (on PostgreSQL
            # the second one's delete would otherwise miss the first one's new row).
            with self._changing() as conn:
                conn.execute(delete(_C).where(_C.c.name == ROOT_NAME))
                conn.execute(insert(_C).values(**values))
        except IntegrityError:
            raise DuplicateCredential(
                f"access key id {access_key_id} already belongs to another credential"
            ) from None
        log.info("root_credential_set", access_key_id=access_key_id)
        return IssuedCredential(access_key_id, secret, self.root_arn, ROOT_NAME)

    @staticmethod
    def _check_root_secret(length: int, allow_weak: bool, *, given: bool) -> None:
        if length >= MIN_ROOT_SECRET:
            return
        if not allow_weak:
            where = (
                "HSMKMS_ROOT_SECRET_ACCESS_KEY is"
                if given
                else "the root secret kept from an earlier HSMKMS_ROOT_SECRET_ACCESS_KEY is"
            )
            raise ValidationException(
                f"{where} shorter than {MIN_ROOT_SECRET} characters: use a longer one, or set "
                "HSMKMS_ALLOW_WEAK_ROOT_SECRET=1 for a throwaway test server"
            )
        log.warning("weak_root_secret", length=length, minimum=MIN_ROOT_SECRET)

    def root_secret_is_weak(self) -> bool:
        """Whether the root's secret is shorter than :data:`MIN_ROOT_SECRET` characters (for
        the health report; one token call)."""
        with self._read() as conn:
            rows = conn.execute(select(_C).where(_C.c.name == ROOT_NAME)).all()
        for row in rows:
            current = self._unseal_row(row._mapping)
            if current is not None and len(current.secret) < MIN_ROOT_SECRET:
                return True
        return False

    def retired_at(self, access_key_id: str) -> str | None:
        """When the root access key ``access_key_id`` was retired by :meth:`delete`, or None."""
        with self._read() as conn:
            found = conn.execute(
                select(_R.c.retired_at).where(_R.c.access_key_id == access_key_id)
            ).scalar()
        return None if found is None else str(found)

    def list(self) -> list[CredentialInfo]:
        """Every access key, without secrets, by name, then oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(*_INFO).order_by(_C.c.name, _C.c.created_at, _C.c.access_key_id)
            ).all()
        return [_info(r) for r in rows]

    @staticmethod
    def _user_rows(conn: Connection, access_key_id_or_name: str, *, lock: bool = False) -> Any:
        """(the rows of the user an access key id or a name names, the row the access key id
        names or None); raises UnknownCredential when there is none."""
        by_id = select(_C).where(_C.c.access_key_id == access_key_id_or_name)
        row = conn.execute(by_id.with_for_update() if lock else by_id).mappings().first()
        name = str(row["name"]) if row is not None else access_key_id_or_name
        by_name = select(_C).where(_C.c.name == name).order_by(_C.c.created_at, _C.c.access_key_id)
        rows = list(conn.execute(by_name.with_for_update() if lock else by_name).mappings())
        if not rows:
            raise UnknownCredential(f"no credential {access_key_id_or_name!r}")
        return rows, row

    def rotate(self, access_key_id_or_name: str) -> IssuedCredential:
        """Give a user (or the account root) a second access key, with the same principal and
        identity policy; the secret is returned once. The first key keeps working until it is
        deleted: an application moves to the new one without downtime. At most
        :data:`MAX_ACCESS_KEYS` per user (``LimitExceededException``, AWS IAM's quota)."""
        with self._changing() as conn:
            rows, _ = self._user_rows(conn, access_key_id_or_name, lock=True)
            name = str(rows[0]["name"])
            if len(rows) >= MAX_ACCESS_KEYS:
                keys = ", ".join(str(r["access_key_id"]) for r in rows)
                raise LimitExceededException(
                    f"{name} has {len(rows)} access keys ({keys}), the most a user may hold: "
                    "delete one first"
                )
            current = rows[0]
            if self._open(current, warn=False) is None:
                raise CredentialIntegrityError(
                    f"the credential {current['access_key_id']} does not open (its database row "
                    "was altered): delete it and create a new one"
                )
            arn = str(current["principal_arn"])
            policy = None if current["policy"] is None else str(current["policy"])
            access_key_id, secret = generate_access_key_id(), generate_secret()
            conn.execute(
                insert(_C).values(**self._row_values(access_key_id, name, arn, secret, policy))
            )
        log.info("credential_rotated", access_key_id=access_key_id, principal=arn)
        return IssuedCredential(access_key_id, secret, arn, name)

    def delete(self, access_key_id_or_name: str) -> CredentialInfo:
        """Delete an access key named by its id, or by its user's name when the user holds one
        key; it stops working at once. A root key can be deleted only while the root holds
        another (:meth:`rotate` first); it is then retired for good (:meth:`retired_at`)."""
        with self._changing() as conn:
            rows, by_id = self._user_rows(conn, access_key_id_or_name)
            if by_id is None and len(rows) > 1:
                keys = ", ".join(
                    f"{r['access_key_id']} (made {_shown(r['created_at'])})" for r in rows
                )
                raise ValidationException(
                    f"{access_key_id_or_name} has {len(rows)} access keys: name the one to "
                    f"delete by its access key id: {keys}"
                )
            row = by_id if by_id is not None else rows[0]
            is_root = row["name"] == ROOT_NAME
            if is_root and len(rows) == 1:
                raise ValidationException(
                    "the account root's only access key cannot be deleted: give the root a "
                    "second one first (hsmkms credentials rotate root), or set "
                    "HSMKMS_ROOT_ACCESS_KEY_ID and HSMKMS_ROOT_SECRET_ACCESS_KEY to replace it"
                )
            conn.execute(delete(_C).where(_C.c.access_key_id == row["access_key_id"]))
            if is_root:
                conn.execute(
                    insert(_R).values(
                        access_key_id=row["access_key_id"],
                        principal_arn=row["principal_arn"],
                        retired_at=self._clock().astimezone(dt.UTC).isoformat(timespec="seconds"),
                    )
                )
            info = CredentialInfo(
                str(row["access_key_id"]),
                str(row["name"]),
                str(row["principal_arn"]),
                _shown(row["created_at"]),
                row["policy"] is not None,
            )
        self._forget(info.access_key_id)
        log.info(
            "credential_deleted", access_key_id=info.access_key_id, principal=info.principal_arn
        )
        return info

    def set_policy(self, access_key_id_or_name: str, policy: str | None) -> CredentialInfo:
        """Attach ``policy`` (IAM JSON, stored as given) to a user, replacing its identity
        policy, on each of its access keys; ``None`` removes it. Takes effect at once, in every
        process.

        Each secret is unsealed and sealed again under the new policy in one transaction.
        Raises MalformedPolicyDocumentException for an invalid policy, UnknownCredential,
        ValidationException for the account root (not governed by identity policies), and
        CredentialIntegrityError when a stored credential does not open (altered row).
        """
        if policy is not None:
            validate_identity_policy(policy)
        with self._changing() as conn:
            rows, _ = self._user_rows(conn, access_key_id_or_name, lock=True)
            first = rows[0]
            if first["name"] == ROOT_NAME or str(first["principal_arn"]) == self.root_arn:
                raise ValidationException(
                    "the account root is not governed by identity policies: it may do "
                    "whatever key policies allow the account"
                )
            for row in rows:
                access_key_id = str(row["access_key_id"])
                arn = str(row["principal_arn"])
                secret = self._open(row, warn=False)
                if secret is None:
                    raise CredentialIntegrityError(
                        f"the credential {access_key_id} does not open (its database row was "
                        "altered): delete it and create a new one"
                    )
                ref = KeyMaterialRef.from_str(str(row["wrapping_key"]))
                values = self._sealed_values(ref, access_key_id, arn, secret, policy)
                conn.execute(update(_C).where(_C.c.access_key_id == access_key_id).values(**values))
        for row in rows:
            self._forget(str(row["access_key_id"]))
        log.info(
            "credential_policy_set",
            access_key_id=str(first["access_key_id"]),
            principal=str(first["principal_arn"]),
            has_policy=policy is not None,
        )
        return CredentialInfo(
            str(first["access_key_id"]),
            str(first["name"]),
            str(first["principal_arn"]),
            _shown(first["created_at"]),
            policy is not None,
        )

    def get_policy(self, access_key_id_or_name: str) -> tuple[CredentialInfo, str | None]:
        """A credential and its identity policy (None: it has none), checked to be the policy
        the credential was sealed with.

        Raises UnknownCredential, and CredentialIntegrityError when the row was altered.
        """
        with self._read() as conn:
            rows, by_id = self._user_rows(conn, access_key_id_or_name)
        row = by_id if by_id is not None else rows[0]
        credential = self._unseal_row(row, warn=False)
        if credential is None:
            raise CredentialIntegrityError(
                f"the credential {row['access_key_id']} does not open (its database row was "
                "altered): delete it and create a new one"
            )
        info = CredentialInfo(
            credential.access_key_id,
            str(row["name"]),
            credential.principal_arn,
            _shown(row["created_at"]),
            credential.identity_policy is not None,
        )
        return info, credential.identity_policy

    # -- lookup (every request) -------------------------------------------------------------

    def lookup(self, access_key_id: str) -> Credential | None:
        """The credential of ``access_key_id`` with its identity policy, or None when unknown
        or when its row does not open (altered in the database) — the SigV4 lookup.

        Reads the database unless nothing changed since the answer was last confirmed; unseals
        (one token call) only when the row is new or changed.
        """
        if not _ACCESS_KEY_ID.fullmatch(access_key_id):
            return None
        return self._confirmed.get(access_key_id, lambda: self._load(access_key_id))

    def _load(self, access_key_id: str) -> Credential | None:
        with self._read() as conn:
            row = conn.execute(select(_C).where(_C.c.access_key_id == access_key_id)).first()
            if row is not None:
                # A row is accepted only from the set the token last saw (module docstring).
                m = row._mapping
                ref = KeyMaterialRef.from_str(str(m["wrapping_key"]))
                sealing = (
                    str(m["access_key_id"]),
                    bytes(m["secret_iv"]),
                    bytes(m["secret_sealed"]),
                )
                if not self._anchor.holds(conn, ref, sealing):
                    row = None
        credential = None if row is None else self._unseal_row(row._mapping)
        if credential is None:
            with self._lock:
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
