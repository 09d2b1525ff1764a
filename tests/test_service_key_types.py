"""KmsService with every key type a PKCS#11 token can hold (issue 18), in-process on a real
SoftHSM2 token and a real SQLite file: CreateKey's validation and DescribeKey's fields per spec,
Sign/Verify, GetPublicKey, GenerateMac/VerifyMac, RSA Encrypt/Decrypt/ReEncrypt,
DeriveSharedSecret, data key pairs, GetKeyLastUsage, the refusals (rotation, multi-Region,
ML-KEM), condition keys and grants. End to end through boto3: tests/test_api_key_types.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from hsmkms import models as m
from hsmkms.errors import (
    AccessDeniedException,
    DisabledException,
    DryRunOperationException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSError,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.models.enums import KeySpec, KeyUsage
from hsmkms.service import KmsService
from hsmkms.service.key_types import KEY_TYPES
from hsmkms.service.last_usage import KeyUse
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore
from hsmkms.types import Caller

pytestmark = pytest.mark.hsm

REGION = "us-east-2"
ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
BOB = f"arn:aws:iam::{ACCOUNT}:user/bob"
T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
ASYMMETRIC_CONTEXT = (
    "EncryptionContext is not supported when encrypting/decrypting with asymmetric CMKs."
)


class History:
    """A KeyUsageHistory in memory (the server's reads the audit trail)."""

    def __init__(self) -> None:
        self.start: dt.datetime | None = None
        self.uses: dict[str, KeyUse] = {}
        self.asked: list[Collection[str]] = []

    def tracking_start(self) -> dt.datetime | None:
        return self.start

    def last_use(self, key_id: str, operations: Collection[str]) -> KeyUse | None:
        self.asked.append(operations)
        return self.uses.get(key_id)


@pytest.fixture
def history() -> History:
    return History()


@pytest.fixture
def service(keystore: Pkcs11Keystore, tmp_path: Path, history: History) -> Iterator[KmsService]:
    clock = ManualClock(T0)
    store = MetadataStore.open_sqlite(tmp_path / "kms.db", clock=clock)
    svc = KmsService(
        keystore, store, region=REGION, account_id=ACCOUNT, clock=clock, usage_history=history
    )
    yield svc
    store.close()


def new(service: KmsService, spec: str, usage: str | None = None, **kwargs: Any) -> m.KeyMetadata:
    caller = kwargs.pop("caller", None)
    request = m.CreateKeyRequest(KeySpec=spec, KeyUsage=usage, **kwargs)
    return service.create_key(request, caller=caller).KeyMetadata


def raises(error: type[KMSError], fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    return info.value.message


def public_key(service: KmsService, key_id: str) -> Any:
    return serialization.load_der_public_key(
        service.get_public_key(m.GetPublicKeyRequest(KeyId=key_id)).PublicKey
    )


def sign(service: KmsService, key_id: str, message: bytes, algorithm: str, **kw: Any) -> bytes:
    request = m.SignRequest(KeyId=key_id, Message=message, SigningAlgorithm=algorithm, **kw)
    return service.sign(request, caller=kw.get("caller")).Signature


def verify(service: KmsService, key_id: str, message: bytes, signature: bytes, alg: str) -> bool:
    request = m.VerifyRequest(
        KeyId=key_id,
        Message=message,
        Signature=signature,
        SigningAlgorithm=alg,
    )
    return service.verify(request).SignatureValid


# -- CreateKey and DescribeKey ------------------------------------------------------------------

# Every (spec, usage) SoftHSM 2.6.1 hosts; RSA_4096 (about 1 s per key) is in the slow tests.
HOSTED = [
    (spec.value, usage.value)
    for spec, key_type in KEY_TYPES.items()
    if key_type.material is not None
    and not spec.value.startswith(("ML_", "RSA_4096"))
    and spec is not KeySpec.SYMMETRIC_DEFAULT
    for usage in key_type.usages
]


@pytest.mark.parametrize(("spec", "usage"), HOSTED)
def test_every_hosted_spec_and_usage_is_created_with_awss_metadata(
    service: KmsService, spec: str, usage: str
) -> None:
    meta = new(service, spec, usage)
    described = service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId)).KeyMetadata
    assert described == meta
    assert (meta.KeySpec, meta.KeyUsage, meta.KeyState) == (spec, usage, "Enabled")
    shown = meta.model_dump(exclude_none=True)
    lists = {k: v for k, v in shown.items() if k.endswith("Algorithms")}
    assert lists == KEY_TYPES[KeySpec(spec)].algorithm_lists(KeyUsage(usage))
    assert len(lists) == 1  # AWS shows only the list of the key's usage
    assert "CurrentKeyMaterialId" not in shown  # symmetric keys only
    legacy = spec not in ("ECC_NIST_EDWARDS25519",)
    assert (meta.CustomerMasterKeySpec == spec) is legacy


def test_describe_key_lists_are_awss_exactly(service: KmsService) -> None:
    """The lists of the botocore model's examples and AWS's documentation, in their order."""
    rsa_sign = new(service, "RSA_2048", "SIGN_VERIFY")
    assert rsa_sign.SigningAlgorithms == [
        "RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512",
        "RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
    ]  # fmt: skip
    rsa_enc = new(service, "RSA_3072", "ENCRYPT_DECRYPT")
    assert rsa_enc.EncryptionAlgorithms == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    assert new(service, "ECC_NIST_P521", "SIGN_VERIFY").SigningAlgorithms == ["ECDSA_SHA_512"]
    assert new(service, "ECC_SECG_P256K1", "SIGN_VERIFY").SigningAlgorithms == ["ECDSA_SHA_256"]
    agreement = new(service, "ECC_NIST_P384", "KEY_AGREEMENT")
    assert agreement.KeyAgreementAlgorithms == ["ECDH"]
    ed = new(service, "ECC_NIST_EDWARDS25519", "SIGN_VERIFY")
    assert ed.SigningAlgorithms == ["ED25519_SHA_512", "ED25519_PH_SHA_512"]
    assert ed.CustomerMasterKeySpec is None
    assert new(service, "HMAC_384", "GENERATE_VERIFY_MAC").MacAlgorithms == ["HMAC_SHA_384"]
    symmetric = service.create_key(m.CreateKeyRequest()).KeyMetadata
    assert symmetric.EncryptionAlgorithms == ["SYMMETRIC_DEFAULT"]
    assert symmetric.CurrentKeyMaterialId is not None


