"""The container image (Containerfile) built and smoke-tested by ci/container.sh with the
engine this machine has: start with a seed file and dummy root credentials, create a key with
boto3, encrypt, stop, start again on the same volume, decrypt (ci/container_smoke.py). Where
neither docker nor podman can run a container, the test is skipped and says why."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NO_ENGINE = 3  # ci/container.sh: no container engine can run here


@pytest.mark.slow
def test_the_image_builds_and_survives_a_restart_on_its_volume() -> None:
    result = subprocess.run(
        [str(ROOT / "ci" / "container.sh"), "all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if result.returncode == NO_ENGINE:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.removeprefix("smoke: ") for line in result.stdout.splitlines()]
    assert steps[-1] == "OK"
    for expected in (
        "runs as uid 10001; seed applied",
        "HEALTHCHECK passes",
        "unsigned and wrongly signed requests are refused",
        "a seed applied with exec serves at once",
        "stopped cleanly (exit 0 on SIGTERM)",
        "decrypted the first run's ciphertext",
    ):
        assert expected in steps, result.stdout
