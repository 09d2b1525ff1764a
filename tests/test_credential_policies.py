"""Identity policies on credentials: stored with the credential, sealed into the secret's AAD
(an edited policy makes the credential unusable), migrated in place from schema v1, and managed
by ``hsmkms credentials create --policy-file | set-policy | get-policy``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cli_process
import pytest
from postgres import on_postgresql, outside_fetch, outside_sql, store_url
from server import clean_env, database_env
from structlog.testing import capture_logs

from conftest import new_key_version
from hsmkms.errors import KMSInternalException, MalformedPolicyDocumentException
from hsmkms.identity import (
    CredentialIntegrityError,
    CredentialStore,
    UnknownCredential,
    validate_identity_policy,
)
from hsmkms.identity.store import IDENTITY_KEY_ID, SCHEMA_VERSION
from hsmkms.keystore.pkcs11 import Pkcs11Keystore

pytestmark = [pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "111122223333"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ENCRYPT_DECRYPT = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "UseOneKey",
                "Effect": "Allow",
                "Action": ["kms:Encrypt", "kms:Decrypt"],
                "Resource": KEY_ARN,
            }
        ],
    },
    indent=2,
)
EVERYTHING = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", '
EVERYTHING += '"Resource": "*"}]}'

# Each is refused by the grammar (message fragment in the second element).
MALFORMED = [
    ("", "empty"),
    ("{not json", "not valid JSON"),
    ('{"Version": "2012-10-17", "Statement": []', "not valid JSON"),
    (
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", '
        '"Resource": "*"}]}',
        "Principal",
    ),
    ('{"Statement": [{"Effect": "Maybe", "Action": "kms:*", "Resource": "*"}]}', "Effect"),
    ('{"Statement": {"Effect": "Allow"}, "Statement": []}', "repeats"),
    ('{"Version": "2012-10-17", "Statement": [], "Id": "' + "x" * 33000 + '"}', "bytes"),
]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "id.db"


@pytest.fixture
def store(db: Path, keystore: Pkcs11Keystore) -> Iterator[CredentialStore]:
    credentials = CredentialStore(store_url(db), keystore, account_id=ACCOUNT)
    yield credentials
    credentials.close()


def tamper(db: Path, sql: str, *params: object) -> None:
    """Change the database directly, as someone with write access to the file could."""
    outside_sql(db, sql, *params)


def column(db: Path, sql: str, *params: object) -> object:
    rows = outside_fetch(db, sql, *params)
    return rows[0][0] if rows else None


# -- the store ------------------------------------------------------------------------------


def test_create_with_policy_then_lookup_returns_it(store: CredentialStore) -> None:
    issued = store.create("alice", ENCRYPT_DECRYPT)
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert found.identity_policy == ENCRYPT_DECRYPT  # exactly as given
    assert found.secret == issued.secret_access_key
    assert ENCRYPT_DECRYPT not in repr(found)


def test_credential_without_policy_has_none(store: CredentialStore) -> None:
    issued = store.create("bob")
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert found.identity_policy is None


def test_list_says_which_credentials_have_a_policy(store: CredentialStore) -> None:
    store.ensure_root()
    store.create("with", EVERYTHING)
    store.create("without")
    assert {e.name: e.has_policy for e in store.list()} == {
        "root": False,
        "with": True,
        "without": False,
    }


@pytest.mark.parametrize(("policy", "fragment"), MALFORMED)
def test_create_with_invalid_policy_stores_nothing(
    store: CredentialStore, policy: str, fragment: str
) -> None:
    with pytest.raises(MalformedPolicyDocumentException, match=fragment):
        store.create("carol", policy)
    assert [e.name for e in store.list()] == []


def test_oversize_policy_is_malformed_with_its_size() -> None:
    policy = '{"Statement": [], "Id": "' + "x" * 40000 + '"}'
    with pytest.raises(MalformedPolicyDocumentException, match="maximum is 32768 bytes"):
        validate_identity_policy(policy)


@pytest.mark.parametrize("by", ["name", "access_key_id"])
def test_set_policy_replaces_and_clears(store: CredentialStore, by: str) -> None:
    issued = store.create("dave")
    target = "dave" if by == "name" else issued.access_key_id
    assert store.lookup(issued.access_key_id) is not None  # cached before the change

    info = store.set_policy(target, EVERYTHING)
    assert (info.access_key_id, info.name, info.has_policy) == (issued.access_key_id, "dave", True)
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert (found.identity_policy, found.secret) == (EVERYTHING, issued.secret_access_key)

    store.set_policy(target, ENCRYPT_DECRYPT)
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert found.identity_policy == ENCRYPT_DECRYPT

    assert not store.set_policy(target, None).has_policy
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert (found.identity_policy, found.secret) == (None, issued.secret_access_key)
    assert store.get_policy(target)[1] is None


def test_set_policy_is_seen_at_once_by_another_store(db: Path, keystore: Pkcs11Keystore) -> None:
    """As a running server would: its cached credential gives way to the new policy on the
    very next lookup."""
    url = store_url(db)
    admin = CredentialStore(url, keystore, account_id=ACCOUNT)
    server = CredentialStore(url, keystore, account_id=ACCOUNT)
    try:
        issued = admin.create("erin")
        before = server.lookup(issued.access_key_id)
        assert before is not None
        assert before.identity_policy is None
        assert server.lookup(issued.access_key_id) is before  # from the cache
        admin.set_policy("erin", ENCRYPT_DECRYPT)
        after = server.lookup(issued.access_key_id)
        assert after is not None
        assert after.identity_policy == ENCRYPT_DECRYPT
        admin.set_policy("erin", None)
        cleared = server.lookup(issued.access_key_id)
        assert cleared is not None
        assert cleared.identity_policy is None
    finally:
        admin.close()
        server.close()


def test_invalid_policy_keeps_the_old_one(store: CredentialStore) -> None:
    issued = store.create("frank", ENCRYPT_DECRYPT)
    for policy, fragment in MALFORMED:
        with pytest.raises(MalformedPolicyDocumentException, match=fragment):
            store.set_policy("frank", policy)
    found = store.lookup(issued.access_key_id)
    assert found is not None
    assert found.identity_policy == ENCRYPT_DECRYPT


def test_root_is_not_governed_by_identity_policies(store: CredentialStore) -> None:
    root = store.ensure_root()
    assert root is not None
    for target in ("root", root.access_key_id):
        with pytest.raises(Exception, match="account root is not governed by identity polic"):
            store.set_policy(target, EVERYTHING)
    found = store.lookup(root.access_key_id)
    assert found is not None
    assert found.identity_policy is None
    assert store.get_policy("root")[1] is None


def test_set_or_get_policy_of_unknown_credential(store: CredentialStore) -> None:
    with pytest.raises(UnknownCredential):
        store.set_policy("nobody", EVERYTHING)
    with pytest.raises(UnknownCredential):
        store.get_policy("AKIAAAAAAAAAAAAAAAAA")


def test_get_policy_returns_the_stored_text(store: CredentialStore) -> None:
    issued = store.create("grace", ENCRYPT_DECRYPT)
    info, policy = store.get_policy(issued.access_key_id)
    assert (info.name, info.has_policy, policy) == ("grace", True, ENCRYPT_DECRYPT)


def test_the_documented_example_is_a_valid_identity_policy() -> None:
    """The example in docs/credentials.md, read from the file: Encrypt/Decrypt on one key."""
    docs = Path(__file__).parent.parent / "docs" / "credentials.md"
    section = docs.read_text().split("## Identity policies", 1)[1]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    assert validate_identity_policy(example) == example
    assert json.loads(example) == json.loads(ENCRYPT_DECRYPT)


# -- tamper evidence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "edited"),
    [
        (ENCRYPT_DECRYPT, EVERYTHING),  # widened
        (ENCRYPT_DECRYPT, None),  # removed
        (None, EVERYTHING),  # added to a credential that had none
        (ENCRYPT_DECRYPT, ENCRYPT_DECRYPT.replace("Allow", "Deny")),  # narrowed, still refused
    ],
)
def test_policy_edited_in_the_database_makes_the_credential_unknown(
    db: Path, store: CredentialStore, original: str | None, edited: str | None
) -> None:
    """Fail closed: the policy is bound into the sealed secret's AAD, so a row whose policy
    changed outside the store does not open, even for a store that had it cached and even
    though row_version was left alone. The warning names the access key id only."""
    issued = store.create("heidi", original)
    victim = store.create("ivan", original)
    assert store.lookup(issued.access_key_id) is not None
    assert store.lookup(victim.access_key_id) is not None

    tamper(db, "UPDATE identity_credentials SET policy = ? WHERE name = 'heidi'", edited)
    with capture_logs() as logs:
        assert store.lookup(issued.access_key_id) is None
    assert logs == [
        {
            "event": "credential_integrity_failed",
            "log_level": "warning",
            "access_key_id": issued.access_key_id,
        }
    ]
    assert store.lookup(victim.access_key_id) is not None  # only the altered row

    with pytest.raises(CredentialIntegrityError, match="does not open"):
        store.get_policy("heidi")
    with pytest.raises(CredentialIntegrityError, match="delete it and create a new one"):
        store.set_policy("heidi", EVERYTHING)
    # Putting the original text back restores it: the seal, not the store, decides.
    tamper(db, "UPDATE identity_credentials SET policy = ? WHERE name = 'heidi'", original)
    assert store.lookup(issued.access_key_id) is not None


def test_policy_moved_between_rows_does_not_open(
    db: Path, keystore: Pkcs11Keystore, store: CredentialStore
) -> None:
    narrow = store.create("judy", ENCRYPT_DECRYPT)
    store.create("mallory", EVERYTHING)
    tamper(
        db,
        "UPDATE identity_credentials SET policy = (SELECT policy FROM identity_credentials "
        "WHERE name = 'mallory'), row_version = row_version + 1 WHERE name = 'judy'",
    )
    fresh = CredentialStore(store_url(db), keystore, account_id=ACCOUNT)
    try:
        assert fresh.lookup(narrow.access_key_id) is None
    finally:
        fresh.close()


# -- schema v1 -> v2 ------------------------------------------------------------------------

V1_TABLES = [
    "CREATE TABLE identity_meta (name VARCHAR(64) NOT NULL, value TEXT NOT NULL, "
    "PRIMARY KEY (name))",
    "CREATE TABLE identity_credentials (access_key_id VARCHAR(128) NOT NULL, "
    "name VARCHAR(64) NOT NULL, principal_arn VARCHAR(2048) NOT NULL, secret_iv BLOB NOT NULL, "
    "secret_sealed BLOB NOT NULL, wrapping_key TEXT NOT NULL, row_version BIGINT NOT NULL, "
    "created_at VARCHAR(40) NOT NULL, PRIMARY KEY (access_key_id), UNIQUE (name))",
]


def make_v1_database(db: Path, keystore: Pkcs11Keystore) -> dict[str, tuple[str, bytes]]:
    """A schema v1 database built by hand: the v1 tables, a wrapping key in the token, and two
    rows sealed with the v1 AAD spelled out here. Returns name -> (key id, sealed secret)."""
    ref = new_key_version(keystore, IDENTITY_KEY_ID)
    rows = {}
    for statement in V1_TABLES:
        outside_sql(db, statement.replace("BLOB", "BYTEA") if on_postgresql() else statement)
    outside_sql(db, "INSERT INTO identity_meta VALUES ('schema_version', '1')")
    outside_sql(db, "INSERT INTO identity_meta VALUES ('wrapping_key', ?)", ref.to_str())
    for name, key_id in (
        ("root", "AKIAV1ROOT0000000000"),
        ("olduser", "AKIAV1USER0000000000"),
    ):
        arn = f"arn:aws:iam::{ACCOUNT}:" + ("root" if name == "root" else f"user/{name}")
        aad = b"hsmkms:identity:v1\x00" + key_id.encode() + b"\x00" + arn.encode()
        iv, body = keystore.encrypt(ref, f"secret-of-{name}".encode(), aad)
        outside_sql(
            db,
            "INSERT INTO identity_credentials VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            key_id, name, arn, iv, body, ref.to_str(), 7, "2026-01-01",
        )  # fmt: skip
        rows[name] = (key_id, body)
    return rows


def test_v1_database_migrates_in_place_and_old_rows_keep_working(
    db: Path, keystore: Pkcs11Keystore
) -> None:
    rows = make_v1_database(db, keystore)
    url = store_url(db)
    with capture_logs() as logs:
        store = CredentialStore(url, keystore, account_id=ACCOUNT)
    try:
        # 1 -> 2 (the policy column added in place), 2 -> 3 (name no longer unique: rebuilt).
        assert [(e["event"], e["from_version"]) for e in logs] == [
            ("identity_schema_migrated", 1),
            ("identity_schema_migrated", 2),
        ]
        assert column(db, "SELECT value FROM identity_meta WHERE name = 'schema_version'") == (
            str(SCHEMA_VERSION)
        )
        for name, (key_id, sealed) in rows.items():
            found = store.lookup(key_id)
            assert found is not None
            assert (found.secret, found.identity_policy) == (f"secret-of-{name}", None)
            # Not rewritten: the v1 seal is still the one in the row.
            stored = "SELECT secret_sealed FROM identity_credentials WHERE name = ?"
            assert column(db, stored, name) == sealed
        assert {e.name: e.has_policy for e in store.list()} == {"root": False, "olduser": False}

        store.set_policy("olduser", ENCRYPT_DECRYPT)
        found = store.lookup(rows["olduser"][0])
        assert found is not None
        assert (found.secret, found.identity_policy) == ("secret-of-olduser", ENCRYPT_DECRYPT)
    finally:
        store.close()
    # Opening again is a no-op.
    with capture_logs() as logs:
        again = CredentialStore(url, keystore, account_id=ACCOUNT)
    again.close()
    assert logs == []


def test_v1_database_without_version_row_is_migrated(db: Path, keystore: Pkcs11Keystore) -> None:
    rows = make_v1_database(db, keystore)
    tamper(db, "DELETE FROM identity_meta WHERE name = 'schema_version'")
    store = CredentialStore(store_url(db), keystore, account_id=ACCOUNT)
    try:
        assert store.lookup(rows["olduser"][0]) is not None
        assert column(db, "SELECT value FROM identity_meta WHERE name = 'schema_version'") == (
            str(SCHEMA_VERSION)
        )
    finally:
        store.close()


@pytest.mark.parametrize("version", [str(SCHEMA_VERSION + 1), "x"])
def test_newer_or_unknown_schema_is_refused(
    db: Path, keystore: Pkcs11Keystore, version: str
) -> None:
    CredentialStore(store_url(db), keystore, account_id=ACCOUNT).close()
    tamper(db, "UPDATE identity_meta SET value = ? WHERE name = 'schema_version'", version)
    with pytest.raises(KMSInternalException, match="upgrade hsmkms"):
        CredentialStore(store_url(db), keystore, account_id=ACCOUNT)


def test_aad_with_policy_is_the_v1_aad_plus_the_policy_digest(
    db: Path, keystore: Pkcs11Keystore, store: CredentialStore
) -> None:
    """Known answer: the layout in the module docstring, opened here without the store."""
    issued = store.create("ken", EVERYTHING)
    ((iv, body, wrapping),) = outside_fetch(
        db,
        "SELECT secret_iv, secret_sealed, wrapping_key FROM identity_credentials "
        "WHERE name = 'ken'",
    )
    from hsmkms.keystore.base import KeyMaterialRef

    aad = b"\x00".join(
        [b"hsmkms:identity:v1", issued.access_key_id.encode(), issued.principal_arn.encode()]
    )
    aad += b"\x00policy\x00" + hashlib.sha256(EVERYTHING.encode()).digest()
    ref = KeyMaterialRef.from_str(wrapping)
    assert keystore.decrypt(ref, iv, body, aad) == issued.secret_access_key.encode()


# -- the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("credential-policies") / "data"
    assert cli("init", data_dir=path).returncode == 0
    return path


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout.decode()
        self.stderr = proc.stderr.decode()


def cli(*args: str, data_dir: Path, stdin: bytes = b"") -> Result:
    """``hsmkms ARGS --data-dir DATA_DIR`` in a subprocess, ``stdin`` on its standard input."""
    proc = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", *args, "--data-dir", str(data_dir)],
        env=clean_env(**database_env(data_dir, None)),
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return Result(proc)


def one_line_error(result: Result, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hsmkms credentials: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def names(data_dir: Path) -> dict[str, bool]:
    listing = json.loads(cli("credentials", "list", "--json", data_dir=data_dir).stdout)
    return {e["Name"]: e["HasPolicy"] for e in listing}


def test_cli_create_with_policy_set_get_and_clear(data_dir: Path, tmp_path: Path) -> None:
    """The whole cycle; the secret appears in create's output and nowhere else."""
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(ENCRYPT_DECRYPT)
    created = cli(
        "credentials",
        "create",
        "--name",
        "cycle",
        "--policy-file",
        str(policy_file),
        data_dir=data_dir,
    )
    assert created.returncode == 0, created.stderr
    assert "IdentityPolicy:  attached" in created.stdout
    secret = created.stdout.split("SecretAccessKey:")[1].split()[0]
    assert len(secret) == 40
    outputs = []

    got = cli("credentials", "get-policy", "cycle", data_dir=data_dir)
    outputs.append(got)
    assert (got.returncode, got.stdout, got.stderr) == (0, ENCRYPT_DECRYPT + "\n", "")

    listing = cli("credentials", "list", data_dir=data_dir)
    outputs.append(listing)
    (line,) = [x for x in listing.stdout.splitlines() if " cycle " in x]
    assert line.split()[3] == "policy"
    (root,) = [x for x in listing.stdout.splitlines() if " root " in x]
    assert root.split()[3] == "-"
    outputs.append(cli("credentials", "list", "--json", data_dir=data_dir))
    assert names(data_dir)["cycle"] is True

    policy_file.write_text(EVERYTHING)
    replaced = cli(
        "credentials", "set-policy", "cycle", "--policy-file", str(policy_file), data_dir=data_dir
    )
    outputs.append(replaced)
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout.startswith("identity policy set on AKIA")
    got = cli("credentials", "get-policy", "cycle", data_dir=data_dir)
    outputs.append(got)
    assert got.stdout == EVERYTHING + "\n"

    cleared = cli("credentials", "set-policy", "cycle", "--clear", data_dir=data_dir)
    outputs.append(cleared)
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.startswith("identity policy removed from AKIA")
    got = cli("credentials", "get-policy", "cycle", data_dir=data_dir)
    outputs.append(got)
    assert (got.returncode, got.stdout) == (0, "")
    assert got.stderr.strip().endswith("has no identity policy")
    listing = cli("credentials", "list", data_dir=data_dir)
    outputs.append(listing)
    (line,) = [x for x in listing.stdout.splitlines() if " cycle " in x]
    assert line.split()[3] == "none"

    for output in outputs:
        assert secret not in output.stdout + output.stderr


