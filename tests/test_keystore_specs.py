"""The PKCS#11 backend per key spec, against real SoftHSM2 tokens: HMAC material, key pairs
(RSA and EC: sign and verify, public key export, key agreement), capabilities probed with real
operations, the timing hook, and material used for an operation it does not take.

Signatures, public keys and shared secrets are checked against an independent implementation
(pyca/cryptography)."""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from conftest import SCRATCH_LABEL, new_key_version, new_mac_key, token_config
from hsmkms.keystore import pkcs11 as pkcs11_keystore
from hsmkms.keystore.base import LABEL_PREFIX, KeyMaterialRef, MaterialName
from hsmkms.keystore.errors import (
    DecryptionFailed,
    IncompatibleMaterial,
    KeyMaterialMissing,
    TokenRejected,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.pkcs11_mechanisms import RsaMaterial
from hsmkms.keystore.specs import KeyMaterialSpec, MaterialUsage, SigningAlgorithm
from hsmkms.profiles import MechanismProfile

pytestmark = pytest.mark.hsm

HMACS = [
    KeyMaterialSpec.HMAC_224,
    KeyMaterialSpec.HMAC_256,
    KeyMaterialSpec.HMAC_384,
    KeyMaterialSpec.HMAC_512,
]
RSA_ALGORITHMS = [a for a in SigningAlgorithm if a.value.startswith("RSASSA")]
HARDENED = {
    "TOKEN": True,
    "PRIVATE": True,
    "SENSITIVE": True,
    "EXTRACTABLE": False,
    "NEVER_EXTRACTABLE": True,
    "MODIFIABLE": False,
}


def _create(
    ks: Pkcs11Keystore, spec: KeyMaterialSpec, usage: MaterialUsage | None = None
) -> KeyMaterialRef:
    return ks.create(spec, MaterialName.key_version(str(uuid.uuid4()), 1), usage=usage)


def _digest(algorithm: SigningAlgorithm, message: bytes) -> bytes:
    return hashlib.new(algorithm.facts.hash_name, message).digest()


def _hash(algorithm: SigningAlgorithm) -> hashes.HashAlgorithm:
    return {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}[
        algorithm.facts.hash_name
    ]


# -- HMAC -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", HMACS, ids=lambda s: s.value)
def test_hmac_material_is_one_hardened_sign_verify_secret(
    keystore: Pkcs11Keystore, spec: KeyMaterialSpec
) -> None:
    ref = _create(keystore, spec)
    assert (ref.spec, ref.profile, len(ref.object_ids)) == (spec, None, 1)
    assert ref.to_str().startswith(f"v2:default:{spec.value}:-:")
    caps = ["SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "DERIVE"]
    attrs = keystore.attributes(ref.object_ids[0], [*HARDENED, *caps, "VALUE_LEN", "KEY_TYPE"])
    assert {k: attrs[k] for k in HARDENED} == HARDENED
    assert [c for c in caps if attrs[c]] == ["SIGN", "VERIFY"]
    assert attrs["VALUE_LEN"] == spec.facts.key_bits // 8
    assert attrs["KEY_TYPE"] == KeyType.GENERIC_SECRET
    with pytest.raises(TokenRejected):
        keystore.attributes(ref.object_ids[0], ["VALUE"])
    tag = keystore.mac(ref, b"message")
    assert len(tag) == spec.facts.mac_length
    assert keystore.verify_mac(ref, b"message", tag)
    assert not keystore.verify_mac(ref, b"message!", tag)
    assert not keystore.verify_mac(ref, b"message", tag[:-1] + bytes([tag[-1] ^ 1]))
    assert not keystore.verify_mac(ref, b"message", tag + b"\x00")
    keystore.destroy(ref)


@pytest.mark.parametrize("spec", HMACS, ids=lambda s: s.value)
def test_hmac_matches_reference_hmac(keystore: Pkcs11Keystore, spec: KeyMaterialSpec) -> None:
    """A known key imported for this test only (production keys are generated in the token)."""
    value = os.urandom(spec.facts.key_bits // 8)
    object_id = os.urandom(16)
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE: value,
        Attribute.ID: object_id,
        Attribute.LABEL: f"{LABEL_PREFIX}kat",
        Attribute.TOKEN: False,
        Attribute.SIGN: True,
        Attribute.VERIFY: True,
    }
    keystore._call("importing a test key", lambda conn: conn.session.create_object(template))
    ref = KeyMaterialRef(spec, None, (object_id.hex(),))
    hash_name = f"sha{spec.facts.key_bits}"
    assert (
        keystore.mac(ref, b"known answer") == hmac.new(value, b"known answer", hash_name).digest()
    )


# -- key pairs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_ref(keystore: Pkcs11Keystore) -> Iterator[KeyMaterialRef]:
    ref = _create(keystore, KeyMaterialSpec.RSA_2048)
    yield ref
    keystore.destroy(ref)


@pytest.fixture(scope="module")
def ec_ref(keystore: Pkcs11Keystore) -> Iterator[KeyMaterialRef]:
    ref = _create(keystore, KeyMaterialSpec.ECC_NIST_P256)
    yield ref
    keystore.destroy(ref)


@pytest.fixture(scope="module")
def ecdh_ref(keystore: Pkcs11Keystore) -> Iterator[KeyMaterialRef]:
    ref = _create(keystore, KeyMaterialSpec.ECC_NIST_P256, MaterialUsage.KEY_AGREEMENT)
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
    ("fixture", "private_caps", "public_caps"),
    [
        ("rsa_ref", ["SIGN"], ["VERIFY"]),
        ("ec_ref", ["SIGN"], ["VERIFY"]),
        ("ecdh_ref", ["DERIVE"], []),
    ],
)
def test_key_pairs_are_hardened_with_only_the_capabilities_of_their_usage(
    request: pytest.FixtureRequest,
    keystore: Pkcs11Keystore,
    fixture: str,
    private_caps: list[str],
    public_caps: list[str],
) -> None:
    ref: KeyMaterialRef = request.getfixturevalue(fixture)
    (object_id,) = ref.object_ids
    private = keystore.attributes(object_id, [*HARDENED, "CLASS", "LABEL"])
    assert {k: private[k] for k in HARDENED} == HARDENED
    assert private["CLASS"] == ObjectClass.PRIVATE_KEY
    assert private["LABEL"].endswith(":1:k")
    assert _capabilities(keystore, ref, public=False) == private_caps
    public = keystore.attributes(object_id, ["TOKEN", "MODIFIABLE", "CLASS"], public=True)
    assert public == {"TOKEN": True, "MODIFIABLE": False, "CLASS": ObjectClass.PUBLIC_KEY}
    assert _capabilities(keystore, ref, public=True) == public_caps
    for secret in ("VALUE", "PRIVATE_EXPONENT") if ref.spec.value.startswith("RSA") else ("VALUE",):
        with pytest.raises(TokenRejected):
            keystore.attributes(object_id, [secret])
    listed = [o for o in keystore.list_objects() if o.object_id == object_id]
    assert sorted(o.object_class for o in listed) == ["PRIVATE_KEY", "PUBLIC_KEY"]
    assert all(o.is_key_version for o in listed)


@pytest.mark.parametrize("algorithm", RSA_ALGORITHMS, ids=lambda a: a.value)
def test_rsa_signatures_verify_with_the_exported_public_key(
    keystore: Pkcs11Keystore, rsa_ref: KeyMaterialRef, algorithm: SigningAlgorithm
) -> None:
    public = serialization.load_der_public_key(keystore.public_key(rsa_ref))
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    digest = _digest(algorithm, b"sign me")
    signature = keystore.sign(rsa_ref, digest, algorithm)
    assert len(signature) == 256
    hash_ = _hash(algorithm)
    pad: padding.AsymmetricPadding = (
        padding.PSS(padding.MGF1(hash_), algorithm.facts.digest_length)
        if "PSS" in algorithm.value
        else padding.PKCS1v15()
    )
    public.verify(signature, b"sign me", pad, hash_)  # raises when wrong
    assert keystore.verify(rsa_ref, digest, signature, algorithm)
    assert not keystore.verify(rsa_ref, _digest(algorithm, b"other"), signature, algorithm)
    flipped = signature[:-1] + bytes([signature[-1] ^ 1])  # (a zero byte could be the last one)
    assert not keystore.verify(rsa_ref, digest, flipped, algorithm)
    assert not keystore.verify(rsa_ref, digest, signature[:-1], algorithm)


def test_ecdsa_signatures_are_der_and_verify_both_ways(
    keystore: Pkcs11Keystore, ec_ref: KeyMaterialRef
) -> None:
    algorithm = SigningAlgorithm.ECDSA_SHA_256
    public = serialization.load_der_public_key(keystore.public_key(ec_ref))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    digest = _digest(algorithm, b"sign me")
    signature = keystore.sign(ec_ref, digest, algorithm)
    public.verify(signature, b"sign me", ec.ECDSA(hashes.SHA256()))
    assert keystore.verify(ec_ref, digest, signature, algorithm)
    assert not keystore.verify(ec_ref, _digest(algorithm, b"other"), signature, algorithm)
    assert not keystore.verify(ec_ref, digest, b"not DER", algorithm)
    assert not keystore.verify(ec_ref, digest, signature[:-1], algorithm)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidSignature):
        other.public_key().verify(signature, b"sign me", ec.ECDSA(hashes.SHA256()))
    assert not keystore.verify(
        ec_ref, digest, other.sign(b"sign me", ec.ECDSA(hashes.SHA256())), algorithm
    )


