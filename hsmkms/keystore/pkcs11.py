"""The PKCS#11 keystore: root keys as non-extractable token objects, used through python-pkcs11.

The only module of hsmkms that imports ``pkcs11``. Its process model follows measured facts
(``ARCHITECTURE.md``, ``reference/pkcs11-facts.md``):

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
- **Reconnect.** After ``CKR_DEVICE_REMOVED``, ``CKR_SESSION_HANDLE_INVALID``,
  ``CKR_USER_NOT_LOGGED_IN`` and their kin, sessions are reopened, the user logs in again and
  the operation is retried once.

Object naming: ``CKA_ID`` is 16 random bytes (2 bytes on a YubiHSM 2, whose object ids are
16-bit); ``CKA_LABEL`` is ``hsmkms:<first 20 hex of the key id>:<version>:<role>`` (at most 40
bytes, the YubiHSM 2 limit). The metadata store keeps the authoritative mapping from key version
to ``CKA_ID`` (:class:`~hsmkms.keystore.base.KeyMaterialRef`); labels are for humans and for
finding this project's objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsmkms.keystore.base import KeyMaterialRef, MacKeyRef, Sealed, TokenInfo, TokenObject
from hsmkms.keystore.config import KeystoreConfig
from hsmkms.keystore.errors import (
    RECONNECT_ERRORS,
    STALE_HANDLE_ERRORS,
    TRANSIENT_CREATE_ERRORS,
    DecryptionFailed,
    DeviceFailure,
    KeyMaterialMissing,
    KeystoreError,
    ModuleLoadError,
    MultipleTokens,
    PinIncorrect,
    PinLocked,
    TokenConfigError,
    TokenNotFound,
    TokenRejected,
    TokenUnavailable,
    UnsupportedByToken,
    map_pkcs11_error,
)
from hsmkms.profiles import MechanismProfile

LABEL_PREFIX = "hsmkms:"
_CREATE_ATTEMPTS = 3
_ENUMERATION_ATTEMPTS = 5
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

# The process-wide lock. Re-created in a forked child: a thread of the parent may have held it
# at fork time, and that thread does not exist in the child.
_LOCK = threading.RLock()


# This process's pid, kept current across fork without a system call per operation.
_PID = os.getpid()

# Module path -> (pid, SoftHSM2 config) of the last initialization of the module.
_INITIALIZED_IN: dict[str, tuple[int, str | None]] = {}


def _reset_lock_after_fork() -> None:
    global _LOCK, _PID
    _LOCK = threading.RLock()
    _PID = os.getpid()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def process_lock() -> threading.RLock:
    """The lock that serializes every PKCS#11 call of this process (benchmarks share it)."""
    return _LOCK


_AES_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
}


@dataclasses.dataclass
class _Connection:
    """Everything that belongs to one initialization of the module in one process."""

    pid: int
    lib: Any
    token: Any
    anchor: Any  # the session logged in with the PIN; never closed before shutdown
    session: Any  # the work session, opened without a PIN
    handles: dict[bytes, Any]
    short_ids: bool


