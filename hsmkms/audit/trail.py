"""The tamper-evident audit trail: a hash chain of records in SQL, sealed by a token HMAC.

Storage (three tables of their own, migrated by the database layer's runner as component
``audit``, whose versions are in the database's ``schema_migrations``)::

    audit_settings  name -> value: ``audit_key`` (KeyMaterialRef text of HMAC_256 material);
                    ``schema_version`` ("1"), the version as hsmkms before the database layer
                    kept it (adopted from there, and kept equal to the latest applied version)
    audit_records   seq (1, 2, 3, ... gap-free), record (canonical JSON bytes),
                    hash = SHA-256(hash of seq-1 || record), genesis hash = 32 zero bytes;
                    plus search columns copied from the record (event_time, event_name,
                    principal, access_key_id, key_ids) — never trusted: search re-checks
                    every hit against the record itself, and verify checks they agree
    audit_seals     seal_seq (1, 2, 3, ...), record_seq, chain_hash (the hash of record
                    record_seq; zeros for 0), sealed_at, reason, max_unsealed, interval_ms,
                    prev_tag (the tag of seal seal_seq-1; zeros for seal 1), tag

A seal's ``tag`` is HMAC-SHA-256, computed inside the token with the trail's own
non-extractable audit key (label ``hsmkms:audit``), over the seal payload::

    b"hsmkms-audit-seal-v1\\n" || canonical JSON of
    {"chainHash": hex, "intervalMs": int, "maxUnsealed": int, "prevTag": hex, "reason": str,
     "recordSeq": int, "sealSeq": int, "sealedAt": "YYYY-MM-DDTHH:MM:SS.ffffffZ"}

so each seal authenticates the whole chain up to ``record_seq``, every earlier seal (through
``prev_tag``), its own time, and the promise it makes about the next one: another seal follows
within ``max_unsealed`` records and within ``interval_ms`` (unless ``reason`` is ``shutdown``).

Threat model: the database is not trusted (anyone may edit it); the token and its audit key
are. What :meth:`AuditTrail.verify` can and cannot prove is in ``docs/audit.md``.

Concurrency: every append (of one record or of a batch) is one transaction that takes the
write lock first (:meth:`hsmkms.db.Database.write` with the trail's writer lock, so appenders
take turns on every database), reads the last sequence number and hash, inserts, and seals
when due — so any number of processes may append and the sequence stays gap-free. Servers
append through :class:`hsmkms.audit.writer.AuditWriter`, which batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import hmac
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    or_,
    select,
)
from sqlalchemy.engine import URL

from hsmkms.audit.records import (
    SEARCH_COLUMNS,
    AuditRecord,
    PreparedRecord,
    canonical_json,
    format_event_time,
    key_id_of,
    prepare_record,
    record_key_ids,
    search_columns,
)
from hsmkms.db import (
    BigIntKey,
    Component,
    Database,
    ErrorMessages,
    LegacyMarker,
    Migration,
    migrate,
)
from hsmkms.errors import KMSError, KMSInternalException
from hsmkms.keystore.base import KeyMaterialRef, Keystore, MaterialName, checked_mac_key
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.types import Clock, utc_now

__all__ = [
    "AUDIT_KEY_NAME",
    "SCHEMA_VERSION",
    "STALE_FACTOR",
    "AuditSink",
    "AuditTrail",
    "Seal",
    "SealGap",
    "SealReason",
    "VerifyResult",
    "VerifyStatus",
]

log = structlog.get_logger(__name__)

AUDIT_KEY_NAME: Final = "audit"
_GENESIS: Final = bytes(32)
_SEAL_DOMAIN: Final = b"hsmkms-audit-seal-v1\n"
# A seal promises the next one within its interval; verify allows this factor of slack.
STALE_FACTOR: Final = 2
_PAGE: Final = 500
# Every write takes this writer lock first (Database.write), so appenders take turns and the
# first creation of the tables is serialized too. "hsmkmsA": the value hsmkms always used.
_APPEND_LOCK: Final = 0x68736D6B6D7341
_ERRORS: Final = ErrorMessages(busy="The audit trail is busy.", failed="The audit trail failed.")

metadata = MetaData()

audit_settings = Table(
    "audit_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

audit_records = Table(
    "audit_records",
    metadata,
    Column("seq", BigIntKey, primary_key=True, autoincrement=False),
    Column("event_time", String(20), nullable=False),
    Column("event_name", String(64), nullable=False),
    Column("principal", String(2048), nullable=True),
    Column("access_key_id", String(128), nullable=True),
    Column("key_ids", Text, nullable=False),
    Column("record", LargeBinary, nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    Index("ix_audit_records_event_time", "event_time"),
    Index("ix_audit_records_event_name", "event_name"),
    Index("ix_audit_records_principal", "principal"),
)

audit_seals = Table(
    "audit_seals",
    metadata,
    Column("seal_seq", BigIntKey, primary_key=True, autoincrement=False),
    Column("record_seq", BigInteger, nullable=False),
    Column("chain_hash", LargeBinary(32), nullable=False),
    Column("sealed_at", String(32), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("max_unsealed", Integer, nullable=False),
    Column("interval_ms", BigInteger, nullable=False),
    Column("prev_tag", LargeBinary(32), nullable=False),
    Column("tag", LargeBinary(32), nullable=False),
)

_R = audit_records
_S = audit_seals
_SET = audit_settings


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


COMPONENT: Final = Component(
    "audit",
    [Migration(1, "audit_settings, audit_records, audit_seals", _v1_initial)],
    legacy=LegacyMarker(audit_settings),
    refused="The audit trail's schema version {found} is not one this hsmkms knows.",
)
"""The audit trail's tables, for :func:`hsmkms.db.migrate`."""
SCHEMA_VERSION: Final = COMPONENT.latest
# Built once: an append runs on every API call, and building statements costs more than
# running them.
_HEAD = select(_R.c.seq, _R.c.hash).order_by(_R.c.seq.desc()).limit(1)
_NEWEST_SEAL = select(_S).order_by(_S.c.seal_seq.desc()).limit(1)
_INSERT_RECORD = _R.insert()
_INSERT_SEAL = _S.insert()
_SEAL_COLUMNS = (
    "seal_seq, record_seq, chain_hash, sealed_at, reason, max_unsealed, interval_ms, prev_tag, tag"
)
_RECORD_COLUMNS = ("seq", *SEARCH_COLUMNS, "record", "hash")
# The append's statements in the driver's own SQL, run on the transaction's DBAPI cursor:
# compiling and wrapping Core statements cost about four times what SQLite spends on them, and
# the write lock is held meanwhile. Only for drivers whose placeholder is ``?`` or ``%s``.
_DRIVER_HEAD = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1"
_DRIVER_NEWEST_SEAL = f"SELECT {_SEAL_COLUMNS} FROM audit_seals ORDER BY seal_seq DESC LIMIT 1"  # noqa: S608
_DRIVER_INSERT = f"INSERT INTO audit_records ({', '.join(_RECORD_COLUMNS)}) VALUES "  # noqa: S608
# A batch is inserted by multi-row INSERTs of up to this many rows (8 parameters each: under
# every SQLite's limit of 999). One statement is one step inside the driver, so the appending
# thread gives the GIL up and takes it back once per chunk rather than once per row — taking
# it back from a busy event loop costs up to the interpreter's switch interval (5 ms) each time.
_ROWS_PER_INSERT = 100