def test_the_deprecated_customer_master_key_spec_still_creates(service: KmsService) -> None:
    request = m.CreateKeyRequest(CustomerMasterKeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    meta = service.create_key(request).KeyMetadata
    assert (meta.KeySpec, meta.CustomerMasterKeySpec) == ("HMAC_256", "HMAC_256")


def test_a_key_usage_is_required_for_every_spec_but_symmetric(service: KmsService) -> None:
    for spec in KeySpec:
        if spec is KeySpec.SYMMETRIC_DEFAULT:
            continue
        assert raises(ValidationException, new, service, spec.value) == (
            "You must specify a KeyUsage value for all KMS keys except for symmetric encryption "
            "keys."
        )


INVALID_PAIRS = [
    (spec.value, usage.value)
    for spec, key_type in KEY_TYPES.items()
    for usage in KeyUsage
    if usage not in key_type.usages
]


@pytest.mark.parametrize(("spec", "usage"), INVALID_PAIRS)
def test_a_usage_the_spec_does_not_take_is_a_validation_error(
    service: KmsService, spec: str, usage: str
) -> None:
    before = service.list_keys(m.ListKeysRequest()).Keys
    message = raises(ValidationException, new, service, spec, usage)
    assert message == f"KeyUsage {usage} is not compatible with KeySpec {spec}"
    assert service.list_keys(m.ListKeysRequest()).Keys == before


@pytest.mark.parametrize(
    ("spec", "usage", "missing"),
    [
        ("ML_DSA_44", "SIGN_VERIFY", "CKM_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN"),
        ("ML_DSA_65", "SIGN_VERIFY", "CKM_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN"),
        ("ML_DSA_87", "SIGN_VERIFY", "CKM_ML_DSA, CKM_ML_DSA_KEY_PAIR_GEN"),
        ("ML_KEM_512", "ENCAPSULATE_DECAPSULATE", "CKM_ML_KEM, CKM_ML_KEM_KEY_PAIR_GEN"),
        ("ML_KEM_768", "ENCAPSULATE_DECAPSULATE", "CKM_ML_KEM, CKM_ML_KEM_KEY_PAIR_GEN"),
        ("ML_KEM_1024", "ENCAPSULATE_DECAPSULATE", "CKM_ML_KEM, CKM_ML_KEM_KEY_PAIR_GEN"),
    ],
)
def test_a_spec_the_token_cannot_host_names_the_missing_mechanisms(
    service: KmsService, keystore: Pkcs11Keystore, spec: str, usage: str, missing: str
) -> None:
    objects = {o.object_id for o in keystore.list_objects()}
    message = raises(UnsupportedOperationException, new, service, spec, usage)
    assert message == (
        f"KeySpec {spec} with KeyUsage {usage} is not supported by this key store: the token "
        f"lacks {missing}."
    )
    assert service.list_keys(m.ListKeysRequest()).Keys == []  # no half-written key
    assert {o.object_id for o in keystore.list_objects()} == objects


def test_sm2_is_refused(service: KmsService) -> None:
    message = raises(UnsupportedOperationException, new, service, "SM2", "SIGN_VERIFY")
    assert "China Regions" in message


def test_describe_key_of_an_unknown_multi_region_id_names_its_arn(service: KmsService) -> None:
    """spec: LocalStack's AWS-validated snapshot test_get_key_does_not_exist."""
    mrk = "mrk-d3b95762d3b95762d3b95762d3b95762"
    message = raises(NotFoundException, service.describe_key, m.DescribeKeyRequest(KeyId=mrk))
    assert message == f"Key 'arn:aws:kms:{REGION}:{ACCOUNT}:key/{mrk}' does not exist"
    for malformed in ("mrk-fake-key-id", "mrk-D3B95762D3B95762D3B95762D3B95762", "mrk-d3b9"):
        message = raises(
            NotFoundException, service.describe_key, m.DescribeKeyRequest(KeyId=malformed)
        )
        assert message == f"Invalid keyId '{malformed}'"


def test_an_arn_of_another_region_names_the_region(service: KmsService) -> None:
    """spec: LocalStack's AWS-validated snapshot test_get_key_in_different_region."""
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    arn = key.Arn.replace(REGION, "ap-southeast-1")
    message = raises(NotFoundException, service.describe_key, m.DescribeKeyRequest(KeyId=arn))
    assert message == "Invalid arn ap-southeast-1"


# -- Sign and Verify --------------------------------------------------------------------------

SIGNING = [
    ("RSA_2048", "RSASSA_PSS_SHA_256"),
    ("RSA_2048", "RSASSA_PSS_SHA_512"),
    ("RSA_3072", "RSASSA_PKCS1_V1_5_SHA_384"),
    ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_512"),
    ("ECC_NIST_P256", "ECDSA_SHA_256"),
    ("ECC_NIST_P384", "ECDSA_SHA_384"),
    ("ECC_NIST_P521", "ECDSA_SHA_512"),
    ("ECC_SECG_P256K1", "ECDSA_SHA_256"),
]
_HASH: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512,
}  # fmt: skip


def _offline_verify(public: Any, signature: bytes, message: bytes, algorithm: str) -> None:
    """Raises unless ``signature`` verifies with pyca/cryptography."""
    hash_ = _HASH[algorithm[-3:]]()
    if algorithm.startswith("RSASSA_PSS"):
        public.verify(
            signature, message, padding.PSS(padding.MGF1(hash_), hash_.digest_size), hash_
        )
    elif algorithm.startswith("RSASSA_PKCS1"):
        public.verify(signature, message, padding.PKCS1v15(), hash_)
    else:
        public.verify(signature, message, ec.ECDSA(hash_))


