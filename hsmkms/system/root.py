"""The composition root: the running system built from :class:`~hsmkms.config.Settings`.

This is the only module of the package that constructs the keystore, the metadata store, the
credentials store, the audit trail and its writer, and the service (a source scan in
``tests/test_system.py`` holds that). Every entry point opens what it needs here:

* a server worker (:class:`hsmkms.api.runtime.Runtime`): ``System.open(settings,
  audit="writer", identity=True, prepare=False)`` — the parent has prepared the data
  directory; records are batched by an :class:`~hsmkms.audit.AuditWriter`;
* the command line: ``System.open(settings)`` (``purge``, ``doctor``, the envelope commands on a
  local data directory; ``identity=True`` for ``credentials``), whose records are appended to
  the trail directly, each append sealed by a ``command`` seal (no writer session);
  :func:`open_audit_reader` (``audit tail|search``, no token) and :func:`open_audit_verifier`
  (``audit verify``, the token but no store);
* the tests, through the same calls.

The layers below (``service/``, ``store/``, ``keystore/``, ``identity/``, ``audit/``) never read
settings or open files by themselves; they are handed what they work on from here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

import structlog

from hsmkms.audit import AuditRecord, AuditTrail, AuditWriter, PreparedRecord, service_event_record
from hsmkms.audit.records import key_id_of
from hsmkms.config import ConfigError, Settings, cluster_keystore_config, keystore_config
from hsmkms.db import Database, database_exists, database_location
from hsmkms.errors import ClientError, KMSError, KMSInternalException
from hsmkms.identity import CredentialStore, root_account
from hsmkms.identity.xks import XksCredentialStore
from hsmkms.keystore.base import CallObserver, Keystore, TokenIdentity
from hsmkms.service import EventSink, KmsService, ServiceEvent
from hsmkms.service.custom_stores import TokenOpener
from hsmkms.service.last_usage import KeyUsageHistory, KeyUse
from hsmkms.service.xks_client import XksClientSettings
from hsmkms.softhsm import ensure_token, relocate_conf
from hsmkms.store import MetadataStore
from hsmkms.store.integrity import TokenRowSealer
from hsmkms.types import Clock, utc_now

log = structlog.get_logger(__name__)

__all__ = [
    "AuditMode",
    "System",
    "cluster_identity",
    "database_device",
    "open_audit_reader",
    "open_audit_resumer",
    "open_audit_verifier",
    "service_event_sink",
]

AuditMode = Literal["writer", "direct"]
"""How a :class:`System` writes audit records: ``"writer"`` through an
:class:`~hsmkms.audit.AuditWriter` (a server: a writer session with its heartbeat seals; the
records of concurrent requests committed together, each request waiting for its own);
``"direct"`` appends each one before returning, as a command: records and a ``command`` seal in
one transaction, no writer session (a command has no thread to keep seals coming while it
runs, and must not open or close a session as if it were a server)."""


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


class TrailUsageHistory:
    """The service's :class:`~hsmkms.service.last_usage.KeyUsageHistory`, read from the audit
    trail: ``trail()`` gives the trail for one query (the server's own, or a reader opened
    for the call)."""

    def __init__(self, trail: Callable[[], contextlib.AbstractContextManager[AuditTrail]]) -> None:
        self._trail = trail

    def tracking_start(self) -> dt.datetime | None:
        with self._trail() as trail:
            return trail.first_event_time()

    def last_use(self, key_id: str, operations: Collection[str]) -> KeyUse | None:
        with self._trail() as trail:
            record = trail.last_use(key_id, operations)
        if record is None:
            return None
        event_id, request_id = record.get("eventID"), record.get("requestID")
        return KeyUse(
            operation=str(record["eventName"]),
            time=dt.datetime.fromisoformat(str(record["eventTime"])),
            event_id=event_id if isinstance(event_id, str) else None,
            request_id=request_id if isinstance(request_id, str) else None,
        )


def database_device(settings: Settings, url: str) -> str | None:
    """How messages name where the database at ``url`` lives when its device is full: ``the
    data directory's device`` for a SQLite file in the data directory (the embedded default),
    else None (the database layer's generic wording)."""
    location = database_location(url)
    try:
        inside = Path(location).resolve().is_relative_to(settings.data_dir.resolve())
    except (OSError, ValueError):
        return None
    return "the data directory's device" if inside else None


def _token(settings: Settings, observer: CallObserver | None) -> Keystore:
    """The configured PKCS#11 token. Imported here, not at module level: opening the system
    loads python-pkcs11, importing it (a command that needs no token) does not. On the
    embedded default, a config left pointing at the token directory of the place this data
    directory was copied or moved from is pointed back at its own first
    (:func:`hsmkms.softhsm.relocate_conf`)."""
    from hsmkms.keystore.pkcs11 import Pkcs11Keystore

    if settings.is_embedded:
        relocate_conf(settings.data_dir)

    return Pkcs11Keystore(keystore_config(settings), observer=observer)


def _token_opener(settings: Settings, observer: CallObserver | None) -> TokenOpener:
    """How the service opens a custom key store's token (a cluster registered with ``hsmkms
    clusters add``): a lazy, fork-aware PKCS#11 keystore on the cluster's URI with the store's
    password as its PIN."""

    def open_token(pkcs11_uri: str, pin: str, store_id: str) -> Keystore:
        from hsmkms.keystore.pkcs11 import Pkcs11Keystore

        config = cluster_keystore_config(settings, pkcs11_uri, pin, store_id)
        return Pkcs11Keystore(config, observer=observer)

    return open_token


def cluster_identity(settings: Settings, pkcs11_uri: str) -> TokenIdentity:
    """What the token a cluster's ``pkcs11_uri`` names says it is, asked without logging in
    (``hsmkms clusters add``): proves the module loads and the token is there. Raises
    :class:`~hsmkms.config.ConfigError` for a bad URI and the keystore's errors for a token
    that cannot be reached."""
    from hsmkms.keystore.pkcs11 import Pkcs11Keystore

    probe = Pkcs11Keystore(cluster_keystore_config(settings, pkcs11_uri, "", "default"))
    return probe.identify()


def _check_deployment(settings: Settings, store: MetadataStore) -> None:
    """Refuse settings whose account or region differ from those the database's keys were made
    for (recorded by :meth:`MetadataStore.claim_deployment`): the ARNs this process would mint
    would name no stored key, and the root credential another account."""
    account, region = store.claim_deployment(
        settings.account_id,
        settings.region,
        known_account=lambda: root_account(store.database),
    )
    where = (
        f"the data directory {settings.data_dir}"
        if settings.database_url is None
        else f"the database {database_location(settings.effective_database_url)}"
    )
    if account != settings.account_id:
        raise ConfigError(
            f"{where} belongs to account {account}, but HSMKMS_ACCOUNT_ID is "
            f"{settings.account_id}: set it to {account} (or unset it if that is the default), "
            "or use another data directory"
        )
    if region != settings.region:
        raise ConfigError(
            f"{where} belongs to region {region}, but HSMKMS_REGION is "
            f"{settings.region}: set it to {region}, or use another data directory"
        )


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
        token_opener: TokenOpener | None = None,
    ) -> None:
        self.settings = settings
        self.keystore = keystore
        self.store = store
        self._database: Database | None = None
        self._credentials: CredentialStore | None = None
        self._xks_credentials: XksCredentialStore | None = None
        self._xks_lock = threading.Lock()
        self.trail: AuditTrail | None = None  # with audit="writer"
        self.writer: AuditWriter | None = None
        self._audit_mode = audit
        self._trail_lock = threading.Lock()
        self._command_trail: AuditTrail | None = None  # with audit="direct", on first record
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

        usage_history: KeyUsageHistory | None = None
        if audit is not None:
            usage_history = TrailUsageHistory(self._usage_trail)
        self.service = KmsService(
            keystore,
            store,
            region=settings.region,
            account_id=settings.account_id,
            clock=clock,
            on_event=on_event,
            usage_history=usage_history,
            token_opener=token_opener,
            xks=XksClientSettings(
                allow_http=settings.xks_allow_http,
                ca_bundle=settings.xks_ca_bundle,
                timeout=settings.xks_timeout,
            ),
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
            url = settings.effective_database_url
            database = Database(url, device=database_device(settings, url))
            opened.append(database.close)
            store = MetadataStore(database, sealer=TokenRowSealer(keystore))
            opened.append(store.close)
            _check_deployment(settings, store)
            system = cls(
                settings,
                keystore,
                store,
                audit=audit,
                clock=clock,
                token_opener=_token_opener(settings, observer),
            )
            system._database = database
            if identity:
                system._credentials = CredentialStore(
                    database, keystore, account_id=settings.account_id
                )
                opened.append(system._credentials.close)
            if audit == "writer":
                system.trail, failure = _open_writer_trail(settings, keystore)
                opened.append(system.trail.close)
                system.writer = AuditWriter(system.trail, failure=failure)
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

    @property
    def xks_credentials(self) -> XksCredentialStore:
        """The XKS proxy credentials store, opened (and its tables migrated) on first use."""
        with self._xks_lock:
            if self._xks_credentials is None:
                if self._database is None:
                    raise KMSInternalException("This hsmkms process has no database.")
                self._xks_credentials = XksCredentialStore(self._database, self.keystore)
            return self._xks_credentials

    # -- audit --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _usage_trail(self) -> Iterator[AuditTrail]:
        """The trail GetKeyLastUsage reads: the writer's (a server), else a reader opened for
        the query (no trail yet: an empty one)."""
        if self.trail is not None:
            yield self.trail
            return
        trail = AuditTrail(self.settings.audit_database_url, None, create=False)
        try:
            yield trail
        finally:
            trail.close()

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        """Write one audit record and return once it is committed: through the writer (which
        commits it with the records of other waiting requests; see
        :meth:`AuditWriter.append`), or appended to the trail with a ``command`` seal. A
        :class:`~hsmkms.errors.KMSError` when it cannot be (503
        :class:`~hsmkms.errors.ServiceUnavailable` naming the cause)."""
        if self.writer is not None:
            self.writer.append(record)
            return
        with self._trail_lock:
            trail = self._direct_trail()
            if isinstance(record, PreparedRecord):
                trail.append_prepared((record,))
            else:
                trail.append(record)

    def end_copied_sessions(self) -> tuple[str, ...]:
        """A restored copy's trail records the end of the original's writer sessions
        (:meth:`AuditTrail.end_copied_sessions`); with ``audit="direct"`` only."""
        with self._trail_lock:
            return self._direct_trail().end_copied_sessions()

    def _direct_trail(self) -> AuditTrail:
        """The trail a command appends to (``audit="direct"``), opened on first use. Trail
        lock held."""
        if self._audit_mode != "direct":
            raise KMSInternalException("This hsmkms process was opened without an audit trail.")
        trail = self._command_trail
        if trail is None:
            url = self.settings.audit_database_url
            trail = AuditTrail(
                url, self.keystore, command=True, device=database_device(self.settings, url)
            )
            self._command_trail = trail
        return trail

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
            if self._command_trail is not None:
                self._command_trail.close()
        finally:
            try:
                if self._credentials is not None:
                    self._credentials.close()
                if self._xks_credentials is not None:
                    self._xks_credentials.close()
                self.store.close()
                if self._database is not None:
                    self._database.close()
            finally:
                try:
                    self.service.close_custom_key_stores()
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


def _open_writer_trail(
    settings: Settings, keystore: Keystore
) -> tuple[AuditTrail, KMSError | None]:
    """A server's trail, and why it could not be opened yet: a fault of its surroundings (a
    full disk, the token away) does not stop the worker — its writer keeps trying, and
    requests are answered 503 with the cause meanwhile; anything else (a wrong audit key
    reference, a schema this hsmkms does not know) does."""
    url = settings.audit_database_url
    trail = AuditTrail(
        url,
        keystore,
        start=False,
        seal_interval=settings.audit_seal_interval,
        device=database_device(settings, url),
    )
    try:
        trail.start()
    except KMSError as exc:
        if not exc.shows_cause:
            trail.close()
            raise
        log.error("audit_trail_unavailable", error=exc.message)
        return trail, exc
    return trail, None


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
def open_audit_resumer(settings: Settings) -> Iterator[AuditTrail]:
    """The audit trail opened to write a ``resume`` seal (``hsmkms audit resume``): the
    token, no writer session; closed on exit."""
    url = _existing_audit_database(settings)
    keystore = _token(settings, None)
    try:
        trail = AuditTrail(url, keystore, command=True, device=database_device(settings, url))
        try:
            yield trail
        finally:
            trail.close()
    finally:
        keystore.close()


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