def test_cli_policy_from_stdin(data_dir: Path) -> None:
    created = cli(
        "credentials",
        "create",
        "--name",
        "piped",
        "--policy-file",
        "-",
        "--json",
        data_dir=data_dir,
        stdin=ENCRYPT_DECRYPT.encode(),
    )
    assert created.returncode == 0, created.stderr
    assert set(json.loads(created.stdout)) == {"AccessKeyId", "SecretAccessKey", "Arn"}
    set_policy = cli(
        "credentials",
        "set-policy",
        "piped",
        "--policy-file",
        "-",
        data_dir=data_dir,
        stdin=b"\xef\xbb\xbf" + EVERYTHING.encode(),
    )
    assert set_policy.returncode == 0, set_policy.stderr
    # A UTF-8 byte order mark is dropped; the rest is stored exactly.
    assert cli("credentials", "get-policy", "piped", data_dir=data_dir).stdout == EVERYTHING + "\n"


def bad_files(tmp_path: Path) -> list[tuple[list[str], bytes, str]]:
    """(policy-file arguments, stdin, message fragment) for every unusable policy file."""

    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    missing = str(tmp_path / "missing.json")
    just_over_the_limit = b'{"Statement": [], "Id": "' + b"x" * 32742 + b'"}'
    assert len(just_over_the_limit) == 32769
    cases = [
        (["--policy-file", missing], b"", f"cannot read policy file {missing!r}: No such file"),
        (["--policy-file", str(tmp_path)], b"", "Is a directory"),
        (["--policy-file", write("latin1.json", b'{"Sid": "caf\xe9"}')], b"", "not UTF-8"),
        (["--policy-file", "-"], b"\xff\xfe{}", "<stdin> is not UTF-8"),
        (["--policy-file", write("trunc.json", b'{"Statement": [')], b"", "not valid JSON"),
        (["--policy-file", write("empty.json", b"")], b"", "empty"),
        (["--policy-file", "-"], b"", "<stdin>: The policy contains"),
        (
            ["--policy-file", write("principal.json", MALFORMED[3][0].encode())],
            b"",
            "Principal",
        ),
        (["--policy-file", write("effect.json", MALFORMED[4][0].encode())], b"", "Effect"),
        (
            ["--policy-file", write("big.json", b" " * 40000)],
            b"",
            "larger than the maximum of 32768 bytes",
        ),
        (["--policy-file", "-"], just_over_the_limit, "The policy is 32769 bytes"),
    ]
    if os.geteuid() != 0:  # root reads any file
        unreadable = write("unreadable.json", EVERYTHING.encode())
        os.chmod(unreadable, 0)
        cases.append((["--policy-file", unreadable], b"", "Permission denied"))
    return cases


