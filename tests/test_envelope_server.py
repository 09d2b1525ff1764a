"""Envelope encryption through the real hsmkms server with boto3 (Boto3Provider), and the CLI
with ``--endpoint-url``: the same format and guarantees as in-process."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import cli_process
import pytest
from botocore.config import Config
from server import RunningServer, clean_env, running_server

from hsmkms.envelope import (
    Boto3Provider,
    DataKeyCache,
    DecryptionFailed,
    EnvelopeClient,
    EnvelopeHeader,
)
from hsmkms.envelope.providers import map_boto_error
from hsmkms.errors import (
    DependencyTimeoutException,
    KMSError,
    MissingAuthenticationTokenException,
    NotFoundException,
)

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

CTX = {"app": "envelope-tests"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("envelope-kms") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def keys(server: RunningServer) -> tuple[str, str]:
    kms = server.client()
    a = kms.create_key()["KeyMetadata"]["Arn"]
    b = kms.create_key()["KeyMetadata"]["Arn"]
    return a, b


@pytest.fixture
def client(server: RunningServer) -> EnvelopeClient:
    return EnvelopeClient(Boto3Provider(server.client()), segment_size=4096)


def test_round_trip_wrong_context_and_rewrap(
    client: EnvelopeClient, keys: tuple[str, str], tmp_path: Path
) -> None:
    a, b = keys
    plaintext = os.urandom(5 * 4096 + 9)
    (tmp_path / "p").write_bytes(plaintext)
    info = client.encrypt_file(tmp_path / "p", tmp_path / "c", a, CTX)
    assert info.key_arn == a
    client.decrypt_file(tmp_path / "c", tmp_path / "d", CTX)
    assert (tmp_path / "d").read_bytes() == plaintext
    with pytest.raises(DecryptionFailed):
        client.decrypt_file(tmp_path / "c", tmp_path / "e", {"app": "other"})
    with pytest.raises(DecryptionFailed):
        client.decrypt_file(tmp_path / "c", tmp_path / "e", key_id=b)
    assert not (tmp_path / "e").exists()
    client.rewrap_file(tmp_path / "c", b)
    assert EnvelopeHeader.parse((tmp_path / "c").read_bytes())[0].key_arn == b
    client.decrypt_file(tmp_path / "c", tmp_path / "d", CTX, key_id=b)
    assert (tmp_path / "d").read_bytes() == plaintext


def test_message_from_boto3_opens_in_process_format(
    client: EnvelopeClient, keys: tuple[str, str]
) -> None:
    """A message is the same format whichever provider made it: the header names the key."""
    message = client.encrypt_bytes(b"hello", keys[0])
    header = EnvelopeHeader.parse(message)[0]
    assert header.key_arn == keys[0]
    assert header.encrypted_data_key


def test_cache_saves_server_calls(server: RunningServer, keys: tuple[str, str]) -> None:
    cache = DataKeyCache(max_messages=10, max_bytes=1 << 20, max_age=60)
    client = EnvelopeClient(Boto3Provider(server.client()), cache=cache)
    for i in range(25):
        assert client.decrypt_bytes(client.encrypt_bytes(b"%d" % i, keys[0])) == b"%d" % i
    assert cache.stats.kms_calls == 3
    assert cache.stats.kms_calls_saved == 22


def test_kms_errors_map_to_hsmkms_errors(client: EnvelopeClient) -> None:
    with pytest.raises(NotFoundException):
        client.encrypt_bytes(b"x", "alias/does-not-exist")


def test_unreachable_endpoint_and_missing_credentials() -> None:
    unreachable = boto3.client(
        "kms",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    with pytest.raises(DependencyTimeoutException):
        Boto3Provider(unreachable).generate_data_key("alias/x", {})
    from botocore.exceptions import NoCredentialsError

    assert isinstance(map_boto_error(NoCredentialsError()), MissingAuthenticationTokenException)


def test_every_error_of_the_operations_used_is_mapped() -> None:
    """Each error GenerateDataKey, Decrypt and ReEncrypt can return has its own class."""
    from hsmkms.envelope.providers import _BY_CODE

    model = boto3.client("kms", region_name="us-east-1").meta.service_model
    for operation in ("GenerateDataKey", "Decrypt", "ReEncrypt"):
        for shape in model.operation_model(operation).error_shapes:
            assert shape.name in _BY_CODE, (operation, shape.name)
            assert issubclass(_BY_CODE[shape.name], KMSError)


def _cli(server: RunningServer, *args: str, stdin: bytes | None = None) -> Any:
    env = clean_env(
        AWS_ACCESS_KEY_ID=server.access_key_id,
        AWS_SECRET_ACCESS_KEY=server.secret_access_key,
        AWS_DEFAULT_REGION=server.region,
    )
    return cli_process.run(
        [sys.executable, "-m", "hsmkms.cli.main", *args, "--endpoint-url", server.endpoint],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_with_endpoint_url(server: RunningServer, keys: tuple[str, str]) -> None:
    plaintext = os.urandom(300_000)
    enc = _cli(server, "encrypt-file", "-", "-", "--key-id", keys[0], "--context", "a=b",
               stdin=plaintext)  # fmt: skip
    assert enc.returncode == 0, enc.stderr
    dec = _cli(server, "decrypt-file", "-", "-", "--context", "a=b", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == plaintext
    bad = _cli(server, "decrypt-file", "-", "-", "--context", "a=c", stdin=enc.stdout)
    assert bad.returncode == 1
    assert bad.stdout == b""
    assert bad.stderr.decode().count("\n") == 1


def test_cli_takes_the_endpoint_from_aws_endpoint_url_kms(
    server: RunningServer, keys: tuple[str, str], tmp_path: Path
) -> None:
    """Like every AWS tool: with AWS_ENDPOINT_URL_KMS set (as the README exports it) the
    commands use that server, not a data directory in the working directory; --data-dir
    still means the local data directory."""
    env = clean_env(
        AWS_ACCESS_KEY_ID=server.access_key_id,
        AWS_SECRET_ACCESS_KEY=server.secret_access_key,
        AWS_DEFAULT_REGION=server.region,
        AWS_ENDPOINT_URL_KMS=server.endpoint,
    )

    def cli(*args: str, stdin: bytes | None = None, **extra: str) -> Any:
        return cli_process.run(
            [sys.executable, "-m", "hsmkms.cli.main", *args],
            input=stdin, capture_output=True, env={**env, **extra}, timeout=120, check=False,
            cwd=tmp_path,
        )  # fmt: skip

    enc = cli("encrypt-file", "-", "-", "--key-id", keys[1], stdin=b"from the environment")
    assert enc.returncode == 0, enc.stderr
    dec = cli("decrypt-file", "-", "-", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == b"from the environment"
    assert not (tmp_path / ".hsmkms").exists()
    # AWS_ENDPOINT_URL (all services) is the fallback; AWS_IGNORE_CONFIGURED_ENDPOINT_URLS
    # turns both off, as in botocore.
    general = cli("decrypt-file", "-", "-", stdin=enc.stdout, AWS_ENDPOINT_URL_KMS="",
                  AWS_ENDPOINT_URL=server.endpoint)  # fmt: skip
    assert general.stdout == b"from the environment"
    ignored = cli("decrypt-file", "-", "-", stdin=enc.stdout,
                  AWS_IGNORE_CONFIGURED_ENDPOINT_URLS="true")  # fmt: skip
    assert ignored.returncode == 2
    assert b"no data directory at" in ignored.stderr
    local = cli("decrypt-file", "-", "-", "--data-dir", str(tmp_path / "d"), stdin=enc.stdout)
    assert local.returncode == 2
    assert f"no data directory at {tmp_path / 'd'}".encode() in local.stderr