@functools.lru_cache(maxsize=16)
def _multi_insert(placeholder: str, rows: int) -> str:
    """The driver SQL inserting ``rows`` audit records at once."""
    one = "(" + ", ".join(placeholder for _ in _RECORD_COLUMNS) + ")"
    return _DRIVER_INSERT + ", ".join(one for _ in range(rows))


class AuditSink(Protocol):
    """Where the service sends audit records. :class:`AuditTrail` is the implementation."""

    def append(self, record: AuditRecord) -> int:
        """Store one record durably; returns its sequence number."""
        ...


class SealReason(enum.StrEnum):
    """Why a seal was written."""

    GENESIS = "genesis"  # the trail was created
    START = "start"  # a writer process opened the trail
    COUNT = "count"  # ``seal_every`` records since the last seal
    INTERVAL = "interval"  # ``interval`` since the last seal
    DEMAND = "demand"  # :meth:`AuditTrail.seal`
    SHUTDOWN = "shutdown"  # :meth:`AuditTrail.close`: no seal need follow


@dataclasses.dataclass(frozen=True)
class Seal:
    """One seal row (see the module docstring)."""

    seal_seq: int
    record_seq: int
    chain_hash: bytes
    sealed_at: str
    reason: str
    max_unsealed: int
    interval_ms: int
    prev_tag: bytes
    tag: bytes

    def payload(self) -> bytes:
        """The bytes the tag authenticates."""
        return _SEAL_DOMAIN + canonical_json(
            {
                "chainHash": self.chain_hash.hex(),
                "intervalMs": self.interval_ms,
                "maxUnsealed": self.max_unsealed,
                "prevTag": self.prev_tag.hex(),
                "reason": self.reason,
                "recordSeq": self.record_seq,
                "sealSeq": self.seal_seq,
                "sealedAt": self.sealed_at,
            }
        )

    @property
    def time(self) -> dt.datetime | None:
        """``sealed_at`` as an aware datetime; ``None`` when malformed (an edited row)."""
        try:
            return _parse_time(self.sealed_at)
        except ValueError:
            return None