@pytest.mark.parametrize(("spec", "algorithm"), SIGNING)
def test_raw_and_digest_signatures_verify_offline_and_here(
    service: KmsService, spec: str, algorithm: str
) -> None:
    key = new(service, spec, "SIGN_VERIFY").KeyId
    public = public_key(service, key)
    message = b"a message to sign"
    raw = sign(service, key, message, algorithm)
    _offline_verify(public, raw, message, algorithm)
    digest = hashlib.new(f"sha{algorithm[-3:]}", message).digest()
    prehashed = sign(service, key, digest, algorithm, MessageType="DIGEST")
    _offline_verify(public, prehashed, message, algorithm)  # the same message, hashed by us
    if "PKCS1" in algorithm:  # deterministic: RAW is DIGEST of the hash
        assert raw == prehashed
    assert verify(service, key, message, raw, algorithm)
    request = m.VerifyRequest(
        KeyId=key,
        Message=digest,
        MessageType="DIGEST",
        Signature=raw,
        SigningAlgorithm=algorithm,
    )
    assert service.verify(request).SignatureValid is True


def test_a_signature_made_offline_verifies_here(service: KmsService) -> None:
    """The other direction: a signature by another holder of the key is impossible, so a
    signature by a *different* key must fail, and one over the exact message must pass."""
    key = new(service, "ECC_NIST_P256", "SIGN_VERIFY").KeyId
    foreign = ec.generate_private_key(ec.SECP256R1()).sign(b"m", ec.ECDSA(hashes.SHA256()))
    raises(KMSInvalidSignatureException, verify, service, key, b"m", foreign, "ECDSA_SHA_256")


def test_a_bad_signature_is_kms_invalid_signature_with_no_message(service: KmsService) -> None:
    key = new(service, "RSA_2048", "SIGN_VERIFY").KeyId
    good = sign(service, key, b"m", "RSASSA_PSS_SHA_256")
    for bad_message, bad_signature, algorithm in (
        (b"m2", good, "RSASSA_PSS_SHA_256"),
        (b"m", good[:-1] + bytes([good[-1] ^ 1]), "RSASSA_PSS_SHA_256"),
        (b"m", good[:100], "RSASSA_PSS_SHA_256"),
        (b"m", good, "RSASSA_PKCS1_V1_5_SHA_256"),
        (b"m", good, "RSASSA_PSS_SHA_384"),
    ):
        message = raises(
            KMSInvalidSignatureException,
            verify,
            service,
            key,
            bad_message,
            bad_signature,
            algorithm,
        )
        assert message == ""


def test_ed25519_signs_raw_messages_and_refuses_the_prehash_softhsm_cannot_do(
    service: KmsService,
) -> None:
    key = new(service, "ECC_NIST_EDWARDS25519", "SIGN_VERIFY").KeyId
    public = public_key(service, key)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    signature = sign(service, key, b"pure Ed25519", "ED25519_SHA_512")
    public.verify(signature, b"pure Ed25519")
    assert verify(service, key, b"pure Ed25519", signature, "ED25519_SHA_512")
    # spec: the botocore model — ED25519_SHA_512 requires RAW, ED25519_PH_SHA_512 DIGEST.
    assert (
        raises(
            ValidationException,
            sign,
            service,
            key,
            bytes(64),
            "ED25519_SHA_512",
            MessageType="DIGEST",
        )
        == "Message type DIGEST is incompatible with algorithm ED25519_SHA_512."
    )
    assert (
        raises(ValidationException, sign, service, key, b"m", "ED25519_PH_SHA_512")
        == "Message type RAW is incompatible with algorithm ED25519_PH_SHA_512."
    )
    assert (
        raises(
            ValidationException,
            sign,
            service,
            key,
            bytes(32),
            "ED25519_PH_SHA_512",
            MessageType="DIGEST",
        )
        == "Digest is invalid length for algorithm ED25519_PH_SHA_512."
    )
    digest = hashlib.sha512(b"m").digest()
    message = raises(
        UnsupportedOperationException, sign, service, key, digest, "ED25519_PH_SHA_512",
        MessageType="DIGEST",
    )  # fmt: skip
    assert message == (
        "Signing algorithm ED25519_PH_SHA_512 is not supported by this key store: the token "
        "does not perform Ed25519ph (CKM_EDDSA with phFlag)."
    )


def test_signing_errors_in_awss_words(service: KmsService) -> None:
    p256 = new(service, "ECC_NIST_P256", "SIGN_VERIFY")
    assert raises(InvalidKeyUsageException, sign, service, p256.KeyId, b"m", "ECDSA_SHA_384") == (
        "Algorithm ECDSA_SHA_384 is incompatible with key spec ECC_NIST_P256."
    )
    assert (
        raises(InvalidKeyUsageException, sign, service, p256.KeyId, b"m", "RSASSA_PSS_SHA_256")
        == "Algorithm RSASSA_PSS_SHA_256 is incompatible with key spec ECC_NIST_P256."
    )
    for length in (31, 33, 64):
        # spec: "Digest is invalid length for algorithm ECDSA_SHA_256." (§1.9)
        assert raises(
            ValidationException, sign, service, p256.KeyId, bytes(length), "ECDSA_SHA_256",
            MessageType="DIGEST",
        ) == "Digest is invalid length for algorithm ECDSA_SHA_256."  # fmt: skip
    assert raises(
        ValidationException, sign, service, p256.KeyId, bytes(64), "ECDSA_SHA_256",
        MessageType="EXTERNAL_MU",
    ) == "Message type EXTERNAL_MU is incompatible with key spec ECC_NIST_P256."  # fmt: skip
    for other in (
        new(service, "HMAC_256", "GENERATE_VERIFY_MAC"),
        new(service, "ECC_NIST_P256", "KEY_AGREEMENT"),
        new(service, "RSA_2048", "ENCRYPT_DECRYPT"),
        service.create_key(m.CreateKeyRequest()).KeyMetadata,
    ):
        # spec: "<arn> key usage is GENERATE_VERIFY_MAC which is not valid for Sign." (LocalStack)
        assert raises(
            InvalidKeyUsageException, sign, service, other.KeyId, b"m", "ECDSA_SHA_256"
        ) == (f"{other.Arn} key usage is {other.KeyUsage} which is not valid for Sign.")
    service.disable_key(m.DisableKeyRequest(KeyId=p256.KeyId))
    assert raises(DisabledException, sign, service, p256.KeyId, b"m", "ECDSA_SHA_256") == (
        f"{p256.Arn} is disabled."
    )


