"""The PKCS#11 keystore: key material as non-extractable token objects, used through
python-pkcs11.

:class:`Pkcs11Keystore` implements both :class:`~hsmkms.keystore.base.KeyBackend` and
:class:`~hsmkms.keystore.base.KeyInventory`. Only the modules of ``hsmkms/keystore/`` named
``pkcs11*`` import ``pkcs11`` (this one, :mod:`~hsmkms.keystore.pkcs11_mechanisms` with the
per-profile and per-spec token operations, :mod:`~hsmkms.keystore.pkcs11_errors` with the error
map). The process model follows measured facts (``ARCHITECTURE.md``,
``reference/pkcs11-facts.md``):

- **One process-wide lock around every PKCS#11 call.** python-pkcs11 calls ``C_Initialize(NULL)``
  and releases the GIL inside calls, so SoftHSM2 and the YubiHSM module run without locks of
  their own; two threads in the module at once crash the process. Parallelism comes from
  processes.
- **Login once per process.** One "anchor" session is opened with the PIN and kept open for the
  life of the process (closing it logs every session out); work happens on a second session
  opened without a PIN.
- **Lazy, fork-aware.** Nothing is loaded until first use; a forked child notices the new pid,
  re-initializes the module and logs in again before its first call.
- **Cached handles.** Objects are enumerated once at open (``CKA_ID -> key``), looked up on a
  miss (another process may have created them) and evicted when the token says a handle is
  invalid. SoftHSM2's lookup is a linear scan of every object file.
- **Reconnect, and fail fast while the token is away.** After ``CKR_DEVICE_REMOVED``,
  ``CKR_SESSION_HANDLE_INVALID``, ``CKR_USER_NOT_LOGGED_IN`` and their kin, sessions are
  reopened, the user logs in again and the operation is retried once. Once the token has been
  open in this process, reopening is one short attempt (not the start-up discovery wait); when
  it fails, the call raises :class:`~hsmkms.keystore.errors.TokenUnavailable` naming the
  PKCS#11 reason, and every call in the next :data:`OUTAGE_RETRY` seconds fails the same way at
  once, without waiting for the process lock. The first call after that tries again: the
  keystore recovers by itself when the token returns. :meth:`Pkcs11Keystore.outage` says why
  the token is away, without a token call (the health check).
- **Anchors.** Short values the token keeps for the service outside the database
  (:meth:`Pkcs11Keystore.write_anchor`): one data object (``CKO_DATA``, private, token) per
  name, found by ``CKA_APPLICATION`` ``hsmkms:<name>``, whose ``CKA_LABEL`` holds the value.
  The label is changed in place with ``C_SetAttributeValue``: SoftHSM2 keeps ``CKA_VALUE`` of
  a data object read-only, and creating and destroying objects costs ten times more.
- **Timing hook.** An optional observer ``(operation, seconds)`` is called after every
  operation (:data:`~hsmkms.keystore.base.CallObserver`); without one, nothing is timed.

Object naming: ``CKA_ID`` is 16 random bytes (2 bytes on a YubiHSM 2, whose object ids are
16-bit); a key pair's private and public key share theirs. ``CKA_LABEL`` is
``hsmkms:<first 20 hex of the key id>:<version>:<role>`` (at most 40 bytes, the YubiHSM 2
limit; :class:`~hsmkms.keystore.base.MaterialName`). The metadata store keeps the
authoritative mapping from key version to ``CKA_ID``
(:class:`~hsmkms.keystore.base.KeyMaterialRef`); labels are for humans and for finding this
project's objects.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Final, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, Mechanism, ObjectClass

from hsmkms.keystore.base import (
    KEK_NAME,
    LABEL_PREFIX,
    CallObserver,
    Capabilities,
    KeyMaterialRef,
    MaterialName,
    TokenIdentity,
    TokenInfo,
    TokenObject,
)
from hsmkms.keystore.config import KeyPlacement, KeystoreConfig
from hsmkms.keystore.errors import (
    DecryptionFailed,
    DeviceFailure,
    IncompatibleMaterial,
    KeyMaterialMissing,
    KeystoreError,
    MaterialRejected,
    ModuleLoadError,
    MultipleTokens,
    PinIncorrect,
    PinLocked,
    TokenConfigError,
    TokenNotFound,
    TokenRejected,
    TokenUnavailable,
    UnsupportedByToken,
    WrappedMaterialInvalid,
)
from hsmkms.keystore.imports import (
    WRAPPING_LABEL_PREFIX,
    ImportedMaterial,
    WrappingAlgorithm,
    WrappingKeyRef,
    WrappingKeySpec,
    material_format,
)
from hsmkms.keystore.pkcs11_errors import (
    RECONNECT_ERRORS,
    STALE_HANDLE_ERRORS,
    TRANSIENT_CREATE_ERRORS,
    ckr_name,
    map_pkcs11_error,
)
from hsmkms.keystore.pkcs11_mechanisms import (
    IMPORT_PROFILE,
    MATERIALS,
    OBJECT_CLASSES,
    PROFILE_MECHANISMS,
    EdwardsMaterial,
    HmacMaterial,
    KeyPairMaterial,
    ProbeRefused,
    RsaMaterial,
    SecretObject,
    Unwrapper,
    generate_kek,
    generate_secrets,
    generate_wrapped,
    generate_wrapping_key,
    probe_wrapping,
    unwrap_secrets,
)
from hsmkms.keystore.specs import (
    AsymmetricEncryption,
    KeyMaterialSpec,
    MaterialUsage,
    SigningAlgorithm,
)
from hsmkms.keystore.token_lock import token_write_lock
from hsmkms.profiles import PROFILES, MechanismProfile, ObjectRole

_CREATE_ATTEMPTS = 3
_ENUMERATION_ATTEMPTS = 5
OUTAGE_RETRY = 0.5
"""Seconds after a failed reconnect during which calls fail at once (then one tries again)."""
# Once the token has been open, reopening it waits at most this long (start-up: the configured
# discovery timeout).
_RECONNECT_WINDOW = 0.3
# Opening the token is retried on these (within the discovery timeout), never on PIN errors.
_TRANSIENT_OPEN_ERRORS: tuple[type[Exception], ...] = (
    TokenNotFound,
    p11e.SlotIDInvalid,
    p11e.UserPinNotInitialized,
    p11e.GeneralError,
    p11e.FunctionFailed,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceError,
    p11e.SessionHandleInvalid,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)
_T = TypeVar("_T")
# A cached KEK handle that went stale (after a logout, the token answers with these).
_KEK_STALE: tuple[type[Exception], ...] = (
    *STALE_HANDLE_ERRORS,
    p11e.WrappingKeyHandleInvalid,
    p11e.UnwrappingKeyHandleInvalid,
)

# The process-wide lock. Re-created in a forked child: a thread of the parent may have held it
# at fork time, and that thread does not exist in the child.
_LOCK = threading.RLock()


# This process's pid, kept current across fork without a system call per operation.
_PID = os.getpid()

# Module path -> (pid, SoftHSM2 config) of the last initialization of the module.
_INITIALIZED_IN: dict[str, tuple[int, str | None]] = {}
# Module path -> how many times this process re-initialized it: every re-initialization ends
# every session of every keystore on the module, so a connection made before is stale.
_GENERATIONS: dict[str, int] = {}


def _reinitialize(lib: Any, path: str) -> None:
    """``C_Finalize`` + ``C_Initialize``: every session on the module (of any keystore of this
    process) ends; connections notice the new generation before they use a stale session."""
    _GENERATIONS[path] = _GENERATIONS.get(path, 0) + 1
    lib.reinitialize()


def _reset_lock_after_fork() -> None:
    global _LOCK, _PID
    _LOCK = threading.RLock()
    _PID = os.getpid()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def process_lock() -> threading.RLock:
    """The lock that serializes every PKCS#11 call of this process (benchmarks share it)."""
    return _LOCK


