"""Seed files through the real server and command line: ``hsmkms serve --seed`` (and
``HSMKMS_SEED``) makes what a CI job relies on before the server answers, a restart on the same
data directory finds it unchanged, a bad or conflicting seed stops the start with one line and
changes nothing; ``hsmkms seed export|check|apply``; ``hsmkms serve --ephemeral``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import botocore.exceptions
import cli_process
import pytest
import yaml
from server import clean_env, run_cli, running_server

pytestmark = [pytest.mark.hsm, pytest.mark.server]

KEY_ID = "0b8d7f44-59c2-4f6e-9a61-3c0e5d2b7a19"
SECRET = "app-secret-0123456789abcdefghij"
SEED = {
    "version": 1,
    "keys": [
        {
            "id": KEY_ID,
            "aliases": ["alias/app-key"],
            "description": "seeded for CI",
            "tags": {"ci": "true"},
        }
    ],
    "credentials": [
        {
            "name": "app",
            "access_key_id": "AKIASEEDEDAPP0000001",
            "secret_access_key_env": "SEED_APP_SECRET",
            "policy": {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}],
            },
        }
    ],
}


HSMKMS = (sys.executable, "-m", "hsmkms.cli.main")


def write_seed(path: Path, document: dict[str, object] | None = None) -> Path:
    path.write_text(yaml.safe_dump(document or SEED, sort_keys=False))
    return path


def exported(data_dir: Path) -> str:
    result = run_cli("seed", "export", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout


def serve_fails(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``hsmkms serve`` expecting it to stop at start; its one-line complaint."""
    result = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "serve", "--port", "0", *args]
        + (["--data-dir", str(data_dir)] if "--ephemeral" not in args else []),
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_a_seeded_server_serves_the_declared_objects_from_its_first_answer(tmp_path: Path) -> None:
    seed = write_seed(tmp_path / "seed.yaml")
    env = {"SEED_APP_SECRET": SECRET}
    with running_server(tmp_path / "data", args=["--seed", str(seed)], env=env) as server:
        log = server.log()
        assert f"hsmkms: seed: keys[0] ({KEY_ID}): create key {KEY_ID}" in log
        assert "hsmkms: seed " in log
        assert log.index("seed.yaml: 3 change(s)") < log.index("serving the KMS API")
        kms = server.client()
        metadata = kms.describe_key(KeyId="alias/app-key")["KeyMetadata"]
        assert (metadata["KeyId"], metadata["Description"]) == (KEY_ID, "seeded for CI")
        app = server.client("AKIASEEDEDAPP0000001", SECRET)
        blob = app.encrypt(KeyId="alias/app-key", Plaintext=b"ci")["CiphertextBlob"]
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            app.decrypt(CiphertextBlob=blob)
        assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"ci"
    assert SECRET not in log

    # The same seed at the next start finds everything as declared.
    with running_server(tmp_path / "data", args=["--seed", str(seed)], env=env) as server:
        assert "seed.yaml: 0 change(s), 2 entries unchanged" in server.log()
        kms = server.client()
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"ci"
        assert [a["AliasName"] for a in kms.list_aliases()["Aliases"]] == ["alias/app-key"]
        assert len(kms.list_keys()["Keys"]) == 1


def test_hsmkms_seed_names_the_seed_file_when_no_option_does(tmp_path: Path) -> None:
    seed = write_seed(tmp_path / "seed.yaml", {"version": 1, "keys": [{"aliases": ["alias/e"]}]})
    with running_server(tmp_path / "data", env={"HSMKMS_SEED": str(seed)}) as server:
        assert server.client().describe_key(KeyId="alias/e")["KeyMetadata"]["Enabled"]


@pytest.mark.slow
def test_a_conflicting_seed_stops_the_start_and_changes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seed = write_seed(tmp_path / "seed.yaml")
    env = {"SEED_APP_SECRET": SECRET}
    with running_server(data_dir, args=["--seed", str(seed)], env=env):
        pass
    before = exported(data_dir)
    changed = json.loads(json.dumps(SEED))
    changed["keys"][0]["description"] = "another description"
    changed["keys"].append({"aliases": ["alias/would-be-created"]})
    write_seed(seed, changed)
    line = serve_fails(data_dir, "--seed", str(seed), env=env)
    assert line == (
        f"hsmkms serve: seed file {seed}: keys[0] ({KEY_ID}): key {KEY_ID} has the description "
        "'seeded for CI', the seed declares 'another description'; the data directory is left "
        "unchanged"
    )
    assert exported(data_dir) == before


