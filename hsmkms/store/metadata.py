"""The metadata store: keys, key versions, aliases, tags and grants in SQL (SQLAlchemy Core).

The database comes from the database layer (:class:`hsmkms.db.Database`): durable commits (a
committed key version must survive a power cut: a caller may already hold ciphertext made with
it), foreign keys enforced, and write transactions that hold the write lock from their start, so
a read-check-write sequence is atomic across processes (the rows a write changes are also
selected ``FOR UPDATE``, which is what locks them where the database has row locks).

The store holds no secret and makes no policy decision: the service passes limits and
preconditions in, and maps the store's own exceptions to AWS errors.

The database is not trusted: with a :class:`~hsmkms.store.integrity.RowSealer` (the service
always passes one), every write to a ``keys``, ``key_versions``, ``grants``, ``aliases`` or
``tags`` row recomputes the row's token MAC in the same transaction, and every read the service
decides on verifies it, raising :class:`~hsmkms.errors.KeyIntegrityError` (fail closed). Without a
sealer (tests of the store alone) MACs are neither written nor checked.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import structlog
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from hsmkms.db import Database, ErrorMessages, file_url, migrate
from hsmkms.db.migrations import applied_versions
from hsmkms.errors import InvalidMarkerException, KeyIntegrityError, KMSInternalException
from hsmkms.store import schema
from hsmkms.store.integrity import (
    IntegrityProblem,
    RowSealer,
    RowVerifier,
    safe_alias_name,
    safe_key_id,
    safe_tag_key,
)
from hsmkms.store.migrations import COMPONENT
from hsmkms.store.records import (
    DELETING,
    IMPORTED,
    PENDING_IMPORT,
    AliasRecord,
    GrantRecord,
    ImportedMaterialRecord,
    ImportTokenRecord,
    KeyRecord,
    KeyVersionRecord,
    Page,
)
from hsmkms.types import Clock, utc_now


class StoreError(Exception):
    """Base of the store's own outcomes that the service turns into AWS errors."""


class VersionConflict(StoreError):
    """Another writer changed the key's current version first (the rotation already happened)."""


class DuplicateAlias(StoreError):
    """The alias name is taken."""


class LimitReached(StoreError):
    """A per-key count limit passed in by the caller would be exceeded."""


class KeyMissing(StoreError):
    """The key row is not there (deleted meanwhile)."""


class ImportConflict(StoreError):
    """Another writer changed the key's imported material first (the caller decides again)."""


log = structlog.get_logger(__name__)

# Answers the read cache keeps before it starts over: enough for every key of a large service
# (an Encrypt keeps one or two: the key with its version, its grants for the caller). Measured
# (token placement, 15,000 keys, each used once, then a random one per Encrypt): with 10,000
# the spread ran at 0.35-0.37x the 10-key rate, with room for all at 0.78-0.80x, for 9 MiB more RSS
# (about 600 bytes per key with its row checks below; docs/keystore.md, 100,000 keys).
_CACHE_MAX = 250_000
# Rows whose MAC check is remembered (RowVerifier): two or more per key (key, versions, grants).
_VERIFIED_MAX = 500_000
_ERRORS = ErrorMessages(
    busy="The metadata store is busy.",
    failed="The metadata store failed.",
    unavailable="The metadata store is unavailable.",
)


