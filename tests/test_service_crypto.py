"""KmsService cryptographic operations on real SoftHSM2 tokens (both mechanism profiles) and a
real SQLite file: round trips, limits, encryption context, tampering, wrong keys, secrets."""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from postgres import store_url, stored_bytes

from hsmkms import models as m
from hsmkms.ciphertext import CiphertextBlob
from hsmkms.errors import (
    DisabledException,
    DryRunOperationException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidGrantTokenException,
    InvalidKeyUsageException,
    KMSError,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.profiles import MechanismProfile
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore

pytestmark = [pytest.mark.hsm, pytest.mark.database, pytest.mark.vendors]

REGION = "us-east-2"
ACCOUNT = "111122223333"
T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


def _service(keystore: Pkcs11Keystore, path: Path, clock: ManualClock) -> KmsService:
    store = MetadataStore(store_url(path), clock=clock)
    return KmsService(keystore, store, region=REGION, account_id=ACCOUNT, clock=clock)


@pytest.fixture
def service(keystore: Pkcs11Keystore, tmp_path: Path, clock: ManualClock) -> Iterator[KmsService]:
    svc = _service(keystore, tmp_path / "kms.db", clock)
    yield svc
    svc.store.close()


@pytest.fixture
def any_service(
    any_keystore: Pkcs11Keystore, tmp_path: Path, clock: ManualClock
) -> Iterator[KmsService]:
    """Runs once per mechanism profile (GCM token, portable CBC-HMAC token)."""
    svc = _service(any_keystore, tmp_path / "kms.db", clock)
    yield svc
    svc.store.close()


@pytest.fixture
def key(service: KmsService) -> m.KeyMetadata:
    return service.create_key(m.CreateKeyRequest()).KeyMetadata


def _encrypt(
    service: KmsService, key_id: str, data: bytes, ctx: dict[str, str] | None = None
) -> bytes:
    request = m.EncryptRequest(KeyId=key_id, Plaintext=data, EncryptionContext=ctx)
    return service.encrypt(request).CiphertextBlob


def _decrypt(
    service: KmsService, blob: bytes, ctx: dict[str, str] | None = None, **kw: Any
) -> bytes:
    request = m.DecryptRequest(CiphertextBlob=blob, EncryptionContext=ctx, **kw)
    return service.decrypt(request).Plaintext


# -- both profiles end to end -----------------------------------------------------------------


def test_end_to_end_per_profile(any_service: KmsService, any_keystore: Pkcs11Keystore) -> None:
    key = any_service.create_key(m.CreateKeyRequest()).KeyMetadata
    ctx = {"tenant": "acme", "purpose": "test"}
    for size in (1, 15, 16, 17, 4096):
        data = os.urandom(size)
        resp = any_service.encrypt(
            m.EncryptRequest(KeyId=key.KeyId, Plaintext=data, EncryptionContext=ctx)
        )
        assert resp.KeyId == key.Arn
        assert resp.EncryptionAlgorithm is m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
        blob = CiphertextBlob.parse(resp.CiphertextBlob)
        assert blob.profile is any_keystore.profile
        assert (blob.key_id, blob.key_version) == (key.KeyId, 1)
        out = any_service.decrypt(
            m.DecryptRequest(CiphertextBlob=resp.CiphertextBlob, EncryptionContext=ctx)
        )
        assert out.Plaintext == data
        assert out.KeyId == key.Arn
        assert out.KeyMaterialId == key.CurrentKeyMaterialId
    dk = any_service.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=key.KeyId, KeySpec=m.DataKeySpec.AES_128)
    )
    assert len(dk.Plaintext) == 16
    assert _decrypt(any_service, dk.CiphertextBlob) == dk.Plaintext
    other = any_service.create_key(m.CreateKeyRequest()).KeyMetadata
    re = any_service.re_encrypt(
        m.ReEncryptRequest(CiphertextBlob=dk.CiphertextBlob, DestinationKeyId=other.Arn)
    )
    assert _decrypt(any_service, re.CiphertextBlob) == dk.Plaintext


