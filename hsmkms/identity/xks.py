"""The XKS proxy credentials: the SigV4 access keys AWS KMS (or a test client) signs XKS proxy
API requests with, one URI path prefix each (``/<prefix>/kms/xks/v1``).

They are not principals of the account (an external key store authenticates KMS itself, not a
user), so they live apart from :mod:`hsmkms.identity.store`, but are kept the same way: each
secret sealed by a dedicated key inside the token (created on first use), unsealed only in
memory; the database never holds a secret in the clear.

Tables (migrated by the database layer's runner as component ``xks_credentials``)::

    xks_meta         name -> value: ``wrapping_key`` (KeyMaterialRef text)
    xks_credentials  access_key_id (PK), prefix (indexed; at most :data:`MAX_PER_PREFIX` rows
                     each), secret_iv, secret_sealed, wrapping_key, created_at

Sealing: ``(iv, sealed) = keystore.encrypt(wrapping_key, secret, aad)`` with::

    aad = b"hsmkms:xks:v1" 0x00 access_key_id 0x00 prefix

so a sealed secret copied onto another row (another key id or prefix) does not open: such a row
is treated as an unknown access key (fail closed; logged as ``xks_credential_integrity_failed``).

Freshness, as for the KMS API's credentials (:class:`hsmkms.identity.anchor.SetAnchor`): the
token anchors a digest of the credential set (``xks:<wrapping key id>``), each change writes it
pending before its commit and as the anchor after it, and a lookup accepts a row only from the
anchored set, so an older copy of the database put back does not bring deleted credentials
back (``xks_credentials_stale`` in the log; ``hsmkms xks credentials trust`` vouches for a set
restored on purpose).

Security contract: no secret appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import string
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Final

import structlog
from sqlalchemy import (
    Column,
    Connection,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError

from hsmkms.db import Component, Database, ErrorMessages, Migration, migrate
from hsmkms.errors import (
    AccessDeniedException,
    KMSInternalException,
    LimitExceededException,
    NotFoundException,
    ValidationException,
)
from hsmkms.identity.anchor import SetAnchor
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName
from hsmkms.keystore.config import KeyPlacement
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.policy.context import ContextInput, request_context
from hsmkms.policy.document import PolicyDocument, account_of, parse_policy
from hsmkms.policy.evaluate import AccessRequest, Outcome, evaluate
from hsmkms.types import Clock, Credential, utc_now

__all__ = [
    "COMPONENT",
    "MAX_PER_PREFIX",
    "PREFIX",
    "XKS_KEY_ID",
    "IssuedXksCredential",
    "UnknownXksCredential",
    "XksCredential",
    "XksCredentialInfo",
    "XksCredentialStore",
    "XksCredentialsStale",
    "check_prefix",
    "secondary_request",
    "uri_path",
]

log = structlog.get_logger(__name__)

# spec: XKS proxy API — the path prefix is up to 128 characters of [A-Za-z0-9/_-] (botocore's
# XksProxyUriPath pattern: ^(/[a-zA-Z0-9\/_-]+/kms/xks/v\d{1,2})$). Leading and trailing
# slashes and empty segments are refused here, so one prefix has one spelling.
PREFIX: Final = re.compile(r"(?=.{1,128}\Z)[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
MAX_PER_PREFIX: Final = 2
"""Credentials a prefix may hold at once: two, so that they can be rotated (spec: XKS proxy
API, at least two per prefix)."""
XKS_KEY_ID: Final = "xks-credentials"
"""The ``key_id`` of the wrapping key (token label ``hsmkms:xkscredentials:1``)."""
# spec: XKS proxy API — access key id 20-30 of [A-Z2-7], secret 43-64 of [A-Za-z0-9/+=].
_ACCESS_KEY_ID: Final = re.compile(r"[A-Z2-7]{20,30}")
_BASE32: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits + "+/"
_ID_LENGTH: Final = 24
_SECRET_LENGTH: Final = 48
_AAD_PREFIX: Final = b"hsmkms:xks:v1"
_DIGEST_PREFIX: Final = b"hsmkms:xks-set:v1"
# Writers take turns (PostgreSQL advisory lock), so "at most two per prefix" holds. "hsmkmsX"
_WRITE_LOCK: Final = 0x68736D6B6D7358
_ERRORS = ErrorMessages(
    busy="The XKS credentials store is busy.",
    failed="The XKS credentials store failed.",
    unavailable="The XKS credentials store is unavailable.",
    handled=(IntegrityError,),
)

metadata = MetaData()
xks_meta = Table(
    "xks_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
xks_credentials = Table(
    "xks_credentials",
    metadata,
    Column("access_key_id", String(30), primary_key=True),
    Column("prefix", String(128), nullable=False),
    Column("secret_iv", LargeBinary, nullable=False),
    Column("secret_sealed", LargeBinary, nullable=False),
    Column("wrapping_key", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Index("ix_xks_credentials_prefix", "prefix"),
)
_X = xks_credentials


xks_policies = Table(
    "xks_policies",
    metadata,
    Column("prefix", String(128), primary_key=True),
    Column("policy", Text, nullable=False),
    Column("updated_at", String(40), nullable=False),
)
_P = xks_policies


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True, tables=[xks_meta, xks_credentials])


def _v2_policies(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True, tables=[xks_policies])


COMPONENT: Final = Component(
    "xks_credentials",
    [
        Migration(1, "xks_meta, xks_credentials", _v1_initial),
        Migration(2, "xks_policies", _v2_policies),
    ],
)


def uri_path(prefix: str) -> str:
    """The XKS proxy URI path of a prefix: ``/<prefix>/kms/xks/v1``."""
    return f"/{prefix}/kms/xks/v1"


class UnknownXksCredential(NotFoundException):
    """No XKS credential has this access key id."""


class XksCredentialsStale(KMSInternalException):
    """The XKS credential set is not the one the token last saw (an older copy of the
    database): nothing was changed."""


def _stale() -> XksCredentialsStale:
    return XksCredentialsStale(
        "the XKS credentials in the database are not those the token last saw (an older copy "
        "of the database?): check them with 'hsmkms xks credentials list', then vouch for them "
        "with 'hsmkms xks credentials trust'"
    )


@dataclasses.dataclass(frozen=True)
class XksCredentialInfo:
    """A stored XKS credential without its secret."""

    access_key_id: str
    prefix: str
    created_at: str

    @property
    def uri_path(self) -> str:
        return uri_path(self.prefix)


@dataclasses.dataclass(frozen=True)
class IssuedXksCredential:
    """An XKS credential just created: the only time its secret is shown."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    prefix: str

    @property
    def uri_path(self) -> str:
        return uri_path(self.prefix)


