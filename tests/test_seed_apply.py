"""Applying a seed file to a real data directory (SoftHSM2 token, SQLite) and exporting one:
creation, idempotence, a conflict named by its entry, a bad seed changing nothing (database,
token and audit trail compared before and after), the audit records of the seed's steps, and
the export's round trip (never a secret)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_system import open_system

from hsmkms import models as m
from hsmkms.config import Settings
from hsmkms.errors import (
    AlreadyExistsException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.policy import default_key_policy
from hsmkms.seed import SeedError, apply_seed, export_seed, parse_seed, plan_seed
from hsmkms.service import KmsService
from hsmkms.system import LOCAL_OPERATOR_TYPE, System, initialize, open_audit_reader
from hsmkms.types import Caller

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
KEY_ID = "6f1d5c9e-8a7b-4c3d-9e2f-0a1b2c3d4e5f"
SECRET = "abcdefghijklmnopqrstuvwxyz0123"
APP_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["kms:Encrypt"], "Resource": "*"}],
}
KEY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "root",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }
    ],
}


def seed_text(**changes: Any) -> str:
    """The reference seed file, with top-level or first-key changes (``key0_<field>=...``)."""
    document: dict[str, Any] = {
        "version": 1,
        "keys": [
            {
                "id": KEY_ID,
                "aliases": ["alias/app-key"],
                "description": "the application's data key",
                "policy": KEY_POLICY,
                "tags": {"team": "payments"},
                "rotation": {"enabled": True, "period_days": 90},
            },
            {"aliases": ["alias/other", "alias/other-2"], "enabled": False},
        ],
        "credentials": [
            {
                "name": "app",
                "access_key_id": "AKIAAPPEXAMPLE000001",
                "secret_access_key": SECRET,
                "policy": APP_POLICY,
            }
        ],
    }
    for name, value in changes.items():
        if name.startswith("key0_"):
            field = name.removeprefix("key0_")
            if value is None:
                document["keys"][0].pop(field, None)
            else:
                document["keys"][0][field] = value
        else:
            document[name] = value
    return yaml.safe_dump(document, sort_keys=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def system(data_dir: Path) -> Iterator[System]:
    initialize(Settings.load(data_dir))
    with open_system(data_dir, identity=True) as opened:
        yield opened


def apply(system: System, text: str) -> list[str]:
    return list(apply_seed(parse_seed(text, source="s.yaml"), system).applied)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    keys: tuple[tuple[Any, ...], ...]
    aliases: tuple[tuple[str, str], ...]
    tags: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    credentials: tuple[tuple[str, str, bool], ...]
    token_objects: int
    audit_records: int


def snapshot(system: System) -> Snapshot:
    store = system.store
    keys = store.list_keys(1000).items
    aliases = store.list_aliases(1000).items
    records = 0
    if (system.settings.data_dir / "audit.db").exists():
        trail = open_audit_reader(system.settings)
        try:
            records = len(list(trail.search()))
        finally:
            trail.close()
    return Snapshot(
        keys=tuple(
            (
                k.key_id,
                k.description,
                k.state,
                k.policy,
                k.rotation_enabled,
                k.rotation_period_days,
                k.current_version,
            )
            for k in keys
        ),
        aliases=tuple((a.name, a.key_id) for a in aliases),
        tags=tuple((k.key_id, store.tags_of(k.key_id)) for k in keys),
        credentials=tuple(
            (c.name, c.access_key_id, c.has_policy) for c in system.credentials.list()
        ),
        token_objects=len(system.keystore.list_objects()),
        audit_records=records,
    )


# -- creating -------------------------------------------------------------------------------


def test_a_seed_creates_keys_aliases_settings_and_credentials(system: System) -> None:
    applied = apply(system, seed_text())
    assert applied[0] == f"keys[0] ({KEY_ID}): create key {KEY_ID} (SYMMETRIC_DEFAULT)"
    key = system.store.get_key(KEY_ID)
    assert key is not None
    assert key.description == "the application's data key"
    assert json.loads(key.policy) == KEY_POLICY
    assert (key.rotation_enabled, key.rotation_period_days) == (True, 90)
    assert dict(system.store.tags_of(KEY_ID)) == {"team": "payments"}
    alias = system.store.get_alias("alias/app-key")
    assert alias is not None
    assert alias.key_id == KEY_ID
    other = system.store.get_alias("alias/other")
    other_2 = system.store.get_alias("alias/other-2")
    assert other is not None
    assert other_2 is not None
    assert other.key_id == other_2.key_id != KEY_ID
    other_key = system.store.get_key(other.key_id)
    assert other_key is not None
    assert other_key.state == "Disabled"
    assert other_key.policy == default_key_policy(ACCOUNT)
    credential = system.credentials.lookup("AKIAAPPEXAMPLE000001")
    assert credential is not None
    assert credential.secret == SECRET
    assert credential.principal_arn == f"arn:aws:iam::{ACCOUNT}:user/app"
    assert json.loads(credential.identity_policy or "") == APP_POLICY


def test_a_seeded_key_encrypts_through_its_alias(system: System) -> None:
    apply(system, seed_text())
    blob = system.service.encrypt(
        m.EncryptRequest(KeyId="alias/app-key", Plaintext=b"seeded")
    ).CiphertextBlob
    response = system.service.decrypt(m.DecryptRequest(CiphertextBlob=blob))
    assert (response.KeyId, response.Plaintext) == (
        f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{KEY_ID}",
        b"seeded",
    )


def test_applying_again_changes_nothing(system: System) -> None:
    apply(system, seed_text())
    before = snapshot(system)
    report = apply_seed(parse_seed(seed_text(), source="s.yaml"), system)
    assert report.applied == ()
    assert report.unchanged == (
        f"keys[0] ({KEY_ID})",
        "keys[1] (alias/other)",
        "credentials[0] (app)",
    )
    assert report.summary() == "seed s.yaml: 0 change(s), 3 entries unchanged"
    assert snapshot(system) == before


def test_an_id_less_key_is_found_again_by_any_of_its_aliases(system: System) -> None:
    apply(system, seed_text())
    found = system.store.get_alias("alias/other")
    assert found is not None
    system.service.delete_alias(m.DeleteAliasRequest(AliasName="alias/other"))
    applied = apply(system, seed_text())
    # The key was found through alias/other-2: its lost alias is made again, no key is.
    assert applied == [f"keys[1] (alias/other): create alias/other -> {found.key_id}"]
    assert len(system.store.list_keys(1000).items) == 2


def test_attributes_an_entry_does_not_declare_may_change_at_run_time(system: System) -> None:
    apply(system, seed_text())
    other = system.store.get_alias("alias/other")
    assert other is not None
    system.service.tag_resource(
        m.TagResourceRequest(KeyId=other.key_id, Tags=[m.Tag(TagKey="k", TagValue="v")])
    )
    system.service.update_key_description(
        m.UpdateKeyDescriptionRequest(KeyId=other.key_id, Description="changed by a test")
    )
    assert apply(system, seed_text()) == []


def test_declared_aliases_missing_for_an_existing_key_are_added(system: System) -> None:
    apply(system, seed_text())
    applied = apply(system, seed_text(key0_aliases=["alias/app-key", "alias/app-key-v2"]))
    assert applied == [f"keys[0] ({KEY_ID}): create alias/app-key-v2 -> {KEY_ID}"]


def test_a_key_id_chosen_only_by_the_local_operator(system: System) -> None:
    request = m.OperatorCreateKeyRequest(KeyId=KEY_ID)
    caller = Caller(f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT, access_key_id="AKIDEXAMPLE")
    with pytest.raises(ValidationException, match="Only the local operator may choose a key id"):
        system.service.create_key(request, caller)
    assert system.store.get_key(KEY_ID) is None
    system.service.create_key(request)
    with pytest.raises(AlreadyExistsException, match=KEY_ID):
        system.service.create_key(request)
    # The API's model ignores the member: a caller never reaches the operator's class.
    assert not hasattr(m.CreateKeyRequest.model_validate({"KeyId": KEY_ID}), "KeyId")


# -- conflicts: an error naming the entry, and nothing changed ------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"key0_description": "another"}, 'has the description "the application\'s data key"'),
        ({"key0_policy": {**KEY_POLICY, "Id": "x"}}, "has another key policy"),
        ({"key0_tags": {"team": "ops"}}, "has the tags {'team': 'payments'}"),
        ({"key0_tags": {}}, "the seed declares {}"),
        ({"key0_rotation": {"enabled": False}}, "has automatic rotation enabled"),
        ({"key0_rotation": {"enabled": True, "period_days": 120}}, "rotates every 90 days"),
        ({"key0_enabled": False}, "is Enabled"),
    ],
)
def test_an_attribute_declared_otherwise_is_a_conflict(
    system: System, changes: dict[str, Any], expected: str
) -> None:
    apply(system, seed_text())
    before = snapshot(system)
    with pytest.raises(SeedError) as info:
        apply(system, seed_text(**changes))
    message = info.value.message
    assert message.startswith(f"seed file s.yaml: keys[0] ({KEY_ID}): key {KEY_ID} ")
    assert expected in message
    assert message.endswith("the data directory is left unchanged")
    assert snapshot(system) == before


def test_spec_and_usage_are_always_compared(system: System) -> None:
    hmac_key = m.CreateKeyRequest(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
    try:
        KmsService.check_request("CreateKey", hmac_key)
    except UnsupportedOperationException as exc:
        pytest.skip(f"needs a second key type: {exc.message}")
    apply(system, seed_text())
    changed = seed_text(key0_spec="HMAC_256", key0_usage="GENERATE_VERIFY_MAC", key0_rotation=None)
    with pytest.raises(SeedError, match="is SYMMETRIC_DEFAULT/ENCRYPT_DECRYPT, the seed declares"):
        apply(system, changed)


def test_aliases_naming_other_keys_are_conflicts(system: System) -> None:
    apply(system, seed_text())
    other = system.store.get_alias("alias/other")
    assert other is not None
    taken = seed_text(keys=[{"id": KEY_ID, "aliases": ["alias/app-key", "alias/other"]}])
    with pytest.raises(SeedError, match=f"alias/other exists and names key {other.key_id}"):
        apply(system, taken)
    split = seed_text(keys=[{"aliases": ["alias/app-key", "alias/other"]}], credentials=[])
    with pytest.raises(SeedError, match="its aliases name different keys"):
        apply(system, split)


def test_a_key_pending_deletion_is_a_conflict(system: System) -> None:
    apply(system, seed_text())
    system.service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=KEY_ID))
    with pytest.raises(SeedError, match=r"is pending deletion .*CancelKeyDeletion"):
        apply(system, seed_text())


@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        ({"access_key_id": "AKIAOTHER00000000001"}, "has the access key id AKIAAPPEXAMPLE000001"),
        ({"policy": {**APP_POLICY, "Id": "x"}}, "has another identity policy"),
        ({"secret_access_key": SECRET + "x"}, "has another secret"),
    ],
)
def test_a_credential_declared_otherwise_is_a_conflict(
    system: System, credential: dict[str, Any], expected: str
) -> None:
    apply(system, seed_text())
    before = snapshot(system)
    entry = {
        "name": "app",
        "access_key_id": "AKIAAPPEXAMPLE000001",
        "secret_access_key": SECRET,
        **credential,
    }
    with pytest.raises(SeedError, match=r"credentials\[0\] \(app\): the credential 'app' ") as info:
        apply(system, seed_text(credentials=[entry]))
    assert expected in info.value.message
    assert SECRET not in info.value.message
    assert snapshot(system) == before


def test_an_existing_credential_needs_no_secret_and_another_name_cannot_take_its_key(
    system: System,
) -> None:
    apply(system, seed_text())
    without_secret = {"name": "app", "access_key_id": "AKIAAPPEXAMPLE000001"}
    assert apply(system, seed_text(credentials=[without_secret])) == []
    thief = {"name": "thief", "access_key_id": "AKIAAPPEXAMPLE000001", "secret_access_key": SECRET}
    with pytest.raises(SeedError, match="belongs to the credential 'app'"):
        apply(system, seed_text(credentials=[thief]))
    root_id = next(c for c in system.credentials.list() if c.name == "root").access_key_id
    taker = {"name": "taker", "access_key_id": root_id, "secret_access_key": SECRET}
    with pytest.raises(SeedError, match="belongs to the credential 'root'"):
        apply(system, seed_text(credentials=[taker]))


# -- a bad seed changes nothing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"key0_spec": "AES_256"},
            "keys[0] (6f1d5c9e-8a7b-4c3d-9e2f-0a1b2c3d4e5f): spec 'AES_256' is not one of",
        ),
        ({"key0_usage": "ENCRYPT"}, "usage 'ENCRYPT' is not one of"),
        ({"key0_policy": "{not json"}, "(MalformedPolicyDocumentException)"),
        (
            {"key0_tags": {"aws:reserved": "x"}},
            "Tags beginning with aws: are reserved (TagException)",
        ),
        ({"key0_aliases": ["alias/aws/mine"]}, "alias/aws/ is reserved"),
        ({"key0_aliases": ["not-an-alias"]}, 'must start with the prefix "alias/"'),
        ({"key0_description": "x" * 8193}, "failed to satisfy constraint"),
        ({"key0_rotation": {"period_days": 10}}, "greater than or equal to 90"),
        (
            {"key0_usage": "SIGN_VERIFY", "key0_rotation": None},
            "KeyUsage SIGN_VERIFY is not compatible with KeySpec SYMMETRIC_DEFAULT",
        ),
        (
            {"key0_custom_key_store": "cks-1234567890abcdef0"},
            "custom key store cks-1234567890abcdef0 does not exist",
        ),
        (
            {"custom_key_stores": [{"name": "hsm2", "cluster_id": "cluster-abcdefghijk"}]},
            "custom_key_stores[0] (hsm2): no secret to create it with",
        ),
        (
            {
                "custom_key_stores": [
                    {
                        "name": "hsm2",
                        "cluster_id": "cluster-abcdefghijk",
                        "trust_anchor_certificate": "-----BEGIN X-----",
                        "key_store_password_file": "missing-pin-file",
                    }
                ]
            },
            "custom_key_stores[0] (hsm2): key_store_password_file missing-pin-file cannot be read",
        ),
        (
            {"credentials": [{"name": "root", "access_key_id": "K", "secret_access_key": SECRET}]},
            "the account root is set with HSMKMS_ROOT_ACCESS_KEY_ID",
        ),
        (
            {"credentials": [{"name": "a b", "access_key_id": "K", "secret_access_key": SECRET}]},
            "the name must be 1-64 characters",
        ),
        (
            {"credentials": [{"name": "a", "access_key_id": "K-1", "secret_access_key": SECRET}]},
            "an access key id must be 1-128 letters",
        ),
        (
            {"credentials": [{"name": "a", "access_key_id": "K1", "policy": "{}"}]},
            "credentials[0] (a): ",
        ),
        (
            {"credentials": [{"name": "a", "access_key_id": "K1"}]},
            "no secret to create it with",
        ),
    ],
)
def test_a_bad_seed_changes_nothing(system: System, changes: dict[str, Any], expected: str) -> None:
    """Later entries of the file are valid and would be created: the bad one stops them all."""
    before = snapshot(system)
    with pytest.raises(SeedError) as info:
        apply(system, seed_text(**changes))
    assert expected in info.value.message
    assert snapshot(system) == before


def test_a_plan_names_every_change_and_changes_nothing(system: System) -> None:
    before = snapshot(system)
    plan = plan_seed(parse_seed(seed_text(), source="s.yaml"), system)
    assert [line.split(": ", 1)[1].split(" ", 2)[:2] for line in plan.lines()] == [
        ["create", "key"],
        ["enable", "rotation"],
        ["create", "alias/app-key"],
        ["create", "key"],
        ["disable", "key"],
        ["create", "alias/other"],
        ["create", "alias/other-2"],
        ["create", "credential"],
    ]
    assert SECRET not in repr(plan)
    assert snapshot(system) == before
    # Without a data directory, everything is to be created.
    assert len(plan_seed(parse_seed(seed_text()), None).steps) == 8


# -- audit ----------------------------------------------------------------------------------


def test_each_key_step_is_a_local_operator_record(system: System) -> None:
    apply(system, seed_text())
    trail = open_audit_reader(system.settings)
    try:
        # The key steps (the root's access key made at start is an IAM-shaped record too).
        records = [r for r in trail.search() if r["eventSource"] == "kms.amazonaws.com"]
    finally:
        trail.close()
    assert [r["eventName"] for r in records] == [
        "CreateKey",
        "EnableKeyRotation",
        "CreateAlias",
        "CreateKey",
        "DisableKey",
        "CreateAlias",
        "CreateAlias",
    ]
    for record in records:
        assert record["userIdentity"]["type"] == LOCAL_OPERATOR_TYPE
        assert record["userAgent"].endswith("(seed)")
        assert "errorCode" not in record
    assert records[0]["requestParameters"]["keyId"] == KEY_ID
    assert SECRET not in json.dumps(records)


# -- export ---------------------------------------------------------------------------------


def test_export_writes_the_definitions_without_secrets(system: System) -> None:
    apply(system, seed_text())
    text = export_seed(system)
    assert SECRET not in text
    assert "secret" not in yaml.safe_load(text)["credentials"][0]
    exported = yaml.safe_load(text)
    first, second = (
        exported["keys"] if exported["keys"][0]["id"] == KEY_ID else exported["keys"][::-1]
    )
    assert first == {
        "id": KEY_ID,
        "aliases": ["alias/app-key"],
        "description": "the application's data key",
        "spec": "SYMMETRIC_DEFAULT",
        "usage": "ENCRYPT_DECRYPT",
        "policy": KEY_POLICY,
        "tags": {"team": "payments"},
        "rotation": {"enabled": True, "period_days": 90},
    }
    assert second["aliases"] == ["alias/other", "alias/other-2"]
    assert second["enabled"] is False
    assert "policy" not in second  # the default key policy
    assert exported["credentials"] == [
        {"name": "app", "access_key_id": "AKIAAPPEXAMPLE000001", "policy": APP_POLICY}
    ]


def test_an_export_applied_to_its_own_data_directory_changes_nothing(system: System) -> None:
    apply(system, seed_text())
    system.service.create_key(m.CreateKeyRequest(Description="made through the API"))
    before = snapshot(system)
    assert apply(system, export_seed(system)) == []
    assert snapshot(system) == before


def test_an_export_with_secrets_added_rebuilds_another_data_directory(
    system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(system, seed_text())
    other = system.store.get_alias("alias/other")
    assert other is not None
    system.service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=other.key_id))
    text = export_seed(system)
    assert "# 1 key(s) pending deletion are left out." in text
    document = yaml.safe_load(text)
    document["credentials"][0]["secret_access_key_env"] = "SEED_TEST_APP_SECRET"
    monkeypatch.setenv("SEED_TEST_APP_SECRET", SECRET)
    other_dir = tmp_path / "other"
    initialize(Settings.load(other_dir))
    with open_system(other_dir, identity=True) as rebuilt:
        apply(rebuilt, yaml.safe_dump(document))
        assert yaml.safe_load(export_seed(rebuilt)) == yaml.safe_load(text)
        credential = rebuilt.credentials.lookup("AKIAAPPEXAMPLE000001")
        assert credential is not None
        assert credential.secret == SECRET
