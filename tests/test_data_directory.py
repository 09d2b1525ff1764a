"""The data directory: only ``init`` and ``serve`` make one; it can be copied and moved; its
account and region are its own; it stores no absolute path but its SoftHSM2 config's."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cli_process
import pytest
from server import clean_env, run_cli

from hsmkms.softhsm import conf_state, ensure_token, relocate_conf

pytestmark = pytest.mark.hsm

SCRIPT = Path(__file__).resolve().parents[1] / "softhsm" / "init-token.sh"

# Every command that works on a data directory, with arguments that would otherwise succeed or
# fail only later. None of them may create anything.
COMMANDS = [
    ("doctor",),
    ("purge",),
    ("credentials", "list"),
    ("credentials", "create", "--name", "app"),
    ("credentials", "delete", "app"),
    ("credentials", "get-policy", "app"),
    ("audit", "verify"),
    ("audit", "tail"),
    ("audit", "search", "--event-name", "Decrypt"),
    ("report", "--out", "report.html"),
    ("report", "key"),
    ("encrypt-file", "/etc/hostname", "out.bin", "--key-id", "alias/app"),
    ("decrypt-file", "in.bin", "out.txt"),
]


def _object_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "tokens").glob("*/*.object")}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_command_on_a_missing_data_directory_exits_2_and_creates_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    missing = tmp_path / "nowhere"
    proc = run_cli(*command, "--data-dir", str(missing))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.endswith(
        f"no data directory at {missing} (run hsmkms init or pass --data-dir)\n"
    )
    assert len(proc.stderr.splitlines()) == 1
    assert not missing.exists()


def test_the_default_data_directory_is_not_made_in_the_working_directory(tmp_path: Path) -> None:
    """Run in the wrong directory, a command says where it looked (./.hsmkms, made absolute)."""
    result = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "credentials", "list"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False, env=clean_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert f"no data directory at {tmp_path / '.hsmkms'}" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_init_creates_once_and_then_says_nothing_was_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    first = run_cli("init", "--data-dir", str(data_dir))
    assert first.returncode == 0, first.stderr
    assert f"created the data directory {data_dir}" in first.stdout
    assert f"new root credentials in {data_dir / 'root-credentials.json'}" in first.stdout
    objects = _object_files(data_dir)
    root = json.loads((data_dir / "root-credentials.json").read_text())
    again = run_cli("init", "--data-dir", str(data_dir), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["Created"] is False
    assert report["RootCreated"] is False
    assert report["RootAccessKeyId"] == root["AccessKeyId"]
    assert _object_files(data_dir) == objects
    listed = run_cli("credentials", "list", "--json", "--data-dir", str(data_dir))
    assert [c["AccessKeyId"] for c in json.loads(listed.stdout)] == [root["AccessKeyId"]]


def _key_and_ciphertext(data_dir: Path) -> tuple[str, bytes]:
    from hsmkms.cli.envelope import _local_service
    from hsmkms.models import CreateKeyRequest, EncryptRequest

    with _local_service(data_dir) as service:
        key_id = service.create_key(CreateKeyRequest()).KeyMetadata.KeyId
        blob = service.encrypt(EncryptRequest(KeyId=key_id, Plaintext=b"moved")).CiphertextBlob
    return key_id, blob


def _decrypts(data_dir: Path, blob: bytes) -> bool:
    from hsmkms.cli.envelope import _local_service
    from hsmkms.models import DecryptRequest

    with _local_service(data_dir) as service:
        return service.decrypt(DecryptRequest(CiphertextBlob=blob)).Plaintext == b"moved"


def test_a_copied_data_directory_uses_its_own_token_and_doctor_says_so(tmp_path: Path) -> None:
    original = tmp_path / "original"
    assert run_cli("init", "--data-dir", str(original)).returncode == 0
    key_id, blob = _key_and_ciphertext(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = _object_files(original)

    doctor = run_cli("doctor", "--data-dir", str(copy))
    assert doctor.returncode == 0, doctor.stderr
    assert (
        f"warning: {copy / 'softhsm2.conf'} named {original / 'tokens'}, outside its data "
        f"directory (copied or moved from there): now points at {copy / 'tokens'}"
    ) in doctor.stderr
    state = conf_state(copy)
    assert state is not None
    assert not state.outside

    # A key made in the copy lands in the copy's token, not the original's.
    _key_and_ciphertext(copy)
    assert _object_files(original) == before
    assert len(_object_files(copy)) == len(before) + 1

    # The original moves away: the copy keeps working, and so does the moved original.
    moved = tmp_path / "moved"
    original.rename(moved)
    assert _decrypts(copy, blob)
    assert _decrypts(moved, blob)
    assert run_cli("doctor", "--data-dir", str(moved)).returncode == 0
    assert key_id


def test_a_config_pointing_elsewhere_while_tokens_is_empty_is_left_alone_and_refused(
    tmp_path: Path,
) -> None:
    """A softhsm2.conf someone pointed at a token kept elsewhere is not silently repointed: its
    own tokens/ is empty. doctor names it; no token is ever made in the other directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = tmp_path / "d"
    assert run_cli("init", "--data-dir", str(data_dir)).returncode == 0
    for token in (data_dir / "tokens").iterdir():
        if token.is_dir():  # the token, not the token write lock beside it
            shutil.rmtree(token)
    conf = data_dir / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(data_dir / "tokens"), str(elsewhere)))
    assert relocate_conf(data_dir) is None
    doctor = run_cli("doctor", "--data-dir", str(data_dir))
    assert doctor.returncode == 1
    assert doctor.stderr == (
        f"hsmkms doctor: {conf} points at {elsewhere}, outside its data directory {data_dir}, "
        f"whose tokens/ holds no token: point it at {data_dir / 'tokens'}, or use that token "
        "through HSMKMS_PKCS11_URI and SOFTHSM2_CONF\n"
    )
    with pytest.raises(Exception, match="holds no token labelled 'hsmkms' there"):
        ensure_token(data_dir)
    assert list(elsewhere.iterdir()) == []


