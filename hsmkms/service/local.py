"""Opening the service on a data directory, for the CLI and the server."""

from __future__ import annotations

from hsmkms.config import Settings, keystore_config
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service.kms import KmsService
from hsmkms.softhsm import ensure_token
from hsmkms.store import MetadataStore
from hsmkms.store.integrity import TokenRowSealer
from hsmkms.types import Clock, utc_now


def open_service(settings: Settings, *, clock: Clock = utc_now) -> KmsService:
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
        keystore, store, region=settings.region, account_id=settings.account_id, clock=clock
    )
