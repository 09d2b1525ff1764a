"""Reading a seed file (hsmkms.seed.document): the schema, and every check that needs no data
directory. Each refusal is one SeedError naming the file and the entry, never a traceback or a
secret; arbitrary input never raises anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkms.seed import SeedError, load_seed, parse_seed
from hsmkms.seed.document import MAX_SEED_BYTES, policy_text

KEY_ID = "6f1d5c9e-8a7b-4c3d-9e2f-0a1b2c3d4e5f"
SECRET = "abcdefghijklmnopqrstuvwxyz0123"

FULL = f"""
version: 1
keys:
  - id: {KEY_ID}
    aliases: [alias/app-key, alias/app-key-2]
    description: the application's data key
    spec: SYMMETRIC_DEFAULT
    usage: ENCRYPT_DECRYPT
    policy:
      Version: "2012-10-17"
      Statement: [{{Effect: Allow, Principal: {{AWS: "arn:aws:iam::111122223333:root"}},
                   Action: "kms:*", Resource: "*"}}]
    tags: {{team: payments, build: "42"}}
    rotation: {{enabled: true, period_days: 90}}
    enabled: true
  - aliases: [alias/other]
credentials:
  - name: app
    access_key_id: AKIAAPPEXAMPLE000001
    secret_access_key_env: APP_SECRET
    policy: '{{"Version": "2012-10-17", "Statement": []}}'
