"""The service over a registry of key stores: new keys in the default store, each key version
used, destroyed and checked in the store its material reference names, and key versions
stored with the text form of before (no store id) still working — their rows never rewritten."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import outside_fetch, store_url

from conftest import new_key_version
from hsmkms import models as m
from hsmkms.errors import KMSError
from hsmkms.keystore.base import KeyMaterialRef, Keystore
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.stores import KeyStores
from hsmkms.policy import default_key_policy
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import KeyRecord, KeyVersionRecord, MetadataStore
from hsmkms.store.integrity import TokenRowSealer

pytestmark = [pytest.mark.hsm, pytest.mark.database]

REGION = "eu-central-1"
ACCOUNT = "111122223333"
T0 = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
SECOND = "cks-portable"


@dataclasses.dataclass
class Env:
    path: Path
    clock: ManualClock
    store: MetadataStore
    service: KmsService

    def column(self, sql: str, *params: object) -> list[object]:
        return [row[0] for row in outside_fetch(self.path, sql, *params)]

    def round_trip(self, key_id: str, data: bytes = b"secret") -> bytes:
        blob = self.service.encrypt(m.EncryptRequest(KeyId=key_id, Plaintext=data)).CiphertextBlob
        plain = self.service.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext
        assert plain == data
        return blob

    def add_key(self, ref_text: str) -> str:
        """A key whose first version is ``ref_text``, written through the store (so its rows
        carry valid MACs, as rows written by an older hsmkms do)."""
        key_id = str(uuid.uuid4())
        key = KeyRecord(
            key_id=key_id, arn=self.service.arns.key(key_id), description="",
            key_usage="ENCRYPT_DECRYPT", key_spec="SYMMETRIC_DEFAULT", origin="AWS_KMS",
            state="Enabled", created_at=T0, policy=default_key_policy(ACCOUNT), current_version=1,
        )  # fmt: skip
        profile = KeyMaterialRef.from_str(ref_text).encryption_profile.value
        self.store.create_key(key, KeyVersionRecord(key_id, 1, ref_text, profile, T0, None), {})
        return key_id


def _env(path: Path, stores: Keystore | KeyStores, default: Keystore) -> Env:
    clock = ManualClock(T0)
    store = MetadataStore(store_url(path), clock=clock, sealer=TokenRowSealer(default))
    service = KmsService(stores, store, region=REGION, account_id=ACCOUNT, clock=clock)
    return Env(path, clock, store, service)


@pytest.fixture
def env(
    keystore: Pkcs11Keystore, portable_keystore: Pkcs11Keystore, tmp_path: Path
) -> Iterator[Env]:
    """A service whose default store is the GCM token, with the portable token as a second
    store. (Not closed through the service: the session's keystores outlive the test.)"""
    e = _env(tmp_path / "kms.db", KeyStores(keystore, {SECOND: portable_keystore}), keystore)
    yield e
    e.service.stop()
    e.store.close()


def _in_second_store(portable_keystore: Pkcs11Keystore) -> KeyMaterialRef:
    ref = new_key_version(portable_keystore, str(uuid.uuid4()))
    return dataclasses.replace(ref, store=SECOND)


def test_new_keys_are_made_in_the_default_store_with_the_versioned_text(
    env: Env, keystore: Pkcs11Keystore
) -> None:
    key_id = env.service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
    (text,) = env.column("SELECT material_ref FROM key_versions WHERE key_id = ?", key_id)
    assert isinstance(text, str)
    assert text.startswith("v2:default:SYMMETRIC_DEFAULT:AES_256_GCM:")
    assert keystore.exists(KeyMaterialRef.from_str(text))
    env.round_trip(key_id)


def test_a_version_in_another_store_is_used_and_destroyed_there(
    env: Env, keystore: Pkcs11Keystore, portable_keystore: Pkcs11Keystore
) -> None:
    ref = _in_second_store(portable_keystore)
    assert ref.to_str().startswith(f"v2:{SECOND}:SYMMETRIC_DEFAULT:AES_256_CBC_HMAC_SHA_256:")
    key_id = env.add_key(ref.to_str())
    env.round_trip(key_id)
    assert not keystore.exists(ref)  # not on the default token
    # Rotation makes the new version in the default store; the old one stays where it is.
    env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
    env.round_trip(key_id)
    texts = env.column(
        "SELECT material_ref FROM key_versions WHERE key_id = ? ORDER BY version", key_id
    )
    assert texts[0] == ref.to_str()
    assert isinstance(texts[1], str)
    assert texts[1].startswith("v2:default:")
    assert env.service.find_inconsistencies().missing == []
    env.service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
    )
    env.clock.advance(days=8)
    assert env.service.purge_due() == [key_id]
    assert not portable_keystore.exists(ref)
    assert not keystore.exists(KeyMaterialRef.from_str(str(texts[1])))