def test_portable_profile_is_what_the_portable_token_uses(
    portable_keystore: Pkcs11Keystore,
) -> None:
    assert portable_keystore.profile is MechanismProfile.AES_256_CBC_HMAC_SHA_256


# -- Encrypt ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4096])
def test_encrypt_size_bounds_accepted(service: KmsService, key: m.KeyMetadata, size: int) -> None:
    data = b"\x00" * size
    assert _decrypt(service, _encrypt(service, key.KeyId, data)) == data


@pytest.mark.parametrize(
    ("size", "bound"), [(0, "greater than or equal to 1"), (4097, "less than or equal to 4096")]
)
def test_encrypt_size_limits(
    service: KmsService, key: m.KeyMetadata, size: int, bound: str
) -> None:
    with pytest.raises(ValidationException) as info:
        _encrypt(service, key.KeyId, b"a" * size)
    # spec: blobs are never echoed: "Value at 'plaintext' failed to satisfy constraint" (§1.9).
    assert info.value.message == (
        "1 validation error detected: Value at 'plaintext' failed to satisfy constraint: "
        f"Member must have length {bound}"
    )


def test_encrypt_accepts_every_identifier(service: KmsService, key: m.KeyMetadata) -> None:
    service.create_alias(m.CreateAliasRequest(AliasName="alias/enc", TargetKeyId=key.KeyId))
    for identifier in (
        key.KeyId,
        key.Arn,
        "alias/enc",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/enc",
    ):
        blob = _encrypt(service, identifier, b"data")
        assert CiphertextBlob.parse(blob).key_id == key.KeyId


def test_encrypt_unknown_key_and_alias(service: KmsService) -> None:
    with pytest.raises(NotFoundException):
        _encrypt(service, "alias/none", b"x")
    with pytest.raises(NotFoundException):
        _encrypt(service, "00000000-0000-4000-8000-000000000000", b"x")


def test_encrypt_algorithm(service: KmsService, key: m.KeyMetadata) -> None:
    ok = m.EncryptRequest(
        KeyId=key.KeyId,
        Plaintext=b"x",
        EncryptionAlgorithm=m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT,
    )
    service.encrypt(ok)
    bad = m.EncryptRequest(
        KeyId=key.KeyId,
        Plaintext=b"x",
        EncryptionAlgorithm=m.EncryptionAlgorithmSpec.RSAES_OAEP_SHA_256,
    )
    with pytest.raises(InvalidKeyUsageException):
        service.encrypt(bad)


