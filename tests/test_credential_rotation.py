"""Two access keys per user, as AWS IAM allows, so an application rotates without downtime; the
account root rotates the same way, without touching HSMKMS_ROOT_* (a retired root key stays
retired); databases of schema 2 (one key per name) are migrated with every key kept."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError as BotoClientError
from server import run_cli, running_server

from hsmkms.errors import LimitExceededException, ValidationException
from hsmkms.identity import CredentialIntegrityError, CredentialStore, UnknownCredential
from hsmkms.keystore.pkcs11 import Pkcs11Keystore

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
    }
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "id.db"


@pytest.fixture
def store(db: Path, keystore: Pkcs11Keystore) -> Iterator[CredentialStore]:
    credentials = CredentialStore(f"sqlite:///{db}", keystore, account_id=ACCOUNT)
    yield credentials
    credentials.close()


def test_a_user_holds_two_keys_at_most_and_both_work(store: CredentialStore) -> None:
    first = store.create("app", POLICY)
    second = store.rotate("app")
    assert second.access_key_id != first.access_key_id
    assert second.principal_arn == first.principal_arn == f"arn:aws:iam::{ACCOUNT}:user/app"
    for issued in (first, second):
        found = store.lookup(issued.access_key_id)
        assert found is not None
        assert found.secret == issued.secret_access_key
        assert found.identity_policy == POLICY
    with pytest.raises(LimitExceededException) as too_many:
        store.rotate(first.access_key_id)
    assert too_many.value.message == (
        f"app has 2 access keys ({first.access_key_id}, {second.access_key_id}), the most a "
        "user may hold: delete one first"
    )
    with pytest.raises(ValidationException, match="name the one to delete by its access key id"):
        store.delete("app")
    assert store.delete(first.access_key_id).access_key_id == first.access_key_id
    assert store.lookup(first.access_key_id) is None
    assert store.lookup(second.access_key_id) is not None
    third = store.rotate("app")
    assert [c.access_key_id for c in store.list() if c.name == "app"] == [
        second.access_key_id,
        third.access_key_id,
    ]
    with pytest.raises(UnknownCredential):
        store.rotate("nobody")


def test_a_new_policy_applies_to_both_keys_of_a_user(store: CredentialStore) -> None:
    first = store.create("app")
    second = store.rotate("app")
    store.set_policy("app", POLICY)
    for issued in (first, second):
        found = store.lookup(issued.access_key_id)
        assert found is not None
        assert found.identity_policy == POLICY
    store.set_policy(second.access_key_id, None)
    assert all(store.lookup(i.access_key_id).identity_policy is None for i in (first, second))  # type: ignore[union-attr]


def test_a_name_is_still_unique_among_users(store: CredentialStore) -> None:
    store.create("app")
    store.rotate("app")
    with pytest.raises(Exception, match="already exists"):
        store.create("app")


def test_a_user_whose_row_was_altered_is_not_rotated(store: CredentialStore, db: Path) -> None:
    issued = store.create("app")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE identity_credentials SET policy = ? WHERE name = 'app'", (POLICY,))
    conn.close()
    with pytest.raises(CredentialIntegrityError, match=issued.access_key_id):
        store.rotate("app")
    assert [c.name for c in store.list()] == ["app"]


def test_the_root_rotates_and_a_retired_root_key_never_comes_back(store: CredentialStore) -> None:
    env = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert store.ensure_root(*env) is not None
    with pytest.raises(ValidationException, match="only access key cannot be deleted"):
        store.delete("root")
    new = store.rotate("root")
    assert new.principal_arn == f"arn:aws:iam::{ACCOUNT}:root"
    assert store.ensure_root(*env) is None  # the environment's key is one of the root's
    store.delete(env[0])
    assert store.retired_at(env[0]) is not None
    # A restart with the same, now stale, environment: ignored; the rotated key stays.
    assert store.ensure_root(*env) is None
    assert store.lookup(env[0]) is None
    assert store.lookup(new.access_key_id) is not None
    # New values in the environment define the root again (replacing every root key).
    assert store.ensure_root("AKIANEWROOTKEY000001", "another secret, long enough") is not None
    assert store.lookup(new.access_key_id) is None
    assert [c.access_key_id for c in store.list() if c.name == "root"] == ["AKIANEWROOTKEY000001"]


def _schema_2(db: Path) -> None:
    """Turn a current identity database back into schema 2: ``name`` unique, no
    ``identity_retired``, versions 1-2 recorded."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("ALTER TABLE identity_credentials RENAME TO old")
            conn.execute("DROP INDEX ix_identity_credentials_name")
            conn.execute(
                "CREATE TABLE identity_credentials (access_key_id VARCHAR(128) NOT NULL, "
                "name VARCHAR(64) NOT NULL, principal_arn VARCHAR(2048) NOT NULL, "
                "secret_iv BLOB NOT NULL, secret_sealed BLOB NOT NULL, wrapping_key TEXT NOT NULL, "
                "row_version BIGINT NOT NULL, created_at VARCHAR(40) NOT NULL, policy TEXT, "
                "PRIMARY KEY (access_key_id), UNIQUE (name))"
            )
            conn.execute("INSERT INTO identity_credentials SELECT * FROM old")
            conn.execute("DROP TABLE old")
            conn.execute("DROP TABLE identity_retired")
            conn.execute(
                "DELETE FROM schema_migrations WHERE component = 'identity' AND version = 3"
            )
            conn.execute("UPDATE identity_meta SET value = '2' WHERE name = 'schema_version'")
    finally:
        conn.close()


