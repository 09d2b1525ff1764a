"""Wrapped key versions (``HSMKMS_KEY_PLACEMENT=wrapped``) on a real SoftHSM2 token: the
material is generated in the token, wrapped there under the token's KEK and kept in the key
material reference; the token holds the KEK only. Through the keystore, the service (a real
SQLite or PostgreSQL store with row MACs) and the real server with boto3."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import cli_process
import jsonschema
import pytest
import sqlalchemy
from local_system import settings_for
from postgres import database_url_for, outside_sql, store_url
from server import database_env, run_cli, running_server

from conftest import token_config
from hsmkms import models as m
from hsmkms.errors import KMSError
from hsmkms.keystore.base import KEK_NAME, KeyMaterialRef, MaterialName
from hsmkms.keystore.config import KeyPlacement
from hsmkms.keystore.errors import WrappedMaterialInvalid
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.profiles import MechanismProfile
from hsmkms.report import schema
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.softhsm import ensure_token
from hsmkms.store import MetadataStore
from hsmkms.system import System

pytestmark = [pytest.mark.hsm]

LABEL = "hsmkms-wrapped"
AAD = b"wrapped test aad"
GCM = MechanismProfile.AES_256_GCM
PORTABLE = MechanismProfile.AES_256_CBC_HMAC_SHA_256
KEY = "0123456789abcdef0123"


@pytest.fixture(scope="module")
def wrapped_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with a token of its own (object counts are this module's alone)."""
    data_dir = tmp_path_factory.mktemp("wrapped")
    ensure_token(data_dir, LABEL)
    return data_dir


def _keystore(data_dir: Path, profile: MechanismProfile | None = None) -> Pkcs11Keystore:
    return Pkcs11Keystore(token_config(data_dir, LABEL, profile, placement=KeyPlacement.WRAPPED))


@pytest.fixture(params=[GCM, PORTABLE], ids=["gcm", "portable"])
def wrapped(request: pytest.FixtureRequest, wrapped_dir: Path) -> Iterator[Pkcs11Keystore]:
    """A keystore placing key versions wrapped, once per mechanism profile."""
    ks = Pkcs11Keystore(
        token_config(wrapped_dir, LABEL, request.param, placement=KeyPlacement.WRAPPED)
    )
    yield ks
    ks.close()


def _kek_objects(ks: Pkcs11Keystore) -> list[str]:
    label = MaterialName.service_key(KEK_NAME).base
    return [o.object_id for o in ks.list_objects() if o.label == label]


# -- the reference ----------------------------------------------------------------------------


def test_a_wrapped_reference_round_trips_through_its_text() -> None:
    ref = KeyMaterialRef(
        KeyMaterialSpec.SYMMETRIC_DEFAULT, PORTABLE, (), kek_id="ab" * 16,
        wrapped=(bytes(40), bytes(range(40))), local=True,
    )  # fmt: skip
    assert ref.is_wrapped
    assert ref.token_object_ids == ("ab" * 16,)
    assert ref.text.startswith("v3:default:SYMMETRIC_DEFAULT:AES_256_CBC_HMAC_SHA_256:wrapped:")
    assert KeyMaterialRef.from_str(ref.text) == ref
    # The wrapped bytes stay out of reprs (long, and no business of a log line).
    assert base64.b64encode(bytes(range(40))).decode() not in repr(ref)
    assert "wrapped=" not in repr(ref)


@pytest.mark.parametrize(
    "text",
    [
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:abab:1:!!!!",  # not base64
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:abab:1:" + "A" * 12,  # 9 bytes
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:abab:2:" + "A" * 56,  # local flag
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:abab:1:" + "A" * 56 + ",AAAA",
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:xyz:1:" + "A" * 56,  # KEK id not hex
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:token:abab:1:" + "A" * 56,
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:abab:1:" + "A" * 1400,  # too long
        "v3:default:SYMMETRIC_DEFAULT:AES_256_GCM:wrapped:abab:1:" + "A" * 55 + "=",  # 2nd form
    ],
)
def test_a_malformed_wrapped_reference_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"malformed|KEK|wrapped"):
        KeyMaterialRef.from_str(text)


