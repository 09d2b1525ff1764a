"""How the PKCS#11 backend makes and uses each kind of key material: one implementation object
per mechanism profile (:data:`PROFILE_MECHANISMS`: seal and unseal) and per key spec
(:data:`MATERIALS`: generate, probe, and the spec's own operations). Looked up by the
profile or spec a key material reference names; nothing here branches on which one it is.

Imported only by :mod:`hsmkms.keystore.pkcs11`, which owns the process lock, sessions, handle
cache, retries and error mapping: every function here runs with the lock held and lets
python-pkcs11's exceptions through.

Templates: token objects are created with ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE``
true, ``CKA_EXTRACTABLE`` false, ``CKA_MODIFIABLE`` false, and only the capabilities their role
needs (python-pkcs11 sets every capability attribute from the ``capabilities`` flags, so the
others are explicitly false). Probes and the self-test use the same templates with
``CKA_TOKEN`` false (temporary session objects, destroyed after use).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import hashlib
import hmac
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.constants import DEFAULT

from hsmkms.keystore.base import MaterialName
from hsmkms.keystore.errors import (
    DecryptionFailed,
    IncompatibleMaterial,
    MaterialRejected,
    TokenRejected,
    UnsupportedByToken,
    WrappedMaterialInvalid,
)
from hsmkms.keystore.imports import (
    CHECK_BLOCK,
    CHECK_DATA,
    WrappingAlgorithm,
    WrappingKeySpec,
    kwp_length,
)
from hsmkms.keystore.specs import (
    AsymmetricEncryption,
    KeyMaterialSpec,
    MaterialKind,
    MaterialUsage,
    SignatureScheme,
    SigningAlgorithm,
    SpecFacts,
)
from hsmkms.profiles import PROFILES, MechanismProfile, ObjectRole

__all__ = [
    "HARDENED",
    "IMPORT_PROFILE",
    "MATERIALS",
    "OBJECT_CLASSES",
    "PROFILE_MECHANISMS",
    "EdwardsMaterial",
    "Generated",
    "Imported",
    "KeyPairMaterial",
    "Material",
    "ProbeRefused",
    "ProfileMechanisms",
    "RsaMaterial",
    "Unwrapper",
    "generate_kek",
    "generate_secrets",
    "generate_wrapped",
    "generate_wrapping_key",
    "oaep_decode",
    "probe_wrapping",
    "unwrap_secrets",
]

HARDENED: Final[Mapping[Any, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
}
"""The template every secret and private key object gets (capabilities come on top)."""

_PUBLIC: Final[Mapping[Any, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.MODIFIABLE: False,
}
"""The public half of a key pair (sensitivity and extractability do not apply to it)."""

OBJECT_CLASSES: Final[Mapping[ObjectRole, ObjectClass]] = {
    ObjectRole.ENCRYPT: ObjectClass.SECRET_KEY,
    ObjectRole.MAC: ObjectClass.SECRET_KEY,
    ObjectRole.KEY_PAIR: ObjectClass.PRIVATE_KEY,
}
"""The class of the object the handle cache holds for each role (a key pair: the private key;
its public key shares the id and is cached apart)."""

# Errors that say "the token will not make temporary (session) objects" rather than "this
# mechanism does not work": a YubiHSM 2 refuses CKA_TOKEN false (reference/pkcs11-facts.md §3.2).
_TEMPLATE_REFUSALS: Final = (
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
    p11e.AttributeValueInvalid,
    p11e.AttributeTypeInvalid,
    p11e.KeyTypeInconsistent,  # NSS softokn, for a temporary (session) RSA key pair
)

_PROBE_DATA: Final = b"hsmkms capability probe"


def _permitted(key: Any, operation: str) -> Any:
    """``key``'s method for ``operation``. python-pkcs11 gives a key object the methods its
    capability attributes allow (CKA_SIGN -> ``sign``, CKA_DERIVE -> ``derive_key``...): a key
    made for another usage has none, and is refused here as the token would refuse it."""
    method = getattr(key, operation, None)
    if method is None:
        name = operation.removesuffix("_key")
        raise IncompatibleMaterial(f"the key does not permit {name} (it has another usage)")
    return method


class ProbeRefused(Exception):
    """The token refused the temporary objects a probe needs (not a verdict on the spec)."""


def _template(base: Mapping[Any, Any], *, store: bool) -> dict[Any, Any]:
    return {**base, Attribute.TOKEN: store}


@contextlib.contextmanager
def _temporary(objects: list[Any]) -> Iterator[list[Any]]:
    """Destroy ``objects`` (filled in by the body) at the end, whatever happens."""
    try:
        yield objects
    finally:
        for obj in objects:
            with contextlib.suppress(p11e.PKCS11Error):
                obj.destroy()


@contextlib.contextmanager
def _refusal_is_probe_refused() -> Iterator[None]:
    try:
        yield
    except _TEMPLATE_REFUSALS as exc:
        raise ProbeRefused from exc


# -- secret keys ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SecretObject:
    """One secret key object of a piece of material: its role, type, size and capabilities."""

    role: ObjectRole
    key_type: KeyType
    bits: int
    capabilities: MechanismFlag
    mechanism: Mechanism | None = None
    """The key generation mechanism (None: python-pkcs11's default for the key type)."""


_AES_256 = SecretObject(
    ObjectRole.ENCRYPT, KeyType.AES, 256, MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
)


def _hmac_secret(bits: int) -> SecretObject:
    # HMAC keys are generic secrets (portable: SoftHSM2, YubiHSM 2 and NSS accept them).
    return SecretObject(
        ObjectRole.MAC, KeyType.GENERIC_SECRET, bits, MechanismFlag.SIGN | MechanismFlag.VERIFY,
        Mechanism.GENERIC_SECRET_KEY_GEN,
    )  # fmt: skip


def generate_secrets(
    session: Any,
    objects: Sequence[SecretObject],
    name: MaterialName,
    ids: Sequence[bytes],
    *,
    store: bool,
) -> list[Any]:
    """Generate ``objects`` (hardened template; ``store`` false: temporary session objects).
    On failure the objects made so far are destroyed."""
    created: list[Any] = []
    template = _template(HARDENED, store=store)
    try:
        for spec, raw in zip(objects, ids, strict=True):
            created.append(
                session.generate_key(
                    spec.key_type, spec.bits, id=raw, label=name.label(spec.role), store=store,
                    mechanism=spec.mechanism, capabilities=spec.capabilities, template=template,
                )
            )  # fmt: skip
    except BaseException:
        for obj in created:
            with contextlib.suppress(p11e.PKCS11Error):
                obj.destroy()
        raise
    return created


# -- mechanism profiles -----------------------------------------------------------------------


class ProfileMechanisms(abc.ABC):
    """The token side of one mechanism profile: its key objects, the mechanisms it needs, and
    seal / unseal. Sizes come from the profile's facts (:mod:`hsmkms.profiles`)."""

    def __init__(
        self,
        profile: MechanismProfile,
        objects: tuple[SecretObject, ...],
        mechanisms: frozenset[Mechanism],
    ) -> None:
        facts = profile.facts
        if tuple(o.role for o in objects) != facts.roles:
            raise ValueError(f"objects of {profile.value} do not match its roles")
        self.profile = profile
        self.objects = objects
        self.mechanisms = mechanisms
        self._iv_length = facts.iv_length
        self._iv_bits = facts.iv_length * 8
        self._tag_length = facts.tag_length
        self._body_ok = facts.body_check(None)

    def shape_ok(self, iv: bytes, body: bytes) -> bool:
        """Whether ``iv`` and ``body`` have a shape this profile produces (checked before
        asking the token)."""
        return len(iv) == self._iv_length and self._body_ok(len(body))

    @abc.abstractmethod
    def seal(
        self, session: Any, keys: Sequence[Any], plaintext: bytes, aad: bytes
    ) -> tuple[bytes, bytes]:
        """``(iv, ciphertext || tag)`` with a fresh IV from the token's generator."""
        ...

    @abc.abstractmethod
    def unseal(self, keys: Sequence[Any], iv: bytes, body: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt; :class:`DecryptionFailed` (or a python-pkcs11 error that
        the caller maps as a decryption failure) on any mismatch."""
        ...

    def probe(self, session: Any) -> bool:
        """A real round trip with temporary keys: seal, unseal, and a tampered body refused.
        :class:`ProbeRefused` when the token will not make temporary keys."""
        with _temporary([]) as keys:
            with _refusal_is_probe_refused():
                keys += generate_secrets(
                    session, self.objects, MaterialName("hsmkms-probe"), [b""] * len(self.objects),
                    store=False,
                )  # fmt: skip
            try:
                iv, body = self.seal(session, keys, _PROBE_DATA, b"probe")
                if self.unseal(keys, iv, body, b"probe") != _PROBE_DATA:
                    return False
            except p11e.PKCS11Error:
                return False
            try:
                self.unseal(keys, iv, bytes([body[0] ^ 1]) + body[1:], b"probe")
            except (DecryptionFailed, p11e.PKCS11Error):
                return True
            return False


class AesGcm(ProfileMechanisms):
    """AES_256_GCM: CKM_AES_GCM, tag appended to the ciphertext."""

    def __init__(self) -> None:
        super().__init__(MechanismProfile.AES_256_GCM, (_AES_256,), frozenset({Mechanism.AES_GCM}))
        self._tag_bits = self._tag_length * 8

    def seal(
        self, session: Any, keys: Sequence[Any], plaintext: bytes, aad: bytes
    ) -> tuple[bytes, bytes]:
        iv = bytes(session.generate_random(self._iv_bits))
        body = keys[0].encrypt(
            plaintext, mechanism=Mechanism.AES_GCM,
            mechanism_param=pkcs11.GCMParams(iv, aad or None, self._tag_bits),
        )  # fmt: skip
        return iv, bytes(body)

    def unseal(self, keys: Sequence[Any], iv: bytes, body: bytes, aad: bytes) -> bytes:
        params = pkcs11.GCMParams(iv, aad or None, self._tag_bits)
        return bytes(keys[0].decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params))


class AesCbcPadHmacSha256(ProfileMechanisms):
    """AES_256_CBC_HMAC_SHA_256: CKM_AES_CBC_PAD, then CKM_SHA256_HMAC over
    ``len64(aad) || aad || iv || ciphertext`` (``len64``: the AAD's length in bytes, 8 bytes
    big-endian), tag appended; decryption verifies the tag inside the token first."""

    def __init__(self) -> None:
        super().__init__(
            MechanismProfile.AES_256_CBC_HMAC_SHA_256,
            (_AES_256, _hmac_secret(256)),
            frozenset({Mechanism.AES_CBC_PAD, Mechanism.SHA256_HMAC}),
        )

    @staticmethod
    def _mac_input(aad: bytes, iv: bytes, ct: bytes) -> bytes:
        return len(aad).to_bytes(8, "big") + aad + iv + ct

    def seal(
        self, session: Any, keys: Sequence[Any], plaintext: bytes, aad: bytes
    ) -> tuple[bytes, bytes]:
        iv = bytes(session.generate_random(self._iv_bits))
        ct = bytes(keys[0].encrypt(plaintext, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv))
        tag = bytes(keys[1].sign(self._mac_input(aad, iv, ct), mechanism=Mechanism.SHA256_HMAC))
        return iv, ct + tag

    def unseal(self, keys: Sequence[Any], iv: bytes, body: bytes, aad: bytes) -> bytes:
        ct, tag = body[: -self._tag_length], body[-self._tag_length :]
        # Encrypt-then-MAC: verify inside the token before decrypting anything.
        if not keys[1].verify(self._mac_input(aad, iv, ct), tag, mechanism=Mechanism.SHA256_HMAC):
            raise DecryptionFailed("decryption failed")
        return bytes(keys[0].decrypt(ct, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv))


PROFILE_MECHANISMS: Final[Mapping[MechanismProfile, ProfileMechanisms]] = {
    p.profile: p for p in (AesGcm(), AesCbcPadHmacSha256())
}
"""The token side of every profile, by profile."""
if set(PROFILE_MECHANISMS) != {p.name for p in PROFILES}:  # pragma: no cover - import-time check
    raise ImportError("a mechanism profile has no PKCS#11 implementation")


# -- importing key material ------------------------------------------------------------------
#
# The wrapped forms and the check values are defined in hsmkms.keystore.imports. Everything
# secret happens in the token: C_UnwrapKey with CKM_RSA_PKCS_OAEP (SoftHSM 2.6.1 has no
# CKM_RSA_AES_KEY_WRAP, so the RSA_AES algorithms are two unwraps: the ephemeral AES key into a
# session object, then CKM_AES_KEY_WRAP_PAD into the material's object), and the checks of the
# result are operations on the new objects.

_OAEP_PARAMS: Final[Mapping[str, tuple[Mechanism, MGF, None]]] = {
    "sha1": (Mechanism.SHA_1, MGF.SHA1, None),
    "sha256": (Mechanism.SHA256, MGF.SHA256, None),
}
_WRAPPING_PRIVATE: Final[Mapping[Any, Any]] = {
    **HARDENED,
    Attribute.UNWRAP: True,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.DERIVE: False,
}
# Capability attributes PKCS#11 defines for public keys only: a private key template leaves
# them out (SoftHSM2 answers CKR_ATTRIBUTE_TYPE_INVALID).
_NOT_PRIVATE: Final[Mapping[Any, Any]] = {
    Attribute.ENCRYPT: DEFAULT,
    Attribute.VERIFY: DEFAULT,
    Attribute.WRAP: DEFAULT,
}
# What a failed unwrap says: the wrapping (or the ciphertext) is wrong. SoftHSM 2.6.1 answers a
# failed OAEP decoding or RFC 5649 integrity check with CKR_GENERAL_ERROR (measured).
_UNWRAP_FAILURES: Final = (
    p11e.GeneralError,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
)
# A token that does not do the wrapping algorithm: the mechanism or its parameters refused
# (SoftHSM 2.6.1 answers OAEP with SHA-256 with CKR_ARGUMENTS_BAD, measured).
_UNWRAP_UNSUPPORTED: Final = (
    p11e.ArgumentsBad,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
)
# Material that unwrapped but does not fit: a secret of a length the mechanism refuses, a
# PKCS#8 blob the token cannot parse (SoftHSM 2.6.1: CKR_FUNCTION_FAILED, measured) or of
# another key type.
_MATERIAL_FAILURES: Final = (
    p11e.KeySizeRange,
    p11e.KeyTypeInconsistent,
    p11e.MechanismInvalid,
    p11e.FunctionFailed,
    p11e.TemplateInconsistent,
    p11e.AttributeValueInvalid,
    p11e.DomainParamsInvalid,
)


# -- wrapped key versions (HSMKMS_KEY_PLACEMENT=wrapped) --------------------------------------

KEK_OBJECT: Final = SecretObject(
    ObjectRole.ENCRYPT, KeyType.AES, 256, MechanismFlag.WRAP | MechanismFlag.UNWRAP
)
"""The key encryption key: an AES-256 token object that can only wrap and unwrap."""

# The short-lived session object a wrapped key version is generated as. CKA_EXTRACTABLE must be
# true for C_WrapKey; CKA_WRAP_WITH_TRUSTED true would confine it to a CKA_TRUSTED wrapping key,
# but only the SO can set CKA_TRUSTED (SoftHSM 2.6.1, measured: CKR_ATTRIBUTE_READ_ONLY for the
# user; the wrap of such a key under an untrusted KEK is CKR_KEY_NOT_WRAPPABLE), and an SO
# session can only make public objects, which any session could use without the PIN. So:
# sensitive (never readable in plaintext), extractable, and destroyed right after the wrap.
_WRAPPABLE: Final[Mapping[Any, Any]] = {
    **HARDENED,
    Attribute.TOKEN: False,
    Attribute.EXTRACTABLE: True,
}
# A wrapped key version unwrapped for use: a hardened session object (never extractable).
_UNWRAPPED: Final[Mapping[Any, Any]] = {**HARDENED, Attribute.TOKEN: False}


def generate_kek(session: Any, name: MaterialName, raw_id: bytes) -> Any:
    """Generate the KEK token object (hardened: sensitive, never extractable, not modifiable;
    wrap and unwrap only)."""
    (kek,) = generate_secrets(session, (KEK_OBJECT,), name, [raw_id], store=True)
    return kek


def generate_wrapped(
    session: Any, kek: Any, objects: Sequence[SecretObject], name: MaterialName
) -> tuple[list[bytes], bool]:
    """Generate ``objects`` inside the token as session objects, wrap each under ``kek``
    (``CKM_AES_KEY_WRAP_PAD``, RFC 5649) and destroy them. Returns the wrapped bytes and
    whether the token reported every generated object as ``CKA_LOCAL``."""
    made: list[Any] = []
    try:
        for spec in objects:
            made.append(
                session.generate_key(
                    spec.key_type, spec.bits, id=b"", label=name.label(spec.role), store=False,
                    mechanism=spec.mechanism, capabilities=spec.capabilities,
                    template=dict(_WRAPPABLE),
                )
            )  # fmt: skip
        local = all(bool(obj[Attribute.LOCAL]) for obj in made)
        wrapped = [bytes(kek.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD)) for obj in made]
    finally:
        _destroy_all(made)
    return wrapped, local


def unwrap_secrets(
    session: Any, kek: Any, objects: Sequence[SecretObject], wrapped: Sequence[bytes]
) -> list[Any]:
    """Unwrap ``wrapped`` under ``kek`` into hardened session objects shaped as ``objects``.
    :class:`WrappedMaterialInvalid` when the token refuses a blob (RFC 5649's integrity check;
    SoftHSM 2.6.1 answers CKR_GENERAL_ERROR, measured). On failure nothing is left behind."""
    made: list[Any] = []
    try:
        for spec, blob in zip(objects, wrapped, strict=True):
            try:
                made.append(
                    kek.unwrap_key(
                        ObjectClass.SECRET_KEY, spec.key_type, blob, store=False,
                        mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=spec.capabilities,
                        template=dict(_UNWRAPPED),
                    )
                )  # fmt: skip
            except _UNWRAP_FAILURES:
                raise WrappedMaterialInvalid(
                    "wrapped key material does not unwrap under its KEK"
                ) from None
    except BaseException:
        _destroy_all(made)
        raise
    return made


IMPORT_PROFILE: Final = MechanismProfile.AES_256_GCM
"""Imported symmetric material is one AES key: the profile with one AES object. (The portable
profile needs a second, independent MAC key; deriving one from imported material needs a KDF
in the token, which SoftHSM 2.6.1 and a YubiHSM 2 lack.)"""


def generate_wrapping_key(
    session: Any, spec: WrappingKeySpec, raw_id: bytes, label: str, *, store: bool = True
) -> tuple[Any, bytes]:
    """An RSA wrapping key pair: the private key a token object that only unwraps (hardened),
    the public key a session object read once and destroyed. Returns the private key and the
    public key as DER ``SubjectPublicKeyInfo``."""
    private_template = _template(_WRAPPING_PRIVATE, store=store)
    public, private = session.generate_keypair(
        KeyType.RSA, spec.bits, id=raw_id, label=label, store=store,
        capabilities=MechanismFlag.UNWRAP | MechanismFlag.WRAP,
        public_template={
            Attribute.TOKEN: False, Attribute.PRIVATE: False, Attribute.WRAP: True,
            Attribute.ENCRYPT: False, Attribute.VERIFY: False,
        },
        private_template=private_template,
    )  # fmt: skip
    try:
        der = RsaMaterial.public_spki(public)
    except BaseException:
        with contextlib.suppress(p11e.PKCS11Error):
            private.destroy()
        raise
    finally:
        with contextlib.suppress(p11e.PKCS11Error):
            public.destroy()
    return private, der


class Unwrapper:
    """Unwraps one wrapped blob inside the token, as often as asked (the checks of imported
    material need a second, temporary copy). For the RSA_AES algorithms the ephemeral AES key
    is unwrapped once, as a session object that can only unwrap, and destroyed by
    :meth:`close`. The blob's size is checked first (it is public): :class:`DecryptionFailed`
    when it cannot be a wrapping of ``expected_length`` bytes (None: any length)."""

    def __init__(
        self,
        wrapping_key: Any,
        spec: WrappingKeySpec,
        algorithm: WrappingAlgorithm,
        wrapped: bytes,
        expected_length: int | None,
    ) -> None:
        self._algorithm = algorithm
        self._oaep = {
            "mechanism": Mechanism.RSA_PKCS_OAEP,
            "mechanism_param": _OAEP_PARAMS[algorithm.hash_name],
        }
        modulus = spec.modulus_length
        self._ephemeral: Any | None = None
        if not algorithm.two_step:
            if len(wrapped) != modulus:
                raise DecryptionFailed("the wrapped material has the wrong length")
            self._unwrapping_key, self._blob = wrapping_key, wrapped
            self._mechanism = self._oaep
            return
        body = wrapped[modulus:]
        if (
            len(body) < 16
            or len(body) % 8
            or (expected_length is not None and len(body) != kwp_length(expected_length))
        ):
            raise DecryptionFailed("the wrapped material has the wrong length")
        self._ephemeral = self._unwrap(
            wrapping_key, ObjectClass.SECRET_KEY, KeyType.AES, wrapped[:modulus], self._oaep,
            template=_template(HARDENED, store=False), capabilities=MechanismFlag.UNWRAP,
        )  # fmt: skip
        self._unwrapping_key, self._blob = self._ephemeral, body
        self._mechanism = {"mechanism": Mechanism.AES_KEY_WRAP_PAD}

    @staticmethod
    def _unwrap(
        key: Any,
        object_class: ObjectClass,
        key_type: KeyType,
        blob: bytes,
        mechanism: Mapping[str, Any],
        *,
        template: Mapping[Any, Any],
        capabilities: MechanismFlag,
        **naming: Any,
    ) -> Any:
        try:
            return key.unwrap_key(
                object_class, key_type, blob, capabilities=capabilities, template=dict(template),
                **mechanism, **naming,
            )  # fmt: skip
        except _UNWRAP_UNSUPPORTED as exc:
            raise UnsupportedByToken(
                f"the token does not unwrap with {type(exc).__name__} for this algorithm"
            ) from None
        except _UNWRAP_FAILURES:
            raise DecryptionFailed("unwrapping failed") from None
        except p11e.FunctionFailed:
            if object_class is ObjectClass.PRIVATE_KEY:
                # SoftHSM 2.6.1: a PKCS#8 blob it cannot parse (or of another key type).
                raise MaterialRejected("the private key is not a PKCS#8 key of this type") from None
            raise

    def unwrap(
        self,
        object_class: ObjectClass,
        key_type: KeyType,
        *,
        template: Mapping[Any, Any],
        capabilities: MechanismFlag,
        raw_id: bytes = b"",
        label: str | None = None,
    ) -> Any:
        """A new object holding the material (``template`` decides token or session)."""
        naming: dict[str, Any] = {"id": raw_id}
        if label is not None:
            naming["label"] = label
        return self._unwrap(
            self._unwrapping_key, object_class, key_type, self._blob, self._mechanism,
            template=template, capabilities=capabilities, **naming,
        )  # fmt: skip

    def close(self) -> None:
        """Destroy the ephemeral AES key (RSA_AES algorithms)."""
        ephemeral, self._ephemeral = self._ephemeral, None
        if ephemeral is not None:
            with contextlib.suppress(p11e.PKCS11Error):
                ephemeral.destroy()

    def __enter__(self) -> Unwrapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Imported:
    """What :meth:`Material.unwrap` made: the objects (as :class:`Generated`) and the
    material's check value (:mod:`hsmkms.keystore.imports`)."""

    made: Generated
    check_value: bytes


def probe_wrapping(session: Any, listed: frozenset[Any]) -> frozenset[WrappingAlgorithm]:
    """The wrapping algorithms the token unwraps correctly: a temporary RSA_2048 wrapping key,
    a throwaway secret wrapped on the host with each algorithm, unwrapped into a temporary
    HMAC key whose MAC must match. :class:`ProbeRefused` when the token makes no temporary
    objects."""
    if not {Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_OAEP} <= listed:
        return frozenset()
    spec = WrappingKeySpec.RSA_2048
    with _temporary([]) as objects:
        with _refusal_is_probe_refused():
            private, der = generate_wrapping_key(session, spec, b"", "hsmkms-probe", store=False)
        objects.append(private)
        public = serialization.load_der_public_key(der)
        assert isinstance(public, rsa.RSAPublicKey)
        secret = bytes(session.generate_random(256))  # a throwaway value, never key material
        expected = hmac.new(secret, _PROBE_DATA, "sha256").digest()
        works = set()
        for algorithm in WrappingAlgorithm:
            if algorithm.two_step and Mechanism.AES_KEY_WRAP_PAD not in listed:
                continue
            wrapped = wrap_on_host(public, algorithm, secret, bytes(session.generate_random(256)))
            try:
                with Unwrapper(private, spec, algorithm, wrapped, len(secret)) as unwrapper:
                    key = unwrapper.unwrap(
                        ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET,
                        template=_template(HARDENED, store=False), capabilities=MechanismFlag.SIGN,
                    )  # fmt: skip
                    try:
                        if bytes(key.sign(_PROBE_DATA, mechanism=Mechanism.SHA256_HMAC)) == (
                            expected
                        ):
                            works.add(algorithm)
                    finally:
                        with contextlib.suppress(p11e.PKCS11Error):
                            key.destroy()
            except (UnsupportedByToken, DecryptionFailed, MaterialRejected, p11e.PKCS11Error):
                continue
        return frozenset(works)


def wrap_on_host(
    public: rsa.RSAPublicKey, algorithm: WrappingAlgorithm, material: bytes, ephemeral: bytes
) -> bytes:
    """Wrap ``material`` as a caller would (probes and the self-test only: the material is a
    throwaway value). ``ephemeral`` is the AES key of the RSA_AES algorithms."""
    algo: hashes.HashAlgorithm = (
        hashes.SHA1() if algorithm.hash_name == "sha1" else hashes.SHA256()  # noqa: S303
    )
    oaep = padding.OAEP(mgf=padding.MGF1(algo), algorithm=algo, label=None)
    if not algorithm.two_step:
        return public.encrypt(material, oaep)
    return public.encrypt(ephemeral, oaep) + keywrap.aes_key_wrap_with_padding(ephemeral, material)


# -- key material per spec ------------------------------------------------------------------


@dataclasses.dataclass
class Generated:
    """What :meth:`Material.generate` made: per object id, the object the handle cache keeps
    (secret or private key) and, for a key pair, its public key."""

    objects: list[Any]
    public: list[Any | None]


class Material(abc.ABC):
    """How one key spec is made and probed on a PKCS#11 token."""

    create_call: str = "create_key"
    """The observer's name for creating it (``create_mac_key`` for HMAC keys, as the
    ``hsmkms_hsm_call_duration_seconds`` metric always called it)."""

    def __init__(self, facts: SpecFacts) -> None:
        self.facts = facts
        self.spec = facts.spec

    @abc.abstractmethod
    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        """The mechanisms material for ``usage`` needs the token to list."""
        ...

    @abc.abstractmethod
    def generate(
        self,
        session: Any,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool,
    ) -> Generated:
        """Generate the objects (one per id). On failure, what was made is destroyed."""
        ...

    @abc.abstractmethod
    def probe(self, session: Any, usage: MaterialUsage) -> bool:
        """A real operation with temporary material for ``usage``; :class:`ProbeRefused` when
        the token will not make temporary objects."""
        ...

    def secret_objects(self, profile: MechanismProfile | None) -> tuple[SecretObject, ...] | None:
        """The secret objects of the material (one per role), which can be kept wrapped; None
        for material that is not secret keys only (key pairs stay token objects)."""
        return None

    @abc.abstractmethod
    def unwrap(
        self,
        session: Any,
        unwrapper: Unwrapper,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool = True,
    ) -> Imported:
        """Import material: the objects (one per id) unwrapped inside the token with the
        hardened template, checked, and the check value. :class:`MaterialRejected` when the
        material does not fit the spec; on failure, what was made is destroyed."""
        ...


def _destroy_all(objects: Sequence[Any]) -> None:
    for obj in objects:
        with contextlib.suppress(p11e.PKCS11Error):
            obj.destroy()


def _require_mac_key_length(unwrapper: Unwrapper, mechanism: Mechanism) -> None:
    """:class:`MaterialRejected` unless the material is as long as ``mechanism`` needs of an
    HMAC key at least (SoftHSM2 refuses shorter keys with CKR_KEY_SIZE_RANGE): a temporary
    copy, used once and destroyed. The token does not report an unwrapped secret's length
    (SoftHSM 2.6.1 leaves CKA_VALUE_LEN 0 and refuses it in an unwrap template)."""
    copy = unwrapper.unwrap(
        ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET,
        template=_template(HARDENED, store=False), capabilities=MechanismFlag.SIGN,
    )  # fmt: skip
    try:
        copy.sign(CHECK_DATA, mechanism=mechanism)
    except _MATERIAL_FAILURES:
        raise MaterialRejected("the key material is shorter than the key spec") from None
    finally:
        _destroy_all([copy])


class SymmetricMaterial(Material):
    """SYMMETRIC_DEFAULT: the objects of its mechanism profile."""

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        # Any profile will do; each profile is probed on its own (Pkcs11Keystore.capabilities).
        return frozenset()

    def generate(
        self,
        session: Any,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool,
    ) -> Generated:
        assert profile is not None  # the caller resolved it from the spec's facts
        objects = generate_secrets(
            session, PROFILE_MECHANISMS[profile].objects, name, ids, store=store
        )
        return Generated(objects, [None] * len(objects))

    def probe(self, session: Any, usage: MaterialUsage) -> bool:
        return any(impl.probe(session) for impl in PROFILE_MECHANISMS.values())

    def secret_objects(self, profile: MechanismProfile | None) -> tuple[SecretObject, ...] | None:
        assert profile is not None
        return PROFILE_MECHANISMS[profile].objects

    def unwrap(
        self,
        session: Any,
        unwrapper: Unwrapper,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool = True,
    ) -> Imported:
        if profile is not IMPORT_PROFILE:
            raise UnsupportedByToken(
                f"imported symmetric material is kept under {IMPORT_PROFILE.value} only"
            )
        (spec,) = PROFILE_MECHANISMS[profile].objects
        (raw,) = ids
        key = unwrapper.unwrap(
            ObjectClass.SECRET_KEY, KeyType.AES, template=_template(HARDENED, store=store),
            capabilities=spec.capabilities, raw_id=raw, label=name.label(spec.role),
        )  # fmt: skip
        try:
            try:
                # AES-ECB refuses any length but 16, 24 or 32 bytes; the MAC copy any shorter
                # than 32: together, exactly 32 (measured on SoftHSM 2.6.1).
                check = bytes(key.encrypt(CHECK_BLOCK, mechanism=Mechanism.AES_ECB))
            except _MATERIAL_FAILURES:
                raise MaterialRejected("the key material is not an AES-256 key") from None
            _require_mac_key_length(unwrapper, Mechanism.SHA256_HMAC)
        except BaseException:
            _destroy_all([key])
            raise
        return Imported(Generated([key], [None]), check)


class HmacMaterial(Material):
    """HMAC_224 .. HMAC_512: one generic secret of the digest's size, sign/verify with
    CKM_SHA<n>_HMAC."""

    create_call = "create_mac_key"

    def __init__(self, facts: SpecFacts, mechanism: Mechanism) -> None:
        super().__init__(facts)
        self.mechanism = mechanism
        assert facts.mac_length is not None
        self.mac_length = facts.mac_length
        self._object = _hmac_secret(facts.key_bits)

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        return frozenset({self.mechanism, Mechanism.GENERIC_SECRET_KEY_GEN})

    def generate(
        self,
        session: Any,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool,
    ) -> Generated:
        objects = generate_secrets(session, (self._object,), name, ids, store=store)
        return Generated(objects, [None])

    def secret_objects(self, profile: MechanismProfile | None) -> tuple[SecretObject, ...] | None:
        return (self._object,)

    def mac(self, key: Any, data: bytes) -> bytes:
        """The HMAC of ``data`` under ``key``."""
        return bytes(key.sign(data, mechanism=self.mechanism))

    def verify_mac(self, key: Any, data: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the HMAC of ``data`` under ``key``."""
        return bool(key.verify(data, tag, mechanism=self.mechanism))

    def probe(self, session: Any, usage: MaterialUsage) -> bool:
        with _temporary([]) as keys:
            with _refusal_is_probe_refused():
                keys += generate_secrets(
                    session, (self._object,), MaterialName("hsmkms-probe"), [b""], store=False
                )
            try:
                tag = self.mac(keys[0], _PROBE_DATA)
                return (
                    len(tag) == self.mac_length
                    and self.verify_mac(keys[0], _PROBE_DATA, tag)
                    and not self.verify_mac(keys[0], _PROBE_DATA + b"x", tag)
                )
            except p11e.PKCS11Error:
                return False

    def unwrap(
        self,
        session: Any,
        unwrapper: Unwrapper,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool = True,
    ) -> Imported:
        (raw,) = ids
        key = unwrapper.unwrap(
            ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET,
            template=_template(HARDENED, store=store), capabilities=self._object.capabilities,
            raw_id=raw, label=name.label(self._object.role),
        )  # fmt: skip
        try:
            try:
                # SoftHSM2 refuses an HMAC key shorter than the digest (CKR_KEY_SIZE_RANGE).
                check = self.mac(key, CHECK_DATA)
            except _MATERIAL_FAILURES:
                raise MaterialRejected("the key material is shorter than the key spec") from None
        except BaseException:
            _destroy_all([key])
            raise
        return Imported(Generated([key], [None]), check)


# DigestInfo prefixes for RSASSA-PKCS1-v1_5 over a precomputed digest (RFC 8017 §9.2, note 1).
_DIGEST_INFO: Final[Mapping[str, bytes]] = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_PSS_PARAMS: Final[Mapping[str, tuple[Mechanism, MGF]]] = {
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}
_HOST_HASHES: Final[Mapping[str, Callable[[], hashes.HashAlgorithm]]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
}


def _incompatible(spec: KeyMaterialSpec, what: str) -> IncompatibleMaterial:
    return IncompatibleMaterial(f"{spec.value} material does not {what}")


def _der_octets(value: bytes, length: int) -> bytes:
    """The ``length`` bytes of a point from ``CKA_EC_POINT``: the DER OCTET STRING that PKCS#11
    2.40 specifies (short or long form), or the bare point a few modules return."""
    if len(value) == length:
        return value
    if len(value) > 2 and value[0] == 0x04:
        first = value[1]
        if first < 0x80:
            header, size = 2, first
        else:
            count = first & 0x7F
            header, size = 2 + count, int.from_bytes(value[2 : 2 + count], "big")
        if size == length and len(value) == header + size:
            return value[header:]
    raise TokenRejected("the token returned a malformed public point")


class KeyPairMaterial(Material):
    """An asymmetric key pair: a private key object (sign, derive or decrypt, by usage) and a
    public key object sharing one id. Each subclass implements the operations its kind takes;
    the others refuse with :class:`IncompatibleMaterial` before the token is asked."""

    def _capabilities(self, usage: MaterialUsage) -> tuple[MechanismFlag, MechanismFlag]:
        """(private, public) capabilities for ``usage``."""
        if usage is MaterialUsage.KEY_AGREEMENT:
            # The public half of a key agreement key is only ever exported.
            return MechanismFlag.DERIVE, MechanismFlag(0)
        if usage is MaterialUsage.ENCRYPT_DECRYPT:
            # Encryption needs only the public key, which is exported (see asymmetric_encrypt).
            return MechanismFlag.DECRYPT, MechanismFlag(0)
        return MechanismFlag.SIGN, MechanismFlag.VERIFY

    @abc.abstractmethod
    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]: ...

    def generate(
        self,
        session: Any,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool,
    ) -> Generated:
        (raw,) = ids
        private_caps, public_caps = self._capabilities(usage)
        label = name.label(ObjectRole.KEY_PAIR)
        # python-pkcs11 sets each capability attribute from the flags; the rest come from the
        # hardened templates (which override its defaults).
        public, private = self._generate_pair(
            session, id=raw, label=label, store=store,
            capabilities=private_caps | public_caps,
            public_template={
                **_template(_PUBLIC, store=store), Attribute.VERIFY: bool(public_caps),
                Attribute.ENCRYPT: False, Attribute.WRAP: False,
            },
            private_template={
                **_template(HARDENED, store=store),
                Attribute.SIGN: bool(private_caps & MechanismFlag.SIGN),
                Attribute.DERIVE: bool(private_caps & MechanismFlag.DERIVE),
                Attribute.DECRYPT: bool(private_caps & MechanismFlag.DECRYPT),
                Attribute.UNWRAP: False,
            },
        )  # fmt: skip
        return Generated([private], [public])

    key_type: KeyType
    """The PKCS#11 key type of both halves."""

    def unwrap(
        self,
        session: Any,
        unwrapper: Unwrapper,
        name: MaterialName,
        ids: Sequence[bytes],
        *,
        profile: MechanismProfile | None,
        usage: MaterialUsage,
        store: bool = True,
    ) -> Imported:
        (raw,) = ids
        private_caps, public_caps = self._capabilities(usage)
        label = name.label(ObjectRole.KEY_PAIR)
        private = unwrapper.unwrap(
            ObjectClass.PRIVATE_KEY, self.key_type,
            template={
                **_template(HARDENED, store=store), **_NOT_PRIVATE,
                Attribute.SIGN: bool(private_caps & MechanismFlag.SIGN),
                Attribute.DERIVE: bool(private_caps & MechanismFlag.DERIVE),
                Attribute.DECRYPT: bool(private_caps & MechanismFlag.DECRYPT),
                Attribute.UNWRAP: False,
            },
            capabilities=private_caps, raw_id=raw, label=label,
        )  # fmt: skip
        made = [private]
        try:
            try:
                public_values = self._public_values(private, unwrapper)
                public = session.create_object(
                    {
                        **_template(_PUBLIC, store=store), **public_values,
                        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: self.key_type,
                        Attribute.ID: raw, Attribute.LABEL: label,
                        Attribute.VERIFY: bool(public_caps), Attribute.ENCRYPT: False,
                        Attribute.WRAP: False, Attribute.DERIVE: False,
                    }
                )  # fmt: skip
                made.append(public)
                der = self.public_key(public)
                self._check_pair(private, public)
            except _MATERIAL_FAILURES:
                raise MaterialRejected(f"the private key is not {self.spec.value}") from None
        except BaseException:
            _destroy_all(made)
            raise
        return Imported(Generated([private], [public]), hashlib.sha256(der).digest())

    def _public_values(self, private: Any, unwrapper: Unwrapper) -> dict[Any, Any]:
        """The public key attributes of an imported private key (:class:`MaterialRejected`
        when it is not a key of this spec); :class:`UnsupportedByToken` for a spec whose
        import is not built (Ed25519)."""
        raise UnsupportedByToken(f"importing {self.spec.value} key material is not supported")

    def _check_pair(self, private: Any, public: Any) -> None:
        """:class:`MaterialRejected` unless the halves of an imported signing pair match (a
        PKCS#8 key whose parts disagree signs nothing its public key verifies)."""
        if not private[Attribute.SIGN]:
            return
        algorithm = self._probe_algorithm()
        digest = hashlib.new(algorithm.facts.hash_name, _PROBE_DATA).digest()
        signature = self.sign(private, digest, algorithm)
        if not self.verify(public, digest, signature, algorithm):
            raise MaterialRejected("the private key's parts do not match")

    def check_algorithm(self, algorithm: SigningAlgorithm, data: bytes) -> None:
        """:class:`IncompatibleMaterial` unless ``algorithm`` signs with this material, and
        :class:`TokenRejected` unless ``data`` has the length it signs."""
        facts = algorithm.facts
        if facts.kind is not self.facts.kind:
            raise _incompatible(self.spec, f"sign {algorithm.value}")
        if not facts.input_ok(data):
            raise TokenRejected(f"{algorithm.value} signs a {facts.digest_length}-byte digest")

    def sign(self, private: Any, data: bytes, algorithm: SigningAlgorithm) -> bytes:
        """The signature of ``data`` (checked by :meth:`check_algorithm`)."""
        raise _incompatible(self.spec, "sign")

    def verify(
        self, public: Any, data: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        """Whether ``signature`` signs ``data``."""
        raise _incompatible(self.spec, "verify signatures")

    @abc.abstractmethod
    def public_key(self, public: Any) -> bytes:
        """The public key as DER ``SubjectPublicKeyInfo``."""
        ...

    def peer_point(self, peer_public_key: bytes) -> bytes:
        """The peer's public point for :meth:`derive_shared_secret`, from its DER
        ``SubjectPublicKeyInfo`` (:class:`TokenRejected` when it is not a key on this curve).
        Key agreement material only."""
        raise _incompatible(self.spec, "agree keys")

    def derive_shared_secret(self, private: Any, peer_point: bytes) -> bytes:
        """ECDH of ``private`` with the peer's point: the raw shared secret."""
        raise _incompatible(self.spec, "agree keys")

    def encrypt(
        self, public_key_der: bytes, plaintext: bytes, scheme: AsymmetricEncryption
    ) -> bytes:
        """Encrypt for this key pair with its public key (DER ``SubjectPublicKeyInfo``)."""
        raise _incompatible(self.spec, "encrypt")

    def decrypt(
        self, private: Any, ciphertext: bytes, scheme: AsymmetricEncryption, *, in_token: bool
    ) -> bytes:
        """Decrypt with the private key; :class:`DecryptionFailed` on any failure.
        ``in_token``: whether the token performs the whole scheme itself (else what it lacks is
        done on the host, see :class:`RsaMaterial`)."""
        raise _incompatible(self.spec, "decrypt")

    def _probe_algorithm(self) -> SigningAlgorithm:
        raise _incompatible(self.spec, "sign")

    def probe(self, session: Any, usage: MaterialUsage) -> bool:
        with _temporary([]) as objects:
            try:
                with _refusal_is_probe_refused():
                    generated = self.generate(
                        session, MaterialName("hsmkms-probe"), [b""], profile=None, usage=usage,
                        store=False,
                    )  # fmt: skip
            except p11e.DomainParamsInvalid:
                return False  # the curve is not one the token knows (NSS softokn: secp256k1)
            objects += [*generated.objects, *generated.public]
            private, public = generated.objects[0], generated.public[0]
            try:
                return self._probe_usage(private, public, usage)
            except (p11e.PKCS11Error, DecryptionFailed, TokenRejected):
                return False

    def _probe_usage(self, private: Any, public: Any, usage: MaterialUsage) -> bool:
        if usage is MaterialUsage.KEY_AGREEMENT:
            point = self.peer_point(self.public_key(public))
            return len(self.derive_shared_secret(private, point)) > 0
        algorithm = self._probe_algorithm()
        facts = algorithm.facts
        data = hashlib.new(facts.hash_name, _PROBE_DATA).digest()
        if not facts.signs_digest:
            data = _PROBE_DATA
        signature = self.sign(private, data, algorithm)
        other = bytes(len(data)) if facts.signs_digest else data + b"!"
        return self.verify(public, data, signature, algorithm) and not self.verify(
            public, other, signature, algorithm
        )


class RsaMaterial(KeyPairMaterial):
    """RSA key pairs. Signing: RSASSA-PSS (salt as long as the digest, MGF1 with the same hash,
    as AWS KMS) and RSASSA-PKCS1-v1_5, both over a digest (CKM_RSA_PKCS_PSS, CKM_RSA_PKCS).
    Encryption: RSAES-OAEP (same hash for OAEP and MGF1, empty label, as AWS KMS).

    Decryption happens in the token: RSAES_OAEP_SHA_1 with CKM_RSA_PKCS_OAEP (every token);
    RSAES_OAEP_SHA_256 with CKM_RSA_PKCS_OAEP too where the token performs OAEP with SHA-256 (a
    YubiHSM 2 does, per its module's sources), else with CKM_RSA_X_509 (the raw RSA private-key
    operation) in the token and the OAEP decoding (RFC 8017 §7.1.2 step 3, :func:`oaep_decode`)
    on the host: SoftHSM 2.6.1 performs CKM_RSA_PKCS_OAEP with SHA-1 only (CKR_ARGUMENTS_BAD for
    SHA-256: measured). Which one, :meth:`oaep_sha256_in_token` finds out with a real
    decryption. The private key never leaves the token either way; the decoded message (the
    plaintext the caller gets anyway) is in host memory either way. Encryption needs only the
    public key and is done on the host (pyca/cryptography), exactly as a caller encrypting
    offline with GetPublicKey does; so the public key object has no capability at all."""

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        if usage is MaterialUsage.ENCRYPT_DECRYPT:
            # CKM_RSA_X_509 too where the token has no OAEP with SHA-256 (checked on use).
            return frozenset({Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_OAEP})
        return frozenset(
            {Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_PSS, Mechanism.RSA_PKCS}
        )

    key_type = KeyType.RSA

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        return tuple(session.generate_keypair(KeyType.RSA, self.facts.key_bits, **kwargs))

    def _public_values(self, private: Any, unwrapper: Unwrapper) -> dict[Any, Any]:
        # An RSA private key object carries its public modulus and exponent (not sensitive).
        modulus = bytes(private[Attribute.MODULUS])
        if int.from_bytes(modulus, "big").bit_length() != self.facts.key_bits:
            raise MaterialRejected(f"the private key is not {self.spec.value}")
        exponent = bytes(private[Attribute.PUBLIC_EXPONENT])
        return {Attribute.MODULUS: modulus, Attribute.PUBLIC_EXPONENT: exponent}

    @staticmethod
    def _input(digest: bytes, algorithm: SigningAlgorithm) -> tuple[bytes, dict[str, Any]]:
        """What the token signs for ``digest``, and the mechanism (with its parameters)."""
        facts = algorithm.facts
        if facts.scheme is SignatureScheme.RSASSA_PSS:
            hash_mechanism, mgf = _PSS_PARAMS[facts.hash_name]
            param = (hash_mechanism, mgf, facts.digest_length)
            return digest, {"mechanism": Mechanism.RSA_PKCS_PSS, "mechanism_param": param}
        return _DIGEST_INFO[facts.hash_name] + digest, {"mechanism": Mechanism.RSA_PKCS}

    def sign(self, private: Any, data: bytes, algorithm: SigningAlgorithm) -> bytes:
        payload, mechanism = self._input(data, algorithm)
        return bytes(_permitted(private, "sign")(payload, **mechanism))

    def verify(
        self, public: Any, data: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        payload, mechanism = self._input(data, algorithm)
        return bool(_permitted(public, "verify")(payload, signature, **mechanism))

    def public_key(self, public: Any) -> bytes:
        return self.public_spki(public)

    @staticmethod
    def public_spki(public: Any) -> bytes:
        """An RSA public key object as DER ``SubjectPublicKeyInfo``."""
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big"),
        )
        return numbers.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def modulus_bytes(self) -> int:
        """The length of a ciphertext or signature."""
        return (self.facts.key_bits + 7) // 8

    def encrypt(
        self, public_key_der: bytes, plaintext: bytes, scheme: AsymmetricEncryption
    ) -> bytes:
        key = serialization.load_der_public_key(public_key_der)
        if not isinstance(key, rsa.RSAPublicKey):  # pragma: no cover - the token's own key
            raise _incompatible(self.spec, "encrypt")
        if len(plaintext) > scheme.facts.max_plaintext(self.modulus_bytes):
            raise TokenRejected(f"{scheme.value} cannot encrypt that much with {self.spec.value}")
        algorithm = _HOST_HASHES[scheme.facts.hash_name]
        return key.encrypt(plaintext, padding.OAEP(padding.MGF1(algorithm()), algorithm(), None))

    def decrypt(
        self, private: Any, ciphertext: bytes, scheme: AsymmetricEncryption, *, in_token: bool
    ) -> bytes:
        if len(ciphertext) != self.modulus_bytes:
            raise DecryptionFailed("decryption failed")
        decrypt = _permitted(private, "decrypt")
        facts = scheme.facts
        if facts.hash_name == "sha1" or in_token:
            param = _OAEP_PARAMS[facts.hash_name]
            return bytes(
                decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param)
            )
        encoded = bytes(decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
        # A module may drop the leading zero bytes of the raw result: put them back.
        encoded = encoded.rjust(self.modulus_bytes, b"\x00")
        message = oaep_decode(encoded, facts.hash_name)
        if message is None:
            raise DecryptionFailed("decryption failed")
        return message

    def _probe_algorithm(self) -> SigningAlgorithm:
        return SigningAlgorithm.RSASSA_PSS_SHA_256

    def oaep_sha256_in_token(self, private: Any, public: Any) -> bool:
        """Whether the token decrypts RSAES_OAEP_SHA_256 itself: tried on this (temporary) key
        pair with a ciphertext made here."""
        scheme = AsymmetricEncryption.RSAES_OAEP_SHA_256
        ciphertext = self.encrypt(self.public_key(public), _PROBE_DATA, scheme)
        try:
            return self.decrypt(private, ciphertext, scheme, in_token=True) == _PROBE_DATA
        except p11e.PKCS11Error:
            return False

    def probe_oaep_sha256(self, session: Any) -> bool:
        """:meth:`oaep_sha256_in_token` on temporary objects (:class:`ProbeRefused` when the
        token will not make them)."""
        with _temporary([]) as objects:
            with _refusal_is_probe_refused():
                generated = self.generate(
                    session, MaterialName("hsmkms-probe"), [b""], profile=None,
                    usage=MaterialUsage.ENCRYPT_DECRYPT, store=False,
                )  # fmt: skip
            objects += [*generated.objects, *generated.public]
            return self.oaep_sha256_in_token(generated.objects[0], generated.public[0])

    def _probe_usage(self, private: Any, public: Any, usage: MaterialUsage) -> bool:
        if usage is not MaterialUsage.ENCRYPT_DECRYPT:
            return super()._probe_usage(private, public, usage)
        in_token = self.oaep_sha256_in_token(private, public)
        spki = self.public_key(public)
        for scheme in AsymmetricEncryption:
            ciphertext = self.encrypt(spki, _PROBE_DATA, scheme)
            if self.decrypt(private, ciphertext, scheme, in_token=in_token) != _PROBE_DATA:
                return False
            tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
            try:
                self.decrypt(private, tampered, scheme, in_token=in_token)
            except (DecryptionFailed, p11e.PKCS11Error):
                continue
            return False
        return True


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 §B.2.1)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def oaep_decode(encoded: bytes, hash_name: str, label: bytes = b"") -> bytes | None:
    """EME-OAEP decoding (RFC 8017 §7.1.2 step 3) of the raw RSA result ``encoded``; ``None``
    when it is not a valid encoding. Every check runs whatever the others found, and the one
    answer for every failure is ``None``, so the caller's single error says nothing about which
    check failed (a Manger-style oracle needs that; Python cannot promise constant time)."""
    h_len = hashlib.new(hash_name).digest_size
    k = len(encoded)
    if k < 2 * h_len + 2:
        return None
    y, masked_seed, masked_db = encoded[0], encoded[1 : 1 + h_len], encoded[1 + h_len :]
    seed = bytes(
        a ^ b for a, b in zip(masked_seed, _mgf1(masked_db, h_len, hash_name), strict=True)
    )
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1(seed, k - h_len - 1, hash_name), strict=True))
    good = hmac.compare_digest(db[:h_len], hashlib.new(hash_name, label).digest())
    good &= y == 0
    # The separator: the first 0x01 after the zero padding; any other byte first is an error.
    separator = 0
    looking = True
    invalid = False
    for index in range(h_len, len(db)):
        byte = db[index]
        found = looking and byte == 0x01
        invalid |= looking and byte not in (0x00, 0x01)
        separator = index if found else separator
        looking = looking and not found
    good &= not looking and not invalid
    return db[separator + 1 :] if good else None


_HASHES: Final[Mapping[str, hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def _der_octet_string(value: bytes) -> bytes:
    """``value`` as a DER OCTET STRING (CKA_EC_POINT's encoding, PKCS#11 2.40)."""
    if len(value) < 0x80:
        return bytes([0x04, len(value)]) + value
    size = len(value).to_bytes((len(value).bit_length() + 7) // 8, "big")
    return bytes([0x04, 0x80 | len(size)]) + size + value


# DER of the named curve OIDs for CKA_EC_PARAMS: secp256r1 (1.2.840.10045.3.1.7), secp384r1
# (1.3.132.0.34), secp521r1 (1.3.132.0.35), secp256k1 (1.3.132.0.10), and id-Ed25519
# (1.3.101.112, RFC 8410) for the Edwards curve.
_P256_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
_P384_PARAMS: Final = bytes.fromhex("06052b81040022")
_P521_PARAMS: Final = bytes.fromhex("06052b81040023")
_K1_PARAMS: Final = bytes.fromhex("06052b8104000a")
_ED25519_PARAMS: Final = bytes.fromhex("06032b6570")


class EcMaterial(KeyPairMaterial):
    """EC key pairs on a named curve: ECDSA over a digest (CKM_ECDSA; signatures DER-encoded
    as X.509 and AWS KMS do), or ECDH (CKM_ECDH1_DERIVE, no KDF) for key agreement."""

    def __init__(
        self,
        facts: SpecFacts,
        curve: ec.EllipticCurve,
        params: bytes,
        probe_algorithm: SigningAlgorithm,
    ) -> None:
        super().__init__(facts)
        self.curve = curve
        self.params = params
        self._probe_with = probe_algorithm
        self._coordinate = (curve.key_size + 7) // 8

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        use = Mechanism.ECDH1_DERIVE if usage is MaterialUsage.KEY_AGREEMENT else Mechanism.ECDSA
        return frozenset({Mechanism.EC_KEY_PAIR_GEN, use})

    key_type = KeyType.EC

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        domain = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: self.params}, local=True
        )
        return tuple(domain.generate_keypair(**kwargs))

    def _public_values(self, private: Any, unwrapper: Unwrapper) -> dict[Any, Any]:
        # An EC private key object has no public point (SoftHSM 2.6.1, measured), and the
        # PKCS#8 blob is not seen on the host. So a temporary copy that may sign and derive
        # finds it: ECDH with the curve's generator G gives x(d.G), the public point's x; of
        # the two points with that x, the public key is the one that verifies the copy's
        # signature.
        if bytes(private[Attribute.EC_PARAMS]) != self.params:
            raise MaterialRejected(f"the private key is not on {self.curve.name}")
        copy = unwrapper.unwrap(
            ObjectClass.PRIVATE_KEY, KeyType.EC,
            template={
                **_template(HARDENED, store=False), **_NOT_PRIVATE, Attribute.SIGN: True,
                Attribute.DERIVE: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
            },
            capabilities=MechanismFlag.SIGN | MechanismFlag.DERIVE,
        )  # fmt: skip
        try:
            x = self.derive_shared_secret(copy, self._generator)
            algorithm = self._probe_algorithm()
            digest = hashlib.new(algorithm.facts.hash_name, _PROBE_DATA).digest()
            signature = self.sign(copy, digest, algorithm)
        finally:
            _destroy_all([copy])
        prehashed = ec.ECDSA(Prehashed(_HASHES[algorithm.facts.hash_name]))
        for prefix in (b"\x02", b"\x03"):
            try:
                candidate = ec.EllipticCurvePublicKey.from_encoded_point(self.curve, prefix + x)
                candidate.verify(signature, digest, prehashed)
            except (ValueError, InvalidSignature):
                continue
            point = candidate.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            return {Attribute.EC_PARAMS: self.params, Attribute.EC_POINT: _der_octet_string(point)}
        raise MaterialRejected(f"the private key is not a key on {self.curve.name}")

    @functools.cached_property
    def _generator(self) -> bytes:
        """The curve's generator point, uncompressed."""
        return (
            ec.derive_private_key(1, self.curve)
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )

    def sign(self, private: Any, data: bytes, algorithm: SigningAlgorithm) -> bytes:
        raw = bytes(_permitted(private, "sign")(data, mechanism=Mechanism.ECDSA))
        n = self._coordinate
        return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))

    def verify(
        self, public: Any, data: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        verify = _permitted(public, "verify")
        try:
            r, s = decode_dss_signature(signature)
            raw = r.to_bytes(self._coordinate, "big") + s.to_bytes(self._coordinate, "big")
        except (ValueError, OverflowError):
            return False
        return bool(verify(data, raw, mechanism=Mechanism.ECDSA))

    def public_key(self, public: Any) -> bytes:
        point = _der_octets(bytes(public[Attribute.EC_POINT]), 1 + 2 * self._coordinate)
        key = ec.EllipticCurvePublicKey.from_encoded_point(self.curve, point)
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def peer_point(self, peer_public_key: bytes) -> bytes:
        try:
            peer = serialization.load_der_public_key(peer_public_key)
        except (ValueError, UnsupportedAlgorithm):
            raise TokenRejected("the peer public key is not a DER SubjectPublicKeyInfo") from None
        if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != self.curve.name:
            raise TokenRejected(f"the peer public key is not on {self.curve.name}")
        return peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def derive_shared_secret(self, private: Any, peer_point: bytes) -> bytes:
        secret = _permitted(private, "derive_key")(
            KeyType.GENERIC_SECRET, self._coordinate * 8,
            mechanism=Mechanism.ECDH1_DERIVE, mechanism_param=(KDF.NULL, None, peer_point),
            template={
                Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
            },
        )  # fmt: skip
        try:
            return bytes(secret[Attribute.VALUE])
        finally:
            with contextlib.suppress(p11e.PKCS11Error):
                secret.destroy()

    def _probe_algorithm(self) -> SigningAlgorithm:
        return self._probe_with


class EdwardsMaterial(KeyPairMaterial):
    """Ed25519 key pairs (CKK_EC_EDWARDS, CKM_EC_EDWARDS_KEY_PAIR_GEN): pure EdDSA over the
    message (CKM_EDDSA), and Ed25519ph (CKM_EDDSA with ``phFlag``) where the token really
    performs it — SoftHSM 2.6.1 ignores the flag and returns a pure signature (measured), so
    :meth:`prehash_works` checks before the first use."""

    _LENGTH = 32

    key_type = KeyType.EC_EDWARDS

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        return frozenset({Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA})

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        domain = session.create_domain_parameters(
            KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_PARAMS}, local=True
        )
        return tuple(domain.generate_keypair(mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **kwargs))

    @staticmethod
    def _params(algorithm: SigningAlgorithm) -> dict[str, Any]:
        if algorithm.facts.scheme is SignatureScheme.EDDSA_PH:
            return {"mechanism": Mechanism.EDDSA, "mechanism_param": (True, None)}
        return {"mechanism": Mechanism.EDDSA}

    def sign(self, private: Any, data: bytes, algorithm: SigningAlgorithm) -> bytes:
        return bytes(_permitted(private, "sign")(data, **self._params(algorithm)))

    def verify(
        self, public: Any, data: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        verify = _permitted(public, "verify")
        if len(signature) != 2 * self._LENGTH:
            return False
        return bool(verify(data, signature, **self._params(algorithm)))

    def public_key(self, public: Any) -> bytes:
        point = _der_octets(bytes(public[Attribute.EC_POINT]), self._LENGTH)
        return ed25519.Ed25519PublicKey.from_public_bytes(point).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _probe_algorithm(self) -> SigningAlgorithm:
        return SigningAlgorithm.ED25519_SHA_512

    def prehash_works(self, session: Any) -> bool:
        """Whether the token performs Ed25519ph, tried on temporary objects: a signature made
        with ``phFlag`` must not be a pure Ed25519 signature of the same input (what a token
        that ignores the flag returns), and the token must verify it as Ed25519ph only.
        :class:`ProbeRefused` when the token will not make temporary objects."""
        prehashed = SigningAlgorithm.ED25519_PH_SHA_512
        data = hashlib.sha512(_PROBE_DATA).digest()
        with _temporary([]) as objects:
            with _refusal_is_probe_refused():
                generated = self.generate(
                    session, MaterialName("hsmkms-probe"), [b""], profile=None,
                    usage=MaterialUsage.SIGN_VERIFY, store=False,
                )  # fmt: skip
            objects += [*generated.objects, *generated.public]
            private, public = generated.objects[0], generated.public[0]
            try:
                signature = self.sign(private, data, prehashed)
                pure = serialization.load_der_public_key(self.public_key(public))
                assert isinstance(pure, ed25519.Ed25519PublicKey)
                try:
                    pure.verify(signature, data)
                except InvalidSignature:
                    pass
                else:
                    return False  # the flag was ignored
                return self.verify(public, data, signature, prehashed) and not self.verify(
                    public, bytes(len(data)), signature, prehashed
                )
            except (p11e.PKCS11Error, TokenRejected):
                return False


class PostQuantumMaterial(KeyPairMaterial):
    """ML-DSA and ML-KEM key pairs: their mechanisms are named (CKM_ML_DSA_KEY_PAIR_GEN and
    CKM_ML_DSA, CKM_ML_KEM_KEY_PAIR_GEN and CKM_ML_KEM, PKCS#11 3.2), so a token that lacks them
    refuses the spec by name. A token that lists them is still refused: no token with these
    mechanisms was available to build and test an implementation against (SoftHSM 2.6.1 has
    none), and python-pkcs11 0.10.1 has no C_EncapsulateKey / C_DecapsulateKey."""

    def __init__(self, facts: SpecFacts, generation: Mechanism, use: Mechanism) -> None:
        super().__init__(facts)
        self._mechanisms = frozenset({generation, use})

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        return self._mechanisms

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        raise UnsupportedByToken(f"hsmkms has no PKCS#11 implementation of {self.spec.value} yet")

    def public_key(self, public: Any) -> bytes:
        raise UnsupportedByToken(f"hsmkms has no PKCS#11 implementation of {self.spec.value} yet")

    def probe(self, session: Any, usage: MaterialUsage) -> bool:
        return False


def _materials() -> dict[KeyMaterialSpec, Material]:
    spec = KeyMaterialSpec
    sha256, sha384 = SigningAlgorithm.ECDSA_SHA_256, SigningAlgorithm.ECDSA_SHA_384
    made: list[Material] = [
        SymmetricMaterial(spec.SYMMETRIC_DEFAULT.facts),
        HmacMaterial(spec.HMAC_224.facts, Mechanism.SHA224_HMAC),
        HmacMaterial(spec.HMAC_256.facts, Mechanism.SHA256_HMAC),
        HmacMaterial(spec.HMAC_384.facts, Mechanism.SHA384_HMAC),
        HmacMaterial(spec.HMAC_512.facts, Mechanism.SHA512_HMAC),
        RsaMaterial(spec.RSA_2048.facts),
        RsaMaterial(spec.RSA_3072.facts),
        RsaMaterial(spec.RSA_4096.facts),
        EcMaterial(spec.ECC_NIST_P256.facts, ec.SECP256R1(), _P256_PARAMS, sha256),
        EcMaterial(spec.ECC_NIST_P384.facts, ec.SECP384R1(), _P384_PARAMS, sha384),
        EcMaterial(
            spec.ECC_NIST_P521.facts, ec.SECP521R1(), _P521_PARAMS, SigningAlgorithm.ECDSA_SHA_512
        ),
        EcMaterial(spec.ECC_SECG_P256K1.facts, ec.SECP256K1(), _K1_PARAMS, sha256),
        EdwardsMaterial(spec.ECC_NIST_EDWARDS25519.facts),
    ]
    dsa = (Mechanism.ML_DSA_KEY_PAIR_GEN, Mechanism.ML_DSA)
    kem = (Mechanism.ML_KEM_KEY_PAIR_GEN, Mechanism.ML_KEM)
    for name in ("ML_DSA_44", "ML_DSA_65", "ML_DSA_87"):
        made.append(PostQuantumMaterial(spec[name].facts, *dsa))
    for name in ("ML_KEM_512", "ML_KEM_768", "ML_KEM_1024"):
        made.append(PostQuantumMaterial(spec[name].facts, *kem))
    kinds: dict[MaterialKind, type[Material]] = {
        MaterialKind.SYMMETRIC: SymmetricMaterial, MaterialKind.HMAC: HmacMaterial,
        MaterialKind.RSA: RsaMaterial, MaterialKind.EC: EcMaterial,
        MaterialKind.EDWARDS: EdwardsMaterial, MaterialKind.ML_DSA: PostQuantumMaterial,
        MaterialKind.ML_KEM: PostQuantumMaterial,
    }  # fmt: skip
    for material in made:
        assert isinstance(material, kinds[material.facts.kind])
    return {m.spec: m for m in made}


MATERIALS: Final[Mapping[KeyMaterialSpec, Material]] = _materials()
"""How every spec is made on a PKCS#11 token, by spec."""
if set(MATERIALS) != set(KeyMaterialSpec):  # pragma: no cover - import-time check
    raise ImportError("a key material spec has no PKCS#11 implementation")