def test_dry_run_sign_and_verify(service: KmsService) -> None:
    key = new(service, "ECC_NIST_P256", "SIGN_VERIFY").KeyId
    raises(DryRunOperationException, sign, service, key, b"m", "ECDSA_SHA_256", DryRun=True)
    request = m.VerifyRequest(
        KeyId=key,
        Message=b"m",
        Signature=b"x",
        SigningAlgorithm="ECDSA_SHA_256",
        DryRun=True,
    )
    raises(DryRunOperationException, service.verify, request)


# -- GetPublicKey -------------------------------------------------------------------------------


def test_get_public_key_fields(service: KmsService) -> None:
    key = new(service, "RSA_2048", "ENCRYPT_DECRYPT")
    answer = service.get_public_key(m.GetPublicKeyRequest(KeyId=key.Arn))
    assert answer.KeyId == key.Arn
    assert (answer.KeySpec, answer.CustomerMasterKeySpec, answer.KeyUsage) == (
        "RSA_2048", "RSA_2048", "ENCRYPT_DECRYPT",
    )  # fmt: skip
    assert answer.EncryptionAlgorithms == ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    assert answer.SigningAlgorithms is None
    public = serialization.load_der_public_key(answer.PublicKey)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    agreement = new(service, "ECC_NIST_P256", "KEY_AGREEMENT")
    shown = service.get_public_key(m.GetPublicKeyRequest(KeyId=agreement.KeyId))
    assert shown.KeyAgreementAlgorithms == ["ECDH"]
    for keyless in (
        service.create_key(m.CreateKeyRequest()).KeyMetadata,
        new(service, "HMAC_224", "GENERATE_VERIFY_MAC"),
    ):
        assert (
            raises(
                InvalidKeyUsageException,
                service.get_public_key,
                m.GetPublicKeyRequest(KeyId=keyless.KeyId),
            )
            == f"{keyless.Arn} key usage is {keyless.KeyUsage} which is not valid for GetPublicKey."
        )


# -- GenerateMac and VerifyMac ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [224, 256, 384, 512])
def test_macs_of_every_hmac_spec(service: KmsService, bits: int) -> None:
    key = new(service, f"HMAC_{bits}", "GENERATE_VERIFY_MAC").KeyId
    algorithm = f"HMAC_SHA_{bits}"
    tag = service.generate_mac(
        m.GenerateMacRequest(KeyId=key, Message=b"m", MacAlgorithm=algorithm)
    ).Mac
    assert len(tag) == bits // 8
    ok = service.verify_mac(
        m.VerifyMacRequest(KeyId=key, Message=b"m", Mac=tag, MacAlgorithm=algorithm)
    )
    assert ok.MacValid is True
    for message, mac in ((b"m2", tag), (b"m", tag[:-1]), (b"m", bytes(len(tag)))):
        request = m.VerifyMacRequest(KeyId=key, Message=message, Mac=mac, MacAlgorithm=algorithm)
        assert raises(KMSInvalidMacException, service.verify_mac, request) == ""
    other = "HMAC_SHA_256" if bits != 256 else "HMAC_SHA_512"
    request_other = m.GenerateMacRequest(KeyId=key, Message=b"m", MacAlgorithm=other)
    # spec: LocalStack's AWS-validated snapshot test_invalid_generate_mac.
    assert raises(InvalidKeyUsageException, service.generate_mac, request_other) == (
        f"Algorithm {other} is incompatible with key spec HMAC_{bits}."
    )


def test_a_mac_of_another_key_does_not_verify(service: KmsService) -> None:
    one = new(service, "HMAC_256", "GENERATE_VERIFY_MAC").KeyId
    two = new(service, "HMAC_256", "GENERATE_VERIFY_MAC").KeyId
    tag = service.generate_mac(
        m.GenerateMacRequest(KeyId=one, Message=b"m", MacAlgorithm="HMAC_SHA_256")
    ).Mac
    request = m.VerifyMacRequest(KeyId=two, Message=b"m", Mac=tag, MacAlgorithm="HMAC_SHA_256")
    raises(KMSInvalidMacException, service.verify_mac, request)
    symmetric = service.create_key(m.CreateKeyRequest()).KeyMetadata
    request = m.VerifyMacRequest(
        KeyId=symmetric.KeyId,
        Message=b"m",
        Mac=tag,
        MacAlgorithm="HMAC_SHA_256",
    )
    assert raises(InvalidKeyUsageException, service.verify_mac, request) == (
        f"{symmetric.Arn} key usage is ENCRYPT_DECRYPT which is not valid for VerifyMac."
    )


# -- RSA Encrypt, Decrypt, ReEncrypt -------------------------------------------------------------


def _encrypt(service: KmsService, key: str, data: bytes, algorithm: str | None, **kw: Any) -> bytes:
    request = m.EncryptRequest(KeyId=key, Plaintext=data, EncryptionAlgorithm=algorithm, **kw)
    return service.encrypt(request).CiphertextBlob


def _decrypt(service: KmsService, blob: bytes, algorithm: str | None, **kw: Any) -> bytes:
    request = m.DecryptRequest(CiphertextBlob=blob, EncryptionAlgorithm=algorithm, **kw)
    return service.decrypt(request).Plaintext


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])
def test_rsa_oaep_both_directions(service: KmsService, algorithm: str) -> None:
    key = new(service, "RSA_2048", "ENCRYPT_DECRYPT")
    public = public_key(service, key.KeyId)
    hash_ = hashes.SHA1() if algorithm.endswith("_1") else hashes.SHA256()  # noqa: S303 (AWS's)
    oaep = padding.OAEP(padding.MGF1(hash_), hash_, None)
    offline = public.encrypt(b"made offline", oaep)
    answer = service.decrypt(
        m.DecryptRequest(CiphertextBlob=offline, KeyId=key.Arn, EncryptionAlgorithm=algorithm)
    )
    assert (answer.Plaintext, answer.KeyId, answer.EncryptionAlgorithm) == (
        b"made offline", key.Arn, algorithm,
    )  # fmt: skip
    assert answer.KeyMaterialId is None  # symmetric keys only
    response = service.encrypt(
        m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"made here", EncryptionAlgorithm=algorithm)
    )
    assert (response.KeyId, response.EncryptionAlgorithm) == (key.Arn, algorithm)
    assert len(response.CiphertextBlob) == 256  # the raw OAEP ciphertext, no blob around it
    assert _decrypt(service, response.CiphertextBlob, algorithm, KeyId=key.KeyId) == b"made here"


