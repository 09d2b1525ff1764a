"""The smoke test of the hsmkms container image (run by ci/container.sh; needs boto3).

Start the image on a fresh volume with dummy root credentials and a seed file, as a CI job
would; check it answers (healthy, as a non-root user, seeded alias present, an unsigned request
refused); create a key with boto3 and encrypt; stop it (SIGTERM: a clean exit); start a new
container on the same volume and decrypt. Prints one ``smoke:`` line per step and ``smoke: OK``
at the end; exits 1 naming the step that failed. Everything it makes is removed at the end.

    python ci/container_smoke.py --engine podman --image localhost/hsmkms:test [-- RUN-ARG...]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

ROOT_KEY, ROOT_SECRET = "test", "test"  # what LocalStack and moto suites use
SEED = """\
version: 1
keys:
  - aliases: [alias/app-key]
    description: seeded by the container smoke test
"""
LATER_SEED = "version: 1\nkeys:\n  - aliases: [alias/applied-later]\n"
CONTEXT = {"purpose": "container-smoke"}
STARTUP_TIMEOUT = 120.0


class SmokeFailure(Exception):
    """A step of the smoke test failed; the message says which and why."""


def say(message: str) -> None:
    print(f"smoke: {message}", flush=True)


class Engine:
    def __init__(self, name: str, run_args: list[str]) -> None:
        self.name = name
        self.run_args = run_args

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            [self.name, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise SmokeFailure(f"{self.name} {args[0]} failed: {result.stderr.strip()}")
        return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthz(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def start(engine: Engine, image: str, name: str, volume: str, seed_dir: Path, port: int) -> None:
    engine(
        "run",
        "--detach",
        "--name",
        name,
        *engine.run_args,
        "--publish",
        f"127.0.0.1:{port}:8080",
        "--volume",
        f"{volume}:/data",
        "--volume",
        f"{seed_dir}:/seed:ro",
        "--env",
        f"HSMKMS_ROOT_ACCESS_KEY_ID={ROOT_KEY}",
        "--env",
        f"HSMKMS_ROOT_SECRET_ACCESS_KEY={ROOT_SECRET}",
        "--env",
        "HSMKMS_ALLOW_WEAK_ROOT_SECRET=1",
        "--env",
        "HSMKMS_SEED=/seed/seed.yaml",
        "--env",
        "HSMKMS_WORKERS=2",
        image,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while healthz(port) != 200:
        state = engine("inspect", "--format", "{{.State.Status}}", name, check=False).strip()
        if state not in ("created", "running") or time.monotonic() > deadline:
            logs = engine("logs", name, check=False)
            raise SmokeFailure(f"{name} did not become healthy ({state}):\n{logs}")
        time.sleep(0.25)


def logs(engine: Engine, name: str) -> str:
    result = subprocess.run(
        [engine.name, "logs", name], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout + result.stderr


def client(port: int) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id=ROOT_KEY,
        aws_secret_access_key=ROOT_SECRET,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def check_healthcheck(engine: Engine, name: str) -> None:
    """The image's own HEALTHCHECK passes (podman runs it on request; docker on its timer)."""
    if engine.name == "podman":
        engine("healthcheck", "run", name)
        return
    deadline = time.monotonic() + 90
    while True:
        status = engine("inspect", "--format", "{{.State.Health.Status}}", name).strip()
        if status == "healthy":
            return
        if status == "unhealthy" or time.monotonic() > deadline:
            raise SmokeFailure(f"the image's HEALTHCHECK says {status}")
        time.sleep(1)


def stop(engine: Engine, name: str) -> None:
    engine("stop", "--time", "30", name, timeout=60)
    code = engine("inspect", "--format", "{{.State.ExitCode}}", name).strip()
    if code != "0":
        raise SmokeFailure(f"{name} exited with {code} on SIGTERM:\n{logs(engine, name)}")


@dataclasses.dataclass(frozen=True)
class Sealed:
    """What the first run encrypted, for the second to decrypt."""

    key_id: str
    blob: bytes
    plaintext: bytes = dataclasses.field(repr=False)


