"""Freshness of the credential set (security defect 8): an older copy of the credential rows
put back into the database (a restored backup, or an attacker with write access to it) does not
bring a deleted, rotated-away or re-policied access key back to life. The token anchors the
set's digest; a set it did not see is refused whole until the operator vouches for it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server import run_cli
from sqlalchemy import Engine, create_engine, delete, insert, text

from hsmkms.identity import CredentialStore
from hsmkms.identity.store import CredentialsStale, identity_credentials
from hsmkms.keystore.pkcs11 import Pkcs11Keystore

pytestmark = [pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "111122223333"
POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"}]}'


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'id.db'}"


@pytest.fixture
def store(url: str, keystore: Pkcs11Keystore) -> Iterator[CredentialStore]:
    credentials = CredentialStore(url, keystore, account_id=ACCOUNT)
    yield credentials
    credentials.close()


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    made = create_engine(url)
    yield made
    made.dispose()


def rows(engine: Engine) -> list[dict[str, Any]]:
    """A copy of the credential rows (what a backup holds)."""
    with engine.begin() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM identity_credentials"))]


def put_back(engine: Engine, copy: list[dict[str, Any]]) -> None:
    """Replace the credential rows by an older copy, as restoring that backup would (the
    change counter bumped, as by any later write through hsmkms: the read caches watch it)."""
    with engine.begin() as conn:
        conn.execute(delete(identity_credentials))
        conn.execute(insert(identity_credentials), copy)
        conn.execute(text("UPDATE change_counter SET counter = counter + 1"))


def test_a_deleted_key_put_back_from_an_old_copy_stays_dead(
    url: str, store: CredentialStore, engine: Engine, keystore: Pkcs11Keystore
) -> None:
    kept = store.create("alice")
    gone = store.create("bob")
    old = rows(engine)
    store.delete("bob")
    put_back(engine, old)
    assert store.lookup(gone.access_key_id) is None
    # A process that has not seen the current set cannot tell which rows of the old copy are
    # current: it refuses every one of them.
    fresh = CredentialStore(url, keystore, account_id=ACCOUNT)
    try:
        assert fresh.lookup(kept.access_key_id) is None
        assert fresh.lookup(gone.access_key_id) is None
    finally:
        fresh.close()
    with pytest.raises(CredentialsStale, match="hsmkms credentials trust"):
        store.create("carol")  # nothing is built on an old copy
    store.trust()  # the operator vouches for the old copy on purpose
    assert store.lookup(gone.access_key_id) is not None
    assert store.lookup(kept.access_key_id) is not None


def test_an_older_policy_put_back_does_not_open(store: CredentialStore, engine: Engine) -> None:
    issued = store.create("dave", POLICY)
    old = rows(engine)
    store.set_policy("dave", None)
    current = rows(engine)
    put_back(engine, old)
    assert store.lookup(issued.access_key_id) is None
    put_back(engine, current)  # the set the token last saw
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert found.identity_policy is None


def test_a_rotated_away_key_put_back_stays_dead(store: CredentialStore, engine: Engine) -> None:
    first = store.create("erin")
    old = rows(engine)
    store.rotate("erin")
    store.delete(first.access_key_id)
    put_back(engine, old)
    assert store.lookup(first.access_key_id) is None


def test_another_process_s_changes_verify_here(
    url: str, store: CredentialStore, keystore: Pkcs11Keystore
) -> None:
    """The anchor lives in the token: a change by another store (process) on the same database
    verifies in this one, whose last verified set is older."""
    first = store.create("frank")
    assert store.lookup(first.access_key_id) is not None
    other = CredentialStore(url, keystore, account_id=ACCOUNT)
    try:
        second = other.create("grace")
        other.delete("frank")
    finally:
        other.close()
    assert store.lookup(second.access_key_id) is not None
    assert store.lookup(first.access_key_id) is None


def test_a_change_whose_anchor_was_not_written_after_its_commit_still_verifies(
    store: CredentialStore, keystore: Pkcs11Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the commit and the anchor's write: the pending anchor, written before
    the commit, vouches for the set; the next look makes it the anchor."""
    first = store.create("heidi")
    ref = store.wrapping_key_ref()
    assert ref is not None
    anchor, pending = (
        f"identity:{ref.object_ids[0][:16]}",
        f"identity-pending:{ref.object_ids[0][:16]}",
    )
    before = keystore.read_anchor(anchor)
    real = keystore.write_anchor

    class Crashed(Exception):
        pass

    def crash_after_commit(name: str, value: str) -> None:
        if name == anchor:
            raise Crashed
        real(name, value)

    monkeypatch.setattr(keystore, "write_anchor", crash_after_commit)
    with pytest.raises(Crashed):
        store.create("ivan")
    monkeypatch.undo()
    assert keystore.read_anchor(anchor) == before
    assert keystore.read_anchor(pending) != before
    fresh = CredentialStore(str(store.engine.url), keystore, account_id=ACCOUNT)
    try:
        assert fresh.lookup(first.access_key_id) is not None
    finally:
        fresh.close()
    assert keystore.read_anchor(anchor) == keystore.read_anchor(pending)


def test_a_copy_of_the_current_database_verifies(
    store: CredentialStore, engine: Engine, tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    """A copy of the current database (a fresh backup restored, a data directory moved) is the
    set the token saw: it verifies."""
    issued = store.create("judy")
    copy = tmp_path / "copy.db"
    store.close()
    shutil.copy(tmp_path / "id.db", copy)
    other = CredentialStore(f"sqlite:///{copy}", keystore, account_id=ACCOUNT)
    try:
        assert other.lookup(issued.access_key_id) is not None  # same wrapping key, same set
    finally:
        other.close()


@pytest.mark.server
def test_credentials_trust_on_the_command_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run_cli("init", "--data-dir", str(data_dir)).returncode == 0
    created = run_cli("credentials", "create", "--name", "kim", "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    db = data_dir / "hsmkms.db"
    if not db.exists():
        pytest.skip("the data directory's database is not a SQLite file in this run")
    backup = tmp_path / "old.db"
    shutil.copy(db, backup)
    assert run_cli("credentials", "delete", "kim", "--data-dir", str(data_dir)).returncode == 0
    shutil.copy(backup, db)
    refused = run_cli("credentials", "create", "--name", "lee", "--data-dir", str(data_dir))
    assert refused.returncode == 1
    assert "hsmkms credentials trust" in refused.stderr
    assert "Traceback" not in refused.stderr
    trusted = run_cli("credentials", "trust", "--data-dir", str(data_dir))
    assert trusted.returncode == 0, trusted.stderr
    assert "access keys" in trusted.stdout
    again = run_cli("credentials", "create", "--name", "lee", "--data-dir", str(data_dir))
    assert again.returncode == 0, again.stderr
    search = run_cli(
        "audit", "search", "--event-name", "TrustCredentials", "--data-dir", str(data_dir)
    )
    assert search.returncode == 0, search.stderr
    assert "TrustCredentials" in search.stdout
