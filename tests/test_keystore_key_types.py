"""The PKCS#11 backend for the key specs of issue 18, against a real SoftHSM2 token: RSA 3072 and
4096, RSA encryption (RSAES-OAEP with SHA-1 in the token, SHA-256 as raw RSA in the token and
OAEP decoding on the host), NIST P-384 and P-521, secp256k1, Ed25519, and the post-quantum
specs a token without their mechanisms refuses by name.

Every signature, public key, ciphertext and shared secret is checked against an independent
implementation (pyca/cryptography), in both directions where there are two."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from pkcs11 import ObjectClass

from hsmkms.keystore.base import KeyMaterialRef, MaterialName
from hsmkms.keystore.errors import (
    DecryptionFailed,
    IncompatibleMaterial,
    TokenRejected,
    UnsupportedByToken,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.pkcs11_mechanisms import _der_octets, oaep_decode
from hsmkms.keystore.specs import (
    AsymmetricEncryption,
    KeyMaterialSpec,
    MaterialUsage,
    SigningAlgorithm,
)

pytestmark = pytest.mark.hsm

HARDENED = {
    "TOKEN": True,
    "PRIVATE": True,
    "SENSITIVE": True,
    "EXTRACTABLE": False,
    "NEVER_EXTRACTABLE": True,
    "MODIFIABLE": False,
}
_HASHES: dict[str, Any] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _create(
    ks: Pkcs11Keystore, spec: KeyMaterialSpec, usage: MaterialUsage | None = None
) -> KeyMaterialRef:
    return ks.create(spec, MaterialName.key_version(str(uuid.uuid4()), 1), usage=usage)


def _oaep(scheme: AsymmetricEncryption) -> padding.OAEP:
    algorithm = _HASHES[scheme.facts.hash_name]
    return padding.OAEP(padding.MGF1(algorithm()), algorithm(), None)


@pytest.fixture(scope="module")
def rsa_encryption(keystore: Pkcs11Keystore) -> Iterator[KeyMaterialRef]:
    ref = _create(keystore, KeyMaterialSpec.RSA_2048, MaterialUsage.ENCRYPT_DECRYPT)
    yield ref
    keystore.destroy(ref)


def _capabilities(ks: Pkcs11Keystore, ref: KeyMaterialRef, *, public: bool) -> list[str]:
    names = (
        ["VERIFY", "ENCRYPT", "WRAP", "DERIVE"]
        if public
        else ["SIGN", "DECRYPT", "UNWRAP", "DERIVE"]
    )
    attrs = ks.attributes(ref.object_ids[0], names, public=public)
    return [n for n in names if attrs[n]]


@pytest.mark.parametrize(
    ("spec", "usage", "private_caps", "public_caps"),
    [
        (KeyMaterialSpec.RSA_3072, MaterialUsage.SIGN_VERIFY, ["SIGN"], ["VERIFY"]),
        (KeyMaterialSpec.RSA_2048, MaterialUsage.ENCRYPT_DECRYPT, ["DECRYPT"], []),
        (KeyMaterialSpec.ECC_NIST_P384, MaterialUsage.SIGN_VERIFY, ["SIGN"], ["VERIFY"]),
        (KeyMaterialSpec.ECC_NIST_P521, MaterialUsage.KEY_AGREEMENT, ["DERIVE"], []),
        (KeyMaterialSpec.ECC_SECG_P256K1, MaterialUsage.SIGN_VERIFY, ["SIGN"], ["VERIFY"]),
        (KeyMaterialSpec.ECC_NIST_EDWARDS25519, MaterialUsage.SIGN_VERIFY, ["SIGN"], ["VERIFY"]),
    ],
    ids=lambda v: getattr(v, "value", None),
)
def test_private_keys_are_hardened_token_objects_with_only_their_usage(
    keystore: Pkcs11Keystore,
    spec: KeyMaterialSpec,
    usage: MaterialUsage,
    private_caps: list[str],
    public_caps: list[str],
) -> None:
    """Read back from the token: private, sensitive, never extractable, not modifiable, and
    only the capability the key's usage needs (an RSA encryption key cannot sign, an EC key
    agreement key cannot sign, a signing key cannot decrypt or derive)."""
    ref = _create(keystore, spec, usage)
    try:
        (object_id,) = ref.object_ids
        private = keystore.attributes(object_id, [*HARDENED, "CLASS"])
        assert {k: private[k] for k in HARDENED} == HARDENED
        assert private["CLASS"] == ObjectClass.PRIVATE_KEY
        assert _capabilities(keystore, ref, public=False) == private_caps
        assert _capabilities(keystore, ref, public=True) == public_caps
        with pytest.raises(TokenRejected):
            keystore.attributes(object_id, ["VALUE"])
        if spec.value.startswith("RSA"):
            with pytest.raises(TokenRejected):
                keystore.attributes(object_id, ["PRIVATE_EXPONENT"])
    finally:
        keystore.destroy(ref)


# -- RSA encryption ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", list(AsymmetricEncryption), ids=lambda s: s.value)
def test_rsa_oaep_both_directions_with_an_independent_implementation(
    keystore: Pkcs11Keystore, rsa_encryption: KeyMaterialRef, scheme: AsymmetricEncryption
) -> None:
    """Encrypted offline with the exported public key -> decrypted in the token; encrypted
    here -> decrypted by nobody but the token, and it is plain RSAES-OAEP (it decrypts in the
    token and its length is the modulus)."""
    public = serialization.load_der_public_key(keystore.public_key(rsa_encryption))
    assert isinstance(public, rsa.RSAPublicKey)
    offline = public.encrypt(b"made offline", _oaep(scheme))
    assert keystore.asymmetric_decrypt(rsa_encryption, offline, scheme) == b"made offline"
    ours = keystore.asymmetric_encrypt(rsa_encryption, b"made here", scheme)
    assert len(ours) == 256
    assert keystore.asymmetric_decrypt(rsa_encryption, ours, scheme) == b"made here"
    other = next(s for s in AsymmetricEncryption if s is not scheme)
    with pytest.raises(DecryptionFailed):
        keystore.asymmetric_decrypt(rsa_encryption, ours, other)
    # SoftHSM 2.6.1 refuses CKM_RSA_PKCS_OAEP with SHA-256 (measured): the keystore found out
    # and decrypts RSAES_OAEP_SHA_256 with the raw RSA operation in the token instead.
    assert keystore._oaep_sha256 is False


@pytest.mark.parametrize("scheme", list(AsymmetricEncryption), ids=lambda s: s.value)
def test_rsa_oaep_limits_and_every_malformed_ciphertext(
    keystore: Pkcs11Keystore, rsa_encryption: KeyMaterialRef, scheme: AsymmetricEncryption
) -> None:
    limit = scheme.facts.max_plaintext(256)
    assert limit == {"sha1": 214, "sha256": 190}[scheme.facts.hash_name]
    longest = os.urandom(limit)
    ciphertext = keystore.asymmetric_encrypt(rsa_encryption, longest, scheme)
    assert keystore.asymmetric_decrypt(rsa_encryption, ciphertext, scheme) == longest
    with pytest.raises(TokenRejected):
        keystore.asymmetric_encrypt(rsa_encryption, longest + b"x", scheme)
    public = serialization.load_der_public_key(keystore.public_key(rsa_encryption))
    assert isinstance(public, rsa.RSAPublicKey)
    modulus = public.public_numbers().n
    for bad in (
        ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]),
        bytes([ciphertext[0] ^ 0x80]) + ciphertext[1:],
        ciphertext[:-1],
        ciphertext + b"\x00",
        bytes(256),
        b"\xff" * 256,
        modulus.to_bytes(256, "big"),  # not below the modulus
        os.urandom(256),
    ):
        with pytest.raises(DecryptionFailed):
            keystore.asymmetric_decrypt(rsa_encryption, bad, scheme)


def test_rsa_encryption_material_neither_signs_nor_agrees(
    keystore: Pkcs11Keystore, rsa_encryption: KeyMaterialRef
) -> None:
    with pytest.raises(IncompatibleMaterial, match="does not permit sign"):
        keystore.sign(rsa_encryption, bytes(32), SigningAlgorithm.RSASSA_PSS_SHA_256)
    signing = _create(keystore, KeyMaterialSpec.RSA_2048)
    try:
        ciphertext = keystore.asymmetric_encrypt(
            signing, b"x", AsymmetricEncryption.RSAES_OAEP_SHA_1
        )  # the public key encrypts, whatever the usage; only decryption is refused
        with pytest.raises(IncompatibleMaterial, match="does not permit decrypt"):
            keystore.asymmetric_decrypt(signing, ciphertext, AsymmetricEncryption.RSAES_OAEP_SHA_1)
    finally:
        keystore.destroy(signing)
    ec_pair = _create(keystore, KeyMaterialSpec.ECC_NIST_P256)
    try:
        with pytest.raises(IncompatibleMaterial, match="does not encrypt"):
            keystore.asymmetric_encrypt(ec_pair, b"x", AsymmetricEncryption.RSAES_OAEP_SHA_1)
    finally:
        keystore.destroy(ec_pair)


def _raw_rsa(private: rsa.RSAPrivateKey, ciphertext: bytes) -> bytes:
    """The RSA private-key operation alone (what CKM_RSA_X_509 returns), on a test key."""
    numbers = private.private_numbers()
    m = pow(int.from_bytes(ciphertext, "big"), numbers.d, numbers.public_numbers.n)
    return m.to_bytes(private.key_size // 8, "big")


_TEST_KEY = rsa.generate_private_key(65537, 2048)


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_oaep_decoding_matches_an_independent_encoder(hash_name: str) -> None:
    algorithm = _HASHES[hash_name]
    oaep = padding.OAEP(padding.MGF1(algorithm()), algorithm(), None)
    for message in (b"", b"a", os.urandom(100), os.urandom(256 - 2 * algorithm.digest_size - 2)):
        encoded = _raw_rsa(_TEST_KEY, _TEST_KEY.public_key().encrypt(message, oaep))
        assert oaep_decode(encoded, hash_name) == message
        # Any change to the encoding is caught: Y, the masked seed, the masked data block.
        for index in (0, 1, 40, len(encoded) - 1):
            changed = bytearray(encoded)
            changed[index] ^= 0x01
            assert oaep_decode(bytes(changed), hash_name) is None
        assert oaep_decode(encoded, hash_name, label=b"label") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_oaep_decoding_of_arbitrary_bytes_never_raises(encoded: bytes) -> None:
    """A random block is (overwhelmingly) not an encoding; the answer is None, nothing else."""
    result = oaep_decode(encoded, "sha256")
    assert result is None or isinstance(result, bytes)


# -- ECDSA on the other curves, Ed25519 ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "curve", "algorithm", "coordinate"),
    [
        (KeyMaterialSpec.ECC_NIST_P384, ec.SECP384R1(), SigningAlgorithm.ECDSA_SHA_384, 48),
        (KeyMaterialSpec.ECC_NIST_P521, ec.SECP521R1(), SigningAlgorithm.ECDSA_SHA_512, 66),
        (KeyMaterialSpec.ECC_SECG_P256K1, ec.SECP256K1(), SigningAlgorithm.ECDSA_SHA_256, 32),
    ],
    ids=lambda v: getattr(v, "value", None),
)
def test_ecdsa_on_every_curve_verifies_both_ways(
    keystore: Pkcs11Keystore,
    spec: KeyMaterialSpec,
    curve: ec.EllipticCurve,
    algorithm: SigningAlgorithm,
    coordinate: int,
) -> None:
    ref = _create(keystore, spec)
    try:
        public = serialization.load_der_public_key(keystore.public_key(ref))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == curve.name
        hash_ = _HASHES[algorithm.facts.hash_name]()
        digest = hashlib.new(algorithm.facts.hash_name, b"sign me").digest()
        signature = keystore.sign(ref, digest, algorithm)
        public.verify(signature, b"sign me", ec.ECDSA(hash_))
        assert keystore.verify(ref, digest, signature, algorithm)
        foreign = ec.generate_private_key(curve)
        assert not keystore.verify(
            ref, digest, foreign.sign(b"sign me", ec.ECDSA(hash_)), algorithm
        )
        assert not keystore.verify(
            ref, hashlib.new(algorithm.facts.hash_name, b"other").digest(), signature, algorithm
        )
        assert len(public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )) == 1 + 2 * coordinate  # fmt: skip
    finally:
        keystore.destroy(ref)


@pytest.mark.parametrize(
    ("spec", "curve", "length"),
    [
        (KeyMaterialSpec.ECC_NIST_P384, ec.SECP384R1(), 48),
        (KeyMaterialSpec.ECC_NIST_P521, ec.SECP521R1(), 66),
    ],
    ids=lambda v: getattr(v, "value", None),
)
def test_ecdh_on_p384_and_p521_matches_reference(
    keystore: Pkcs11Keystore, spec: KeyMaterialSpec, curve: ec.EllipticCurve, length: int
) -> None:
    ref = _create(keystore, spec, MaterialUsage.KEY_AGREEMENT)
    try:
        peer = ec.generate_private_key(curve)
        peer_der = peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ours = serialization.load_der_public_key(keystore.public_key(ref))
        assert isinstance(ours, ec.EllipticCurvePublicKey)
        secret = keystore.derive_shared_secret(ref, peer_der)
        assert secret == peer.exchange(ec.ECDH(), ours)
        assert len(secret) == length
    finally:
        keystore.destroy(ref)


def test_secp256k1_material_does_not_agree_keys(keystore: Pkcs11Keystore) -> None:
    with pytest.raises(IncompatibleMaterial, match="not for KEY_AGREEMENT"):
        _create(keystore, KeyMaterialSpec.ECC_SECG_P256K1, MaterialUsage.KEY_AGREEMENT)


def test_ed25519_pure_signatures_verify_both_ways(keystore: Pkcs11Keystore) -> None:
    ref = _create(keystore, KeyMaterialSpec.ECC_NIST_EDWARDS25519)
    algorithm = SigningAlgorithm.ED25519_SHA_512
    try:
        public = serialization.load_der_public_key(keystore.public_key(ref))
        assert isinstance(public, ed25519.Ed25519PublicKey)
        message = b"the message itself, not a digest"
        signature = keystore.sign(ref, message, algorithm)
        assert len(signature) == 64
        public.verify(signature, message)
        assert keystore.verify(ref, message, signature, algorithm)
        assert not keystore.verify(ref, message + b"!", signature, algorithm)
        assert not keystore.verify(ref, message, signature[:-1], algorithm)
        foreign = ed25519.Ed25519PrivateKey.generate()
        assert not keystore.verify(ref, message, foreign.sign(message), algorithm)
        with pytest.raises(InvalidSignature):
            foreign.public_key().verify(signature, message)
    finally:
        keystore.destroy(ref)


def test_ed25519ph_is_refused_where_the_token_ignores_the_prehash_flag(
    keystore: Pkcs11Keystore,
) -> None:
    """SoftHSM 2.6.1 accepts CKM_EDDSA's phFlag and returns a pure Ed25519 signature (measured):
    the keystore finds that out with a probe and refuses rather than answer wrongly."""
    ref = _create(keystore, KeyMaterialSpec.ECC_NIST_EDWARDS25519)
    algorithm = SigningAlgorithm.ED25519_PH_SHA_512
    digest = hashlib.sha512(b"message").digest()
    try:
        with pytest.raises(UnsupportedByToken, match="does not perform Ed25519ph"):
            keystore.sign(ref, digest, algorithm)
        with pytest.raises(UnsupportedByToken, match="does not perform Ed25519ph"):
            keystore.verify(ref, digest, bytes(64), algorithm)
        with pytest.raises(TokenRejected, match="64-byte digest"):
            keystore.sign(ref, digest[:32], algorithm)
    finally:
        keystore.destroy(ref)


def test_an_ec_point_is_read_in_either_der_form() -> None:
    point = b"\x04" + os.urandom(132)  # a P-521 point: long-form DER length
    assert _der_octets(b"\x04\x81\x85" + point, 133) == point
    short = b"\x04" + os.urandom(64)
    assert _der_octets(b"\x04\x41" + short, 65) == short
    assert _der_octets(short, 65) == short  # the bare point some modules return
    for bad in (b"\x04\x41" + short[:-1], b"\x03\x41" + short, b"", b"\x04\x40" + short[1:]):
        with pytest.raises(TokenRejected):
            _der_octets(bad, 65)
    with pytest.raises(TokenRejected):
        _der_octets(b"\x04\x81\x84" + point[:-1], 133)


# -- specs the token cannot host --------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (KeyMaterialSpec.ML_DSA_44, "CKM_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN"),
        (KeyMaterialSpec.ML_DSA_87, "CKM_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN"),
        (KeyMaterialSpec.ML_KEM_768, "CKM_ML_KEM, CKM_ML_KEM_KEY_PAIR_GEN"),
    ],
    ids=lambda v: getattr(v, "value", None),
)
def test_a_spec_whose_mechanisms_the_token_lacks_is_refused_by_name(
    keystore: Pkcs11Keystore, spec: KeyMaterialSpec, names: str
) -> None:
    before = {o.object_id for o in keystore.list_objects()}
    with pytest.raises(UnsupportedByToken) as info:
        _create(keystore, spec)
    assert info.value.message == f"the token lacks {names}"
    assert {o.object_id for o in keystore.list_objects()} == before


@pytest.mark.slow
@pytest.mark.parametrize("usage", [MaterialUsage.SIGN_VERIFY, MaterialUsage.ENCRYPT_DECRYPT])
def test_rsa_4096_signs_and_decrypts(keystore: Pkcs11Keystore, usage: MaterialUsage) -> None:
    ref = _create(keystore, KeyMaterialSpec.RSA_4096, usage)
    try:
        public = serialization.load_der_public_key(keystore.public_key(ref))
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == 4096
        if usage is MaterialUsage.ENCRYPT_DECRYPT:
            scheme = AsymmetricEncryption.RSAES_OAEP_SHA_256
            data = os.urandom(scheme.facts.max_plaintext(512))
            offline = public.encrypt(data, _oaep(scheme))
            assert keystore.asymmetric_decrypt(ref, offline, scheme) == data
        else:
            algorithm = SigningAlgorithm.RSASSA_PSS_SHA_512
            digest = hashlib.sha512(b"m").digest()
            signature = keystore.sign(ref, digest, algorithm)
            assert len(signature) == 512
            public.verify(
                signature, b"m", padding.PSS(padding.MGF1(hashes.SHA512()), 64), hashes.SHA512()
            )
    finally:
        keystore.destroy(ref)