# -- the keystore -----------------------------------------------------------------------------


def test_material_round_trips_and_the_token_holds_only_the_kek(
    wrapped: Pkcs11Keystore,
) -> None:
    ref = wrapped.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 1))
    assert ref.is_wrapped
    assert ref.object_ids == ()
    assert ref.local
    assert len(ref.wrapped) == len(ref.roles)
    assert _kek_objects(wrapped) == [ref.kek_id]
    # Nothing of the version on the token: no object labelled as a key version.
    assert not [o for o in wrapped.list_objects() if o.is_key_version]
    iv, body = wrapped.encrypt(ref, b"secret data", AAD)
    again = KeyMaterialRef.from_str(ref.to_str())
    assert wrapped.decrypt(again, iv, body, AAD) == b"secret data"
    assert wrapped.exists(ref)


@pytest.mark.parametrize("spec", [KeyMaterialSpec.HMAC_256, KeyMaterialSpec.HMAC_512])
def test_hmac_material_is_kept_wrapped(wrapped_dir: Path, spec: KeyMaterialSpec) -> None:
    ks = _keystore(wrapped_dir)
    try:
        ref = ks.create(spec, MaterialName.key_version(KEY, 2))
        assert ref.is_wrapped
        tag = ks.mac(ref, b"message")
        assert ks.verify_mac(ref, b"message", tag)
        assert not ks.verify_mac(ref, b"other message", tag)
    finally:
        ks.close()


def test_key_pairs_and_service_keys_stay_token_objects(wrapped_dir: Path) -> None:
    ks = _keystore(wrapped_dir)
    try:
        pair = ks.create(KeyMaterialSpec.ECC_NIST_P256, MaterialName.key_version(KEY, 3))
        service = ks.create(KeyMaterialSpec.HMAC_256, MaterialName.service_key("wrapped-test"))
        forced = ks.create(
            KeyMaterialSpec.SYMMETRIC_DEFAULT,
            MaterialName.key_version(KEY, 4),
            placement=KeyPlacement.TOKEN,
        )
        assert not pair.is_wrapped
        assert not service.is_wrapped
        assert not forced.is_wrapped
        for ref in (pair, service, forced):
            ks.destroy(ref)
    finally:
        ks.close()


def test_the_kek_is_a_hardened_token_key_that_only_wraps(wrapped: Pkcs11Keystore) -> None:
    ref = wrapped.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 5))
    assert ref.kek_id is not None
    names = ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "LOCAL"]
    names += ["MODIFIABLE", "WRAP", "UNWRAP", "ENCRYPT", "DECRYPT", "SIGN", "TRUSTED"]
    found = wrapped.attributes(ref.kek_id, names)
    assert found == {
        "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
        "NEVER_EXTRACTABLE": True, "LOCAL": True, "MODIFIABLE": False, "WRAP": True,
        "UNWRAP": True, "ENCRYPT": False, "DECRYPT": False, "SIGN": False,
        # Only the SO can set CKA_TRUSTED on SoftHSM2 (docs/keystore.md).
        "TRUSTED": False,
    }  # fmt: skip


def test_the_object_count_does_not_grow_with_keys(wrapped_dir: Path) -> None:
    ks = _keystore(wrapped_dir)
    try:
        ks.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 6))
        before = sorted(o.object_id for o in ks.list_objects())
        refs = [
            ks.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 100 + i))
            for i in range(50)
        ]
        assert sorted(o.object_id for o in ks.list_objects()) == before
        assert len({r.kek_id for r in refs}) == 1
        assert len({r.wrapped for r in refs}) == 50
    finally:
        ks.close()


def test_a_changed_wrapped_blob_does_not_unwrap(wrapped: Pkcs11Keystore) -> None:
    ref = wrapped.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 7))
    iv, body = wrapped.encrypt(ref, b"data", AAD)
    first = ref.wrapped[0]
    changed = KeyMaterialRef(
        ref.spec, ref.profile, (), kek_id=ref.kek_id,
        wrapped=(bytes([first[0] ^ 1]) + first[1:], *ref.wrapped[1:]),
    )  # fmt: skip
    with pytest.raises(WrappedMaterialInvalid):
        wrapped.decrypt(changed, iv, body, AAD)
    with pytest.raises(WrappedMaterialInvalid):
        wrapped.encrypt(changed, b"data", AAD)
    assert wrapped.decrypt(ref, iv, body, AAD) == b"data"


