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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11e
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsmkms.keystore.base import MaterialName
from hsmkms.keystore.errors import DecryptionFailed, IncompatibleMaterial, TokenRejected
from hsmkms.keystore.specs import (
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
    "Generated",
    "KeyPairMaterial",
    "Material",
    "ProbeRefused",
    "ProfileMechanisms",
    "generate_secrets",
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


class KeyPairMaterial(Material):
    """An asymmetric key pair: a private key object (sign, or derive) and a public key object
    (verify) sharing one id."""

    def _capabilities(self, usage: MaterialUsage) -> tuple[MechanismFlag, MechanismFlag]:
        """(private, public) capabilities for ``usage``."""
        if usage is MaterialUsage.KEY_AGREEMENT:
            # The public half of a key agreement key is only ever exported.
            return MechanismFlag.DERIVE, MechanismFlag(0)
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
                Attribute.DECRYPT: False, Attribute.UNWRAP: False,
            },
        )  # fmt: skip
        return Generated([private], [public])

    def check_algorithm(self, algorithm: SigningAlgorithm, digest: bytes) -> None:
        """:class:`IncompatibleMaterial` unless ``algorithm`` signs with this material, and
        :class:`TokenRejected` unless ``digest`` has its length."""
        facts = algorithm.facts
        if facts.kind is not self.facts.kind:
            raise IncompatibleMaterial(
                f"{self.spec.value} material does not sign {algorithm.value}"
            )
        if len(digest) != facts.digest_length:
            raise TokenRejected(f"{algorithm.value} signs a {facts.digest_length}-byte digest")

    @abc.abstractmethod
    def sign(self, private: Any, digest: bytes, algorithm: SigningAlgorithm) -> bytes:
        """The signature of ``digest`` (checked by :meth:`check_algorithm`)."""
        ...

    @abc.abstractmethod
    def verify(
        self, public: Any, digest: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        """Whether ``signature`` signs ``digest``."""
        ...

    @abc.abstractmethod
    def public_key(self, public: Any) -> bytes:
        """The public key as DER ``SubjectPublicKeyInfo``."""
        ...

    @abc.abstractmethod
    def _probe_algorithm(self) -> SigningAlgorithm: ...

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
                if usage is MaterialUsage.KEY_AGREEMENT:
                    point = self.peer_point(self.public_key(public))
                    secret = self.derive_shared_secret(private, point)
                    return len(secret) == self.facts.key_bits // 8
                algorithm = self._probe_algorithm()
                digest = hashlib.new(algorithm.facts.hash_name, _PROBE_DATA).digest()
                signature = self.sign(private, digest, algorithm)
                return self.verify(public, digest, signature, algorithm) and not self.verify(
                    public, bytes(len(digest)), signature, algorithm
                )
            except p11e.PKCS11Error:
                return False

    def peer_point(self, peer_public_key: bytes) -> bytes:
        """The peer's public point for :meth:`derive_shared_secret`, from its DER
        ``SubjectPublicKeyInfo`` (:class:`TokenRejected` when it is not a key on this curve).
        Key agreement material only."""
        raise IncompatibleMaterial(f"{self.spec.value} material does not agree keys")

    def derive_shared_secret(self, private: Any, peer_point: bytes) -> bytes:
        """ECDH of ``private`` with the peer's point: the raw shared secret."""
        raise IncompatibleMaterial(f"{self.spec.value} material does not agree keys")


class RsaMaterial(KeyPairMaterial):
    """RSA key pairs: RSASSA-PSS (salt as long as the digest, MGF1 with the same hash, as AWS
    KMS) and RSASSA-PKCS1-v1_5, both over a digest (CKM_RSA_PKCS_PSS, CKM_RSA_PKCS)."""

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
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

    def sign(self, private: Any, digest: bytes, algorithm: SigningAlgorithm) -> bytes:
        data, mechanism = self._input(digest, algorithm)
        return bytes(_permitted(private, "sign")(data, **mechanism))

    def verify(
        self, public: Any, digest: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        data, mechanism = self._input(digest, algorithm)
        return bool(_permitted(public, "verify")(data, signature, **mechanism))

    def public_key(self, public: Any) -> bytes:
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big"),
        )
        return numbers.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _probe_algorithm(self) -> SigningAlgorithm:
        return SigningAlgorithm.RSASSA_PSS_SHA_256


# DER of the named curve OID secp256r1 / prime256v1 (1.2.840.10045.3.1.7), for CKA_EC_PARAMS.
_P256_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")


class EcMaterial(KeyPairMaterial):
    """EC key pairs on a named curve: ECDSA over a digest (CKM_ECDSA; signatures DER-encoded
    as X.509 and AWS KMS do), or ECDH (CKM_ECDH1_DERIVE, no KDF) for key agreement."""

    def __init__(self, facts: SpecFacts, curve: ec.EllipticCurve, params: bytes) -> None:
        super().__init__(facts)
        self.curve = curve
        self.params = params
        self._coordinate = (curve.key_size + 7) // 8

    def mechanisms(self, usage: MaterialUsage) -> frozenset[Mechanism]:
        use = Mechanism.ECDH1_DERIVE if usage is MaterialUsage.KEY_AGREEMENT else Mechanism.ECDSA
        return frozenset({Mechanism.EC_KEY_PAIR_GEN, use})

    def _generate_pair(self, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        domain = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: self.params}, local=True
        )
        return tuple(domain.generate_keypair(**kwargs))

    def sign(self, private: Any, digest: bytes, algorithm: SigningAlgorithm) -> bytes:
        raw = bytes(_permitted(private, "sign")(digest, mechanism=Mechanism.ECDSA))
        n = self._coordinate
        return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))

    def verify(
        self, public: Any, digest: bytes, signature: bytes, algorithm: SigningAlgorithm
    ) -> bool:
        verify = _permitted(public, "verify")
        try:
            r, s = decode_dss_signature(signature)
            raw = r.to_bytes(self._coordinate, "big") + s.to_bytes(self._coordinate, "big")
        except (ValueError, OverflowError):
            return False
        return bool(verify(digest, raw, mechanism=Mechanism.ECDSA))

    def _point(self, public: Any) -> bytes:
        # CKA_EC_POINT is the DER OCTET STRING of the uncompressed point (PKCS#11 2.40); a few
        # modules return the bare point.
        value = bytes(public[Attribute.EC_POINT])
        bare = 1 + 2 * self._coordinate
        if len(value) == bare + 2 and value[:2] == bytes([0x04, bare]):
            return value[2:]
        return value

    def public_key(self, public: Any) -> bytes:
        key = ec.EllipticCurvePublicKey.from_encoded_point(self.curve, self._point(public))
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
        return SigningAlgorithm.ECDSA_SHA_256