def test_encrypt_grant_tokens_limits(service: KmsService, key: m.KeyMetadata) -> None:
    token = service.create_grant(
        m.CreateGrantRequest(
            KeyId=key.KeyId,
            GranteePrincipal="arn:aws:iam::111122223333:user/u",
            Operations=["Encrypt"],
        )
    ).GrantToken
    assert token is not None
    service.encrypt(m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x", GrantTokens=[token] * 10))
    with pytest.raises(InvalidGrantTokenException):
        service.encrypt(m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x", GrantTokens=["t"]))
    with pytest.raises(ValidationException):
        service.encrypt(m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x", GrantTokens=["t"] * 11))
    with pytest.raises(ValidationException):
        service.encrypt(m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x", GrantTokens=[""]))


def test_dry_run(service: KmsService, key: m.KeyMetadata) -> None:
    with pytest.raises(DryRunOperationException) as info:
        service.encrypt(m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x", DryRun=True))
    assert info.value.message == "The request would have succeeded, but the DryRun option is set."
    blob = _encrypt(service, key.KeyId, b"x")
    with pytest.raises(DryRunOperationException):
        service.decrypt(m.DecryptRequest(CiphertextBlob=blob, DryRun=True))
    with pytest.raises(DryRunOperationException):
        service.decrypt(
            m.DecryptRequest(KeyId=key.KeyId, DryRun=True, DryRunModifiers=["IGNORE_CIPHERTEXT"])
        )
    with pytest.raises(DryRunOperationException):
        service.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=key.KeyId, NumberOfBytes=8, DryRun=True)
        )
    service.disable_key(m.DisableKeyRequest(KeyId=key.KeyId))
    with pytest.raises(DisabledException):  # a dry run still checks the key state
        service.encrypt(m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x", DryRun=True))


# -- Decrypt ------------------------------------------------------------------------------------


def test_decrypt_with_matching_key_id_in_every_form(
    service: KmsService, key: m.KeyMetadata
) -> None:
    service.create_alias(m.CreateAliasRequest(AliasName="alias/dec", TargetKeyId=key.KeyId))
    blob = _encrypt(service, key.KeyId, b"secret")
    for identifier in (
        key.KeyId,
        key.Arn,
        "alias/dec",
        f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/dec",
    ):
        assert _decrypt(service, blob, KeyId=identifier) == b"secret"


def test_decrypt_with_another_key_id(service: KmsService, key: m.KeyMetadata) -> None:
    other = service.create_key(m.CreateKeyRequest()).KeyMetadata
    blob = _encrypt(service, key.KeyId, b"secret")
    with pytest.raises(IncorrectKeyException) as info:
        _decrypt(service, blob, KeyId=other.KeyId)
    assert info.value.message == (
        "The key ID in the request does not identify a CMK that can perform this operation."
    )


def test_decrypt_with_unknown_key_id(service: KmsService, key: m.KeyMetadata) -> None:
    blob = _encrypt(service, key.KeyId, b"secret")
    with pytest.raises(NotFoundException):
        _decrypt(service, blob, KeyId="alias/nope")


def test_decrypt_requires_a_ciphertext(service: KmsService) -> None:
    with pytest.raises(ValidationException) as info:
        service.decrypt(m.DecryptRequest())
    assert "Value null at 'ciphertextBlob'" in info.value.message


def test_decrypt_ciphertext_size_limits(service: KmsService) -> None:
    with pytest.raises(ValidationException):
        _decrypt(service, b"")
    with pytest.raises(ValidationException):
        _decrypt(service, b"\x01" * 6145)
    with pytest.raises(InvalidCiphertextException):
        _decrypt(service, b"\x01" * 6144)


@pytest.mark.parametrize(
    ("at_encrypt", "at_decrypt", "ok"),
    [
        ({"a": "1", "b": "2"}, {"b": "2", "a": "1"}, True),  # order does not matter
        ({"a": "1"}, {"a": "1"}, True),
        (None, {}, True),
        ({}, None, True),
        ({"a": "1"}, None, False),
        (None, {"a": "1"}, False),
        ({"a": "1"}, {"A": "1"}, False),  # keys are case-sensitive
        ({"a": "x"}, {"a": "X"}, False),  # so are values
        ({"a": "1", "b": "2"}, {"a": "1"}, False),
        ({"a": "1"}, {"a": "1", "b": "2"}, False),
        ({"k\u00e9": "v\u2603"}, {"k\u00e9": "v\u2603"}, True),
    ],
)
def test_encryption_context_binding(
    service: KmsService,
    key: m.KeyMetadata,
    at_encrypt: dict[str, str] | None,
    at_decrypt: dict[str, str] | None,
    ok: bool,
) -> None:
    blob = _encrypt(service, key.KeyId, b"bound", at_encrypt)
    if ok:
        assert _decrypt(service, blob, at_decrypt) == b"bound"
    else:
        with pytest.raises(InvalidCiphertextException) as info:
            _decrypt(service, blob, at_decrypt)
        assert info.value.message == ""


def test_every_flipped_bit_region_is_refused(any_service: KmsService) -> None:
    key = any_service.create_key(m.CreateKeyRequest()).KeyMetadata
    blob = _encrypt(any_service, key.KeyId, b"0123456789abcdef" * 3, {"c": "d"})
    positions = sorted(
        {0, 1, 16, 17, 20, 21, 22, 30, len(blob) - 40, len(blob) - 17, len(blob) - 1}
    )
    for pos in positions:
        tampered = bytearray(blob)
        tampered[pos] ^= 0x01
        with pytest.raises(InvalidCiphertextException):
            _decrypt(any_service, bytes(tampered), {"c": "d"})
    for cut in (blob[:-1], blob[:22], blob + b"\x00"):
        with pytest.raises(InvalidCiphertextException):
            _decrypt(any_service, cut, {"c": "d"})


def test_decryption_failure_carries_no_detail(service: KmsService, key: m.KeyMetadata) -> None:
    blob = bytearray(_encrypt(service, key.KeyId, b"x"))
    blob[-1] ^= 0xFF
    with pytest.raises(InvalidCiphertextException) as info:
        _decrypt(service, bytes(blob))
    assert info.value.message == ""
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_blob_naming_an_unknown_key_or_version(service: KmsService, key: m.KeyMetadata) -> None:
    blob = CiphertextBlob.parse(_encrypt(service, key.KeyId, b"x"))
    unknown_key = CiphertextBlob(
        "00000000-0000-4000-8000-000000000001", 1, blob.profile, blob.iv, blob.body
    )
    unknown_version = CiphertextBlob(key.KeyId, 2, blob.profile, blob.iv, blob.body)
    for forged in (unknown_key, unknown_version):
        with pytest.raises(InvalidCiphertextException):
            _decrypt(service, forged.to_bytes())


def test_blob_with_another_profile_is_refused(service: KmsService, key: m.KeyMetadata) -> None:
    blob = CiphertextBlob.parse(_encrypt(service, key.KeyId, b"0123456789abcdef"))
    # Same key and version, but claiming the other profile (a valid shape for it).
    gcm, cbc = MechanismProfile.AES_256_GCM, MechanismProfile.AES_256_CBC_HMAC_SHA_256
    other = cbc if blob.profile is gcm else gcm
    iv = b"\x00" * (16 if other is cbc else 12)
    forged = CiphertextBlob(key.KeyId, 1, other, iv, b"\x00" * 48)
    with pytest.raises(InvalidCiphertextException):
        _decrypt(service, forged.to_bytes())


def test_known_key_in_wrong_state_gives_its_state_error(
    service: KmsService, key: m.KeyMetadata
) -> None:
    blob = _encrypt(service, key.KeyId, b"x")
    service.disable_key(m.DisableKeyRequest(KeyId=key.KeyId))
    with pytest.raises(DisabledException) as info:
        _decrypt(service, blob)
    assert info.value.message == f"{key.Arn} is disabled."


def test_ciphertext_of_a_deleted_key_is_invalid(
    service: KmsService, key: m.KeyMetadata, clock: ManualClock
) -> None:
    blob = _encrypt(service, key.KeyId, b"x")
    service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=key.KeyId, PendingWindowInDays=7)
    )
    clock.advance(days=7, seconds=1)
    assert service.purge_due() == [key.KeyId]
    with pytest.raises(InvalidCiphertextException):
        _decrypt(service, blob)


# -- ReEncrypt ----------------------------------------------------------------------------------


def test_re_encrypt(service: KmsService, key: m.KeyMetadata) -> None:
    dest = service.create_key(m.CreateKeyRequest()).KeyMetadata
    service.create_alias(m.CreateAliasRequest(AliasName="alias/dest", TargetKeyId=dest.KeyId))
    blob = _encrypt(service, key.KeyId, b"move me", {"from": "a"})
    resp = service.re_encrypt(
        m.ReEncryptRequest(
            CiphertextBlob=blob,
            SourceEncryptionContext={"from": "a"},
            SourceKeyId=key.Arn,
            DestinationKeyId="alias/dest",
            DestinationEncryptionContext={"to": "b"},
        )
    )
    assert resp.SourceKeyId == key.Arn
    assert resp.KeyId == dest.Arn
    assert resp.SourceEncryptionAlgorithm is m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
    assert resp.DestinationEncryptionAlgorithm is m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
    assert resp.SourceKeyMaterialId == key.CurrentKeyMaterialId
    assert resp.DestinationKeyMaterialId == dest.CurrentKeyMaterialId
    assert CiphertextBlob.parse(resp.CiphertextBlob).key_id == dest.KeyId
    assert _decrypt(service, resp.CiphertextBlob, {"to": "b"}) == b"move me"
    with pytest.raises(InvalidCiphertextException):
        _decrypt(service, resp.CiphertextBlob, {"from": "a"})


def test_re_encrypt_refusals(service: KmsService, key: m.KeyMetadata) -> None:
    other = service.create_key(m.CreateKeyRequest()).KeyMetadata
    blob = _encrypt(service, key.KeyId, b"x", {"a": "b"})
    with pytest.raises(InvalidCiphertextException):
        service.re_encrypt(m.ReEncryptRequest(CiphertextBlob=blob, DestinationKeyId=other.KeyId))
    with pytest.raises(IncorrectKeyException):
        service.re_encrypt(
            m.ReEncryptRequest(
                CiphertextBlob=blob,
                SourceEncryptionContext={"a": "b"},
                SourceKeyId=other.KeyId,
                DestinationKeyId=other.KeyId,
            )
        )
    with pytest.raises(NotFoundException):
        service.re_encrypt(m.ReEncryptRequest(CiphertextBlob=blob, DestinationKeyId="alias/none"))
    with pytest.raises(ValidationException):
        service.re_encrypt(m.ReEncryptRequest(DestinationKeyId=other.KeyId))


# -- GenerateDataKey(WithoutPlaintext) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "length"),
    [
        ({"KeySpec": "AES_256"}, 32),
        ({"KeySpec": "AES_128"}, 16),
        ({"NumberOfBytes": 1}, 1),
        ({"NumberOfBytes": 1024}, 1024),
    ],
)
def test_generate_data_key_lengths(
    service: KmsService, key: m.KeyMetadata, kwargs: dict[str, Any], length: int
) -> None:
    resp = service.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=key.Arn, EncryptionContext={"x": "y"}, **kwargs)
    )
    assert len(resp.Plaintext) == length
    assert resp.KeyId == key.Arn
    assert resp.KeyMaterialId == key.CurrentKeyMaterialId
    assert _decrypt(service, resp.CiphertextBlob, {"x": "y"}) == resp.Plaintext
    bare = service.generate_data_key_without_plaintext(
        m.GenerateDataKeyWithoutPlaintextRequest(KeyId=key.KeyId, **kwargs)
    )
    assert bare.KeyId == key.Arn
    assert len(_decrypt(service, bare.CiphertextBlob)) == length


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "Please specify either number of bytes or key spec."),
        (
            {"KeySpec": "AES_256", "NumberOfBytes": 32},
            "Please specify either number of bytes or key spec.",
        ),
        (
            {"NumberOfBytes": 0},
            "1 validation error detected: Value '0' at 'numberOfBytes' failed to satisfy "
            "constraint: Member must have value greater than or equal to 1",
        ),
        (
            {"NumberOfBytes": 1025},
            "1 validation error detected: Value '1025' at 'numberOfBytes' failed to satisfy "
            "constraint: Member must have value less than or equal to 1024",
        ),
    ],
)
def test_generate_data_key_refusals(
    service: KmsService, key: m.KeyMetadata, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationException) as info:
        service.generate_data_key(m.GenerateDataKeyRequest(KeyId=key.KeyId, **kwargs))
    assert info.value.message == message
    with pytest.raises(ValidationException):
        service.generate_data_key_without_plaintext(
            m.GenerateDataKeyWithoutPlaintextRequest(KeyId=key.KeyId, **kwargs)
        )


