"""The credentials store (secrets sealed by the token) and ``hsmkms credentials`` against a
running server: new keys work at once, deleted keys stop at once, a key whose identity policy
was edited in the database stops at once, no secret is stored in clear. (Identity policies in
detail: test_credential_policies.py.)"""

from __future__ import annotations

import base64
import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import pytest
from postgres import outside_sql, stored_bytes
from server import RunningServer, run_cli, running_server
from sqlalchemy import create_engine, text

from hsmkms.identity import (
    CredentialStore,
    DuplicateCredential,
    UnknownCredential,
    generate_access_key_id,
    generate_secret,
)
from hsmkms.identity.store import IDENTITY_KEY_ID
from hsmkms.keystore.pkcs11 import Pkcs11Keystore

pytestmark = [pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "111122223333"


@pytest.fixture
def store(tmp_path: Path, keystore: Pkcs11Keystore) -> Iterator[CredentialStore]:
    credentials = CredentialStore(f"sqlite:///{tmp_path / 'id.db'}", keystore, account_id=ACCOUNT)
    yield credentials
    credentials.close()


# -- the store ------------------------------------------------------------------------------


def test_access_keys_and_secrets_look_like_aws() -> None:
    for _ in range(20):
        assert re.fullmatch(r"AKIA[A-Z2-7]{16}", generate_access_key_id())
        assert re.fullmatch(r"[A-Za-z0-9+/]{40}", generate_secret())


def test_create_then_lookup_returns_the_principal(store: CredentialStore) -> None:
    issued = store.create("alice")
    assert issued.principal_arn == f"arn:aws:iam::{ACCOUNT}:user/alice"
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert (found.secret, found.principal_arn) == (issued.secret_access_key, issued.principal_arn)
    assert issued.secret_access_key not in repr(issued)
    assert issued.secret_access_key not in repr(found)


def test_unknown_and_malformed_key_ids_are_none(store: CredentialStore) -> None:
    assert store.lookup("AKIAAAAAAAAAAAAAAAAA") is None
    assert store.lookup("not a key id!") is None
    assert store.lookup("") is None


def test_duplicate_name_is_refused(store: CredentialStore) -> None:
    store.create("bob")
    with pytest.raises(DuplicateCredential, match="'bob' already exists"):
        store.create("bob")


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "name/with/slash", "ünï"])
def test_malformed_names_are_refused(store: CredentialStore, name: str) -> None:
    with pytest.raises(Exception, match="1-64 characters"):
        store.create(name)


def test_delete_by_name_or_key_id(store: CredentialStore) -> None:
    a = store.create("carol")
    b = store.create("dave")
    assert store.lookup(a.access_key_id) is not None
    store.delete("carol")
    store.delete(b.access_key_id)
    assert store.lookup(a.access_key_id) is None
    assert store.lookup(b.access_key_id) is None
    with pytest.raises(UnknownCredential):
        store.delete("carol")


def test_root_is_created_once_and_cannot_be_deleted(store: CredentialStore) -> None:
    issued = store.ensure_root()
    assert issued is not None
    assert issued.principal_arn == f"arn:aws:iam::{ACCOUNT}:root"
    assert store.ensure_root() is None
    with pytest.raises(Exception, match="cannot be deleted"):
        store.delete("root")