def test_rsa_encryption_errors_in_awss_words(service: KmsService) -> None:
    key = new(service, "RSA_2048", "ENCRYPT_DECRYPT")
    for algorithm, limit in (("RSAES_OAEP_SHA_1", 214), ("RSAES_OAEP_SHA_256", 190)):
        _encrypt(service, key.KeyId, bytes(limit), algorithm)
        # spec: LocalStack's snapshot test_encrypt_validate_plaintext_size_per_key_type.
        assert raises(
            ValidationException, _encrypt, service, key.KeyId, bytes(limit + 1), algorithm
        ) == (
            f"Algorithm {algorithm} and key spec RSA_2048 cannot encrypt data larger than "
            f"{limit} bytes."
        )
    assert raises(InvalidKeyUsageException, _encrypt, service, key.KeyId, b"x", None) == (
        "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048."
    )
    assert raises(InvalidKeyUsageException, _encrypt, service, key.KeyId, b"x", "SM2PKE") == (
        "Algorithm SM2PKE is incompatible with key spec RSA_2048."
    )
    assert raises(
        ValidationException, _encrypt, service, key.KeyId, b"x", "RSAES_OAEP_SHA_256",
        EncryptionContext={"a": "b"},
    ) == ASYMMETRIC_CONTEXT  # fmt: skip
    symmetric = service.create_key(m.CreateKeyRequest()).KeyMetadata
    assert (
        raises(
            InvalidKeyUsageException, _encrypt, service, symmetric.KeyId, b"x", "RSAES_OAEP_SHA_256"
        )
        == "Algorithm RSAES_OAEP_SHA_256 is incompatible with key spec SYMMETRIC_DEFAULT."
    )
    signing = new(service, "RSA_2048", "SIGN_VERIFY")
    assert (
        raises(
            InvalidKeyUsageException, _encrypt, service, signing.KeyId, b"x", "RSAES_OAEP_SHA_256"
        )
        == f"{signing.Arn} key usage is SIGN_VERIFY which is not valid for Encrypt."
    )
    raises(
        DryRunOperationException,
        _encrypt,
        service,
        key.KeyId,
        b"x",
        "RSAES_OAEP_SHA_1",
        DryRun=True,
    )


def test_rsa_decryption_failures_say_nothing(service: KmsService) -> None:
    key = new(service, "RSA_2048", "ENCRYPT_DECRYPT")
    blob = _encrypt(service, key.KeyId, b"secret", "RSAES_OAEP_SHA_256")
    other = new(service, "RSA_2048", "ENCRYPT_DECRYPT")
    for bad, algorithm, kwargs in (
        (blob, "RSAES_OAEP_SHA_256", {}),  # no KeyId: taken for a symmetric blob
        (blob, None, {"KeyId": key.KeyId}),  # parsed as a symmetric blob first, as AWS does
        (blob, "RSAES_OAEP_SHA_1", {"KeyId": key.KeyId}),
        (blob, "RSAES_OAEP_SHA_256", {"KeyId": other.KeyId}),
        (blob[:-1] + bytes([blob[-1] ^ 1]), "RSAES_OAEP_SHA_256", {"KeyId": key.KeyId}),
        (blob[:200], "RSAES_OAEP_SHA_256", {"KeyId": key.KeyId}),
    ):
        assert raises(InvalidCiphertextException, _decrypt, service, bad, algorithm, **kwargs) == ""
    assert raises(
        ValidationException, _decrypt, service, blob, "RSAES_OAEP_SHA_256", KeyId=key.KeyId,
        EncryptionContext={"a": "b"},
    ) == ASYMMETRIC_CONTEXT  # fmt: skip
    signing = new(service, "ECC_NIST_P256", "SIGN_VERIFY")
    assert (
        raises(
            InvalidKeyUsageException,
            _decrypt,
            service,
            blob,
            "RSAES_OAEP_SHA_256",
            KeyId=signing.KeyId,
        )
        == f"{signing.Arn} key usage is SIGN_VERIFY which is not valid for Decrypt."
    )
    raises(
        DryRunOperationException, _decrypt, service, blob, "RSAES_OAEP_SHA_256", KeyId=key.KeyId,
        DryRun=True, DryRunModifiers=["IGNORE_CIPHERTEXT"],
    )  # fmt: skip


def test_re_encrypt_between_symmetric_and_rsa_keys(service: KmsService) -> None:
    symmetric = service.create_key(m.CreateKeyRequest()).KeyMetadata
    rsa_key = new(service, "RSA_3072", "ENCRYPT_DECRYPT")
    blob = _encrypt(service, symmetric.KeyId, b"moving", None, EncryptionContext={"a": "b"})
    to_rsa = service.re_encrypt(
        m.ReEncryptRequest(
            CiphertextBlob=blob, SourceEncryptionContext={"a": "b"},
            DestinationKeyId=rsa_key.KeyId, DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        )
    )  # fmt: skip
    assert (to_rsa.SourceEncryptionAlgorithm, to_rsa.DestinationEncryptionAlgorithm) == (
        "SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_256",
    )  # fmt: skip
    assert to_rsa.SourceKeyMaterialId is not None
    assert to_rsa.DestinationKeyMaterialId is None
    assert len(to_rsa.CiphertextBlob) == 384
    back = service.re_encrypt(
        m.ReEncryptRequest(
            CiphertextBlob=to_rsa.CiphertextBlob, SourceKeyId=rsa_key.Arn,
            SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
            DestinationKeyId=symmetric.KeyId, DestinationEncryptionContext={"c": "d"},
        )
    )  # fmt: skip
    assert (back.SourceKeyId, back.KeyId) == (rsa_key.Arn, symmetric.Arn)
    assert back.SourceKeyMaterialId is None
    assert back.DestinationKeyMaterialId is not None
    assert _decrypt(service, back.CiphertextBlob, None, EncryptionContext={"c": "d"}) == b"moving"
    with pytest.raises(ValidationException, match="EncryptionContext is not supported"):
        service.re_encrypt(
            m.ReEncryptRequest(
                CiphertextBlob=blob, SourceEncryptionContext={"a": "b"},
                DestinationKeyId=rsa_key.KeyId, DestinationEncryptionContext={"x": "y"},
                DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_1",
            )
        )  # fmt: skip
    with pytest.raises(InvalidKeyUsageException, match="SYMMETRIC_DEFAULT is incompatible"):
        service.re_encrypt(
            m.ReEncryptRequest(
                CiphertextBlob=blob, SourceEncryptionContext={"a": "b"},
                DestinationKeyId=rsa_key.KeyId,
            )
        )  # fmt: skip


