"""Importing key material into the PKCS#11 keystore on a real SoftHSM2 token: wrapping key
pairs, unwrapping inside the token for every wrapping form the token does, the checks of the
unwrapped material, check values, and what is left on the token after a failure. Key pairs
(RSA_2048, ECC_NIST_P256 as PKCS#8) are imported here too: their public keys are rebuilt
inside the token, never from the private key on the host."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkms.keystore.base import MaterialName
from hsmkms.keystore.errors import (
    DecryptionFailed,
    MaterialRejected,
    TokenRejected,
    UnsupportedByToken,
)
from hsmkms.keystore.imports import (
    WrappingAlgorithm,
    WrappingKeyRef,
    WrappingKeySpec,
    kwp_length,
    material_format,
    wrapping_key_end,
    wrapping_key_name,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.specs import KeyMaterialSpec, MaterialUsage, SigningAlgorithm

pytestmark = pytest.mark.hsm

KEY_ID = "0123abcd-0000-4000-8000-00000000abcd"
SHA1 = (WrappingAlgorithm.RSAES_OAEP_SHA_1, WrappingAlgorithm.RSA_AES_KEY_WRAP_SHA_1)
NAME = MaterialName.key_version(KEY_ID, 1)


@pytest.fixture(scope="module")
def wrapping(keystore: Pkcs11Keystore) -> Iterator[tuple[WrappingKeyRef, rsa.RSAPublicKey]]:
    import datetime as dt

    ref, der = keystore.create_wrapping_key(
        WrappingKeySpec.RSA_2048, wrapping_key_name(KEY_ID, dt.date(2030, 1, 1))
    )
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    yield ref, public
    keystore.destroy_wrapping_key(ref)


def wrap(public: rsa.RSAPublicKey, algorithm: WrappingAlgorithm, material: bytes) -> bytes:
    digest: hashes.HashAlgorithm = (
        hashes.SHA1() if algorithm.hash_name == "sha1" else hashes.SHA256()  # noqa: S303
    )
    oaep = padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
    if not algorithm.two_step:
        return public.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, oaep) + keywrap.aes_key_wrap_with_padding(ephemeral, material)


def project_objects(keystore: Pkcs11Keystore) -> set[str]:
    return {o.object_id for o in keystore.list_objects()}


# -- the pure parts ---------------------------------------------------------------------------


def test_wrapping_key_references_round_trip_and_refuse_garbage() -> None:
    ref = WrappingKeyRef(WrappingKeySpec.RSA_3072, "00ff", "cks-1")
    assert WrappingKeyRef.from_str(ref.to_str()) == ref
    assert ref.to_str() == "wrap1:cks-1:RSA_3072:00ff"
    for bad in ("wrap1:default:RSA_2048:0g", "wrap2:default:RSA_2048:00", "wrap1::RSA_2048:00",
                "wrap1:default:RSA_1024:00", "wrap1:default:RSA_2048:"):  # fmt: skip
        with pytest.raises(ValueError):  # noqa: PT011
            WrappingKeyRef.from_str(bad)


def test_wrapping_key_names_carry_their_day() -> None:
    import datetime as dt

    name = wrapping_key_name(KEY_ID, dt.date(2026, 12, 31))
    assert not name.per_role
    label = name.base
    assert label == "hsmkms:import:0123abcd00004000:20261231"
    assert len(label.encode()) <= 40  # the YubiHSM 2 label limit
    assert wrapping_key_end(label) == dt.date(2026, 12, 31)
    assert wrapping_key_end("hsmkms:import:0123abcd00004000:20261331") is None
    assert wrapping_key_end("hsmkms:0123abcd00004000:1:a") is None


@given(st.integers(min_value=1, max_value=4096))
def test_kwp_length_matches_rfc_5649(length: int) -> None:
    key = b"\x01" * 32
    assert kwp_length(length) == len(keywrap.aes_key_wrap_with_padding(key, b"\x00" * length))


def test_material_formats() -> None:
    assert material_format(KeyMaterialSpec.SYMMETRIC_DEFAULT).length == 32
    assert material_format(KeyMaterialSpec.HMAC_224).length == 28
    assert material_format(KeyMaterialSpec.HMAC_512).length == 64
    assert material_format(KeyMaterialSpec.RSA_2048).oaep_allowed is False
    assert material_format(KeyMaterialSpec.ECC_NIST_P256).oaep_allowed is True
    assert WrappingAlgorithm.RSAES_OAEP_SHA_256.max_oaep_message(WrappingKeySpec.RSA_2048) == 190
    assert WrappingAlgorithm.RSAES_OAEP_SHA_1.max_oaep_message(WrappingKeySpec.RSA_4096) == 470


# -- the token ---------------------------------------------------------------------------------


def test_the_token_unwraps_oaep_with_sha_1_only(keystore: Pkcs11Keystore) -> None:
    """Measured on SoftHSM 2.6.1 (probed with a real unwrap, as the docs table says)."""
    assert keystore.capabilities().wrapping_algorithms == frozenset(SHA1)


@pytest.mark.parametrize("algorithm", list(WrappingAlgorithm))
def test_symmetric_material(
    keystore: Pkcs11Keystore,
    wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey],
    algorithm: WrappingAlgorithm,
) -> None:
    ref, public = wrapping
    material = os.urandom(32)
    before = project_objects(keystore)
    if algorithm not in SHA1:
        with pytest.raises(UnsupportedByToken):
            keystore.import_material(
                KeyMaterialSpec.SYMMETRIC_DEFAULT, NAME, ref, algorithm,
                wrap(public, algorithm, material),
            )  # fmt: skip
        assert project_objects(keystore) == before
        return
    imported = keystore.import_material(
        KeyMaterialSpec.SYMMETRIC_DEFAULT, NAME, ref, algorithm, wrap(public, algorithm, material)
    )
    try:
        expected = Cipher(algorithms.AES(material), modes.ECB()).encryptor()  # noqa: S305
        assert imported.check_value == expected.update(b"hsmkms-kcv-v1\x00\x00\x00")
        assert imported.ref.profile is not None
        assert imported.ref.profile.value == "AES_256_GCM"
        iv, body = keystore.encrypt(imported.ref, b"data", b"aad")
        assert keystore.decrypt(imported.ref, iv, body, b"aad") == b"data"
        assert imported.check_value.hex() not in repr(imported)
    finally:
        keystore.destroy(imported.ref)


@pytest.mark.parametrize(
    ("spec", "digest"),
    [(KeyMaterialSpec.HMAC_224, "sha224"), (KeyMaterialSpec.HMAC_256, "sha256"),
     (KeyMaterialSpec.HMAC_384, "sha384"), (KeyMaterialSpec.HMAC_512, "sha512")],
)  # fmt: skip
@pytest.mark.parametrize("algorithm", SHA1)
def test_hmac_material(
    keystore: Pkcs11Keystore,
    wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey],
    spec: KeyMaterialSpec,
    digest: str,
    algorithm: WrappingAlgorithm,
) -> None:
    ref, public = wrapping
    material = os.urandom(spec.facts.key_bits // 8)
    imported = keystore.import_material(
        spec, NAME, ref, algorithm, wrap(public, algorithm, material)
    )
    try:
        assert imported.check_value == hmac.new(material, b"hsmkms-kcv-v1", digest).digest()
        assert keystore.mac(imported.ref, b"m") == hmac.new(material, b"m", digest).digest()
        assert keystore.verify_mac(imported.ref, b"m", hmac.new(material, b"m", digest).digest())
    finally:
        keystore.destroy(imported.ref)


@pytest.mark.parametrize("algorithm", SHA1)
@pytest.mark.parametrize(
    ("spec", "length"),
    [(KeyMaterialSpec.SYMMETRIC_DEFAULT, 16), (KeyMaterialSpec.SYMMETRIC_DEFAULT, 24),
     (KeyMaterialSpec.SYMMETRIC_DEFAULT, 31), (KeyMaterialSpec.SYMMETRIC_DEFAULT, 33),
     (KeyMaterialSpec.HMAC_224, 27), (KeyMaterialSpec.HMAC_256, 31),
     (KeyMaterialSpec.HMAC_384, 40), (KeyMaterialSpec.HMAC_512, 63)],
)  # fmt: skip
def test_material_of_the_wrong_length_is_refused_and_leaves_nothing(
    keystore: Pkcs11Keystore,
    wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey],
    algorithm: WrappingAlgorithm,
    spec: KeyMaterialSpec,
    length: int,
) -> None:
    ref, public = wrapping
    before = project_objects(keystore)
    # With AES key wrap the blob's length already tells (DecryptionFailed); with OAEP the token
    # finds out (MaterialRejected). The service answers both with InvalidCiphertextException.
    with pytest.raises((MaterialRejected, DecryptionFailed)):
        keystore.import_material(
            spec, NAME, ref, algorithm, wrap(public, algorithm, os.urandom(length))
        )
    assert project_objects(keystore) == before


@pytest.mark.parametrize("algorithm", SHA1)
def test_tampered_wrapping_fails_decryption(
    keystore: Pkcs11Keystore,
    wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey],
    algorithm: WrappingAlgorithm,
) -> None:
    ref, public = wrapping
    before = project_objects(keystore)
    for position in (0, 128, 255, -1):
        wrapped = bytearray(wrap(public, algorithm, os.urandom(32)))
        wrapped[position] ^= 0x40
        with pytest.raises(DecryptionFailed):
            keystore.import_material(
                KeyMaterialSpec.SYMMETRIC_DEFAULT, NAME, ref, algorithm, bytes(wrapped)
            )
    assert project_objects(keystore) == before


def test_a_wrapping_key_only_unwraps(
    keystore: Pkcs11Keystore, wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey]
) -> None:
    ref, _ = wrapping
    names = ["UNWRAP", "DECRYPT", "SIGN", "DERIVE", "SENSITIVE", "EXTRACTABLE", "TOKEN"]
    assert keystore.attributes(ref.object_id, names) == {
        "UNWRAP": True, "DECRYPT": False, "SIGN": False, "DERIVE": False, "SENSITIVE": True,
        "EXTRACTABLE": False, "TOKEN": True,
    }  # fmt: skip
    with pytest.raises(TokenRejected):
        keystore.attributes(ref.object_id, ["PRIVATE_EXPONENT"])


def test_a_destroyed_wrapping_key_no_longer_unwraps(keystore: Pkcs11Keystore) -> None:
    import datetime as dt

    from hsmkms.keystore.errors import KeyMaterialMissing

    ref, der = keystore.create_wrapping_key(
        WrappingKeySpec.RSA_2048, wrapping_key_name(KEY_ID, dt.date(2030, 1, 1))
    )
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    keystore.destroy_wrapping_key(ref)
    keystore.destroy_wrapping_key(ref)  # already gone: not an error
    algorithm = WrappingAlgorithm.RSAES_OAEP_SHA_1
    with pytest.raises(KeyMaterialMissing):
        keystore.import_material(
            KeyMaterialSpec.SYMMETRIC_DEFAULT, NAME, ref, algorithm,
            wrap(public, algorithm, os.urandom(32)),
        )  # fmt: skip


# -- key pairs (PKCS#8) ------------------------------------------------------------------------


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("algorithm", SHA1)
@pytest.mark.parametrize("usage", [MaterialUsage.SIGN_VERIFY, MaterialUsage.KEY_AGREEMENT])
def test_ec_key_pair(
    keystore: Pkcs11Keystore,
    wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey],
    algorithm: WrappingAlgorithm,
    usage: MaterialUsage,
) -> None:
    ref, public = wrapping
    private = ec.generate_private_key(ec.SECP256R1())
    imported = keystore.import_material(
        KeyMaterialSpec.ECC_NIST_P256, NAME, ref, algorithm,
        wrap(public, algorithm, _pkcs8(private)), usage=usage,
    )  # fmt: skip
    try:
        # The public key was rebuilt inside the token (ECDH with the generator, then the sign
        # of y from a signature): it is the caller's.
        assert keystore.public_key(imported.ref) == _spki(private)
        assert imported.check_value == hashlib.sha256(_spki(private)).digest()
        (object_id,) = imported.ref.object_ids
        names = ["SIGN", "DERIVE", "DECRYPT", "UNWRAP", "SENSITIVE", "EXTRACTABLE", "LOCAL"]
        attributes = keystore.attributes(object_id, names)
        assert attributes == {
            "SIGN": usage is MaterialUsage.SIGN_VERIFY,
            "DERIVE": usage is MaterialUsage.KEY_AGREEMENT,
            "DECRYPT": False, "UNWRAP": False, "SENSITIVE": True, "EXTRACTABLE": False,
            "LOCAL": False,
        }  # fmt: skip
        if usage is MaterialUsage.SIGN_VERIFY:
            digest = hashlib.sha256(b"signed in the token").digest()
            signature = keystore.sign(imported.ref, digest, SigningAlgorithm.ECDSA_SHA_256)
            private.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        else:
            peer = ec.generate_private_key(ec.SECP256R1())
            shared = keystore.derive_shared_secret(imported.ref, _spki(peer))
            assert shared == peer.exchange(ec.ECDH(), private.public_key())
    finally:
        keystore.destroy(imported.ref)


def test_rsa_key_pair_needs_aes_key_wrap(
    keystore: Pkcs11Keystore, wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey]
) -> None:
    ref, public = wrapping
    private = rsa.generate_private_key(65537, 2048)
    algorithm = WrappingAlgorithm.RSA_AES_KEY_WRAP_SHA_1
    imported = keystore.import_material(
        KeyMaterialSpec.RSA_2048, NAME, ref, algorithm, wrap(public, algorithm, _pkcs8(private))
    )
    try:
        assert keystore.public_key(imported.ref) == _spki(private)
        digest = hashlib.sha256(b"m").digest()
        signature = keystore.sign(imported.ref, digest, SigningAlgorithm.RSASSA_PSS_SHA_256)
        private.public_key().verify(
            signature,
            digest,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            Prehashed(hashes.SHA256()),
        )
    finally:
        keystore.destroy(imported.ref)
    with pytest.raises(MaterialRejected):  # spec: an RSA private key needs RSA_AES_KEY_WRAP
        keystore.import_material(
            KeyMaterialSpec.RSA_2048, NAME, ref, WrappingAlgorithm.RSAES_OAEP_SHA_1, b"x" * 256
        )


@pytest.mark.parametrize(
    ("spec", "make"),
    [
        (KeyMaterialSpec.ECC_NIST_P256, lambda: ec.generate_private_key(ec.SECP384R1())),
        (KeyMaterialSpec.ECC_NIST_P256, lambda: rsa.generate_private_key(65537, 2048)),
        (KeyMaterialSpec.RSA_2048, lambda: ec.generate_private_key(ec.SECP256R1())),
        (KeyMaterialSpec.RSA_2048, lambda: rsa.generate_private_key(65537, 3072)),
    ],
)
def test_a_private_key_of_another_spec_is_refused(
    keystore: Pkcs11Keystore,
    wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey],
    spec: KeyMaterialSpec,
    make: object,
) -> None:
    ref, public = wrapping
    algorithm = WrappingAlgorithm.RSA_AES_KEY_WRAP_SHA_1
    private = make()  # type: ignore[operator]
    before = project_objects(keystore)
    with pytest.raises(MaterialRejected):
        keystore.import_material(
            spec, NAME, ref, algorithm, wrap(public, algorithm, _pkcs8(private))
        )
    assert project_objects(keystore) == before


@settings(max_examples=25, deadline=None)
@given(blob=st.binary(min_size=1, max_size=300))
def test_garbage_pkcs8_is_refused_and_leaves_nothing(
    keystore: Pkcs11Keystore, wrapping: tuple[WrappingKeyRef, rsa.RSAPublicKey], blob: bytes
) -> None:
    ref, public = wrapping
    algorithm = WrappingAlgorithm.RSA_AES_KEY_WRAP_SHA_1
    before = project_objects(keystore)
    with pytest.raises((MaterialRejected, DecryptionFailed)):
        keystore.import_material(
            KeyMaterialSpec.ECC_NIST_P256, NAME, ref, algorithm, wrap(public, algorithm, blob)
        )
    assert project_objects(keystore) == before
