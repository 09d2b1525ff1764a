"""The key store seam: what the layers above need from a token, as Protocols, and the
reference that names key material in a store.

- :class:`KeyBackend`: create material for a key spec and use it by reference (encrypt and
  decrypt, public-key encryption, MAC, sign and verify, key agreement, public key export),
  random bytes, and the capabilities the token reports per spec. Every operation is timed
  through the optional observer hook (:data:`CallObserver`).
- :class:`KeyInventory`: what is on the token, and diagnostics (info, list_objects, exists,
  attributes, self_test).
- :class:`Keystore`: both; what :class:`~hsmkms.keystore.stores.KeyStores` holds per store.

The only implementation is :class:`hsmkms.keystore.pkcs11.Pkcs11Keystore`; the Protocols exist
so the layers above never import ``pkcs11`` (a test checks that only ``hsmkms/keystore/``
does).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from hsmkms.keystore.config import KeyPlacement
from hsmkms.keystore.specs import (
    SPECS,
    AsymmetricEncryption,
    KeyMaterialSpec,
    MaterialUsage,
    SigningAlgorithm,
)
from hsmkms.profiles import MechanismProfile, ObjectRole

if TYPE_CHECKING:
    from hsmkms.keystore.imports import (
        ImportedMaterial,
        WrappingAlgorithm,
        WrappingKeyRef,
        WrappingKeySpec,
    )

__all__ = [
    "DEFAULT_STORE",
    "KEK_NAME",
    "LABEL_PREFIX",
    "CallObserver",
    "Capabilities",
    "KeyBackend",
    "KeyInventory",
    "KeyMaterialRef",
    "Keystore",
    "MaterialName",
    "TokenIdentity",
    "TokenInfo",
    "TokenObject",
    "checked_mac_key",
]

DEFAULT_STORE: Final = "default"
"""The id of the configured token's key store."""

LABEL_PREFIX: Final = "hsmkms:"
"""Every token object this project creates has a label starting with this."""

KEK_NAME: Final = "kek"
"""The service key name of the key encryption key that wraps key versions kept wrapped
(``HSMKMS_KEY_PLACEMENT=wrapped``): labelled ``hsmkms:kek``."""

CallObserver = Callable[[str, float], None]
"""``(operation, seconds)``: called by a backend after each of its operations (failures
included), with the time it took (the wait for the process lock included). Operation names are
the backend's method names, except that creating material is ``create_key`` (symmetric and
asymmetric specs) or ``create_mac_key`` (HMAC specs). Must not raise."""

_STORE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_HEX_ID = re.compile(r"(?:[0-9a-fA-F]{2})+")
_V2 = "v2"
_V3 = "v3"
_WRAPPED = "wrapped"
_NO_PROFILE = "-"
# Hard maxima of a wrapped reference: RFC 5649 output of at most a 64-byte HMAC_512 key is 72
# bytes; far more is refused when parsing.
_MAX_WRAPPED = 256
_MIN_WRAPPED = 16
_LOCAL = {"1": True, "0": False}
# The forms stored before references named their store (still read, never written).
_LEGACY_MAC_PREFIX = "HMAC_SHA_256"
_KEY_VERSION_LABEL = re.compile(
    rf"{LABEL_PREFIX}[0-9a-f]{{20}}:[0-9]{{1,10}}:[{''.join(r.value for r in ObjectRole)}]"
)