# -- DeriveSharedSecret -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "curve"),
    [("ECC_NIST_P256", ec.SECP256R1()), ("ECC_NIST_P521", ec.SECP521R1())],
)
def test_derive_shared_secret_matches_the_peers(
    service: KmsService, spec: str, curve: ec.EllipticCurve
) -> None:
    key = new(service, spec, "KEY_AGREEMENT")
    peer = ec.generate_private_key(curve)
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    answer = service.derive_shared_secret(
        m.DeriveSharedSecretRequest(
            KeyId=key.KeyId, KeyAgreementAlgorithm="ECDH", PublicKey=peer_der
        )
    )
    assert answer.SharedSecret == peer.exchange(ec.ECDH(), public_key(service, key.KeyId))
    assert (answer.KeyId, answer.KeyAgreementAlgorithm, answer.KeyOrigin) == (
        key.Arn, "ECDH", "AWS_KMS",
    )  # fmt: skip


def test_derive_shared_secret_refusals(service: KmsService) -> None:
    key = new(service, "ECC_NIST_P256", "KEY_AGREEMENT")
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for bad in (p384, b"not a key"):
        request = m.DeriveSharedSecretRequest(
            KeyId=key.KeyId,
            KeyAgreementAlgorithm="ECDH",
            PublicKey=bad,
        )
        assert "SubjectPublicKeyInfo" in raises(
            ValidationException, service.derive_shared_secret, request
        )
    signing = new(service, "ECC_NIST_P256", "SIGN_VERIFY")
    request = m.DeriveSharedSecretRequest(
        KeyId=signing.KeyId,
        KeyAgreementAlgorithm="ECDH",
        PublicKey=p384,
    )
    assert raises(InvalidKeyUsageException, service.derive_shared_secret, request) == (
        f"{signing.Arn} key usage is SIGN_VERIFY which is not valid for DeriveSharedSecret."
    )
    request = m.DeriveSharedSecretRequest(
        KeyId=key.KeyId,
        KeyAgreementAlgorithm="ECDH",
        PublicKey=p384,
        Recipient={},
    )
    raises(UnsupportedOperationException, service.derive_shared_secret, request)


# -- data key pairs -------------------------------------------------------------------------------

PAIR_SPECS = [
    "RSA_2048", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521", "ECC_SECG_P256K1",
    "ECC_NIST_EDWARDS25519", "ML_KEM_768", "ML_KEM_1024",
]  # fmt: skip


@pytest.mark.parametrize("pair_spec", PAIR_SPECS)
def test_data_key_pairs_decrypt_to_the_private_key_of_their_public_key(
    service: KmsService, pair_spec: str
) -> None:
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    context = {"purpose": "pair"}
    pair = service.generate_data_key_pair(
        m.GenerateDataKeyPairRequest(
            KeyId=key.KeyId, KeyPairSpec=pair_spec, EncryptionContext=context
        )
    )
    assert (pair.KeyId, pair.KeyPairSpec) == (key.Arn, pair_spec)
    assert pair.KeyMaterialId == key.CurrentKeyMaterialId
    private = serialization.load_der_private_key(pair.PrivateKeyPlaintext, None)
    derived = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert derived == pair.PublicKey
    opened = service.decrypt(
        m.DecryptRequest(CiphertextBlob=pair.PrivateKeyCiphertextBlob, EncryptionContext=context)
    )
    assert opened.Plaintext == pair.PrivateKeyPlaintext
    raises(InvalidCiphertextException, _decrypt, service, pair.PrivateKeyCiphertextBlob, None)
    without = service.generate_data_key_pair_without_plaintext(
        m.GenerateDataKeyPairWithoutPlaintextRequest(KeyId=key.KeyId, KeyPairSpec=pair_spec)
    )
    assert without.PublicKey != pair.PublicKey  # a fresh pair each time
    private_again = serialization.load_der_private_key(
        _decrypt(service, without.PrivateKeyCiphertextBlob, None), None
    )
    assert (
        private_again.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == without.PublicKey
    )


def test_data_key_pair_refusals(service: KmsService) -> None:
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    for spec in ("SM2", "ML_KEM_512"):
        request = m.GenerateDataKeyPairRequest(KeyId=key.KeyId, KeyPairSpec=spec)
        assert raises(
            UnsupportedOperationException, service.generate_data_key_pair, request
        ).startswith(f"KeyPairSpec {spec} is not supported")
    rsa_key = new(service, "RSA_2048", "ENCRYPT_DECRYPT")
    request = m.GenerateDataKeyPairRequest(KeyId=rsa_key.KeyId, KeyPairSpec="RSA_2048")
    assert raises(InvalidKeyUsageException, service.generate_data_key_pair, request) == (
        f"{rsa_key.Arn} key usage is ENCRYPT_DECRYPT which is not valid for GenerateDataKeyPair."
    )
    dry = m.GenerateDataKeyPairRequest(KeyId=key.KeyId, KeyPairSpec="RSA_2048", DryRun=True)
    raises(DryRunOperationException, service.generate_data_key_pair, dry)


# -- rotation, multi-Region, ML-KEM -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "usage"), [("RSA_2048", "SIGN_VERIFY"), ("HMAC_256", "GENERATE_VERIFY_MAC")]
)
def test_asymmetric_and_hmac_keys_do_not_rotate(service: KmsService, spec: str, usage: str) -> None:
    key = new(service, spec, usage).KeyId
    expected = (
        "You cannot perform this operation on a non-symmetric key or a key with "
        "non-ENCRYPT_DECRYPT key usage."
    )
    for call, request in (
        (service.enable_key_rotation, m.EnableKeyRotationRequest(KeyId=key)),
        (service.disable_key_rotation, m.DisableKeyRotationRequest(KeyId=key)),
        (service.rotate_key_on_demand, m.RotateKeyOnDemandRequest(KeyId=key)),
    ):
        assert raises(UnsupportedOperationException, call, request) == expected
    status = service.get_key_rotation_status(m.GetKeyRotationStatusRequest(KeyId=key))
    assert status.KeyRotationEnabled is False