def test_root_from_environment_values_replaces_a_generated_one(store: CredentialStore) -> None:
    generated = store.ensure_root()
    assert generated is not None
    issued = store.ensure_root("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert issued is not None
    assert store.lookup(generated.access_key_id) is None
    found = store.lookup("AKIAIOSFODNN7EXAMPLE")
    assert found is not None
    assert found.secret == "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert store.ensure_root("AKIAIOSFODNN7EXAMPLE", found.secret) is None


def test_root_environment_values_must_come_together(store: CredentialStore) -> None:
    with pytest.raises(Exception, match="must be set together"):
        store.ensure_root("AKIAIOSFODNN7EXAMPLE", None)


def test_changes_by_another_store_are_seen_at_once(
    tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    """Two stores on one database (as two processes would be): creates and deletes by one are
    seen by the other's very next lookup, although it caches."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    writer = CredentialStore(url, keystore, account_id=ACCOUNT)
    reader = CredentialStore(url, keystore, account_id=ACCOUNT)
    try:
        issued = writer.create("erin")
        assert reader.lookup(issued.access_key_id) is not None
        assert reader.lookup(issued.access_key_id) is not None  # from the cache
        writer.delete("erin")
        assert reader.lookup(issued.access_key_id) is None
    finally:
        writer.close()
        reader.close()


def test_sealed_secret_moved_to_another_row_does_not_open(
    tmp_path: Path, keystore: Pkcs11Keystore
) -> None:
    """The AAD binds the access key id and principal: swapping sealed secrets between rows
    (someone with write access to the database) makes both unusable, not interchangeable."""
    url = f"sqlite:///{tmp_path / 'swap.db'}"
    store = CredentialStore(url, keystore, account_id=ACCOUNT)
    try:
        a = store.create("frank")
        b = store.create("grace")
        engine = create_engine(url)
        with engine.begin() as conn:
            rows = {
                r[0]: (r[1], r[2])
                for r in conn.execute(
                    text("SELECT name, secret_iv, secret_sealed FROM identity_credentials")
                )
            }
            for name, other in (("frank", "grace"), ("grace", "frank")):
                conn.execute(
                    text(
                        "UPDATE identity_credentials SET secret_iv = :iv, secret_sealed = :s, "
                        "row_version = row_version + 1 WHERE name = :n"
                    ),
                    {"iv": rows[other][0], "s": rows[other][1], "n": name},
                )
        engine.dispose()
        assert store.lookup(a.access_key_id) is None
        assert store.lookup(b.access_key_id) is None
    finally:
        store.close()


def test_wrapping_key_is_a_token_object(store: CredentialStore, keystore: Pkcs11Keystore) -> None:
    store.create("heidi")
    ref = store.wrapping_key_ref()
    assert ref is not None
    assert keystore.exists(ref)
    labels = {o.label for o in keystore.list_objects() if o.object_id in ref.object_ids}
    assert all(IDENTITY_KEY_ID.replace("-", "")[:20] in label for label in labels)


# -- the command line against a running server ----------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("credentials") / "data") as srv:
        yield srv


# Without an identity policy a user may do nothing the default key policy does not grant it
# by name; these users may do everything.
ALLOW_ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", '
ALLOW_ALL += '"Resource": "*"}]}'


def create(server: RunningServer, name: str) -> dict[str, str]:
    policy_file = server.data_dir.parent / "allow-all.json"
    policy_file.write_text(ALLOW_ALL)
    proc = server.cli(
        "credentials", "create", "--name", name, "--policy-file", str(policy_file), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    issued: dict[str, str] = json.loads(proc.stdout)
    return issued


@pytest.mark.server
def test_created_key_works_at_once_and_deleted_key_fails_at_once(server: RunningServer) -> None:
    issued = create(server, "app1")
    assert set(issued) == {"AccessKeyId", "SecretAccessKey", "Arn"}
    assert issued["Arn"] == f"arn:aws:iam::{ACCOUNT}:user/app1"
    client = server.client(issued["AccessKeyId"], issued["SecretAccessKey"])
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    blob = client.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]

    proc = server.cli("credentials", "delete", "app1")
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.decrypt(CiphertextBlob=blob)
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    # The root still works, and the key is still there.
    assert server.client().decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


@pytest.mark.server
def test_delete_by_access_key_id(server: RunningServer) -> None:
    issued = create(server, "app2")
    client = server.client(issued["AccessKeyId"], issued["SecretAccessKey"])
    client.list_keys()
    assert server.cli("credentials", "delete", issued["AccessKeyId"]).returncode == 0
    with pytest.raises(botocore.exceptions.ClientError):
        client.list_keys()


@pytest.mark.server
def test_list_shows_keys_and_never_secrets(server: RunningServer) -> None:
    issued = create(server, "app3")
    proc = server.cli("credentials", "list")
    assert proc.returncode == 0, proc.stderr
    assert issued["AccessKeyId"] in proc.stdout
    assert "app3" in proc.stdout
    assert "root" in proc.stdout
    assert issued["SecretAccessKey"] not in proc.stdout
    assert server.secret_access_key not in proc.stdout
    listing = json.loads(server.cli("credentials", "list", "--json").stdout)
    assert {e["Name"] for e in listing} >= {"root", "app3"}
    assert all(set(e) == {"AccessKeyId", "Name", "Arn", "CreatedAt", "HasPolicy"} for e in listing)
    assert {e["Name"]: e["HasPolicy"] for e in listing if e["Name"] in ("root", "app3")} == {
        "root": False,
        "app3": True,
    }


@pytest.mark.server
def test_key_whose_policy_was_edited_in_the_database_fails_at_once(server: RunningServer) -> None:
    """Fail closed: the policy is sealed with the secret, so the edited row does not open and
    the running server refuses the key as unknown."""
    issued = create(server, "app6")
    client = server.client(issued["AccessKeyId"], issued["SecretAccessKey"])
    client.list_keys()
    outside_sql(
        server.data_dir / "hsmkms.db",
        "UPDATE identity_credentials SET policy = ? WHERE name = 'app6'",
        ALLOW_ALL.replace("kms:*", "kms:Decrypt"),
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.list_keys()
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"
    warnings = [x for x in server.log().splitlines() if "credential_integrity_failed" in x]
    assert warnings
    assert all(issued["AccessKeyId"] in x for x in warnings)
    assert server.client().list_keys()


@pytest.mark.server
def test_duplicate_name_is_one_line_error(server: RunningServer) -> None:
    create(server, "app4")
    proc = server.cli("credentials", "create", "--name", "app4")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "hsmkms credentials: a credential named 'app4' already exists"


@pytest.mark.server
def test_deleting_unknown_or_root_is_one_line_error(server: RunningServer) -> None:
    for target in ("nobody", "root", server.access_key_id):
        proc = server.cli("credentials", "delete", target)
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert server.client().list_keys()


@pytest.mark.server
def test_database_holds_no_secret_in_clear(server: RunningServer) -> None:
    issued = create(server, "app5")
    secrets = [issued["SecretAccessKey"], server.secret_access_key]
    blobs = stored_bytes(server.data_dir / "hsmkms.db")
    assert issued["AccessKeyId"].encode() in blobs  # the scan does see the rows
    for secret in secrets:
        for form in (secret.encode(), base64.b64encode(secret.encode()), secret.encode()[:20]):
            assert form not in blobs


@pytest.mark.server
def test_root_credentials_file_is_private(server: RunningServer) -> None:
    path = server.data_dir / "root-credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    root = json.loads(path.read_text())
    assert root["Arn"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert f"root credentials in {path}" in server.log()


def test_root_from_environment_on_a_fresh_data_dir(tmp_path: Path) -> None:
    env = {
        "HSMKMS_ROOT_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "HSMKMS_ROOT_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    }
    proc = run_cli("credentials", "list", "--json", "--data-dir", str(tmp_path / "d"), env=env)
    assert proc.returncode == 0, proc.stderr
    (root,) = json.loads(proc.stdout)
    assert root["AccessKeyId"] == "AKIAIOSFODNN7EXAMPLE"
    assert not (tmp_path / "d" / "root-credentials.json").exists()
