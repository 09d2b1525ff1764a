"""How to reach a token: the resolved settings the PKCS#11 keystore opens."""

from __future__ import annotations

import dataclasses
import enum

from hsmkms.profiles import MechanismProfile


class KeyPlacement(enum.StrEnum):
    """Where new key versions' material lives (``HSMKMS_KEY_PLACEMENT``)."""

    TOKEN = "token"  # noqa: S105 - a placement, not a secret
    """Each key version is its own token object(s)."""
    WRAPPED = "wrapped"
    """Symmetric and HMAC key versions are generated in the token, wrapped there under the
    token's key encryption key and kept wrapped in their key material reference (no token
    object of their own); key pairs stay token objects."""


@dataclasses.dataclass(frozen=True)
class KeystoreConfig:
    """Everything needed to open one token. ``pin`` never shows in ``repr``.

    Exactly how these are derived (PKCS#11 URI, settings, the embedded SoftHSM2 default) is
    :mod:`hsmkms.config`'s business; the keystore only consumes this.
    """

    module_path: str
    pin: str = dataclasses.field(repr=False)
    token_label: str | None = None
    token_serial: str | None = None
    slot_id: int | None = None
    # None: probe the token and choose; a value forces that profile for new key versions.
    profile: MechanismProfile | None = None
    # For SoftHSM2: the config file the module must read (exported as SOFTHSM2_CONF).
    softhsm2_conf: str | None = None
    # A lock file every process of this token holds shared while it creates or destroys token
    # objects and exclusively while it logs in or lists objects (hsmkms backup holds it
    # exclusively while it copies SoftHSM2's token files, which a new object takes many writes
    # to finish); hsmkms names its data directory's for every token. None: no such lock (one
    # process alone on the token).
    write_lock: str | None = None
    # How long to retry token discovery at start (SoftHSM2 can briefly hide a token that
    # another process is writing; reference/pkcs11-facts.md §2.5).
    discovery_timeout: float = 3.0
    # Where new key versions of symmetric and HMAC specs live (existing ones stay where they are).
    placement: KeyPlacement = KeyPlacement.TOKEN
    # The key store id the references of new material name (a custom key store's cks-... id).
    store_id: str = "default"
    # How many wrapped key versions a process keeps unwrapped (session objects, per connection).
    unwrapped_cache: int = 1024
