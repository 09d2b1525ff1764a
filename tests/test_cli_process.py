"""The tests' command line runner (tests/cli_process.py) answers as a real subprocess does:
same output, errors, exit codes, standard input, working directory and environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import cli_process
import pytest
from server import clean_env

import hsmkms

CLI = [sys.executable, "-m", "hsmkms.cli.main"]


def both(
    args: list[str], **kwargs: object
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    options: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 120, **kwargs}
    real = subprocess.run([*CLI, *args], check=False, **options)
    forked = cli_process.run([*CLI, *args], **options)
    return real, forked


def same(real: subprocess.CompletedProcess[str], forked: subprocess.CompletedProcess[str]) -> None:
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )


def test_a_usage_error_is_the_same(tmp_path: Path) -> None:
    assert cli_process.forks([*CLI, "credentials"], clean_env(), {})  # not a real subprocess
    real, forked = both(["credentials", "lsit", "--data-dir", str(tmp_path)], env=clean_env())
    assert real.returncode == 2
    same(real, forked)


def test_the_working_directory_and_the_environment_are_the_commands(tmp_path: Path) -> None:
    """A relative --data-dir is found from ``cwd``; HSMKMS_DATA_DIR from ``env``."""
    real, forked = both(
        ["credentials", "list", "--data-dir", "nowhere"], env=clean_env(), cwd=tmp_path
    )
    assert str(tmp_path / "nowhere") in real.stderr
    same(real, forked)
    env = clean_env(HSMKMS_DATA_DIR=str(tmp_path / "elsewhere"))
    real, forked = both(["credentials", "list"], env=env)
    assert str(tmp_path / "elsewhere") in real.stderr
    same(real, forked)


def test_standard_input_and_binary_output(tmp_path: Path) -> None:
    """A command reading stdin and writing bytes: a local data directory, a key, a file
    encrypted from stdin to stdout and back."""
    data = tmp_path / "data"
    init = cli_process.run([*CLI, "init", "--data-dir", str(data)], env=clean_env(), timeout=120)
    assert init.returncode == 0
    made = subprocess.run(
        [*CLI, "encrypt-file", "-", "-", "--data-dir", str(data), "--key-id", "nope"],
        input=b"secret", capture_output=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    forked = cli_process.run(
        [*CLI, "encrypt-file", "-", "-", "--data-dir", str(data), "--key-id", "nope"],
        input=b"secret", capture_output=True, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert made.returncode != 0
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        made.returncode,
        made.stdout,
        made.stderr,
    )


def test_a_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    """``audit tail -f`` never ends by itself: the timeout stops it, as subprocess.run does."""
    data = tmp_path / "data"
    cli_process.run([*CLI, "init", "--data-dir", str(data)], env=clean_env(), timeout=120)
    with pytest.raises(subprocess.TimeoutExpired):
        cli_process.run(
            [*CLI, "audit", "tail", "-f", "--data-dir", str(data)],
            capture_output=True, env=clean_env(), timeout=3,
        )  # fmt: skip


def test_other_python_variables_run_as_a_real_subprocess(tmp_path: Path) -> None:
    """The helper read its PYTHON* variables when it started: a command asking for others
    (here a PYTHONPATH with a ``sitecustomize`` that the interpreter runs when it starts)
    runs as a real subprocess."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nprint('started afresh', file=sys.stderr)\n"
    )
    env = clean_env(PYTHONPATH=str(tmp_path))
    assert not cli_process.forks([*CLI, "--version"], env, {})
    probe = cli_process.run([*CLI, "--version"], env=env, capture_output=True, text=True)
    assert probe.stdout == f"hsmkms {hsmkms.__version__}\n"
    assert probe.stderr == "started afresh\n"