def first_run(engine: Engine, image: str, name: str, volume: str, seed_dir: Path) -> Sealed:
    port = free_port()
    start(engine, image, name, volume, seed_dir, port)
    say(f"first start healthy on port {port}")
    # "serving" is printed once the supervisor has seen every worker's readiness ping, which
    # may come a moment after the first worker answers the health check.
    deadline = time.monotonic() + 30
    output = logs(engine, name)
    while "hsmkms: serving the KMS API" not in output and time.monotonic() < deadline:
        time.sleep(0.5)
        output = logs(engine, name)
    if "hsmkms: serving the KMS API on http://0.0.0.0:8080" not in output:
        raise SmokeFailure(f"no endpoint printed:\n{output}")
    if "create alias/app-key" not in output:
        raise SmokeFailure(f"the seed file was not applied:\n{output}")
    uid = engine("exec", name, "id", "-u").strip()
    if uid == "0":
        raise SmokeFailure("the server runs as root")
    say(f"runs as uid {uid}; seed applied")
    check_healthcheck(engine, name)
    say("HEALTHCHECK passes")

    kms = client(port)
    seeded = kms.describe_key(KeyId="alias/app-key")["KeyMetadata"]
    if seeded["Description"] != "seeded by the container smoke test":
        raise SmokeFailure(f"alias/app-key is {seeded}")
    key_id = kms.create_key(Description="container smoke")["KeyMetadata"]["KeyId"]
    plaintext = secrets.token_bytes(64)
    blob: bytes = kms.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    say(f"created key {key_id} with boto3 and encrypted {len(plaintext)} bytes")

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/",
        body=json.dumps({"KeyId": key_id}),
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.DescribeKey",
        },
    )
    answer = conn.getresponse()
    refused = json.loads(answer.read()).get("__type", "")
    conn.close()
    if answer.status != 400 or "MissingAuthenticationToken" not in refused:
        raise SmokeFailure(f"an unsigned request got {answer.status} {refused}")
    forged = boto3.client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id=ROOT_KEY,
        aws_secret_access_key="not-" + ROOT_SECRET,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    try:
        forged.describe_key(KeyId=key_id)
        raise SmokeFailure("a request with a wrong signature was answered")
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "InvalidSignatureException":
            raise SmokeFailure(f"a wrong signature got {exc.response['Error']}") from None
    say("unsigned and wrongly signed requests are refused")

    # A seed applied inside the running container (ci/github-actions-service.yml does this).
    applied = engine("exec", name, "hsmkms", "seed", "apply", "/seed/later.yaml")
    if "2 change(s)" not in applied:
        raise SmokeFailure(f"hsmkms seed apply in the container said: {applied}")
    kms.describe_key(KeyId="alias/applied-later")
    say("a seed applied with exec serves at once")

    stop(engine, name)
    say("stopped cleanly (exit 0 on SIGTERM)")
    return Sealed(key_id, blob, plaintext)


def second_run(
    engine: Engine, image: str, name: str, volume: str, seed_dir: Path, sealed: Sealed
) -> None:
    port = free_port()
    start(engine, image, name, volume, seed_dir, port)
    output = logs(engine, name)
    if "seed /seed/seed.yaml: 0 change(s), 1 entry unchanged" not in output:
        raise SmokeFailure(f"the seed was not found unchanged on the volume:\n{output}")
    say(f"second start on the same volume healthy on port {port}; seed unchanged")
    kms = client(port)
    answer = kms.decrypt(CiphertextBlob=sealed.blob, EncryptionContext=CONTEXT)
    if answer["Plaintext"] != sealed.plaintext:
        raise SmokeFailure("the decrypted plaintext differs")
    if not answer["KeyId"].endswith(sealed.key_id):
        raise SmokeFailure(f"decrypted with {answer['KeyId']}")
    aliases = [a["AliasName"] for a in kms.list_aliases()["Aliases"]]
    if aliases != ["alias/app-key", "alias/applied-later"]:
        raise SmokeFailure(f"aliases after the restart: {aliases}")
    say("decrypted the first run's ciphertext")
    stop(engine, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", required=True, choices=["docker", "podman"])
    parser.add_argument("--image", required=True)
    parser.add_argument("run_args", nargs="*", help="extra arguments of `run` (after --)")
    args = parser.parse_args()
    engine = Engine(args.engine, list(args.run_args))
    suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
    volume = f"hsmkms-smoke-{suffix}"
    names = [f"hsmkms-smoke-{suffix}-1", f"hsmkms-smoke-{suffix}-2"]
    seed_dir = Path(tempfile.mkdtemp(prefix="hsmkms-smoke-"))
    seed_dir.chmod(0o755)  # read by the container's non-root user
    (seed_dir / "seed.yaml").write_text(SEED)
    (seed_dir / "later.yaml").write_text(LATER_SEED)
    for path in seed_dir.iterdir():
        path.chmod(0o644)
    try:
        engine("volume", "create", volume)
        sealed = first_run(engine, args.image, names[0], volume, seed_dir)
        second_run(engine, args.image, names[1], volume, seed_dir, sealed)
    except (
        SmokeFailure,
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
    ) as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        for name in names:
            engine("rm", "--force", name, check=False)
        engine("volume", "rm", "--force", volume, check=False)
        for path in seed_dir.iterdir():
            path.unlink()
        seed_dir.rmdir()
    say("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