def test_data_keys_are_fresh(service: KmsService, key: m.KeyMetadata) -> None:
    keys = {
        service.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=key.KeyId, KeySpec=m.DataKeySpec.AES_256)
        ).Plaintext
        for _ in range(5)
    }
    assert len(keys) == 5


def test_recipient_is_unsupported(service: KmsService, key: m.KeyMetadata) -> None:
    with pytest.raises(UnsupportedOperationException):
        service.generate_data_key(
            m.GenerateDataKeyRequest(
                KeyId=key.KeyId, NumberOfBytes=8, Recipient={"AttestationDocument": "x"}
            )
        )


# -- GenerateRandom -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 32, 1024])
def test_generate_random(service: KmsService, n: int) -> None:
    assert len(service.generate_random(m.GenerateRandomRequest(NumberOfBytes=n)).Plaintext) == n


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, ValidationException),
        ({"NumberOfBytes": 0}, ValidationException),
        ({"NumberOfBytes": 1025}, ValidationException),
        ({"NumberOfBytes": 8, "CustomKeyStoreId": "cks-1"}, UnsupportedOperationException),
    ],
)
def test_generate_random_refusals(
    service: KmsService, kwargs: dict[str, Any], error: type[KMSError]
) -> None:
    with pytest.raises(error):
        service.generate_random(m.GenerateRandomRequest(**kwargs))