@dataclasses.dataclass(frozen=True)
class KeyMaterialRef:
    """Names the token object(s) holding one piece of key material, and the key store they are
    in. Stored in the metadata store; no secret here.

    ``object_ids`` are the objects' ids (hex; ``CKA_ID`` on a PKCS#11 token), one per role of
    the spec (and profile), in role order: ``[aes]`` for AES_256_GCM, ``[aes, hmac]`` for
    AES_256_CBC_HMAC_SHA_256, ``[hmac]`` for HMAC_*, ``[pair]`` for a key pair (its private and
    public key objects share one id).

    Text form (:meth:`to_str`), version 2::

        v2:<store id>:<spec>:<profile or ->:<id>[,<id>...]
        v2:default:SYMMETRIC_DEFAULT:AES_256_GCM:5f0c...
        v2:default:HMAC_256:-:9a41...

    Wrapped material (``HSMKMS_KEY_PLACEMENT=wrapped``) has no token object of its own: the
    reference carries the id of the key encryption key (KEK) on the token and, per role, the
    material wrapped under it inside the token (``CKM_AES_KEY_WRAP_PAD``, RFC 5649; standard
    base64), and whether the token reported the generated object as ``CKA_LOCAL`` (1 or 0).
    Version 3::

        v3:<store id>:<spec>:<profile or ->:wrapped:<KEK id>:<local>:<b64>[,<b64>...]
        v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:77c1...:1:q3Jv...

    The wrapped bytes are no secret without the KEK, which never leaves the token; the row
    holding the reference is covered by the metadata store's integrity MAC all the same.

    :meth:`from_str` also reads the forms written before (``AES_256_GCM:<id>``,
    ``AES_256_CBC_HMAC_SHA_256:<id>,<id>``, ``HMAC_SHA_256:<id>``: the default store), and a
    parsed reference keeps the exact text it was read from (:attr:`text`), so stored rows
    (covered by integrity MACs) are never rewritten.
    """

    spec: KeyMaterialSpec
    profile: MechanismProfile | None
    """The mechanism profile (symmetric material); ``None`` for every other spec."""
    object_ids: tuple[str, ...]
    """Empty for wrapped material."""
    store: str = DEFAULT_STORE
    """The id of the key store holding the objects (:class:`~hsmkms.keystore.stores.KeyStores`)."""
    kek_id: str | None = dataclasses.field(default=None, repr=False)
    """Wrapped material: the object id (hex) of the KEK it is wrapped under; else None."""
    wrapped: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)
    """Wrapped material: per role, the material wrapped under the KEK (RFC 5649)."""
    local: bool = dataclasses.field(default=True, repr=False)
    """Wrapped material: whether the token reported ``CKA_LOCAL`` true on the object it
    generated (before wrapping it); always True for token objects (not recorded)."""
    text: str = dataclasses.field(init=False, compare=False, repr=False)
    """The stored text form: as read by :meth:`from_str`, else the version 2 form."""

    def __post_init__(self) -> None:
        if not isinstance(self.spec, KeyMaterialSpec):
            raise TypeError("spec must be a KeyMaterialSpec")
        if self.profile is not None and not isinstance(self.profile, MechanismProfile):
            raise TypeError("profile must be a MechanismProfile or None")
        self.check_store_id(self.store)
        roles = SPECS.facts(self.spec).roles(self.profile)  # ValueError: profile mismatch
        profile = _NO_PROFILE if self.profile is None else self.profile.value
        if self.kek_id is not None:
            if self.object_ids:
                raise ValueError("wrapped material has no object ids")
            if not isinstance(self.kek_id, str) or not _HEX_ID.fullmatch(self.kek_id):
                raise ValueError("the KEK id must be hex")
            if len(self.wrapped) != len(roles):
                raise ValueError("wrong number of wrapped keys for the spec and profile")
            if not all(
                isinstance(w, bytes) and _MIN_WRAPPED <= len(w) <= _MAX_WRAPPED and len(w) % 8 == 0
                for w in self.wrapped
            ):
                raise ValueError("malformed wrapped key")
            blobs = ",".join(base64.b64encode(w).decode("ascii") for w in self.wrapped)
            local = "1" if self.local else "0"
            text = (
                f"{_V3}:{self.store}:{self.spec.value}:{profile}:{_WRAPPED}:{self.kek_id}:"
                f"{local}:{blobs}"
            )
        else:
            if self.wrapped or not self.local:
                raise ValueError("only wrapped material carries wrapped keys")
            if len(self.object_ids) != len(roles):
                raise ValueError("wrong number of object ids for the spec and profile")
            if not all(isinstance(i, str) and _HEX_ID.fullmatch(i) for i in self.object_ids):
                raise ValueError("object ids must be hex")
            text = f"{_V2}:{self.store}:{self.spec.value}:{profile}:{','.join(self.object_ids)}"
        object.__setattr__(self, "text", text)

    @property
    def is_wrapped(self) -> bool:
        """Whether the material is kept wrapped under a KEK (no token object of its own)."""
        return self.kek_id is not None

    @property
    def token_object_ids(self) -> tuple[str, ...]:
        """The ids of the token objects the material needs: its own, or its KEK's."""
        return self.object_ids if self.kek_id is None else (self.kek_id,)

    @staticmethod
    def check_store_id(store_id: str) -> None:
        """``ValueError`` unless ``store_id`` can name a key store: 1-64 of ``a-z0-9-``,
        starting with a letter or digit (``default``; AWS-style ``cks-...`` ids)."""
        if not isinstance(store_id, str) or not _STORE_ID.fullmatch(store_id):
            raise ValueError("malformed key store id")

    @functools.cached_property
    def raw_ids(self) -> tuple[bytes, ...]:
        """``object_ids`` as bytes (``CKA_ID`` values)."""
        return tuple(bytes.fromhex(i) for i in self.object_ids)

    @functools.cached_property
    def roles(self) -> tuple[ObjectRole, ...]:
        """The role of each object, in ``object_ids`` order."""
        return SPECS.facts(self.spec).roles(self.profile)

    @property
    def encryption_profile(self) -> MechanismProfile:
        """The mechanism profile of symmetric material; ``ValueError`` for any other spec."""
        if self.profile is None:
            raise ValueError(f"{self.spec.value} material has no mechanism profile")
        return self.profile

    def to_str(self) -> str:
        """The text form for the metadata store (:attr:`text`)."""
        return self.text

    @classmethod
    def from_str(cls, value: str) -> KeyMaterialRef:
        """Parse a stored text form, current or old; ``ValueError`` when malformed. The number
        of object ids must be the spec's (and profile's)."""
        if value.startswith(_V3 + ":"):
            return cls._parse_wrapped(value)
        if value.startswith(_V2 + ":"):
            parts = value.split(":")
            if len(parts) != 5:
                raise ValueError("malformed key material reference")
            _, store, spec_name, profile_name, ids = parts
            spec = KeyMaterialSpec(spec_name)
            profile = None if profile_name == _NO_PROFILE else MechanismProfile(profile_name)
        else:
            prefix, _, ids = value.partition(":")
            store = DEFAULT_STORE
            if prefix == _LEGACY_MAC_PREFIX:
                spec, profile = KeyMaterialSpec.HMAC_256, None
            else:
                spec, profile = KeyMaterialSpec.SYMMETRIC_DEFAULT, MechanismProfile(prefix)
        ref = cls(spec, profile, tuple(ids.split(",")), store)
        object.__setattr__(ref, "text", value)
        return ref

    @classmethod
    def _parse_wrapped(cls, value: str) -> KeyMaterialRef:
        parts = value.split(":")
        if len(parts) != 8 or parts[4] != _WRAPPED or parts[6] not in _LOCAL:
            raise ValueError("malformed key material reference")
        _, store, spec_name, profile_name, _, kek_id, local, blobs = parts
        profile = None if profile_name == _NO_PROFILE else MechanismProfile(profile_name)
        try:
            wrapped = tuple(
                base64.b64decode(b, validate=True) for b in blobs.split(",") if len(b) <= 512
            )
        except binascii.Error:
            raise ValueError("malformed wrapped key") from None
        ref = cls(
            KeyMaterialSpec(spec_name), profile, (), store,
            kek_id=kek_id, wrapped=wrapped, local=_LOCAL[local],
        )  # fmt: skip
        if ref.text != value:  # one text per reference: no second spelling of the same bytes
            raise ValueError("malformed key material reference")
        return ref