class Pkcs11Keystore:
    """A :class:`~hsmkms.keystore.base.Keystore` on a PKCS#11 token. Thread-safe; fork-aware.

    Security contract: key material is generated inside the token as token objects with
    ``CKA_SENSITIVE`` true and ``CKA_EXTRACTABLE`` false and never leaves it; the PIN is held
    only in ``config`` and never logged or shown in ``repr``.
    """

    def __init__(self, config: KeystoreConfig, *, sleep: Callable[[float], None] = time.sleep):
        self._config = config
        self._sleep = sleep
        self._conn: _Connection | None = None
        self._profile: MechanismProfile | None = None
        self._mechanisms: tuple[str, ...] = ()
        self._closed = False

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
        """The live connection of this process; opens (or reopens after fork) under the lock."""
        conn = self._conn
        if conn is not None and conn.pid == _PID:
            return conn
        if self._closed:
            raise TokenUnavailable("keystore is closed")
        conn = self._open()
        self._conn = conn
        return conn

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
                lib.reinitialize()
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
                lib.reinitialize()
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
        lib = self._load_lib()
        # SoftHSM2 can briefly hide a token, or fail a call, while another process writes it,
        # and only sees tokens created after C_Initialize once re-initialized
        # (pkcs11-facts.md §2.4, §2.5): retry the whole opening, re-initializing in between.
        # Never on a PIN error (a real HSM locks the PIN after a few wrong attempts).
        deadline = time.monotonic() + self._config.discovery_timeout
        while True:
            anchor = None
            try:
                token = self._find_token(lib)
                anchor = self._login(token)
                session = token.open(rw=True)
                short_ids = token.manufacturer_id.startswith("Yubico")
                conn = _Connection(os.getpid(), lib, token, anchor, session, {}, short_ids)
                for raw, _label, obj in _project_objects(session):
                    conn.handles[raw] = obj
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
                lib.reinitialize()
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
        device or session went away."""
        with _LOCK:
            for attempt in (0, 1):
                try:
                    return fn(self._connection())
                except RECONNECT_ERRORS as exc:
                    if attempt:
                        raise TokenUnavailable(f"{action}: token unavailable") from exc
                    # Sessions and handles are stale: the next _connection() reopens and logs in.
                    self._drop_connection()
                except KeyMaterialMissing:
                    # After a logout (another session of the process closed, a device reset)
                    # private objects are invisible rather than reported: log in again and
                    # look once more before saying the object is gone.
                    if attempt:
                        raise
                    self._drop_connection()
                except p11e.PKCS11Error as exc:
                    raise map_pkcs11_error(exc, action, decrypting=decrypting) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- profiles ----------------------------------------------------------------------------

    def _choose_profile(self, conn: _Connection) -> MechanismProfile:
        mechanisms = conn.token.slot.get_mechanisms()
        self._mechanisms = tuple(sorted(_mech_name(m) for m in mechanisms))
        portable_ok = {Mechanism.AES_CBC_PAD, Mechanism.SHA256_HMAC} <= set(mechanisms)
        forced = self._config.profile
        if forced is MechanismProfile.AES_256_CBC_HMAC_SHA_256:
            if not portable_ok:
                raise UnsupportedByToken("token lacks CKM_AES_CBC_PAD or CKM_SHA256_HMAC")
            return forced
        if Mechanism.AES_GCM in mechanisms and self._gcm_round_trip(conn):
            return MechanismProfile.AES_256_GCM
        if forced is MechanismProfile.AES_256_GCM:
            raise UnsupportedByToken("token does not perform AES-GCM")
        if not portable_ok:
            raise UnsupportedByToken("token offers neither AES-GCM nor AES-CBC-PAD + HMAC-SHA256")
        return MechanismProfile.AES_256_CBC_HMAC_SHA_256

    @staticmethod
    def _gcm_round_trip(conn: _Connection) -> bool:
        """Probe GCM with a real round trip: some tokens list CKM_AES_GCM yet fail single-part
        GCM through python-pkcs11 (NSS softokn, pkcs11-facts.md §6)."""
        try:
            key = conn.session.generate_key(
                KeyType.AES, 256, store=False,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )  # fmt: skip
            try:
                params = pkcs11.GCMParams(b"\x00" * 12, b"probe", 128)
                ct = key.encrypt(
                    b"hsmkms-probe", mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
                pt = key.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                return bool(pt == b"hsmkms-probe")
            finally:
                key.destroy()
        except p11e.PKCS11Error:
            return False

    @property
    def profile(self) -> MechanismProfile:
        """The profile new key versions get (probed at first open, or forced by configuration)."""
        if self._profile is None:
            self._call("opening the token", lambda conn: None)
        assert self._profile is not None
        return self._profile

    # -- operations --------------------------------------------------------------------------

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
            )

        return self._call("reading token information", work)

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

    def create_key(
        self, key_id: str, version: int, profile: MechanismProfile | None = None
    ) -> KeyMaterialRef:
        """Generate the token object(s) of one key version (see the module docstring for the
        naming scheme). Objects are hardened: token, private, sensitive, non-extractable, not
        modifiable, and only the capabilities the profile needs. On failure, objects created
        so far are destroyed."""
        chosen = profile or self.profile
        label_base = f"{LABEL_PREFIX}{key_id.replace('-', '')[:20]}:{version}"

        def work(conn: _Connection) -> KeyMaterialRef:
            for attempt in range(_CREATE_ATTEMPTS):
                ids = [self._new_object_id(conn) for _ in range(_objects_per_profile(chosen))]
                try:
                    keys = _generate(conn, chosen, label_base, ids, store=True)
                    break
                except TRANSIENT_CREATE_ERRORS:
                    # _generate destroyed what it returned; an object the token made but whose
                    # handle went stale before python-pkcs11 read it back is found by its id.
                    _destroy_by_id(conn, ids)
                    if attempt == _CREATE_ATTEMPTS - 1:
                        raise
                    self._sleep(0.005 * (attempt + 1))
            for raw, key in zip(ids, keys, strict=True):
                conn.handles[raw] = key
            return KeyMaterialRef(chosen, tuple(raw.hex() for raw in ids))

        return self._call("creating a key", work)

    def _key(self, conn: _Connection, object_id: str) -> Any:
        raw = bytes.fromhex(object_id)
        key = conn.handles.get(raw)
        if key is None:
            try:
                key = conn.session.get_key(object_class=ObjectClass.SECRET_KEY, id=raw)
            except p11e.NoSuchKey:
                raise KeyMaterialMissing(f"token object {object_id} not found") from None
            except p11e.MultipleObjectsReturned:
                raise KeyMaterialMissing(f"token object id {object_id} is ambiguous") from None
            conn.handles[raw] = key
        return key

    def _with_keys(
        self, action: str, ref: KeyMaterialRef, fn: Callable[[_Connection, list[Any]], _T],
        *, decrypting: bool = False,
    ) -> _T:  # fmt: skip
        """Run ``fn`` with the ref's key objects. The fast path uses cached handles; on a miss
        or a stale handle it looks the objects up, reconnecting if the session went away."""
        with _LOCK:
            conn = self._conn
            if conn is not None and conn.pid == _PID:
                keys = [conn.handles.get(raw) for raw in ref.raw_ids]
                if None not in keys:
                    try:
                        return fn(conn, keys)
                    except (*RECONNECT_ERRORS, *STALE_HANDLE_ERRORS):
                        pass  # the slow path below evicts, reconnects and retries
                    except p11e.PKCS11Error as exc:
                        raise map_pkcs11_error(exc, action, decrypting=decrypting) from exc

            def work(conn: _Connection) -> _T:
                try:
                    return fn(conn, [self._key(conn, i) for i in ref.object_ids])
                except STALE_HANDLE_ERRORS:
                    for raw in ref.raw_ids:
                        conn.handles.pop(raw, None)
                    return fn(conn, [self._key(conn, i) for i in ref.object_ids])

            return self._call(action, work, decrypting=decrypting)

    def encrypt(self, ref: KeyMaterialRef, plaintext: bytes, aad: bytes) -> Sealed:
        """Encrypt inside the token under ``ref`` with a fresh IV from the token's generator;
        ``aad`` is authenticated, not encrypted."""
        profile = ref.profile
        return self._with_keys(
            "encrypting", ref, lambda conn, keys: _seal(conn, profile, keys, plaintext, aad)
        )

    def decrypt(self, ref: KeyMaterialRef, iv: bytes, body: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt inside the token. Any mismatch of key, IV, AAD or body
        raises :class:`DecryptionFailed`, and nothing else about it."""
        profile = ref.profile
        _check_shape(profile, iv, body)
        return self._with_keys(
            "decrypting", ref, lambda _, keys: _unseal(profile, keys, iv, body, aad),
            decrypting=True,
        )  # fmt: skip

    def self_test(self) -> None:
        """Round trip through the token with temporary session keys of the current profile:
        encrypt, decrypt, and check that a tampered ciphertext is refused. Raises on failure."""
        profile = self.profile

        def work(conn: _Connection) -> None:
            keys = _generate(conn, profile, "hsmkms-selftest", [b"", b""], store=False)
            try:
                sealed = _seal(conn, profile, keys, b"hsmkms self-test", b"self-test aad")
                if _unseal(profile, keys, sealed.iv, sealed.body, b"self-test aad") != (
                    b"hsmkms self-test"
                ):
                    raise DeviceFailure("self-test: round trip returned other bytes")
                tampered = bytes([sealed.body[0] ^ 1]) + sealed.body[1:]
                try:
                    _unseal(profile, keys, sealed.iv, tampered, b"self-test aad")
                except (DecryptionFailed, p11e.PKCS11Error):
                    pass
                else:
                    raise DeviceFailure("self-test: a tampered ciphertext was accepted")
            finally:
                for key in keys:
                    with contextlib.suppress(p11e.PKCS11Error):
                        key.destroy()

        self._call("self-test", work, decrypting=False)

    def random(self, n: int) -> bytes:
        """``n`` bytes from the token's random generator."""
        if n < 1:
            raise TokenRejected("random: length must be positive")
        with _LOCK:
            conn = self._conn
            if conn is not None and conn.pid == _PID:  # fast path: no closure, no retry frame
                try:
                    return bytes(conn.session.generate_random(n * 8))
                except RECONNECT_ERRORS:
                    pass  # the slow path below reconnects and retries
                except p11e.PKCS11Error as exc:
                    raise map_pkcs11_error(exc, "generating random bytes") from exc
        return self._call(
            "generating random bytes", lambda c: bytes(c.session.generate_random(n * 8))
        )

    def destroy(self, ref: KeyMaterialRef) -> None:
        """Destroy the token object(s) of ``ref``; objects already gone are not an error."""

        def work(conn: _Connection) -> None:
            for object_id in ref.object_ids:
                raw = bytes.fromhex(object_id)
                conn.handles.pop(raw, None)
                for obj in list(conn.session.get_objects({Attribute.ID: raw})):
                    obj.destroy()

        self._call("destroying a key", work)

    def exists(self, ref: KeyMaterialRef) -> bool:
        """Whether every object of ``ref`` is on the token (asks the token, not the cache)."""

        def work(conn: _Connection) -> bool:
            return all(
                list(conn.session.get_objects({Attribute.ID: bytes.fromhex(i)}))
                for i in ref.object_ids
            )

        return self._call("looking up a key", work)

    def create_mac_key(self, name: str) -> MacKeyRef:
        """Generate a non-extractable HMAC-SHA-256 token key (generic secret, 256 bits, sign and
        verify only), labelled ``hsmkms:<name>`` (at most 40 bytes)."""
        label = f"{LABEL_PREFIX}{name}"
        if len(label.encode()) > 40:
            raise TokenRejected("MAC key name too long for a token label")

        def work(conn: _Connection) -> MacKeyRef:
            raw = self._new_object_id(conn)
            key = conn.session.generate_key(
                KeyType.GENERIC_SECRET, 256, id=raw, label=label, store=True,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY, template=_AES_TEMPLATE,
            )  # fmt: skip
            conn.handles[raw] = key
            return MacKeyRef(raw.hex())

        return self._call("creating a MAC key", work)

    def mac(self, ref: MacKeyRef, data: bytes) -> bytes:
        """HMAC-SHA-256 of ``data`` computed inside the token."""
        as_key = KeyMaterialRef(MechanismProfile.AES_256_GCM, (ref.object_id,))
        return self._with_keys(
            "computing a MAC", as_key,
            lambda _, keys: bytes(keys[0].sign(data, mechanism=Mechanism.SHA256_HMAC)),
        )  # fmt: skip

    def verify_mac(self, ref: MacKeyRef, data: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the HMAC-SHA-256 of ``data`` (verified inside the token)."""
        if len(tag) != 32:
            return False
        as_key = KeyMaterialRef(MechanismProfile.AES_256_GCM, (ref.object_id,))
        try:
            return self._with_keys(
                "verifying a MAC", as_key,
                lambda _, keys: bool(keys[0].verify(data, tag, mechanism=Mechanism.SHA256_HMAC)),
                decrypting=True,
            )  # fmt: skip
        except DecryptionFailed:
            return False

    def list_objects(self) -> list[TokenObject]:
        """Every secret-key object on the token whose label marks it as this project's."""

        def work(conn: _Connection) -> list[TokenObject]:
            return [
                TokenObject(raw.hex(), label, _key_type_name(obj.key_type))
                for raw, label, obj in _project_objects(conn.session)
            ]

        return self._call("listing objects", work)

    def attributes(self, object_id: str, names: list[str]) -> dict[str, Any]:
        """Read attributes of one of this project's objects (``CKA_`` names without prefix).
        Reading ``VALUE`` of a key fails: that is the point (tests check it)."""

        def work(conn: _Connection) -> dict[str, Any]:
            key = self._key(conn, object_id)
            return {name: key[Attribute[name]] for name in names}

        return self._call("reading attributes", work)

    def close(self) -> None:
        """Close the work and anchor sessions (the latter logs the process out)."""
        with _LOCK:
            self._drop_connection()
            self._closed = True


def _project_objects(session: Any) -> list[tuple[bytes, str, Any]]:
    """``(CKA_ID, label, object)`` of every secret key labelled as this project's.

    Another process may destroy an object between C_FindObjects and the attribute reads; the
    enumeration then starts over (a few times) rather than failing."""
    for attempt in range(_ENUMERATION_ATTEMPTS):
        try:
            found = []
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                label = str(obj.label)
                if label.startswith(LABEL_PREFIX):
                    found.append((bytes(obj.id), label, obj))
            return found
        except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
            if attempt == _ENUMERATION_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _objects_per_profile(profile: MechanismProfile) -> int:
    return 1 if profile is MechanismProfile.AES_256_GCM else 2


def _generate(
    conn: _Connection, profile: MechanismProfile, label_base: str, ids: list[bytes], *, store: bool
) -> list[Any]:
    """Generate the key object(s) of ``profile``: an AES-256 key (encrypt/decrypt only) and, for
    the portable profile, a 256-bit generic secret for HMAC (sign/verify only). Hardened
    template; on failure the objects made so far are destroyed."""
    created: list[Any] = []
    template = _AES_TEMPLATE if store else {**_AES_TEMPLATE, Attribute.TOKEN: False}
    try:
        created.append(
            conn.session.generate_key(
                KeyType.AES, 256, id=ids[0], label=f"{label_base}:a", store=store,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT, template=template,
            )
        )  # fmt: skip
        if profile is MechanismProfile.AES_256_CBC_HMAC_SHA_256:
            created.append(
                conn.session.generate_key(
                    KeyType.GENERIC_SECRET, 256, id=ids[1], label=f"{label_base}:h",
                    store=store, mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY, template=template,
                )
            )  # fmt: skip
    except BaseException:
        for obj in created:
            with contextlib.suppress(p11e.PKCS11Error):
                obj.destroy()
        raise
    return created


def _destroy_by_id(conn: _Connection, ids: list[bytes]) -> None:
    """Best effort: destroy every object holding one of ``ids`` (fresh random ids, so only
    what a failed creation left behind)."""
    for raw in ids:
        with contextlib.suppress(p11e.PKCS11Error):
            for obj in list(conn.session.get_objects({Attribute.ID: raw})):
                with contextlib.suppress(p11e.PKCS11Error):
                    obj.destroy()


def _seal(
    conn: _Connection, profile: MechanismProfile, keys: list[Any], plaintext: bytes, aad: bytes
) -> Sealed:
    if profile is MechanismProfile.AES_256_GCM:
        iv = bytes(conn.session.generate_random(96))
        body = keys[0].encrypt(
            plaintext, mechanism=Mechanism.AES_GCM,
            mechanism_param=pkcs11.GCMParams(iv, aad or None, 128),
        )  # fmt: skip
        return Sealed(iv, bytes(body))
    iv = bytes(conn.session.generate_random(128))
    ct = bytes(keys[0].encrypt(plaintext, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv))
    tag = bytes(keys[1].sign(_mac_input(aad, iv, ct), mechanism=Mechanism.SHA256_HMAC))
    return Sealed(iv, ct + tag)


def _check_shape(profile: MechanismProfile, iv: bytes, body: bytes) -> None:
    if len(iv) != profile.iv_length or len(body) < profile.tag_length:
        raise DecryptionFailed("decryption failed")
    if profile is MechanismProfile.AES_256_CBC_HMAC_SHA_256:
        ct_len = len(body) - profile.tag_length
        if ct_len == 0 or ct_len % 16:
            raise DecryptionFailed("decryption failed")


def _unseal(
    profile: MechanismProfile, keys: list[Any], iv: bytes, body: bytes, aad: bytes
) -> bytes:
    if profile is MechanismProfile.AES_256_GCM:
        params = pkcs11.GCMParams(iv, aad or None, 128)
        return bytes(keys[0].decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params))
    ct, tag = body[: -profile.tag_length], body[-profile.tag_length :]
    # Encrypt-then-MAC: verify inside the token before decrypting anything.
    if not keys[1].verify(_mac_input(aad, iv, ct), tag, mechanism=Mechanism.SHA256_HMAC):
        raise DecryptionFailed("decryption failed")
    return bytes(keys[0].decrypt(ct, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv))


def _mac_input(aad: bytes, iv: bytes, ct: bytes) -> bytes:
    # len64 counts bytes of AAD, big-endian (documented in hsmkms.profiles).
    return len(aad).to_bytes(8, "big") + aad + iv + ct


def _mech_name(mechanism: Any) -> str:
    return getattr(mechanism, "name", None) or f"0x{int(mechanism):08x}"


def _key_type_name(key_type: Any) -> str:
    return getattr(key_type, "name", None) or str(key_type)


__all__ = ["DecryptionFailed", "KeystoreError", "Pkcs11Keystore", "process_lock"]