# The object classes this project creates, enumerated at open and by list_objects().
_PROJECT_CLASSES = (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
# The longest CKA_LABEL a YubiHSM 2 keeps.
_MAX_LABEL = 40


@dataclasses.dataclass
class _Connection:
    """Everything that belongs to one initialization of the module in one process."""

    pid: int
    lib: Any
    token: Any
    anchor: Any  # the session logged in with the PIN; never closed before shutdown
    session: Any  # the work session, opened without a PIN
    handles: dict[bytes, Any]  # CKA_ID -> secret or private key
    public: dict[bytes, Any]  # CKA_ID -> public key (of a key pair)
    short_ids: bool
    generation: int = 0  # the module's re-initialization count when this connection opened
    anchor_objects: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> data obj
    # Wrapped key versions unwrapped into session objects of this connection's work session,
    # least recently used first: reference text -> keys. Handles belong to the session, so a
    # new connection starts empty.
    unwrapped: collections.OrderedDict[str, list[Any]] = dataclasses.field(
        default_factory=collections.OrderedDict
    )


class Pkcs11Keystore:
    """A :class:`~hsmkms.keystore.base.Keystore` on a PKCS#11 token. Thread-safe; fork-aware.

    Security contract: key material is generated inside the token as token objects with
    ``CKA_SENSITIVE`` true and ``CKA_EXTRACTABLE`` false and never leaves it; the PIN is held
    only in ``config`` and never logged or shown in ``repr``.
    """

    def __init__(
        self,
        config: KeystoreConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        observer: CallObserver | None = None,
    ) -> None:
        self._config = config
        self._sleep = sleep
        self._observer = observer
        self._conn: _Connection | None = None
        self._profile: MechanismProfile | None = None
        self._mechanisms: tuple[str, ...] = ()
        self._listed: frozenset[Any] = frozenset()
        self._capabilities: Capabilities | None = None
        self._prehash: bool | None = None  # whether the token performs Ed25519ph
        self._oaep_sha256: bool | None = None  # whether it performs OAEP with SHA-256
        self._public_keys: dict[bytes, bytes] = {}  # key pair id -> DER SubjectPublicKeyInfo
        # Object ids of creations that failed while the token could not be asked whether they
        # left an object (the token away): destroyed by the next creation or settle_abandoned().
        self._abandoned: set[bytes] = set()
        # Anchors this process read or wrote, and ids of objects it found or made and did not
        # destroy: when one of them is not found later, a token that lists no object at all
        # is away (SoftHSM2's directory moved), not missing that one.
        self._anchors_seen: set[str] = set()
        self._known: set[bytes] = set()
        self._closed = False
        self._kek_id: str | None = None  # the KEK new wrapped material goes under (hex id)
        self._ever_open = False  # the token has been open in this process
        self._outage: tuple[float, str] | None = None  # (when, PKCS#11 reason) of the last failure

    def __repr__(self) -> str:
        return f"Pkcs11Keystore(module={self._config.module_path!r}, token={self._token_desc()!r})"

    # -- connection management -------------------------------------------------------------

    def _token_desc(self) -> str:
        c = self._config
        if c.token_label is not None:
            return f"label={c.token_label}"
        if c.token_serial is not None:
            return f"serial={c.token_serial}"
        if c.slot_id is not None:
            return f"slot-id={c.slot_id}"
        return "the only token"

    def _connection(self) -> _Connection:
        """The live connection of this process; opens (or reopens after fork) under the lock.

        Once the token has been open, a failure to reopen it is :class:`TokenUnavailable`
        with the PKCS#11 reason, remembered for :data:`OUTAGE_RETRY` seconds (calls meanwhile
        fail at once)."""
        conn = self._conn
        if conn is not None and self._live(conn):
            return conn
        # Else forgotten, never closed: after a re-initialization the module may have given its
        # session handles to another keystore's new sessions.
        self._conn = None
        if self._closed:
            raise TokenUnavailable("the keystore is closed")
        self._check_outage()
        if not self._ever_open:
            conn = self._open()
        else:
            try:
                conn = self._open()
            except (PinIncorrect, PinLocked):
                raise
            except (KeystoreError, p11e.PKCS11Error) as exc:
                raise self._went_away(_outage_detail(exc)) from exc
        self._conn = conn
        self._ever_open = True
        self._outage = None
        return conn

    def _answers(self) -> bool:
        """Whether the open connection's token still performs an operation (a one-byte random
        draw): tells a token that reported a device error for a failed check from one that
        went away. Called with the process lock held."""
        conn = self._conn
        if conn is None or not self._live(conn):
            return False
        try:
            conn.session.generate_random(8)
        except p11e.PKCS11Error:
            return False
        return True

    def _live(self, conn: _Connection) -> bool:
        """Whether ``conn`` belongs to this process and to the module's current
        initialization."""
        return conn.pid == _PID and conn.generation == _GENERATIONS.get(self._config.module_path, 0)

    def _check_outage(self) -> None:
        """Fail at once while a recent reconnect failed (no lock needed)."""
        outage = self._outage
        if outage is not None and time.monotonic() - outage[0] < OUTAGE_RETRY:
            raise TokenUnavailable(outage[1])

    def _went_away(self, detail: str) -> TokenUnavailable:
        """Remember that the token is away (for :meth:`outage` and the fast failures)."""
        self._outage = (time.monotonic(), detail)
        return TokenUnavailable(detail)

    def outage(self) -> str | None:
        """Why the token could not be reached by the last attempt (the PKCS#11 reason), or
        None when the last attempt worked. Makes no token call and takes no lock."""
        outage = self._outage
        return None if outage is None else outage[1]

    def _load_lib(self) -> Any:
        if self._config.softhsm2_conf is not None:
            conf = self._config.softhsm2_conf
            if not os.access(conf, os.R_OK):
                raise TokenConfigError(f"cannot read SoftHSM2 configuration {conf}")
            # Always the project's own config, never the system one.
            os.environ["SOFTHSM2_CONF"] = conf
        path = self._config.module_path
        if not os.path.exists(path):
            raise ModuleLoadError(f"PKCS#11 module not found: {path}")
        try:
            lib = pkcs11.lib(path)
            wanted = (os.getpid(), self._config.softhsm2_conf)
            if _INITIALIZED_IN.setdefault(path, wanted) != wanted:
                # A forked child: the module state is a copy of the parent's (usage guide v2.40
                # §6.5.1). Or another SoftHSM2 configuration: SoftHSM2 reads SOFTHSM2_CONF only
                # in C_Initialize, so without this a second data directory in one process would
                # silently reach the first one's tokens. Other keystores of this process on the
                # module lose their sessions and reconnect (re-initializing for their own config).
                _reinitialize(lib, path)
                _INITIALIZED_IN[path] = wanted
        except p11e.GeneralError as exc:
            # SoftHSM2 reports a missing or unreadable softhsm2.conf as CKR_GENERAL_ERROR.
            where = os.environ.get("SOFTHSM2_CONF", "its configuration file")
            raise TokenConfigError(
                f"PKCS#11 module {path} failed to initialize (check {where})"
            ) from exc
        except p11e.PKCS11Error as exc:
            if type(exc) is p11e.PKCS11Error and "loading" in str(exc):
                raise ModuleLoadError(f"cannot load PKCS#11 module {path}") from exc
            if "Should never see this" in str(exc):  # CKR_CRYPTOKI_ALREADY_INITIALIZED
                _reinitialize(lib, path)
                return lib
            raise map_pkcs11_error(exc, "initializing the module") from exc
        return lib

    def _find_token(self, lib: Any) -> Any:
        c = self._config
        if c.slot_id is not None:
            for slot in lib.get_slots(token_present=True):
                if slot.slot_id == c.slot_id:
                    token = slot.get_token()
                    if c.token_label is None or token.label == c.token_label:
                        return token
            raise TokenNotFound(f"no token in slot {c.slot_id}")
        kwargs: dict[str, Any] = {}
        if c.token_label is not None:
            kwargs["token_label"] = c.token_label
        if c.token_serial is not None:
            kwargs["token_serial"] = c.token_serial.encode()
        try:
            return lib.get_token(**kwargs)
        except p11e.NoSuchToken:
            raise TokenNotFound(f"no token matches {self._token_desc()}") from None
        except p11e.MultipleTokensReturned:
            serials = sorted(
                bytes(t.serial).decode("ascii", "replace").strip() for t in lib.get_tokens(**kwargs)
            )
            raise MultipleTokens(
                f"several tokens match {self._token_desc()} (serials {', '.join(serials)}): "
                "configure a serial or slot-id"
            ) from None

    def _open(self) -> _Connection:
        with self._token_exclusive():
            return self._open_under_lock()

    def _open_under_lock(self) -> _Connection:
        lib = self._load_lib()
        # SoftHSM2 can briefly hide a token, or fail a call, while another process writes it,
        # and only sees tokens created after C_Initialize once re-initialized
        # (pkcs11-facts.md §2.4, §2.5): retry the whole opening, re-initializing in between.
        # Never on a PIN error (a real HSM locks the PIN after a few wrong attempts). Once the
        # token has been open in this process, briefly: a token that went away fails fast.
        wait = self._config.discovery_timeout
        if self._ever_open:
            wait = min(wait, _RECONNECT_WINDOW)
        deadline = time.monotonic() + wait
        while True:
            anchor = None
            try:
                token = self._find_token(lib)
                anchor = self._login(token)
                session = token.open(rw=True)
                short_ids = token.manufacturer_id.startswith("Yubico")
                generation = _GENERATIONS.get(self._config.module_path, 0)
                conn = _Connection(
                    os.getpid(), lib, token, anchor, session, {}, {}, short_ids, generation
                )
                for raw, _label, obj in _project_objects(session):
                    cache = (
                        conn.public if obj.object_class is ObjectClass.PUBLIC_KEY else conn.handles
                    )
                    cache[raw] = obj
                break
            except _TRANSIENT_OPEN_ERRORS as exc:
                if anchor is not None:
                    with contextlib.suppress(p11e.PKCS11Error):
                        anchor.close()
                if time.monotonic() >= deadline:
                    if isinstance(exc, KeystoreError):
                        raise
                    raise map_pkcs11_error(exc, "opening the token") from exc
                self._sleep(0.1)
                _reinitialize(lib, self._config.module_path)
            except p11e.PKCS11Error as exc:
                raise map_pkcs11_error(exc, "opening the token") from exc
        if self._profile is None:
            self._profile = self._choose_profile(conn)
        return conn

    def _login(self, token: Any) -> Any:
        try:
            return token.open(rw=True, user_pin=self._config.pin)
        except p11e.PinIncorrect:
            raise PinIncorrect(f"wrong PIN for token {token.label!r}") from None
        except p11e.PinLenRange:
            raise PinIncorrect(f"wrong PIN for token {token.label!r} (bad length)") from None
        except p11e.PinLocked:
            raise PinLocked(f"PIN of token {token.label!r} is locked") from None
        except p11e.UserAlreadyLoggedIn:
            # Another session of this process is logged in already: login state is per process.
            return token.open(rw=True)

    def _drop_connection(self) -> None:
        """Forget the sessions and handles (after a device or session failure)."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.pid == os.getpid():
            for sess in (conn.session, conn.anchor):
                with contextlib.suppress(p11e.PKCS11Error):
                    sess.close()

    def _call(
        self, action: str, fn: Callable[[_Connection], _T], *, decrypting: bool = False
    ) -> _T:
        """Run ``fn`` under the process lock; map errors; reconnect and retry once if the
        device or session went away. While the token is known to be away (a reconnect failed
        less than :data:`OUTAGE_RETRY` seconds ago), fail at once without the lock."""
        if self._conn is None:
            self._check_outage()
        with _LOCK:
            for attempt in (0, 1):
                try:
                    return fn(self._connection())
                except RECONNECT_ERRORS as exc:
                    if decrypting and isinstance(exc, p11e.DeviceError) and self._answers():
                        # NSS softokn answers a failed HMAC or signature check with
                        # CKR_DEVICE_ERROR and stays up: a check that failed, not a device.
                        raise DecryptionFailed("decryption failed") from exc
                    if attempt:
                        raise self._went_away(f"{ckr_name(exc)} while {action}") from exc
                    # Sessions and handles are stale: the next _connection() reopens and logs in.
                    self._drop_connection()
                except p11e.GeneralError as exc:
                    # SoftHSM2 answers CKR_GENERAL_ERROR when its token directory went away
                    # (and, while decrypting, for a failed tag check: mapped below). Reopening
                    # tells the two apart: a token that is gone cannot be opened again.
                    if attempt or decrypting:
                        raise map_pkcs11_error(exc, action, decrypting=decrypting) from exc
                    # Sessions and handles are stale: the next _connection() reopens and logs in.
                    self._drop_connection()
                except WrappedMaterialInvalid:
                    raise  # the wrapped bytes are wrong: reconnecting changes nothing
                except KeyMaterialMissing:
                    # After a logout (another session of the process closed, a device reset)
                    # private objects are invisible rather than reported: log in again and
                    # look once more before saying the object is gone.
                    if attempt:
                        conn = self._conn
                        if conn is not None and self._known and not self._shows_objects(conn):
                            # A token whose storage went away finds nothing rather than failing
                            # (SoftHSM2's directory moved away); ours always holds service keys.
                            self._drop_connection()
                            detail = f"the token shows no objects while {action}"
                            raise self._went_away(detail) from None
                        raise
                    self._drop_connection()
                except p11e.PKCS11Error as exc:
                    raise map_pkcs11_error(exc, action, decrypting=decrypting) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- timing ------------------------------------------------------------------------------

    def _token_shared(self) -> contextlib.AbstractContextManager[None]:
        """Hold the token's write lock shared (``KeystoreConfig.write_lock``,
        :mod:`hsmkms.keystore.token_lock`) while objects are created or destroyed, or an
        anchor is read: another process logging in, listing objects or changing an anchor, or
        a backup copying the token files, holds it exclusively. Taken before the process
        lock: waiting for a backup must not stop this process's other calls."""
        path = self._config.write_lock
        return contextlib.nullcontext() if path is None else token_write_lock(path).shared()

    def _token_exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the token's write lock exclusively, with the process lock held: while this
        process opens the token and logs in (``C_Login`` rewrites ``token.object``), reads
        attributes of objects found by anything but their ``CKA_ID`` (one may be another
        process's object half made: SoftHSM2 2.6.1 then writes its defaults over it) or changes
        an object another process may read (an anchor). Taken under the process lock, so no
        thread of this process is inside a token call while the lock changes hands
        (:mod:`hsmkms.keystore.token_lock`)."""
        path = self._config.write_lock
        return contextlib.nullcontext() if path is None else token_write_lock(path).exclusive()

    def _shows_objects(self, conn: _Connection) -> bool:
        """:func:`_shows_token_objects`, which reads an object found by class alone."""
        with self._token_exclusive():
            return _shows_token_objects(conn)

    def _observed(self, operation: str, fn: Callable[[], _T]) -> _T:
        """``fn()``, timed for the observer when there is one. (The hot operations inline the
        same few lines rather than paying for this extra call.)"""
        observer = self._observer
        if observer is None:
            return fn()
        start = perf_counter()
        try:
            return fn()
        finally:
            observer(operation, perf_counter() - start)

    # -- profiles and capabilities -----------------------------------------------------------

    def _choose_profile(self, conn: _Connection) -> MechanismProfile:
        """The forced profile, or the first of the registry's that works on this token."""
        mechanisms = conn.token.slot.get_mechanisms()
        self._mechanisms = tuple(sorted(_mech_name(m) for m in mechanisms))
        self._listed = frozenset(mechanisms)
        forced = self._config.profile
        for profile in [forced] if forced is not None else [p.name for p in PROFILES]:
            try:
                if self._profile_works(conn, profile):
                    return profile
            except ProbeRefused:
                # A token that makes no temporary objects (a YubiHSM 2) cannot be probed:
                # trust its mechanism list for this profile.
                return profile
        if forced is not None:
            needed = ", ".join(sorted(_mech_name(m) for m in PROFILE_MECHANISMS[forced].mechanisms))
            raise UnsupportedByToken(f"token does not perform {forced.value} (needs {needed})")
        raise UnsupportedByToken(
            "token performs no mechanism profile (AES-GCM, or AES-CBC-PAD + HMAC-SHA256)"
        )

    def _profile_works(self, conn: _Connection, profile: MechanismProfile) -> bool:
        """Whether the token lists the profile's mechanisms and passes a real round trip with
        temporary keys (some tokens list CKM_AES_GCM yet fail single-part GCM through
        python-pkcs11: NSS softokn, pkcs11-facts.md §6). ProbeRefused propagates."""
        impl = PROFILE_MECHANISMS[profile]
        return impl.mechanisms <= self._listed and impl.probe(conn.session)

    @property
    def profile(self) -> MechanismProfile:
        """The profile new key versions get (probed at first open, or forced by configuration)."""
        if self._profile is None:
            self._call("opening the token", lambda conn: None)
        assert self._profile is not None
        return self._profile

    def capabilities(self) -> Capabilities:
        """Which specs and profiles this token hosts, each probed with a real operation on
        temporary objects (generate, then encrypt/decrypt, MAC/verify, sign/verify or derive),
        once per keystore."""
        return self._observed("capabilities", self._probe_capabilities)

    def _probe_capabilities(self) -> Capabilities:
        if self._capabilities is not None:
            return self._capabilities

        def work(conn: _Connection) -> Capabilities:
            unverified: set[KeyMaterialSpec] = set()
            profiles: list[MechanismProfile] = []
            for profile in PROFILES:
                try:
                    if self._profile_works(conn, profile.name):
                        profiles.append(profile.name)
                except ProbeRefused:
                    unverified.add(KeyMaterialSpec.SYMMETRIC_DEFAULT)
            usages: dict[KeyMaterialSpec, frozenset[MaterialUsage]] = {}
            rsa_sizes = _key_sizes(conn, Mechanism.RSA_PKCS_KEY_PAIR_GEN)
            rsa_proven: set[MaterialUsage] = set()  # usages a smaller RSA pair passed
            for spec, material in MATERIALS.items():
                hosted: set[MaterialUsage] = set()
                for usage in material.facts.usages:
                    if material.facts.takes_profile:
                        if profiles:
                            hosted.add(usage)
                        continue
                    if not material.mechanisms(usage) <= self._listed:
                        continue
                    if (
                        isinstance(material, RsaMaterial)
                        and usage in rsa_proven
                        and rsa_sizes is not None
                        and material.facts.key_bits in rsa_sizes
                    ):
                        # A larger RSA size: the round trip passed with a smaller one, and
                        # the token's key-size range holds this one. Generating the pair
                        # would cost seconds (RSA_4096 on SoftHSM2: 3-7 s for each usage).
                        hosted.add(usage)
                        continue
                    try:
                        if material.probe(conn.session, usage):
                            hosted.add(usage)
                            if isinstance(material, RsaMaterial):
                                rsa_proven.add(usage)
                    except ProbeRefused:
                        unverified.add(spec)
                if hosted:
                    usages[spec] = frozenset(hosted)
            try:
                wrapping = probe_wrapping(conn.session, self._listed)
            except ProbeRefused:
                wrapping = frozenset()
            unsupported: set[SigningAlgorithm] = set()
            edwards = KeyMaterialSpec.ECC_NIST_EDWARDS25519
            if edwards in usages and not self._prehash_works(conn):
                unsupported.add(SigningAlgorithm.ED25519_PH_SHA_512)
            return Capabilities(
                usages,
                tuple(profiles),
                frozenset(unverified - set(usages)),
                wrapping_algorithms=wrapping,
                unsupported_algorithms=frozenset(unsupported),
            )

        found = self._call("probing capabilities", work)
        self._capabilities = found
        return found

    # -- creating and destroying -------------------------------------------------------------

    def identify(self) -> TokenIdentity:
        """Open the token without logging in (a public session, closed again) and say what it
        is: proves the module loads and the token is there; needs no PIN. Retries discovery
        for the configured timeout, re-initializing the module in between (SoftHSM2 shows a
        token created after ``C_Initialize`` only then). Raises
        :class:`~hsmkms.keystore.errors.KeystoreError` subclasses (``ModuleLoadError``,
        ``TokenConfigError``, ``TokenNotFound``, ``MultipleTokens``...)."""
        with _LOCK:
            lib = self._load_lib()
            deadline = time.monotonic() + self._config.discovery_timeout
            while True:
                try:
                    token = self._find_token(lib)
                    session = token.open()
                    session.close()
                    return TokenIdentity(
                        manufacturer=str(token.manufacturer_id).strip(),
                        model=str(token.model).strip(),
                        serial=bytes(token.serial).decode("ascii", "replace").strip(),
                        label=str(token.label).strip(),
                    )
                except _TRANSIENT_OPEN_ERRORS as exc:
                    if time.monotonic() >= deadline:
                        if isinstance(exc, KeystoreError):
                            raise
                        raise map_pkcs11_error(exc, "opening the token") from exc
                    self._sleep(0.1)
                    _reinitialize(lib, self._config.module_path)
                except p11e.PKCS11Error as exc:
                    raise map_pkcs11_error(exc, "opening the token") from exc

    def info(self) -> TokenInfo:
        """Module, token and mechanism information."""

        def work(conn: _Connection) -> TokenInfo:
            token = conn.token
            return TokenInfo(
                module=self._config.module_path,
                library_description=str(conn.lib.library_description),
                manufacturer=str(token.manufacturer_id),
                model=str(token.model),
                serial=bytes(token.serial).decode("ascii", "replace").strip(),
                label=str(token.label),
                mechanisms=self._mechanisms,
                profile=self.profile,
                firmware_version=_version_text(getattr(token, "firmware_version", None)),
                hardware_version=_version_text(getattr(token, "hardware_version", None)),
            )

        return self._observed("info", lambda: self._call("reading token information", work))

    def _new_object_id(self, conn: _Connection) -> bytes:
        if not conn.short_ids:
            return bytes(conn.session.generate_random(128))
        # YubiHSM 2: 16-bit object ids; avoid ids already present.
        for _ in range(32):
            candidate = bytes(conn.session.generate_random(16))
            if candidate not in conn.handles and not list(
                conn.session.get_objects({Attribute.ID: candidate})
            ):
                return candidate
        raise TokenRejected("no free object id")

    def create(
        self,
        spec: KeyMaterialSpec,
        name: MaterialName,
        *,
        profile: MechanismProfile | None = None,
        usage: MaterialUsage | None = None,
        placement: KeyPlacement | None = None,
    ) -> KeyMaterialRef:
        """Generate the token object(s) of new ``spec`` material named ``name`` (see the module
        docstring). Objects are hardened: token, private, sensitive, non-extractable, not
        modifiable, and only the capabilities the spec and usage need. Symmetric material gets
        ``profile`` or :attr:`profile`. On failure, objects created so far are destroyed.

        With ``placement`` (default: the configured one) ``wrapped``, a key version of secret
        keys only (SYMMETRIC_DEFAULT, HMAC_*) is instead generated as session objects, wrapped
        under the KEK inside the token and destroyed (:meth:`_create_wrapped`); service keys
        (a name that is not per role) and key pairs are always token objects."""
        material = MATERIALS[spec]
        chosen = placement or self._config.placement
        if chosen is KeyPlacement.WRAPPED and name.per_role:
            resolved = profile
            if material.facts.takes_profile and resolved is None:
                resolved = self.profile
            objects = material.secret_objects(resolved)
            if objects is not None:
                return self._observed(
                    material.create_call,
                    lambda: self._create_wrapped(spec, name, resolved, usage, objects),
                )
        return self._observed(
            material.create_call, lambda: self._create(spec, name, profile, usage)
        )

    def _create_wrapped(
        self,
        spec: KeyMaterialSpec,
        name: MaterialName,
        profile: MechanismProfile | None,
        usage: MaterialUsage | None,
        objects: tuple[SecretObject, ...],
    ) -> KeyMaterialRef:
        """Generate the material's secret keys as session objects (sensitive; extractable,
        since only the SO could make the KEK trusted: ``docs/keystore.md``), wrap them under the
        KEK with ``CKM_AES_KEY_WRAP_PAD`` inside the token and destroy them: the reference
        carries the wrapped bytes. Nothing is left on the token."""
        material = MATERIALS[spec]
        try:
            chosen_usage = material.facts.usage(usage)
            material.facts.roles(profile)
        except ValueError as exc:
            raise IncompatibleMaterial(str(exc)) from None

        def work(conn: _Connection) -> KeyMaterialRef:
            missing = (material.mechanisms(chosen_usage) | {Mechanism.AES_KEY_WRAP_PAD}) - (
                self._listed
            )
            if missing:
                names = ", ".join(sorted(f"CKM_{_mech_name(m)}" for m in missing))
                raise UnsupportedByToken(f"the token lacks {names}")
            kek_id, kek = self._kek(conn)
            try:
                wrapped, local = generate_wrapped(conn.session, kek, objects, name)
            except _KEK_STALE:
                conn.handles.pop(bytes.fromhex(kek_id), None)
                kek_id, kek = self._kek(conn)
                wrapped, local = generate_wrapped(conn.session, kek, objects, name)
            return KeyMaterialRef(
                spec, profile, (), self._config.store_id,
                kek_id=kek_id, wrapped=tuple(wrapped), local=local,
            )  # fmt: skip

        if self._kek_id is not None:
            return self._call("creating a wrapped key", work)
        with self._token_shared():  # the KEK may be created
            return self._call("creating a wrapped key", work)

    def _kek(self, conn: _Connection) -> tuple[str, Any]:
        """The KEK new material is wrapped under: the one this keystore chose, else the token's
        (the lowest id when a race between two processes made two: both keep working, since a
        reference names its KEK), else a new one."""
        if self._kek_id is not None:
            return self._kek_id, self._key(conn, self._kek_id, ObjectClass.SECRET_KEY)
        name = MaterialName.service_key(KEK_NAME)
        label = name.label(ObjectRole.ENCRYPT)
        query = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
        # Found by label: another process may be making the KEK (_token_exclusive).
        with self._token_exclusive():
            found = sorted(
                ((bytes(o.id), o) for o in conn.session.get_objects(query)), key=lambda f: f[0]
            )
            if found:
                raw, kek = found[0]
            else:
                raw = self._new_object_id(conn)
                try:
                    kek = generate_kek(conn.session, name, raw)
                except BaseException:
                    self._abandon(conn, [raw])
                    raise
        conn.handles[raw] = kek
        self._known.add(raw)
        self._kek_id = raw.hex()
        return self._kek_id, kek

    def _create(
        self,
        spec: KeyMaterialSpec,
        name: MaterialName,
        profile: MechanismProfile | None,
        usage: MaterialUsage | None,
    ) -> KeyMaterialRef:
        material = MATERIALS[spec]
        facts = material.facts
        if facts.takes_profile and profile is None:
            profile = self.profile
        try:
            chosen_usage = facts.usage(usage)
            roles = facts.roles(profile)
        except ValueError as exc:
            raise IncompatibleMaterial(str(exc)) from None
        if not name.per_role and len(roles) != 1:
            raise IncompatibleMaterial(f"{spec.value} material is not one object")
        if any(len(name.label(role).encode()) > _MAX_LABEL for role in roles):
            raise TokenRejected(f"the name {name.base!r} is too long for a token label")

        def work(conn: _Connection) -> KeyMaterialRef:
            missing = material.mechanisms(chosen_usage) - self._listed
            if missing:
                names = ", ".join(sorted(f"CKM_{_mech_name(m)}" for m in missing))
                raise UnsupportedByToken(f"the token lacks {names}")
            self._settle(conn)
            for attempt in range(_CREATE_ATTEMPTS):
                ids = [self._new_object_id(conn) for _ in roles]
                try:
                    made = material.generate(
                        conn.session, name, ids, profile=profile, usage=chosen_usage, store=True
                    )
                    break
                except TRANSIENT_CREATE_ERRORS:
                    # generate() destroyed what it returned; an object the token made but whose
                    # handle went stale before python-pkcs11 read it back is found by its id.
                    self._abandon(conn, ids)
                    if attempt == _CREATE_ATTEMPTS - 1:
                        raise
                    self._sleep(0.005 * (attempt + 1))
                except BaseException:
                    # The token may have kept the object before failing (its directory going
                    # away between writing the object and answering).
                    self._abandon(conn, ids)
                    raise
            for raw, obj, public in zip(ids, made.objects, made.public, strict=True):
                conn.handles[raw] = obj
                self._known.add(raw)
                if public is not None:
                    conn.public[raw] = public
            return KeyMaterialRef(
                spec, profile, tuple(raw.hex() for raw in ids), self._config.store_id
            )

        with self._token_shared():
            return self._call("creating a key", work)

    def destroy(self, ref: KeyMaterialRef) -> None:
        """Destroy the token object(s) of ``ref``; objects already gone are not an error.
        Wrapped material has none: only this process's unwrapped copy (a session object) is
        destroyed, and forgetting the reference (deleting its row) destroys the material."""
        if ref.is_wrapped:
            self._observed("destroy", lambda: self._forget_unwrapped(ref))
            return

        def work(conn: _Connection) -> None:
            for raw in ref.raw_ids:
                conn.handles.pop(raw, None)
                self._known.discard(raw)
                conn.public.pop(raw, None)
                self._public_keys.pop(raw, None)
                for obj in list(conn.session.get_objects({Attribute.ID: raw})):
                    obj.destroy()

        with self._token_shared():
            self._observed("destroy", lambda: self._call("destroying a key", work))

    def _forget_unwrapped(self, ref: KeyMaterialRef) -> None:
        with _LOCK:
            conn = self._conn
            if conn is not None and self._live(conn):
                _destroy_all(conn.unwrapped.pop(ref.text, []))

    def settle_abandoned(self) -> int:
        """Destroy what creations that failed while the token was away may have left on it
        (objects under fresh ids no row refers to), now that it answers; returns how many ids
        are still unsettled (the token still away). Called by the periodic work."""
        if not self._abandoned:
            return 0
        with self._token_shared():
            self._call("destroying what failed creations left", self._settle)
        return len(self._abandoned)

    def _abandon(self, conn: _Connection, ids: Sequence[bytes]) -> None:
        """After a failed creation (under the process lock): destroy any object holding one of
        ``ids``, and keep the ids for :meth:`_settle` all the same. A token whose directory
        went away answers from memory (the object found and destroyed, or not found) while
        the object stays in the directory, to be back with it."""
        _destroy_by_id(conn, ids)
        self._abandoned.update(ids)

    def _settle(self, conn: _Connection) -> None:
        """Destroy the objects of abandoned ids on a token that answers (the connection opened
        again after the failure, and the token confirmed present after the look)."""
        if self._abandoned:
            unsettled = _destroy_by_id(conn, sorted(self._abandoned))
            _confirm_present(conn)
            self._abandoned = set(unsettled)

    # -- importing material ------------------------------------------------------------------

    def create_wrapping_key(
        self, spec: WrappingKeySpec, name: MaterialName
    ) -> tuple[WrappingKeyRef, bytes]:
        """Generate an RSA wrapping key pair for importing key material (see
        :meth:`~hsmkms.keystore.base.KeyBackend.create_wrapping_key`): the private key a
        hardened token object that can only unwrap, labelled ``name`` (which must start with
        ``hsmkms:import:``), the public key returned as DER and not kept."""
        label = name.label(ObjectRole.KEY_PAIR) if name.per_role else name.base
        if not label.startswith(WRAPPING_LABEL_PREFIX) or len(label.encode()) > _MAX_LABEL:
            raise TokenRejected(f"{label!r} is not a wrapping key label")

        def work(conn: _Connection) -> tuple[WrappingKeyRef, bytes]:
            for attempt in range(_CREATE_ATTEMPTS):
                raw = self._new_object_id(conn)
                try:
                    private, der = generate_wrapping_key(conn.session, spec, raw, label)
                    break
                except TRANSIENT_CREATE_ERRORS:
                    _destroy_by_id(conn, [raw])
                    if attempt == _CREATE_ATTEMPTS - 1:
                        raise
                    self._sleep(0.005 * (attempt + 1))
            conn.handles[raw] = private
            self._known.add(raw)
            return WrappingKeyRef(spec, raw.hex()), der

        return self._observed(
            "create_wrapping_key", lambda: self._call("creating a wrapping key", work)
        )

    def destroy_wrapping_key(self, ref: WrappingKeyRef) -> None:
        """Destroy a wrapping key pair's private key object; already gone is not an error."""

        def work(conn: _Connection) -> None:
            raw = ref.raw_id
            conn.handles.pop(raw, None)
            self._known.discard(raw)
            for obj in list(conn.session.get_objects({Attribute.ID: raw})):
                obj.destroy()

        self._observed(
            "destroy_wrapping_key", lambda: self._call("destroying a wrapping key", work)
        )

    def import_material(
        self,
        spec: KeyMaterialSpec,
        name: MaterialName,
        wrapping_key: WrappingKeyRef,
        algorithm: WrappingAlgorithm,
        wrapped: bytes,
        *,
        profile: MechanismProfile | None = None,
        usage: MaterialUsage | None = None,
    ) -> ImportedMaterial:
        """Unwrap ``wrapped`` inside the token into new ``spec`` material (see
        :meth:`~hsmkms.keystore.base.KeyBackend.import_material`). Symmetric material is kept
        under the AES_256_GCM profile (one AES key), whatever the default profile."""
        material = MATERIALS[spec]
        facts = material.facts
        if facts.takes_profile:
            profile = profile or IMPORT_PROFILE
        try:
            chosen_usage = facts.usage(usage)
            roles = facts.roles(profile)
        except ValueError as exc:
            raise IncompatibleMaterial(str(exc)) from None
        if any(len(name.label(role).encode()) > _MAX_LABEL for role in roles):
            raise TokenRejected(f"the name {name.base!r} is too long for a token label")
        form = material_format(spec)
        if not algorithm.two_step and not form.oaep_allowed:
            raise MaterialRejected(f"{spec.value} material must be wrapped with RSA_AES_KEY_WRAP")

        def work(conn: _Connection) -> ImportedMaterial:
            unwrapping = self._key(conn, wrapping_key.object_id, ObjectClass.PRIVATE_KEY)
            ids = [self._new_object_id(conn) for _ in roles]
            with Unwrapper(
                unwrapping, wrapping_key.spec, algorithm, wrapped, form.length
            ) as unwrapper:
                try:
                    imported = material.unwrap(
                        conn.session, unwrapper, name, ids, profile=profile, usage=chosen_usage
                    )
                except BaseException:
                    self._abandon(conn, ids)  # what a failure left behind, if anything
                    raise
            made = imported.made
            for raw, obj, public in zip(ids, made.objects, made.public, strict=True):
                conn.handles[raw] = obj
                self._known.add(raw)
                if public is not None:
                    conn.public[raw] = public
            ref = KeyMaterialRef(
                spec, profile, tuple(raw.hex() for raw in ids), self._config.store_id
            )
            return ImportedMaterial(ref, imported.check_value)

        return self._observed(
            "import_material",
            lambda: self._call("importing key material", work, decrypting=True),
        )

    # -- using material ----------------------------------------------------------------------

    def _key(self, conn: _Connection, object_id: str, object_class: ObjectClass) -> Any:
        """The (secret or private) key object ``object_id``: cached, or looked up and cached."""
        raw = bytes.fromhex(object_id)
        key = conn.handles.get(raw)
        if key is None:
            try:
                key = conn.session.get_key(object_class=object_class, id=raw)
            except p11e.NoSuchKey:
                raise KeyMaterialMissing(f"token object {object_id} not found") from None
            except p11e.MultipleObjectsReturned:
                raise KeyMaterialMissing(f"token object id {object_id} is ambiguous") from None
            conn.handles[raw] = key
            self._known.add(raw)
        return key

    def _public_key(self, conn: _Connection, raw: bytes) -> Any:
        """The public key object of the key pair ``raw``: cached, or looked up and cached."""
        key = conn.public.get(raw)
        if key is None:
            try:
                key = conn.session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=raw)
            except p11e.NoSuchKey:
                raise KeyMaterialMissing(f"public key {raw.hex()} not found") from None
            except p11e.MultipleObjectsReturned:
                raise KeyMaterialMissing(f"public key id {raw.hex()} is ambiguous") from None
            conn.public[raw] = key
            self._known.add(raw)
        return key

    def _with_keys(
        self, action: str, ref: KeyMaterialRef, fn: Callable[[_Connection, list[Any]], _T],
        *, decrypting: bool = False,
    ) -> _T:  # fmt: skip
        """Run ``fn`` with the ref's key objects. The fast path uses cached handles; on a miss
        or a stale handle it looks the objects up (wrapped material: unwraps it), reconnecting
        if the session went away."""
        with _LOCK:
            conn = self._conn
            if conn is not None and self._live(conn):
                cached = _cached_keys(conn, ref)
                if cached is not None:
                    keys: list[Any] = cached
                    try:
                        return fn(conn, keys)
                    except (*RECONNECT_ERRORS, *STALE_HANDLE_ERRORS):
                        pass  # the slow path below evicts, reconnects and retries
                    except p11e.GeneralError as exc:
                        if decrypting:  # a failed tag check on SoftHSM2
                            raise map_pkcs11_error(exc, action, decrypting=True) from exc
                        # else maybe the token went away: the slow path reconnects and tells
                    except p11e.PKCS11Error as exc:
                        raise map_pkcs11_error(exc, action, decrypting=decrypting) from exc

            classes = [OBJECT_CLASSES[role] for role in ref.roles]

            def lookup(conn: _Connection) -> list[Any]:
                if ref.is_wrapped:
                    return self._unwrapped(conn, ref)
                return [self._key(conn, i, c) for i, c in zip(ref.object_ids, classes, strict=True)]

            def work(conn: _Connection) -> _T:
                try:
                    return fn(conn, lookup(conn))
                except STALE_HANDLE_ERRORS:
                    for raw in ref.raw_ids:
                        conn.handles.pop(raw, None)
                    conn.unwrapped.pop(ref.text, None)
                    if ref.kek_id is not None:
                        conn.handles.pop(bytes.fromhex(ref.kek_id), None)
                    return fn(conn, lookup(conn))

            return self._call(action, work, decrypting=decrypting)

    def _unwrapped(self, conn: _Connection, ref: KeyMaterialRef) -> list[Any]:
        """The session objects of wrapped material: from this connection's LRU, else unwrapped
        under the KEK the reference names (the least recently used entry beyond
        ``KeystoreConfig.unwrapped_cache`` is destroyed). Called with the lock held."""
        keys = conn.unwrapped.get(ref.text)
        if keys is not None:
            conn.unwrapped.move_to_end(ref.text)
            return keys
        assert ref.kek_id is not None
        objects = MATERIALS[ref.spec].secret_objects(ref.profile)
        if objects is None:
            raise IncompatibleMaterial(f"{ref.spec.value} material cannot be wrapped")
        kek = self._key(conn, ref.kek_id, ObjectClass.SECRET_KEY)
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            try:
                keys = unwrap_secrets(conn.session, kek, objects, ref.wrapped)
            except _KEK_STALE:
                # Looked up again; after a logout it is not found, and _call logs in again.
                conn.handles.pop(bytes.fromhex(ref.kek_id), None)
                kek = self._key(conn, ref.kek_id, ObjectClass.SECRET_KEY)
                keys = unwrap_secrets(conn.session, kek, objects, ref.wrapped)
        finally:
            if observer is not None:
                observer("unwrap", perf_counter() - start)
        conn.unwrapped[ref.text] = keys
        while len(conn.unwrapped) > self._config.unwrapped_cache:
            _, evicted = conn.unwrapped.popitem(last=False)
            _destroy_all(evicted)
        return keys

    def _with_public(
        self, action: str, ref: KeyMaterialRef, fn: Callable[[Any], _T], *, decrypting: bool = False
    ) -> _T:
        """Run ``fn`` with the public key of the key pair ``ref``."""
        (raw,) = ref.raw_ids

        def work(conn: _Connection) -> _T:
            try:
                return fn(self._public_key(conn, raw))
            except STALE_HANDLE_ERRORS:
                conn.public.pop(raw, None)
                return fn(self._public_key(conn, raw))

        return self._call(action, work, decrypting=decrypting)

    def encrypt(self, ref: KeyMaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt inside the token under symmetric material with a fresh IV from the token's
        generator; ``aad`` is authenticated, not encrypted. Returns ``(iv, ciphertext || tag)``."""
        if ref.profile is None:
            raise IncompatibleMaterial(f"{ref.spec.value} material does not encrypt")
        seal = PROFILE_MECHANISMS[ref.profile].seal

        def work(conn: _Connection, keys: list[Any]) -> tuple[bytes, bytes]:
            return seal(conn.session, keys, plaintext, aad)

        observer = self._observer
        if observer is None:
            return self._with_keys("encrypting", ref, work)
        start = perf_counter()
        try:
            return self._with_keys("encrypting", ref, work)
        finally:
            observer("encrypt", perf_counter() - start)

    def decrypt(self, ref: KeyMaterialRef, iv: bytes, body: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt inside the token. Any mismatch of key, IV, AAD or body
        raises :class:`DecryptionFailed`, and nothing else about it."""
        if ref.profile is None:
            raise IncompatibleMaterial(f"{ref.spec.value} material does not decrypt")
        impl = PROFILE_MECHANISMS[ref.profile]
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            if not impl.shape_ok(iv, body):
                raise DecryptionFailed("decryption failed")
            unseal = impl.unseal
            return self._with_keys(
                "decrypting", ref, lambda _, keys: unseal(keys, iv, body, aad), decrypting=True
            )
        finally:
            if observer is not None:
                observer("decrypt", perf_counter() - start)

    def _hmac(self, ref: KeyMaterialRef) -> HmacMaterial:
        material = _HMAC.get(ref.spec)
        if material is None:
            raise IncompatibleMaterial(f"{ref.spec.value} material does not compute MACs")
        return material

    def mac(self, ref: KeyMaterialRef, data: bytes) -> bytes:
        """The HMAC of ``data`` under HMAC material, computed inside the token."""
        material = self._hmac(ref)
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            with _LOCK:
                conn = self._conn
                # Fast path (GenerateMac's): one cached handle, no closure, no retry.
                if conn is not None and conn.pid == _PID:
                    keys = _cached_keys(conn, ref)
                    if keys is not None:
                        try:
                            return bytes(keys[0].sign(data, mechanism=material.mechanism))
                        except (*RECONNECT_ERRORS, *STALE_HANDLE_ERRORS):
                            pass  # the slow path below evicts, reconnects and retries
                        except p11e.PKCS11Error as exc:
                            raise map_pkcs11_error(exc, "computing a MAC") from exc
            sign = material.mac
            return self._with_keys("computing a MAC", ref, lambda _, keys: sign(keys[0], data))
        finally:
            if observer is not None:
                observer("mac", perf_counter() - start)

    def verify_mac(self, ref: KeyMaterialRef, data: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the HMAC of ``data`` (verified inside the token)."""
        material = self._hmac(ref)
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            if len(tag) != material.mac_length:
                return False
            verify = material.verify_mac
            return self._with_keys(
                "verifying a MAC", ref, lambda _, keys: verify(keys[0], data, tag),
                decrypting=True,
            )  # fmt: skip
        except DecryptionFailed:
            return False
        finally:
            if observer is not None:
                observer("verify_mac", perf_counter() - start)

    def _pair(self, ref: KeyMaterialRef) -> KeyPairMaterial:
        material = MATERIALS[ref.spec]
        if not isinstance(material, KeyPairMaterial):
            raise IncompatibleMaterial(f"{ref.spec.value} material is not a key pair")
        return material

    def _prehash_works(self, conn: _Connection) -> bool:
        """Whether the token performs Ed25519ph (probed once, with temporary objects; a token
        that refuses them is not trusted with it). Called with the lock held."""
        if self._prehash is None:
            material = MATERIALS[KeyMaterialSpec.ECC_NIST_EDWARDS25519]
            assert isinstance(material, EdwardsMaterial)
            try:
                self._prehash = material.prehash_works(conn.session)
            except ProbeRefused:
                self._prehash = False
        return self._prehash

    def _oaep_sha256_works(self, conn: _Connection) -> bool:
        """Whether the token decrypts RSAES_OAEP_SHA_256 itself (probed once, with temporary
        objects); else the raw RSA operation in the token and the OAEP decoding here, which
        needs CKM_RSA_X_509 (``UnsupportedByToken`` without it). A token that refuses temporary
        objects is trusted to perform OAEP with SHA-256 unless it lists CKM_RSA_X_509. Called
        with the lock held."""
        if self._oaep_sha256 is None:
            material = MATERIALS[KeyMaterialSpec.RSA_2048]
            assert isinstance(material, RsaMaterial)
            try:
                self._oaep_sha256 = material.probe_oaep_sha256(conn.session)
            except ProbeRefused:
                self._oaep_sha256 = Mechanism.RSA_X_509 not in self._listed
        if not self._oaep_sha256 and Mechanism.RSA_X_509 not in self._listed:
            raise UnsupportedByToken(
                "the token performs CKM_RSA_PKCS_OAEP without SHA-256 and lacks CKM_RSA_X_509"
            )
        return self._oaep_sha256

    def _check_performed(self, algorithm: SigningAlgorithm) -> None:
        """``UnsupportedByToken`` for a signing algorithm this token does not perform."""
        if algorithm is SigningAlgorithm.ED25519_PH_SHA_512 and not self._call(
            "probing Ed25519ph", self._prehash_works
        ):
            raise UnsupportedByToken("the token does not perform Ed25519ph (CKM_EDDSA with phFlag)")

    def sign(self, ref: KeyMaterialRef, data: bytes, algorithm: SigningAlgorithm) -> bytes:
        """Sign ``data`` (a digest, or the message for pure EdDSA) with the private key of a
        signing key pair, inside the token. ECDSA signatures are DER-encoded."""
        material = self._pair(ref)
        material.check_algorithm(algorithm, data)
        self._check_performed(algorithm)
        sign = material.sign
        # Timed inline (a hot operation), as encrypt and mac are.
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            return self._with_keys("signing", ref, lambda _, keys: sign(keys[0], data, algorithm))
        finally:
            if observer is not None:
                observer("sign", perf_counter() - start)

    def verify(
        self, ref: KeyMaterialRef, data: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        """Whether ``signature`` signs ``data`` (verified inside the token with the key
        pair's public key)."""
        material = self._pair(ref)
        material.check_algorithm(algorithm, data)
        self._check_performed(algorithm)

        def verify() -> bool:
            try:
                return self._with_public(
                    "verifying a signature", ref,
                    lambda public: material.verify(public, data, signature, algorithm),
                    decrypting=True,
                )  # fmt: skip
            except DecryptionFailed:
                return False

        return self._observed("verify", verify)

    def public_key(self, ref: KeyMaterialRef) -> bytes:
        """The public key of a key pair, DER ``SubjectPublicKeyInfo`` (read from the token
        once per process: a key pair never changes)."""
        material = self._pair(ref)
        (raw,) = ref.raw_ids

        def read() -> bytes:
            known = self._public_keys.get(raw)
            if known is None:
                known = self._with_public("reading a public key", ref, material.public_key)
                self._public_keys[raw] = known
            return known

        return self._observed("public_key", read)

    def asymmetric_encrypt(
        self, ref: KeyMaterialRef, plaintext: bytes, scheme: AsymmetricEncryption
    ) -> bytes:
        """RSAES-OAEP encryption for an encryption key pair. It needs only the public key
        (read from the token): done on the host, as a caller with GetPublicKey's answer would
        (see :class:`~hsmkms.keystore.pkcs11_mechanisms.RsaMaterial`)."""
        material = self._pair(ref)
        spki = self.public_key(ref)
        return self._observed(
            "asymmetric_encrypt", lambda: material.encrypt(spki, plaintext, scheme)
        )

    def asymmetric_decrypt(
        self, ref: KeyMaterialRef, ciphertext: bytes, scheme: AsymmetricEncryption
    ) -> bytes:
        """RSAES-OAEP decryption with the private key of an encryption key pair, inside the
        token. Any failure is :class:`DecryptionFailed`."""
        material = self._pair(ref)

        def decrypt(conn: _Connection, keys: list[Any]) -> bytes:
            in_token = scheme.facts.hash_name == "sha1" or self._oaep_sha256_works(conn)
            return material.decrypt(keys[0], ciphertext, scheme, in_token=in_token)

        return self._observed(
            "asymmetric_decrypt",
            lambda: self._with_keys("decrypting", ref, decrypt, decrypting=True),
        )

    def derive_shared_secret(self, ref: KeyMaterialRef, peer_public_key: bytes) -> bytes:
        """ECDH inside the token between a key agreement key pair and a peer's public key
        (DER ``SubjectPublicKeyInfo`` on the same curve); returns the raw shared secret."""
        material = self._pair(ref)
        point = material.peer_point(peer_public_key)  # checked before the token is asked

        def derive(_: _Connection, keys: list[Any]) -> bytes:
            return material.derive_shared_secret(keys[0], point)

        return self._observed(
            "derive_shared_secret", lambda: self._with_keys("deriving a shared secret", ref, derive)
        )

    def self_test(self) -> None:
        """Round trip through the token with temporary session keys of the current profile:
        encrypt, decrypt, and check that a tampered ciphertext is refused. Raises on failure."""
        impl = PROFILE_MECHANISMS[self.profile]

        def work(conn: _Connection) -> None:
            keys = generate_secrets(
                conn.session, impl.objects, MaterialName("hsmkms-selftest"),
                [b""] * len(impl.objects), store=False,
            )  # fmt: skip
            try:
                iv, body = impl.seal(conn.session, keys, b"hsmkms self-test", b"self-test aad")
                if impl.unseal(keys, iv, body, b"self-test aad") != b"hsmkms self-test":
                    raise DeviceFailure("self-test: round trip returned other bytes")
                tampered = bytes([body[0] ^ 1]) + body[1:]
                try:
                    impl.unseal(keys, iv, tampered, b"self-test aad")
                except (DecryptionFailed, p11e.PKCS11Error):
                    pass
                else:
                    raise DeviceFailure("self-test: a tampered ciphertext was accepted")
            finally:
                for key in keys:
                    with contextlib.suppress(p11e.PKCS11Error):
                        key.destroy()

        self._observed("self_test", lambda: self._call("self-test", work))

    def random(self, n: int) -> bytes:
        """``n`` bytes from the token's random generator."""
        if n < 1:
            raise TokenRejected("random: length must be positive")
        observer = self._observer
        start = perf_counter() if observer is not None else 0.0
        try:
            with _LOCK:
                conn = self._conn
                if conn is not None and self._live(conn):  # fast path: no closure, no retry
                    try:
                        return bytes(conn.session.generate_random(n * 8))
                    except RECONNECT_ERRORS:
                        pass  # the slow path below reconnects and retries
                    except p11e.PKCS11Error as exc:
                        raise map_pkcs11_error(exc, "generating random bytes") from exc
            return self._call(
                "generating random bytes", lambda c: bytes(c.session.generate_random(n * 8))
            )
        finally:
            if observer is not None:
                observer("random", perf_counter() - start)

    # -- inventory ---------------------------------------------------------------------------

    def exists(self, ref: KeyMaterialRef) -> bool:
        """Whether every object of ``ref`` is on the token (asks the token, not the cache)."""

        def work(conn: _Connection) -> bool:
            found = all(
                list(conn.session.get_objects({Attribute.ID: bytes.fromhex(i)}))
                for i in ref.token_object_ids
            )
            if not found:
                _confirm_present(conn)
            return found

        return self._observed("exists", lambda: self._call("looking up a key", work))

    def list_objects(self) -> list[TokenObject]:
        """Every key object on the token whose label marks it as this project's (a key pair
        shows as its private and its public key, with one id)."""

        def work(conn: _Connection) -> list[TokenObject]:
            with self._token_exclusive():  # another process may be making an object
                found = [
                    TokenObject(
                        raw.hex(), label, _key_type_name(obj.key_type), _name(obj.object_class)
                    )
                    for raw, label, obj in _project_objects(conn.session)
                ]
            _confirm_present(conn)  # a listing of a token that went away can be partial
            return found

        return self._observed("list_objects", lambda: self._call("listing objects", work))

    def attributes(
        self, object_id: str, names: list[str], *, public: bool = False
    ) -> dict[str, Any]:
        """Read attributes of one of this project's objects (``CKA_`` names without prefix):
        the secret or private key, or with ``public`` the public key of a key pair. Reading
        ``VALUE`` of a secret or private key fails: that is the point (tests check it)."""

        def work(conn: _Connection) -> dict[str, Any]:
            if public:
                key = self._public_key(conn, bytes.fromhex(object_id))
            else:
                try:
                    key = self._key(conn, object_id, ObjectClass.SECRET_KEY)
                except KeyMaterialMissing:
                    key = self._key(conn, object_id, ObjectClass.PRIVATE_KEY)
            return {name: key[Attribute[name]] for name in names}

        return self._observed("attributes", lambda: self._call("reading attributes", work))

    # -- anchors -----------------------------------------------------------------------------

    def _anchor_object(self, conn: _Connection, name: str) -> Any | None:
        """The object of anchor ``name`` (cached handle, else looked up: the data object, else
        the secret key that carries it on a token without data objects), or None."""
        obj = conn.anchor_objects.get(name)
        if obj is None:
            query = {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: _anchor_app(name)}
            found = list(conn.session.get_objects(query))
            if not found:
                carrier = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: _anchor_id(name)}
                found = list(conn.session.get_objects(carrier))
            if len(found) > 1:
                raise DeviceFailure(f"several token objects hold anchor {name!r}")
            obj = found[0] if found else None
            if obj is not None:
                conn.anchor_objects[name] = obj
        return obj

    def read_anchor(self, name: str) -> str | None:
        """The value last written by :meth:`write_anchor` under ``name`` (read from the token:
        a value another process wrote is seen), or None when there is none."""

        def work(conn: _Connection) -> str | None:
            for attempt in (0, 1):
                obj = self._anchor_object(conn, name)
                if obj is None:
                    _confirm_present(conn)
                    if name in self._anchors_seen and not self._shows_objects(conn):
                        # An anchor this process saw, on a token that now lists no object at
                        # all: its storage went away (SoftHSM2's directory), not the anchor.
                        raise p11e.TokenNotPresent()
                    return None
                try:
                    value = str(obj[Attribute.LABEL])
                    self._anchors_seen.add(name)
                    return value
                except STALE_HANDLE_ERRORS:
                    # The cached handle went stale (the token reopened, or went away): look
                    # the object up again once; _call reconnects if the token is away.
                    conn.anchor_objects.pop(name, None)
                    if attempt:
                        raise p11e.TokenNotPresent() from None
            raise AssertionError("unreachable")  # pragma: no cover

        # Shared: not while another process changes an anchor (SoftHSM2 2.6.1 lets a reader see
        # its file empty while the writer finishes it).
        with self._token_shared():
            return self._observed("read_anchor", lambda: self._call("reading an anchor", work))

    def write_anchor(self, name: str, value: str) -> None:
        """Keep ``value`` (ASCII, at most 40 characters) under ``name``: the label of a private
        token data object found by its ``CKA_APPLICATION`` (``hsmkms:<name>``), changed in
        place (``C_SetAttributeValue``; ~1 ms on SoftHSM2), created on first use. A token
        that refuses to change it raises :class:`UnsupportedByToken`."""
        if not value.isascii() or len(value) > _MAX_LABEL:
            raise TokenRejected("an anchor value is at most 40 ASCII characters")

        def work(conn: _Connection) -> None:
            with self._token_exclusive():  # others read the anchor meanwhile
                change(conn)

        def change(conn: _Connection) -> None:
            obj = self._anchor_object(conn, name)
            if obj is None:
                try:
                    conn.anchor_objects[name] = conn.session.create_object(
                        {
                            Attribute.CLASS: ObjectClass.DATA,
                            Attribute.TOKEN: True,
                            Attribute.PRIVATE: True,
                            Attribute.MODIFIABLE: True,
                            Attribute.APPLICATION: _anchor_app(name),
                            Attribute.LABEL: value,
                        }
                    )
                except _NO_DATA_OBJECTS as exc:
                    # NSS softokn keeps no token data objects (CKR_ATTRIBUTE_VALUE_INVALID):
                    # a secret key that can do nothing carries the value in its label.
                    conn.anchor_objects[name] = _anchor_carrier(conn, name, value, exc)
                return
            try:
                obj[Attribute.LABEL] = value
            except (p11e.AttributeReadOnly, p11e.FunctionNotSupported) as exc:
                raise UnsupportedByToken(
                    f"the token does not let anchor {name!r} change ({ckr_name(exc)})"
                ) from exc
            except STALE_HANDLE_ERRORS:
                # As in read_anchor: _call reconnects, and the next write looks it up again.
                conn.anchor_objects.pop(name, None)
                raise p11e.TokenNotPresent() from None

        # The change holds the lock exclusively (work): readers of the anchor and a backup
        # copying the token wait for it, as for keys.
        self._observed("write_anchor", lambda: self._call("writing an anchor", work))
        self._anchors_seen.add(name)

    def close(self) -> None:
        """Close the work and anchor sessions (the latter logs the process out)."""
        with _LOCK:
            self._drop_connection()
            self._closed = True


_HMAC: dict[KeyMaterialSpec, HmacMaterial] = {
    spec: m for spec, m in MATERIALS.items() if isinstance(m, HmacMaterial)
}


def _project_objects(session: Any) -> list[tuple[bytes, str, Any]]:
    """``(CKA_ID, label, object)`` of every key object labelled as this project's.

    Another process may destroy an object between C_FindObjects and the attribute reads; the
    enumeration then starts over (a few times) rather than failing."""
    for attempt in range(_ENUMERATION_ATTEMPTS):
        try:
            found = []
            for object_class in _PROJECT_CLASSES:
                for obj in session.get_objects({Attribute.CLASS: object_class}):
                    label = str(obj.label)
                    if label.startswith(LABEL_PREFIX):
                        found.append((bytes(obj.id), label, obj))
            return found
        except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
            if attempt == _ENUMERATION_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _cached_keys(conn: _Connection, ref: KeyMaterialRef) -> list[Any] | None:
    """The ref's key objects if this connection has them all at hand (cached handles, or the
    unwrapped copy of wrapped material, marked as just used), else None."""
    if ref.kek_id is not None:
        keys = conn.unwrapped.get(ref.text)
        if keys is not None:
            conn.unwrapped.move_to_end(ref.text)
        return keys
    handles = conn.handles
    found = [handles.get(raw) for raw in ref.raw_ids]
    return None if None in found else found


def _destroy_all(objects: Sequence[Any]) -> None:
    for obj in objects:
        with contextlib.suppress(p11e.PKCS11Error):
            obj.destroy()


def _confirm_present(conn: _Connection) -> None:
    """Before reporting what is (or is not) on the token: check that the token is there at
    all. SoftHSM2 finds no object (or only those made in this session) in a token whose
    directory went away, rather than failing, and keeps answering its slot list from memory;
    the objects it had loaded then report ``CKR_OBJECT_HANDLE_INVALID``. So: the slot must be
    listed, and of up to three cached objects at least one must still answer."""
    slot_id = conn.token.slot.slot_id
    if all(slot.slot_id != slot_id for slot in conn.lib.get_slots(token_present=True)):
        raise p11e.TokenNotPresent()
    sample = list(itertools.islice(conn.handles.items(), 3))
    if not sample:
        return
    for raw, obj in sample:
        try:
            obj[Attribute.CLASS]
        except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
            conn.handles.pop(raw, None)
            continue
        return
    raise p11e.TokenNotPresent()


_NO_DATA_OBJECTS: Final = (
    p11e.AttributeValueInvalid,
    p11e.AttributeTypeInvalid,
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
)
"""How a token that keeps no private token data objects refuses to create one."""


def _key_sizes(conn: _Connection, mechanism: Mechanism) -> range | None:
    """The key sizes (bits) the token says ``mechanism`` makes (``C_GetMechanismInfo``), or
    None when it does not say (no range, or an error)."""
    try:
        info = conn.token.slot.get_mechanism_info(mechanism)
    except p11e.PKCS11Error:
        return None
    low, high = int(info.min_key_length), int(info.max_key_length)
    if high <= 0 or high < low:
        return None
    return range(low, high + 1)


def _shows_token_objects(conn: _Connection) -> bool:
    """Whether the token lists at least one token object (or cannot be asked: the caller's
    error stands). A token serving hsmkms always holds its service keys, so none at all means
    its storage is away, not that one key's material is missing."""
    try:
        with contextlib.closing(conn.session.get_objects({Attribute.TOKEN: True})) as found:
            return next(found, None) is not None  # closing ends the search at once
    except p11e.PKCS11Error:
        return True


def _anchor_id(name: str) -> bytes:
    """The ``CKA_ID`` of the secret key that carries anchor ``name`` on a token that keeps no
    data objects."""
    return b"hsmkms-anchor:" + hashlib.sha256(name.encode()).digest()[:16]


def _anchor_carrier(conn: _Connection, name: str, value: str, refused: Exception) -> Any:
    """A private, sensitive, never extractable token secret key with no capability at all,
    whose modifiable ``CKA_LABEL`` carries anchor ``name``'s value (for a token that refused
    the data object: ``refused``). UnsupportedByToken when the token refuses this too."""
    try:
        return conn.session.generate_key(
            pkcs11.KeyType.GENERIC_SECRET,
            128,
            id=_anchor_id(name),
            label=value,
            store=True,
            capabilities=0,
            mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
            template={
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.MODIFIABLE: True,
            },
        )
    except p11e.PKCS11Error as exc:
        raise UnsupportedByToken(
            f"the token keeps no private data objects ({ckr_name(refused)}) nor a modifiable "
            f"secret key ({ckr_name(exc)}), where hsmkms keeps its anchors (docs/keystore.md)"
        ) from exc


def _anchor_app(name: str) -> str:
    """The ``CKA_APPLICATION`` that finds anchor ``name``'s data object."""
    return f"{LABEL_PREFIX}{name}"


def _outage_detail(exc: Exception) -> str:
    """The reason a reopen failed, for the caller: the PKCS#11 return value and what was being
    done (never a file path)."""
    if isinstance(exc, p11e.PKCS11Error):
        return f"{ckr_name(exc)} while opening the token"
    cause = exc.__cause__
    if isinstance(exc, TokenNotFound):
        return exc.message
    assert isinstance(exc, KeystoreError)
    if isinstance(cause, p11e.PKCS11Error):
        config = isinstance(exc, TokenConfigError)
        where = "initializing the module" if config else "opening the token"
        return f"{ckr_name(cause)} while {where}"
    if isinstance(exc, TokenUnavailable):
        return exc.detail
    return f"{type(exc).__name__} while opening the token"


def _destroy_by_id(conn: _Connection, ids: Sequence[bytes]) -> list[bytes]:
    """Destroy every object holding one of ``ids`` (fresh random ids, so only what a failed
    creation left behind). Returns the ids the token could not be asked about or could not
    destroy (an error answered); an id holding no object is settled."""
    unsettled = []
    for raw in ids:
        try:
            for obj in list(conn.session.get_objects({Attribute.ID: raw})):
                obj.destroy()
        except p11e.PKCS11Error:
            unsettled.append(raw)
    return unsettled


def _mech_name(mechanism: Any) -> str:
    return getattr(mechanism, "name", None) or f"0x{int(mechanism):08x}"


def _key_type_name(key_type: Any) -> str:
    return getattr(key_type, "name", None) or str(key_type)


def _version_text(version: Any) -> str:
    """A CK_VERSION as python-pkcs11 gives it (``(major, minor)`` or text) as ``major.minor``."""
    if version is None:
        return ""
    if isinstance(version, tuple | list) and len(version) == 2:
        return f"{int(version[0])}.{int(version[1])}"
    return str(version).strip()


def _name(value: Any) -> str:
    return getattr(value, "name", None) or str(value)


__all__ = [
    "LABEL_PREFIX",
    "DecryptionFailed",
    "KeystoreError",
    "Pkcs11Keystore",
    "process_lock",
]