@dataclasses.dataclass(frozen=True)
class MaterialName:
    """What the token objects of new material are called (``CKA_LABEL``; at most 40 bytes, the
    YubiHSM 2 limit).

    A key version's objects are labelled ``hsmkms:<first 20 hex of the key id>:<version>:<role>``
    (role: :class:`~hsmkms.profiles.ObjectRole` value); a service key (one object) is labelled
    ``hsmkms:<name>``.
    """

    base: str
    per_role: bool = True
    """Whether each object's label ends in ``:<role>`` (else: one object, labelled ``base``)."""

    @classmethod
    def key_version(cls, key_id: str, version: int) -> MaterialName:
        """The name of a KMS key version's material."""
        return cls(f"{LABEL_PREFIX}{key_id.replace('-', '')[:20]}:{version}")

    @classmethod
    def service_key(cls, name: str) -> MaterialName:
        """The name of one of the service's own keys (the audit seal, row integrity)."""
        return cls(f"{LABEL_PREFIX}{name}", per_role=False)

    def label(self, role: ObjectRole) -> str:
        """The label of the object playing ``role``."""
        return f"{self.base}:{role.value}" if self.per_role else self.base


@dataclasses.dataclass(frozen=True)
class TokenObject:
    """One object of this project on the token (from :meth:`KeyInventory.list_objects`)."""

    object_id: str
    label: str
    key_type: str
    object_class: str = "SECRET_KEY"
    """``SECRET_KEY``, or ``PRIVATE_KEY`` / ``PUBLIC_KEY`` for the halves of a key pair."""

    @property
    def is_key_version(self) -> bool:
        """Whether the label marks a KMS key version's object
        (``hsmkms:<20 hex of the key id>:<version>:<role>``), as opposed to a service key such
        as the audit or credentials key."""
        return _KEY_VERSION_LABEL.fullmatch(self.label) is not None

    @property
    def is_wrapping_key(self) -> bool:
        """Whether the object is the private key of an import wrapping key pair."""
        return self.label.startswith(LABEL_PREFIX + "import:")


