"""Key versions, rotation, deletion that really deletes, crash safety and the consistency check,
on real SoftHSM2 tokens and a real SQLite file. Time moves by a manual clock, never by sleeping
(except the background thread test, which waits for a real thread)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import store_url

from conftest import new_key_version
from hsmkms import models as m
from hsmkms.ciphertext import CiphertextBlob
from hsmkms.errors import (
    ConflictException,
    KMSInternalException,
    LimitExceededException,
    NotFoundException,
    ValidationException,
)
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore, schema

pytestmark = [pytest.mark.hsm, pytest.mark.database, pytest.mark.vendors]

REGION = "ap-southeast-2"
ACCOUNT = "111122223333"
T0 = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


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
    svc.stop()
    svc.store.close()


@pytest.fixture
def key(service: KmsService) -> m.KeyMetadata:
    return service.create_key(m.CreateKeyRequest()).KeyMetadata


def _encrypt(service: KmsService, key_id: str, data: bytes) -> bytes:
    return service.encrypt(m.EncryptRequest(KeyId=key_id, Plaintext=data)).CiphertextBlob


def _decrypt(service: KmsService, blob: bytes) -> bytes:
    return service.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext


def _status(service: KmsService, key_id: str) -> m.GetKeyRotationStatusResponse:
    return service.get_key_rotation_status(m.GetKeyRotationStatusRequest(KeyId=key_id))


def _object_ids(service: KmsService, key_id: str) -> set[str]:
    ids: set[str] = set()
    for version in service.store.list_versions(key_id).items:
        ids.update(KeyMaterialRef.from_str(version.material_ref).object_ids)
    return ids


def _token_ids(keystore: Pkcs11Keystore) -> set[str]:
    return {o.object_id for o in keystore.list_objects()}


# -- rotation settings ----------------------------------------------------------------------------


def test_enable_rotation_default_period(service: KmsService, key: m.KeyMetadata) -> None:
    assert _status(service, key.KeyId).KeyRotationEnabled is False
    service.enable_key_rotation(m.EnableKeyRotationRequest(KeyId=key.Arn))
    status = _status(service, key.KeyId)
    assert status.KeyRotationEnabled is True
    assert status.KeyId == key.Arn
    assert status.RotationPeriodInDays == 365
    # spec: the first rotation comes one period after enabling (§3.6).
    assert status.NextRotationDate == T0 + 365 * DAY
    service.disable_key_rotation(m.DisableKeyRotationRequest(KeyId=key.KeyId))
    status = _status(service, key.KeyId)
    assert status.KeyRotationEnabled is False
    assert status.NextRotationDate is None


@pytest.mark.parametrize(("days", "ok"), [(89, False), (90, True), (2560, True), (2561, False)])
def test_rotation_period_range(
    service: KmsService, key: m.KeyMetadata, days: int, ok: bool
) -> None:
    request = m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=days)
    if ok:
        service.enable_key_rotation(request)
        assert _status(service, key.KeyId).RotationPeriodInDays == days
    else:
        with pytest.raises(ValidationException) as info:
            service.enable_key_rotation(request)
        assert f"Value '{days}' at 'rotationPeriodInDays'" in info.value.message


# -- automatic rotation ---------------------------------------------------------------------------


def test_rotation_on_use(service: KmsService, key: m.KeyMetadata, clock: ManualClock) -> None:
    old = _encrypt(service, key.KeyId, b"before")
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    clock.advance(days=89)
    assert CiphertextBlob.parse(_encrypt(service, key.KeyId, b"x")).key_version == 1
    clock.advance(days=1)
    new = _encrypt(service, key.KeyId, b"after")  # due: rotated before encrypting
    assert CiphertextBlob.parse(new).key_version == 2
    assert _decrypt(service, old) == b"before"
    assert _decrypt(service, new) == b"after"
    rotations = service.list_key_rotations(m.ListKeyRotationsRequest(KeyId=key.KeyId)).Rotations
    assert len(rotations) == 1
    assert rotations[0].RotationType is m.RotationType.AUTOMATIC
    assert rotations[0].RotationDate == T0 + 90 * DAY
    assert rotations[0].KeyMaterialState is m.KeyMaterialState.CURRENT
    assert _status(service, key.KeyId).NextRotationDate == T0 + 180 * DAY


def test_several_rotations_keep_old_ciphertexts(
    any_keystore: Pkcs11Keystore, tmp_path: Path, clock: ManualClock
) -> None:
    service = _service(any_keystore, tmp_path / "kms.db", clock)
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    blobs = {1: _encrypt(service, key.KeyId, b"v1")}
    for version in (2, 3, 4):
        clock.advance(days=90)
        report = service.run_due_tasks()
        assert report.rotated == [key.KeyId]
        assert report.purged == []
        blob = _encrypt(service, key.KeyId, f"v{version}".encode())
        parsed = CiphertextBlob.parse(blob)
        assert parsed.key_version == version
        assert parsed.profile is any_keystore.profile
        blobs[version] = blob
    assert service.run_due_tasks().rotated == []  # nothing due right after a rotation
    for version, blob in blobs.items():
        assert _decrypt(service, blob) == f"v{version}".encode()
    meta = service.describe_key(m.DescribeKeyRequest(KeyId=key.KeyId)).KeyMetadata
    assert (
        meta.CurrentKeyMaterialId
        == service.decrypt(m.DecryptRequest(CiphertextBlob=blobs[4])).KeyMaterialId
    )
    versions = service.store.list_versions(key.KeyId).items
    assert [v.profile for v in versions] == [any_keystore.profile.value] * 4
    service.store.close()


def test_disabled_and_pending_deletion_keys_do_not_rotate(
    service: KmsService, key: m.KeyMetadata, clock: ManualClock
) -> None:
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    service.disable_key(m.DisableKeyRequest(KeyId=key.KeyId))
    clock.advance(days=200)
    assert service.run_due_tasks().rotated == []
    # spec: on re-enable, material older than a period is rotated at once (§3.6).
    service.enable_key(m.EnableKeyRequest(KeyId=key.KeyId))
    assert service.store.get_key(key.KeyId).current_version == 2  # type: ignore[union-attr]
    service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key.KeyId))
    # spec: KeyRotationEnabled reads false while pending deletion, restored on cancel (§3.6).
    assert _status(service, key.KeyId).KeyRotationEnabled is False
    clock.advance(days=20)
    assert service.run_due_tasks().rotated == []
    service.cancel_key_deletion(m.CancelKeyDeletionRequest(KeyId=key.KeyId))
    assert _status(service, key.KeyId).KeyRotationEnabled is True


def test_disabling_rotation_stops_it(
    service: KmsService, key: m.KeyMetadata, clock: ManualClock
) -> None:
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    service.disable_key_rotation(m.DisableKeyRotationRequest(KeyId=key.KeyId))
    clock.advance(days=400)
    assert service.run_due_tasks().rotated == []
    assert CiphertextBlob.parse(_encrypt(service, key.KeyId, b"x")).key_version == 1


def test_background_thread_rotates(
    service: KmsService, key: m.KeyMetadata, clock: ManualClock
) -> None:
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    clock.advance(days=91)
    service.start_background(0.02)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if service.store.get_key(key.KeyId).current_version == 2:  # type: ignore[union-attr]
            break
        time.sleep(0.02)
    service.stop()
    assert service.store.get_key(key.KeyId).current_version == 2  # type: ignore[union-attr]


def test_lost_rotation_race_leaves_no_orphan(
    service: KmsService, keystore: Pkcs11Keystore, key: m.KeyMetadata, clock: ManualClock
) -> None:
    """Two rotators saw the same due key: the loser's token object is destroyed."""
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    clock.advance(days=90)
    stale = service.store.get_key(key.KeyId)
    assert stale is not None
    assert service.run_due_tasks().rotated == [key.KeyId]
    before = _token_ids(keystore)
    assert service._rotate(stale, m.RotationType.AUTOMATIC) is None
    assert service.store.get_key(key.KeyId).current_version == 2  # type: ignore[union-attr]
    assert _token_ids(keystore) == before
    assert service.find_inconsistencies().missing == []


