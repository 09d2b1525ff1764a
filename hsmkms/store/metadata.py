"""The metadata store: keys, key versions, aliases and tags in SQL (SQLAlchemy Core).

SQLite is the embedded default: WAL journal, ``foreign_keys=ON`` and a busy timeout on every
connection, ``synchronous=FULL`` (a committed key version must survive a power cut: a caller may
already hold ciphertext made with it). Write transactions start with ``BEGIN IMMEDIATE`` so a
read-check-write sequence is atomic across processes; the same code takes row locks
(``SELECT ... FOR UPDATE``) on PostgreSQL.

The store holds no secret and makes no policy decision: the service passes limits and
preconditions in, and maps the store's own exceptions to AWS errors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    create_engine,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from hsmkms.errors import (
    DependencyTimeoutException,
    InvalidMarkerException,
    KMSError,
    KMSInternalException,
)
from hsmkms.store import schema
from hsmkms.store.migrations import MIGRATIONS, applied_versions, run_migrations
from hsmkms.store.records import DELETING, AliasRecord, KeyRecord, KeyVersionRecord, Page
from hsmkms.store.sqlite import install_sqlite_hooks
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


_WRITE = "hsmkms_write"
_CACHE_MAX = 10_000


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


class MetadataStore:
    """Key metadata in SQL. Thread-safe; several processes may open the same SQLite file.

    Open with a SQLAlchemy URL (``sqlite:///path``) or :meth:`open_sqlite`. Pending migrations run
    at open.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 10_000,
        cache_check_interval: float = 0.001,
    ) -> None:
        self._clock = clock
        self._cache_check_interval = cache_check_interval
        self._cache_checked_at = -math.inf
        self._engine: Engine = create_engine(url)
        self._probe: sqlite3.Connection | None = None
        self._cache_lock = threading.Lock()
        self._cache: dict[tuple[str, int | None], tuple[KeyRecord, KeyVersionRecord | None]] = {}
        self._cache_token: int | None = None
        self._pid = os.getpid()
        if self._engine.dialect.name == "sqlite":
            install_sqlite_hooks(self._engine, busy_timeout_ms=busy_timeout_ms, write_option=_WRITE)
        with self._write() as conn:
            run_migrations(conn, clock)
        self._open_probe()

    def _open_probe(self) -> None:
        database = self._engine.url.database
        if self._engine.dialect.name == "sqlite" and database and database != ":memory:":
            # A connection that never writes: its PRAGMA data_version changes whenever any other
            # connection, in this process or another, commits. That makes a read cache safe.
            self._probe = sqlite3.connect(database, check_same_thread=False, isolation_level=None)

    def _after_fork(self) -> None:
        """In a forked child: never touch the parent's connections (SQLite forbids it)."""
        if os.getpid() == self._pid:
            return
        with self._cache_lock:
            if os.getpid() == self._pid:
                return
            self._engine.dispose(close=False)
            self._probe = None  # the parent's; not closed here
            self._cache.clear()
            self._cache_checked_at = -math.inf
            self._open_probe()
            self._pid = os.getpid()

    @classmethod
    def open_sqlite(
        cls,
        path: str | Path,
        *,
        clock: Clock = utc_now,
        busy_timeout_ms: int = 10_000,
        cache_check_interval: float = 0.001,
    ) -> MetadataStore:
        """Open (creating when missing) the SQLite database at ``path``."""
        return cls(
            f"sqlite:///{Path(path)}",
            clock=clock,
            busy_timeout_ms=busy_timeout_ms,
            cache_check_interval=cache_check_interval,
        )

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for diagnostics and tests)."""
        return self._engine

    def close(self) -> None:
        """Release every pooled connection."""
        with self._cache_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None
            self._cache.clear()
        self._engine.dispose()

    # -- read cache -----------------------------------------------------------------------------

    def _cache_valid(self) -> bool:
        """Clear the cache when the database changed since it was filled. Lock held.

        The probe runs at most every ``cache_check_interval`` seconds: a commit by another
        process is seen within that time; a commit through this store clears the cache at once.
        """
        if self._probe is None:
            return False
        now = time.monotonic()
        if now - self._cache_checked_at < self._cache_check_interval:
            return True
        self._cache_checked_at = now
        try:
            token = int(self._probe.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self._cache.clear()
            return False
        if token != self._cache_token:
            self._cache.clear()
            self._cache_token = token
        return True

    # -- transactions ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self._after_fork()
        try:
            yield
        except KMSError:
            raise
        except OperationalError as exc:
            text = str(exc.orig).lower() if exc.orig is not None else ""
            if "locked" in text or "busy" in text:
                raise DependencyTimeoutException("The metadata store is busy.") from exc
            raise KMSInternalException("The metadata store failed.") from exc
        except SQLAlchemyError as exc:
            raise KMSInternalException("The metadata store failed.") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self._guard(), self._engine.connect() as conn:
                conn.execution_options(**{_WRITE: True})
                with conn.begin():
                    yield conn
        finally:
            # After the commit (or rollback): this process's own writes are visible at once.
            with self._cache_lock:
                self._cache.clear()
                self._cache_checked_at = -math.inf

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._guard(), self._engine.connect() as conn, conn.begin():
            yield conn

    def _lock_key(self, conn: Connection, key_id: str) -> KeyRecord:
        row = conn.execute(select(_K).where(_K.c.id == key_id).with_for_update()).first()
        if row is None:
            raise KeyMissing(key_id)
        return _key_from_row(row)

    # -- schema ---------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The highest applied migration version."""
        with self._read() as conn:
            versions = applied_versions(conn)
        return versions[-1] if versions else 0

    @staticmethod
    def latest_schema_version() -> int:
        """The version this code migrates to."""
        return MIGRATIONS[-1][0]

    # -- keys -----------------------------------------------------------------------------------

    def create_key(
        self, key: KeyRecord, first_version: KeyVersionRecord, tags: Mapping[str, str]
    ) -> None:
        """Insert a key with its first version and tags, in one transaction."""
        with self._write() as conn:
            conn.execute(_K.insert().values(**_key_values(key)))
            conn.execute(_V.insert().values(**_version_values(first_version)))
            if tags:
                conn.execute(
                    _T.insert(),
                    [{"key_id": key.key_id, "tag_key": k, "tag_value": v} for k, v in tags.items()],
                )

    def get_key(self, key_id: str) -> KeyRecord | None:
        """The key, or ``None`` when there is no such row (a key being purged is returned)."""
        with self._read() as conn:
            row = conn.execute(select(_K).where(_K.c.id == key_id)).first()
        return None if row is None else _key_from_row(row)

    def get_key_and_version(
        self, key_id: str, version: int | None = None
    ) -> tuple[KeyRecord, KeyVersionRecord | None] | None:
        """The key and one of its versions (the current one when ``version`` is ``None``), in
        one query. ``None`` when the key does not exist; the version is ``None`` when missing.

        This is the hot path of every cryptographic operation: answers are cached until a
        connection commits a change to the database (SQLite). Writes through this store are
        seen at once; commits by other processes within ``cache_check_interval`` (1 ms).
        """
        cache_key = (key_id, version)
        self._after_fork()
        with self._cache_lock:
            if self._cache_valid():
                hit = self._cache.get(cache_key)
                if hit is not None:
                    return hit
                token = self._cache_token
            else:
                token = None
        found = self._get_key_and_version(key_id, version)
        if found is not None and token is not None:
            with self._cache_lock:
                # Only keep the answer if nothing changed while it was read.
                if self._cache_valid() and self._cache_token == token:
                    if len(self._cache) >= _CACHE_MAX:
                        self._cache.clear()
                    self._cache[cache_key] = found
        return found

    def _get_key_and_version(
        self, key_id: str, version: int | None
    ) -> tuple[KeyRecord, KeyVersionRecord | None] | None:
        version_col = _K.c.current_version if version is None else version
        j = _K.outerjoin(_V, and_(_V.c.key_id == _K.c.id, _V.c.version == version_col))
        stmt = select(
            _K,
            _V.c.version.label("v_version"),
            _V.c.material_ref,
            _V.c.profile,
            _V.c.created_at.label("v_created_at"),
            _V.c.rotation_type,
        ).select_from(j)
        with self._read() as conn:
            row = conn.execute(stmt.where(_K.c.id == key_id)).first()
        if row is None:
            return None
        key = _key_from_row(row)
        m = row._mapping
        if m["v_version"] is None:
            return key, None
        ver = KeyVersionRecord(
            key_id=key.key_id,
            version=int(m["v_version"]),
            material_ref=m["material_ref"],
            profile=m["profile"],
            created_at=m["v_created_at"],
            rotation_type=m["rotation_type"],
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
        with self._write() as conn:
            res = conn.execute(update(_K).where(_K.c.id == key_id).values(description=description))
        return res.rowcount > 0

    def set_policy(self, key_id: str, policy: str) -> bool:
        """Replace the key policy document. ``False`` when the key is missing."""
        with self._write() as conn:
            res = conn.execute(update(_K).where(_K.c.id == key_id).values(policy=policy))
        return res.rowcount > 0

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
        condition = and_(_K.c.id == key_id, _K.c.state.in_(list(from_states)))
        if deletion_after is not None:
            condition = and_(condition, _K.c.deletion_date > deletion_after)
        stmt = (
            update(_K)
            .where(condition)
            .values(
                state=to_state,
                deletion_date=deletion_date,
                pending_window_days=pending_window_days,
            )
        )
        with self._write() as conn:
            res = conn.execute(stmt)
        return res.rowcount > 0

    def set_rotation(
        self,
        key_id: str,
        *,
        enabled: bool,
        period_days: int | None,
        next_rotation_date: dt.datetime | None,
    ) -> bool:
        """Set the automatic rotation schedule. ``False`` when the key is missing."""
        stmt = (
            update(_K)
            .where(_K.c.id == key_id)
            .values(
                rotation_enabled=enabled,
                rotation_period_days=period_days,
                next_rotation_date=next_rotation_date,
            )
        )
        with self._write() as conn:
            res = conn.execute(stmt)
        return res.rowcount > 0

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
            row = conn.execute(select(_K).where(_K.c.id == key.key_id)).one()
        return _key_from_row(row)

    def get_version(self, key_id: str, version: int) -> KeyVersionRecord | None:
        """One version of a key, or ``None``."""
        stmt = select(_V).where(_V.c.key_id == key_id, _V.c.version == version)
        with self._read() as conn:
            row = conn.execute(stmt).first()
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
        if limit is None:
            return Page([_version_from_row(r) for r in rows])
        items = [_version_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(
            items, _encode_marker("versions:" + key_id, items[-1].version) if more else None
        )

    def all_versions(self) -> list[tuple[KeyVersionRecord, str]]:
        """Every key version with its key's state (for the consistency check)."""
        stmt = select(_V, _K.c.state).select_from(_V.join(_K, _K.c.id == _V.c.key_id))
        with self._read() as conn:
            rows = conn.execute(stmt.order_by(_V.c.key_id, _V.c.version)).all()
        return [(_version_from_row(r), r._mapping["state"]) for r in rows]

    # -- rotation and deletion schedules ---------------------------------------------------------

    def keys_due_for_rotation(self, now: dt.datetime) -> list[KeyRecord]:
        """Enabled keys with automatic rotation on whose next rotation date has come."""
        stmt = select(_K).where(
            _K.c.state == "Enabled",
            _K.c.rotation_enabled.is_(True),
            _K.c.next_rotation_date <= now,
        )
        with self._read() as conn:
            return [_key_from_row(r) for r in conn.execute(stmt.order_by(_K.c.id))]

    def keys_to_purge(self, now: dt.datetime) -> list[KeyRecord]:
        """Keys whose deletion date has passed, and keys whose purge was interrupted."""
        stmt = select(_K).where(
            or_(
                _K.c.state == DELETING,
                and_(_K.c.state == "PendingDeletion", _K.c.deletion_date <= now),
            )
        )
        with self._read() as conn:
            return [_key_from_row(r) for r in conn.execute(stmt.order_by(_K.c.id))]

    def mark_deleting(self, key_id: str, now: dt.datetime) -> bool:
        """Start purging a key whose deletion date has passed (PendingDeletion -> Deleting).
        ``True`` also when the key was already Deleting (a purge to finish)."""
        stmt = (
            update(_K)
            .where(
                _K.c.id == key_id,
                or_(
                    _K.c.state == DELETING,
                    and_(_K.c.state == "PendingDeletion", _K.c.deletion_date <= now),
                ),
            )
            .values(state=DELETING)
        )
        with self._write() as conn:
            res = conn.execute(stmt)
        return res.rowcount > 0

    def delete_key(self, key_id: str) -> None:
        """Delete the key's rows: tags, aliases, versions, then the key itself."""
        with self._write() as conn:
            conn.execute(delete(_T).where(_T.c.key_id == key_id))
            conn.execute(delete(_A).where(_A.c.key_id == key_id))
            conn.execute(delete(_V).where(_V.c.key_id == key_id))
            conn.execute(delete(_K).where(_K.c.id == key_id))

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

    def update_alias(
        self, name: str, key_id: str, now: dt.datetime, *, max_per_key: int | None = None
    ) -> bool:
        """Point an existing alias at another key. ``False`` when the alias does not exist."""
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
            res = conn.execute(
                update(_A).where(_A.c.name == name).values(key_id=key_id, updated_at=now)
            )
        return res.rowcount > 0

    def delete_alias(self, name: str) -> bool:
        """Delete an alias. ``False`` when it does not exist."""
        with self._write() as conn:
            res = conn.execute(delete(_A).where(_A.c.name == name))
        return res.rowcount > 0

    def get_alias(self, name: str) -> AliasRecord | None:
        """The alias, or ``None``."""
        with self._read() as conn:
            row = conn.execute(select(_A).where(_A.c.name == name)).first()
        return None if row is None else _alias_from_row(row)

    def resolve_alias(self, name: str) -> KeyRecord | None:
        """The key an alias points at, in one query; ``None`` when the alias does not exist."""
        stmt = select(_K).select_from(_A.join(_K, _K.c.id == _A.c.key_id)).where(_A.c.name == name)
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _key_from_row(row)

    def list_aliases(
        self, limit: int, marker: str | None = None, *, key_id: str | None = None
    ) -> Page[AliasRecord]:
        """Aliases ordered by name (only those of ``key_id`` when given)."""
        kind = "aliases" if key_id is None else "aliases:" + key_id
        after = _decode_marker(kind, marker, str)
        stmt = select(_A).order_by(_A.c.name).limit(limit + 1)
        if key_id is not None:
            stmt = stmt.where(_A.c.key_id == key_id)
        if after is not None:
            stmt = stmt.where(_A.c.name > after)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        items = [_alias_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_marker(kind, items[-1].name) if more else None)

    def aliases_of(self, key_id: str) -> list[AliasRecord]:
        """Every alias of a key, by name."""
        stmt = select(_A).where(_A.c.key_id == key_id).order_by(_A.c.name)
        with self._read() as conn:
            return [_alias_from_row(r) for r in conn.execute(stmt)]

    # -- tags -----------------------------------------------------------------------------------

    def put_tags(
        self, key_id: str, tags: Mapping[str, str], *, max_tags: int | None = None
    ) -> None:
        """Add or overwrite tags. :class:`LimitReached` when the key would hold more than
        ``max_tags`` tags (nothing is written then)."""
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

    def remove_tags(self, key_id: str, tag_keys: Sequence[str]) -> None:
        """Remove tags; keys that are not there are ignored."""
        if not tag_keys:
            return
        with self._write() as conn:
            conn.execute(delete(_T).where(_T.c.key_id == key_id, _T.c.tag_key.in_(list(tag_keys))))

    def list_tags(
        self, key_id: str, limit: int, marker: str | None = None
    ) -> Page[tuple[str, str]]:
        """A key's tags as ``(key, value)`` ordered by key."""
        kind = "tags:" + key_id
        after = _decode_marker(kind, marker, str)
        stmt = select(_T.c.tag_key, _T.c.tag_value).where(_T.c.key_id == key_id)
        if after is not None:
            stmt = stmt.where(_T.c.tag_key > after)
        with self._read() as conn:
            rows = conn.execute(stmt.order_by(_T.c.tag_key).limit(limit + 1)).all()
        items = [(str(r[0]), str(r[1])) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_marker(kind, items[-1][0]) if more else None)