def test_the_standalone_script_repoints_a_copied_config_too(tmp_path: Path) -> None:
    original = tmp_path / "a"
    ensure_token(original)
    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(copy)], capture_output=True, text=True, timeout=60, check=True
    )
    assert f"named {original / 'tokens'}; now {copy / 'tokens'}" in proc.stderr
    state = conf_state(copy)
    assert state is not None
    assert not state.outside


def test_no_absolute_path_is_stored_but_the_softhsm2_config(tmp_path: Path) -> None:
    """After keys, a file encryption (audit records), a credential and a report, no file of the
    data directory names the directory except softhsm2.conf, which is rewritten on a move."""
    data_dir = tmp_path / "data-dir-path-marker"
    assert run_cli("init", "--data-dir", str(data_dir)).returncode == 0
    key_id, _ = _key_and_ciphertext(data_dir)
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    enc = run_cli(
        "encrypt-file", str(plain), str(tmp_path / "c.bin"), "--key-id", key_id,
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert enc.returncode == 0, enc.stderr
    for command in (
        ("credentials", "create", "--name", "app"),
        ("report", "--out", str(tmp_path / "r.json")),
    ):
        assert run_cli(*command, "--data-dir", str(data_dir)).returncode == 0
    marker = str(data_dir).encode()
    naming = sorted(
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.is_file() and marker in p.read_bytes()
    )
    assert naming == ["softhsm2.conf"]


def test_a_changed_account_or_region_is_an_error_naming_both(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    assert run_cli("init", "--data-dir", str(data_dir)).returncode == 0
    _key_and_ciphertext(data_dir)
    changed = run_cli(
        "credentials", "list", "--data-dir", str(data_dir),
        env={"HSMKMS_ACCOUNT_ID": "444455556666"},
    )  # fmt: skip
    assert changed.returncode == 1
    assert changed.stderr == (
        f"hsmkms credentials: the data directory {data_dir} belongs to account 111122223333, "
        "but HSMKMS_ACCOUNT_ID is 444455556666: set it to 111122223333 (or unset it if that is "
        "the default), or use another data directory\n"
    )
    region = run_cli("doctor", "--data-dir", str(data_dir), env={"HSMKMS_REGION": "eu-west-1"})
    assert region.returncode == 1
    assert "belongs to region us-east-1, but HSMKMS_REGION is eu-west-1" in region.stderr

    # A database from before the record: the account is read from its keys' ARNs.
    with sqlite3.connect(data_dir / "hsmkms.db") as conn:
        conn.execute("DELETE FROM store_settings WHERE name IN ('account_id', 'region')")
    conn.close()
    again = run_cli("init", "--data-dir", str(data_dir), env={"HSMKMS_ACCOUNT_ID": "444455556666"})
    assert again.returncode == 1
    assert "belongs to account 111122223333" in again.stderr
    assert run_cli("doctor", "--data-dir", str(data_dir)).returncode == 0


def test_a_changed_account_is_refused_before_any_key_exists(tmp_path: Path) -> None:
    """Without keys, the root credential's ARN tells the account (a data directory from before
    the record)."""
    data_dir = tmp_path / "d"
    assert run_cli("init", "--data-dir", str(data_dir)).returncode == 0
    with sqlite3.connect(data_dir / "hsmkms.db") as conn:
        conn.execute("DELETE FROM store_settings WHERE name IN ('account_id', 'region')")
    conn.close()
    proc = run_cli("serve", "--port", "0", "--data-dir", str(data_dir),
                   env={"HSMKMS_ACCOUNT_ID": "444455556666"})  # fmt: skip
    assert proc.returncode == 1
    assert "belongs to account 111122223333, but HSMKMS_ACCOUNT_ID is 444455556666" in proc.stderr
    assert "serving" not in proc.stdout


def test_make_clean_keeps_the_data_directory_and_clean_data_says_what_it_deletes(
    tmp_path: Path,
) -> None:
    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    for name in (".venv", ".cache", ".hsmkms/tokens"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / ".hsmkms" / "user.pin").write_text("x")

    def make(target: str) -> str:
        proc = subprocess.run(
            ["make", "-s", "-f", str(makefile), "-C", str(tmp_path), target],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return proc.stdout

    out = make("clean")
    assert not (tmp_path / ".venv").exists()
    assert not (tmp_path / ".cache").exists()
    assert (tmp_path / ".hsmkms" / "user.pin").exists()
    assert "kept .hsmkms (the embedded token: every key); 'make clean-data' deletes it" in out
    out = make("clean-data")
    assert "deleting .hsmkms: the embedded SoftHSM2 token with every key in it" in out
    assert not (tmp_path / ".hsmkms").exists()