def test_destroying_wrapped_material_leaves_the_token_alone(wrapped: Pkcs11Keystore) -> None:
    ref = wrapped.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 8))
    wrapped.encrypt(ref, b"data", AAD)
    before = sorted(o.object_id for o in wrapped.list_objects())
    wrapped.destroy(ref)
    assert sorted(o.object_id for o in wrapped.list_objects()) == before


def test_unwrapped_copies_are_cached_bounded_and_refilled_after_a_reconnect(
    wrapped_dir: Path,
) -> None:
    calls: list[str] = []
    ks = Pkcs11Keystore(
        token_config(wrapped_dir, LABEL, placement=KeyPlacement.WRAPPED, unwrapped_cache=3),
        observer=lambda op, _seconds: calls.append(op),
    )
    try:
        refs = [
            ks.create(KeyMaterialSpec.SYMMETRIC_DEFAULT, MaterialName.key_version(KEY, 200 + i))
            for i in range(4)
        ]
        sealed = [ks.encrypt(r, b"x", AAD) for r in refs[:3]]
        assert calls.count("unwrap") == 3
        for r, (iv, body) in zip(refs, sealed, strict=False):
            assert ks.decrypt(r, iv, body, AAD) == b"x"
        assert calls.count("unwrap") == 3  # all three at hand
        ks.encrypt(refs[3], b"x", AAD)  # a fourth evicts the least recently used (refs[0])
        assert calls.count("unwrap") == 4
        ks.decrypt(refs[0], *sealed[0], AAD)
        assert calls.count("unwrap") == 5
        # A logout ends the session objects: the next use reconnects and unwraps again.
        ks._connection().anchor.close()
        iv, body = sealed[1]
        assert ks.decrypt(refs[1], iv, body, AAD) == b"x"
        # (The observer also times the attempt that found the KEK's handle stale.)
        refilled = calls.count("unwrap")
        assert refilled > 5
        ks.decrypt(refs[1], iv, body, AAD)
        assert calls.count("unwrap") == refilled
    finally:
        ks.close()


# -- the service --------------------------------------------------------------------------------


def _system(data_dir: Path, placement: str, **kwargs: Any) -> System:
    settings = settings_for(data_dir).model_copy(update={"key_placement": placement})
    return System.open(settings, audit=None, **kwargs)


def _token_objects(system: System) -> int:
    return len(system.keystore.list_objects())


@pytest.mark.database
def test_the_service_keeps_keys_wrapped_and_uses_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with _system(data_dir, "wrapped") as system:
        kms = system.service
        first = kms.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        objects = _token_objects(system)  # the service keys and the KEK
        ids = [kms.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId for _ in range(50)]
        assert _token_objects(system) == objects
        blob = kms.encrypt(m.EncryptRequest(KeyId=first, Plaintext=b"hello")).CiphertextBlob
        kms.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=first))
        assert _token_objects(system) == objects
        data_key = kms.generate_data_key(
            m.GenerateDataKeyRequest(KeyId=ids[7], KeySpec=m.DataKeySpec.AES_256)
        )
        back = kms.decrypt(m.DecryptRequest(CiphertextBlob=data_key.CiphertextBlob))
        assert back.Plaintext == data_key.Plaintext
        assert kms.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext == b"hello"
        blob2 = kms.encrypt(m.EncryptRequest(KeyId=first, Plaintext=b"v2")).CiphertextBlob
        assert kms.decrypt(m.DecryptRequest(CiphertextBlob=blob2)).Plaintext == b"v2"
        refs = [
            KeyMaterialRef.from_str(v.material_ref) for v in system.store.list_versions(first).items
        ]
        assert len(refs) == 2
        assert all(r.is_wrapped for r in refs)
        # The database holds the wrapped bytes only: never the data key, never a key that
        # decrypts without the token.
        for r in refs:
            for w in r.wrapped:
                assert data_key.Plaintext not in w
        found = system.service.find_inconsistencies()
        assert found.missing == []
        assert found.orphans == []
    if database_url_for(data_dir / "hsmkms.db") is None:
        raw = (data_dir / "hsmkms.db").read_bytes()
        assert data_key.Plaintext not in raw
        assert base64.b64encode(data_key.Plaintext) not in raw


