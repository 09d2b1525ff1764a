"""The database is not trusted: rows that decide security carry a token HMAC, and an edit made
directly in the SQLite file is refused (fail closed); ``hsmkms doctor``'s report of it is tested in
tests/test_cli_doctor.py, aliases and tags through boto3 in tests/test_store_integrity_api.py.

Real parts: the session SoftHSM2 token, a real database (SQLite, or PostgreSQL on that test
run), edits on a connection of their own (``tests/postgres.py`` ``outside_sql``).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from postgres import outside_fetch, outside_sql, store_url
from sqlalchemy import inspect

from conftest import new_mac_key
from hsmkms import models as m
from hsmkms.errors import (
    KeyIntegrityError,
    KMSError,
    KMSInternalException,
    KMSInvalidStateException,
)
from hsmkms.keystore.base import KeyMaterialRef, MaterialName
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import GrantRecord, MetadataStore, schema
from hsmkms.store.integrity import (
    INTEGRITY_KEY_NAME,
    SEALED_COLUMNS,
    RowVerifier,
    TokenRowSealer,
    canonical_row,
)
from hsmkms.types import Caller

pytestmark = [pytest.mark.hsm, pytest.mark.database]

REGION = "eu-west-1"
ACCOUNT = "111122223333"
T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
MALLORY = f"arn:aws:iam::{ACCOUNT}:user/mallory"


class CountingSealer(TokenRowSealer):
    """The real token sealer, counting token calls."""

    def __init__(self, keystore: Pkcs11Keystore) -> None:
        super().__init__(keystore)
        self.seals = 0
        self.verifies = 0

    def seal(self, data: bytes) -> bytes:
        self.seals += 1
        return super().seal(data)

    def verify(self, data: bytes, tag: bytes) -> bool:
        self.verifies += 1
        return super().verify(data, tag)


class Env:
    """A service on the session token and its own SQLite file, reopenable."""

    def __init__(self, keystore: Pkcs11Keystore, path: Path) -> None:
        self.keystore = keystore
        self.path = path
        self.clock = ManualClock(T0)
        self.store: MetadataStore | None = None
        self.service = self.open()

    def open(self) -> KmsService:
        if self.store is not None:
            self.store.close()
            self.store = None
        self.sealer = CountingSealer(self.keystore)
        # Checked on every read, the read cache sees each edit of Env.sql at once (with the
        # default 1 ms interval a read right after the edit could still be answered from it).
        self.store = MetadataStore(
            store_url(self.path), clock=self.clock, sealer=self.sealer, cache_check_interval=0
        )
        self.service = KmsService(
            self.keystore, self.store, region=REGION, account_id=ACCOUNT, clock=self.clock
        )
        return self.service

    def sql(self, statement: str, *params: object) -> int:
        """Run one statement directly on the database file, as an attacker with file access."""
        try:
            return outside_sql(self.path, statement, *params)
        finally:
            # Another writer's commit is seen by the store's read cache within its check
            # interval (1 ms); on a fast disk this write can take less than that.
            time.sleep(0.002)

    def fetch(self, statement: str, *params: object) -> list[Any]:
        return outside_fetch(self.path, statement, *params)

    def key(self, **kwargs: Any) -> str:
        return self.service.create_key(m.CreateKeyRequest(**kwargs)).KeyMetadata.KeyId

    def encrypt(self, key_id: str, caller: Caller | None = None) -> bytes:
        request = m.EncryptRequest(KeyId=key_id, Plaintext=b"secret")
        return self.service.encrypt(request, caller=caller).CiphertextBlob

    def decrypt(self, blob: bytes) -> bytes:
        return self.service.decrypt(m.DecryptRequest(CiphertextBlob=blob)).Plaintext

    def alias(self, name: str, key_id: str) -> None:
        self.service.create_alias(m.CreateAliasRequest(AliasName=name, TargetKeyId=key_id))

    def tag(self, key_id: str, **tags: str) -> None:
        request = m.TagResourceRequest(
            KeyId=key_id, Tags=[m.Tag(TagKey=k, TagValue=v) for k, v in tags.items()]
        )
        self.service.tag_resource(request)

    def tags(self, key_id: str) -> dict[str, str]:
        response = self.service.list_resource_tags(m.ListResourceTagsRequest(KeyId=key_id))
        return {t.TagKey: t.TagValue for t in response.Tags}

    def aliases(self, key_id: str | None = None) -> dict[str, str | None]:
        response = self.service.list_aliases(m.ListAliasesRequest(KeyId=key_id))
        return {a.AliasName: a.TargetKeyId for a in response.Aliases}


@pytest.fixture
def env(keystore: Pkcs11Keystore, tmp_path: Path) -> Iterator[Env]:
    e = Env(keystore, tmp_path / "kms.db")
    yield e
    if e.store is not None:
        e.store.close()


def _refused(action: Callable[[], object], key_id: str) -> KeyIntegrityError:
    with pytest.raises(KeyIntegrityError) as info:
        action()
    error = info.value
    assert isinstance(error, KMSInvalidStateException)
    assert error.code == "KMSInvalidStateException"
    assert error.status == 400
    assert key_id in error.message
    assert "failed its integrity check" in error.message
    return error


def _grant(key_id: str, grantee: str, n: int = 1) -> GrantRecord:
    return GrantRecord(
        grant_id=f"{n:064x}",
        key_id=key_id,
        name=None,
        grantee_principal=grantee,
        retiring_principal=None,
        operations=("Decrypt", "Encrypt"),
        constraints=None,
        issuing_account=ACCOUNT,
        created_at=T0,
    )


# -- the format -------------------------------------------------------------------------------


def test_every_column_but_mac_is_covered() -> None:
    """A column added to a sealed table must be added to the (versioned) format on purpose."""
    for table in (schema.keys, schema.key_versions, schema.grants, schema.aliases, schema.tags):
        assert SEALED_COLUMNS[table.name] == tuple(c.name for c in table.columns if c.name != "mac")


def test_canonical_bytes_bind_the_table_and_are_unambiguous() -> None:
    values = dict.fromkeys(SEALED_COLUMNS["grants"]) | {"id": "a", "name": "bc"}
    shifted = values | {"id": "ab", "name": "c"}
    assert canonical_row("grants", values) != canonical_row("grants", shifted)
    assert canonical_row("grants", values | {"name": None}) != canonical_row(
        "grants", values | {"name": "N"}
    )
    assert canonical_row("grants", values).startswith(b"hsmkms-row-v1\x00\x00\x00\x06grants")


# -- sealing and adoption ---------------------------------------------------------------------


def test_every_sealed_row_gets_a_mac_and_an_untouched_database_is_clean(env: Env) -> None:
    key_id = env.key(Description="d", Tags=[m.Tag(TagKey="at-create", TagValue="1")])
    env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key_id))
    assert env.store is not None
    env.store.create_grant(_grant(key_id, ALICE))
    env.alias("alias/one", key_id)
    env.tag(key_id, Project="p")
    for table in ("keys", "key_versions", "grants", "aliases", "tags"):
        macs = env.fetch(f"SELECT mac FROM {table}")  # noqa: S608
        assert macs
        assert all(isinstance(mac, bytes) and len(mac) == 32 for (mac,) in macs)
    assert env.store.integrity_problems() == []
    assert env.decrypt(env.encrypt(key_id)) == b"secret"
    reference = env.fetch("SELECT value FROM store_settings WHERE name = 'integrity_key'")
    ref = KeyMaterialRef.from_str(reference[0][0])
    assert reference[0][0].startswith("v2:default:HMAC_256:-:")
    assert ref.spec is KeyMaterialSpec.HMAC_256
    labels = {o.object_id: o.label for o in env.keystore.list_objects()}
    assert labels[ref.object_ids[0]] == MaterialName.service_key(INTEGRITY_KEY_NAME).base


def test_a_reread_of_an_unchanged_row_costs_no_token_call(env: Env) -> None:
    key_id = env.key()
    assert env.store is not None
    env.store.get_key(key_id)
    before = env.sealer.verifies
    for _ in range(5):
        env.store.get_key(key_id)
        env.store.get_version(key_id, 1)
        env.store.put_tags(key_id, {"t": "v"})  # a commit: empties the read cache
        env.encrypt(key_id)
    assert env.sealer.verifies - before <= 1  # only the first read of the version row


def test_a_new_store_adopts_an_unsealed_database_once(
    keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """Rows written without a sealer are sealed by the first open with one; later, a NULL MAC
    is tampering."""
    path = tmp_path / "kms.db"
    plain = MetadataStore(store_url(path))
    service = KmsService(keystore, plain, region=REGION, account_id=ACCOUNT)
    key_id = service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
    plain.create_grant(_grant(key_id, ALICE))
    plain.close()

    sealed = MetadataStore(store_url(path), sealer=TokenRowSealer(keystore))
    assert sealed.integrity_problems() == []
    assert sealed.get_key(key_id) is not None
    sealed.close()

    outside_sql(path, "UPDATE keys SET mac = NULL")
    again = MetadataStore(store_url(path), sealer=TokenRowSealer(keystore))
    try:
        _refused(lambda: again.get_key(key_id), key_id)
    finally:
        again.close()


def test_upgrade_from_a_database_without_mac_columns(
    keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """A database of the schema before integrity MACs (version 1: no mac columns, no grants,
    no settings) is migrated and adopted by the open that runs the migration."""
    path = tmp_path / "old.db"
    plain = MetadataStore(store_url(path))
    service = KmsService(keystore, plain, region=REGION, account_id=ACCOUNT)
    key_id = service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId
    plain.create_alias("alias/old", key_id, T0)
    plain.put_tags(key_id, {"old": "yes"})
    plain.close()
    for statement in (
        "DROP TABLE grants",
        "DROP TABLE store_settings",
        "ALTER TABLE keys DROP COLUMN mac",
        "ALTER TABLE key_versions DROP COLUMN mac",
        "ALTER TABLE aliases DROP COLUMN mac",
        "ALTER TABLE tags DROP COLUMN mac",
        "DELETE FROM schema_migrations WHERE version > 1",
    ):
        outside_sql(path, statement)

    store = MetadataStore(store_url(path), sealer=TokenRowSealer(keystore))
    try:
        assert store.schema_version() == MetadataStore.latest_schema_version()
        insp = inspect(store.engine)
        for table in schema.metadata.sorted_tables:
            assert {c["name"] for c in insp.get_columns(table.name)} == {
                c.name for c in table.columns
            }
        assert store.integrity_problems() == []
        found = store.get_key_and_version(key_id)
        assert found is not None
        assert found[1] is not None
        assert store.resolve_alias("alias/old") == found[0]
        assert store.list_tags(key_id, 10).items == [("old", "yes")]
    finally:
        store.close()


def test_removing_the_key_reference_is_refused_at_open(env: Env) -> None:
    """Without the reference a new key would bless whatever the database now holds."""
    env.key()
    env.sql("DELETE FROM store_settings WHERE name = 'integrity_key'")
    with pytest.raises(KMSInternalException, match="no integrity key reference"):
        env.open()


def test_a_reference_to_another_token_key_fails_closed(env: Env) -> None:
    key_id = env.key()
    other = new_mac_key(env.keystore, "audit")
    env.sql("UPDATE store_settings SET value = ? WHERE name = 'integrity_key'", other.to_str())
    env.open()
    with pytest.raises(KMSInternalException, match="labelled 'hsmkms:audit'"):
        env.encrypt(key_id)


def test_a_store_without_sealer_refuses_to_write_sealed_rows(env: Env) -> None:
    key_id = env.key()
    plain = MetadataStore(store_url(env.path))
    try:
        with pytest.raises(KMSInternalException, match="sealed"):
            plain.set_description(key_id, "unsealed")
        with pytest.raises(KMSInternalException, match="sealed"):
            plain.create_alias("alias/unsealed", key_id, T0)
        with pytest.raises(KMSInternalException, match="sealed"):
            plain.put_tags(key_id, {"unsealed": "1"})
        assert plain.get_key(key_id) is not None  # reads work, unchecked
    finally:
        plain.close()
    assert env.store is not None
    assert env.store.integrity_problems() == []


# -- tampering --------------------------------------------------------------------------------


def test_reenabling_a_disabled_key_in_the_database_is_refused(env: Env) -> None:
    key_id = env.key()
    env.service.disable_key(m.DisableKeyRequest(KeyId=key_id))
    assert env.sql("UPDATE keys SET state = 'Enabled' WHERE id = ?", key_id) == 1
    _refused(lambda: env.encrypt(key_id), key_id)
    _refused(lambda: env.service.enable_key(m.EnableKeyRequest(KeyId=key_id)), key_id)
    _refused(lambda: env.service.describe_key(m.DescribeKeyRequest(KeyId=key_id)), key_id)
    # A write never re-seals a tampered row: it stays refused.
    assert env.store is not None
    with pytest.raises(KeyIntegrityError):
        env.store.set_description(key_id, "launder")
    _refused(lambda: env.encrypt(key_id), key_id)


def test_a_swapped_policy_is_refused_and_not_echoed(env: Env) -> None:
    a = env.key()
    b = env.key()
    permissive = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*", "Resource": "*"}
            ],
        }
    )
    env.service.put_key_policy(m.PutKeyPolicyRequest(KeyId=b, Policy=permissive))
    (policy,) = env.fetch("SELECT policy FROM keys WHERE id = ?", b)[0]
    env.sql("UPDATE keys SET policy = ? WHERE id = ?", policy, a)
    error = _refused(lambda: env.encrypt(a), a)
    assert '"Principal"' not in error.message
    assert env.decrypt(env.encrypt(b)) == b"secret"  # the other key is untouched


def test_swapped_material_refs_are_refused(env: Env) -> None:
    a = env.key()
    b = env.key()
    blob_a = env.encrypt(a)
    ref_a = env.fetch("SELECT material_ref FROM key_versions WHERE key_id = ?", a)[0][0]
    ref_b = env.fetch("SELECT material_ref FROM key_versions WHERE key_id = ?", b)[0][0]
    env.sql("UPDATE key_versions SET material_ref = ? WHERE key_id = ?", ref_b, a)
    env.sql("UPDATE key_versions SET material_ref = ? WHERE key_id = ?", ref_a, b)
    _refused(lambda: env.decrypt(blob_a), a)
    _refused(lambda: env.encrypt(b), b)


def test_an_inserted_grant_is_refused(env: Env) -> None:
    """A copy of a real grant (with its valid MAC) for another grantee authorizes nothing."""
    key_id = env.key()
    assert env.store is not None
    env.store.create_grant(_grant(key_id, ALICE))
    env.sql(
        "INSERT INTO grants SELECT ?, key_id, name, ?, retiring_principal, operations, "
        "constraints, issuing_account, created_at, mac FROM grants",
        f"{2:064x}",
        MALLORY,
    )
    mallory = Caller(MALLORY, ACCOUNT)
    _refused(lambda: env.encrypt(key_id, caller=mallory), key_id)
    _refused(lambda: env.store.grants_for(key_id, MALLORY), key_id)  # type: ignore[union-attr]
    _refused(
        lambda: env.service.list_grants(m.ListGrantsRequest(KeyId=key_id)),
        key_id,
    )


def test_a_grant_moved_to_another_key_is_refused(env: Env) -> None:
    a = env.key()
    b = env.key()
    assert env.store is not None
    env.store.create_grant(_grant(a, ALICE))
    env.sql("UPDATE grants SET key_id = ?", b)
    _refused(lambda: env.store.grants_for(b, ALICE), b)  # type: ignore[union-attr]
    assert env.store.grants_for(a, ALICE) == []


def test_a_version_row_moved_to_another_key_is_refused(env: Env) -> None:
    """Version 2 of key b becomes version 2 of key a (its MAC copied along)."""
    a = env.key()
    b = env.key()
    env.service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=b))
    env.sql("UPDATE key_versions SET key_id = ? WHERE key_id = ? AND version = 2", a, b)
    env.sql("UPDATE keys SET current_version = 2, mac = (SELECT mac FROM keys WHERE id = ?) "
            "WHERE id = ?", b, a)  # fmt: skip
    _refused(lambda: env.encrypt(a), a)


def test_a_null_mac_is_refused(env: Env) -> None:
    key_id = env.key()
    env.sql("UPDATE keys SET mac = NULL WHERE id = ?", key_id)
    _refused(lambda: env.encrypt(key_id), key_id)


def test_scheduling_a_purge_in_the_database_destroys_nothing(env: Env) -> None:
    """A key moved to a past deletion date by hand is not purged: the purge refuses it."""
    key_id = env.key()
    env.sql(
        "UPDATE keys SET state = 'PendingDeletion', deletion_date = '2020-01-01 00:00:00.000000' "
        "WHERE id = ?",
        key_id,
    )
    objects = len(env.keystore.list_objects())
    assert env.service.run_due_tasks().purged == []
    assert len(env.keystore.list_objects()) == objects
    env.sql(
        "UPDATE keys SET state = 'Enabled', deletion_date = NULL WHERE id = ?", key_id
    )  # restored by hand: the MAC matches again
    assert env.decrypt(env.encrypt(key_id)) == b"secret"


def test_integrity_problems_lists_every_bad_row_without_content(env: Env) -> None:
    a = env.key()
    b = env.key()
    c = env.key()
    assert env.store is not None
    env.store.create_grant(_grant(c, ALICE))
    env.sql("UPDATE keys SET description = 'owned' WHERE id = ?", a)
    env.sql("UPDATE key_versions SET mac = NULL WHERE key_id = ?", b)
    env.sql("UPDATE grants SET operations = 'Decrypt,Encrypt,ReEncryptFrom'")
    problems = env.store.integrity_problems()
    assert {(p.table, p.key_id) for p in problems} == {
        ("keys", a),
        ("key_versions", b),
        ("grants", c),
    }
    details = {p.table: p.detail for p in problems}
    assert details["keys"] == "MAC does not match the row"
    assert details["key_versions"] == "version 1: MAC missing"
    assert details["grants"] == f"grant {1:064x}: MAC does not match the row"
    assert "owned" not in repr(problems)


def test_verification_cache_is_bounded(keystore: Pkcs11Keystore) -> None:
    sealer = TokenRowSealer(keystore)
    sealer.create_key()
    verifier = RowVerifier(sealer, max_entries=3)
    row = dict.fromkeys(SEALED_COLUMNS["grants"])
    tags = []
    for n in range(5):
        values = row | {"id": str(n)}
        tags.append(verifier.seal("grants", (str(n),), values))
    assert len(verifier._verified) <= 3
    assert verifier.verify("grants", ("0",), row | {"id": "0"}, tags[0]) is None
    assert verifier.verify("grants", ("0",), row | {"id": "0"}, tags[1]) is not None


def test_kms_errors_do_not_leak_from_the_integrity_error() -> None:
    error = KeyIntegrityError("1234abcd-12ab-34cd-56ef-1234567890ab")
    assert isinstance(error, KMSError)
    assert "1234abcd-12ab-34cd-56ef-1234567890ab" in str(error)
    import pickle

    again = pickle.loads(pickle.dumps(error))  # noqa: S301
    assert again.message == error.message


def test_a_tampered_key_does_not_stop_the_rotation_of_the_others(env: Env) -> None:
    """The periodic rotation skips (and logs) a key whose row fails its check."""
    good, bad = env.key(), env.key()
    for key_id in (good, bad):
        env.service.enable_key_rotation(
            m.EnableKeyRotationRequest(KeyId=key_id, RotationPeriodInDays=90)
        )
    env.sql("UPDATE keys SET description = 'edited' WHERE id = ?", bad)
    env.clock.advance(dt.timedelta(days=91))
    assert env.service.rotate_due() == [good]


# -- aliases and tags -------------------------------------------------------------------------


def test_an_alias_repointed_in_the_database_is_refused(env: Env) -> None:
    """alias/prod pointed by hand at a key the attacker controls: every use of the alias fails
    closed, naming the alias and not the key id written into the row."""
    prod, attacker = env.key(), env.key()
    env.alias("alias/prod", prod)
    blob = env.encrypt("alias/prod")
    assert env.sql("UPDATE aliases SET key_id = ? WHERE name = 'alias/prod'", attacker) == 1
    error = _refused(lambda: env.encrypt("alias/prod"), "alias/prod")
    assert attacker not in error.message
    assert env.store is not None
    _refused(lambda: env.store.get_alias("alias/prod"), "alias/prod")  # type: ignore[union-attr]
    _refused(lambda: env.store.resolve_alias("alias/prod"), "alias/prod")  # type: ignore[union-attr]
    _refused(lambda: env.aliases(), "alias/prod")  # ListAliases: the page fails, like ListGrants
    _refused(lambda: env.aliases(attacker), "alias/prod")
    _refused(lambda: env.store.aliases_of(attacker), "alias/prod")  # type: ignore[union-attr]
    # A write never re-seals the tampered row.
    _refused(
        lambda: env.service.update_alias(
            m.UpdateAliasRequest(AliasName="alias/prod", TargetKeyId=attacker)
        ),
        "alias/prod",
    )
    with pytest.raises(KeyIntegrityError):
        env.store.update_alias("alias/prod", attacker, T0)
    (problem,) = env.store.integrity_problems()
    assert (problem.table, problem.key_id) == ("aliases", attacker)
    assert problem.detail == "alias alias/prod: MAC does not match the row"
    # The key itself, by id, is untouched; restored by hand, the alias works again.
    assert env.decrypt(env.encrypt(prod)) == b"secret"
    env.sql("UPDATE aliases SET key_id = ? WHERE name = 'alias/prod'", prod)
    assert env.decrypt(env.encrypt("alias/prod")) == b"secret"
    assert env.decrypt(blob) == b"secret"
    assert env.store.integrity_problems() == []


def test_an_alias_inserted_in_the_database_is_refused(env: Env) -> None:
    """Neither a new row without a MAC nor a copy of another alias's row (with its valid MAC)
    resolves."""
    prod, attacker = env.key(), env.key()
    env.alias("alias/prod", prod)
    env.sql(
        "INSERT INTO aliases SELECT 'alias/copied', ?, created_at, updated_at, mac FROM aliases",
        attacker,
    )
    env.sql(
        "INSERT INTO aliases (name, key_id, created_at, updated_at) "
        "VALUES ('alias/new', ?, '2026-03-01 09:00:00.000000', '2026-03-01 09:00:00.000000')",
        attacker,
    )
    _refused(lambda: env.encrypt("alias/copied"), "alias/copied")
    _refused(lambda: env.encrypt("alias/new"), "alias/new")
    assert env.store is not None
    problems = {(p.table, p.key_id, p.detail) for p in env.store.integrity_problems()}
    assert problems == {
        ("aliases", attacker, "alias alias/copied: MAC does not match the row"),
        ("aliases", attacker, "alias alias/new: MAC missing"),
    }
    assert env.decrypt(env.encrypt("alias/prod")) == b"secret"


def test_a_bad_alias_name_is_not_echoed(env: Env) -> None:
    """A row whose name is not an alias name is reported as unreadable, never printed."""
    key_id = env.key()
    env.sql(
        "INSERT INTO aliases (name, key_id, created_at, updated_at) "
        "VALUES ('alias/x\x1b[2J', ?, '2026-03-01 09:00:00.000000', '2026-03-01 09:00:00.000000')",
        key_id,
    )
    _refused(lambda: env.aliases(), "(unreadable alias)")
    assert env.store is not None
    (problem,) = env.store.integrity_problems()
    assert problem.detail == "alias (unreadable alias): MAC missing"


def test_a_tag_edited_in_the_database_is_refused(env: Env) -> None:
    """Tags will decide aws:ResourceTag conditions: an edited, moved or inserted tag row makes
    reading the key's tags fail closed."""
    a, b = env.key(), env.key()
    env.tag(a, Project="alpha", Team="blue")
    assert env.sql("UPDATE tags SET tag_value = 'owned' WHERE key_id = ? AND tag_key = 'Team'",
                   a) == 1  # fmt: skip
    error = _refused(lambda: env.tags(a), a)
    assert "owned" not in error.message
    assert env.store is not None
    _refused(lambda: env.store.list_tags(a, 50), a)  # type: ignore[union-attr]
    (problem,) = env.store.integrity_problems()
    assert (problem.table, problem.key_id, problem.detail) == (
        "tags",
        a,
        "tag Team: MAC does not match the row",
    )
    assert "owned" not in repr(problem)
    # Overwriting the tag through the API re-seals the whole row: nothing of the edit is kept.
    env.tag(a, Team="blue")
    assert env.tags(a) == {"Project": "alpha", "Team": "blue"}

    env.sql("UPDATE tags SET key_id = ? WHERE key_id = ? AND tag_key = 'Project'", b, a)
    _refused(lambda: env.tags(b), b)
    env.sql("INSERT INTO tags (key_id, tag_key, tag_value) VALUES (?, 'Env', 'prod')", a)
    _refused(lambda: env.tags(a), a)
    problems = {(p.table, p.key_id, p.detail) for p in env.store.integrity_problems()}
    assert problems == {
        ("tags", b, "tag Project: MAC does not match the row"),
        ("tags", a, "tag Env: MAC missing"),
    }