def test_a_store_that_is_not_registered_makes_its_keys_unavailable(
    env: Env, keystore: Pkcs11Keystore, portable_keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    ref = _in_second_store(portable_keystore)
    key_id = env.add_key(ref.to_str())
    blob = env.round_trip(key_id)
    env.store.close()
    alone = _env(env.path, keystore, keystore)  # the default store only
    try:
        with pytest.raises(KMSError, match="no key store 'cks-portable'") as info:
            alone.service.encrypt(m.EncryptRequest(KeyId=key_id, Plaintext=b"x"))
        assert info.value.code == "KeyUnavailableException"
        with pytest.raises(KMSError, match="no key store 'cks-portable'") as info:
            alone.service.decrypt(m.DecryptRequest(CiphertextBlob=blob))
        assert info.value.code == "KeyUnavailableException"
        found = alone.service.find_inconsistencies()
        assert (key_id, 1) in found.missing
    finally:
        alone.store.close()
    portable_keystore.destroy(ref)


def test_orphans_are_found_in_every_store(env: Env, portable_keystore: Pkcs11Keystore) -> None:
    orphan = _in_second_store(portable_keystore)
    used = _in_second_store(portable_keystore)
    env.add_key(used.to_str())
    found = env.service.find_inconsistencies()
    orphans = {o.object_id for o in found.orphans}
    assert orphan.object_ids[0] in orphans
    assert used.object_ids[0] not in orphans
    assert found.missing == []
    for ref in (orphan, used):
        portable_keystore.destroy(ref)


@pytest.mark.parametrize("fixture", ["keystore", "portable_keystore"])
def test_versions_stored_in_the_old_text_form_keep_working(
    request: pytest.FixtureRequest, keystore: Pkcs11Keystore, tmp_path: Path, fixture: str
) -> None:
    """A database from before key stores had ids: ``PROFILE:id[,id]`` rows (under their token
    MACs) are read as the default store's, used, rotated past and purged — and never
    rewritten."""
    ks: Pkcs11Keystore = request.getfixturevalue(fixture)
    e = _env(tmp_path / "old.db", ks, keystore)
    try:
        ref = new_key_version(ks, str(uuid.uuid4()))
        profile = ref.encryption_profile.value
        old_text = f"{profile}:{','.join(ref.object_ids)}"
        key_id = e.add_key(old_text)
        blob = e.round_trip(key_id)
        e.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
        e.round_trip(key_id)
        assert e.service.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext == b"secret"
        texts = e.column(
            "SELECT material_ref FROM key_versions WHERE key_id = ? ORDER BY version", key_id
        )
        assert texts[0] == old_text
        assert e.store.integrity_problems() == []
        assert e.service.find_inconsistencies().missing == []
        e.service.schedule_key_deletion(
            m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
        )
        e.clock.advance(days=8)
        assert e.service.purge_due() == [key_id]
        assert not ks.exists(ref)
    finally:
        e.service.stop()
        e.store.close()