# -- on-demand rotation -------------------------------------------------------------------------


def test_on_demand_rotation(service: KmsService, key: m.KeyMetadata, clock: ManualClock) -> None:
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    next_date = _status(service, key.KeyId).NextRotationDate
    old = _encrypt(service, key.KeyId, b"old")
    clock.advance(hours=1)
    resp = service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    assert resp.KeyId == key.Arn
    assert CiphertextBlob.parse(_encrypt(service, key.KeyId, b"new")).key_version == 2
    assert _decrypt(service, old) == b"old"
    # spec: on-demand rotation does not change the automatic schedule (§3.6).
    assert _status(service, key.KeyId).NextRotationDate == next_date
    entry = service.list_key_rotations(m.ListKeyRotationsRequest(KeyId=key.KeyId)).Rotations[0]
    assert entry.RotationType is m.RotationType.ON_DEMAND
    assert entry.RotationDate == T0 + dt.timedelta(hours=1)


def test_twenty_five_on_demand_rotations(service: KmsService, key: m.KeyMetadata) -> None:
    # Token keys take tens of ms to make: count the first 22 rotations in the database only.
    with service.store.engine.begin() as conn:
        conn.execute(
            schema.keys.update().where(schema.keys.c.id == key.KeyId).values(on_demand_rotations=22)
        )
    for _ in range(3):
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    with pytest.raises(LimitExceededException) as info:
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    # spec: the wording LocalStack models on AWS's answer.
    assert info.value.message == (
        "The on-demand rotations limit has been reached for the given keyId. No more on-demand "
        f"rotations can be performed for this key: {key.Arn}"
    )
    assert service.store.get_key(key.KeyId).current_version == 4  # type: ignore[union-attr]


