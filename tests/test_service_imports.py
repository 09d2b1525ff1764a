"""Imported key material (Origin EXTERNAL) in the service, on a real SoftHSM2 token and a real
SQLite file with sealed rows: GetParametersForImport, ImportKeyMaterial,
DeleteImportedKeyMaterial, expiry, re-import, on-demand rotation of imported material, the key
state matrix and condition keys. The material is wrapped here as a client would, with
``cryptography`` against the returned public key."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cli_process
import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmkms import models as m
from hsmkms.ciphertext import CiphertextBlob
from hsmkms.errors import (
    AccessDeniedException,
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidImportTokenException,
    KeyIntegrityError,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService, ServiceEvent
from hsmkms.service.imports import decode_import_token
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore, TokenRowSealer
from hsmkms.types import Caller

pytestmark = pytest.mark.hsm

REGION = "eu-west-1"
ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
SHA1_ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1")


@dataclasses.dataclass
class Env:
    service: KmsService
    store: MetadataStore
    keystore: Pkcs11Keystore
    clock: ManualClock
    path: Path
    events: list[ServiceEvent]

    def create(self, **kwargs: Any) -> m.KeyMetadata:
        request = m.CreateKeyRequest(Origin="EXTERNAL", **kwargs)
        return self.service.create_key(request).KeyMetadata

    def parameters(
        self, key_id: str, algorithm: str = "RSAES_OAEP_SHA_1", spec: str = "RSA_2048"
    ) -> m.GetParametersForImportResponse:
        request = m.GetParametersForImportRequest(
            KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec=spec
        )
        return self.service.get_parameters_for_import(request)

    def import_(
        self,
        key_id: str,
        material: bytes,
        algorithm: str = "RSAES_OAEP_SHA_1",
        params: m.GetParametersForImportResponse | None = None,
        **kwargs: Any,
    ) -> m.ImportKeyMaterialResponse:
        params = params or self.parameters(key_id, algorithm)
        kwargs.setdefault("ExpirationModel", "KEY_MATERIAL_DOES_NOT_EXPIRE")
        request = m.ImportKeyMaterialRequest(
            KeyId=key_id,
            ImportToken=params.ImportToken,
            EncryptedKeyMaterial=wrap(params.PublicKey, algorithm, material),
            **kwargs,
        )
        return self.service.import_key_material(request)

    def describe(self, key_id: str) -> m.KeyMetadata:
        return self.service.describe_key(m.DescribeKeyRequest(KeyId=key_id)).KeyMetadata

    def encrypt(self, key_id: str, plaintext: bytes = b"payload") -> bytes:
        request = m.EncryptRequest(KeyId=key_id, Plaintext=plaintext)
        return self.service.encrypt(request).CiphertextBlob

    def decrypt(self, blob: bytes) -> bytes:
        return self.service.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext

    def delete_material(self, key_id: str, **kwargs: Any) -> m.DeleteImportedKeyMaterialResponse:
        request = m.DeleteImportedKeyMaterialRequest(KeyId=key_id, **kwargs)
        return self.service.delete_imported_key_material(request)

    def refs(self, key_id: str) -> list[KeyMaterialRef]:
        versions = self.store.list_versions(key_id).items
        return [KeyMaterialRef.from_str(v.material_ref) for v in versions]

    def sql(self, statement: str, *args: Any) -> list[Any]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(statement, args).fetchall()
        finally:
            conn.close()


@pytest.fixture
def env(keystore: Pkcs11Keystore, tmp_path: Path) -> Iterator[Env]:
    clock = ManualClock(T0)
    path = tmp_path / "kms.db"
    store = MetadataStore.open_sqlite(path, clock=clock, sealer=TokenRowSealer(keystore))
    events: list[ServiceEvent] = []
    service = KmsService(
        keystore, store, region=REGION, account_id=ACCOUNT, clock=clock, on_event=events.append
    )
    yield Env(service, store, keystore, clock, path, events)
    store.close()


def wrap(public_der: bytes, algorithm: str, material: bytes) -> bytes:
    """Wrap ``material`` as an AWS KMS client does (reference/xks-and-key-stores.md §3)."""
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    sha1 = algorithm.endswith("_SHA_1")
    digest: hashes.HashAlgorithm = hashes.SHA1() if sha1 else hashes.SHA256()  # noqa: S303
    oaep = padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, oaep) + keywrap.aes_key_wrap_with_padding(ephemeral, material)


def offline_decrypt(material: bytes, blob: bytes) -> bytes:
    """Decrypt a ciphertext blob without the service: proves the token holds ``material``."""
    parsed = CiphertextBlob.parse(blob)
    return AESGCM(material).decrypt(parsed.iv, parsed.body, parsed.aad({}))


def key_objects(env: Env) -> list[Any]:
    """The token objects of key versions (not the wrapping key pairs)."""
    return [o for o in env.keystore.list_objects() if o.is_key_version]


def caller(arn: str = ROOT) -> Caller:
    return Caller(principal_arn=arn, account_id=ACCOUNT, identity_policy=None)


# -- CreateKey and the key state matrix in PendingImport --------------------------------------


def test_create_key_with_external_origin_has_no_material(env: Env) -> None:
    meta = env.create(Description="byok")
    assert meta.Origin is m.OriginType.EXTERNAL
    assert meta.KeyState is m.KeyState.PendingImport
    assert meta.Enabled is False
    assert meta.KeySpec is m.KeySpec.SYMMETRIC_DEFAULT
    assert meta.CurrentKeyMaterialId is None
    assert meta.ExpirationModel is None
    assert meta.ValidTo is None
    assert env.store.list_versions(meta.KeyId).items == []
    assert env.describe(meta.KeyId) == meta


def test_a_key_pending_import_refuses_what_needs_material(env: Env) -> None:
    key_id = env.create().KeyId
    arn = env.describe(key_id).Arn
    refusals: list[Callable[[], object]] = [
        lambda: env.encrypt(key_id),
        lambda: env.service.enable_key(m.EnableKeyRequest(KeyId=key_id)),
        lambda: env.service.disable_key(m.DisableKeyRequest(KeyId=key_id)),
        lambda: env.service.create_grant(
            m.CreateGrantRequest(KeyId=key_id, GranteePrincipal=ALICE, Operations=["Encrypt"])
        ),
        lambda: env.service.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=key_id, KeySpec="AES_256")
        ),
        lambda: env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id)),
    ]
    for refused in refusals:
        with pytest.raises(KMSInvalidStateException) as info:
            refused()
        assert info.value.message == f"{arn} is pending import."


def test_a_key_pending_import_takes_what_needs_no_material(env: Env) -> None:
    key_id = env.create().KeyId
    env.service.create_alias(m.CreateAliasRequest(AliasName="alias/byok", TargetKeyId=key_id))
    env.service.tag_resource(
        m.TagResourceRequest(KeyId=key_id, Tags=[m.Tag(TagKey="t", TagValue="v")])
    )
    env.service.update_key_description(
        m.UpdateKeyDescriptionRequest(KeyId=key_id, Description="still waiting")
    )
    assert env.describe("alias/byok").Description == "still waiting"
    scheduled = env.service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
    )
    assert scheduled.KeyState is m.KeyState.PendingDeletion
    # spec: a key without its material goes back to PendingImport, not Disabled.
    env.service.cancel_key_deletion(m.CancelKeyDeletionRequest(KeyId=key_id))
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport


@pytest.mark.parametrize("operation", ["enable_key_rotation", "disable_key_rotation"])
def test_automatic_rotation_is_unsupported_for_imported_material_in_every_state(
    env: Env, operation: str
) -> None:
    key_id = env.create().KeyId

    def call() -> None:
        if operation == "enable_key_rotation":
            env.service.enable_key_rotation(m.EnableKeyRotationRequest(KeyId=key_id))
        else:
            env.service.disable_key_rotation(m.DisableKeyRotationRequest(KeyId=key_id))

    with pytest.raises(UnsupportedOperationException, match="origin is EXTERNAL"):
        call()
    env.import_(key_id, os.urandom(32))
    with pytest.raises(UnsupportedOperationException, match="origin is EXTERNAL"):
        call()


# -- GetParametersForImport -------------------------------------------------------------------


def test_parameters_are_a_wrapping_key_pair_in_the_token_and_a_token_bound_to_the_key(
    env: Env,
) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id)
    assert params.KeyId == env.describe(key_id).Arn
    assert params.ParametersValidTo == T0 + dt.timedelta(hours=24)
    public = serialization.load_der_public_key(params.PublicKey)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    token_id, token_key, valid_to = decode_import_token(params.ImportToken)
    assert (token_key, valid_to) == (key_id, params.ParametersValidTo)
    row = env.store.get_import_token(token_id)
    assert row is not None
    assert (row.key_id, row.wrapping_algorithm, row.wrapping_key_spec) == (
        key_id,
        "RSAES_OAEP_SHA_1",
        "RSA_2048",
    )
    # The private key is a token object that only unwraps; the public key is not kept.
    wrapping = [o for o in env.keystore.list_objects() if o.is_wrapping_key]
    ours = [o for o in wrapping if o.object_id == row.wrapping_key.rsplit(":", 1)[1]]
    # Labelled with the day after which it is of no use (leftovers are recognized by it).
    assert [(o.object_class, o.label) for o in ours] == [
        ("PRIVATE_KEY", f"hsmkms:import:{key_id.replace('-', '')[:16]}:20260603")
    ]
    attributes = env.keystore.attributes(
        ours[0].object_id,
        ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "LOCAL", "UNWRAP",
         "DECRYPT", "SIGN", "DERIVE", "MODIFIABLE"],
    )  # fmt: skip
    assert attributes == {
        "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
        "NEVER_EXTRACTABLE": True, "LOCAL": True, "UNWRAP": True, "DECRYPT": False,
        "SIGN": False, "DERIVE": False, "MODIFIABLE": False,
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "bits"), [("RSA_3072", 3072), ("RSA_4096", 4096)])
def test_longer_wrapping_keys(env: Env, spec: str, bits: int) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id, "RSA_AES_KEY_WRAP_SHA_1", spec)
    public = serialization.load_der_public_key(params.PublicKey)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == bits
    material = os.urandom(32)
    env.import_(key_id, material, "RSA_AES_KEY_WRAP_SHA_1", params)
    assert offline_decrypt(material, env.encrypt(key_id)) == b"payload"


@pytest.mark.parametrize(
    ("algorithm", "spec", "error", "words"),
    [
        ("RSAES_PKCS1_V1_5", "RSA_2048", ValidationException, "RSAES_PKCS1_V1_5"),
        ("SM2PKE", "SM2", ValidationException, "China Regions"),
        ("RSAES_OAEP_SHA_1", "SM2", ValidationException, "China Regions"),
        # Measured: SoftHSM 2.6.1 refuses OAEP with SHA-256 in C_UnwrapKey (CKR_ARGUMENTS_BAD).
        ("RSAES_OAEP_SHA_256", "RSA_2048", UnsupportedOperationException, "SHA-256"),
        ("RSA_AES_KEY_WRAP_SHA_256", "RSA_2048", UnsupportedOperationException, "SHA-256"),
    ],
)
def test_parameters_refused(
    env: Env, algorithm: str, spec: str, error: type[Exception], words: str
) -> None:
    key_id = env.create().KeyId
    before = env.keystore.list_objects()
    with pytest.raises(error) as info:
        env.parameters(key_id, algorithm, spec)
    assert words in str(info.value)
    assert env.keystore.list_objects() == before
    assert env.store.import_tokens(key_id=key_id) == []


def test_the_sha_256_refusal_names_what_the_token_lacks_and_what_it_offers(env: Env) -> None:
    key_id = env.create().KeyId
    with pytest.raises(UnsupportedOperationException) as info:
        env.parameters(key_id, "RSAES_OAEP_SHA_256")
    assert "CKM_RSA_PKCS_OAEP (SHA-256, MGF1-SHA-256)" in info.value.message
    assert "RSAES_OAEP_SHA_1, RSA_AES_KEY_WRAP_SHA_1" in info.value.message


def test_parameters_for_a_key_whose_material_the_token_made_are_unsupported(env: Env) -> None:
    key = env.service.create_key(m.CreateKeyRequest()).KeyMetadata
    for call in (
        lambda: env.parameters(key.KeyId),
        lambda: env.delete_material(key.KeyId),
    ):
        with pytest.raises(UnsupportedOperationException) as info:
            call()
        assert (
            info.value.message
            == f"{key.Arn} origin is AWS_KMS which is not valid for this operation."
        )


def test_parameters_refused_while_pending_deletion(env: Env) -> None:
    key_id = env.create().KeyId
    env.service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id))
    with pytest.raises(KMSInvalidStateException, match="is pending deletion"):
        env.parameters(key_id)


def test_parameters_do_not_take_an_alias(env: Env) -> None:
    key_id = env.create().KeyId
    env.service.create_alias(m.CreateAliasRequest(AliasName="alias/imp", TargetKeyId=key_id))
    with pytest.raises(NotFoundException):
        env.parameters("alias/imp")


# -- ImportKeyMaterial: symmetric material ----------------------------------------------------


@pytest.mark.parametrize("algorithm", SHA1_ALGORITHMS)
def test_imported_symmetric_material_encrypts_inside_the_token(env: Env, algorithm: str) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    result = env.import_(key_id, material, algorithm)
    meta = env.describe(key_id)
    assert meta.KeyState is m.KeyState.Enabled
    assert meta.Enabled
    assert meta.ExpirationModel is m.ExpirationModel.KEY_MATERIAL_DOES_NOT_EXPIRE
    assert meta.ValidTo is None
    assert result.KeyId == meta.Arn
    assert result.KeyMaterialId == meta.CurrentKeyMaterialId
    assert result.KeyMaterialId is not None
    assert len(result.KeyMaterialId) == 64
    blob = env.encrypt(key_id, b"hello imported key")
    # The token holds exactly the material the client wrapped.
    assert offline_decrypt(material, blob) == b"hello imported key"
    decrypted = env.service.decrypt(m.DecryptRequest(CiphertextBlob=blob))
    assert decrypted.Plaintext == b"hello imported key"
    assert decrypted.KeyMaterialId == result.KeyMaterialId


def test_imported_material_objects_are_hardened_and_not_local(env: Env) -> None:
    key_id = env.create().KeyId
    env.import_(key_id, os.urandom(32))
    (ref,) = env.refs(key_id)
    assert ref.profile is not None
    assert ref.profile.value == "AES_256_GCM"
    (object_id,) = ref.object_ids
    names = ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "LOCAL",
             "ALWAYS_SENSITIVE", "MODIFIABLE", "ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP",
             "UNWRAP", "DERIVE"]  # fmt: skip
    assert env.keystore.attributes(object_id, names) == {
        "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
        # Unwrapped: it existed outside the token before, which PKCS#11 records honestly.
        "NEVER_EXTRACTABLE": False, "LOCAL": False, "ALWAYS_SENSITIVE": False,
        "MODIFIABLE": False, "ENCRYPT": True, "DECRYPT": True, "SIGN": False, "VERIFY": False,
        "WRAP": False, "UNWRAP": False, "DERIVE": False,
    }  # fmt: skip
    with pytest.raises(Exception, match=r"AttributeSensitive|reading attributes"):
        env.keystore.attributes(object_id, ["VALUE"])


def test_imported_material_stays_gcm_on_a_token_forced_to_the_portable_profile(
    portable_keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    store = MetadataStore.open_sqlite(tmp_path / "p.db")
    service = KmsService(portable_keystore, store, region=REGION, account_id=ACCOUNT)
    try:
        env = Env(service, store, portable_keystore, ManualClock(), tmp_path / "p.db", [])
        key_id = env.create().KeyId
        material = os.urandom(32)
        env.import_(key_id, material)
        assert offline_decrypt(material, env.encrypt(key_id)) == b"payload"
        generated = service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        assert CiphertextBlob.parse(env.encrypt(generated)).profile.value == (
            "AES_256_CBC_HMAC_SHA_256"
        )
    finally:
        store.close()


@pytest.mark.parametrize("length", [16, 24, 31, 33, 64])
@pytest.mark.parametrize("algorithm", SHA1_ALGORITHMS)
def test_symmetric_material_must_be_32_bytes(env: Env, algorithm: str, length: int) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id, algorithm)
    before = env.keystore.list_objects()
    with pytest.raises(InvalidCiphertextException) as info:
        env.import_(key_id, os.urandom(length), algorithm, params)
    assert info.value.message == ""
    assert env.keystore.list_objects() == before  # nothing left on the token
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport


@pytest.mark.parametrize("algorithm", SHA1_ALGORITHMS)
@pytest.mark.parametrize("where", [0, 100, -1])
def test_tampered_encrypted_material_is_invalid_ciphertext(
    env: Env, algorithm: str, where: int
) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id, algorithm)
    wrapped = bytearray(wrap(params.PublicKey, algorithm, os.urandom(32)))
    wrapped[where] ^= 0x01
    before = env.keystore.list_objects()
    with pytest.raises(InvalidCiphertextException):
        env.service.import_key_material(
            m.ImportKeyMaterialRequest(
                KeyId=key_id, ImportToken=params.ImportToken, EncryptedKeyMaterial=bytes(wrapped),
                ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
            )
        )  # fmt: skip
    assert env.keystore.list_objects() == before


@pytest.mark.parametrize("size", [1, 255, 257, 256 + 15, 256 + 20])
def test_encrypted_material_of_an_impossible_size_is_refused(env: Env, size: int) -> None:
    key_id = env.create().KeyId
    for algorithm in SHA1_ALGORITHMS:
        params = env.parameters(key_id, algorithm)
        if algorithm.startswith("RSA_AES") and size in (257,):
            continue  # 256 + 1 is too short for an AES key wrap: covered by the others
        with pytest.raises(ValidationException, match="Invalid encrypted key size"):
            env.service.import_key_material(
                m.ImportKeyMaterialRequest(
                    KeyId=key_id, ImportToken=params.ImportToken,
                    EncryptedKeyMaterial=os.urandom(size),
                    ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
                )
            )  # fmt: skip


# -- re-import ---------------------------------------------------------------------------------


def test_deleting_and_reimporting_the_same_material(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    first = env.import_(key_id, material, "RSAES_OAEP_SHA_1")
    blob = env.encrypt(key_id)
    (old_ref,) = env.refs(key_id)
    deleted = env.delete_material(key_id)
    assert deleted.KeyMaterialId == first.KeyMaterialId
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport
    assert not env.keystore.exists(old_ref)  # the token objects are destroyed
    assert env.store.list_versions(key_id).items == []
    with pytest.raises(KMSInvalidStateException, match="pending import"):
        env.decrypt(blob)
    again = env.import_(key_id, material, "RSA_AES_KEY_WRAP_SHA_1")
    assert again.KeyMaterialId == first.KeyMaterialId
    assert env.describe(key_id).KeyState is m.KeyState.Enabled
    assert env.decrypt(blob) == b"payload"  # old ciphertexts decrypt again
    (new_ref,) = env.refs(key_id)
    assert new_ref.object_ids != old_ref.object_ids


def test_other_material_is_incorrect_and_leaves_nothing_behind(env: Env) -> None:
    key_id = env.create().KeyId
    env.import_(key_id, os.urandom(32))
    env.delete_material(key_id)
    params = env.parameters(key_id)
    before = env.keystore.list_objects()
    with pytest.raises(IncorrectKeyMaterialException):
        env.import_(key_id, os.urandom(32), params=params)
    assert env.keystore.list_objects() == before
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport
    # ... also while the material is imported.
    material = os.urandom(32)
    other = env.create().KeyId
    env.import_(other, material)
    with pytest.raises(IncorrectKeyMaterialException):
        env.import_(other, os.urandom(32))
    assert offline_decrypt(material, env.encrypt(other)) == b"payload"


def test_the_same_material_in_two_keys_has_two_material_ids(env: Env) -> None:
    material = os.urandom(32)
    a, b = env.create().KeyId, env.create().KeyId
    assert env.import_(a, material).KeyMaterialId != env.import_(b, material).KeyMaterialId


def test_reimport_while_imported_changes_only_the_expiration(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    env.import_(key_id, material)
    refs = env.refs(key_id)
    before = key_objects(env)
    valid_to = T0 + dt.timedelta(days=30)
    env.import_(key_id, material, ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=valid_to)
    assert env.refs(key_id) == refs  # the same token objects
    assert key_objects(env) == before  # the new copy was destroyed
    meta = env.describe(key_id)
    assert (meta.ExpirationModel, meta.ValidTo) == (
        m.ExpirationModel.KEY_MATERIAL_EXPIRES,
        valid_to,
    )


def test_key_material_id_must_match_when_given(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    material_id = env.import_(key_id, material).KeyMaterialId
    assert material_id is not None
    with pytest.raises(IncorrectKeyMaterialException):
        env.import_(key_id, material, KeyMaterialId="0" * 64)
    assert env.import_(key_id, material, KeyMaterialId=material_id).KeyMaterialId == material_id


# -- the import token -------------------------------------------------------------------------


def test_an_import_token_works_until_it_expires(env: Env) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id)
    env.clock.advance(hours=23, minutes=59)
    env.import_(key_id, os.urandom(32), params=params)  # still valid
    env.delete_material(key_id)
    env.clock.advance(minutes=1)
    with pytest.raises(ExpiredImportTokenException):
        env.import_(key_id, os.urandom(32), params=params)


def test_expired_tokens_are_purged_with_their_wrapping_keys_and_still_say_expired(
    env: Env,
) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id)
    token_id = decode_import_token(params.ImportToken)[0]
    row = env.store.get_import_token(token_id)
    assert row is not None
    env.clock.advance(hours=24)
    report = env.service.run_due_tasks()
    assert report.import_tokens == 1
    assert env.store.get_import_token(token_id) is None
    assert not [o for o in env.keystore.list_objects() if o.object_id in row.wrapping_key]
    with pytest.raises(ExpiredImportTokenException):
        env.import_(key_id, os.urandom(32), params=params)


def test_tampered_tokens_are_invalid(env: Env) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id)
    wrapped = wrap(params.PublicKey, "RSAES_OAEP_SHA_1", os.urandom(32))
    token = params.ImportToken
    candidates = [token[:-1], token + b"\x00", b"\x02" + token[1:]]
    candidates += [token[:i] + bytes([token[i] ^ 0x80]) + token[i + 1 :] for i in (1, 16, 20, 40)]
    for bad in candidates:
        with pytest.raises(InvalidImportTokenException):
            env.service.import_key_material(
                m.ImportKeyMaterialRequest(
                    KeyId=key_id, ImportToken=bad, EncryptedKeyMaterial=wrapped,
                    ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
                )
            )  # fmt: skip
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport


def test_a_token_of_another_key_is_invalid(env: Env) -> None:
    key_id, other = env.create().KeyId, env.create().KeyId
    params = env.parameters(other)
    with pytest.raises(InvalidImportTokenException):
        env.import_(key_id, os.urandom(32), params=params)


def test_a_tampered_token_row_fails_its_integrity_check(env: Env) -> None:
    key_id = env.create().KeyId
    params = env.parameters(key_id, "RSAES_OAEP_SHA_1")
    env.sql("UPDATE import_tokens SET wrapping_algorithm = 'RSA_AES_KEY_WRAP_SHA_1'")
    with pytest.raises(KeyIntegrityError):
        env.import_(key_id, os.urandom(32), params=params)
    problems = env.store.integrity_problems()
    assert [(p.table, p.key_id) for p in problems] == [("import_tokens", key_id)]


def test_a_token_completes_in_another_service_on_the_same_database(
    env: Env, keystore: Pkcs11Keystore
) -> None:
    """Any server process can complete an import: the state is the sealed row."""
    key_id = env.create().KeyId
    params = env.parameters(key_id)
    other_store = MetadataStore.open_sqlite(
        env.path, clock=env.clock, sealer=TokenRowSealer(keystore)
    )
    try:
        other = KmsService(
            keystore, other_store, region=REGION, account_id=ACCOUNT, clock=env.clock
        )
        material = os.urandom(32)
        other.import_key_material(
            m.ImportKeyMaterialRequest(
                KeyId=key_id, ImportToken=params.ImportToken,
                EncryptedKeyMaterial=wrap(params.PublicKey, "RSAES_OAEP_SHA_1", material),
                ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
            )
        )  # fmt: skip
    finally:
        other_store.close()
    assert offline_decrypt(material, env.encrypt(key_id)) == b"payload"


# -- expiration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ExpirationModel": None}, "A validTo date must be set"),
        ({"ExpirationModel": "KEY_MATERIAL_EXPIRES"}, "A validTo date must be set"),
        (
            {"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE", "ValidTo": T0 + dt.timedelta(1)},
            "cannot be specified",
        ),
        ({"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": T0}, "in the future"),
        (
            {"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": T0 + dt.timedelta(days=366)},
            "365 days",
        ),
        ({"ImportType": "NEW_KEY_MATERIAL", "KeyMaterialId": "a" * 64}, "KeyMaterialId"),
        ({"KeyMaterialDescription": "bad*chars"}, "keyMaterialDescription"),
        ({"KeyMaterialId": "A" * 64}, "keyMaterialId"),
    ],
)
def test_expiration_and_import_members_are_validated(
    env: Env, kwargs: dict[str, Any], words: str
) -> None:
    key_id = env.create().KeyId
    with pytest.raises(ValidationException) as info:
        env.import_(key_id, os.urandom(32), **kwargs)
    assert words in info.value.message
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport


def test_valid_to_may_be_365_days_ahead(env: Env) -> None:
    key_id = env.create().KeyId
    valid_to = T0 + dt.timedelta(days=365)
    env.import_(key_id, os.urandom(32), ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=valid_to)
    assert env.describe(key_id).ValidTo == valid_to


def test_expired_material_is_deleted_by_the_periodic_work(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    env.import_(
        key_id, material, ExpirationModel="KEY_MATERIAL_EXPIRES",
        ValidTo=T0 + dt.timedelta(hours=2),
    )  # fmt: skip
    blob = env.encrypt(key_id)
    (ref,) = env.refs(key_id)
    env.clock.advance(hours=1)
    assert env.service.run_due_tasks().expired == []
    env.clock.advance(hours=1)
    assert env.service.run_due_tasks().expired == [key_id]
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport
    assert not env.keystore.exists(ref)
    assert [(e.name, e.key_version) for e in env.events] == [("DeleteExpiredKeyMaterial", 1)]
    assert env.service.run_due_tasks().expired == []  # once
    env.import_(key_id, material)  # the same material comes back, without expiry
    assert env.decrypt(blob) == b"payload"
    assert env.describe(key_id).ExpirationModel is m.ExpirationModel.KEY_MATERIAL_DOES_NOT_EXPIRE


def test_expiry_of_a_key_pending_deletion_keeps_it_pending_deletion(env: Env) -> None:
    key_id = env.create().KeyId
    env.import_(
        key_id, os.urandom(32), ExpirationModel="KEY_MATERIAL_EXPIRES",
        ValidTo=T0 + dt.timedelta(days=1),
    )  # fmt: skip
    env.service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id))
    env.clock.advance(days=2)
    assert env.service.run_due_tasks().expired == [key_id]
    assert env.describe(key_id).KeyState is m.KeyState.PendingDeletion
    env.service.cancel_key_deletion(m.CancelKeyDeletionRequest(KeyId=key_id))
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport


# -- DeleteImportedKeyMaterial -------------------------------------------------------------------


def test_delete_keeps_a_key_pending_deletion_and_its_deletion_destroys_everything(
    env: Env,
) -> None:
    key_id = env.create().KeyId
    env.import_(key_id, os.urandom(32))
    params = env.parameters(key_id)  # an unused token: its wrapping key goes with the key
    env.service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
    )
    (ref,) = env.refs(key_id)
    env.delete_material(key_id)
    assert env.describe(key_id).KeyState is m.KeyState.PendingDeletion
    assert not env.keystore.exists(ref)
    env.clock.advance(days=8)
    assert env.service.run_due_tasks().purged == [key_id]
    token_id = decode_import_token(params.ImportToken)[0]
    assert env.store.get_import_token(token_id) is None
    assert not [
        o for o in env.keystore.list_objects() if o.is_wrapping_key and key_id[:8] in o.label
    ]
    assert env.sql("SELECT COUNT(*) FROM imported_key_material") == [(0,)]


def test_delete_without_material_has_no_effect(env: Env) -> None:
    key_id = env.create().KeyId
    response = env.delete_material(key_id)
    assert response.KeyMaterialId is None
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport
    env.import_(key_id, os.urandom(32))
    env.delete_material(key_id)
    again = env.delete_material(key_id)  # the material is gone already: no effect
    assert again.KeyMaterialId is not None
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport


def test_delete_of_a_disabled_key(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    env.import_(key_id, material)
    env.service.disable_key(m.DisableKeyRequest(KeyId=key_id))
    env.delete_material(key_id)
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport
    env.import_(key_id, material)
    assert env.describe(key_id).KeyState is m.KeyState.Enabled


def test_delete_of_unknown_material_id_is_not_found(env: Env) -> None:
    key_id = env.create().KeyId
    env.import_(key_id, os.urandom(32))
    with pytest.raises(NotFoundException):
        env.delete_material(key_id, KeyMaterialId="b" * 64)


# -- HMAC material -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "length", "digest"),
    [("HMAC_224", 28, "sha224"), ("HMAC_256", 32, "sha256"), ("HMAC_384", 48, "sha384"),
     ("HMAC_512", 64, "sha512")],
)  # fmt: skip
@pytest.mark.parametrize("algorithm", SHA1_ALGORITHMS)
def test_imported_hmac_material_macs_inside_the_token(
    env: Env, spec: str, length: int, digest: str, algorithm: str
) -> None:
    meta = env.create(KeySpec=spec, KeyUsage="GENERATE_VERIFY_MAC")
    assert meta.MacAlgorithms == [m.MacAlgorithmSpec(f"HMAC_SHA_{spec[5:]}")]
    assert meta.EncryptionAlgorithms is None
    material = os.urandom(length)
    result = env.import_(meta.KeyId, material, algorithm)
    assert result.KeyMaterialId is None  # spec: KeyMaterialId is for symmetric keys only
    described = env.describe(meta.KeyId)
    assert described.KeyState is m.KeyState.Enabled
    assert described.CurrentKeyMaterialId is None
    (ref,) = env.refs(meta.KeyId)
    assert env.keystore.mac(ref, b"message") == hmac.new(material, b"message", digest).digest()
    attributes = env.keystore.attributes(
        ref.object_ids[0], ["SIGN", "VERIFY", "ENCRYPT", "DECRYPT", "EXTRACTABLE", "LOCAL"]
    )
    assert attributes == {
        "SIGN": True, "VERIFY": True, "ENCRYPT": False, "DECRYPT": False,
        "EXTRACTABLE": False, "LOCAL": False,
    }  # fmt: skip
    with pytest.raises(InvalidCiphertextException):
        env.import_(meta.KeyId, os.urandom(length - 1), algorithm)  # shorter than the spec
    env.delete_material(meta.KeyId)
    with pytest.raises(IncorrectKeyMaterialException):
        env.import_(meta.KeyId, os.urandom(length), algorithm)
    env.import_(meta.KeyId, material, algorithm)
    (ref,) = env.refs(meta.KeyId)
    assert env.keystore.mac(ref, b"m2") == hmac.new(material, b"m2", digest).digest()


def test_import_members_for_symmetric_keys_only_are_refused_for_hmac_keys(env: Env) -> None:
    key_id = env.create(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC").KeyId
    cases: list[dict[str, Any]] = [
        {"ImportType": "NEW_KEY_MATERIAL"},
        {"KeyMaterialDescription": "x"},
        {"KeyMaterialId": "a" * 64},
    ]
    for kwargs in cases:
        with pytest.raises(ValidationException, match="symmetric encryption"):
            env.import_(key_id, os.urandom(32), **kwargs)


def test_ed25519_keys_for_imported_material_are_refused(env: Env) -> None:
    with pytest.raises(UnsupportedOperationException, match="ECC_NIST_EDWARDS25519"):
        env.service.create_key(
            m.CreateKeyRequest(
                KeySpec="ECC_NIST_EDWARDS25519", KeyUsage="SIGN_VERIFY", Origin="EXTERNAL"
            )
        )


# -- new key material and on-demand rotation ---------------------------------------------------


def test_new_material_waits_for_an_on_demand_rotation(env: Env) -> None:
    key_id = env.create().KeyId
    first, second = os.urandom(32), os.urandom(32)
    one = env.import_(key_id, first, KeyMaterialDescription="first").KeyMaterialId
    old_blob = env.encrypt(key_id)
    with pytest.raises(KMSInvalidStateException, match="no key material pending rotation"):
        env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
    with pytest.raises(IncorrectKeyMaterialException, match="already associated"):
        env.import_(key_id, first, ImportType="NEW_KEY_MATERIAL")
    two = env.import_(key_id, second, ImportType="NEW_KEY_MATERIAL").KeyMaterialId
    assert offline_decrypt(first, env.encrypt(key_id)) == b"payload"  # not current yet
    with pytest.raises(KMSInvalidStateException, match="is pending rotation"):
        env.import_(key_id, os.urandom(32), ImportType="NEW_KEY_MATERIAL")

    def rotations() -> list[tuple[str | None, Any, Any, Any]]:
        listed = env.service.list_key_rotations(
            m.ListKeyRotationsRequest(KeyId=key_id, IncludeKeyMaterial="ALL_KEY_MATERIAL")
        ).Rotations
        return [
            (r.KeyMaterialId, r.KeyMaterialState, r.ImportState, r.RotationType) for r in listed
        ]

    assert rotations() == [
        (one, m.KeyMaterialState.CURRENT, m.ImportState.IMPORTED, None),
        (two, m.KeyMaterialState.PENDING_ROTATION, m.ImportState.IMPORTED, None),
    ]
    env.clock.advance(minutes=5)
    env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
    assert env.describe(key_id).CurrentKeyMaterialId == two
    assert offline_decrypt(second, env.encrypt(key_id)) == b"payload"
    assert env.decrypt(old_blob) == b"payload"
    assert rotations() == [
        (one, m.KeyMaterialState.NON_CURRENT, m.ImportState.IMPORTED, None),
        (two, m.KeyMaterialState.CURRENT, m.ImportState.IMPORTED, m.RotationType.ON_DEMAND),
    ]
    only = env.service.list_key_rotations(m.ListKeyRotationsRequest(KeyId=key_id)).Rotations
    assert [(r.KeyMaterialId, r.RotationDate) for r in only] == [
        (two, T0 + dt.timedelta(minutes=5))
    ]
    described = env.service.list_key_rotations(
        m.ListKeyRotationsRequest(KeyId=key_id, IncludeKeyMaterial="ALL_KEY_MATERIAL", Limit=1)
    )
    assert described.Truncated
    assert described.Rotations[0].KeyMaterialDescription == "first"
    # Deleting the old material makes the key unusable until it is imported again.
    env.delete_material(key_id, KeyMaterialId=one)
    assert env.describe(key_id).KeyState is m.KeyState.PendingImport
    env.import_(key_id, first, KeyMaterialId=one)
    assert env.describe(key_id).KeyState is m.KeyState.Enabled
    assert env.decrypt(old_blob) == b"payload"


def test_reimport_among_several_materials_finds_its_version(env: Env) -> None:
    key_id = env.create().KeyId
    first, second = os.urandom(32), os.urandom(32)
    env.import_(key_id, first)
    env.import_(key_id, second, ImportType="NEW_KEY_MATERIAL")
    env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
    old, new = env.encrypt(key_id), None
    env.delete_material(key_id, KeyMaterialId=env.describe(key_id).CurrentKeyMaterialId)
    materials = env.store.imported_materials(key_id)
    env.delete_material(key_id, KeyMaterialId=materials[0].key_material_id)
    env.import_(key_id, first)  # no KeyMaterialId: recognized as version 1
    env.import_(key_id, second)
    labels = {o.object_id: o.label for o in env.keystore.list_objects()}
    for version, ref in enumerate(env.refs(key_id), start=1):
        assert labels[ref.object_ids[0]].endswith(f":{version}:a")
    new = env.encrypt(key_id)
    assert offline_decrypt(second, new) == offline_decrypt(second, old) == b"payload"


# -- authorization: condition keys, grants --------------------------------------------------------


def _policy(*statements: dict[str, Any]) -> str:
    root = {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"}
    return json.dumps({"Version": "2012-10-17", "Statement": [root, *statements]})


def test_wrapping_condition_keys_decide_get_parameters_for_import(env: Env) -> None:
    policy = _policy(
        {
            "Effect": "Allow",
            "Principal": {"AWS": ALICE},
            "Action": "kms:GetParametersForImport",
            "Resource": "*",
            "Condition": {
                "StringEquals": {
                    "kms:WrappingAlgorithm": "RSA_AES_KEY_WRAP_SHA_1",
                    "kms:WrappingKeySpec": "RSA_2048",
                }
            },
        }
    )
    key_id = env.create(Policy=policy).KeyId
    alice = caller(ALICE)

    def ask(algorithm: str) -> None:
        env.service.get_parameters_for_import(
            m.GetParametersForImportRequest(
                KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048"
            ),
            caller=alice,
        )

    ask("RSA_AES_KEY_WRAP_SHA_1")
    with pytest.raises(AccessDeniedException):
        ask("RSAES_OAEP_SHA_1")


def test_expiration_condition_keys_decide_import_key_material(env: Env) -> None:
    limit = (T0 + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    policy = _policy(
        {
            "Effect": "Allow",
            "Principal": {"AWS": ALICE},
            "Action": "kms:ImportKeyMaterial",
            "Resource": "*",
            "Condition": {
                "StringEquals": {"kms:ExpirationModel": "KEY_MATERIAL_EXPIRES"},
                "DateLessThanEquals": {"kms:ValidTo": limit},
            },
        }
    )
    key_id = env.create(Policy=policy).KeyId
    material = os.urandom(32)
    alice = caller(ALICE)

    def import_as_alice(**kwargs: Any) -> None:
        params = env.parameters(key_id)
        env.service.import_key_material(
            m.ImportKeyMaterialRequest(
                KeyId=key_id, ImportToken=params.ImportToken,
                EncryptedKeyMaterial=wrap(params.PublicKey, "RSAES_OAEP_SHA_1", material),
                **kwargs,
            ),
            caller=alice,
        )  # fmt: skip

    with pytest.raises(AccessDeniedException):
        import_as_alice(ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    with pytest.raises(AccessDeniedException):
        import_as_alice(ValidTo=T0 + dt.timedelta(days=31))
    import_as_alice(ValidTo=T0 + dt.timedelta(days=30))
    assert env.describe(key_id).KeyState is m.KeyState.Enabled


def test_grants_cover_use_of_imported_material_but_never_its_import(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    env.import_(key_id, material)
    env.service.create_grant(
        m.CreateGrantRequest(KeyId=key_id, GranteePrincipal=ALICE, Operations=["Encrypt"])
    )
    alice = caller(ALICE)
    blob = env.service.encrypt(
        m.EncryptRequest(KeyId=key_id, Plaintext=b"granted"), caller=alice
    ).CiphertextBlob
    assert offline_decrypt(material, blob) == b"granted"
    with pytest.raises(AccessDeniedException):
        env.service.get_parameters_for_import(
            m.GetParametersForImportRequest(
                KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
            ),
            caller=alice,
        )
    with pytest.raises(AccessDeniedException):
        env.service.delete_imported_key_material(
            m.DeleteImportedKeyMaterialRequest(KeyId=key_id), caller=alice
        )
    assert env.describe(key_id).KeyState is m.KeyState.Enabled


# -- secrets stay out of the database -------------------------------------------------------------


def test_the_material_is_not_in_the_database(env: Env) -> None:
    key_id = env.create().KeyId
    material = os.urandom(32)
    params = env.parameters(key_id)
    wrapped = wrap(params.PublicKey, "RSAES_OAEP_SHA_1", material)
    env.service.import_key_material(
        m.ImportKeyMaterialRequest(
            KeyId=key_id, ImportToken=params.ImportToken, EncryptedKeyMaterial=wrapped,
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
        )
    )  # fmt: skip
    env.store.close()
    raw = b"".join(p.read_bytes() for p in env.path.parent.glob("kms.db*"))
    for secret in (material, wrapped, params.ImportToken, hashlib.sha256(material).digest()):
        assert secret not in raw
        assert secret.hex().encode() not in raw
    env.store = MetadataStore.open_sqlite(env.path, sealer=TokenRowSealer(env.keystore))


def test_leftover_wrapping_keys_are_destroyed_once_their_day_has_passed(env: Env) -> None:
    """A crash between making a wrapping key pair and recording its token leaves the pair on
    the token; the periodic work recognizes it by its label's day and destroys it."""
    from hsmkms.keystore.imports import WrappingKeySpec, wrapping_key_name

    key_id = env.create().KeyId
    params = env.parameters(key_id)  # recorded: kept
    old, _ = env.keystore.create_wrapping_key(
        WrappingKeySpec.RSA_2048, wrapping_key_name(key_id, T0.date() - dt.timedelta(days=1))
    )
    fresh, _ = env.keystore.create_wrapping_key(
        WrappingKeySpec.RSA_2048, wrapping_key_name(key_id, T0.date() + dt.timedelta(days=1))
    )
    env.service.run_due_tasks()
    present = {o.object_id for o in env.keystore.list_objects()}
    assert old.object_id not in present
    assert fresh.object_id in present
    env.import_(key_id, os.urandom(32), params=params)  # its pair is still there
    env.keystore.destroy_wrapping_key(fresh)


def test_the_custody_report_tells_imported_material_apart(tmp_path: Path) -> None:
    """``hsmkms report`` on a data directory with imported material (CKA_LOCAL false) and a key
    still waiting for it: the report is made, and says where the material came from."""
    import sys

    from local_system import open_system

    data_dir = tmp_path / "data"
    with open_system(data_dir) as system:
        local = Env(system.service, system.store, system.keystore, ManualClock(), data_dir, [])  # type: ignore[arg-type]
        imported = local.create(Description="imported").KeyId
        local.import_(imported, os.urandom(32))
        waiting = local.create(Description="waiting").KeyId
    out = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "report", "--data-dir", str(data_dir),
         "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    keys = {k["keyId"]: k for k in json.loads(out.stdout)["report"]["keys"]}
    assert keys[waiting]["versions"] == []
    (version,) = keys[imported]["versions"]
    reasons = " ".join(version["custody"]["reasons"])
    assert "CKA_LOCAL false" in reasons
    assert "Origin EXTERNAL" in reasons