def test_a_schema_2_database_is_migrated_with_every_key_kept(
    db: Path, keystore: Pkcs11Keystore
) -> None:
    before = CredentialStore(f"sqlite:///{db}", keystore, account_id=ACCOUNT)
    app = before.create("app", POLICY)
    root = before.ensure_root()
    before.close()
    _schema_2(db)
    # The old shape really is one key per name.
    with sqlite3.connect(db) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO identity_credentials SELECT 'X', name, principal_arn, secret_iv, "
            "secret_sealed, wrapping_key, row_version, created_at, policy "
            "FROM identity_credentials WHERE name = 'app'"
        )
    conn.close()
    after = CredentialStore(f"sqlite:///{db}", keystore, account_id=ACCOUNT)
    try:
        for issued in (app, root):
            assert issued is not None
            found = after.lookup(issued.access_key_id)
            assert found is not None
            assert found.secret == issued.secret_access_key
        assert after.lookup(app.access_key_id).identity_policy == POLICY  # type: ignore[union-attr]
        second = after.rotate("app")
        assert after.lookup(second.access_key_id) is not None
    finally:
        after.close()
    with sqlite3.connect(db) as conn:
        marker = conn.execute("SELECT value FROM identity_meta WHERE name = 'schema_version'")
        assert marker.fetchone() == ("3",)  # an hsmkms of schema 2 refuses this database
    conn.close()


# --------------------------------------------------------------------------------------------
# Through the command line, while the server runs
# --------------------------------------------------------------------------------------------


def _codes(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except BotoClientError as exc:
        return str(exc.response["Error"]["Code"])
    return "OK"


@pytest.mark.server
def test_an_application_rotates_its_key_without_downtime(tmp_path: Path) -> None:
    with running_server(tmp_path / "data") as server:
        made = json.loads(server.cli("credentials", "create", "--name", "app", "--json").stdout)
        old = server.client(made["AccessKeyId"], made["SecretAccessKey"])
        proc = server.cli("credentials", "rotate", "app", "--json")
        assert proc.returncode == 0, proc.stderr
        rotated = json.loads(proc.stdout)
        assert rotated["Arn"] == made["Arn"]
        new = server.client(rotated["AccessKeyId"], rotated["SecretAccessKey"])
        # Both work at once: the application moves to the new key with no gap.
        assert _codes(old.list_keys) == "AccessDeniedException"  # authenticated, no policy
        assert _codes(new.list_keys) == "AccessDeniedException"
        third = server.cli("credentials", "rotate", "app")
        assert third.returncode == 1
        assert "the most a user may hold: delete one first" in third.stderr
        ambiguous = server.cli("credentials", "delete", "app")
        assert ambiguous.returncode == 1
        assert made["AccessKeyId"] in ambiguous.stderr
        assert server.cli("credentials", "delete", made["AccessKeyId"]).returncode == 0
        assert _codes(old.list_keys) == "UnrecognizedClientException"
        assert _codes(new.list_keys) == "AccessDeniedException"
        listed = json.loads(server.cli("credentials", "list", "--json").stdout)
        assert [c["AccessKeyId"] for c in listed if c["Name"] == "app"] == [rotated["AccessKeyId"]]


@pytest.mark.server
def test_the_generated_root_rotates_and_its_file_follows(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_server(data_dir) as server:
        old_root = server.client()
        proc = server.cli("credentials", "rotate", "root")
        assert proc.returncode == 0, proc.stderr
        stored = json.loads((data_dir / "root-credentials.json").read_text())
        assert stored["AccessKeyId"] != server.access_key_id
        assert f"AccessKeyId:     {stored['AccessKeyId']}" in proc.stdout
        assert "now holds the new root key" in proc.stdout
        new_root = server.client(stored["AccessKeyId"], stored["SecretAccessKey"])
        assert _codes(new_root.list_keys) == "OK"
        assert _codes(old_root.list_keys) == "OK"
        assert server.cli("credentials", "delete", server.access_key_id).returncode == 0
        assert _codes(old_root.list_keys) == "UnrecognizedClientException"
        assert _codes(new_root.list_keys) == "OK"
        assert (data_dir / "root-credentials.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.server
@pytest.mark.slow
def test_an_environment_root_rotates_without_editing_the_environment(tmp_path: Path) -> None:
    env = {
        "HSMKMS_ROOT_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "HSMKMS_ROOT_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    }
    data_dir = tmp_path / "data"
    with running_server(data_dir, env=env) as server:
        rotated = json.loads(server.cli("credentials", "rotate", "root", "--json").stdout)
        assert not (data_dir / "root-credentials.json").exists()
        assert server.cli("credentials", "delete", env["HSMKMS_ROOT_ACCESS_KEY_ID"]).returncode == 0
    # The same environment at the next start: the retired key stays retired.
    with running_server(data_dir, env=env) as server:
        assert "names a root key retired on" in server.log()
        assert f"the root's access key is {rotated['AccessKeyId']}" in server.log()
        old = server.client(env["HSMKMS_ROOT_ACCESS_KEY_ID"], env["HSMKMS_ROOT_SECRET_ACCESS_KEY"])
        assert _codes(old.list_keys) == "UnrecognizedClientException"
        new = server.client(rotated["AccessKeyId"], rotated["SecretAccessKey"])
        assert _codes(new.list_keys) == "OK"
    proc = run_cli("credentials", "list", "--json", "--data-dir", str(data_dir), env=env)
    assert [c["AccessKeyId"] for c in json.loads(proc.stdout)] == [rotated["AccessKeyId"]]