def test_alias_and_tag_operations_seal_what_they_write(env: Env) -> None:
    """The ordinary operations keep working and leave a database without problems; resolving
    an alias again costs no token call."""
    a = env.key(Tags=[m.Tag(TagKey="made", TagValue="at-create")])
    b = env.key()
    env.alias("alias/app", a)
    env.alias("alias/other", a)
    env.tag(a, Project="alpha")
    env.tag(a, Project="beta")  # overwrite
    env.service.untag_resource(m.UntagResourceRequest(KeyId=a, TagKeys=["made"]))
    assert env.tags(a) == {"Project": "beta"}
    env.service.update_alias(m.UpdateAliasRequest(AliasName="alias/app", TargetKeyId=b))
    assert env.aliases() == {"alias/app": b, "alias/other": a}
    assert env.aliases(a) == {"alias/other": a}
    env.service.delete_alias(m.DeleteAliasRequest(AliasName="alias/other"))
    assert env.store is not None
    assert [x.name for x in env.store.aliases_of(b)] == ["alias/app"]
    resolved = env.store.resolve_alias("alias/app")
    assert resolved is not None
    assert resolved.key_id == b
    assert env.store.resolve_alias("alias/other") is None
    assert env.store.integrity_problems() == []

    env.encrypt("alias/app")
    before = env.sealer.verifies
    for _ in range(5):
        env.encrypt("alias/app")
        env.store.resolve_alias("alias/app")
        env.tag(b, Round="again")  # a commit: empties the read cache
        env.tags(b)
    assert env.sealer.verifies == before


