"""The pytest plugin (``hsmkms.pytest_plugin``, entry point ``pytest11``): the fixtures in this
suite, and — as a user gets them — in a project of its own, after installing the built wheel
into a fresh virtualenv (nothing of this checkout on its path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hsmkms.pytest_plugin import HsmkmsServer

pytestmark = [pytest.mark.hsm, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".cache" / "uv-venv" / "bin" / "uv"


def test_the_plugin_is_registered_as_pytest11(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("hsmkms")
    assert plugin is not None
    assert plugin.__name__ == "hsmkms.pytest_plugin"


def test_hsmkms_server_is_a_real_server_with_its_own_token(hsmkms_server: HsmkmsServer) -> None:
    assert hsmkms_server.endpoint.startswith("http://127.0.0.1:")
    assert (hsmkms_server.data_dir / "tokens").is_dir()
    assert (hsmkms_server.data_dir / "hsmkms.db").is_file()
    assert hsmkms_server.process.poll() is None
    assert hsmkms_server.secret_access_key not in repr(hsmkms_server)
    assert hsmkms_server.env()["AWS_ENDPOINT_URL_KMS"] == hsmkms_server.endpoint


def test_kms_client_encrypts_with_a_context_and_sees_typed_errors(kms_client: Any) -> None:
    key_id = kms_client.create_key(Description="plugin")["KeyMetadata"]["KeyId"]
    context = {"tenant": "a"}
    blob = kms_client.encrypt(KeyId=key_id, Plaintext=b"x", EncryptionContext=context)[
        "CiphertextBlob"
    ]
    assert kms_client.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"x"
    with pytest.raises(kms_client.exceptions.InvalidCiphertextException):
        kms_client.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "b"})


def test_the_aws_cli_works_with_the_servers_environment(hsmkms_server: HsmkmsServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(hsmkms_server.env())
    aws = Path(sys.executable).parent / "aws"
    result = subprocess.run(
        [str(aws), "kms", "list-keys", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"Keys"' in result.stdout


FOREIGN_TESTS = """
import subprocess
import hsmkms


def test_hsmkms_comes_from_the_installed_wheel():
    assert "site-packages" in hsmkms.__file__


def test_a_round_trip_with_a_context(kms_client):
    key = kms_client.create_key()["KeyMetadata"]["KeyId"]
    blob = kms_client.encrypt(KeyId=key, Plaintext=b"hi", EncryptionContext={"a": "b"})
    assert kms_client.decrypt(
        CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"a": "b"}
    )["Plaintext"] == b"hi"


def test_the_seed_file_of_the_ini_was_applied(kms_client):
    meta = kms_client.describe_key(KeyId="alias/app-key")["KeyMetadata"]
    assert meta["Description"] == "from the foreign seed"


def test_the_server_fixture_says_where_it_is(hsmkms_server):
    assert hsmkms_server.region == "eu-west-2"
    assert hsmkms_server.data_dir.is_dir()
    assert hsmkms_server.client().list_aliases()["Aliases"]
"""


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_a_foreign_project_uses_the_fixtures_after_installing_the_wheel(tmp_path: Path) -> None:
    """pip-install the built wheel (its dependencies at the locked versions) with boto3 and
    pytest into a new virtualenv, then run a project of three lines of configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HSMKMS_", "AWS_", "VIRTUAL_ENV", "PYTHON", "UV_"))
    }
    built = _run([str(UV), "build", "--wheel", "--out-dir", str(tmp_path / "dist")], ROOT, env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("hsmkms-*.whl")
    locked = _run(
        [str(UV), "export", "--frozen", "--all-groups", "--no-emit-project", "--no-hashes"],
        ROOT,
        env,
    )
    assert locked.returncode == 0, locked.stderr
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(locked.stdout)
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    install = [str(UV), "pip", "install", "--python", str(python), "-c", str(constraints)]
    installed = _run([*install, str(wheel), "boto3", "pytest"], tmp_path, env)
    assert installed.returncode == 0, installed.stderr

    project = tmp_path / "foreign"
    project.mkdir()
    (project / "pytest.ini").write_text(
        "[pytest]\nhsmkms_seed = seed.yaml\nhsmkms_region = eu-west-2\n"
    )
    (project / "seed.yaml").write_text(
        "version: 1\nkeys:\n  - aliases: [alias/app-key]\n    description: from the foreign seed\n"
    )
    (project / "test_app.py").write_text(textwrap.dedent(FOREIGN_TESTS))
    ran = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], project, env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "4 passed" in ran.stdout

    # A server that cannot start is one clear error of the fixture, with the server's words.
    (project / "seed.yaml").write_text("version: 1\nkeys:\n  - aliases: [not-an-alias]\n")
    failed = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], project, env)
    assert failed.returncode == 1
    assert "hsmkms_server: hsmkms serve did not start" in failed.stdout
    assert 'must start with the prefix "alias/"' in failed.stdout
    assert "Traceback" not in failed.stdout