def test_signing_checks_the_algorithm_and_digest_first(
    keystore: Pkcs11Keystore, rsa_ref: KeyMaterialRef, ec_ref: KeyMaterialRef
) -> None:
    with pytest.raises(IncompatibleMaterial):
        keystore.sign(rsa_ref, bytes(32), SigningAlgorithm.ECDSA_SHA_256)
    with pytest.raises(IncompatibleMaterial):
        keystore.sign(ec_ref, bytes(32), SigningAlgorithm.RSASSA_PSS_SHA_256)
    with pytest.raises(TokenRejected, match="32-byte digest"):
        keystore.sign(ec_ref, bytes(31), SigningAlgorithm.ECDSA_SHA_256)


def test_ecdh_matches_reference_key_agreement(
    keystore: Pkcs11Keystore, ecdh_ref: KeyMaterialRef
) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ours = serialization.load_der_public_key(keystore.public_key(ecdh_ref))
    assert isinstance(ours, ec.EllipticCurvePublicKey)
    secret = keystore.derive_shared_secret(ecdh_ref, peer_der)
    assert secret == peer.exchange(ec.ECDH(), ours)
    assert len(secret) == 32


def test_key_agreement_refuses_other_curves_and_garbage(
    keystore: Pkcs11Keystore, ecdh_ref: KeyMaterialRef, ec_ref: KeyMaterialRef
) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = p384.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(TokenRejected, match="not on secp256r1"):
        keystore.derive_shared_secret(ecdh_ref, der)
    with pytest.raises(TokenRejected, match="not a DER"):
        keystore.derive_shared_secret(ecdh_ref, b"garbage")
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    peer_der = peer.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # A signing key pair has CKA_DERIVE false, a key agreement key pair CKA_SIGN false.
    with pytest.raises(IncompatibleMaterial, match="does not permit derive"):
        keystore.derive_shared_secret(ec_ref, peer_der)
    with pytest.raises(IncompatibleMaterial, match="does not permit sign"):
        keystore.sign(ecdh_ref, bytes(32), SigningAlgorithm.ECDSA_SHA_256)
    with pytest.raises(IncompatibleMaterial, match="does not permit verify"):
        keystore.verify(ecdh_ref, bytes(32), bytes(64), SigningAlgorithm.ECDSA_SHA_256)


