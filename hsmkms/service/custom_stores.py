"""The custom key stores (AWS_CLOUDHSM) as one process uses them: each connected store's token
opened by this process itself, on first use, with the store's password.

The connection state is the database's (:class:`~hsmkms.store.key_stores.CustomKeyStoreTable`),
shared by every process and node: ConnectCustomKeyStore sets CONNECTING and the process that
took the call tries the token in a background thread (CONNECTED, or FAILED with a
ConnectionErrorCode); DisconnectCustomKeyStore sets DISCONNECTED. Every use of a store reads its
row: a process whose store was disconnected elsewhere closes its own connection and refuses the
use (KMSInvalidStateException), and a process that has not opened a CONNECTED store yet opens
it (after fork, each worker its own: the keystore is fork-aware and lazy).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Callable
from typing import Final

import structlog

from hsmkms.db import Database
from hsmkms.errors import KMSInvalidStateException
from hsmkms.keystore.base import Keystore, TokenIdentity
from hsmkms.keystore.errors import KeystoreError, PinIncorrect, PinLocked
from hsmkms.models.enums import ConnectionErrorCodeType, ConnectionStateType, CustomKeyStoreType
from hsmkms.service.blocking import leave_the_event_loop
from hsmkms.service.xks_client import (
    XksClientSettings,
    XksProxyClient,
    XksProxyFailure,
    XksProxyLocation,
)
from hsmkms.store.key_stores import CustomKeyStoreRecord, CustomKeyStoreTable, trust_anchor_of
from hsmkms.types import Clock, utc_now

__all__ = ["CustomKeyStores", "TokenOpener"]

log = structlog.get_logger(__name__)

TokenOpener = Callable[[str, str, str], Keystore]
"""``(pkcs11 URI, PIN, store id) -> keystore``: a keystore for a cluster's token (not opened
yet), whose new material references name the store. Built by the composition root (only it
knows how a URI becomes a keystore); None where custom key stores are not available."""

STALE_CONNECTING: Final = dt.timedelta(minutes=5)
"""A store CONNECTING for longer was abandoned (an attempt takes seconds)."""
CONNECTED: Final = ConnectionStateType.CONNECTED.value
CONNECTING: Final = ConnectionStateType.CONNECTING.value
DISCONNECTED: Final = ConnectionStateType.DISCONNECTED.value
FAILED: Final = ConnectionStateType.FAILED.value
EXTERNAL: Final = CustomKeyStoreType.EXTERNAL_KEY_STORE.value
_E = ConnectionErrorCodeType


def not_connected(store_id: str, state: str) -> KMSInvalidStateException:
    """What a use of a key in a store that is not CONNECTED raises."""
    return KMSInvalidStateException(
        f"The custom key store {store_id} is not connected (its connection state is {state})."
    )


class CustomKeyStores:
    """This process's connections to the custom key stores. Thread-safe."""

    def __init__(
        self,
        database: Database,
        keystore: Keystore,
        opener: TokenOpener,
        *,
        clock: Clock = utc_now,
        region: str = "us-east-1",
        xks: XksClientSettings | None = None,
    ) -> None:
        self.xks = XksProxyClient(xks or XksClientSettings(), region=region, clock=clock)
        self._database = database
        self._keystore = keystore
        self._opener = opener
        self._clock = clock
        self._lock = threading.Lock()
        self._table: CustomKeyStoreTable | None = None
        # store id -> (the row's generation when opened, the keystore)
        self._held: dict[str, tuple[int, Keystore]] = {}
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"CustomKeyStores({sorted(self._held)})"

    @property
    def table(self) -> CustomKeyStoreTable:
        """The clusters and stores table (migrated on first use)."""
        with self._lock:
            if self._table is None:
                self._table = CustomKeyStoreTable(self._database, self._keystore, clock=self._clock)
            return self._table

    # -- use ----------------------------------------------------------------------------------

    def backend(self, store_id: str) -> Keystore:
        """The keystore of a CONNECTED store, opened by this process on first use;
        KMSInvalidStateException when the store is not connected (or gone)."""
        record = self.table.get(store_id)
        if record is None:
            self.drop(store_id)
            raise not_connected(store_id, "unknown")
        if record.connection_state != CONNECTED:
            self.drop(store_id)
            raise not_connected(store_id, record.connection_state)
        return self._connection(record)

    def _connection(self, record: CustomKeyStoreRecord) -> Keystore:
        with self._lock:
            held = self._held.get(record.store_id)
        if held is not None and held[0] == record.generation:
            return held[1]
        leave_the_event_loop("opening a custom key store's token")
        keystore = self._open(record)
        extra: Keystore | None
        with self._lock:
            old = self._held.get(record.store_id)
            if old is not None and old[0] == record.generation:
                keep, extra = old[1], keystore  # another thread opened it first
            else:
                self._held[record.store_id] = (record.generation, keystore)
                keep, extra = keystore, (old[1] if old is not None else None)
        if extra is not None:
            with contextlib.suppress(Exception):
                extra.close()
        return keep

    def _open(self, record: CustomKeyStoreRecord) -> Keystore:
        cluster = None if record.cluster_id is None else self.table.cluster(record.cluster_id)
        if cluster is None:
            raise not_connected(record.store_id, "without its cluster")
        return self._opener(
            cluster.pkcs11_uri, self.table.password(record.store_id), record.store_id
        )

    def drop(self, store_id: str) -> None:
        """Close this process's connection to the store (if any)."""
        with self._lock:
            held = self._held.pop(store_id, None)
        if held is not None:
            with contextlib.suppress(Exception):
                held[1].close()
            log.info("custom_key_store_closed", store_id=store_id)

    # -- connecting ---------------------------------------------------------------------------

    def start_connecting(self, record: CustomKeyStoreRecord) -> None:
        """Try the store's token in a background thread (the row says CONNECTING)."""
        thread = threading.Thread(
            target=self.attempt,
            args=(record.store_id, record.generation),
            name=f"hsmkms-connect-{record.store_id}",
            daemon=True,
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def attempt(self, store_id: str, generation: int) -> str:
        """Open the store's token with its password, check that it is the cluster's token
        (its trust anchor), and set CONNECTED, or FAILED with the ConnectionErrorCode; only
        if the row still says CONNECTING with this generation. Returns the state set."""
        table = self.table
        record = table.get(store_id)
        if record is None or record.connection_state != CONNECTING:
            return "" if record is None else record.connection_state
        if record.store_type == EXTERNAL:
            return self._attempt_external(record, generation)
        cluster = None if record.cluster_id is None else table.cluster(record.cluster_id)
        if cluster is None:
            return self._failed(store_id, generation, _E.CLUSTER_NOT_FOUND)
        keystore: Keystore | None = None
        code: ConnectionErrorCodeType | None = None
        try:
            keystore = self._opener(cluster.pkcs11_uri, table.password(store_id), store_id)
            identity = TokenIdentity.of(keystore.info())  # opens the token and logs in
            if trust_anchor_of(identity) != cluster.trust_anchor:
                log.warning("custom_key_store_token_changed", store_id=store_id)
                code = _E.CLUSTER_NOT_FOUND
        except PinIncorrect:
            code = _E.INVALID_CREDENTIALS
        except PinLocked:
            code = _E.USER_LOCKED_OUT
        except KeystoreError as exc:
            log.warning("custom_key_store_unreachable", store_id=store_id, error=type(exc).__name__)
            code = _E.NETWORK_ERRORS
        except Exception:
            log.exception("custom_key_store_connect_failed", store_id=store_id)
            code = _E.INTERNAL_ERROR
        if code is not None:
            if keystore is not None:
                with contextlib.suppress(Exception):
                    keystore.close()
            return self._failed(store_id, generation, code)
        assert keystore is not None
        if not table.set_state(store_id, CONNECTED, expect=(CONNECTING,), generation=generation):
            # Disconnected (or changed) meanwhile.
            with contextlib.suppress(Exception):
                keystore.close()
            current = table.get(store_id)
            return "" if current is None else current.connection_state
        with self._lock:
            old = self._held.get(store_id)
            self._held[store_id] = (generation, keystore)
        if old is not None:
            with contextlib.suppress(Exception):
                old[1].close()
        log.info("custom_key_store_connected", store_id=store_id)
        return CONNECTED

    def location(self, record: CustomKeyStoreRecord) -> XksProxyLocation:
        """An external store's proxy and credential, its secret unsealed in memory."""
        if record.xks is None:
            raise not_connected(record.store_id, "without its proxy")
        return XksProxyLocation(
            record.xks.uri_endpoint,
            record.xks.uri_path,
            record.xks.access_key_id,
            self.table.password(record.store_id),
        )

    def _attempt_external(self, record: CustomKeyStoreRecord, generation: int) -> str:
        """An external store connects when its proxy answers GetHealthStatus, signed with the
        store's credential (``http://`` only where allowed)."""
        store_id = record.store_id
        try:
            location = self.location(record)
            if location.uri_endpoint.startswith("http://") and not self.xks.settings.allow_http:
                raise XksProxyFailure(
                    _E.XKS_PROXY_INVALID_CONFIGURATION.value, "http:// is not allowed"
                )
            self.xks.health(location, str(uuid.uuid4()))
        except XksProxyFailure as exc:
            log.warning("external_key_store_health_failed", store_id=store_id, **exc.facts())
            return self._failed(store_id, generation, ConnectionErrorCodeType(exc.code))
        except Exception:
            log.exception("external_key_store_connect_failed", store_id=store_id)
            return self._failed(store_id, generation, _E.INTERNAL_ERROR)
        if not self.table.set_state(
            store_id, CONNECTED, expect=(CONNECTING,), generation=generation
        ):
            current = self.table.get(store_id)
            return "" if current is None else current.connection_state
        log.info("custom_key_store_connected", store_id=store_id)
        return CONNECTED

    def _failed(self, store_id: str, generation: int, code: ConnectionErrorCodeType) -> str:
        self.table.set_state(
            store_id, FAILED, expect=(CONNECTING,), error_code=code.value, generation=generation
        )
        log.warning("custom_key_store_connection_failed", store_id=store_id, code=code.value)
        return FAILED

    def settle_stale(self, now: dt.datetime) -> list[str]:
        """Stores left CONNECTING for longer than :data:`STALE_CONNECTING` (the process trying
        them ended before it could tell): FAILED with INTERNAL_ERROR, so that they can be
        disconnected and connected again rather than hang. The ids settled."""
        settled = []
        for record in self.table.stores():
            if record.connection_state != CONNECTING:
                continue
            if self.table.set_state(
                record.store_id,
                FAILED,
                expect=(CONNECTING,),
                error_code=_E.INTERNAL_ERROR.value,
                generation=record.generation,
                changed_before=now - STALE_CONNECTING,
            ):
                log.warning("custom_key_store_connect_abandoned", store_id=record.store_id)
                settled.append(record.store_id)
        return settled

    def wait(self, timeout: float = 10.0) -> None:
        """Wait for the connection attempts this process started (tests, shutdown)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    def close(self) -> None:
        """Close every connection of this process (end of process), after the connection
        attempts under way (for a few seconds at most)."""
        self.wait(5.0)
        with self._lock:
            held, self._held = self._held, {}
        for _generation, keystore in held.values():
            with contextlib.suppress(Exception):
                keystore.close()
