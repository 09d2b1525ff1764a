"""Custom key stores of type AWS_CLOUDHSM and the "clusters" (further PKCS#11 tokens) they are
backed by, in SQL; each store's password (the token's user PIN) sealed by a key in the default
token.

A cluster is registered by the operator (``hsmkms clusters add``), never by an API caller: it
names a PKCS#11 URI (module and token, never a PIN) and the trust anchor its token was found to
have (:func:`trust_anchor_of`). A custom key store (CreateCustomKeyStore) names one cluster and
holds the sealed password and its connection state, which every process of every node reads
here (ConnectCustomKeyStore sets CONNECTING, the connecting process CONNECTED or FAILED).

Tables (migrated by the database layer's runner as component ``custom_key_stores``)::

    cks_meta           name -> value: ``wrapping_key`` (KeyMaterialRef text)
    cloudhsm_clusters  cluster_id (PK), pkcs11_uri, trust_anchor, created_at
    custom_key_stores  store_id (PK), name (unique), store_type, cluster_id (unique),
                       password_iv, password_sealed, wrapping_key, created_at,
                       connection_state, connection_error_code, state_changed_at,
                       generation
    xks_proxies        store_id (PK), uri_endpoint, uri_path, access_key_id,
                       connectivity; unique (uri_endpoint, uri_path)   (migration 2)
    xks_keys           key_id (PK), store_id, xks_key_id; unique (store_id, xks_key_id)
                       (migration 2): the external key of each KMS key in an external store

An EXTERNAL_KEY_STORE has no cluster; its proxy is its ``xks_proxies`` row and the secret
access key of its XKS proxy authentication credential is sealed in the store's password
columns (the same sealing, bound to the store id).

``generation`` grows with every change of the password or the cluster, so a process holding a
connection made with the old ones opens a new one.

Sealing: ``(iv, sealed) = keystore.encrypt(wrapping_key, password, aad)`` with::

    aad = b"hsmkms:cks:v1" 0x00 store_id

so a sealed password copied onto another store's row does not open.

Security contract: no password appears in a ``repr``, a log line, an exception message or the
database in the clear.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import re
import threading
from collections.abc import Callable, Collection
from typing import Any, Final

import structlog
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from hsmkms.db import Component, Database, ErrorMessages, Migration, UTCDateTime, migrate
from hsmkms.errors import (
    AlreadyExistsException,
    CloudHsmClusterInUseException,
    CloudHsmClusterNotFoundException,
    CustomKeyStoreNameInUseException,
    CustomKeyStoreNotFoundException,
    KMSInternalException,
    XksKeyAlreadyInUseException,
    XksProxyUriInUseException,
)
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName, TokenIdentity
from hsmkms.keystore.config import KeyPlacement
from hsmkms.keystore.errors import DecryptionFailed
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.types import Clock, utc_now

__all__ = [
    "CLUSTER_ID",
    "COMPONENT",
    "ClusterInUse",
    "ClusterRecord",
    "CustomKeyStoreRecord",
    "CustomKeyStoreTable",
    "XksProxyConfig",
    "token_identity_of",
    "trust_anchor_of",
]

log = structlog.get_logger(__name__)

CLUSTER_ID: Final = re.compile(r"cluster-[2-7a-zA-Z]{11,16}")
"""botocore's CloudHsmClusterIdType pattern."""
CKS_KEY_ID: Final = "cks-passwords"
"""The ``key_id`` of the wrapping key (token label ``hsmkms:ckspasswords:1``)."""
_AAD_PREFIX: Final = b"hsmkms:cks:v1"
_ANCHOR_LABEL: Final = "HSMKMS TOKEN IDENTITY"
# Writers take turns (PostgreSQL advisory lock): names and clusters stay unique. "hsmkmsC"
_WRITE_LOCK: Final = 0x68736D6B6D7343
_ERRORS = ErrorMessages(
    busy="The custom key store table is busy.",
    failed="The custom key store table failed.",
    unavailable="The custom key store table is unavailable.",
    handled=(IntegrityError,),
)