def test_a_database_sealed_before_aliases_and_tags_adopts_them_once(env: Env) -> None:
    """A database from before migration 4 (keys sealed, aliases and tags without a mac column)
    is migrated by an open without a sealer (the server's parent), and its alias and tag rows
    are adopted by the first open with one; after that a NULL MAC is tampering."""
    key_id = env.key()
    env.alias("alias/legacy", key_id)
    env.tag(key_id, Project="old")
    assert env.store is not None
    env.store.close()
    env.store = None
    for statement in (
        "ALTER TABLE aliases DROP COLUMN mac",
        "ALTER TABLE tags DROP COLUMN mac",
        "DELETE FROM schema_migrations WHERE version = 4",
        "DELETE FROM store_settings WHERE name = 'sealed_tables'",
    ):
        env.sql(statement)

    parent = MetadataStore(store_url(env.path))  # migrates, seals nothing
    parent.close()
    assert env.fetch("SELECT mac FROM aliases") == [(None,)]
    assert env.fetch("SELECT mac FROM tags") == [(None,)]

    env.open()
    assert env.store is not None
    assert env.sealer.seals == 2  # the alias and the tag; the sealed tables are not re-sealed
    assert env.store.integrity_problems() == []
    assert env.decrypt(env.encrypt("alias/legacy")) == b"secret"
    assert env.tags(key_id) == {"Project": "old"}
    (record,) = env.fetch("SELECT value FROM store_settings WHERE name = 'sealed_tables'")
    assert record == ("aliases,grants,import_tokens,imported_key_material,key_versions,keys,tags",)

    env.sql("UPDATE aliases SET mac = NULL")
    env.open()
    assert env.sealer.seals == 0
    _refused(lambda: env.encrypt("alias/legacy"), "alias/legacy")


def test_removing_the_adoption_record_is_refused_at_open(env: Env) -> None:
    """Without the record the sealed alias rows would look like a database to adopt."""
    key_id = env.key()
    env.alias("alias/prod", key_id)
    env.sql("DELETE FROM store_settings WHERE name = 'sealed_tables'")
    with pytest.raises(KMSInternalException, match="sealed aliases rows but does not record"):
        env.open()
