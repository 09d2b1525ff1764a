"""The metadata store on a real SQLite file: migrations, constraints, pagination, processes."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from postgres import on_postgresql, store_url
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from hsmkms.audit import trail
from hsmkms.audit.trail import AuditTrail
from hsmkms.db import migrations as versions
from hsmkms.db.dialects import sqlite_change_counter
from hsmkms.db.postgresql import change_counter
from hsmkms.errors import DependencyTimeoutException, InvalidMarkerException, KMSInternalException
from hsmkms.identity import CredentialStore
from hsmkms.identity import store as identity_store
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.store import (
    DELETING,
    DuplicateAlias,
    KeyMissing,
    KeyRecord,
    KeyVersionRecord,
    LimitReached,
    MetadataStore,
    VersionConflict,
    schema,
)
from hsmkms.store.migrations import MIGRATIONS

pytestmark = pytest.mark.database

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def _key(key_id: str, **changes: object) -> KeyRecord:
    values: dict[str, object] = {
        "key_id": key_id,
        "arn": f"arn:aws:kms:us-east-1:111122223333:key/{key_id}",
        "description": "",
        "key_usage": "ENCRYPT_DECRYPT",
        "key_spec": "SYMMETRIC_DEFAULT",
        "origin": "AWS_KMS",
        "state": "Enabled",
        "created_at": T0,
        "policy": "{}",
        "current_version": 1,
    }
    values.update(changes)
    return KeyRecord(**values)  # type: ignore[arg-type]


def _version(key_id: str, version: int = 1, rotation_type: str | None = None) -> KeyVersionRecord:
    return KeyVersionRecord(
        key_id, version, f"AES_256_GCM:{version:032x}", "AES_256_GCM", T0, rotation_type
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(store_url(tmp_path / "meta.db"), clock=lambda: T0)
    yield s
    s.close()


def _add(store: MetadataStore, key_id: str, **changes: object) -> KeyRecord:
    key = _key(key_id, **changes)
    store.create_key(key, _version(key_id), {})
    return key


def test_migrations_run_at_open_and_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first = MetadataStore(store_url(path))
    assert first.schema_version() == MetadataStore.latest_schema_version() == MIGRATIONS[-1][0]
    first.close()
    again = MetadataStore(store_url(path))
    with again.engine.connect() as conn:
        rows = conn.execute(text("SELECT version FROM schema_migrations")).all()
    assert [r[0] for r in rows] == [v for v, _, _ in MIGRATIONS]
    again.close()


def test_migrated_database_matches_declared_schema(
    tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    """Every component's tables, migrated into one database (as with HSMKMS_DATABASE_URL set),
    are exactly the tables, columns and primary keys that the components declare."""
    url = store_url(tmp_path / "all.db")
    store = MetadataStore(url)
    CredentialStore(url, keystore, account_id="111122223333").close()
    AuditTrail(url, keystore).close()
    declared = [
        table
        for tables in (schema.metadata, identity_store.metadata, trail.metadata, versions.metadata)
        for table in tables.sorted_tables
    ]
    # The database layer's change signal (hsmkms.db.postgresql, hsmkms.db.dialects).
    declared.append(change_counter if on_postgresql() else sqlite_change_counter)
    insp = inspect(store.engine)
    assert sorted(insp.get_table_names()) == sorted(t.name for t in declared)
    for table in declared:
        columns = {c["name"] for c in insp.get_columns(table.name)}
        assert columns == {c.name for c in table.columns}, table.name
        primary_key = insp.get_pk_constraint(table.name)["constrained_columns"]
        assert primary_key == [c.name for c in table.primary_key.columns], table.name
    store.close()


@pytest.mark.sqlite
def test_sqlite_pragmas_on_every_connection(store: MetadataStore) -> None:
    for _ in range(3):
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000


def test_foreign_keys_are_enforced(store: MetadataStore) -> None:
    with pytest.raises(KMSInternalException) as info:
        store.create_key(_key("k1"), _version("other-key"), {})
    assert isinstance(info.value.__cause__, IntegrityError)
    assert store.get_key("k1") is None  # the whole transaction rolled back
    with store.engine.begin() as conn, pytest.raises(IntegrityError):
        conn.execute(
            schema.aliases.insert().values(
                name="alias/x", key_id="missing", created_at=T0, updated_at=T0
            )
        )


def test_timestamps_come_back_aware_utc(store: MetadataStore) -> None:
    plus2 = dt.timezone(dt.timedelta(hours=2))
    _add(store, "k1", created_at=dt.datetime(2026, 1, 1, 14, 0, tzinfo=plus2))
    key = store.get_key("k1")
    assert key is not None
    assert key.created_at == T0
    assert key.created_at.tzinfo is dt.UTC


def test_naive_timestamps_are_refused(store: MetadataStore) -> None:
    with pytest.raises(KMSInternalException):
        _add(store, "k1", created_at=dt.datetime(2026, 1, 1))


def test_create_key_with_version_and_tags_in_one_transaction(store: MetadataStore) -> None:
    store.create_key(_key("k1"), _version("k1"), {"a": "1", "b": "2"})
    found = store.get_key_and_version("k1")
    assert found is not None
    key, version = found
    assert key.key_id == "k1"
    assert version is not None
    assert version.version == 1
    assert store.list_tags("k1", 10).items == [("a", "1"), ("b", "2")]


def test_list_keys_paginates_with_opaque_markers(store: MetadataStore) -> None:
    ids = [f"k{i:02d}" for i in range(7)]
    for key_id in reversed(ids):
        _add(store, key_id)
    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        page = store.list_keys(3, marker)
        seen += [k.key_id for k in page.items]
        pages += 1
        if not page.truncated:
            break
        marker = page.next_marker
        assert marker is not None
        assert "k0" not in marker
    assert seen == ids
    assert pages == 3


@pytest.mark.parametrize("marker", ["nonsense", "", "eyJ4IjoxfQ", "WyJhbGlhc2VzIiwiayJd"])
def test_bad_markers_are_refused(store: MetadataStore, marker: str) -> None:
    with pytest.raises(InvalidMarkerException):
        store.list_keys(10, marker)


def test_marker_of_one_listing_is_refused_by_another(store: MetadataStore) -> None:
    for i in range(3):
        _add(store, f"k{i}")
        store.create_alias(f"alias/a{i}", f"k{i}", T0)
    marker = store.list_aliases(1).next_marker
    with pytest.raises(InvalidMarkerException):
        store.list_keys(1, marker)


def test_keys_being_purged_are_not_listed(store: MetadataStore) -> None:
    _add(store, "k1")
    _add(store, "k2", state=DELETING)
    assert [k.key_id for k in store.list_keys(10).items] == ["k1"]


def test_add_version_is_compare_and_set(store: MetadataStore) -> None:
    _add(store, "k1")
    updated = store.add_version(_version("k1", 2, "ON_DEMAND"), on_demand=True)
    assert updated.current_version == 2
    assert updated.on_demand_rotations == 1
    with pytest.raises(VersionConflict):
        store.add_version(_version("k1", 2, "AUTOMATIC"))
    with pytest.raises(KeyMissing):
        store.add_version(_version("nope", 2))
    assert [v.version for v in store.list_versions("k1").items] == [1, 2]


def test_add_version_precondition_aborts_the_transaction(store: MetadataStore) -> None:
    _add(store, "k1")

    def refuse(_: KeyRecord) -> None:
        raise LimitReached("test")

    with pytest.raises(LimitReached):
        store.add_version(_version("k1", 2), precondition=refuse)
    assert store.get_version("k1", 2) is None


def test_transition_is_compare_and_set(store: MetadataStore) -> None:
    _add(store, "k1")
    assert not store.transition("k1", ["Disabled"], "Enabled")
    when = T0 + dt.timedelta(days=7)
    assert store.transition(
        "k1", ["Enabled"], "PendingDeletion", deletion_date=when, pending_window_days=7
    )
    key = store.get_key("k1")
    assert key is not None
    assert key.deletion_date == when
    assert key.pending_window_days == 7
    assert not store.transition("k1", ["PendingDeletion"], "Disabled", deletion_after=when)
    assert store.transition("k1", ["PendingDeletion"], "Disabled", deletion_after=T0)
    key = store.get_key("k1")
    assert key is not None
    assert key.state == "Disabled"
    assert key.deletion_date is None


def test_aliases_crud_limits_and_duplicates(store: MetadataStore) -> None:
    _add(store, "k1")
    _add(store, "k2")
    store.create_alias("alias/a", "k1", T0, max_per_key=2)
    store.create_alias("alias/b", "k1", T0, max_per_key=2)
    with pytest.raises(LimitReached):
        store.create_alias("alias/c", "k1", T0, max_per_key=2)
    with pytest.raises(DuplicateAlias):
        store.create_alias("alias/a", "k2", T0)
    with pytest.raises(KeyMissing):
        store.create_alias("alias/z", "nope", T0)
    later = T0 + dt.timedelta(hours=1)
    assert store.update_alias("alias/a", "k2", later)
    alias = store.get_alias("alias/a")
    assert alias is not None
    assert alias.key_id == "k2"
    assert alias.updated_at == later
    assert not store.update_alias("alias/missing", "k2", later)
    resolved = store.resolve_alias("alias/b")
    assert resolved is not None
    assert resolved.key_id == "k1"
    assert [a.name for a in store.list_aliases(10, key_id="k1").items] == ["alias/b"]
    assert store.delete_alias("alias/b")
    assert not store.delete_alias("alias/b")


def test_tags_limit_overwrite_and_remove(store: MetadataStore) -> None:
    _add(store, "k1")
    store.put_tags("k1", {"a": "1", "b": "2"}, max_tags=3)
    store.put_tags("k1", {"a": "changed", "c": "3"}, max_tags=3)
    with pytest.raises(LimitReached):
        store.put_tags("k1", {"d": "4"}, max_tags=3)
    store.remove_tags("k1", ["b", "not-there"])
    assert store.list_tags("k1", 10).items == [("a", "changed"), ("c", "3")]
    page = store.list_tags("k1", 1)
    assert page.truncated
    assert store.list_tags("k1", 1, page.next_marker).items == [("c", "3")]


def test_purge_bookkeeping(store: MetadataStore) -> None:
    _add(store, "k1", state="PendingDeletion", deletion_date=T0 + dt.timedelta(days=7))
    _add(store, "k2", state=DELETING)
    _add(store, "k3")
    store.create_alias("alias/a", "k1", T0)
    store.put_tags("k1", {"t": "v"})
    assert [k.key_id for k in store.keys_to_purge(T0)] == ["k2"]
    later = T0 + dt.timedelta(days=8)
    assert [k.key_id for k in store.keys_to_purge(later)] == ["k1", "k2"]
    assert not store.mark_deleting("k1", T0)
    assert store.mark_deleting("k1", later)
    assert store.mark_deleting("k1", later)  # a re-run finishes an interrupted purge
    store.delete_key("k1")
    assert store.get_key("k1") is None
    assert store.get_alias("alias/a") is None
    assert store.list_versions("k1").items == []


def test_rotation_schedule_query(store: MetadataStore) -> None:
    due = T0 + dt.timedelta(days=1)
    _add(store, "k1", rotation_enabled=True, rotation_period_days=90, next_rotation_date=due)
    _add(store, "k2", rotation_enabled=True, rotation_period_days=90, next_rotation_date=due)
    store.transition("k2", ["Enabled"], "Disabled")
    assert store.keys_due_for_rotation(T0) == []
    assert [k.key_id for k in store.keys_due_for_rotation(due)] == ["k1"]


def test_read_cache_sees_own_writes_at_once(store: MetadataStore) -> None:
    _add(store, "k1")
    first = store.get_key_and_version("k1")
    assert first is not None
    assert first[0].state == "Enabled"
    assert store.transition("k1", ["Enabled"], "Disabled")
    again = store.get_key_and_version("k1")
    assert again is not None
    assert again[0].state == "Disabled"


def test_read_cache_sees_changes_from_another_process_after_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a = MetadataStore(store_url(path), cache_check_interval=0.05)
    b = MetadataStore(store_url(path))
    _add(a, "k1")
    assert a.get_key_and_version("k1") is not None
    assert b.transition("k1", ["Enabled"], "Disabled")
    time.sleep(0.06)
    again = a.get_key_and_version("k1")
    assert again is not None
    assert again[0].state == "Disabled"
    a.close()
    b.close()


def test_read_cache_sees_changes_from_another_store(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a = MetadataStore(store_url(path), cache_check_interval=0)
    b = MetadataStore(store_url(path))
    _add(a, "k1")
    first = a.get_key_and_version("k1")
    assert first is not None
    assert first[0].state == "Enabled"
    assert b.transition("k1", ["Enabled"], "Disabled")
    again = a.get_key_and_version("k1")
    assert again is not None
    assert again[0].state == "Disabled"
    a.close()
    b.close()


def _worker(url: str, key_ids: list[str]) -> None:
    s = MetadataStore(url)
    for key_id in key_ids:
        s.create_key(_key(key_id), _version(key_id), {"by": "worker"})
        s.put_tags(key_id, {"n": key_id})
    s.close()


def test_two_processes_open_and_write_the_same_file(tmp_path: Path) -> None:
    path = store_url(tmp_path / "multi.db")
    # fork: the workers only touch SQLite (never PKCS#11), and spawning costs seconds.
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_worker, args=(path, [f"p{p}-{i:02d}" for i in range(15)]))
        for p in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    store = MetadataStore(path)
    assert len(store.list_keys(100).items) == 30
    assert store.schema_version() == MetadataStore.latest_schema_version()
    store.close()


@pytest.mark.sqlite
def test_busy_database_maps_to_dependency_timeout(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    store = MetadataStore(store_url(path), busy_timeout_ms=50)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DependencyTimeoutException):
            _add(store, "k1")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.close()


def _forked_child(store: MetadataStore, conn: Any) -> None:
    _add(store, "child-key")
    found = store.get_key_and_version("parent-key")
    conn.send(found is not None and found[0].state == "Enabled")
    conn.close()


def test_store_opened_before_a_fork_works_in_the_child(store: MetadataStore) -> None:
    _add(store, "parent-key")
    assert store.get_key_and_version("parent-key") is not None  # fill the cache
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=_forked_child, args=(store, child_end))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert parent_end.recv() is True
    assert store.get_key("child-key") is not None
    assert store.get_key_and_version("child-key") is not None