def test_list_key_rotations_pagination(service: KmsService, key: m.KeyMetadata) -> None:
    for _ in range(4):
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    page = service.list_key_rotations(m.ListKeyRotationsRequest(KeyId=key.KeyId, Limit=3))
    assert page.Truncated
    assert len(page.Rotations) == 3
    seen = [r.KeyMaterialId for r in page.Rotations]
    marker = page.NextMarker
    while marker is not None:
        more = service.list_key_rotations(
            m.ListKeyRotationsRequest(KeyId=key.KeyId, Limit=3, Marker=marker)
        )
        seen += [r.KeyMaterialId for r in more.Rotations]
        marker = more.NextMarker
    assert len(seen) == len(set(seen)) == 4
    everything = service.list_key_rotations(
        m.ListKeyRotationsRequest(
            KeyId=key.KeyId, IncludeKeyMaterial=m.IncludeKeyMaterial.ALL_KEY_MATERIAL, Limit=1000
        )
    ).Rotations
    assert len(everything) == 5
    assert everything[0].RotationType is None
    assert everything[0].KeyMaterialState is m.KeyMaterialState.NON_CURRENT
    assert everything[-1].KeyMaterialState is m.KeyMaterialState.CURRENT
    with pytest.raises(ValidationException):
        service.list_key_rotations(m.ListKeyRotationsRequest(KeyId=key.KeyId, Limit=1001))


def test_on_demand_conflicts_with_imminent_automatic_rotation(
    service: KmsService, key: m.KeyMetadata, clock: ManualClock
) -> None:
    service.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    clock.advance(days=90, minutes=-10)
    with pytest.raises(ConflictException):
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))


# -- deletion that really deletes ------------------------------------------------------------------