def test_cli_bad_policy_file_on_create_is_exit_2_and_stores_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    for args, stdin, fragment in bad_files(tmp_path):
        result = cli(
            "credentials", "create", "--name", "refused", *args, data_dir=data_dir, stdin=stdin
        )
        one_line_error(result, 2, fragment)
    assert "refused" not in names(data_dir)


def test_cli_bad_policy_file_on_set_policy_is_exit_2_and_keeps_the_old(
    data_dir: Path, tmp_path: Path
) -> None:
    created = cli(
        "credentials",
        "create",
        "--name",
        "kept",
        "--policy-file",
        "-",
        data_dir=data_dir,
        stdin=ENCRYPT_DECRYPT.encode(),
    )
    assert created.returncode == 0, created.stderr
    for args, stdin, fragment in bad_files(tmp_path):
        result = cli("credentials", "set-policy", "kept", *args, data_dir=data_dir, stdin=stdin)
        one_line_error(result, 2, fragment)
    got = cli("credentials", "get-policy", "kept", data_dir=data_dir)
    assert got.stdout == ENCRYPT_DECRYPT + "\n"


def test_cli_set_policy_needs_exactly_one_of_file_or_clear(data_dir: Path) -> None:
    for args in ([], ["--clear", "--policy-file", "-"]):
        result = cli("credentials", "set-policy", "kept", *args, data_dir=data_dir)
        assert result.returncode == 2
        assert "usage:" in result.stderr
        assert "Traceback" not in result.stderr