def test_multi_region_operations_and_ml_kem_are_refused_after_the_key_is_found(
    service: KmsService,
) -> None:
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    message = raises(
        UnsupportedOperationException,
        service.replicate_key,
        m.ReplicateKeyRequest(KeyId=key.KeyId, ReplicaRegion="eu-west-1"),
    )
    assert message == f"Unable to replicate a non-MultiRegion key {key.KeyId}"
    raises(
        UnsupportedOperationException,
        service.update_primary_region,
        m.UpdatePrimaryRegionRequest(KeyId=key.KeyId, PrimaryRegion="eu-west-1"),
    )
    missing = "00000000-0000-4000-8000-000000000000"
    raises(
        NotFoundException,
        service.replicate_key,
        m.ReplicateKeyRequest(KeyId=missing, ReplicaRegion="eu-west-1"),
    )
    raises(
        ValidationException,
        service.replicate_key,
        m.ReplicateKeyRequest(KeyId=key.KeyId, ReplicaRegion="Mars"),
    )
    assert (
        raises(
            InvalidKeyUsageException,
            service.encapsulate,
            m.EncapsulateRequest(KeyId=key.KeyId, EncapsulationAlgorithm="ML_KEM"),
        )
        == f"{key.Arn} key usage is ENCRYPT_DECRYPT which is not valid for Encapsulate."
    )
    raises(
        InvalidKeyUsageException,
        service.decapsulate,
        m.DecapsulateRequest(
            KeyId=key.KeyId,
            SharedSecretCiphertextBlob=b"x",
            EncapsulationAlgorithm="ML_KEM",
        ),
    )


# -- GetKeyLastUsage ------------------------------------------------------------------------------


def test_get_key_last_usage_from_the_history(service: KmsService, history: History) -> None:
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    answer = service.get_key_last_usage(m.GetKeyLastUsageRequest(KeyId=key.KeyId))
    assert answer.KeyId == key.Arn
    assert answer.KeyLastUsage == m.KeyLastUsageData()  # present and empty: never used
    assert answer.KeyCreationDate == key.CreationDate == T0
    assert answer.TrackingStartDate == T0  # nothing recorded yet: from now (the clock's T0)
    assert set(history.asked[-1]) == {
        "Decrypt", "DeriveSharedSecret", "Encrypt", "GenerateDataKey", "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext", "GenerateDataKeyWithoutPlaintext",
        "GenerateMac", "ReEncrypt", "Sign", "Verify", "VerifyMac", "Encapsulate", "Decapsulate",
    }  # fmt: skip
    history.start = T0 - dt.timedelta(days=30)
    used = T0 + dt.timedelta(hours=1)
    history.uses[key.KeyId] = KeyUse("Encrypt", used, "event-1", "request-1")
    answer = service.get_key_last_usage(m.GetKeyLastUsageRequest(KeyId=key.Arn))
    assert answer.KeyLastUsage == m.KeyLastUsageData(
        Operation="Encrypt",
        Timestamp=used,
        CloudTrailEventId="event-1",
        KmsRequestId="request-1",
    )
    assert answer.TrackingStartDate == T0  # the key's creation: later than the trail's start
    service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key.KeyId))
    assert service.get_key_last_usage(m.GetKeyLastUsageRequest(KeyId=key.KeyId)).KeyLastUsage


def test_get_key_last_usage_without_a_trail(keystore: Pkcs11Keystore, tmp_path: Path) -> None:
    store = MetadataStore.open_sqlite(tmp_path / "kms.db")
    try:
        svc = KmsService(keystore, store, region=REGION, account_id=ACCOUNT)
        key = svc.create_key(m.CreateKeyRequest()).KeyMetadata
        message = raises(
            UnsupportedOperationException,
            svc.get_key_last_usage,
            m.GetKeyLastUsageRequest(KeyId=key.KeyId),
        )
        assert "audit trail" in message
    finally:
        store.close()


# -- condition keys and grants -------------------------------------------------------------


def _caller(arn: str) -> Caller:
    return Caller(principal_arn=arn, account_id=ACCOUNT)