def test_key_pairs_are_found_again_after_the_handle_cache_is_emptied(
    keystore: Pkcs11Keystore, ec_ref: KeyMaterialRef
) -> None:
    """As in another process, which did not create them: looked up by id and class."""
    conn = keystore._connection()
    conn.handles.clear()
    conn.public.clear()
    algorithm = SigningAlgorithm.ECDSA_SHA_256
    digest = _digest(algorithm, b"again")
    assert keystore.verify(ec_ref, digest, keystore.sign(ec_ref, digest, algorithm), algorithm)
    assert keystore.public_key(ec_ref)


def test_destroying_a_key_pair_removes_both_halves(keystore: Pkcs11Keystore) -> None:
    ref = _create(keystore, KeyMaterialSpec.ECC_NIST_P256)
    assert keystore.exists(ref)
    keystore.destroy(ref)
    assert not keystore.exists(ref)
    assert ref.object_ids[0] not in {o.object_id for o in keystore.list_objects()}
    with pytest.raises(KeyMaterialMissing):
        keystore.public_key(ref)
    keystore.destroy(ref)


# -- material used for what it does not take ------------------------------------------------


def test_operations_refuse_material_of_another_spec(
    keystore: Pkcs11Keystore, ec_ref: KeyMaterialRef
) -> None:
    mac = new_mac_key(keystore, f"test-{uuid.uuid4().hex[:8]}")
    aes = new_key_version(keystore, str(uuid.uuid4()))
    with pytest.raises(IncompatibleMaterial, match="HMAC_256 material does not encrypt"):
        keystore.encrypt(mac, b"x", b"")
    with pytest.raises(IncompatibleMaterial):
        keystore.decrypt(ec_ref, bytes(12), bytes(16), b"")
    with pytest.raises(IncompatibleMaterial, match="does not compute MACs"):
        keystore.mac(aes, b"x")
    with pytest.raises(IncompatibleMaterial):
        keystore.verify_mac(ec_ref, b"x", bytes(32))
    with pytest.raises(IncompatibleMaterial, match="not a key pair"):
        keystore.sign(mac, bytes(32), SigningAlgorithm.ECDSA_SHA_256)
    with pytest.raises(IncompatibleMaterial, match="not a key pair"):
        keystore.public_key(aes)
    with pytest.raises(IncompatibleMaterial, match="not a key pair"):
        keystore.derive_shared_secret(aes, b"")
    name = MaterialName.key_version(str(uuid.uuid4()), 1)
    with pytest.raises(IncompatibleMaterial, match="has no mechanism profile"):
        keystore.create(KeyMaterialSpec.HMAC_256, name, profile=MechanismProfile.AES_256_GCM)
    with pytest.raises(IncompatibleMaterial, match="not for KEY_AGREEMENT"):
        keystore.create(KeyMaterialSpec.RSA_2048, name, usage=MaterialUsage.KEY_AGREEMENT)
    portable = MaterialName.service_key("two-objects")
    with pytest.raises(IncompatibleMaterial, match="not one object"):
        keystore.create(
            KeyMaterialSpec.SYMMETRIC_DEFAULT,
            portable,
            profile=MechanismProfile.AES_256_CBC_HMAC_SHA_256,
        )