def test_cli_policy_of_root_or_unknown(data_dir: Path) -> None:
    for target in ("root", "nobody"):
        result = cli(
            "credentials",
            "set-policy",
            target,
            "--policy-file",
            "-",
            data_dir=data_dir,
            stdin=EVERYTHING.encode(),
        )
        fragment = "not governed by identity policies" if target == "root" else "'nobody'"
        one_line_error(result, 1, fragment)
    root = cli("credentials", "get-policy", "root", data_dir=data_dir)
    assert (root.returncode, root.stdout) == (0, "")
    assert "is the account root, not governed by identity policies" in root.stderr
    one_line_error(cli("credentials", "get-policy", "nobody", data_dir=data_dir), 1, "'nobody'")


def test_cli_tampered_policy_is_reported_not_shown(data_dir: Path) -> None:
    created = cli(
        "credentials",
        "create",
        "--name",
        "tampered",
        "--policy-file",
        "-",
        data_dir=data_dir,
        stdin=ENCRYPT_DECRYPT.encode(),
    )
    assert created.returncode == 0, created.stderr
    tamper(
        data_dir / "hsmkms.db",
        "UPDATE identity_credentials SET policy = ? WHERE name = 'tampered'",
        EVERYTHING,
    )
    result = cli("credentials", "get-policy", "tampered", data_dir=data_dir)
    one_line_error(result, 1, "does not open (its database row was altered)")
    assert EVERYTHING not in result.stderr