@dataclasses.dataclass(frozen=True)
class TokenIdentity:
    """What a token says it is, readable without logging in: its manufacturer, model, serial
    number and label (``CK_TOKEN_INFO``). A SoftHSM2 token gets a random serial when it is
    initialized, so a re-initialized token (or another one given the same label) differs."""

    manufacturer: str
    model: str
    serial: str
    label: str

    @classmethod
    def of(cls, info: TokenInfo) -> TokenIdentity:
        """The identity part of a logged-in token's :class:`TokenInfo`."""
        return cls(
            info.manufacturer.strip(), info.model.strip(), info.serial.strip(), info.label.strip()
        )


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What the token and module say about themselves."""

    module: str
    library_description: str
    manufacturer: str
    model: str
    serial: str
    label: str
    mechanisms: tuple[str, ...]
    profile: MechanismProfile
    firmware_version: str = ""
    """``major.minor`` as the token reports it (empty when unknown)."""
    hardware_version: str = ""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Which key material a token can host, found by trying it (:meth:`KeyBackend.capabilities`).

    A spec is hosted for a usage when material of it was made and used on the token for that
    usage with a real round trip (temporary session objects, destroyed after): a token can list
    a mechanism it then fails (NSS softokn and AES-GCM). A token that refuses temporary objects
    cannot be probed that way: specs whose mechanisms it lists are then in :attr:`unverified`.
    """

    usages: Mapping[KeyMaterialSpec, frozenset[MaterialUsage]] = dataclasses.field(hash=False)
    """Per hosted spec, the usages probed successfully."""
    profiles: tuple[MechanismProfile, ...]
    """Mechanism profiles probed with a real round trip (SYMMETRIC_DEFAULT is hosted when any
    is), in registry order."""
    unverified: frozenset[KeyMaterialSpec] = frozenset()
    """Specs the token lists the mechanisms for but that could not be probed."""
    wrapping_algorithms: frozenset[WrappingAlgorithm] = frozenset()
    """The import wrapping algorithms whose unwrap worked inside the token (a temporary RSA
    wrapping key and a temporary secret: :meth:`KeyBackend.import_material`)."""
    unsupported_algorithms: frozenset[SigningAlgorithm] = frozenset()
    """Signing algorithms of hosted specs that the token does not perform (SoftHSM 2.6.1 and
    ED25519_PH_SHA_512: it ignores CKM_EDDSA's prehash flag)."""

    @property
    def specs(self) -> frozenset[KeyMaterialSpec]:
        """The specs hosted for at least one usage."""
        return frozenset(self.usages)

    def hosts(self, spec: KeyMaterialSpec, usage: MaterialUsage | None = None) -> bool:
        """Whether material of ``spec`` was probed successfully (for ``usage``, when given)."""
        found = self.usages.get(spec, frozenset())
        return bool(found) if usage is None else usage in found