def _encode_marker(kind: str, last: str | int) -> str:
    raw = json.dumps([kind, last], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_marker(kind: str, marker: str | None, value_type: type[Any]) -> Any:
    """The last item of the previous page, or ``None`` for the first page."""
    if marker is None:
        return None
    try:
        padded = marker + "=" * (-len(marker) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise InvalidMarkerException("The marker is not valid.") from exc
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or decoded[0] != kind
        or type(decoded[1]) is not value_type
    ):
        raise InvalidMarkerException("The marker is not valid.")
    return decoded[1]


def _key_from_row(row: Row[Any]) -> KeyRecord:
    m = row._mapping
    return KeyRecord(
        key_id=m["id"],
        arn=m["arn"],
        description=m["description"],
        key_usage=m["key_usage"],
        key_spec=m["key_spec"],
        origin=m["origin"],
        state=m["state"],
        created_at=m["created_at"],
        policy=m["policy"],
        current_version=int(m["current_version"]),
        deletion_date=m["deletion_date"],
        pending_window_days=m["pending_window_days"],
        rotation_enabled=bool(m["rotation_enabled"]),
        rotation_period_days=m["rotation_period_days"],
        next_rotation_date=m["next_rotation_date"],
        on_demand_rotations=int(m["on_demand_rotations"]),
    )


def _version_from_row(row: Row[Any]) -> KeyVersionRecord:
    m = row._mapping
    return KeyVersionRecord(
        key_id=m["key_id"],
        version=int(m["version"]),
        material_ref=m["material_ref"],
        profile=m["profile"],
        created_at=m["created_at"],
        rotation_type=m["rotation_type"],
    )


def _alias_from_row(row: Row[Any]) -> AliasRecord:
    m = row._mapping
    return AliasRecord(
        name=m["name"], key_id=m["key_id"], created_at=m["created_at"], updated_at=m["updated_at"]
    )


def _grant_from_row(row: Row[Any]) -> GrantRecord:
    m = row._mapping
    return GrantRecord(
        grant_id=m["id"],
        key_id=m["key_id"],
        name=m["name"],
        grantee_principal=m["grantee_principal"],
        retiring_principal=m["retiring_principal"],
        operations=tuple(o for o in m["operations"].split(",") if o),
        constraints=m["constraints"],
        issuing_account=m["issuing_account"],
        created_at=m["created_at"],
    )


def _grant_values(grant: GrantRecord) -> dict[str, Any]:
    return {
        "id": grant.grant_id,
        "key_id": grant.key_id,
        "name": grant.name,
        "grantee_principal": grant.grantee_principal,
        "retiring_principal": grant.retiring_principal,
        "operations": ",".join(grant.operations),
        "constraints": grant.constraints,
        "issuing_account": grant.issuing_account,
        "created_at": grant.created_at,
    }


def _same_grant(a: GrantRecord, b: GrantRecord) -> bool:
    """Whether two grants on one key match for CreateGrant's idempotency by Name."""
    return (
        a.name == b.name
        and a.grantee_principal == b.grantee_principal
        and a.retiring_principal == b.retiring_principal
        and a.operations == b.operations
        and a.constraints == b.constraints
    )


def _encode_grant_marker(kind: str, last: GrantRecord) -> str:
    return _encode_marker(kind, f"{last.created_at.isoformat()} {last.grant_id}")


def _decode_grant_marker(kind: str, marker: str | None) -> tuple[dt.datetime, str] | None:
    """The (created_at, grant_id) of the last grant of the previous page."""
    value = _decode_marker(kind, marker, str)
    if value is None:
        return None
    when, _, grant_id = value.partition(" ")
    try:
        created_at = dt.datetime.fromisoformat(when)
    except ValueError as exc:
        raise InvalidMarkerException("The marker is not valid.") from exc
    if created_at.tzinfo is None or not grant_id:
        raise InvalidMarkerException("The marker is not valid.")
    return created_at, grant_id


def _import_token_from_row(row: Row[Any]) -> ImportTokenRecord:
    m = row._mapping
    return ImportTokenRecord(
        token_id=m["id"],
        key_id=m["key_id"],
        wrapping_algorithm=m["wrapping_algorithm"],
        wrapping_key_spec=m["wrapping_key_spec"],
        wrapping_key=m["wrapping_key"],
        created_at=m["created_at"],
        valid_to=m["valid_to"],
    )


def _import_token_values(token: ImportTokenRecord) -> dict[str, Any]:
    return {
        "id": token.token_id,
        "key_id": token.key_id,
        "wrapping_algorithm": token.wrapping_algorithm,
        "wrapping_key_spec": token.wrapping_key_spec,
        "wrapping_key": token.wrapping_key,
        "created_at": token.created_at,
        "valid_to": token.valid_to,
    }


def _material_from_row(row: Row[Any]) -> ImportedMaterialRecord:
    m = row._mapping
    return ImportedMaterialRecord(
        key_id=m["key_id"],
        version=int(m["version"]),
        key_material_id=m["key_material_id"],
        expiration_model=m["expiration_model"],
        valid_to=m["valid_to"],
        description=m["description"],
        import_state=m["import_state"],
        imported_at=m["imported_at"],
        rotation_date=m["rotation_date"],
    )


def _material_values(material: ImportedMaterialRecord) -> dict[str, Any]:
    return {
        "key_id": material.key_id,
        "version": material.version,
        "key_material_id": material.key_material_id,
        "expiration_model": material.expiration_model,
        "valid_to": material.valid_to,
        "description": material.description,
        "import_state": material.import_state,
        "imported_at": material.imported_at,
        "rotation_date": material.rotation_date,
    }


def _key_values(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.key_id,
        "arn": key.arn,
        "description": key.description,
        "key_usage": key.key_usage,
        "key_spec": key.key_spec,
        "origin": key.origin,
        "state": key.state,
        "created_at": key.created_at,
        "deletion_date": key.deletion_date,
        "pending_window_days": key.pending_window_days,
        "policy": key.policy,
        "rotation_enabled": key.rotation_enabled,
        "rotation_period_days": key.rotation_period_days,
        "next_rotation_date": key.next_rotation_date,
        "current_version": key.current_version,
        "on_demand_rotations": key.on_demand_rotations,
    }


def _version_values(version: KeyVersionRecord) -> dict[str, Any]:
    return {
        "key_id": version.key_id,
        "version": version.version,
        "material_ref": version.material_ref,
        "profile": version.profile,
        "created_at": version.created_at,
        "rotation_type": version.rotation_type,
    }


_K = schema.keys
_V = schema.key_versions
_A = schema.aliases
_T = schema.tags
_G = schema.grants
_S = schema.store_settings
_IT = schema.import_tokens
_IM = schema.imported_key_material
_INTEGRITY_KEY = "integrity_key"
# store_settings: the account and region the keys belong to (claim_deployment).
_ACCOUNT = "account_id"
_REGION = "region"
_SEALED_TABLES = (_K, _V, _G, _A, _T, _IT, _IM)
# store_settings: the sealed tables whose rows were adopted, sorted and joined by ",". Missing
# beside an integrity key: a database sealed before migration 4, which adopted these.
_ADOPTED = "sealed_tables"
_ADOPTED_BEFORE_ALIASES = frozenset({"keys", "key_versions", "grants"})
# get_key_and_version's version columns, labelled apart from the key's.
_V_LABELS = {
    "version": "v_version",
    "material_ref": "material_ref",
    "profile": "profile",
    "created_at": "v_created_at",
    "rotation_type": "rotation_type",
    "mac": "v_mac",
}


def _key_and_version_query(version: Any) -> Select[Any]:
    """A key's row joined with its version ``version`` (a column or a value)."""
    j = _K.outerjoin(_V, and_(_V.c.key_id == _K.c.id, _V.c.version == version))
    stmt = select(_K, *(_V.c[name].label(label) for name, label in _V_LABELS.items()))
    return stmt.select_from(j)


# Built once: a key's first read in a process (every key a worker meets) then costs no
# statement construction or cache-key computation, which took half of that read's time.
_KEY_AND_CURRENT = _key_and_version_query(_K.c.current_version).where(
    _K.c.id == bindparam("key_id")
)


def _pk(table: Table, m: Mapping[Any, Any]) -> tuple[Any, ...]:
    return tuple(m[c.name] for c in table.primary_key.columns)


def _pk_clause(table: Table, pk: tuple[Any, ...]) -> ColumnElement[bool]:
    return and_(*(c == v for c, v in zip(table.primary_key.columns, pk, strict=True)))


def _lock_key_row(conn: Connection, key_id: str) -> None:
    """Lock the key row (not verified: for writes that only remove rows of the key), so that
    a write is not interleaved with another one of the same key where the database has row
    locks: a tag removed between ``put_tags``' read and its update, an alias added while
    ``delete_key`` runs (its foreign key would then fail the purge)."""
    conn.execute(select(_K.c.id).where(_K.c.id == key_id).with_for_update())


def _owner(table: Table, m: Mapping[Any, Any]) -> Any:
    """The key a sealed row belongs to (for an alias: the key it points at)."""
    return m["id"] if table is _K else m["key_id"]


def _subject(table: Table, m: Mapping[Any, Any]) -> str:
    """What a failed check's error names: the alias for an alias row (whose key id is the
    suspect column), else the row's key. Never other row content."""
    if table is _A:
        return safe_alias_name(m["name"])
    return safe_key_id(_owner(table, m))


def _describe(table: Table, m: Mapping[Any, Any], problem: str) -> str:
    if table is _V:
        version = m["version"]
        return f"version {version if isinstance(version, int) else '?'}: {problem}"
    if table is _G:
        return f"grant {safe_key_id(m['id'])}: {problem}"
    if table is _A:
        return f"alias {safe_alias_name(m['name'])}: {problem}"
    if table is _T:
        return f"tag {safe_tag_key(m['tag_key'])}: {problem}"
    if table is _IT:
        return f"import token: {problem}"
    if table is _IM:
        version = m["version"]
        shown = version if isinstance(version, int) else "?"
        return f"imported key material of version {shown}: {problem}"
    return problem


class MetadataStore:
    """Key metadata in SQL. Thread-safe; several processes may open the same database.

    ``database`` is a SQLAlchemy URL (the store opens and owns its own
    :class:`~hsmkms.db.Database`, with ``busy_timeout_ms``) or a :class:`~hsmkms.db.Database`
    shared with other components (then its settings apply, and :meth:`close` leaves it open).
    :meth:`open_sqlite` opens a file of the embedded default. Pending migrations run at open.
    """

    def __init__(
        self,
        database: str | Database,
        *,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 10_000,
        cache_check_interval: float = 0.001,
        sealer: RowSealer | None = None,
    ) -> None:
        self._clock = clock
        self._verifier = None if sealer is None else RowVerifier(sealer, max_entries=_VERIFIED_MAX)
        self._owns_db = not isinstance(database, Database)
        self._db = (
            database
            if isinstance(database, Database)
            else Database(database, busy_timeout_ms=busy_timeout_ms)
        )
        # The read cache (hsmkms.db.ReadCache): ("key", key_id, version) -> (key, version),
        # ("grants", key_id, grantee) -> tuple, ... Immutable values only; None is not cached.
        self._cache = self._db.read_cache(
            check_interval=cache_check_interval, max_entries=_CACHE_MAX
        )
        try:
            with self._write() as conn:
                migrate(conn, COMPONENT, clock)
                if self._verifier is not None:
                    self._start_integrity(conn, self._verifier)
        except BaseException:
            if self._owns_db:
                self._db.close()
            raise

    @classmethod
    def open_sqlite(
        cls,
        path: str | Path,
        *,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 10_000,
        cache_check_interval: float = 0.001,
        sealer: RowSealer | None = None,
    ) -> MetadataStore:
        """Open (creating when missing) the embedded default's database file (SQLite) at
        ``path``."""
        return cls(
            file_url(path),
            clock=clock,
            busy_timeout_ms=busy_timeout_ms,
            cache_check_interval=cache_check_interval,
            sealer=sealer,
        )

    @property
    def database(self) -> Database:
        """The database the store lives in."""
        return self._db

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics and tests)."""
        return self._db.engine

    def close(self) -> None:
        """Forget the cached answers and, when the store opened its database itself, release
        every pooled connection."""
        self._cache.invalidate()
        if self._owns_db:
            self._db.close()

    # -- read cache and transactions ------------------------------------------------------------

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction (the write lock taken first); the read cache is emptied after
        it, so this process sees its own writes at once."""
        return self._db.write(_ERRORS)

    def _read(self) -> contextlib.AbstractContextManager[Connection]:
        return self._db.read(_ERRORS)

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        """Hold the database's write lock for the block: no process commits a key, version,
        alias, grant or credential change meanwhile (they wait, up to their busy timeout).
        ``hsmkms backup`` copies the database and the token inside it: every row then names
        token objects that the copy holds."""
        with self._write():
            yield

    def _lock_key(self, conn: Connection, key_id: str) -> KeyRecord:
        key = self._lock_key_if_there(conn, key_id)
        if key is None:
            raise KeyMissing(key_id)
        return key

    def _lock_key_if_there(self, conn: Connection, key_id: str) -> KeyRecord | None:
        """The key row, locked and verified (a write never re-seals a tampered row)."""
        row = conn.execute(select(_K).where(_K.c.id == key_id).with_for_update()).first()
        if row is None:
            return None
        self._verify(_K, row._mapping)
        return _key_from_row(row)

    def _one_verified(self, table: Table, stmt: Select[Any]) -> Row[Any] | None:
        """The first row of ``stmt`` (a plain select of ``table``), its MAC verified."""
        with self._read() as conn:
            row = conn.execute(stmt).first()
        if row is not None:
            self._verify(table, row._mapping)
        return row

    # -- integrity ------------------------------------------------------------------------------

    def _start_integrity(self, conn: Connection, verifier: RowVerifier) -> None:
        """At open, in the migration's transaction: use the stored integrity key, or create it;
        then adopt every sealed table not adopted before — seal its rows as they are, the only
        time rows without a MAC are sealed. A database without a key is adopted whole; one
        sealed before migration 4 has its ``aliases`` and ``tags`` adopted. ``store_settings``
        records the adopted tables, so each is adopted once: after that a ``NULL`` MAC is
        tampering."""
        settings: dict[str, str] = dict(conn.execute(select(_S.c.name, _S.c.value)).all())
        reference = settings.get(_INTEGRITY_KEY)
        if reference is None:
            adopted_before: frozenset[str] = frozenset()
        elif _ADOPTED in settings:
            adopted_before = frozenset(settings[_ADOPTED].split(","))
        else:
            adopted_before = _ADOPTED_BEFORE_ALIASES
        pending = [t for t in _SEALED_TABLES if t.name not in adopted_before]
        if not pending:
            verifier.sealer.use_key(cast(str, reference))
            return
        for table in pending:
            if conn.execute(select(table.c.mac).where(table.c.mac.is_not(None)).limit(1)).first():
                # Sealed rows in a table never adopted: the key reference or the record of
                # adopted tables was removed. Re-sealing would bless whatever the table holds.
                raise KMSInternalException(
                    "The metadata store has sealed rows but no integrity key reference (removed "
                    "from store_settings?); restore it or the database (docs/metadata-store.md)."
                    if reference is None
                    else f"The metadata store has sealed {table.name} rows but does not record "
                    "adopting them (store_settings changed?); restore the database "
                    "(docs/metadata-store.md)."
                )
        if reference is None:
            reference = verifier.sealer.create_key()
            conn.execute(_S.insert().values(name=_INTEGRITY_KEY, value=reference))
        else:
            verifier.sealer.use_key(reference)
        adopted = 0
        for table in pending:
            for row in conn.execute(select(table)).all():
                pk = _pk(table, row._mapping)
                tag = verifier.seal(table.name, pk, row._mapping)
                conn.execute(update(table).where(_pk_clause(table, pk)).values(mac=tag))
                adopted += 1
        record = ",".join(sorted(adopted_before | {t.name for t in pending}))
        if _ADOPTED in settings:
            conn.execute(update(_S).where(_S.c.name == _ADOPTED).values(value=record))
        else:
            conn.execute(_S.insert().values(name=_ADOPTED, value=record))
        if adopted:
            log.warning("metadata_rows_adopted", rows=adopted, tables=[t.name for t in pending])

    def _verify(self, table: Table, m: Mapping[Any, Any]) -> None:
        """Raise :class:`KeyIntegrityError` unless the row's MAC is right (no-op without a
        sealer). ``m`` holds the row's columns (``mac`` included) under their own names."""
        if self._verifier is None:
            return
        problem = self._verifier.verify(table.name, _pk(table, m), m, m["mac"])
        if problem is not None:
            subject = _subject(table, m)
            names = {"alias" if table is _A else "key_id": subject}
            log.error("metadata_integrity_failed", table=table.name, problem=problem, **names)
            raise KeyIntegrityError(subject)

    def _reseal(self, conn: Connection, table: Table, pk: tuple[Any, ...]) -> None:
        """Recompute a row's MAC after a write, in the write's transaction."""
        if self._verifier is None:
            if conn.execute(select(_S.c.name).where(_S.c.name == _INTEGRITY_KEY)).first():
                raise KMSInternalException(
                    "The metadata store's rows are sealed: open it with the keystore's sealer "
                    "to change keys, versions, grants, aliases or tags."
                )
            return
        row = conn.execute(select(table).where(_pk_clause(table, pk))).one()
        tag = self._verifier.seal(table.name, pk, row._mapping)
        conn.execute(update(table).where(_pk_clause(table, pk)).values(mac=tag))

    def integrity_problems(self) -> list[IntegrityProblem]:
        """Check the MAC of every ``keys``, ``key_versions``, ``grants``, ``aliases`` and
        ``tags`` row (``hsmkms doctor``). Empty when every row is intact, or when the store has
        no sealer."""
        if self._verifier is None:
            return []
        with self._read() as conn:
            tables = [
                (t, conn.execute(select(t).order_by(*t.primary_key.columns)).all())
                for t in _SEALED_TABLES
            ]
        problems: list[IntegrityProblem] = []
        for table, rows in tables:
            for row in rows:
                m = row._mapping
                problem = self._verifier.verify(table.name, _pk(table, m), m, m["mac"])
                if problem is not None:
                    problems.append(
                        IntegrityProblem(
                            table.name, safe_key_id(_owner(table, m)), _describe(table, m, problem)
                        )
                    )
        return problems

    # -- the deployment the data belongs to ----------------------------------------------------

    def claim_deployment(
        self, account_id: str, region: str, *, known_account: Callable[[], str | None]
    ) -> tuple[str, str]:
        """The account and region this database's keys belong to, recorded in
        ``store_settings`` (``account_id``, ``region``) by the first process to open it: the
        values of its first key's ARN when it has keys (a database from before the record),
        else the account ``known_account()`` names (the root credential's) and ``region``, else
        ``account_id`` and ``region``. The composition root compares them with the settings: a
        changed ``HSMKMS_ACCOUNT_ID`` would otherwise mint ARNs that name no stored key."""
        names = (_ACCOUNT, _REGION)
        query = select(_S.c.name, _S.c.value).where(_S.c.name.in_(names))
        with self._read() as conn:
            stored = dict(conn.execute(query).all())
        if len(stored) == len(names):
            return stored[_ACCOUNT], stored[_REGION]
        with self._write() as conn:
            stored = dict(conn.execute(query).all())
            arn = conn.execute(select(_K.c.arn).order_by(_K.c.created_at).limit(1)).scalar()
            parts = str(arn).split(":") if arn is not None else []
            inferred = {_ACCOUNT: account_id, _REGION: region}
            if len(parts) >= 6 and parts[0] == "arn":
                inferred = {_ACCOUNT: parts[4], _REGION: parts[3]}
            elif (account := known_account()) is not None:
                inferred[_ACCOUNT] = account
            for name in names:
                if name not in stored:
                    conn.execute(insert(_S).values(name=name, value=inferred[name]))
                    stored[name] = inferred[name]
        return stored[_ACCOUNT], stored[_REGION]

    # -- schema ---------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The highest applied migration version."""
        with self._read() as conn:
            versions = applied_versions(conn, COMPONENT.name)
        return versions[-1] if versions else 0

    @staticmethod
    def latest_schema_version() -> int:
        """The version this code migrates to."""
        return COMPONENT.latest

    # -- keys -----------------------------------------------------------------------------------

    def create_key(
        self, key: KeyRecord, first_version: KeyVersionRecord | None, tags: Mapping[str, str]
    ) -> None:
        """Insert a key with its first version (None: a key for imported material, which has
        none yet) and tags, in one transaction."""
        with self._write() as conn:
            conn.execute(_K.insert().values(**_key_values(key)))
            self._reseal(conn, _K, (key.key_id,))
            if first_version is not None:
                conn.execute(_V.insert().values(**_version_values(first_version)))
                self._reseal(conn, _V, (first_version.key_id, first_version.version))
            if tags:
                conn.execute(
                    _T.insert(),
                    [{"key_id": key.key_id, "tag_key": k, "tag_value": v} for k, v in tags.items()],
                )
                for tag_key in tags:
                    self._reseal(conn, _T, (key.key_id, tag_key))

    def get_key(self, key_id: str) -> KeyRecord | None:
        """The key, or ``None`` when there is no such row (a key being purged is returned)."""
        row = self._one_verified(_K, select(_K).where(_K.c.id == key_id))
        return None if row is None else _key_from_row(row)

    def get_key_and_version(
        self, key_id: str, version: int | None = None
    ) -> tuple[KeyRecord, KeyVersionRecord | None] | None:
        """The key and one of its versions (the current one when ``version`` is ``None``), in
        one query. ``None`` when the key does not exist; the version is ``None`` when missing.

        This is the hot path of every cryptographic operation: answers are cached until a
        connection commits a change to the database (where the database layer can tell: the
        embedded default). Writes through this store's database are seen at once; commits by
        other processes within ``cache_check_interval`` (1 ms).
        """
        return self._cache.get(
            ("key", key_id, version), lambda: self._get_key_and_version(key_id, version)
        )

    def _get_key_and_version(
        self, key_id: str, version: int | None
    ) -> tuple[KeyRecord, KeyVersionRecord | None] | None:
        if version is None:
            stmt = _KEY_AND_CURRENT
        else:
            stmt = _key_and_version_query(version).where(_K.c.id == bindparam("key_id"))
        with self._read() as conn:
            row = conn.execute(stmt, {"key_id": key_id}).first()
        if row is None:
            return None
        m = row._mapping
        self._verify(_K, m)
        key = _key_from_row(row)
        if m["v_version"] is None:
            return key, None
        values = {name: m[label] for name, label in _V_LABELS.items()}
        values["key_id"] = m["id"]  # the join's condition
        self._verify(_V, values)
        ver = KeyVersionRecord(
            key_id=key.key_id,
            version=int(values["version"]),
            material_ref=values["material_ref"],
            profile=values["profile"],
            created_at=values["created_at"],
            rotation_type=values["rotation_type"],
        )
        return key, ver

    def list_keys(
        self, limit: int, marker: str | None = None, *, now: dt.datetime | None = None
    ) -> Page[KeyRecord]:
        """Keys ordered by id, ``limit`` per page. Keys being purged are not listed, nor (when
        ``now`` is given) keys whose deletion date has passed."""
        after = _decode_marker("keys", marker, str)
        stmt = select(_K).where(_K.c.state != DELETING).order_by(_K.c.id).limit(limit + 1)
        if now is not None:
            stmt = stmt.where(
                or_(
                    _K.c.state != "PendingDeletion",
                    _K.c.deletion_date.is_(None),
                    _K.c.deletion_date > now,
                )
            )
        if after is not None:
            stmt = stmt.where(_K.c.id > after)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        items = [_key_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_marker("keys", items[-1].key_id) if more else None)

    def set_description(self, key_id: str, description: str) -> bool:
        """Replace the description. ``False`` when the key is missing."""
        return self._update_key(key_id, description=description)

    def set_policy(self, key_id: str, policy: str) -> bool:
        """Replace the key policy document. ``False`` when the key is missing."""
        return self._update_key(key_id, policy=policy)

    def _update_key(
        self, key_id: str, condition: ColumnElement[bool] | None = None, **values: Any
    ) -> bool:
        """Set columns of a key row when ``condition`` holds (compare-and-set), verifying the
        row before and re-sealing it after, in one transaction. ``False`` when the key is
        missing or the condition does not hold."""
        stmt = update(_K).where(_K.c.id == key_id).values(**values)
        if condition is not None:
            stmt = stmt.where(condition)
        with self._write() as conn:
            if self._lock_key_if_there(conn, key_id) is None:
                return False
            if conn.execute(stmt).rowcount == 0:
                return False
            self._reseal(conn, _K, (key_id,))
        return True

    def transition(
        self,
        key_id: str,
        from_states: Collection[str],
        to_state: str,
        *,
        deletion_date: dt.datetime | None = None,
        pending_window_days: int | None = None,
        deletion_after: dt.datetime | None = None,
    ) -> bool:
        """Move the key to ``to_state`` if it is in one of ``from_states`` (compare-and-set);
        the deletion date and window are set to the given values (``None`` clears them).
        ``deletion_after``: also require a deletion date later than this (so a key whose
        deletion date has come cannot be taken back from the purge).
        ``False`` when the key was not in an expected state."""
        condition: ColumnElement[bool] = _K.c.state.in_(list(from_states))
        if deletion_after is not None:
            condition = and_(condition, _K.c.deletion_date > deletion_after)
        return self._update_key(
            key_id,
            condition,
            state=to_state,
            deletion_date=deletion_date,
            pending_window_days=pending_window_days,
        )

    def set_rotation(
        self,
        key_id: str,
        *,
        enabled: bool,
        period_days: int | None,
        next_rotation_date: dt.datetime | None,
    ) -> bool:
        """Set the automatic rotation schedule. ``False`` when the key is missing."""
        return self._update_key(
            key_id,
            rotation_enabled=enabled,
            rotation_period_days=period_days,
            next_rotation_date=next_rotation_date,
        )

    # -- versions -------------------------------------------------------------------------------

    def add_version(
        self,
        version: KeyVersionRecord,
        *,
        precondition: Callable[[KeyRecord], None] | None = None,
        next_rotation_date: dt.datetime | None = None,
        on_demand: bool = False,
    ) -> KeyRecord:
        """Record a new key version and make it current, in one transaction.

        ``version.version`` must be the key's current version + 1, else :class:`VersionConflict`
        (another writer rotated first). ``precondition`` runs on the locked key row and may raise
        to abort. ``next_rotation_date``, when given, replaces the schedule; ``on_demand`` counts
        the rotation against the on-demand quota. Returns the updated key.
        """
        with self._write() as conn:
            key = self._lock_key(conn, version.key_id)
            if key.current_version + 1 != version.version:
                raise VersionConflict(version.key_id)
            if precondition is not None:
                precondition(key)
            conn.execute(_V.insert().values(**_version_values(version)))
            values: dict[str, Any] = {"current_version": version.version}
            if next_rotation_date is not None:
                values["next_rotation_date"] = next_rotation_date
            if on_demand:
                values["on_demand_rotations"] = _K.c.on_demand_rotations + 1
            conn.execute(update(_K).where(_K.c.id == key.key_id).values(**values))
            self._reseal(conn, _V, (version.key_id, version.version))
            self._reseal(conn, _K, (key.key_id,))
            row = conn.execute(select(_K).where(_K.c.id == key.key_id)).one()
        return _key_from_row(row)

    def get_version(self, key_id: str, version: int) -> KeyVersionRecord | None:
        """One version of a key, or ``None``."""
        row = self._one_verified(
            _V, select(_V).where(_V.c.key_id == key_id, _V.c.version == version)
        )
        return None if row is None else _version_from_row(row)

    def list_versions(
        self,
        key_id: str,
        limit: int | None = None,
        marker: str | None = None,
        *,
        min_version: int = 1,
    ) -> Page[KeyVersionRecord]:
        """A key's versions from ``min_version`` up; every one when ``limit`` is ``None``."""
        after = _decode_marker("versions:" + key_id, marker, int)
        stmt = (
            select(_V)
            .where(_V.c.key_id == key_id, _V.c.version >= min_version)
            .order_by(_V.c.version)
        )
        if after is not None:
            stmt = stmt.where(_V.c.version > after)
        if limit is not None:
            stmt = stmt.limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows if limit is None else rows[:limit]:
            self._verify(_V, r._mapping)
        if limit is None:
            return Page([_version_from_row(r) for r in rows])
        items = [_version_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(
            items, _encode_marker("versions:" + key_id, items[-1].version) if more else None
        )

    def all_versions(self) -> list[tuple[KeyVersionRecord, str]]:
        """Every key version with its key's state (for the consistency check)."""
        key_columns = [c.label(f"k_{c.name}") for c in _K.c]
        stmt = select(_V, *key_columns).select_from(_V.join(_K, _K.c.id == _V.c.key_id))
        with self._read() as conn:
            rows = conn.execute(stmt.order_by(_V.c.key_id, _V.c.version)).all()
        for r in rows:
            m = r._mapping
            self._verify(_K, {c.name: m[f"k_{c.name}"] for c in _K.c})
            self._verify(_V, m)
        return [(_version_from_row(r), r._mapping["k_state"]) for r in rows]

    def count_keys_in_store(self, store_id: str) -> int:
        """How many keys (pending deletion included) have material in key store ``store_id``
        (their versions' references name it)."""
        refs = or_(
            _V.c.material_ref.startswith(f"v2:{store_id}:", autoescape=True),
            _V.c.material_ref.startswith(f"v3:{store_id}:", autoescape=True),
        )
        with self._read() as conn:
            found = conn.execute(select(func.count(func.distinct(_V.c.key_id))).where(refs))
            return int(found.scalar_one())

    # -- rotation and deletion schedules ---------------------------------------------------------

    def keys_due_for_rotation(self, now: dt.datetime) -> list[KeyRecord]:
        """Enabled keys with automatic rotation on whose next rotation date has come."""
        stmt = select(_K).where(
            _K.c.state == "Enabled",
            _K.c.rotation_enabled.is_(True),
            _K.c.next_rotation_date <= now,
        )
        return self._verified_keys(stmt)

    def keys_to_purge(self, now: dt.datetime) -> list[KeyRecord]:
        """Keys whose deletion date has passed, and keys whose purge was interrupted."""
        stmt = select(_K).where(
            or_(
                _K.c.state == DELETING,
                and_(_K.c.state == "PendingDeletion", _K.c.deletion_date <= now),
            )
        )
        return self._verified_keys(stmt)

    def _verified_keys(self, stmt: Select[Any]) -> list[KeyRecord]:
        """The keys of a periodic task's query. A row that fails its integrity check is left
        out (and logged; ``hsmkms doctor`` reports it): one tampered key must not stop the
        rotation or purge of every other key."""
        with self._read() as conn:
            rows = conn.execute(stmt.order_by(_K.c.id)).all()
        keys = []
        for r in rows:
            try:
                self._verify(_K, r._mapping)
            except KeyIntegrityError:
                log.error("key_integrity_failed", key_id=r._mapping[_K.c.id])
                continue
            keys.append(_key_from_row(r))
        return keys

    def mark_deleting(self, key_id: str, now: dt.datetime) -> bool:
        """Start purging a key whose deletion date has passed (PendingDeletion -> Deleting).
        ``True`` also when the key was already Deleting (a purge to finish)."""
        condition = or_(
            _K.c.state == DELETING,
            and_(_K.c.state == "PendingDeletion", _K.c.deletion_date <= now),
        )
        return self._update_key(key_id, condition, state=DELETING)

    def delete_key(self, key_id: str) -> None:
        """Delete the key's rows: import tokens, imported material, grants, tags, aliases,
        versions, then the key itself."""
        with self._write() as conn:
            _lock_key_row(conn, key_id)
            conn.execute(delete(_IT).where(_IT.c.key_id == key_id))
            conn.execute(delete(_IM).where(_IM.c.key_id == key_id))
            conn.execute(delete(_G).where(_G.c.key_id == key_id))
            conn.execute(delete(_T).where(_T.c.key_id == key_id))
            conn.execute(delete(_A).where(_A.c.key_id == key_id))
            conn.execute(delete(_V).where(_V.c.key_id == key_id))
            conn.execute(delete(_K).where(_K.c.id == key_id))

    # -- imported key material ------------------------------------------------------------------

    def add_import_token(self, token: ImportTokenRecord) -> None:
        """Record an import token (sealed). :class:`KeyMissing` when the key is gone."""
        with self._write() as conn:
            self._lock_key(conn, token.key_id)
            conn.execute(_IT.insert().values(**_import_token_values(token)))
            self._reseal(conn, _IT, (token.token_id,))

    def get_import_token(self, token_id: str) -> ImportTokenRecord | None:
        """The import token ``token_id`` (its row verified), or ``None``."""
        row = self._one_verified(_IT, select(_IT).where(_IT.c.id == token_id))
        return None if row is None else _import_token_from_row(row)

    def import_tokens(
        self, *, key_id: str | None = None, expired_by: dt.datetime | None = None
    ) -> list[ImportTokenRecord]:
        """Import tokens of one key, or expired by ``expired_by``, or all (for the periodic
        work and the purge). A row that fails its integrity check is left out and logged."""
        stmt = select(_IT).order_by(_IT.c.valid_to, _IT.c.id)
        if key_id is not None:
            stmt = stmt.where(_IT.c.key_id == key_id)
        if expired_by is not None:
            stmt = stmt.where(_IT.c.valid_to <= expired_by)
        return [_import_token_from_row(r) for r in self._verified_rows(_IT, stmt)]

    def delete_import_token(self, token_id: str) -> bool:
        """Delete an import token. ``False`` when it was not there."""
        with self._write() as conn:
            res = conn.execute(delete(_IT).where(_IT.c.id == token_id))
        return res.rowcount > 0

    def imported_materials(self, key_id: str) -> tuple[ImportedMaterialRecord, ...]:
        """Every key material imported into a key, by version, each row verified (a tampered
        row fails with :class:`KeyIntegrityError`). Cached like :meth:`grants_for`."""
        return self._cache.get(("imported", key_id), lambda: self._imported_materials(key_id))

    def _imported_materials(self, key_id: str) -> tuple[ImportedMaterialRecord, ...]:
        stmt = select(_IM).where(_IM.c.key_id == key_id).order_by(_IM.c.version)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows:
            self._verify(_IM, r._mapping)
        return tuple(_material_from_row(r) for r in rows)

    def expired_materials(self, now: dt.datetime) -> list[ImportedMaterialRecord]:
        """Imported key material whose ``valid_to`` has come (for the periodic work). A row
        that fails its integrity check is left out and logged."""
        stmt = (
            select(_IM)
            .where(_IM.c.import_state == IMPORTED, _IM.c.valid_to <= now)
            .order_by(_IM.c.key_id, _IM.c.version)
        )
        return [_material_from_row(r) for r in self._verified_rows(_IM, stmt)]

    def _verified_rows(self, table: Table, stmt: Select[Any]) -> list[Row[Any]]:
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        kept = []
        for r in rows:
            try:
                self._verify(table, r._mapping)
            except KeyIntegrityError:
                log.error("row_integrity_failed", table=table.name)
                continue
            kept.append(r)
        return kept

    def _locked_materials(
        self, conn: Connection, key_id: str
    ) -> tuple[ImportedMaterialRecord, ...]:
        rows = conn.execute(
            select(_IM).where(_IM.c.key_id == key_id).order_by(_IM.c.version).with_for_update()
        ).all()
        for r in rows:
            self._verify(_IM, r._mapping)
        return tuple(_material_from_row(r) for r in rows)

    def save_import(
        self,
        material: ImportedMaterialRecord,
        version: KeyVersionRecord | None,
        *,
        precondition: Callable[[KeyRecord, tuple[ImportedMaterialRecord, ...]], None],
        current_version: int | None = None,
        state: str | None = None,
    ) -> KeyRecord:
        """Record an import, in one transaction: the material's row (inserted or replaced),
        its version's row (``version``: the new token objects; None when the material's
        objects are there already), and the key's current version and state when given.
        ``precondition`` runs first on the locked key and its materials and may raise to abort.
        :class:`ImportConflict` when the version row exists already (another import won)."""
        with self._write() as conn:
            key = self._lock_key(conn, material.key_id)
            precondition(key, self._locked_materials(conn, material.key_id))
            if version is not None:
                found = conn.execute(
                    select(_V.c.version).where(
                        _V.c.key_id == version.key_id, _V.c.version == version.version
                    )
                ).first()
                if found is not None:
                    raise ImportConflict(material.key_id)
                conn.execute(_V.insert().values(**_version_values(version)))
                self._reseal(conn, _V, (version.key_id, version.version))
            pk = (material.key_id, material.version)
            values = _material_values(material)
            if conn.execute(select(_IM.c.version).where(_pk_clause(_IM, pk))).first() is None:
                conn.execute(_IM.insert().values(**values))
            else:
                conn.execute(update(_IM).where(_pk_clause(_IM, pk)).values(**values))
            self._reseal(conn, _IM, pk)
            changes: dict[str, Any] = {}
            if current_version is not None:
                changes["current_version"] = current_version
            if state is not None:
                changes["state"] = state
            if changes:
                conn.execute(update(_K).where(_K.c.id == key.key_id).values(**changes))
                self._reseal(conn, _K, (key.key_id,))
            row = conn.execute(select(_K).where(_K.c.id == key.key_id)).one()
        return _key_from_row(row)

    def remove_material(
        self,
        key_id: str,
        version: int,
        *,
        state: Callable[[KeyRecord], str | None],
    ) -> KeyVersionRecord | None:
        """Forget that a key material is imported, in one transaction: its version's row is
        deleted (returned, for destroying its token objects after the commit), its material
        row becomes :data:`PENDING_IMPORT`, and the key's state becomes ``state(key)`` (None:
        unchanged). ``None`` (and nothing changed) when the material is not imported."""
        with self._write() as conn:
            key = self._lock_key(conn, key_id)
            pk = (key_id, version)
            row = conn.execute(select(_IM).where(_pk_clause(_IM, pk)).with_for_update()).first()
            if row is None:
                return None
            self._verify(_IM, row._mapping)
            if row._mapping["import_state"] != IMPORTED:
                return None
            found = conn.execute(
                select(_V).where(_V.c.key_id == key_id, _V.c.version == version)
            ).first()
            removed = None
            if found is not None:
                self._verify(_V, found._mapping)
                removed = _version_from_row(found)
                conn.execute(delete(_V).where(_V.c.key_id == key_id, _V.c.version == version))
            conn.execute(update(_IM).where(_pk_clause(_IM, pk)).values(import_state=PENDING_IMPORT))
            self._reseal(conn, _IM, pk)
            new_state = state(key)
            if new_state is not None and new_state != key.state:
                conn.execute(update(_K).where(_K.c.id == key_id).values(state=new_state))
                self._reseal(conn, _K, (key_id,))
        return removed

    def promote_material(
        self,
        key_id: str,
        version: int,
        now: dt.datetime,
        *,
        precondition: Callable[[KeyRecord], None],
    ) -> KeyRecord:
        """Make imported material pending rotation current (RotateKeyOnDemand of a key with
        imported material), in one transaction: the key's current version and on-demand count,
        the material's rotation date, its version row's rotation type.
        :class:`ImportConflict` unless ``version`` is the current version + 1 and imported."""
        with self._write() as conn:
            key = self._lock_key(conn, key_id)
            precondition(key)
            materials = {m.version: m for m in self._locked_materials(conn, key_id)}
            material = materials.get(version)
            row = conn.execute(
                select(_V).where(_V.c.key_id == key_id, _V.c.version == version)
            ).first()
            if (
                version != key.current_version + 1
                or material is None
                or material.import_state != IMPORTED
                or row is None
            ):
                raise ImportConflict(key_id)
            self._verify(_V, row._mapping)
            conn.execute(
                update(_K)
                .where(_K.c.id == key_id)
                .values(current_version=version, on_demand_rotations=_K.c.on_demand_rotations + 1)
            )
            conn.execute(
                update(_IM).where(_pk_clause(_IM, (key_id, version))).values(rotation_date=now)
            )
            conn.execute(
                update(_V)
                .where(_V.c.key_id == key_id, _V.c.version == version)
                .values(rotation_type="ON_DEMAND")
            )
            self._reseal(conn, _IM, (key_id, version))
            self._reseal(conn, _V, (key_id, version))
            self._reseal(conn, _K, (key_id,))
            updated = conn.execute(select(_K).where(_K.c.id == key_id)).one()
        return _key_from_row(updated)

    # -- aliases --------------------------------------------------------------------------------

    def create_alias(
        self, name: str, key_id: str, now: dt.datetime, *, max_per_key: int | None = None
    ) -> None:
        """Create an alias. :class:`DuplicateAlias` when the name is taken,
        :class:`LimitReached` when the key already has ``max_per_key`` aliases,
        :class:`KeyMissing` when the key is gone."""
        with self._write() as conn:
            self._lock_key(conn, key_id)
            if conn.execute(select(_A.c.name).where(_A.c.name == name)).first() is not None:
                raise DuplicateAlias(name)
            if max_per_key is not None:
                count = conn.execute(
                    select(func.count()).select_from(_A).where(_A.c.key_id == key_id)
                ).scalar_one()
                if count >= max_per_key:
                    raise LimitReached("aliases")
            try:
                conn.execute(
                    _A.insert().values(name=name, key_id=key_id, created_at=now, updated_at=now)
                )
            except IntegrityError as exc:  # lost a race on PostgreSQL
                raise DuplicateAlias(name) from exc
            self._reseal(conn, _A, (name,))

    def update_alias(
        self, name: str, key_id: str, now: dt.datetime, *, max_per_key: int | None = None
    ) -> bool:
        """Point an existing alias at another key. ``False`` when the alias does not exist.
        The alias row is verified first: its ``created_at`` is kept, and a tampered row is
        never re-sealed."""
        with self._write() as conn:
            self._lock_key(conn, key_id)
            if max_per_key is not None:
                count = conn.execute(
                    select(func.count())
                    .select_from(_A)
                    .where(_A.c.key_id == key_id, _A.c.name != name)
                ).scalar_one()
                if count >= max_per_key:
                    raise LimitReached("aliases")
            row = conn.execute(select(_A).where(_A.c.name == name).with_for_update()).first()
            if row is None:
                return False
            self._verify(_A, row._mapping)
            conn.execute(update(_A).where(_A.c.name == name).values(key_id=key_id, updated_at=now))
            self._reseal(conn, _A, (name,))
        return True

    def delete_alias(self, name: str) -> bool:
        """Delete an alias. ``False`` when it does not exist."""
        with self._write() as conn:
            res = conn.execute(delete(_A).where(_A.c.name == name))
        return res.rowcount > 0

    def get_alias(self, name: str) -> AliasRecord | None:
        """The alias (its row verified), or ``None``.

        On the path of every request that names a key by alias: answers cached like
        :meth:`grants_for`'s (an alias change is seen at once in this process, within
        ``cache_check_interval`` in others), and a re-read of an unchanged row costs no token
        call (the verifier remembers it)."""
        return self._cache.get(("alias", name), lambda: self._get_alias(name))

    def _get_alias(self, name: str) -> AliasRecord | None:
        row = self._one_verified(_A, select(_A).where(_A.c.name == name))
        return None if row is None else _alias_from_row(row)

    def resolve_alias(self, name: str) -> KeyRecord | None:
        """The key an alias points at, in one query, the alias row and the key row verified;
        ``None`` when the alias or its key does not exist."""
        alias_columns = [c.label(f"a_{c.name}") for c in _A.c]
        stmt = (
            select(_K, *alias_columns)
            .select_from(_A.outerjoin(_K, _K.c.id == _A.c.key_id))
            .where(_A.c.name == name)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        m = row._mapping
        self._verify(_A, {c.name: m[f"a_{c.name}"] for c in _A.c})
        if m["id"] is None:
            return None
        self._verify(_K, m)
        return _key_from_row(row)

    def list_aliases(
        self, limit: int, marker: str | None = None, *, key_id: str | None = None
    ) -> Page[AliasRecord]:
        """Aliases ordered by name (only those of ``key_id`` when given).

        Every listed row is verified, like :meth:`list_grants`: one bad row fails the page with
        :class:`KeyIntegrityError` naming the alias, rather than show callers a target key id
        written into the database (``ListKeys`` can skip verification: it shows a key's own id
        and ARN, and every use of the key verifies its row)."""
        kind = "aliases" if key_id is None else "aliases:" + key_id
        after = _decode_marker(kind, marker, str)
        stmt = select(_A).order_by(_A.c.name).limit(limit + 1)
        if key_id is not None:
            stmt = stmt.where(_A.c.key_id == key_id)
        if after is not None:
            stmt = stmt.where(_A.c.name > after)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows[:limit]:
            self._verify(_A, r._mapping)
        items = [_alias_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_marker(kind, items[-1].name) if more else None)

    def aliases_of(self, key_id: str) -> list[AliasRecord]:
        """Every alias of a key, by name (each row verified)."""
        stmt = select(_A).where(_A.c.key_id == key_id).order_by(_A.c.name)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows:
            self._verify(_A, r._mapping)
        return [_alias_from_row(r) for r in rows]

    # -- tags -----------------------------------------------------------------------------------

    def put_tags(
        self, key_id: str, tags: Mapping[str, str], *, max_tags: int | None = None
    ) -> None:
        """Add or overwrite tags, each row sealed. :class:`LimitReached` when the key would hold
        more than ``max_tags`` tags (nothing is written then). An overwritten row is not verified
        first: every column it keeps is its primary key, so re-sealing launders nothing."""
        with self._write() as conn:
            self._lock_key(conn, key_id)
            existing = {
                r[0] for r in conn.execute(select(_T.c.tag_key).where(_T.c.key_id == key_id))
            }
            if max_tags is not None and len(existing | set(tags)) > max_tags:
                raise LimitReached("tags")
            for tag_key, tag_value in tags.items():
                if tag_key in existing:
                    conn.execute(
                        update(_T)
                        .where(_T.c.key_id == key_id, _T.c.tag_key == tag_key)
                        .values(tag_value=tag_value)
                    )
                else:
                    conn.execute(
                        _T.insert().values(key_id=key_id, tag_key=tag_key, tag_value=tag_value)
                    )
                self._reseal(conn, _T, (key_id, tag_key))

    def remove_tags(self, key_id: str, tag_keys: Sequence[str]) -> None:
        """Remove tags; keys that are not there are ignored."""
        if not tag_keys:
            return
        with self._write() as conn:
            _lock_key_row(conn, key_id)
            conn.execute(delete(_T).where(_T.c.key_id == key_id, _T.c.tag_key.in_(list(tag_keys))))

    def list_tags(
        self, key_id: str, limit: int, marker: str | None = None
    ) -> Page[tuple[str, str]]:
        """A key's tags as ``(key, value)`` ordered by key. Every listed row is verified: one
        bad row fails the page with :class:`KeyIntegrityError` naming the key."""
        kind = "tags:" + key_id
        after = _decode_marker(kind, marker, str)
        stmt = select(_T).where(_T.c.key_id == key_id)
        if after is not None:
            stmt = stmt.where(_T.c.tag_key > after)
        with self._read() as conn:
            rows = conn.execute(stmt.order_by(_T.c.tag_key).limit(limit + 1)).all()
        for r in rows[:limit]:
            self._verify(_T, r._mapping)
        items = [(str(r.tag_key), str(r.tag_value)) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_marker(kind, items[-1][0]) if more else None)

    def tags_of(self, key_id: str) -> tuple[tuple[str, str], ...]:
        """Every tag of a key as ``(key, value)`` ordered by key, each row verified.

        For ``aws:ResourceTag/<k>`` conditions, on the authorization path: answers cached like
        :meth:`grants_for`'s (a tag change decides the next request in this process, within
        ``cache_check_interval`` in others)."""
        return self._cache.get(("tags_of", key_id), lambda: self._tags_of(key_id))

    def _tags_of(self, key_id: str) -> tuple[tuple[str, str], ...]:
        stmt = select(_T).where(_T.c.key_id == key_id).order_by(_T.c.tag_key)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows:
            self._verify(_T, r._mapping)
        return tuple((str(r.tag_key), str(r.tag_value)) for r in rows)

    def alias_names_of(self, key_id: str) -> tuple[str, ...]:
        """The names of a key's aliases, ordered, each row verified; cached like
        :meth:`tags_of` (for ``kms:ResourceAliases`` conditions)."""
        return self._cache.get(
            ("alias_names_of", key_id),
            lambda: tuple(alias.name for alias in self.aliases_of(key_id)),
        )

    # -- grants ---------------------------------------------------------------------------------

    def create_grant(self, grant: GrantRecord, *, max_per_key: int = 50000) -> GrantRecord:
        """Insert a grant and return it, in one transaction.

        Idempotent by name (spec: AWS KMS CreateGrant — a retried request with the same Name and
        parameters returns the existing grant): when ``grant.name`` is set and the key already
        has a grant with that name, grantee, retiring principal, operations and constraints,
        nothing is written and that grant is returned. :class:`KeyMissing` when the key row is
        gone, :class:`LimitReached` when the key already has ``max_per_key`` grants.
        """
        grant = dataclasses.replace(grant, operations=tuple(sorted(grant.operations)))
        with self._write() as conn:
            self._lock_key(conn, grant.key_id)
            if grant.name is not None:
                named = conn.execute(
                    select(_G)
                    .where(_G.c.key_id == grant.key_id, _G.c.name == grant.name)
                    .order_by(_G.c.created_at, _G.c.id)
                ).all()
                for row in named:
                    self._verify(_G, row._mapping)
                    existing = _grant_from_row(row)
                    if _same_grant(existing, grant):
                        return existing
            count = conn.execute(
                select(func.count()).select_from(_G).where(_G.c.key_id == grant.key_id)
            ).scalar_one()
            if count >= max_per_key:
                raise LimitReached("grants")
            conn.execute(_G.insert().values(**_grant_values(grant)))
            self._reseal(conn, _G, (grant.grant_id,))
        return grant

    def get_grant(self, key_id: str, grant_id: str) -> GrantRecord | None:
        """One grant of a key, or ``None``."""
        row = self._one_verified(_G, select(_G).where(_G.c.id == grant_id, _G.c.key_id == key_id))
        return None if row is None else _grant_from_row(row)

    def grants_for(self, key_id: str, grantee_principal: str) -> list[GrantRecord]:
        """Every grant of a key to one grantee principal, oldest first.

        On the authorization path of every request: one indexed query, answers cached like
        :meth:`get_key_and_version`'s (a revoked grant stops working at once in this process,
        within ``cache_check_interval`` in others).
        """
        found = self._cache.get(
            ("grants", key_id, grantee_principal),
            lambda: self._grants_for(key_id, grantee_principal),
        )
        return list(found)

    def _grants_for(self, key_id: str, grantee_principal: str) -> tuple[GrantRecord, ...]:
        stmt = (
            select(_G)
            .where(_G.c.key_id == key_id, _G.c.grantee_principal == grantee_principal)
            .order_by(_G.c.created_at, _G.c.id)
        )
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows:
            self._verify(_G, r._mapping)
        return tuple(_grant_from_row(r) for r in rows)

    def list_grants(
        self,
        key_id: str,
        limit: int,
        marker: str | None,
        *,
        grant_id: str | None = None,
        grantee_principal: str | None = None,
    ) -> Page[GrantRecord]:
        """A key's grants ordered by creation time then grant id, optionally only one grant id
        and/or one grantee principal."""
        stmt = select(_G).where(_G.c.key_id == key_id)
        if grant_id is not None:
            stmt = stmt.where(_G.c.id == grant_id)
        if grantee_principal is not None:
            stmt = stmt.where(_G.c.grantee_principal == grantee_principal)
        return self._grant_page(stmt, "grants:" + key_id, limit, marker)

    def list_retirable_grants(
        self, retiring_principal: str, limit: int, marker: str | None
    ) -> Page[GrantRecord]:
        """Grants (of any key) naming ``retiring_principal`` as their retiring principal, ordered
        by creation time then grant id."""
        stmt = select(_G).where(_G.c.retiring_principal == retiring_principal)
        return self._grant_page(stmt, "retirable:" + retiring_principal, limit, marker)

    def _grant_page(
        self, stmt: Select[Any], kind: str, limit: int, marker: str | None
    ) -> Page[GrantRecord]:
        after = _decode_grant_marker(kind, marker)
        if after is not None:
            created_at, last_id = after
            stmt = stmt.where(
                or_(
                    _G.c.created_at > created_at,
                    and_(_G.c.created_at == created_at, _G.c.id > last_id),
                )
            )
        stmt = stmt.order_by(_G.c.created_at, _G.c.id).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        for r in rows[:limit]:
            self._verify(_G, r._mapping)
        items = [_grant_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_grant_marker(kind, items[-1]) if more else None)

    def delete_grant(self, key_id: str, grant_id: str) -> bool:
        """Delete one grant of a key (retire or revoke). ``False`` when it does not exist."""
        with self._write() as conn:
            res = conn.execute(delete(_G).where(_G.c.id == grant_id, _G.c.key_id == key_id))
        return res.rowcount > 0