def test_a_bad_seed_leaves_no_data_directory_behind(tmp_path: Path) -> None:
    bad = json.loads(json.dumps(SEED))
    bad["keys"][0]["policy"] = "{not json"
    seed = write_seed(tmp_path / "seed.yaml", bad)
    line = serve_fails(tmp_path / "data", "--seed", str(seed), env={"SEED_APP_SECRET": SECRET})
    assert line.startswith(f"hsmkms serve: seed file {seed}: keys[0] ({KEY_ID}): ")
    assert line.endswith("(MalformedPolicyDocumentException)")
    assert not (tmp_path / "data").exists()
    missing = serve_fails(tmp_path / "data", "--seed", str(tmp_path / "nope.yaml"))
    assert missing == f"hsmkms serve: seed file {tmp_path / 'nope.yaml'}: No such file or directory"
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_seed_commands_export_check_and_apply(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seed = write_seed(tmp_path / "seed.yaml")
    env = {"SEED_APP_SECRET": SECRET}

    nothing = run_cli("seed", "export", "--data-dir", str(data_dir))
    assert nothing.returncode == 1
    assert nothing.stderr.startswith(f"hsmkms seed: no data directory at {data_dir}")

    check = run_cli("seed", "check", str(seed), "--data-dir", str(data_dir), env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[-1] == f"seed {seed}: valid; applying it makes 3 change(s)"
    assert not data_dir.exists()

    applied = run_cli("seed", "apply", str(seed), "--data-dir", str(data_dir), env=env)
    assert applied.returncode == 0, applied.stderr
    assert "3 change(s), 0 entries unchanged" in applied.stdout
    again = run_cli("seed", "check", str(seed), "--data-dir", str(data_dir), env=env)
    assert f"keys[0] ({KEY_ID}): exists as declared" in again.stdout
    assert again.stdout.splitlines()[-1].endswith("applying it makes 0 change(s)")

    out = tmp_path / "export.yaml"
    written = run_cli("seed", "export", "--out", str(out), "--data-dir", str(data_dir))
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert out.read_text() == exported(data_dir)
    document = yaml.safe_load(out.read_text())
    assert document["keys"][0]["id"] == KEY_ID
    assert SECRET not in out.read_text()
    reapplied = run_cli("seed", "apply", str(out), "--data-dir", str(data_dir))
    assert reapplied.returncode == 0, reapplied.stderr
    assert "0 change(s)" in reapplied.stdout

    bad = run_cli("seed", "check", str(tmp_path / "missing.yaml"), "--data-dir", str(data_dir))
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        f"hsmkms seed: seed file {tmp_path / 'missing.yaml'}: No such file or directory"
    )


def test_an_ephemeral_server_removes_its_data_directory_at_exit(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hsmkms.cli.main", "serve", "--ephemeral", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(HSMKMS_WORKERS="1"),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "serving the KMS API" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        match = re.search(
            r"ephemeral data directory (\S+) \(removed at exit\)", log_path.read_text()
        )
        assert match is not None
        data_dir = Path(match.group(1))
        assert (data_dir / "hsmkms.db").exists()
        assert (data_dir / "root-credentials.json").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0, log_path.read_text()
    assert not data_dir.exists()


def test_ephemeral_and_a_data_directory_exclude_each_other(tmp_path: Path) -> None:
    result = cli_process.run(
        [*HSMKMS, "serve", "--ephemeral", "--data-dir", str(tmp_path / "d")],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "hsmkms serve: --ephemeral makes its own data directory: do not give --data-dir"
    )
    assert not (tmp_path / "d").exists()


def test_an_ephemeral_server_stopped_while_seeding_leaves_nothing(tmp_path: Path) -> None:
    """A bad seed stops an ephemeral server before it serves: its directory goes too."""
    seed = write_seed(tmp_path / "seed.yaml", {"version": 1, "keys": [{"aliases": ["bad"]}]})
    result = cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", "serve", "--ephemeral", "--seed", str(seed)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    match = re.search(r"ephemeral data directory (\S+)", result.stdout)
    assert match is not None
    assert not Path(match.group(1)).exists()
    assert 'must start with the prefix "alias/"' in result.stderr


def test_a_seeded_alias_is_taken_as_one_made_through_the_api(tmp_path: Path) -> None:
    """A client sees seeded objects as AWS shows any: its typed errors for what is not there
    and for a name that is taken."""
    seed = write_seed(tmp_path / "seed.yaml", {"version": 1, "keys": [{"aliases": ["alias/a"]}]})
    with running_server(tmp_path / "data", args=["--seed", str(seed)]) as server:
        kms = server.client()
        with pytest.raises(kms.exceptions.NotFoundException):
            kms.describe_key(KeyId="alias/not-seeded")
        with pytest.raises(botocore.exceptions.ClientError) as info:
            kms.create_alias(AliasName="alias/a", TargetKeyId=kms.list_keys()["Keys"][0]["KeyId"])
        assert info.value.response["Error"]["Code"] == "AlreadyExistsException"
