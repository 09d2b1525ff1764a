"""Grants in the metadata store, on a real SQLite file: idempotency by name, the per-key limit,
markers, listings and what a purge removes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import store_url

from hsmkms.errors import InvalidMarkerException
from hsmkms.store import (
    GrantRecord,
    KeyMissing,
    KeyRecord,
    KeyVersionRecord,
    LimitReached,
    MetadataStore,
)

pytestmark = pytest.mark.database

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
ALICE = "arn:aws:iam::111122223333:user/alice"
BOB = "arn:aws:iam::111122223333:user/bob"
RETIRER = "arn:aws:iam::111122223333:role/retirer"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(store_url(tmp_path / "meta.db"), clock=lambda: T0)
    for key_id in ("k1", "k2"):
        s.create_key(
            KeyRecord(
                key_id=key_id,
                arn=f"arn:aws:kms:us-east-1:111122223333:key/{key_id}",
                description="",
                key_usage="ENCRYPT_DECRYPT",
                key_spec="SYMMETRIC_DEFAULT",
                origin="AWS_KMS",
                state="Enabled",
                created_at=T0,
                policy="{}",
                current_version=1,
            ),
            KeyVersionRecord(key_id, 1, f"AES_256_GCM:{0:032x}", "AES_256_GCM", T0),
            {},
        )
    yield s
    s.close()


def _grant(n: int, **changes: object) -> GrantRecord:
    values: dict[str, object] = {
        "grant_id": f"{n:064x}",
        "key_id": "k1",
        "name": None,
        "grantee_principal": ALICE,
        "retiring_principal": None,
        "operations": ("Decrypt", "Encrypt"),
        "constraints": None,
        "issuing_account": "111122223333",
        "created_at": T0 + dt.timedelta(seconds=n),
    }
    values.update(changes)
    return GrantRecord(**values)  # type: ignore[arg-type]


def test_create_and_read_back_a_grant(store: MetadataStore) -> None:
    grant = _grant(
        1,
        name="nightly",
        retiring_principal=RETIRER,
        constraints='{"EncryptionContextEquals":{"a":"b"}}',
    )
    assert store.create_grant(grant) == grant
    assert store.get_grant("k1", grant.grant_id) == grant
    assert store.get_grant("k2", grant.grant_id) is None  # another key's id space
    assert store.grants_for("k1", ALICE) == [grant]
    assert store.grants_for("k1", BOB) == []
    assert store.grants_for("k2", ALICE) == []


def test_operations_are_stored_sorted(store: MetadataStore) -> None:
    made = store.create_grant(_grant(1, operations=("Encrypt", "Decrypt", "GenerateDataKey")))
    assert made.operations == ("Decrypt", "Encrypt", "GenerateDataKey")
    assert store.get_grant("k1", made.grant_id) == made


def test_same_name_and_parameters_returns_the_existing_grant(store: MetadataStore) -> None:
    first = store.create_grant(_grant(1, name="job"))
    again = store.create_grant(_grant(2, name="job", operations=("Encrypt", "Decrypt")))
    assert again == first
    assert store.list_grants("k1", 10, None).items == [first]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "other"},
        {"grantee_principal": BOB},
        {"retiring_principal": RETIRER},
        {"operations": ("Decrypt",)},
        {"constraints": '{"EncryptionContextSubset":{"a":"b"}}'},
    ],
)
def test_same_name_with_other_parameters_is_a_new_grant(
    store: MetadataStore, changes: dict[str, object]
) -> None:
    first = store.create_grant(_grant(1, name="job"))
    second = store.create_grant(_grant(2, **{"name": "job", **changes}))
    assert second != first
    assert second.grant_id == f"{2:064x}"
    assert len(store.list_grants("k1", 10, None).items) == 2


def test_grants_without_a_name_are_never_merged(store: MetadataStore) -> None:
    store.create_grant(_grant(1))
    store.create_grant(_grant(2))
    assert len(store.grants_for("k1", ALICE)) == 2


def test_grant_limit_per_key(store: MetadataStore) -> None:
    for n in range(3):
        store.create_grant(_grant(n, name=f"g{n}"), max_per_key=3)
    with pytest.raises(LimitReached):
        store.create_grant(_grant(9), max_per_key=3)
    # An idempotent retry is still answered at the limit; another key has its own count.
    assert store.create_grant(_grant(7, name="g1"), max_per_key=3).grant_id == f"{1:064x}"
    store.create_grant(_grant(9, key_id="k2"), max_per_key=3)
    assert len(store.list_grants("k1", 10, None).items) == 3


def test_grant_on_a_missing_key_is_refused(store: MetadataStore) -> None:
    with pytest.raises(KeyMissing):
        store.create_grant(_grant(1, key_id="gone"))


def test_list_grants_pages_by_creation_time_then_id(store: MetadataStore) -> None:
    # Two grants share a creation time: the id breaks the tie.
    made = [store.create_grant(_grant(n)) for n in (3, 1, 2)]
    made.append(store.create_grant(_grant(4, created_at=T0 + dt.timedelta(seconds=1))))
    made.append(store.create_grant(_grant(5, key_id="k2")))
    expected = [f"{n:064x}" for n in (1, 4, 2, 3)]
    seen: list[str] = []
    marker: str | None = None
    while True:
        page = store.list_grants("k1", 1, marker)
        seen += [g.grant_id for g in page.items]
        if not page.truncated:
            break
        marker = page.next_marker
    assert seen == expected
    assert store.list_grants("k1", 10, None).items[0] == made[1]


def test_list_grants_filters(store: MetadataStore) -> None:
    store.create_grant(_grant(1))
    store.create_grant(_grant(2, grantee_principal=BOB))
    store.create_grant(_grant(3, grantee_principal=BOB))
    assert [g.grant_id for g in store.list_grants("k1", 10, None, grantee_principal=BOB).items] == [
        f"{2:064x}",
        f"{3:064x}",
    ]
    only = store.list_grants("k1", 10, None, grant_id=f"{3:064x}")
    assert [g.grant_id for g in only.items] == [f"{3:064x}"]
    assert store.list_grants("k2", 10, None, grant_id=f"{3:064x}").items == []
    page = store.list_grants("k1", 1, None, grantee_principal=BOB)
    rest = store.list_grants("k1", 1, page.next_marker, grantee_principal=BOB)
    assert [g.grant_id for g in rest.items] == [f"{3:064x}"]
    assert not rest.truncated


def test_list_retirable_grants_spans_keys(store: MetadataStore) -> None:
    store.create_grant(_grant(1, retiring_principal=RETIRER))
    store.create_grant(_grant(2, key_id="k2", retiring_principal=RETIRER))
    store.create_grant(_grant(3, retiring_principal=BOB))
    first = store.list_retirable_grants(RETIRER, 1, None)
    assert [(g.key_id, g.grant_id) for g in first.items] == [("k1", f"{1:064x}")]
    second = store.list_retirable_grants(RETIRER, 1, first.next_marker)
    assert [(g.key_id, g.grant_id) for g in second.items] == [("k2", f"{2:064x}")]
    assert not second.truncated
    assert store.list_retirable_grants(ALICE, 10, None).items == []


@pytest.mark.parametrize(
    "marker",
    [
        "nonsense",
        "",
        "WyJncmFudHM6azEiLDFd",  # ["grants:k1",1]
        "WyJncmFudHM6azEiLCJub3QtYS10aW1lIHgiXQ",  # ["grants:k1","not-a-time x"]
        "WyJncmFudHM6azEiLCIyMDI2LTAxLTAxVDEyOjAwOjAwIHgiXQ",  # naive time
    ],
)
def test_bad_grant_markers_are_refused(store: MetadataStore, marker: str) -> None:
    with pytest.raises(InvalidMarkerException):
        store.list_grants("k1", 10, marker)


def test_grant_marker_of_another_listing_is_refused(store: MetadataStore) -> None:
    for n in range(3):
        store.create_grant(_grant(n, retiring_principal=RETIRER))
        store.create_grant(_grant(10 + n, key_id="k2"))
    k2_marker = store.list_grants("k2", 1, None).next_marker
    retirable_marker = store.list_retirable_grants(RETIRER, 1, None).next_marker
    with pytest.raises(InvalidMarkerException):
        store.list_grants("k1", 1, k2_marker)
    with pytest.raises(InvalidMarkerException):
        store.list_grants("k1", 1, retirable_marker)
    with pytest.raises(InvalidMarkerException):
        store.list_retirable_grants(RETIRER, 1, k2_marker)


def test_delete_grant(store: MetadataStore) -> None:
    grant = store.create_grant(_grant(1))
    assert store.grants_for("k1", ALICE) == [grant]  # cached ...
    assert not store.delete_grant("k2", grant.grant_id)
    assert store.delete_grant("k1", grant.grant_id)
    assert store.grants_for("k1", ALICE) == []  # ... and the cache saw the delete at once
    assert store.get_grant("k1", grant.grant_id) is None
    assert not store.delete_grant("k1", grant.grant_id)


def test_grants_for_cache_returns_fresh_lists(store: MetadataStore) -> None:
    store.create_grant(_grant(1))
    first = store.grants_for("k1", ALICE)
    first.clear()
    assert len(store.grants_for("k1", ALICE)) == 1


def test_grants_for_sees_grants_from_another_store(store: MetadataStore) -> None:
    other = MetadataStore(store.engine.url.render_as_string(hide_password=False))
    try:
        assert store.grants_for("k1", ALICE) == []
        grant = other.create_grant(_grant(1))
        # A commit by another connection changes data_version; the cache is checked every 1 ms.
        deadline = time.monotonic() + 2
        while store.grants_for("k1", ALICE) == [] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert store.grants_for("k1", ALICE) == [grant]
    finally:
        other.close()


def test_purge_deletes_the_keys_grants(store: MetadataStore) -> None:
    store.create_grant(_grant(1, retiring_principal=RETIRER))
    kept = store.create_grant(_grant(2, key_id="k2", retiring_principal=RETIRER))
    store.delete_key("k1")
    assert store.get_key("k1") is None
    assert store.list_grants("k1", 10, None).items == []
    assert store.grants_for("k1", ALICE) == []
    assert store.list_retirable_grants(RETIRER, 10, None).items == [kept]


def test_grant_records_are_frozen(store: MetadataStore) -> None:
    grant = store.create_grant(_grant(1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        grant.name = "x"  # type: ignore[misc]