# -- secrets ------------------------------------------------------------------------------------


def test_secrets_are_not_in_reprs(service: KmsService, key: m.KeyMetadata) -> None:
    secret = b"TOP-SECRET-PLAINTEXT"
    request = m.EncryptRequest(KeyId=key.KeyId, Plaintext=secret)
    blob = service.encrypt(request).CiphertextBlob
    dk = service.generate_data_key(m.GenerateDataKeyRequest(KeyId=key.KeyId, NumberOfBytes=24))
    decrypted = service.decrypt(m.DecryptRequest(CiphertextBlob=blob))
    rnd = service.generate_random(m.GenerateRandomRequest(NumberOfBytes=24))
    for obj, value in (
        (request, secret),
        (decrypted, secret),
        (dk, dk.Plaintext),
        (rnd, rnd.Plaintext),
    ):
        for text in (repr(obj), str(obj)):
            assert repr(value) not in text
            assert base64.b64encode(value).decode() not in text


def test_database_never_holds_plaintext_or_data_keys(
    keystore: Pkcs11Keystore, tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "scan.db"
    service = _service(keystore, path, clock)
    key = service.create_key(m.CreateKeyRequest(Description="scan")).KeyMetadata
    plaintext = b"PLAINTEXT-MARKER-" + os.urandom(16)
    blob = _encrypt(service, key.KeyId, plaintext, {"ctx": "v"})
    data_key = service.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=key.KeyId, KeySpec=m.DataKeySpec.AES_256)
    )
    service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    assert _decrypt(service, blob, {"ctx": "v"}) == plaintext

    # Everything the database wrote (SQLite: the file, its WAL and shared memory; PostgreSQL:
    # the database's files and a dump), before and after close.
    def scan() -> None:
        content = stored_bytes(path)
        for secret in (plaintext, data_key.Plaintext):
            assert secret not in content
            assert base64.b64encode(secret) not in content
            assert secret.hex().encode() not in content

    assert b"scan" in stored_bytes(path)
    scan()
    service.store.close()
    scan()


def test_logs_of_a_round_trip_hold_no_secret(service: KmsService, key: m.KeyMetadata) -> None:
    secret = b"LOGGED-PLAINTEXT-" + os.urandom(8)
    with structlog.testing.capture_logs() as logs:
        blob = _encrypt(service, key.KeyId, secret, {"c": "v"})
        assert _decrypt(service, blob, {"c": "v"}) == secret
        dk = service.generate_data_key(m.GenerateDataKeyRequest(KeyId=key.KeyId, NumberOfBytes=32))
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
        with pytest.raises(InvalidCiphertextException):
            _decrypt(service, blob[:-1] + bytes([blob[-1] ^ 1]), {"c": "v"})
    text = repr(logs)
    assert logs  # the rotation was logged
    for value in (secret, dk.Plaintext):
        assert repr(value) not in text
        assert value.hex() not in text
        assert base64.b64encode(value).decode() not in text