def test_symmetric_material_of_either_profile_on_one_token(keystore: Pkcs11Keystore) -> None:
    """The default profile is only the default: material names its own."""
    name = MaterialName.key_version(str(uuid.uuid4()), 1)
    ref = keystore.create(
        KeyMaterialSpec.SYMMETRIC_DEFAULT, name, profile=MechanismProfile.AES_256_CBC_HMAC_SHA_256
    )
    assert len(ref.object_ids) == 2
    iv, body = keystore.encrypt(ref, b"portable here", b"aad")
    assert keystore.decrypt(ref, iv, body, b"aad") == b"portable here"
    with pytest.raises(DecryptionFailed):
        keystore.decrypt(ref, iv, body, b"other aad")


# -- capabilities ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["keystore", "portable_keystore"])
def test_softhsm_hosts_every_spec_probed_with_real_operations(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    ks: Pkcs11Keystore = request.getfixturevalue(fixture)
    found = ks.capabilities()
    # SoftHSM 2.6.1 has no post-quantum mechanism, and ignores CKM_EDDSA's prehash flag.
    post_quantum = {s for s in KeyMaterialSpec if s.value.startswith("ML_")}
    assert found.specs == frozenset(KeyMaterialSpec) - post_quantum
    assert found.unsupported_algorithms == {SigningAlgorithm.ED25519_PH_SHA_512}
    for size in (2048, 3072, 4096):
        assert found.usages[KeyMaterialSpec(f"RSA_{size}")] == {
            MaterialUsage.SIGN_VERIFY, MaterialUsage.ENCRYPT_DECRYPT,
        }  # fmt: skip
    for curve in ("P256", "P384", "P521"):
        assert found.usages[KeyMaterialSpec(f"ECC_NIST_{curve}")] == {
            MaterialUsage.SIGN_VERIFY, MaterialUsage.KEY_AGREEMENT,
        }  # fmt: skip
    assert found.usages[KeyMaterialSpec.ECC_SECG_P256K1] == {MaterialUsage.SIGN_VERIFY}
    assert found.usages[KeyMaterialSpec.ECC_NIST_EDWARDS25519] == {MaterialUsage.SIGN_VERIFY}
    assert found.profiles == (
        MechanismProfile.AES_256_GCM,
        MechanismProfile.AES_256_CBC_HMAC_SHA_256,
    )
    assert found.usages[KeyMaterialSpec.ECC_NIST_P256] == {
        MaterialUsage.SIGN_VERIFY,
        MaterialUsage.KEY_AGREEMENT,
    }
    assert found.hosts(KeyMaterialSpec.HMAC_384, MaterialUsage.GENERATE_VERIFY_MAC)
    assert not found.hosts(KeyMaterialSpec.RSA_2048, MaterialUsage.KEY_AGREEMENT)
    assert found.unverified == frozenset()
    assert ks.capabilities() is found  # probed once


def _rsa_generations(
    softhsm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Pkcs11Keystore, list[int]]:
    """A fresh keystore (capabilities not probed yet), and the RSA sizes it generates."""
    sizes: list[int] = []
    generate = RsaMaterial._generate_pair

    def counted(self: RsaMaterial, session: Any, **kwargs: Any) -> tuple[Any, Any]:
        sizes.append(self.facts.key_bits)
        return generate(self, session, **kwargs)

    monkeypatch.setattr(RsaMaterial, "_generate_pair", counted)
    return Pkcs11Keystore(token_config(softhsm_dir, SCRATCH_LABEL)), sizes


def _rsa_usages(ks: Pkcs11Keystore) -> dict[int, frozenset[MaterialUsage]]:
    found = ks.capabilities()
    return {size: found.usages[KeyMaterialSpec(f"RSA_{size}")] for size in (2048, 3072, 4096)}


BOTH = frozenset({MaterialUsage.SIGN_VERIFY, MaterialUsage.ENCRYPT_DECRYPT})


def test_larger_rsa_sizes_are_hosted_from_the_key_size_range_once_rsa_2048_passed(
    softhsm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only RSA_2048 pairs are generated (one per usage); SoftHSM2 says 512-16384 bits for
    CKM_RSA_PKCS_KEY_PAIR_GEN, so RSA_3072 and RSA_4096 are hosted without seconds of
    generation each."""
    ks, sizes = _rsa_generations(softhsm_dir, monkeypatch)
    try:
        assert _rsa_usages(ks) == {2048: BOTH, 3072: BOTH, 4096: BOTH}
        assert sorted(sizes) == [2048, 2048]
    finally:
        ks.close()


@pytest.mark.slow
def test_a_token_that_gives_no_key_size_range_has_every_rsa_size_probed_for_real(
    softhsm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks, sizes = _rsa_generations(softhsm_dir, monkeypatch)
    monkeypatch.setattr(pkcs11_keystore, "_key_sizes", lambda conn, mechanism: None)
    try:
        assert _rsa_usages(ks) == {2048: BOTH, 3072: BOTH, 4096: BOTH}
        assert sorted(sizes) == [2048, 2048, 3072, 3072, 4096, 4096]
    finally:
        ks.close()


def test_probes_leave_no_object_behind(softhsm_dir: Path) -> None:
    ks = Pkcs11Keystore(token_config(softhsm_dir, SCRATCH_LABEL))
    try:

        def every_object(conn: Any) -> int:
            return len(list(conn.session.get_objects()))

        before = ks._call("counting", every_object)
        ks.capabilities()
        ks.self_test()
        assert ks._call("counting", every_object) == before
    finally:
        ks.close()


# -- the timing hook ------------------------------------------------------------------------


def test_the_observer_times_every_operation_by_name(softhsm_dir: Path) -> None:
    calls: list[tuple[str, float]] = []
    ks = Pkcs11Keystore(
        token_config(softhsm_dir, SCRATCH_LABEL), observer=lambda op, s: calls.append((op, s))
    )
    try:
        ref = new_key_version(ks, str(uuid.uuid4()))
        iv, body = ks.encrypt(ref, b"x", b"")
        ks.decrypt(ref, iv, body, b"")
        with pytest.raises(DecryptionFailed):  # failures are timed too
            ks.decrypt(ref, iv, body, b"other")
        ks.random(4)
        mac = new_mac_key(ks, f"test-{uuid.uuid4().hex[:8]}")
        ks.verify_mac(mac, b"x", ks.mac(mac, b"x"))
        pair = _create(ks, KeyMaterialSpec.ECC_NIST_P256)
        digest = bytes(32)
        ks.verify(pair, digest, ks.sign(pair, digest, SigningAlgorithm.ECDSA_SHA_256),
                  SigningAlgorithm.ECDSA_SHA_256)  # fmt: skip
        ks.public_key(pair)
        ks.exists(ref)
        ks.list_objects()
        ks.info()
        ks.self_test()
        for made in (ref, mac, pair):
            ks.destroy(made)
    finally:
        ks.close()
    names = [name for name, _ in calls]
    assert names == [
        "create_key", "encrypt", "decrypt", "decrypt", "random", "create_mac_key", "mac",
        "verify_mac", "create_key", "sign", "verify", "public_key", "exists", "list_objects",
        "info", "self_test", "destroy", "destroy", "destroy",
    ]  # fmt: skip
    assert all(seconds >= 0 for _, seconds in calls)