def test_purge_destroys_every_token_object(
    any_keystore: Pkcs11Keystore, tmp_path: Path, clock: ManualClock
) -> None:
    service = _service(any_keystore, tmp_path / "kms.db", clock)
    key = service.create_key(m.CreateKeyRequest(Tags=[m.Tag(TagKey="t", TagValue="v")])).KeyMetadata
    keep = service.create_key(m.CreateKeyRequest()).KeyMetadata
    service.create_alias(m.CreateAliasRequest(AliasName="alias/doomed", TargetKeyId=key.KeyId))
    service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    objects = _object_ids(service, key.KeyId)
    per_version = 2 if any_keystore.profile.name.endswith("SHA_256") else 1
    assert len(objects) == 2 * per_version
    assert objects <= _token_ids(any_keystore)
    service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=key.KeyId, PendingWindowInDays=7)
    )
    clock.advance(days=6)
    assert service.run_due_tasks().purged == []
    assert objects <= _token_ids(any_keystore)
    clock.advance(days=1)
    assert service.run_due_tasks().purged == [key.KeyId]
    assert not objects & _token_ids(any_keystore)
    with pytest.raises(NotFoundException):
        service.describe_key(m.DescribeKeyRequest(KeyId=key.KeyId))
    with pytest.raises(NotFoundException):
        service.describe_key(m.DescribeKeyRequest(KeyId="alias/doomed"))
    assert [k.KeyId for k in service.list_keys(m.ListKeysRequest()).Keys] == [keep.KeyId]
    assert service.list_aliases(m.ListAliasesRequest()).Aliases == []
    assert service.purge_due() == []
    assert _decrypt(service, _encrypt(service, keep.KeyId, b"alive")) == b"alive"
    service.store.close()


def test_interrupted_purge_finishes_on_the_next_run(
    service: KmsService, keystore: Pkcs11Keystore, key: m.KeyMetadata, clock: ManualClock
) -> None:
    service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    objects = _object_ids(service, key.KeyId)
    service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=key.KeyId, PendingWindowInDays=7)
    )
    clock.advance(days=8)
    # Simulate a crash half-way: marked Deleting, first version's object destroyed, rows kept.
    assert service.store.mark_deleting(key.KeyId, clock())
    first = service.store.list_versions(key.KeyId).items[0]
    keystore.destroy(KeyMaterialRef.from_str(first.material_ref))
    with pytest.raises(NotFoundException):  # already gone for callers
        service.describe_key(m.DescribeKeyRequest(KeyId=key.KeyId))
    assert key.KeyId not in [k.KeyId for k in service.list_keys(m.ListKeysRequest()).Keys]
    assert service.find_inconsistencies().missing == []  # a purge in progress is not "missing"
    assert service.purge_due() == [key.KeyId]
    assert not objects & _token_ids(keystore)
    assert service.store.get_key(key.KeyId) is None


# -- crash safety and the consistency check -----------------------------------------------


def test_failed_commit_destroys_the_new_token_object(
    service: KmsService, keystore: Pkcs11Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _token_ids(keystore)

    def fail(*args: object, **kwargs: object) -> None:
        raise KMSInternalException("database went away")

    monkeypatch.setattr(service.store, "create_key", fail)
    with pytest.raises(KMSInternalException):
        service.create_key(m.CreateKeyRequest())
    assert _token_ids(keystore) == before


def test_failed_rotation_commit_destroys_the_new_token_object(
    service: KmsService,
    keystore: Pkcs11Keystore,
    key: m.KeyMetadata,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = _token_ids(keystore)

    def fail(*args: object, **kwargs: object) -> None:
        raise KMSInternalException("database went away")

    monkeypatch.setattr(service.store, "add_version", fail)
    with pytest.raises(KMSInternalException):
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
    assert _token_ids(keystore) == before
    monkeypatch.undo()
    assert CiphertextBlob.parse(_encrypt(service, key.KeyId, b"x")).key_version == 1


def test_find_inconsistencies(
    service: KmsService, keystore: Pkcs11Keystore, key: m.KeyMetadata
) -> None:
    clean = service.find_inconsistencies()
    assert clean.missing == []
    assert not _object_ids(service, key.KeyId) & {o.object_id for o in clean.orphans}
    # An orphan: a token object no key version refers to (as after a crash before the commit).
    orphan = new_key_version(keystore, "00000000-0000-4000-8000-0000000000aa")
    # A missing object: a key version whose token object is gone.
    victim = service.create_key(m.CreateKeyRequest()).KeyMetadata
    victim_version = service.store.list_versions(victim.KeyId).items[0]
    keystore.destroy(KeyMaterialRef.from_str(victim_version.material_ref))
    try:
        found = service.find_inconsistencies()
        assert set(orphan.object_ids) <= {o.object_id for o in found.orphans}
        assert found.missing == [(victim.KeyId, 1)]
    finally:
        keystore.destroy(orphan)
