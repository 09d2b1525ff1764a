"""The use counter of AES-GCM key versions (issue 14, "Also"): random 96-bit IVs are good for
2^32 encryptions under one key, so a version refuses to encrypt past its limit, counted across
processes in blocks, and rotating the key goes on. Real token, real database; the limit and the
block are small here (2^32 encryptions are not made in a test)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import store_url

from hsmkms import models as m
from hsmkms.db import Database
from hsmkms.errors import DisabledException, KMSInvalidStateException
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.store import MetadataStore
from hsmkms.store.uses import BLOCK, LIMIT, KeyVersionUses, VersionExhausted

pytestmark = [pytest.mark.hsm, pytest.mark.database]

REGION = "eu-west-1"
ACCOUNT = "111122223333"
KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(store_url(tmp_path / "kms.db"))
    yield db
    db.close()


def test_the_defaults_are_the_gcm_bound_and_a_block_of_65536() -> None:
    assert (LIMIT, BLOCK) == (2**32, 65_536)


def test_processes_share_the_limit_through_their_blocks(database: Database, tmp_path: Path) -> None:
    """Two counters (two processes) on one database hand out at most the limit between them:
    each takes blocks, and the database's count never falls below what was used."""
    other_db = Database(store_url(tmp_path / "kms.db"))
    try:
        first = KeyVersionUses(database, block=4, limit=10)
        second = KeyVersionUses(other_db, block=4, limit=10)
        made = 0
        for counter in (first, second, first, second, first, second):
            try:
                counter.take(KEY, 1)
                made += 1
            except VersionExhausted:
                break
        # first holds [0, 4) and used 3 of it, second holds [4, 8) and used 3.
        assert made == 6
        assert first.reserved(KEY, 1) == 8
        for _ in range(3):
            first.take(KEY, 1)  # the last of its block, then [8, 10), all of it
        with pytest.raises(VersionExhausted):
            first.take(KEY, 1)
        second.take(KEY, 1)  # the last of its own block
        with pytest.raises(VersionExhausted):
            second.take(KEY, 1)
        # 10 encryptions in all: the limit, never more.
        assert first.reserved(KEY, 1) == 10
        # Another version counts on its own.
        second.take(KEY, 2)
        assert second.reserved(KEY, 2) == 4
    finally:
        other_db.close()


def test_half_the_limit_is_reported_once(database: Database) -> None:
    seen: list[tuple[str, int]] = []
    counter = KeyVersionUses(database, block=2, limit=8, on_half=lambda k, v: seen.append((k, v)))
    for _ in range(8):
        counter.take(KEY, 3)
    assert seen == [(KEY, 3)]


def test_a_block_larger_than_the_limit_is_refused(database: Database) -> None:
    with pytest.raises(ValueError, match="block"):
        KeyVersionUses(database, block=11, limit=10)


def _encrypt(service: KmsService, key_id: str) -> bytes:
    return service.encrypt(m.EncryptRequest(KeyId=key_id, Plaintext=b"payload")).CiphertextBlob


def test_a_gcm_version_at_its_limit_refuses_to_encrypt_until_the_key_rotates(
    keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    store = MetadataStore(store_url(tmp_path / "kms.db"))
    uses = KeyVersionUses(store.database, block=2, limit=5)
    service = KmsService(keystore, store, region=REGION, account_id=ACCOUNT, uses=uses)
    try:
        key = service.create_key(m.CreateKeyRequest()).KeyMetadata
        blobs = [_encrypt(service, key.KeyId) for _ in range(5)]
        with pytest.raises(KMSInvalidStateException, match="key version 1 has made the 5 "):
            _encrypt(service, key.KeyId)
        with pytest.raises(KMSInvalidStateException):
            service.generate_data_key(m.GenerateDataKeyRequest(KeyId=key.KeyId, NumberOfBytes=32))
        # Decryption is not an encryption: old ciphertexts still open.
        for blob in blobs:
            assert service.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext == b"payload"
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
        fresh = _encrypt(service, key.KeyId)
        assert service.decrypt(m.DecryptRequest(CiphertextBlob=fresh)).Plaintext == b"payload"
        assert uses.reserved(key.KeyId, 2) == 2
    finally:
        store.close()


def test_the_portable_profile_is_not_counted(
    portable_keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """CBC+HMAC draws 128-bit IVs: the 2^32 bound of 96-bit GCM IVs does not apply."""
    store = MetadataStore(store_url(tmp_path / "kms.db"))
    uses = KeyVersionUses(store.database, block=1, limit=2)
    service = KmsService(portable_keystore, store, region=REGION, account_id=ACCOUNT, uses=uses)
    try:
        key = service.create_key(m.CreateKeyRequest()).KeyMetadata
        for _ in range(4):
            base64.b64encode(_encrypt(service, key.KeyId))
        assert uses.reserved(key.KeyId, 1) == 0
    finally:
        store.close()


def test_a_forked_child_does_not_use_its_parent_s_block(database: Database) -> None:
    """A worker forked after its parent reserved a block reserves its own: two processes never
    count within one block."""
    import multiprocessing

    counter = KeyVersionUses(database, block=4, limit=100)
    counter.take(KEY, 1)  # the parent holds [0, 4)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=counter.take, args=(KEY, 1))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert counter.reserved(KEY, 1) == 8  # the child reserved [4, 8)


def test_another_process_s_block_reservation_keeps_our_key_cache_but_its_key_change_is_seen(
    keystore: Pkcs11Keystore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes (two stores on one database): the other's first Encrypt reserves a block
    (a write no read cache depends on), which leaves our cached key record in place; its
    DisableKey is a change that decides our very next request."""
    url = store_url(tmp_path / "kms.db")
    ours_store = MetadataStore(url, cache_check_interval=0)
    theirs_store = MetadataStore(url, cache_check_interval=0)
    try:
        ours = KmsService(keystore, ours_store, region=REGION, account_id=ACCOUNT)
        theirs = KmsService(keystore, theirs_store, region=REGION, account_id=ACCOUNT)
        key_id = ours.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
        _encrypt(ours, key_id)
        reads: list[str] = []
        load = ours_store._get_key_and_version

        def counted(key: str, version: int | None) -> object:
            reads.append(key)
            return load(key, version)

        monkeypatch.setattr(ours_store, "_get_key_and_version", counted)
        _encrypt(ours, key_id)
        assert reads == []  # cached
        _encrypt(theirs, key_id)  # their first use: a block of their own
        assert KeyVersionUses(theirs_store.database).reserved(key_id, 1) == 2 * BLOCK
        _encrypt(ours, key_id)
        assert reads == []  # still cached: the reservation changed nothing we hold
        theirs.disable_key(m.DisableKeyRequest(KeyId=key_id))
        with pytest.raises(DisabledException):
            _encrypt(ours, key_id)
        assert reads == [key_id]
    finally:
        theirs_store.close()
        ours_store.close()