metadata = MetaData()
cks_meta = Table(
    "cks_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
cloudhsm_clusters = Table(
    "cloudhsm_clusters",
    metadata,
    Column("cluster_id", String(24), primary_key=True),
    Column("pkcs11_uri", Text, nullable=False),
    Column("trust_anchor", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)
custom_key_stores = Table(
    "custom_key_stores",
    metadata,
    Column("store_id", String(64), primary_key=True),
    Column("name", String(256), nullable=False, unique=True),
    Column("store_type", String(32), nullable=False),
    Column("cluster_id", String(24), nullable=True, unique=True),
    Column("password_iv", LargeBinary, nullable=False),
    Column("password_sealed", LargeBinary, nullable=False),
    Column("wrapping_key", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("connection_state", String(16), nullable=False),
    Column("connection_error_code", String(64), nullable=True),
    Column("state_changed_at", UTCDateTime, nullable=False),
    Column("generation", Integer, nullable=False),
)
xks_proxies = Table(
    "xks_proxies",
    metadata,
    Column("store_id", String(64), primary_key=True),
    Column("uri_endpoint", String(128), nullable=False),
    Column("uri_path", String(128), nullable=False),
    Column("access_key_id", String(30), nullable=False),
    Column("connectivity", String(32), nullable=False),
    UniqueConstraint("uri_endpoint", "uri_path", name="xks_proxies_uri"),
)
xks_keys = Table(
    "xks_keys",
    metadata,
    Column("key_id", String(36), primary_key=True),
    Column("store_id", String(64), nullable=False),
    Column("xks_key_id", String(128), nullable=False),
    UniqueConstraint("store_id", "xks_key_id", name="xks_keys_in_store"),
)
_C = cloudhsm_clusters
_S = custom_key_stores
_X = xks_proxies
_K = xks_keys


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=[cks_meta, _C, _S], checkfirst=True)


def _v2_xks_proxies(conn: Connection) -> None:
    metadata.create_all(conn, tables=[_X, xks_keys], checkfirst=True)


COMPONENT: Final = Component(
    "custom_key_stores",
    [
        Migration(1, "cks_meta, cloudhsm_clusters, custom_key_stores", _v1_initial),
        Migration(2, "xks_proxies, xks_keys", _v2_xks_proxies),
    ],
)


def trust_anchor_of(identity: TokenIdentity) -> str:
    """The trust anchor of a token: a PEM block (``HSMKMS TOKEN IDENTITY``) holding the
    canonical JSON of what the token says it is (manufacturer, model, serial, label) and its
    SHA-256. Deterministic: the same token gives the same text; a re-initialized token (a new
    serial) or another token with the same label gives another. It identifies the token, it is
    not a cryptographic proof (a token reports its own serial)."""
    facts = {
        "v": 1,
        "manufacturer": identity.manufacturer,
        "model": identity.model,
        "serial": identity.serial,
        "label": identity.label,
    }
    body = json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()
    facts["sha256"] = hashlib.sha256(body).hexdigest()
    data = base64.b64encode(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode())
    text = data.decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {_ANCHOR_LABEL}-----", *lines, f"-----END {_ANCHOR_LABEL}-----"])


def token_identity_of(trust_anchor: str) -> TokenIdentity | None:
    """The token identity a trust anchor (:func:`trust_anchor_of`) records: what the token
    said it was when ``hsmkms clusters add`` registered it. None when the text is not such a
    block or its SHA-256 does not match its facts (altered)."""
    lines = [line.strip() for line in trust_anchor.strip().splitlines()]
    if (
        len(lines) < 3
        or lines[0] != f"-----BEGIN {_ANCHOR_LABEL}-----"
        or lines[-1] != f"-----END {_ANCHOR_LABEL}-----"
    ):
        return None
    try:
        facts = json.loads(base64.b64decode("".join(lines[1:-1]), validate=True))
    except (ValueError, TypeError):
        return None
    if not isinstance(facts, dict) or facts.get("v") != 1:
        return None
    names = ("manufacturer", "model", "serial", "label")
    if not all(isinstance(facts.get(n), str) for n in names):
        return None
    body = {"v": 1, **{n: facts[n] for n in names}}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    if facts.get("sha256") != digest.hexdigest():
        return None
    return TokenIdentity(*(str(facts[n]) for n in names))


class ClusterInUse(CloudHsmClusterInUseException):
    """A custom key store uses the cluster: it cannot be removed."""


@dataclasses.dataclass(frozen=True)
class ClusterRecord:
    """A registered cluster: a token reached by a PKCS#11 URI (no PIN in it)."""

    cluster_id: str
    pkcs11_uri: str
    trust_anchor: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class CustomKeyStoreRecord:
    """A custom key store's row, without its password."""

    store_id: str
    name: str
    store_type: str
    cluster_id: str | None
    created_at: dt.datetime
    connection_state: str
    connection_error_code: str | None
    generation: int
    state_changed_at: dt.datetime | None = None
    xks: XksProxyConfig | None = None
    """An external key store's proxy (None for AWS_CLOUDHSM)."""


@dataclasses.dataclass(frozen=True)
class XksProxyConfig:
    """An external key store's proxy, without the secret access key."""

    uri_endpoint: str
    uri_path: str
    access_key_id: str
    connectivity: str


def _store_from(m: Any) -> CustomKeyStoreRecord:
    xks = None
    if m["uri_endpoint"] is not None:
        xks = XksProxyConfig(
            str(m["uri_endpoint"]),
            str(m["uri_path"]),
            str(m["access_key_id"]),
            str(m["connectivity"]),
        )
    return CustomKeyStoreRecord(
        store_id=str(m["store_id"]),
        name=str(m["name"]),
        store_type=str(m["store_type"]),
        cluster_id=None if m["cluster_id"] is None else str(m["cluster_id"]),
        created_at=m["created_at"],
        connection_state=str(m["connection_state"]),
        connection_error_code=(
            None if m["connection_error_code"] is None else str(m["connection_error_code"])
        ),
        generation=int(m["generation"]),
        state_changed_at=m["state_changed_at"],
        xks=xks,
    )


def _cluster_from(m: Any) -> ClusterRecord:
    return ClusterRecord(
        str(m["cluster_id"]), str(m["pkcs11_uri"]), str(m["trust_anchor"]), m["created_at"]
    )


def _aad(store_id: str) -> bytes:
    return b"\x00".join((_AAD_PREFIX, store_id.encode()))


_STORE_COLUMNS = (
    _S.c.store_id, _S.c.name, _S.c.store_type, _S.c.cluster_id, _S.c.created_at,
    _S.c.connection_state, _S.c.connection_error_code, _S.c.generation, _S.c.state_changed_at,
    _X.c.uri_endpoint, _X.c.uri_path, _X.c.access_key_id, _X.c.connectivity,
)  # fmt: skip


def _select_stores() -> Any:
    """A store's row with its proxy's, when it has one."""
    return select(*_STORE_COLUMNS).select_from(_S.outerjoin(_X, _X.c.store_id == _S.c.store_id))


class CustomKeyStoreTable:
    """Clusters and custom key stores in SQL, passwords sealed by a key in the default token.
    Thread-safe. Every read goes to the database (a store's row through a read cache kept
    while the database's change signal shows no commit), so a change made by another process
    (``hsmkms clusters add``, another worker's Connect) is seen at once.

    ``database`` is the metadata store's :class:`~hsmkms.db.Database` (shared; not closed
    here); ``keystore`` the default token (seals passwords). Tables are created when missing;
    the wrapping key on the first store.
    """

    def __init__(self, database: Database, keystore: Keystore, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._keystore = keystore
        self._clock = clock
        self._lock = threading.Lock()
        self._wrapping_key: KeyMaterialRef | None = None
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            migrate(conn, COMPONENT, clock)
        # Every use of a store's key reads its row: answered from memory while the database's
        # change signal says nothing was committed since (asked on every read, so a change by
        # another process is seen at once).
        self._cache = self._db.read_cache(check_interval=0.0, max_entries=1024)

    def __repr__(self) -> str:
        return "CustomKeyStoreTable()"

    # -- clusters -----------------------------------------------------------------------------

    def add_cluster(self, cluster_id: str, pkcs11_uri: str, trust_anchor: str) -> ClusterRecord:
        """Register a cluster; AlreadyExistsException when the id is registered already. The
        same token may be registered under several ids (UpdateCustomKeyStore moves a store to
        another id of its token); only one store may use a token."""
        record = ClusterRecord(cluster_id, pkcs11_uri, trust_anchor, self._clock())
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            found = conn.execute(select(_C.c.cluster_id).where(_C.c.cluster_id == cluster_id))
            if found.first() is not None:
                raise AlreadyExistsException(f"cluster {cluster_id} is registered already")
            conn.execute(insert(_C).values(**dataclasses.asdict(record)))
        log.info("cluster_added", cluster_id=cluster_id)
        return record

    def clusters(self) -> list[ClusterRecord]:
        """Every registered cluster, by id."""
        with self._db.read(_ERRORS) as conn:
            rows = conn.execute(select(_C).order_by(_C.c.cluster_id)).all()
        return [_cluster_from(r._mapping) for r in rows]

    def cluster(self, cluster_id: str) -> ClusterRecord | None:
        """The cluster ``cluster_id``, or None."""
        with self._db.read(_ERRORS) as conn:
            row = conn.execute(select(_C).where(_C.c.cluster_id == cluster_id)).first()
        return None if row is None else _cluster_from(row._mapping)

    def remove_cluster(self, cluster_id: str) -> ClusterRecord:
        """Forget a cluster. CloudHsmClusterNotFoundException when unknown; :class:`ClusterInUse`
        while a custom key store names it."""
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            row = conn.execute(select(_C).where(_C.c.cluster_id == cluster_id)).first()
            if row is None:
                raise CloudHsmClusterNotFoundException(f"no cluster {cluster_id} is registered")
            user = conn.execute(select(_S.c.store_id).where(_S.c.cluster_id == cluster_id)).first()
            if user is not None:
                raise ClusterInUse(
                    f"cluster {cluster_id} is used by custom key store {user[0]}: delete the "
                    "key store first"
                )
            conn.execute(delete(_C).where(_C.c.cluster_id == cluster_id))
        log.info("cluster_removed", cluster_id=cluster_id)
        return _cluster_from(row._mapping)

    # -- the wrapping key ---------------------------------------------------------------------

    def _wrapping(self) -> KeyMaterialRef:
        """The wrapping key's reference, creating the key in the token the first time."""
        with self._lock:
            if self._wrapping_key is not None:
                return self._wrapping_key
        with self._db.read(_ERRORS) as conn:
            stored = self._read_wrapping(conn)
        if stored is None:
            ref = self._keystore.create(
                KeyMaterialSpec.SYMMETRIC_DEFAULT,
                MaterialName.key_version(CKS_KEY_ID, 1),
                placement=KeyPlacement.TOKEN,
            )
            try:
                with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
                    conn.execute(insert(cks_meta).values(name="wrapping_key", value=ref.to_str()))
                stored = ref
            except IntegrityError:
                self._keystore.destroy(ref)  # another process created it first
                with self._db.read(_ERRORS) as conn:
                    stored = self._read_wrapping(conn)
                if stored is None:  # pragma: no cover - the row was just seen
                    raise KMSInternalException("the key store wrapping key vanished") from None
        with self._lock:
            self._wrapping_key = stored
        return stored

    @staticmethod
    def _read_wrapping(conn: Connection) -> KeyMaterialRef | None:
        value = conn.execute(
            select(cks_meta.c.value).where(cks_meta.c.name == "wrapping_key")
        ).scalar()
        return None if value is None else KeyMaterialRef.from_str(value)

    def _seal(self, store_id: str, password: str) -> dict[str, Any]:
        ref = self._wrapping()
        iv, sealed = self._keystore.encrypt(ref, password.encode(), _aad(store_id))
        return {"password_iv": iv, "password_sealed": sealed, "wrapping_key": ref.to_str()}

    # -- custom key stores --------------------------------------------------------------------

    def create(
        self, store_id: str, name: str, store_type: str, cluster_id: str, password: str
    ) -> CustomKeyStoreRecord:
        """Add a DISCONNECTED store. CustomKeyStoreNameInUseException,
        CloudHsmClusterInUseException, CloudHsmClusterNotFoundException."""
        sealed = self._seal(store_id, password)
        values = {
            "store_id": store_id,
            "name": name,
            "store_type": store_type,
            "cluster_id": cluster_id,
            "created_at": self._clock(),
            "connection_state": "DISCONNECTED",
            "connection_error_code": None,
            "state_changed_at": self._clock(),
            "generation": 1,
            **sealed,
        }
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            if (
                conn.execute(select(_C.c.cluster_id).where(_C.c.cluster_id == cluster_id)).first()
                is None
            ):
                raise CloudHsmClusterNotFoundException(f"Cluster '{cluster_id}' does not exist.")
            self._check_unique(conn, store_id, name=name, cluster_id=cluster_id)
            conn.execute(insert(_S).values(**values))
            row = conn.execute(_select_stores().where(_S.c.store_id == store_id)).one()
        log.info("custom_key_store_created", store_id=store_id, cluster_id=cluster_id)
        return _store_from(row._mapping)

    def create_external(
        self, store_id: str, name: str, proxy: XksProxyConfig, secret: str
    ) -> CustomKeyStoreRecord:
        """Add a DISCONNECTED EXTERNAL_KEY_STORE whose proxy is ``proxy`` and whose credential's
        secret is ``secret`` (sealed). CustomKeyStoreNameInUseException;
        XksProxyUriInUseException when another store uses the same endpoint and path."""
        sealed = self._seal(store_id, secret)
        now = self._clock()
        values = {
            "store_id": store_id,
            "name": name,
            "store_type": "EXTERNAL_KEY_STORE",
            "cluster_id": None,
            "created_at": now,
            "connection_state": "DISCONNECTED",
            "connection_error_code": None,
            "state_changed_at": now,
            "generation": 1,
            **sealed,
        }
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            self._check_unique(conn, store_id, name=name, cluster_id=None)
            used = conn.execute(
                select(_X.c.store_id).where(
                    (_X.c.uri_endpoint == proxy.uri_endpoint) & (_X.c.uri_path == proxy.uri_path)
                )
            ).first()
            if used is not None:
                # spec: AWS KMS CreateCustomKeyStore — XksProxyUriInUseException when the
                # endpoint and path are associated with another external key store.
                raise XksProxyUriInUseException(
                    f"The XKS proxy URI {proxy.uri_endpoint}{proxy.uri_path} is used by custom "
                    f"key store {used[0]}."
                )
            conn.execute(insert(_S).values(**values))
            conn.execute(insert(_X).values(store_id=store_id, **dataclasses.asdict(proxy)))
            row = conn.execute(_select_stores().where(_S.c.store_id == store_id)).one()
        log.info("external_key_store_created", store_id=store_id)
        return _store_from(row._mapping)

    def add_xks_key(
        self,
        key_id: str,
        store_id: str,
        xks_key_id: str,
        *,
        exists: Callable[[str], bool] = lambda _key_id: True,
    ) -> None:
        """Bind KMS key ``key_id`` to the external key ``xks_key_id`` of ``store_id``;
        XksKeyAlreadyInUseException when another KMS key of the store has it (a binding of a
        key that no longer ``exists`` is dropped instead)."""
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            used = conn.execute(
                select(_K.c.key_id).where(
                    (_K.c.store_id == store_id) & (_K.c.xks_key_id == xks_key_id)
                )
            ).first()
            if used is not None and not exists(str(used[0])):
                conn.execute(delete(_K).where(_K.c.key_id == used[0]))
                used = None
            if used is not None:
                raise XksKeyAlreadyInUseException(
                    f"The external key {xks_key_id} is used by KMS key {used[0]} of custom key "
                    f"store {store_id}."
                )
            conn.execute(insert(_K).values(key_id=key_id, store_id=store_id, xks_key_id=xks_key_id))

    def remove_xks_key(self, key_id: str) -> None:
        """Forget a KMS key's external key (the key is gone, or was never made)."""
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            conn.execute(delete(_K).where(_K.c.key_id == key_id))

    def xks_key(self, key_id: str) -> tuple[str, str] | None:
        """``(store id, XksKeyId)`` of a KMS key in an external key store, or None."""

        def load() -> tuple[str, str] | None:
            with self._db.read(_ERRORS) as conn:
                row = conn.execute(
                    select(_K.c.store_id, _K.c.xks_key_id).where(_K.c.key_id == key_id)
                ).first()
            return None if row is None else (str(row[0]), str(row[1]))

        return self._cache.get(("xks_key", key_id), load)

    def xks_keys_of(self, store_id: str) -> list[str]:
        """The KMS key ids bound to external keys of ``store_id``."""
        with self._db.read(_ERRORS) as conn:
            rows = conn.execute(select(_K.c.key_id).where(_K.c.store_id == store_id)).all()
        return [str(r[0]) for r in rows]

    @staticmethod
    def _check_unique(
        conn: Connection, store_id: str, *, name: str | None, cluster_id: str | None
    ) -> None:
        if name is not None:
            other = conn.execute(
                select(_S.c.store_id).where((_S.c.name == name) & (_S.c.store_id != store_id))
            ).first()
            if other is not None:
                raise CustomKeyStoreNameInUseException(
                    f"A custom key store with name '{name}' already exists."
                )
        if cluster_id is not None:
            # One store per token: no other store on this cluster, nor on another cluster id
            # of the same token (the same trust anchor).
            anchor = select(_C.c.trust_anchor).where(_C.c.cluster_id == cluster_id)
            same_token = select(_C.c.cluster_id).where(_C.c.trust_anchor.in_(anchor))
            other = conn.execute(
                select(_S.c.store_id).where(
                    (_S.c.cluster_id.in_(same_token) | (_S.c.cluster_id == cluster_id))
                    & (_S.c.store_id != store_id)
                )
            ).first()
            if other is not None:
                raise CloudHsmClusterInUseException(
                    f"Cluster '{cluster_id}' is associated with custom key store {other[0]}."
                )

    def get(self, store_id: str) -> CustomKeyStoreRecord | None:
        """The store ``store_id``, or None."""

        def load() -> CustomKeyStoreRecord | None:
            with self._db.read(_ERRORS) as conn:
                row = conn.execute(_select_stores().where(_S.c.store_id == store_id)).first()
            return None if row is None else _store_from(row._mapping)

        return self._cache.get(("store", store_id), load)

    def require(self, store_id: str) -> CustomKeyStoreRecord:
        """The store ``store_id``; CustomKeyStoreNotFoundException when none."""
        found = self.get(store_id)
        if found is None:
            raise CustomKeyStoreNotFoundException(
                f"Custom key store '{store_id[:64]}' does not exist."
            )
        return found

    def stores(self) -> list[CustomKeyStoreRecord]:
        """Every store, oldest first (ties by id)."""
        with self._db.read(_ERRORS) as conn:
            rows = conn.execute(_select_stores().order_by(_S.c.created_at, _S.c.store_id)).all()
        return [_store_from(r._mapping) for r in rows]

    def password(self, store_id: str) -> str:
        """The store's password, unsealed in memory. KMSInternalException when its row does
        not open (altered in the database)."""
        with self._db.read(_ERRORS) as conn:
            row = conn.execute(
                select(_S.c.password_iv, _S.c.password_sealed, _S.c.wrapping_key).where(
                    _S.c.store_id == store_id
                )
            ).first()
        if row is None:
            raise CustomKeyStoreNotFoundException(f"Custom key store '{store_id}' does not exist.")
        try:
            clear = self._keystore.decrypt(
                KeyMaterialRef.from_str(str(row[2])), bytes(row[0]), bytes(row[1]), _aad(store_id)
            )
        except (DecryptionFailed, ValueError):
            log.warning("custom_key_store_password_integrity_failed", store_id=store_id)
            raise KMSInternalException(
                f"the password of custom key store {store_id} does not open"
            ) from None
        return clear.decode()

    def set_state(
        self,
        store_id: str,
        state: str,
        *,
        expect: Collection[str] | None = None,
        error_code: str | None = None,
        generation: int | None = None,
        changed_before: dt.datetime | None = None,
    ) -> bool:
        """Compare and set the connection state: only when the current one is in ``expect``
        (any when None) and, when given, the generation is ``generation`` and the state was
        set before ``changed_before``. Whether it was set."""
        condition = _S.c.store_id == store_id
        if expect is not None:
            condition = condition & _S.c.connection_state.in_(list(expect))
        if generation is not None:
            condition = condition & (_S.c.generation == generation)
        if changed_before is not None:
            condition = condition & (_S.c.state_changed_at < changed_before)
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            done = conn.execute(
                update(_S)
                .where(condition)
                .values(
                    connection_state=state,
                    connection_error_code=error_code,
                    state_changed_at=self._clock(),
                )
            ).rowcount
        return bool(done)

    def update(
        self,
        store_id: str,
        *,
        check: Callable[[CustomKeyStoreRecord], None],
        name: str | None = None,
        password: str | None = None,
        cluster_id: str | None = None,
        xks: XksProxyConfig | None = None,
    ) -> None:
        """Change a store's name, password (an external store's secret), cluster or proxy,
        after ``check(current row)`` passed in the same transaction (its state). Uniqueness
        as :meth:`create` and :meth:`create_external`."""
        values: dict[str, Any] = {}
        if password is not None:
            values.update(self._seal(store_id, password))
        if name is not None:
            values["name"] = name
        if cluster_id is not None:
            values["cluster_id"] = cluster_id
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            row = conn.execute(_select_stores().where(_S.c.store_id == store_id)).first()
            if row is None:
                raise CustomKeyStoreNotFoundException(
                    f"Custom key store '{store_id}' does not exist."
                )
            current = _store_from(row._mapping)
            check(current)
            self._check_unique(conn, store_id, name=name, cluster_id=cluster_id)
            if xks is not None:
                used = conn.execute(
                    select(_X.c.store_id).where(
                        (_X.c.uri_endpoint == xks.uri_endpoint)
                        & (_X.c.uri_path == xks.uri_path)
                        & (_X.c.store_id != store_id)
                    )
                ).first()
                if used is not None:
                    raise XksProxyUriInUseException(
                        f"The XKS proxy URI {xks.uri_endpoint}{xks.uri_path} is used by custom "
                        f"key store {used[0]}."
                    )
                conn.execute(
                    update(_X).where(_X.c.store_id == store_id).values(**dataclasses.asdict(xks))
                )
            if password is not None or cluster_id is not None or xks is not None:
                values["generation"] = current.generation + 1
            if values:
                conn.execute(update(_S).where(_S.c.store_id == store_id).values(**values))
        log.info("custom_key_store_updated", store_id=store_id)

    def delete(self, store_id: str, *, check: Callable[[CustomKeyStoreRecord], None]) -> None:
        """Delete a store after ``check(current row)`` passed in the same transaction."""
        with self._db.write(_ERRORS, lock=_WRITE_LOCK) as conn:
            row = conn.execute(_select_stores().where(_S.c.store_id == store_id)).first()
            if row is None:
                raise CustomKeyStoreNotFoundException(
                    f"Custom key store '{store_id}' does not exist."
                )
            check(_store_from(row._mapping))
            conn.execute(delete(_X).where(_X.c.store_id == store_id))
            conn.execute(delete(_S).where(_S.c.store_id == store_id))
        log.info("custom_key_store_deleted", store_id=store_id)
