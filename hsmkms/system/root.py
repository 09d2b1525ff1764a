"""The composition root: the running system built from :class:`~hsmkms.config.Settings`.

This is the only module of the package that constructs the keystore, the metadata store, the
credentials store, the audit trail and its writer, and the service (a source scan in
``tests/test_system.py`` holds that). Every entry point opens what it needs here:

* a server worker (:class:`hsmkms.api.runtime.Runtime`): ``System.open(settings,
  audit="writer", identity=True, prepare=False)`` — the parent has prepared the data
  directory; records are batched by an :class:`~hsmkms.audit.AuditWriter`;
* the command line: ``System.open(settings)`` (``purge``, ``doctor``, the envelope commands on a
  local data directory; ``identity=True`` for ``credentials``), whose records are appended to
  the trail directly; :func:`open_audit_reader` (``audit tail|search``, no token) and
  :func:`open_audit_verifier` (``audit verify``, the token but no store);
* the tests, through the same calls.

The layers below (``service/``, ``store/``, ``keystore/``, ``identity/``, ``audit/``) never read
settings or open files by themselves; they are handed what they work on from here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Literal

from hsmkms.audit import AuditRecord, AuditTrail, AuditWriter, PreparedRecord, service_event_record
from hsmkms.audit.records import key_id_of
from hsmkms.config import Settings, keystore_config
from hsmkms.db import Database, database_exists, database_location
from hsmkms.errors import ClientError, KMSInternalException
from hsmkms.identity import CredentialStore
from hsmkms.keystore.base import CallObserver, Keystore
from hsmkms.service import EventSink, KmsService, ServiceEvent
from hsmkms.softhsm import ensure_token
from hsmkms.store import MetadataStore
from hsmkms.store.integrity import TokenRowSealer
from hsmkms.types import Clock, utc_now

__all__ = [
    "AuditMode",
    "System",
    "open_audit_reader",
    "open_audit_verifier",
    "service_event_sink",
]

AuditMode = Literal["writer", "direct"]
"""How a :class:`System` writes audit records: ``"writer"`` queues them to an
:class:`~hsmkms.audit.AuditWriter` (a server: batched, from a thread of its own, which also
keeps the trail's seals coming); ``"direct"`` appends each one before returning, in a writer
session of its own — the trail opened (``start`` seal), the record appended, the trail closed
(``shutdown`` seal) — so a command leaves nothing queued, and no seal that falls due while it
runs on (a long file encryption) for ``hsmkms audit verify`` to report as overdue."""

"""Wraps the token's keystore for one process (the server's call-latency metrics)."""


def service_event_sink(
    submit: Callable[[AuditRecord], object], *, region: str, account_id: str
) -> EventSink:
    """The service's ``on_event``: each :class:`~hsmkms.service.ServiceEvent` becomes a
    service-event audit record (``RotateKey`` with the new ``keyVersion``, ``DeleteKey``)
    handed to ``submit``."""

    def on_event(event: ServiceEvent) -> None:
        extra: Mapping[str, object] | None = None
        if event.key_version is not None:
            extra = {"keyVersion": event.key_version}
        submit(
            service_event_record(
                event.name,
                account_id=account_id,
                region=region,
                key_arn=event.key_arn,
                details={"keyId": key_id_of(event.key_arn)},
                additional_event_data=extra,
                event_time=event.time,
            )
        )

    return on_event


def _token(settings: Settings, observer: CallObserver | None) -> Keystore:
    """The configured PKCS#11 token. Imported here, not at module level: opening the system
    loads python-pkcs11, importing it (a command that needs no token) does not."""
    from hsmkms.keystore.pkcs11 import Pkcs11Keystore

    return Pkcs11Keystore(keystore_config(settings), observer=observer)


class System:
    """The keystore, the metadata store (its rows checked with a token MAC key), the service,
    and — when asked for — the credentials store and the audit trail, of one process.

    Open it with :meth:`open` in the process that will use it, after any fork: the keystore
    logs in to the token on first use. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        settings: Settings,
        keystore: Keystore,
        store: MetadataStore,
        *,
        audit: AuditMode | None,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.keystore = keystore
        self.store = store
        self._database: Database | None = None
        self._credentials: CredentialStore | None = None
        self.trail: AuditTrail | None = None  # with audit="writer"
        self.writer: AuditWriter | None = None
        self._audit_mode = audit
        self._trail_lock = threading.Lock()
        self.lost_service_events = 0
        """Service events whose record could not be written (the service logs each one as
        ``service_event_failed`` and goes on; a command reports the count)."""
        on_event: EventSink | None = None
        if audit is not None:
            sink = service_event_sink(
                self.audit, region=settings.region, account_id=settings.account_id
            )

            def on_event(event: ServiceEvent) -> None:
                try:
                    sink(event)
                except Exception:
                    self.lost_service_events += 1
                    raise

        self.service = KmsService(
            keystore,
            store,
            region=settings.region,
            account_id=settings.account_id,
            clock=clock,
            on_event=on_event,
        )

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        audit: AuditMode | None = "direct",
        identity: bool = False,
        clock: Clock = utc_now,
        prepare: bool = True,
        observer: CallObserver | None = None,
    ) -> System:
        """Open the system on the configured token and database.

        ``prepare``: create the data directory, and on the embedded default the SoftHSM2 token,
        when missing (a server worker passes False: its parent did it). ``audit``: where
        records go (:data:`AuditMode`; None: nowhere, and service events are not reported).
        With ``"writer"`` the trail is opened now (a ``start`` seal); with ``"direct"`` only for
        each record, so a command that audits nothing leaves the trail alone. ``identity``:
        open the credentials store too. ``clock``: the service's clock. ``observer``: told the
        latency of every token call (the server's metrics).

        Whatever was opened is closed again when a later part fails.
        """
        if prepare:
            settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if settings.is_embedded:
                ensure_token(settings.data_dir)
        keystore: Keystore = _token(settings, observer)
        opened: list[Callable[[], object]] = [keystore.close]
        try:
            # One engine (and one change probe) for the metadata and the identity tables.
            database = Database(settings.effective_database_url)
            opened.append(database.close)
            store = MetadataStore(database, sealer=TokenRowSealer(keystore))
            opened.append(store.close)
            system = cls(settings, keystore, store, audit=audit, clock=clock)
            system._database = database
            if identity:
                system._credentials = CredentialStore(
                    database, keystore, account_id=settings.account_id
                )
                opened.append(system._credentials.close)
            if audit == "writer":
                system.trail = AuditTrail(settings.audit_database_url, keystore)
                opened.append(system.trail.close)
                system.writer = AuditWriter(system.trail)
        except BaseException:
            for close in reversed(opened):
                with contextlib.suppress(Exception):
                    close()
            raise
        return system

    @property
    def credentials(self) -> CredentialStore:
        """The credentials store (opened with ``identity=True``)."""
        if self._credentials is None:
            raise KMSInternalException("This hsmkms process was opened without the identities.")
        return self._credentials

    # -- audit --------------------------------------------------------------------------------

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Write one audit record the way this system was opened for: queued to the writer
        (see :meth:`AuditWriter.submit`), or appended to the trail before returning. A
        :class:`~hsmkms.errors.KMSError` when it cannot be."""
        if self.writer is not None:
            self.writer.submit(record)
            return
        if self._audit_mode != "direct":
            raise KMSInternalException("This hsmkms process was opened without an audit trail.")
        with self._trail_lock:
            trail = AuditTrail(self.settings.audit_database_url, self.keystore)
            try:
                if isinstance(record, PreparedRecord):
                    trail.append_prepared((record,))
                else:
                    trail.append(record)
            finally:
                trail.close()

    @contextlib.contextmanager
    def audit_reader(self) -> Iterator[AuditTrail]:
        """The audit trail with this system's token, for reading, searching and verifying
        (``hsmkms report``, the console); writes nothing. A server's own trail when it has
        one (left open), else one opened for the block and closed on exit."""
        if self.trail is not None:
            yield self.trail
            return
        trail = AuditTrail(self.settings.audit_database_url, self.keystore, create=False)
        try:
            yield trail
        finally:
            trail.close()

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close everything, in order: the service's background work stops; the writer appends
        what is queued and the trail writes its ``shutdown`` seal while the token session is
        still open; then the stores; the keystore (logging the process out) last."""
        self.service.stop()
        try:
            if self.writer is not None:
                self.writer.close()
            if self.trail is not None:
                self.trail.close()
        finally:
            try:
                if self._credentials is not None:
                    self._credentials.close()
                self.store.close()
                if self._database is not None:
                    self._database.close()
            finally:
                self.keystore.close()

    def __enter__(self) -> System:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Narrower openers: the audit commands
# --------------------------------------------------------------------------------------------


def _existing_audit_database(settings: Settings) -> str:
    """The audit trail's database URL; a database that does not exist (the embedded default's
    file) is an error: reading must not create one."""
    url = settings.audit_database_url
    if not database_exists(url):
        raise ClientError(f"no database at {database_location(url)}")
    return url


def open_audit_reader(settings: Settings) -> AuditTrail:
    """The audit trail for reading (``tail``, ``search``): no token, nothing written. The caller
    closes it. :class:`~hsmkms.errors.ClientError` when its SQLite file does not exist."""
    return AuditTrail(_existing_audit_database(settings), None, create=False)


@contextlib.contextmanager
def open_audit_verifier(settings: Settings) -> Iterator[AuditTrail]:
    """The audit trail with the token's audit key (``verify``), writing nothing; the token and
    the trail are closed on exit. :class:`~hsmkms.errors.ClientError` when its SQLite file does
    not exist."""
    url = _existing_audit_database(settings)
    keystore = _token(settings, None)
    try:
        trail = AuditTrail(url, keystore, create=False)
        try:
            yield trail
        finally:
            trail.close()
    finally:
        keystore.close()