class VerifyStatus(enum.StrEnum):
    """The outcome of :meth:`AuditTrail.verify`."""

    OK = "ok"
    TAMPERED = "tampered"  # proven: a record, seal or the key reference was changed
    STALE = "stale"  # not proven: the newest seal is overdue (tail removed, or sealing stopped)
    MISSING = "missing"  # no audit trail in this database


@dataclasses.dataclass(frozen=True)
class SealGap:
    """Two consecutive seals further apart than the first one promised (not after a shutdown):
    an unclean stop, or records and seals removed from what was then the tail."""

    after_seal: int
    seconds: float
    allowed: float


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What :meth:`AuditTrail.verify` found.

    ``first_bad_seq`` is the first record that is not proven intact (``None`` when none);
    ``problem`` one line naming it. ``sealed_through`` is the last record covered by a valid
    seal; the ``unsealed`` records after it are chained but not yet provable. ``newest_seal``
    (when the seals verified) is worth keeping outside the database: a later trail whose seals
    do not include it was rolled back.
    """

    status: VerifyStatus
    records: int
    seals: int
    sealed_through: int
    unsealed: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seal_at: dt.datetime | None = None
    gaps: tuple[SealGap, ...] = ()
    newest_seal: Seal | None = None

    @property
    def ok(self) -> bool:
        return self.status is VerifyStatus.OK


class _Failed(Exception):
    def __init__(self, status: VerifyStatus, problem: str, first_bad: int | None) -> None:
        super().__init__(problem)
        self.status = status
        self.problem = problem
        self.first_bad = first_bad


def _seal_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError("time without a zone")
    return when.astimezone(dt.UTC)


def _index_values(record: Mapping[str, Any]) -> dict[str, Any]:
    """The search columns of ``record`` by name (``ValueError`` when it lacks what every record
    has)."""
    return dict(zip(SEARCH_COLUMNS, search_columns(record), strict=True))


def _matches(
    record: Mapping[str, Any],
    key_id: str | None,
    principal: str | None,
    event_name: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> bool:
    """The search filter, applied to the record itself (the search columns are untrusted)."""
    if event_name is not None and record.get("eventName") != event_name:
        return False
    if key_id is not None and key_id_of(key_id) not in record_key_ids(record):
        return False
    if principal is not None:
        identity = record.get("userIdentity")
        identity = identity if isinstance(identity, Mapping) else {}
        if principal not in (identity.get("arn"), identity.get("accessKeyId")):
            return False
    if since is not None or until is not None:
        try:
            when = _parse_time(str(record.get("eventTime")))
        except ValueError:
            return False
        if since is not None and when < since.replace(microsecond=0):
            return False
        if until is not None and when > until:
            return False
    return True


class AuditTrail:
    """The audit trail in the database at ``database``: a :class:`~hsmkms.db.Database` shared
    with other components (its settings apply, and :meth:`close` leaves it open), or an
    ``Engine``, ``URL`` or URL string, for which the trail opens and owns a database of its own
    (given an engine, on the same URL, so that its connection settings never touch the
    caller's pool).

    ``create=True`` (a server process): create the tables and the token audit key when missing,
    and write a ``start`` seal. ``create=False`` (``hsmkms audit ...``): write nothing; reading
    a database without a trail finds nothing and :meth:`verify` says so. ``keystore`` may be
    ``None`` for a reader that only searches (:meth:`verify` needs the token).

    Sealing: :meth:`append` seals in the same transaction once ``seal_every`` records or
    ``seal_interval`` seconds have passed since the last seal; a writer process must also call
    :meth:`seal_if_due` at least every ``seal_interval / 2`` seconds (idle heartbeat, so a
    stale trail can be told from a quiet one) and :meth:`close` at shutdown.

    ``durable`` (a database of its own): every append is on disk when it returns. ``False``
    trades that for speed: still safe against a crash of the process, but a power loss may drop
    the newest appends (:class:`~hsmkms.db.Database`).

    Thread-safe and fork-aware (a forked child opens fresh database connections).
    """

    def __init__(
        self,
        database: Database | Engine | URL | str,
        keystore: Keystore | None,
        *,
        create: bool = True,
        clock: Clock = utc_now,
        seal_every: int = 100,
        seal_interval: float = 10.0,
        busy_timeout_ms: int = 10_000,
        durable: bool = True,
    ) -> None:
        if seal_every < 1 or seal_interval <= 0:
            raise ValueError("seal_every and seal_interval must be positive")
        if create and keystore is None:
            raise ValueError("a writer needs the keystore")
        self._owns_db = not isinstance(database, Database)
        if isinstance(database, Database):
            self._db = database
        else:
            self._db = Database(
                database.url if isinstance(database, Engine) else database,
                busy_timeout_ms=busy_timeout_ms,
                durable=durable,
                foreign_keys=False,  # the trail's tables have none
            )
        self._keystore = keystore
        self._clock = clock
        self._every = seal_every
        self._interval_ms = int(seal_interval * 1000)
        self._key: KeyMaterialRef | None = None
        self._placeholder = self._db.placeholder
        if create:
            try:
                self._initialize()
            except BaseException:
                if self._owns_db:
                    self._db.close()
                raise

    # -- connections ----------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[Connection]:
        return self._db.write(_ERRORS, lock=_APPEND_LOCK)

    def _read(self) -> AbstractContextManager[Connection]:
        return self._db.read(_ERRORS)

    def check_key(self) -> None:
        """Check that the trail's audit key reference names the audit key on the token, as a
        writer does when it opens the trail (nothing to check before the trail exists). A
        :class:`~hsmkms.errors.KMSError` naming the problem."""
        with self._read() as conn:
            if not self._exists(conn):
                return
            ref = self._settings(conn).get("audit_key")
        # Not remembered as this trail's key: a trail that knows its key seals on close.
        if ref is None:
            raise KMSInternalException("The audit trail has no audit key.")
        try:
            self._checked_key(ref)
        except ValueError as exc:
            raise KMSInternalException(f"The audit trail's audit key is wrong: {exc}.") from exc

    def head(self) -> tuple[int, Seal | None]:
        """The number of records and the newest seal (None: no seal; ``(0, None)`` for a
        database that holds no trail yet), read without checking anything (``verify``
        checks)."""
        with self._read() as conn:
            if not self._exists(conn):
                return 0, None
            return self._head(conn)[0], self._newest_seal(conn)

    @contextlib.contextmanager
    def hold_writes(self) -> Iterator[None]:
        """Hold the trail's write lock for the block: no process appends a record or a seal
        meanwhile (they wait, up to their busy timeout). ``hsmkms backup`` copies the trail
        and the token inside it, so the copy of the trail and of the token agree."""
        with self._write():
            yield

    @property
    def keystore(self) -> Keystore:
        """The keystore (``KMSInternalException`` for a reader opened without one)."""
        if self._keystore is None:
            raise KMSInternalException("The audit trail was opened without the keystore.")
        return self._keystore

    @property
    def database(self) -> Database:
        """The database the trail lives in."""
        return self._db

    @property
    def engine(self) -> Engine:
        """The trail's database's engine (for tests and diagnostics)."""
        return self._db.engine

    @property
    def seal_interval(self) -> float:
        """Seconds between seals when records keep coming; :meth:`seal_if_due` is owed at
        least every half of it."""
        return self._interval_ms / 1000

    # -- setup ----------------------------------------------------------------------------------

    def _initialize(self) -> None:
        with self._write() as conn:
            migrate(conn, COMPONENT, self._clock)
            ref = self._settings(conn).get("audit_key")
            if ref is None:
                if conn.execute(select(_S.c.seal_seq).limit(1)).first() is not None:
                    # Seals without a key reference: the reference was removed. Refuse to
                    # start a new key over an existing trail.
                    raise KMSInternalException("The audit trail has seals but no audit key.")
                key = self.keystore.create(
                    KeyMaterialSpec.HMAC_256, MaterialName.service_key(AUDIT_KEY_NAME)
                )
                conn.execute(_SET.insert().values(name="audit_key", value=key.to_str()))
                self._key = key
                self._seal(conn, SealReason.GENESIS)
            else:
                self._key = None
                self._audit_key(conn)
            self._seal(conn, SealReason.START)

    @staticmethod
    def _settings(conn: Connection) -> dict[str, str]:
        return {row.name: row.value for row in conn.execute(select(_SET))}

    def _checked_key(self, ref_text: str) -> KeyMaterialRef:
        """Parse a stored key reference and check, on the (trusted) token, that it names an
        audit key. ``ValueError`` naming the problem."""
        return checked_mac_key(self.keystore, ref_text, AUDIT_KEY_NAME)

    def _audit_key(self, conn: Connection) -> KeyMaterialRef:
        if self._key is None:
            ref = self._settings(conn).get("audit_key")
            if ref is None:
                raise KMSInternalException("The audit trail has no audit key.")
            try:
                self._key = self._checked_key(ref)
            except ValueError as exc:
                raise KMSInternalException(f"The audit trail's audit key is wrong: {exc}.") from exc
        return self._key

    # -- writing --------------------------------------------------------------------------------

    def append(self, record: AuditRecord) -> int:
        """Append one record (made by :func:`~hsmkms.audit.records.api_call_record` or
        :func:`~hsmkms.audit.records.service_event_record`); returns its sequence number.
        :meth:`append_many` with one record."""
        return self.append_many((record,))

    def append_many(self, records: Iterable[AuditRecord]) -> int:
        """Append ``records`` in order, in one transaction; returns the sequence number of the
        last one (the chain head when ``records`` is empty). Every record is encoded first
        (``ValueError``/``TypeError`` for one that is not valid: then nothing is written);
        then :meth:`append_prepared`."""
        return self.append_prepared([prepare_record(r) for r in records])

    def append_prepared(self, prepared: Sequence[PreparedRecord]) -> int:
        """Append records encoded by :func:`prepare_record`, in order, in one transaction;
        returns the sequence number of the last one (the chain head when there is none).

        The transaction takes the write lock, reads the chain head and the newest seal,
        chains and inserts every record, and seals wherever a seal falls due (every
        ``seal_every`` records, so a batch gets the same seals as its records appended one by
        one). Either every record is stored, chained, or none is. A failure to seal is logged
        and leaves the records stored (the next seal covers them); a database failure raises
        :class:`~hsmkms.errors.KMSError`.
        """
        if not prepared:
            with self._read() as conn:
                return self._head(conn)[0] if self._exists(conn) else 0
        with self._write() as conn:
            cursor = None if self._placeholder is None else conn.connection.cursor()
            try:
                if cursor is not None:
                    cursor.execute(_DRIVER_HEAD)
                    row = cursor.fetchone()
                    seq, digest = (0, _GENESIS) if row is None else (row[0], bytes(row[1]))
                    cursor.execute(_DRIVER_NEWEST_SEAL)
                    row = cursor.fetchone()
                    newest = None if row is None else _seal_from_values(row)
                else:
                    seq, digest = self._head(conn)
                    newest = self._newest_seal(conn)
                rows: list[tuple[Any, ...]] = []
                # The time is read once per batch: an interval seal, when due, covers the
                # batch's first record; then a count seal every ``seal_every`` records.
                reason = self._due(newest, seq + 1)
                next_seal = seq + 1 if reason is not None else self._count_due(newest)
                for item in prepared:
                    seq += 1
                    digest = hashlib.sha256(digest + item.body).digest()
                    rows.append((seq, *item.columns, item.body, digest))
                    if seq == next_seal:
                        try:
                            newest = self._seal(
                                conn, reason or SealReason.COUNT, head=(seq, digest), newest=newest
                            )
                        except KMSError as exc:
                            # Token away: no further seal in this batch; the next one covers it.
                            log.warning("audit seal failed", error=type(exc).__name__, seq=seq)
                            next_seal = 0
                        else:
                            next_seal = seq + self._every
                        reason = None
                if cursor is not None:
                    assert self._placeholder is not None
                    for at in range(0, len(rows), _ROWS_PER_INSERT):
                        chunk = rows[at : at + _ROWS_PER_INSERT]
                        sql = _multi_insert(self._placeholder, len(chunk))
                        cursor.execute(sql, [value for row in chunk for value in row])
                else:
                    conn.execute(
                        _INSERT_RECORD, [dict(zip(_RECORD_COLUMNS, r, strict=True)) for r in rows]
                    )
            finally:
                if cursor is not None:
                    cursor.close()
        return seq

    def seal(self, reason: str = SealReason.DEMAND) -> Seal:
        """Write a seal over everything appended so far (``reason``: a :class:`SealReason`)."""
        with self._write() as conn:
            return self._seal(conn, SealReason(reason))

    def seal_if_due(self) -> Seal | None:
        """Seal when ``seal_every`` records or ``seal_interval`` seconds have passed since the
        newest seal (even with no new record: the heartbeat). Call it periodically."""
        with self._write() as conn:
            head = self._head(conn)
            newest = self._newest_seal(conn)
            reason = self._due(newest, head[0], heartbeat=True)
            return None if reason is None else self._seal(conn, reason, head=head, newest=newest)

    def close(self) -> None:
        """Write a ``shutdown`` seal (when the trail exists) and, when the trail opened its
        database itself, release the connections."""
        try:
            if self._key is not None:
                self.seal(SealReason.SHUTDOWN)
        finally:
            self._key = None
            if self._owns_db:
                self._db.close()

    def _count_due(self, newest: Seal | None) -> int:
        """The sequence number at which a ``count`` seal falls due after ``newest``."""
        return 1 if newest is None else newest.record_seq + self._every

    def _due(self, newest: Seal | None, seq: int, *, heartbeat: bool = False) -> SealReason | None:
        if newest is None:
            return SealReason.COUNT
        if seq - newest.record_seq >= self._every:
            return SealReason.COUNT
        if seq > newest.record_seq or heartbeat:
            when = newest.time
            if when is None or self._clock() - when >= dt.timedelta(milliseconds=self._interval_ms):
                return SealReason.INTERVAL
        return None

    @staticmethod
    def _head(conn: Connection) -> tuple[int, bytes]:
        row = conn.execute(_HEAD).first()
        return (0, _GENESIS) if row is None else (row.seq, bytes(row.hash))

    @staticmethod
    def _newest_seal(conn: Connection) -> Seal | None:
        row = conn.execute(_NEWEST_SEAL).first()
        return None if row is None else _seal_from_row(row)

    def _seal(
        self,
        conn: Connection,
        reason: SealReason,
        *,
        head: tuple[int, bytes] | None = None,
        newest: Seal | bool | None = False,
    ) -> Seal:
        """Insert a seal over ``head`` (default: the current chain head). Write lock held."""
        key = self._audit_key(conn)
        record_seq, chain_hash = head if head is not None else self._head(conn)
        previous = self._newest_seal(conn) if newest is False else newest
        assert previous is None or isinstance(previous, Seal)
        unsigned = Seal(
            seal_seq=1 if previous is None else previous.seal_seq + 1,
            record_seq=record_seq,
            chain_hash=chain_hash,
            sealed_at=_seal_time(self._clock()),
            reason=reason.value,
            max_unsealed=self._every,
            interval_ms=self._interval_ms,
            prev_tag=_GENESIS if previous is None else previous.tag,
            tag=b"",
        )
        seal = dataclasses.replace(unsigned, tag=self.keystore.mac(key, unsigned.payload()))
        conn.execute(_INSERT_SEAL, dataclasses.asdict(seal))
        return seal

    # -- reading --------------------------------------------------------------------------------

    def _exists(self, conn: Connection) -> bool:
        names = set(inspect(conn).get_table_names())
        return {"audit_settings", "audit_records", "audit_seals"} <= names

    def search(
        self,
        *,
        key_id: str | None = None,
        principal: str | None = None,
        event_name: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[AuditRecord]:
        """Records matching every filter given, oldest first.

        ``key_id``: a key id or key ARN among the record's ``resources``; ``principal``: the
        caller's ARN or access key id; ``event_name``: the operation (``Decrypt``);
        ``since``/``until``: ``eventTime`` bounds, both inclusive (to the second). The result
        is not proof of integrity — run :meth:`verify` for that.
        """
        clauses: list[Any] = []
        if key_id is not None:
            clauses.append(_R.c.key_ids.contains(f" {key_id_of(key_id)} ", autoescape=True))
        if principal is not None:
            clauses.append(or_(_R.c.principal == principal, _R.c.access_key_id == principal))
        if event_name is not None:
            clauses.append(_R.c.event_name == event_name)
        if since is not None:
            clauses.append(_R.c.event_time >= format_event_time(since))
        if until is not None:
            clauses.append(_R.c.event_time <= format_event_time(until))
        remaining = limit
        after = 0
        while remaining is None or remaining > 0:
            with self._read() as conn:
                if not self._exists(conn):
                    return
                query = select(_R.c.seq, _R.c.record).where(_R.c.seq > after, *clauses)
                rows = conn.execute(query.order_by(_R.c.seq).limit(_PAGE)).all()
            for row in rows:
                after = row.seq
                record = _load(row.record)
                if record is None or not _matches(
                    record, key_id, principal, event_name, since, until
                ):
                    continue
                yield record
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
            if len(rows) < _PAGE:
                return

    def records_after(self, seq: int, limit: int = _PAGE) -> list[tuple[int, AuditRecord]]:
        """The records numbered above ``seq``, oldest first, at most ``limit``, each with its
        number (``hsmkms audit tail -f`` follows the trail with it). Not proof of integrity."""
        with self._read() as conn:
            if not self._exists(conn):
                return []
            query = select(_R.c.seq, _R.c.record).where(_R.c.seq > seq).order_by(_R.c.seq)
            rows = conn.execute(query.limit(limit)).all()
        found = []
        for row in rows:
            record = _load(row.record)
            if record is not None:
                found.append((int(row.seq), record))
        return found

    def tail(self, n: int = 10) -> list[AuditRecord]:
        """The newest ``n`` records, oldest first."""
        with self._read() as conn:
            if not self._exists(conn) or n <= 0:
                return []
            query = select(_R.c.record).order_by(_R.c.seq.desc()).limit(n)
            rows = conn.execute(query).all()
        records = [_load(row.record) for row in reversed(rows)]
        return [r for r in records if r is not None]

    # -- verification ---------------------------------------------------------------------------

    def verify(
        self, *, now: dt.datetime | None = None, expect_seal: tuple[int, bytes] | None = None
    ) -> VerifyResult:
        """Check the whole trail against the token: every seal's tag (inside the token), the
        chain of seals, the hash chain of every record, that each seal's chain hash is the
        recomputed one, the sequence numbers, and that the newest seal is not overdue at
        ``now`` (default: the clock). ``expect_seal`` = (seal number, tag) kept outside the
        database from an earlier verify: the trail must still hold that seal (else it was
        rolled back). Stops at the first problem. Reads one snapshot."""
        now = now or self._clock()
        with self._read() as conn:
            if not self._exists(conn):
                return VerifyResult(
                    VerifyStatus.MISSING, 0, 0, 0, 0, None, "no audit trail in this database"
                )
            seals = [_seal_from_row(r) for r in conn.execute(select(_S).order_by(_S.c.seal_seq))]
            try:
                key = self._verify_key(conn)
                self._verify_seals(key, seals)
                if expect_seal is not None:
                    _check_expected(seals, *expect_seal)
                records = self._verify_records(conn, seals)
            except _Failed as failed:
                return VerifyResult(
                    failed.status,
                    0,
                    len(seals),
                    0,
                    0,
                    failed.first_bad,
                    failed.problem,
                    seals[-1].time if seals else None,
                )
        newest = seals[-1]
        unsealed = records - newest.record_seq
        gaps = tuple(_gaps(seals))
        result = VerifyResult(
            VerifyStatus.OK, records, len(seals), newest.record_seq, unsealed, None, None,
            newest.time, gaps, newest,
        )  # fmt: skip
        if newest.reason == SealReason.SHUTDOWN and unsealed == 0:
            return result
        if unsealed > newest.max_unsealed:
            return dataclasses.replace(
                result,
                status=VerifyStatus.STALE,
                first_bad_seq=newest.record_seq + 1,
                problem=f"trail stale: {unsealed} records after the newest seal (seal "
                f"{newest.seal_seq}) where at most {newest.max_unsealed} are allowed (seals "
                "removed, or sealing failing)",
            )
        allowed = STALE_FACTOR * newest.interval_ms / 1000
        sealed_at = newest.time
        age = float("inf") if sealed_at is None else (now - sealed_at).total_seconds()
        if age > allowed:
            return dataclasses.replace(
                result,
                status=VerifyStatus.STALE,
                first_bad_seq=newest.record_seq + 1,
                problem=f"trail stale: the newest seal (seal {newest.seal_seq}, "
                f"{newest.sealed_at}) is {age:.0f} s old, more than the {allowed:g} s allowed "
                "(records and seals removed from the tail, or the writer stopped without a "
                "shutdown seal)",
            )
        return result

    def _verify_key(self, conn: Connection) -> KeyMaterialRef:
        settings = self._settings(conn)
        ref = settings.get("audit_key")
        if ref is None:
            raise _Failed(
                VerifyStatus.TAMPERED, "no audit key reference in the database (removed)", 1
            )
        try:
            return self._checked_key(ref)
        except ValueError as exc:
            raise _Failed(VerifyStatus.TAMPERED, f"audit key reference: {exc}", 1) from None

    def _verify_seals(self, key: KeyMaterialRef, seals: list[Seal]) -> None:
        if not seals:
            raise _Failed(VerifyStatus.TAMPERED, "seal 1: missing (every seal removed)", 1)
        previous: Seal | None = None
        for expected, seal in enumerate(seals, start=1):
            covered = 0 if previous is None else previous.record_seq
            if seal.seal_seq != expected:
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: missing (seal sequence jumps to {seal.seal_seq})",
                    covered + 1,
                )
            if not self.keystore.verify_mac(key, seal.payload(), seal.tag):
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: invalid tag (modified or forged seal)",
                    covered + 1,
                )
            expected_prev = _GENESIS if previous is None else previous.tag
            if not hmac.compare_digest(seal.prev_tag, expected_prev):
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: does not follow seal {expected - 1} "
                    "(seal removed, inserted or reordered)",
                    covered + 1,
                )
            if seal.record_seq < covered:
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"seal {expected}: covers fewer records than seal {expected - 1}",
                    covered + 1,
                )
            if seal.record_seq == 0 and seal.chain_hash != _GENESIS:
                raise _Failed(VerifyStatus.TAMPERED, f"seal {expected}: bad genesis hash", 1)
            previous = seal

    def _verify_records(self, conn: Connection, seals: list[Seal]) -> int:
        """Walk the chain; returns the number of records. Raises :class:`_Failed`."""
        pending = [s for s in seals if s.record_seq > 0]
        at = 0
        sealed_through = 0
        prev = _GENESIS
        expected = 1
        query = select(_R).order_by(_R.c.seq).execution_options(yield_per=1000)
        for row in conn.execute(query):
            seq = row.seq
            if seq != expected:
                problem = (
                    f"record {expected}: missing (removed record; the sequence jumps to {seq})"
                    if seq > expected
                    else f"record {seq}: unexpected sequence number (inserted record)"
                )
                raise _Failed(VerifyStatus.TAMPERED, problem, min(seq, expected))
            body = bytes(row.record)
            digest = hashlib.sha256(prev + body).digest()
            if not hmac.compare_digest(digest, bytes(row.hash)):
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"record {seq}: hash chain broken (modified, inserted or removed record)",
                    seq,
                )
            while at < len(pending) and pending[at].record_seq == seq:
                if not hmac.compare_digest(digest, pending[at].chain_hash):
                    raise _Failed(
                        VerifyStatus.TAMPERED,
                        f"record {sealed_through + 1}: records {sealed_through + 1}..{seq} do "
                        f"not match seal {pending[at].seal_seq} (modified, inserted or removed "
                        "record, hash chain recomputed)",
                        sealed_through + 1,
                    )
                sealed_through = seq
                at += 1
            record = _load(body)
            try:
                if record is None or _index_values(record) != _row_index(row):
                    raise ValueError
            except ValueError:
                raise _Failed(
                    VerifyStatus.TAMPERED,
                    f"record {seq}: search columns do not match the record (edited)",
                    seq,
                ) from None
            prev = digest
            expected += 1
        last = expected - 1
        if at < len(pending):
            seal = pending[at]
            raise _Failed(
                VerifyStatus.TAMPERED,
                f"record {last + 1}: missing (seal {seal.seal_seq} covers records through "
                f"{seal.record_seq} but the trail ends at {last}: tail removed)",
                last + 1,
            )
        return last


def _row_index(row: Any) -> dict[str, Any]:
    return {
        "event_time": row.event_time,
        "event_name": row.event_name,
        "principal": row.principal,
        "access_key_id": row.access_key_id,
        "key_ids": row.key_ids,
    }


def _load(body: bytes) -> AuditRecord | None:
    try:
        value = json.loads(bytes(body))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _seal_from_values(values: Any) -> Seal:
    """A seal from a driver row in ``_SEAL_COLUMNS`` order."""
    seal_seq, record_seq, chain_hash, sealed_at, reason, max_unsealed, interval, prev, tag = values
    return Seal(
        seal_seq, record_seq, bytes(chain_hash), sealed_at, reason, max_unsealed, interval,
        bytes(prev), bytes(tag),
    )  # fmt: skip


def _seal_from_row(row: Any) -> Seal:
    return Seal(
        seal_seq=row.seal_seq,
        record_seq=row.record_seq,
        chain_hash=bytes(row.chain_hash),
        sealed_at=row.sealed_at,
        reason=row.reason,
        max_unsealed=row.max_unsealed,
        interval_ms=row.interval_ms,
        prev_tag=bytes(row.prev_tag),
        tag=bytes(row.tag),
    )


def _check_expected(seals: list[Seal], seal_seq: int, tag: bytes) -> None:
    """The (already verified) ``seals`` hold seal ``seal_seq`` with ``tag``."""
    if seal_seq < 1 or seal_seq > len(seals):
        newest = seals[-1].seal_seq if seals else 0
        raise _Failed(
            VerifyStatus.TAMPERED,
            f"seal {seal_seq}: missing (the trail ends at seal {newest}: rolled back)",
            (seals[-1].record_seq if seals else 0) + 1,
        )
    seal = seals[seal_seq - 1]
    if not hmac.compare_digest(seal.tag, tag):
        previous = seals[seal_seq - 2].record_seq if seal_seq > 1 else 0
        raise _Failed(
            VerifyStatus.TAMPERED,
            f"seal {seal_seq}: not the seal recorded earlier (trail rolled back or replaced)",
            previous + 1,
        )


def _gaps(seals: list[Seal]) -> Iterator[SealGap]:
    for before, after in itertools.pairwise(seals):
        start, end = before.time, after.time
        if before.reason == SealReason.SHUTDOWN or start is None or end is None:
            continue
        allowed = STALE_FACTOR * before.interval_ms / 1000
        seconds = (end - start).total_seconds()
        if seconds > allowed:
            yield SealGap(before.seal_seq, seconds, allowed)