def _materials() -> dict[KeyMaterialSpec, Material]:
    spec = KeyMaterialSpec
    made: list[Material] = [
        SymmetricMaterial(spec.SYMMETRIC_DEFAULT.facts),
        HmacMaterial(spec.HMAC_224.facts, Mechanism.SHA224_HMAC),
        HmacMaterial(spec.HMAC_256.facts, Mechanism.SHA256_HMAC),
        HmacMaterial(spec.HMAC_384.facts, Mechanism.SHA384_HMAC),
        HmacMaterial(spec.HMAC_512.facts, Mechanism.SHA512_HMAC),
        RsaMaterial(spec.RSA_2048.facts),
        EcMaterial(spec.ECC_NIST_P256.facts, ec.SECP256R1(), _P256_PARAMS),
    ]
    for material in made:
        kinds = {
            MaterialKind.SYMMETRIC: SymmetricMaterial, MaterialKind.HMAC: HmacMaterial,
            MaterialKind.RSA: RsaMaterial, MaterialKind.EC: EcMaterial,
        }  # fmt: skip
        assert isinstance(material, kinds[material.facts.kind])
    return {m.spec: m for m in made}


MATERIALS: Final[Mapping[KeyMaterialSpec, Material]] = _materials()
"""How every spec is made on a PKCS#11 token, by spec."""
if set(MATERIALS) != set(KeyMaterialSpec):  # pragma: no cover - import-time check
    raise ImportError("a key material spec has no PKCS#11 implementation")