class KeyBackend(Protocol):
    """Creates key material for a key spec inside a token and uses it by reference. Every
    method is safe to call from any thread. Key material never leaves the token."""

    @property
    def profile(self) -> MechanismProfile:
        """The profile new symmetric material gets (probed, or forced by configuration)."""
        ...

    def capabilities(self) -> Capabilities:
        """Which specs (and profiles) this token can host, probed with real operations on
        temporary objects (once per backend; later calls answer from memory)."""
        ...

    def create(
        self,
        spec: KeyMaterialSpec,
        name: MaterialName,
        *,
        profile: MechanismProfile | None = None,
        usage: MaterialUsage | None = None,
        placement: KeyPlacement | None = None,
    ) -> KeyMaterialRef:
        """Generate the token object(s) of new material: token, private, sensitive,
        non-extractable, not modifiable, only the capabilities the spec and ``usage`` need.
        Symmetric material gets ``profile``, or :attr:`profile` when None; ``usage`` defaults
        to the spec's first. On failure, objects created so far are destroyed.

        ``placement`` (None: the store's configured one): with ``wrapped``, a key version of
        secret keys only (SYMMETRIC_DEFAULT, HMAC_*) is generated inside the token, wrapped
        there under the token's KEK and returned wrapped in the reference (no token object of
        its own; :attr:`KeyMaterialRef.is_wrapped`). Service keys and key pairs are always
        token objects."""
        ...

    def destroy(self, ref: KeyMaterialRef) -> None:
        """Destroy the token object(s); objects already gone are not an error. Wrapped
        material has none (the row holding its reference is the material): a no-op on the
        token, beyond this process's unwrapped copy."""
        ...

    def encrypt(self, ref: KeyMaterialRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt under symmetric material with a fresh IV from the token's generator;
        ``aad`` is authenticated, not encrypted. Returns ``(iv, ciphertext || tag)`` shaped as
        the ref's profile says."""
        ...

    def decrypt(self, ref: KeyMaterialRef, iv: bytes, body: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt. Any mismatch of key, IV, AAD or body raises
        ``DecryptionFailed``, and nothing else about it."""
        ...

    def mac(self, ref: KeyMaterialRef, data: bytes) -> bytes:
        """The HMAC of ``data`` under HMAC material, computed inside the token."""
        ...

    def verify_mac(self, ref: KeyMaterialRef, data: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the HMAC of ``data`` (checked inside the token)."""
        ...

    def sign(self, ref: KeyMaterialRef, data: bytes, algorithm: SigningAlgorithm) -> bytes:
        """Sign with a key pair's private key: ``data`` is what the algorithm signs (a digest
        for RSA, ECDSA and Ed25519ph, the message for pure EdDSA; see
        :class:`~hsmkms.keystore.specs.SigningAlgorithm`). ECDSA signatures are DER
        (``Ecdsa-Sig-Value``), RSA signatures the modulus size, Ed25519 signatures 64 bytes.
        ``UnsupportedByToken`` for an algorithm the token does not perform."""
        ...

    def verify(
        self, ref: KeyMaterialRef, data: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        """Whether ``signature`` is a valid signature of ``data`` (checked inside the token
        with the key pair's public key)."""
        ...

    def asymmetric_encrypt(
        self, ref: KeyMaterialRef, plaintext: bytes, scheme: AsymmetricEncryption
    ) -> bytes:
        """Encrypt for an encryption key pair (RSAES-OAEP): the raw ciphertext, as long as the
        modulus, which anyone holding the public key could have made."""
        ...

    def asymmetric_decrypt(
        self, ref: KeyMaterialRef, ciphertext: bytes, scheme: AsymmetricEncryption
    ) -> bytes:
        """Decrypt with an encryption key pair's private key, inside the token. Any failure
        raises ``DecryptionFailed``, and nothing else about it."""
        ...

    def public_key(self, ref: KeyMaterialRef) -> bytes:
        """A key pair's public key, DER ``SubjectPublicKeyInfo``."""
        ...

    def derive_shared_secret(self, ref: KeyMaterialRef, peer_public_key: bytes) -> bytes:
        """ECDH (``CKM_ECDH1_DERIVE``, no KDF) between an EC key agreement key pair's private
        key and a peer's public key (DER ``SubjectPublicKeyInfo`` on the same curve): the raw
        shared secret (the x coordinate). The secret is returned to the caller by design."""
        ...

    def random(self, n: int) -> bytes:
        """``n`` bytes from the token's random generator."""
        ...

    def create_wrapping_key(
        self, spec: WrappingKeySpec, name: MaterialName
    ) -> tuple[WrappingKeyRef, bytes]:
        """Generate an RSA wrapping key pair for importing key material: the private key a token
        object that can only unwrap (sensitive, never extractable), labelled ``name``
        (:func:`~hsmkms.keystore.imports.wrapping_key_name`), the public key not kept. Returns
        its reference and its public key (DER ``SubjectPublicKeyInfo``)."""
        ...

    def destroy_wrapping_key(self, ref: WrappingKeyRef) -> None:
        """Destroy a wrapping key pair's private key; already gone is not an error."""
        ...

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
        """Unwrap ``wrapped`` (``algorithm`` under ``wrapping_key``) inside the token into new
        ``spec`` material named ``name``: token objects as :meth:`create` makes them (sensitive,
        non-extractable, only the capabilities the spec and ``usage`` need), and its check
        value. The material never leaves the token. ``DecryptionFailed`` when the wrapping is
        wrong, ``TokenRejected`` when the material does not fit the spec; on failure nothing is
        left on the token."""
        ...

    def write_anchor(self, name: str, value: str) -> None:
        """Keep ``value`` (ASCII, at most 40 characters, no secret) in the token under
        ``name``, replacing what was there: state that the database's attacker cannot roll
        back (the audit trail's newest seal). A value read back is the last one written, also
        by another process; callers serialize the writes of one name (the audit trail writes
        under its database write lock). ``UnsupportedByToken`` when the token cannot keep
        one."""
        ...

    def read_anchor(self, name: str) -> str | None:
        """The value last written under ``name``, read from the token; None when none was."""
        ...

    def settle_abandoned(self) -> int:
        """Destroy what creations that failed while the token was away may have left on it;
        returns how many are still unsettled. Raises when the token does not answer."""
        ...

    def close(self) -> None:
        """Log out and release the module (end of process)."""
        ...


class KeyInventory(Protocol):
    """What is on a token, and diagnostics. Every method is safe to call from any thread."""

    def info(self) -> TokenInfo:
        """Module, token and mechanism information."""
        ...

    def list_objects(self) -> list[TokenObject]:
        """Every object on the token that this project created."""
        ...

    def exists(self, ref: KeyMaterialRef) -> bool:
        """Whether every object of ``ref`` is on the token (asks the token, not a cache); for
        wrapped material, its KEK."""
        ...

    def attributes(
        self, object_id: str, names: list[str], *, public: bool = False
    ) -> dict[str, Any]:
        """Attributes of one of this project's objects (``CKA_`` names without the prefix): the
        secret or private key, or with ``public`` a key pair's public key. Reading a secret
        value fails: that is the point."""
        ...

    def self_test(self) -> None:
        """Round trip with temporary keys of the current profile; raises on any failure."""
        ...

    def outage(self) -> str | None:
        """Why the token could not be reached by the last attempt (a PKCS#11 reason such as
        ``CKR_DEVICE_REMOVED while encrypting``), or None when the last attempt worked. Makes
        no token call and never waits for the token's lock (the health check)."""
        ...


class Keystore(KeyBackend, KeyInventory, Protocol):
    """A key store: a backend and its inventory (what the registry of key stores holds)."""


def checked_mac_key(keystore: Keystore, ref_text: str, name: str) -> KeyMaterialRef:
    """Parse a MAC key reference read from the (untrusted) database and check, on the
    (trusted) token, that it names the key created as
    ``create(HMAC_256, MaterialName.service_key(name))``.

    Raises ``ValueError`` naming the problem: malformed, another store than the default, not
    HMAC_256 material, no such object,
    or an object with another label (a reference swapped for another service key's). One token
    listing per call: callers check once and remember the result.
    """
    ref = KeyMaterialRef.from_str(ref_text)
    if ref.store != DEFAULT_STORE:
        raise ValueError(f"the {name} key reference names key store {ref.store!r}")
    if ref.spec is not KeyMaterialSpec.HMAC_256:
        raise ValueError(f"the {name} key reference names {ref.spec.value} material")
    (object_id,) = ref.object_ids
    labels = {o.object_id: o.label for o in keystore.list_objects()}
    label = labels.get(object_id)
    if label is None:
        raise ValueError(f"the {name} key reference names no object on the token")
    if label != MaterialName.service_key(name).label(ObjectRole.MAC):
        raise ValueError(f"the {name} key reference names a token object labelled {label!r}")
    return ref