@pytest.mark.database
def test_keys_survive_switching_the_placement_both_ways(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    blobs: dict[str, bytes] = {}
    for placement in ("token", "wrapped", "token"):
        with _system(data_dir, placement) as system:
            kms = system.service
            for key_id, blob in blobs.items():
                assert kms.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext == b"p"
                kms.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
                again = kms.encrypt(m.EncryptRequest(KeyId=key_id, Plaintext=b"p"))
                assert kms.decrypt(m.DecryptRequest(CiphertextBlob=again.CiphertextBlob))
            key_id = kms.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
            blobs[key_id] = kms.encrypt(
                m.EncryptRequest(KeyId=key_id, Plaintext=b"p")
            ).CiphertextBlob
            current = system.store.list_versions(key_id).items[-1]
            assert KeyMaterialRef.from_str(current.material_ref).is_wrapped == (
                placement == "wrapped"
            )
            assert system.service.find_inconsistencies().missing == []


@pytest.mark.database
def test_a_wrapped_blob_changed_without_the_row_mac_fails_as_a_kms_error(
    wrapped_dir: Path, tmp_path: Path
) -> None:
    """Without the row MAC (a store opened without the sealer), a changed blob still fails
    cleanly: the token refuses to unwrap it (a KMS error, not a traceback or a wrong key)."""
    ks = _keystore(wrapped_dir)
    store = MetadataStore(store_url(tmp_path / "kms.db"))
    try:
        kms = KmsService(ks, store, region="us-east-1", account_id="111122223333")
        key_id = kms.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        blob = kms.encrypt(m.EncryptRequest(KeyId=key_id, Plaintext=b"p")).CiphertextBlob
        ref = KeyMaterialRef.from_str(store.list_versions(key_id).items[0].material_ref)
        first = ref.wrapped[0]
        changed = KeyMaterialRef(
            ref.spec, ref.profile, (), kek_id=ref.kek_id,
            wrapped=(first[:8] + bytes([first[8] ^ 1]) + first[9:],),
        )  # fmt: skip
        assert (
            outside_sql(
                tmp_path / "kms.db",
                "UPDATE key_versions SET material_ref = ? WHERE key_id = ?",
                changed.to_str(),
                key_id,
            )
            == 1
        )
        store.close()
        store = MetadataStore(store_url(tmp_path / "kms.db"))
        kms = KmsService(ks, store, region="us-east-1", account_id="111122223333")
        with pytest.raises(KMSError) as info:
            kms.decrypt(m.DecryptRequest(CiphertextBlob=blob))
        assert info.value.code == "KeyUnavailableException"
        assert first.hex() not in str(info.value)
    finally:
        store.close()
        ks.close()


@pytest.mark.database
def test_purging_a_wrapped_key_deletes_its_rows_and_leaves_the_token_alone(
    tmp_path: Path,
) -> None:
    clock = ManualClock(dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    with _system(tmp_path / "data", "wrapped", clock=clock) as system:
        kms = system.service
        key_id = kms.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        kms.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
        objects = sorted(o.object_id for o in system.keystore.list_objects())
        kms.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7))
        clock.advance(dt.timedelta(days=8))
        assert kms.purge_due() == [key_id]
        assert system.store.get_key(key_id) is None
        assert sorted(o.object_id for o in system.keystore.list_objects()) == objects
        assert kms.find_inconsistencies().missing == []


