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
import hashlib
import hmac
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsmkms.keystore.base import MaterialName
from hsmkms.keystore.errors import (
    DecryptionFailed,
    IncompatibleMaterial,
    TokenRejected,
    UnsupportedByToken,
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
    "MATERIALS",
    "OBJECT_CLASSES",
    "PROFILE_MECHANISMS",
    "EdwardsMaterial",
    "Generated",
    "KeyPairMaterial",
    "Material",
    "ProbeRefused",
    "ProfileMechanisms",
    "RsaMaterial",
    "generate_secrets",
    "oaep_decode",
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
_OAEP_PARAMS: Final[Mapping[str, tuple[Mechanism, MGF, None]]] = {
    "sha1": (Mechanism.SHA_1, MGF.SHA1, None),
    "sha256": (Mechanism.SHA256, MGF.SHA256, None),
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
            with _refusal_is_probe_refused():
                generated = self.generate(
                    session, MaterialName("hsmkms-probe"), [b""], profile=None, usage=usage,
                    store=False,
                )  # fmt: skip
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

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        return tuple(session.generate_keypair(KeyType.RSA, self.facts.key_bits, **kwargs))

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

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        domain = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: self.params}, local=True
        )
        return tuple(domain.generate_keypair(**kwargs))

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