def _policy(*statements: dict[str, Any]) -> str:
    root = {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"}
    return json.dumps({"Version": "2012-10-17", "Statement": [root, *statements]})


def _allow(action: str | list[str], condition: dict[str, Any]) -> dict[str, Any]:
    return {
        "Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": action, "Resource": "*",
        "Condition": condition,
    }  # fmt: skip


def test_signing_algorithm_and_message_type_condition_keys(service: KmsService) -> None:
    policy = _policy(
        _allow(
            "kms:Sign",
            {
                "StringEquals": {
                    "kms:SigningAlgorithm": "RSASSA_PSS_SHA_256",
                    "kms:MessageType": "RAW",
                }
            },
        )
    )
    key = new(service, "RSA_2048", "SIGN_VERIFY", Policy=policy, caller=_caller(ROOT)).KeyId
    alice = _caller(ALICE)
    sign(service, key, b"m", "RSASSA_PSS_SHA_256", caller=alice)
    raises(AccessDeniedException, sign, service, key, b"m", "RSASSA_PSS_SHA_384", caller=alice)
    digest = hashlib.sha256(b"m").digest()
    raises(
        AccessDeniedException, sign, service, key, digest, "RSASSA_PSS_SHA_256",
        MessageType="DIGEST", caller=alice,
    )  # fmt: skip


def test_mac_algorithm_key_spec_and_key_origin_condition_keys(service: KmsService) -> None:
    policy = _policy(
        _allow(
            "kms:GenerateMac",
            {
                "StringEquals": {
                    "kms:MacAlgorithm": "HMAC_SHA_256", "kms:KeySpec": "HMAC_256",
                    "kms:KeyUsage": "GENERATE_VERIFY_MAC", "kms:KeyOrigin": "AWS_KMS",
                }
            },
        ),
        _allow("kms:VerifyMac", {"StringEquals": {"kms:KeyOrigin": "EXTERNAL"}}),
    )  # fmt: skip
    key = new(service, "HMAC_256", "GENERATE_VERIFY_MAC", Policy=policy, caller=_caller(ROOT))
    request = m.GenerateMacRequest(KeyId=key.KeyId, Message=b"m", MacAlgorithm="HMAC_SHA_256")
    tag = service.generate_mac(request, caller=_caller(ALICE)).Mac
    verify_request = m.VerifyMacRequest(
        KeyId=key.KeyId,
        Message=b"m",
        Mac=tag,
        MacAlgorithm="HMAC_SHA_256",
    )
    raises(AccessDeniedException, service.verify_mac, verify_request, caller=_caller(ALICE))


def test_encryption_and_key_agreement_algorithm_condition_keys(service: KmsService) -> None:
    policy = _policy(
        _allow(
            ["kms:Encrypt", "kms:Decrypt"],
            {"StringEquals": {"kms:EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}},
        ),
        _allow("kms:DeriveSharedSecret", {"StringEquals": {"kms:KeyAgreementAlgorithm": "ECDH"}}),
    )
    alice = _caller(ALICE)
    key = new(service, "RSA_2048", "ENCRYPT_DECRYPT", Policy=policy, caller=_caller(ROOT)).KeyId
    ok = m.EncryptRequest(KeyId=key, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    blob = service.encrypt(ok, caller=alice).CiphertextBlob
    service.decrypt(
        m.DecryptRequest(CiphertextBlob=blob, KeyId=key, EncryptionAlgorithm="RSAES_OAEP_SHA_256"),
        caller=alice,
    )
    sha1 = m.EncryptRequest(KeyId=key, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_1")
    raises(AccessDeniedException, service.encrypt, sha1, caller=alice)
    agreement = new(service, "ECC_NIST_P256", "KEY_AGREEMENT", Policy=policy, caller=_caller(ROOT))
    peer = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    derive = m.DeriveSharedSecretRequest(
        KeyId=agreement.KeyId,
        KeyAgreementAlgorithm="ECDH",
        PublicKey=peer,
    )
    assert service.derive_shared_secret(derive, caller=alice).SharedSecret


def test_grants_for_the_new_operations(service: KmsService) -> None:
    signing = new(service, "ECC_NIST_P256", "SIGN_VERIFY").KeyId
    bob = _caller(BOB)
    raises(AccessDeniedException, sign, service, signing, b"m", "ECDSA_SHA_256", caller=bob)
    service.create_grant(
        m.CreateGrantRequest(
            KeyId=signing, GranteePrincipal=BOB, Operations=["Sign", "GetPublicKey"]
        )
    )
    sign(service, signing, b"m", "ECDSA_SHA_256", caller=bob)
    service.get_public_key(m.GetPublicKeyRequest(KeyId=signing), caller=bob)
    with pytest.raises(AccessDeniedException):
        service.verify(
            m.VerifyRequest(
                KeyId=signing,
                Message=b"m",
                Signature=b"s",
                SigningAlgorithm="ECDSA_SHA_256",
            ),
            caller=bob,
        )
    for invalid in (["Encrypt"], ["GenerateMac"], ["Encapsulate"]):
        with pytest.raises(ValidationException):
            service.create_grant(
                m.CreateGrantRequest(KeyId=signing, GranteePrincipal=BOB, Operations=invalid)
            )
    mac = new(service, "HMAC_512", "GENERATE_VERIFY_MAC").KeyId
    service.create_grant(
        m.CreateGrantRequest(KeyId=mac, GranteePrincipal=BOB, Operations=["GenerateMac"])
    )
    request = m.GenerateMacRequest(KeyId=mac, Message=os.urandom(8), MacAlgorithm="HMAC_SHA_512")
    assert len(service.generate_mac(request, caller=bob).Mac) == 64


@pytest.mark.slow
@pytest.mark.parametrize("usage", ["SIGN_VERIFY", "ENCRYPT_DECRYPT"])
def test_rsa_4096_keys(service: KmsService, usage: str) -> None:
    key = new(service, "RSA_4096", usage)
    public = public_key(service, key.KeyId)
    assert public.key_size == 4096
    if usage == "ENCRYPT_DECRYPT":
        for algorithm, limit in (("RSAES_OAEP_SHA_1", 470), ("RSAES_OAEP_SHA_256", 446)):
            blob = _encrypt(service, key.KeyId, bytes(limit), algorithm)
            assert _decrypt(service, blob, algorithm, KeyId=key.KeyId) == bytes(limit)
            raises(ValidationException, _encrypt, service, key.KeyId, bytes(limit + 1), algorithm)
    else:
        signature = sign(service, key.KeyId, b"m", "RSASSA_PSS_SHA_512")
        _offline_verify(public, signature, b"m", "RSASSA_PSS_SHA_512")
    pair_key = service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
    pair = service.generate_data_key_pair(
        m.GenerateDataKeyPairRequest(KeyId=pair_key, KeyPairSpec="RSA_4096")
    )
    assert _decrypt(service, pair.PrivateKeyCiphertextBlob, None) == pair.PrivateKeyPlaintext


def test_data_key_pairs_and_key_pairs_beside_either_symmetric_profile(
    any_keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """Runs on the GCM token and on the token with the portable profile forced: the private
    key is sealed under the key's own profile; key pairs on that token are unaffected by it."""
    store = MetadataStore.open_sqlite(tmp_path / "kms.db")
    try:
        svc = KmsService(any_keystore, store, region=REGION, account_id=ACCOUNT)
        key = svc.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        pair = svc.generate_data_key_pair(
            m.GenerateDataKeyPairRequest(KeyId=key, KeyPairSpec="ECC_NIST_P384")
        )
        assert _decrypt(svc, pair.PrivateKeyCiphertextBlob, None) == pair.PrivateKeyPlaintext
        signing = new(svc, "ECC_NIST_P256", "SIGN_VERIFY").KeyId
        signature = sign(svc, signing, b"m", "ECDSA_SHA_256")
        assert verify(svc, signing, b"m", signature, "ECDSA_SHA_256")
    finally:
        store.close()