@dataclasses.dataclass(frozen=True)
class XksCredential:
    """What the SigV4 lookup of the XKS front door gets: the credential and its prefix."""

    credential: Credential
    prefix: str


def _aad(access_key_id: str, prefix: str) -> bytes:
    return b"\x00".join((_AAD_PREFIX, access_key_id.encode(), prefix.encode()))


def check_prefix(prefix: str) -> str:
    """``prefix`` unchanged when it is a valid XKS URI path prefix; ValidationException
    otherwise."""
    if not PREFIX.fullmatch(prefix):
        raise ValidationException(
            "an XKS URI path prefix is 1-128 characters of letters, digits and /_- (no leading, "
            "trailing or double slash)"
        )
    return prefix


class XksCredentialStore:
    """XKS access keys in SQL, secrets sealed by a key in the token. Thread-safe.

    ``database`` is the metadata store's :class:`~hsmkms.db.Database` (shared; not closed
    here). Tables are created when missing; the wrapping key is created on the first
    credential. What every request reads (the prefix, its policy, the credential's row) is
    kept in a read cache while the database's change signal says nothing was committed, and a
    secret is unsealed again only when its row's sealed contents changed, so a credential or
    policy created or deleted in another process takes effect on the next request.
    """

    def __init__(self, database: Database, keystore: Keystore, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._keystore = keystore
        self._clock = clock
        self._lock = threading.Lock()
        self._wrapping_key: KeyMaterialRef | None = None
        # access key id -> (the row's sealed contents, what they opened to)
        self._unsealed: dict[str, tuple[tuple[Any, ...], XksCredential]] = {}
        # prefix -> (the policy's text, the document parsed)
        self._policies: dict[str, tuple[str, PolicyDocument]] = {}
        # What every request reads (a prefix's existence and policy, a credential's row),
        # kept while the database's change signal says nothing was committed: a change by any
        # process applies to the next request.
        self._reads = self._db.read_cache(check_interval=0, max_entries=4096, keep_none=True)
        self._anchor = SetAnchor(
            keystore, _X, id_column="access_key_id", domain=_DIGEST_PREFIX, name="xks",
            event="xks_credentials",
        )  # fmt: skip
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            migrate(conn, COMPONENT, clock)

    def __repr__(self) -> str:
        return "XksCredentialStore()"

    # -- the wrapping key -------------------------------------------------------------------

    def _wrapping(self) -> KeyMaterialRef:
        """The wrapping key's reference, creating the key in the token the first time."""
        if self._wrapping_key is not None:
            return self._wrapping_key
        with self._db.read(_ERRORS) as conn:
            stored = self._read_wrapping(conn)
        if stored is None:
            ref = self._keystore.create(
                KeyMaterialSpec.SYMMETRIC_DEFAULT,
                MaterialName.key_version(XKS_KEY_ID, 1),
                placement=KeyPlacement.TOKEN,
            )
            try:
                with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
                    conn.execute(insert(xks_meta).values(name="wrapping_key", value=ref.to_str()))
                stored = ref
            except IntegrityError:
                self._keystore.destroy(ref)  # another process created it first
                with self._db.read(_ERRORS) as conn:
                    stored = self._read_wrapping(conn)
                if stored is None:  # pragma: no cover - the row was just seen
                    raise KMSInternalException("the XKS wrapping key vanished") from None
        self._wrapping_key = stored
        return stored

    @staticmethod
    def _read_wrapping(conn: Connection) -> KeyMaterialRef | None:
        value = conn.execute(
            select(xks_meta.c.value).where(xks_meta.c.name == "wrapping_key")
        ).scalar()
        return None if value is None else KeyMaterialRef.from_str(value)

    # -- administration ---------------------------------------------------------------------

    def create(self, prefix: str) -> IssuedXksCredential:
        """A new credential for ``prefix``; the secret is returned once.

        Raises ValidationException for a malformed prefix, LimitExceededException when the
        prefix holds :data:`MAX_PER_PREFIX` credentials already (delete one first)."""
        check_prefix(prefix)
        access_key_id = "".join(secrets.choice(_BASE32) for _ in range(_ID_LENGTH))
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
        ref = self._wrapping()
        iv, sealed = self._keystore.encrypt(ref, secret.encode(), _aad(access_key_id, prefix))
        values = {
            "access_key_id": access_key_id,
            "prefix": prefix,
            "secret_iv": iv,
            "secret_sealed": sealed,
            "wrapping_key": ref.to_str(),
            "created_at": self._clock().astimezone(dt.UTC).isoformat(timespec="microseconds"),
        }
        with self._changing(ref) as conn:
            held = conn.execute(
                select(func.count()).select_from(_X).where(_X.c.prefix == prefix)
            ).scalar_one()
            if held >= MAX_PER_PREFIX:
                raise LimitExceededException(
                    f"the prefix {prefix!r} holds {MAX_PER_PREFIX} XKS credentials already: "
                    "delete one first"
                )
            conn.execute(insert(_X).values(**values))
        log.info("xks_credential_created", access_key_id=access_key_id, prefix=prefix)
        return IssuedXksCredential(access_key_id, secret, prefix)

    def list(self, prefix: str | None = None) -> list[XksCredentialInfo]:
        """The credentials (of ``prefix``, or all), by prefix and creation time; no secret."""
        query = select(_X.c.access_key_id, _X.c.prefix, _X.c.created_at).order_by(
            _X.c.prefix, _X.c.created_at
        )
        if prefix is not None:
            query = query.where(_X.c.prefix == prefix)
        with self._db.read(_ERRORS) as conn:
            rows = conn.execute(query).all()
        return [XksCredentialInfo(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def delete(self, access_key_id: str) -> XksCredentialInfo:
        """Delete a credential; it stops working at once. UnknownXksCredential when none has
        this id."""
        with self._changing(self._wrapping()) as conn:
            row = conn.execute(
                select(_X.c.access_key_id, _X.c.prefix, _X.c.created_at).where(
                    _X.c.access_key_id == access_key_id
                )
            ).first()
            if row is None:
                raise UnknownXksCredential(
                    f"no XKS credential has the access key id {_shown(access_key_id)}"
                )
            conn.execute(delete(_X).where(_X.c.access_key_id == access_key_id))
        with self._lock:
            self._unsealed.pop(access_key_id, None)
        log.info("xks_credential_deleted", access_key_id=access_key_id, prefix=str(row[1]))
        return XksCredentialInfo(str(row[0]), str(row[1]), str(row[2]))

    def _changing(self, ref: KeyMaterialRef) -> AbstractContextManager[Connection]:
        """A write transaction that changes the credential set, kept anchored in the token:
        an older copy of the set is not built on (XksCredentialsStale)."""
        return self._anchor.changing(self._db.write(_ERRORS, lock=_WRITE_LOCK), ref, _stale)

    def trust(self) -> int:
        """Vouch for the XKS credential set now in the database (``hsmkms xks credentials
        trust``, after restoring an older copy on purpose): it becomes the anchored set.
        Returns how many credentials it holds."""
        count = self._anchor.trust(
            self._db.write(_ERRORS, lock=_WRITE_LOCK), self._wrapping(), xks_meta
        )
        self._reads.invalidate()
        log.warning("xks_credentials_trusted", credentials=count)
        return count

    # -- secondary authorization ------------------------------------------------------------

    def put_policy(self, prefix: str, text: str) -> None:
        """Set the secondary authorization policy of ``prefix`` (replacing any): a key
        policy's shape (:func:`~hsmkms.policy.document.parse_policy`), decided against each
        request's ``requestMetadata`` (:meth:`authorize`). MalformedPolicyDocumentException
        or LimitExceededException for a document that is not one; ValidationException for a
        malformed prefix. Takes effect at the next request, in every process."""
        check_prefix(prefix)
        parse_policy(text)
        stamp = self._clock().astimezone(dt.UTC).isoformat(timespec="microseconds")
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            conn.execute(delete(_P).where(_P.c.prefix == prefix))
            conn.execute(insert(_P).values(prefix=prefix, policy=text, updated_at=stamp))
        log.info("xks_policy_put", prefix=prefix)

    def policy(self, prefix: str) -> str | None:
        """The secondary authorization policy of ``prefix`` as given, or None."""

        def load() -> str | None:
            with self._db.read(_ERRORS) as conn:
                found = conn.execute(select(_P.c.policy).where(_P.c.prefix == prefix)).scalar()
            return None if found is None else str(found)

        text: str | None = self._reads.get(("policy", prefix), load)
        return text

    def delete_policy(self, prefix: str) -> bool:
        """Remove the secondary authorization of ``prefix``; whether it had one."""
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            removed = conn.execute(delete(_P).where(_P.c.prefix == prefix)).rowcount
        log.info("xks_policy_deleted", prefix=prefix, removed=bool(removed))
        return bool(removed)

    def authorize(self, prefix: str, operation: str, request_metadata: Mapping[str, str]) -> None:
        """The optional secondary authorization (spec: XKS proxy API): when ``prefix`` has a
        policy, the request is allowed only if the policy allows ``kms:<kmsOperation>`` to
        ``awsPrincipalArn`` on ``kmsKeyArn`` (see :func:`secondary_request`); otherwise
        AccessDeniedException. Without a policy every authenticated request passes. The
        document is read through the read cache (a change in any process applies to the next
        request) and parsed once per text."""
        text = self.policy(prefix)
        if text is None:
            return
        with self._lock:
            cached = self._policies.get(prefix)
        if cached is None or cached[0] != text:
            cached = (text, parse_policy(text))
            with self._lock:
                self._policies[prefix] = cached
        decision = evaluate(cached[1], secondary_request(operation, request_metadata))
        if decision.outcome is not Outcome.ALLOW and not decision.delegated:
            raise AccessDeniedException(
                f"The XKS proxy's policy for {uri_path(prefix)} does not allow "
                f"{_shown(request_metadata.get('kmsOperation', ''))} by "
                f"{_shown(request_metadata.get('awsPrincipalArn', ''))}."
            )

    # -- every request ----------------------------------------------------------------------

    def has_prefix(self, prefix: str) -> bool:
        """Whether some credential names ``prefix`` (the XKS front door's routing)."""
        if not PREFIX.fullmatch(prefix):
            return False

        def load() -> bool:
            with self._db.read(_ERRORS) as conn:
                found = conn.execute(
                    select(_X.c.access_key_id).where(_X.c.prefix == prefix).limit(1)
                ).first()
            return found is not None

        held: bool = self._reads.get(("prefix", prefix), load)
        return held

    def lookup(self, access_key_id: str) -> XksCredential | None:
        """The credential of ``access_key_id`` with its prefix, or None when unknown or when its
        row does not open (altered in the database)."""
        if not _ACCESS_KEY_ID.fullmatch(access_key_id):
            return None

        def load() -> tuple[str, bytes, bytes, str] | None:
            with self._db.read(_ERRORS) as conn:
                row = conn.execute(select(_X).where(_X.c.access_key_id == access_key_id)).first()
                if row is None:
                    return None
                m = row._mapping
                # A row is accepted only from the set the token last saw (module docstring).
                ref = KeyMaterialRef.from_str(str(m["wrapping_key"]))
                sealing = (access_key_id, bytes(m["secret_iv"]), bytes(m["secret_sealed"]))
                if not self._anchor.holds(conn, ref, sealing):
                    return None
            return (
                str(m["prefix"]),
                bytes(m["secret_iv"]),
                bytes(m["secret_sealed"]),
                str(m["wrapping_key"]),
            )

        sealed: tuple[str, bytes, bytes, str] | None = self._reads.get(("row", access_key_id), load)
        if sealed is None:
            with self._lock:
                self._unsealed.pop(access_key_id, None)
            return None
        prefix = sealed[0]
        with self._lock:
            cached = self._unsealed.get(access_key_id)
        if cached is not None and cached[0] == sealed:
            return cached[1]
        try:
            secret = self._keystore.decrypt(
                KeyMaterialRef.from_str(sealed[3]),
                sealed[1],
                sealed[2],
                _aad(access_key_id, prefix),
            )
        except (DecryptionFailed, ValueError):
            log.warning("xks_credential_integrity_failed", access_key_id=access_key_id)
            return None
        found = XksCredential(
            Credential(access_key_id, secret.decode(), f"xks:{uri_path(prefix)}"), prefix
        )
        with self._lock:
            self._unsealed[access_key_id] = (sealed, found)
        return found

    def self_test(self) -> None:
        """A real operation in the token (the XKS health check): seal and open a probe with
        the wrapping key (created on first use). Raises what the token raises."""
        ref = self._wrapping()
        probe = secrets.token_bytes(16)
        iv, sealed = self._keystore.encrypt(ref, probe, _AAD_PREFIX + b"\x00health")
        if self._keystore.decrypt(ref, iv, sealed, _AAD_PREFIX + b"\x00health") != probe:
            raise KMSInternalException("the XKS health check's round trip did not match")

    def close(self) -> None:
        """Forget every unsealed secret."""
        with self._lock:
            self._unsealed.clear()


def secondary_request(operation: str, request_metadata: Mapping[str, str]) -> AccessRequest:
    """The question a prefix's secondary policy answers for one XKS request: may
    ``awsPrincipalArn`` do ``kms:<kmsOperation>`` on ``kmsKeyArn`` (the AWS KMS key; empty
    when the request names none)? Condition keys: ``aws:PrincipalArn``, ``kms:CallerAccount``,
    ``kms:ViaService``, ``aws:SourceVpc``, ``aws:SourceVpce`` (when the metadata carries
    them) and ``xks:Operation`` (GetKeyMetadata, Encrypt or Decrypt)."""
    principal = request_metadata.get("awsPrincipalArn", "")
    account = account_of(principal)
    extra: dict[str, ContextInput] = {"xks:Operation": operation}
    for member, key in _CONTEXT_KEYS:
        value = request_metadata.get(member)
        if value:
            extra[key] = value
    return AccessRequest(
        principal_arn=principal,
        principal_account=account,
        action=f"kms:{request_metadata.get('kmsOperation', '')}",
        resource=request_metadata.get("kmsKeyArn", ""),
        context=request_context(
            principal_arn=principal or None, caller_account=account or None, extra=extra
        ),
    )


_CONTEXT_KEYS: Final = (
    ("kmsViaService", "kms:ViaService"),
    ("awsSourceVpc", "aws:SourceVpc"),
    ("awsSourceVpce", "aws:SourceVpce"),
)


def _shown(value: str) -> str:
    """A client-given value as shown in a message: clipped, printable."""
    clipped = value[:64]
    return repr(clipped) if clipped.isprintable() else "(unprintable)"