"""


def refused(text: str) -> str:
    with pytest.raises(SeedError) as info:
        parse_seed(text, source="s.yaml")
    message = info.value.message
    assert message.startswith("seed file s.yaml: ")
    assert "\n" not in message
    return message


def test_a_full_seed_file_reads_into_its_entries() -> None:
    document = parse_seed(FULL, source="s.yaml")
    first, second = document.keys
    assert first.id == KEY_ID
    assert first.aliases == ["alias/app-key", "alias/app-key-2"]
    assert first.tags == {"team": "payments", "build": "42"}
    assert first.rotation is not None
    assert (first.rotation.enabled, first.rotation.period_days) == (True, 90)
    assert isinstance(first.policy, dict)
    assert second.id is None
    assert second.spec == "SYMMETRIC_DEFAULT"
    assert second.usage is None
    (credential,) = document.credentials
    assert credential.secret_access_key_env == "APP_SECRET"
    assert document.source == "s.yaml"


def test_a_policy_mapping_is_stored_as_json_text_and_text_as_given() -> None:
    document = parse_seed(FULL)
    text = policy_text(document.keys[0].policy)
    assert text is not None
    assert yaml.safe_load(text)["Statement"][0]["Action"] == "kms:*"
    assert policy_text(document.credentials[0].policy) == (
        '{"Version": "2012-10-17", "Statement": []}'
    )


def test_an_empty_document_with_a_version_declares_nothing() -> None:
    document = parse_seed("version: 1\n")
    assert (document.keys, document.credentials, document.custom_key_stores) == ([], [], [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "must be a mapping with 'version: 1'"),
        ("- a\n- b\n", "must be a mapping"),
        ("keys: []\n", "'version: 1' is required"),
        ("version: 2\n", "'version: 1' is required"),
        ("version: '1'\n", "'version: 1' is required"),
        ("version: 1\nkey: []\n", "key: unknown field"),
        ("version: 1\nkeys: {}\n", "keys: Input should be a valid list"),
        ("version: 1\nkeys:\n  - id: NOT-A-UUID\n", "keys[0] (NOT-A-UUID).id: must be a key id"),
        (f"version: 1\nkeys:\n  - id: {KEY_ID.upper()}\n", "must be a key id: a UUID in lower"),
        ("version: 1\nkeys:\n  - {aliases: [alias/a], tags: {n: 42}}\n", "tags.n: must be a str"),
        ("version: 1\nkeys:\n  - {aliases: [alias/a], tags: {n: yes}}\n", "quote values"),
        (
            "version: 1\nkeys:\n  - {aliases: [alias/a], enabled: 'no'}\n",
            "keys[0] (alias/a).enabled: must be true or false",
        ),
        (
            "version: 1\nkeys:\n  - {aliases: [alias/a], rotation: {period_days: '90'}}\n",
            "rotation.period_days: must be a whole number",
        ),
        ("version: 1\nkeys:\n  - {aliases: [alias/a], rotation: {days: 90}}\n", "unknown field"),
        ("version: 1\nkeys:\n  - {aliases: alias/a}\n", "aliases: Input should be a valid list"),
        ("version: 1\nkeys:\n  - {aliases: [alias/a], policy: 5}\n", "keys[0] (alias/a).policy"),
        ("version: 1\ncredentials:\n  - {name: a}\n", "credentials[0] (a).access_key_id: required"),
        (
            "version: 1\ncredentials:\n  - {name: a, access_key_id: A, secret_access_key: 5}\n",
            "credentials[0] (a).secret_access_key: must be a string",
        ),
        (
            "version: 1\ncustom_key_stores:\n  - {name: s, type: CLOUD}\n",
            "custom_key_stores[0] (s).type",
        ),
    ],
)
def test_the_schema_refuses_with_the_entry_named(text: str, expected: str) -> None:
    assert expected in refused(text)


def test_more_errors_than_the_first_are_counted() -> None:
    message = refused("version: 1\nkeys:\n  - {id: x, enabled: 3, spec: 4}\n")
    assert "(and 2 more)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\nversion: 1\n", "line 2, column 1: 'version' is given twice"),
        (
            "version: 1\nkeys:\n  - aliases: [alias/a]\n    description: x\n    description: y\n",
            "line 5, column 5: 'description' is given twice",
        ),
        ("version: 1\nkeys: &k []\ncredentials: *k\n", "line 3, column 14: YAML aliases"),
        ("version: 1\nkeys:\n  - &d {aliases: [alias/a]}\n  - <<: *d\n", "YAML aliases"),
        ("version: 1\nkeys: [\n", "line 3, column 1"),
        ("version: 1\n\tkeys: []\n", "line 2, column 1"),
        ("version: !!python/object:os.system 1\n", "could not determine a constructor"),
    ],
)
def test_yaml_that_would_hide_a_mistake_is_refused_with_its_line(text: str, expected: str) -> None:
    assert expected in refused(text)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ("keys:\n  - {description: lost}\n", "keys[0] (no id): give an id or an alias"),
        (
            f"keys:\n  - {{id: {KEY_ID}}}\n  - {{id: {KEY_ID}}}\n",
            f"keys[1] ({KEY_ID}): key id {KEY_ID} is also keys[0] ({KEY_ID})",
        ),
        (
            "keys:\n  - {aliases: [alias/a]}\n  - {aliases: [alias/b, alias/a]}\n",
            "keys[1] (alias/b): alias/a is also declared by keys[0] (alias/a)",
        ),
        (
            "keys:\n  - {aliases: [alias/a], custom_key_store: hsm2}\n",
            "custom_key_store 'hsm2' names no entry of custom_key_stores",
        ),
        (
            "credentials:\n  - {name: a, access_key_id: K1}\n  - {name: a, access_key_id: K2}\n",
            "credentials[1] (a): the name is also credentials[0] (a)",
        ),
        (
            "credentials:\n  - {name: a, access_key_id: K1}\n  - {name: b, access_key_id: K1}\n",
            "credentials[1] (b): access key id K1 is also credentials[0] (a)",
        ),
        (
            "credentials:\n  - {name: a, access_key_id: K1, secret_access_key: "
            f"{SECRET}, secret_access_key_env: X}}\n",
            "give one of secret_access_key, secret_access_key_env, not several",
        ),
        (
            "custom_key_stores:\n  - {name: s, cluster_id: cluster-aaaaaaaaaaa}\n"
            "  - {name: s, cluster_id: cluster-bbbbbbbbbbb}\n",
            "custom_key_stores[1] (s): the name is also custom_key_stores[0] (s)",
        ),
        (
            "custom_key_stores:\n  - {name: s, cluster_id: cluster-aaaaaaaaaaa}\n"
            "  - {name: t, cluster_id: cluster-aaaaaaaaaaa}\n",
            "custom_key_stores[1] (t): cluster_id cluster-aaaaaaaaaaa is also custom_key_stores[0]",
        ),
        ("custom_key_stores:\n  - {name: s}\n", "custom_key_stores[0] (s).cluster_id: required"),
        (
            "custom_key_stores:\n  - {name: s, type: EXTERNAL_KEY_STORE, cluster_id: c}\n",
            "(s).cluster_id: not a field of a store of type EXTERNAL_KEY_STORE",
        ),
        (
            "custom_key_stores:\n  - {name: s, type: EXTERNAL_KEY_STORE, "
            "xks_proxy_uri_endpoint: 'https://p', xks_proxy_uri_path: /kms/xks/v1}\n",
            "custom_key_stores[0] (s).xks_proxy_access_key_id: required",
        ),
        (
            "custom_key_stores:\n  - {name: s, cluster_id: c, key_store_password_env: A, "
            "key_store_password_file: b}\n",
            "give one of key_store_password_env, key_store_password_file, not several",
        ),
        (
            "custom_key_stores:\n  - {name: s, cluster_id: c, trust_anchor_certificate: x, "
            "trust_anchor_certificate_file: y}\n",
            "give one of trust_anchor_certificate, trust_anchor_certificate_file, not both",
        ),
        (
            "custom_key_stores:\n  - {name: x, type: EXTERNAL_KEY_STORE, "
            "xks_proxy_uri_endpoint: 'https://p', xks_proxy_uri_path: /kms/xks/v1, "
            "xks_proxy_access_key_id: K}\n"
            "keys:\n  - {aliases: [alias/a], custom_key_store: x}\n",
            "keys[0] (alias/a): a key in the external key store 'x' needs xks_key_id",
        ),
        (
            "custom_key_stores:\n  - {name: h, cluster_id: c}\n"
            "keys:\n  - {aliases: [alias/a], custom_key_store: h, xks_key_id: k}\n",
            "keys[0] (alias/a): xks_key_id is only for keys in an EXTERNAL_KEY_STORE",
        ),
        (
            "keys:\n  - {aliases: [alias/a], xks_key_id: k}\n",
            "keys[0] (alias/a): xks_key_id is given for a key in an external key store",
        ),
    ],
)
def test_rules_between_entries(entries: str, expected: str) -> None:
    assert expected in refused("version: 1\n" + entries)


def test_a_custom_key_store_named_by_an_entry_or_an_id_is_a_valid_reference() -> None:
    document = parse_seed(
        "version: 1\ncustom_key_stores: [{name: hsm2, cluster_id: cluster-abc}]\n"
        "keys:\n  - {aliases: [alias/a], custom_key_store: hsm2}\n"
        "  - {aliases: [alias/b], custom_key_store: cks-1234567890abcdef0}\n"
    )
    assert [k.custom_key_store for k in document.keys] == ["hsm2", "cks-1234567890abcdef0"]


def test_a_secret_in_the_file_never_shows_in_a_repr() -> None:
    document = parse_seed(
        "version: 1\ncredentials:\n"
        f"  - {{name: a, access_key_id: K, secret_access_key: {SECRET}}}\n"
    )
    assert SECRET not in repr(document)
    assert SECRET not in str(document.credentials[0])
    assert document.read_secret(document.credentials[0], 0) == SECRET


def test_secrets_come_from_the_environment_or_a_file_relative_to_the_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "b").write_text(SECRET + "-file\n")
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        "version: 1\ncredentials:\n"
        "  - {name: a, access_key_id: K1, secret_access_key_env: SEED_TEST_SECRET}\n"
        "  - {name: b, access_key_id: K2, secret_access_key_file: secrets/b}\n"
        "  - {name: c, access_key_id: K3}\n"
    )
    monkeypatch.setenv("SEED_TEST_SECRET", SECRET + "-env")
    document = load_seed(seed)
    assert document.source == str(seed)
    a, b, c = document.credentials
    assert document.read_secret(a, 0) == SECRET + "-env"
    assert document.read_secret(b, 1) == SECRET + "-file"
    assert document.read_secret(c, 2) is None


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("secret_access_key_env", "SEED_TEST_UNSET", "environment variable SEED_TEST_UNSET"),
        ("secret_access_key_file", "missing", "secret_access_key_file"),
        ("secret_access_key", "short-secret", "must be 20-128 characters (it has 12)"),
        ("secret_access_key", "x" * 129, "must be 20-128 characters (it has 129)"),
    ],
)
def test_an_unusable_secret_is_named_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, value: str, expected: str
) -> None:
    monkeypatch.delenv("SEED_TEST_UNSET", raising=False)
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        f"version: 1\ncredentials:\n  - {{name: a, access_key_id: K1, {field}: '{value}'}}\n"
    )
    document = load_seed(seed)
    with pytest.raises(SeedError) as info:
        document.read_secret(document.credentials[0], 0)
    assert expected in info.value.message
    assert "credentials[0] (a)" in info.value.message
    if field == "secret_access_key":
        assert value not in info.value.message


def test_a_seed_file_that_cannot_be_read_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match=r"seed file .*missing.yaml: No such file"):
        load_seed(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(SeedError, match="not UTF-8 text"):
        load_seed(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (MAX_SEED_BYTES + 1))
    with pytest.raises(SeedError, match="larger than 4 MiB"):
        load_seed(huge)
    with pytest.raises(SeedError, match=r"seed file .*: "):
        load_seed(tmp_path)  # a directory


def _outcome(text: str) -> str | None:
    """None when the text reads as a seed file, else the SeedError's message (any other
    exception fails the test)."""
    try:
        parse_seed(text)
    except SeedError as exc:
        return exc.message
    return None


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.floats(allow_nan=False)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["version", "keys", "id", "aliases", "tags", "policy", "rotation", "name", "x"]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "keys", "credentials", "x"]), _values))
def test_any_structure_is_read_or_refused_with_a_seed_error(document: dict[str, Any]) -> None:
    document.setdefault("version", 1)
    message = _outcome(yaml.safe_dump(document))
    assert message is None or (message.startswith("seed file <seed>: ") and "\n" not in message)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_read_or_refused_with_a_seed_error(text: str) -> None:
    message = _outcome(text)
    assert message is None or message.startswith("seed file <seed>: ")
