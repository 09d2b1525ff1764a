"""Opening the service on a data directory, for the CLI and the server."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hsmkms.audit import AuditRecord, service_event_record
from hsmkms.audit.records import key_id_of
from hsmkms.config import Settings, keystore_config
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service.core import EventSink, ServiceEvent
from hsmkms.service.kms import KmsService
from hsmkms.softhsm import ensure_token
from hsmkms.store import MetadataStore
from hsmkms.store.integrity import TokenRowSealer
from hsmkms.types import Clock, utc_now


def open_service(
    settings: Settings, *, clock: Clock = utc_now, on_event: EventSink | None = None
) -> KmsService:
    """A :class:`KmsService` on the configured token and database. On the embedded default, the
    data directory and SoftHSM2 token are created when missing. The store's rows are checked
    with a token HMAC key (:mod:`hsmkms.store.integrity`), which logs in to the token while
    opening: open the service in the process that will use it (after any fork)."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.is_embedded:
        ensure_token(settings.data_dir)
    keystore = Pkcs11Keystore(keystore_config(settings))
    store = MetadataStore(settings.effective_database_url, sealer=TokenRowSealer(keystore))
    return KmsService(
        keystore,
        store,
        region=settings.region,
        account_id=settings.account_id,
        clock=clock,
        on_event=on_event,
    )


def service_event_sink(
    submit: Callable[[AuditRecord], object], *, region: str, account_id: str
) -> EventSink:
    """The service's ``on_event``: each :class:`ServiceEvent` becomes a service-event audit
    record (``RotateKey`` with the new ``keyVersion``, ``DeleteKey``) handed to ``submit``."""

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