@pytest.mark.database
def test_the_report_says_wrapped_under_the_kek(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with _system(data_dir, "wrapped") as system:
        key_id = system.service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        version = system.store.get_version(key_id, 1)
        assert version is not None
        kek_id = KeyMaterialRef.from_str(version.material_ref).kek_id
    env = {**os.environ, **database_env(data_dir, None)}
    out = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "report", "--data-dir", str(data_dir),
         "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker()).validate(
        document
    )
    (key,) = document["report"]["keys"]
    (found,) = key["versions"]
    assert found["placement"] == "WRAPPED"
    assert found["custody"]["text"] == (
        f"wrapped under KEK {kek_id}, LOCAL=true (generated in the HSM, stored wrapped)"
    )
    assert found["custody"]["verdict"] == "NOT_EXTRACTABLE"
    (kek,) = found["objects"]
    assert kek["role"] == "kek"
    assert kek["objectId"] == kek_id
    assert kek["attributes"]["EXTRACTABLE"] is False
    assert kek["attributes"]["NEVER_EXTRACTABLE"] is True


def test_a_backup_restores_wrapped_keys_with_their_kek(tmp_path: Path) -> None:
    """The database holds the wrapped material, the token the KEK: a backup takes both."""
    data_dir = tmp_path / "data"
    with _system(data_dir, "wrapped") as system:
        key_id = system.service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        blob = system.service.encrypt(
            m.EncryptRequest(KeyId=key_id, Plaintext=b"kept")
        ).CiphertextBlob
    out = tmp_path / "b.tar.gz"
    made = run_cli("backup", "--out", str(out), "--data-dir", str(data_dir))
    assert made.returncode == 0, made.stdout + made.stderr
    target = tmp_path / "restored"
    restored = run_cli("restore", str(out), "--data-dir", str(target))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    with _system(target, "token") as system:
        back = system.service.decrypt(m.DecryptRequest(CiphertextBlob=blob))
        assert back.Plaintext == b"kept"
        assert system.service.find_inconsistencies().missing == []


# -- the server ---------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.database
def test_boto3_against_a_server_keeping_keys_wrapped(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {"HSMKMS_KEY_PLACEMENT": "wrapped"}
    with running_server(data_dir, workers=2, env=env) as server:
        kms = server.client()
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"over http")["CiphertextBlob"]
        for _ in range(10):  # two workers: each unwraps the version on its first use
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"over http"
        kms.rotate_key_on_demand(KeyId=key_id)
        data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"over http"
        plain = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
        assert plain == data_key["Plaintext"]
        mac_key = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
        mac_id = mac_key["KeyMetadata"]["KeyId"]
        tag = kms.generate_mac(KeyId=mac_id, Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
        verified = kms.verify_mac(KeyId=mac_id, Message=b"m", MacAlgorithm="HMAC_SHA_256", Mac=tag)
        assert verified["MacValid"]

        versions = _material_refs(server.data_dir / "hsmkms.db", key_id)
        assert len(versions) == 2
        assert all(v.startswith("v3:") for v in versions)
        doctor = server.cli("doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr

        # The row MAC catches a changed blob first: a clean AWS error, no traceback.
        ref = KeyMaterialRef.from_str(versions[0])
        first = ref.wrapped[0]
        changed = KeyMaterialRef(
            ref.spec, ref.profile, (), kek_id=ref.kek_id,
            wrapped=(bytes([first[0] ^ 1]) + first[1:],),
        )  # fmt: skip
        assert (
            outside_sql(
                server.data_dir / "hsmkms.db",
                "UPDATE key_versions SET material_ref = ? WHERE key_id = ? AND version = 1",
                changed.to_str(),
                key_id,
            )
            == 1
        )
        with pytest.raises(botocore.exceptions.ClientError) as info:
            kms.decrypt(CiphertextBlob=blob)
        error = info.value.response["Error"]
        assert error["Code"] == "KMSInvalidStateException"
        assert "failed its integrity check" in error["Message"]
        assert "Traceback" not in server.log()


def _material_refs(db: Path, key_id: str) -> list[str]:
    """The stored references of a key's versions, read outside hsmkms."""
    engine = sqlalchemy.create_engine(store_url(db))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT material_ref FROM key_versions WHERE key_id = :k ORDER BY version"
                ),
                {"k": key_id},
            ).fetchall()
    finally:
        engine.dispose()
    return [str(r[0]) for r in rows]
