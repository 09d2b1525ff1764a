"""Real ``hsmkms serve`` processes on PostgreSQL: two servers (standing for two machines) sharing
one database and one SoftHSM2 token directory decide each request on what the other just
changed; a server whose PostgreSQL restarts, or goes away for a while, answers 503s naming the
cause and recovers by itself, with nothing lost from the audit trail."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from postgres import Cluster, wait_until_accepting
from server import RunningServer, run_cli, running_server

from hsmkms.softhsm import find_module

pytestmark = [pytest.mark.postgres, pytest.mark.server, pytest.mark.hsm, pytest.mark.slow]

ROOT = {
    "HSMKMS_ROOT_ACCESS_KEY_ID": "AKIAPOSTGRESROOT0001",
    "HSMKMS_ROOT_SECRET_ACCESS_KEY": "postgres-root-secret-for-the-tests-only",
}
ALLOW_ALL = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
    }
)


def _code(call: Any, **kwargs: Any) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    return str(info.value.response["Error"]["Code"])


def _second_machine(first_data_dir: Path) -> dict[str, str]:
    """Settings of another machine on the same token (a network HSM; here the first server's
    SoftHSM2 token directory) and database: its own data directory, the token by label."""
    return {
        "HSMKMS_MODULE_PATH": find_module(),
        "HSMKMS_TOKEN_LABEL": "hsmkms",
        "HSMKMS_PIN_FILE": str(first_data_dir / "user.pin"),
        "SOFTHSM2_CONF": str(first_data_dir / "softhsm2.conf"),
    }


def test_two_servers_on_one_database_decide_on_each_others_changes(
    pg_url: str, tmp_path: Path
) -> None:
    env = {"HSMKMS_DATABASE_URL": pg_url, **ROOT}
    second = {**env, **_second_machine(tmp_path / "a")}
    with (
        running_server(tmp_path / "a", env=env) as a,
        running_server(tmp_path / "b", env=second) as b,
    ):
        ca, cb = a.client(), b.client()
        key_id = ca.create_key()["KeyMetadata"]["KeyId"]
        blob = cb.encrypt(KeyId=key_id, Plaintext=b"across nodes")["CiphertextBlob"]
        assert ca.decrypt(CiphertextBlob=blob)["Plaintext"] == b"across nodes"

        # A key disabled through one server is refused at once through the other.
        ca.disable_key(KeyId=key_id)
        assert _code(cb.encrypt, KeyId=key_id, Plaintext=b"x") == "DisabledException"
        cb.enable_key(KeyId=key_id)
        ca.encrypt(KeyId=key_id, Plaintext=b"x")
        cb.create_alias(AliasName="alias/shared", TargetKeyId=key_id)
        assert ca.describe_key(KeyId="alias/shared")["KeyMetadata"]["KeyId"] == key_id
        cb.delete_alias(AliasName="alias/shared")
        assert _code(ca.describe_key, KeyId="alias/shared") == "NotFoundException"

        # A credential works on both servers; deleted, it stops working on both at once.
        policy = tmp_path / "allow-all.json"
        policy.write_text(ALLOW_ALL)
        made = run_cli(
                "credentials", "create", "--name", "app", "--policy-file", str(policy), "--json",
                "--data-dir", str(a.data_dir), env=env,
            )  # fmt: skip
        assert made.returncode == 0, made.stderr
        issued = json.loads(made.stdout)
        users = [s.client(issued["AccessKeyId"], issued["SecretAccessKey"]) for s in (a, b)]
        for client in users:
            client.encrypt(KeyId=key_id, Plaintext=b"as app")
        gone = run_cli(
                "credentials", "delete", "app", "--data-dir", str(b.data_dir),
                env=second,
            )  # fmt: skip
        assert gone.returncode == 0, gone.stderr
        for client in users:
            assert _code(client.list_keys) == "UnrecognizedClientException"
    verified = run_cli("audit", "verify", "--data-dir", str(tmp_path / "a"), env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A PostgreSQL server of this test alone (it is restarted and stopped)."""
    base = Path(tempfile.mkdtemp(prefix="hsmkms-pg-own-"))
    server = Cluster(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def _until_served(call: Any, timeout: float = 30.0, **kwargs: Any) -> None:
    """Call until two answers in a row are not a 503 (both workers recovered), at most
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    served = 0
    while served < 2:
        try:
            call(**kwargs)
            served += 1
        except botocore.exceptions.ClientError as exc:
            if exc.response["Error"]["Code"] != "DependencyTimeoutException":
                raise
            served = 0
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.2)


def _unavailable(server: RunningServer, call: Any, **kwargs: Any) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    response = info.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 503, response
    assert response["Error"]["Code"] == "DependencyTimeoutException", response
    message = str(response["Error"]["Message"])
    assert "unavailable" in message, message
    return message


def test_a_postgresql_restart_under_a_running_server(own_cluster: Cluster, tmp_path: Path) -> None:
    url = own_cluster.url(own_cluster.create_database())
    env = {"HSMKMS_DATABASE_URL": url}
    with running_server(tmp_path / "data", env=env, workers=2) as srv:
        client = srv.client()
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        blob = client.encrypt(KeyId=key_id, Plaintext=b"before")["CiphertextBlob"]

        # A restart cuts every connection: the next requests get fresh ones, no error.
        own_cluster.restart()
        wait_until_accepting(own_cluster)
        for _ in range(4):  # whichever worker answers
            assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
        client.disable_key(KeyId=key_id)
        client.enable_key(KeyId=key_id)

        # Away: every request is a 503 naming the cause, nothing half-written.
        own_cluster.pg_ctl("stop", "-m", "fast")
        message = _unavailable(srv, client.encrypt, KeyId=key_id, Plaintext=b"x")
        assert "cannot be reached" in message or "shutting down" in message
        assert own_cluster.password not in message
        _unavailable(srv, client.disable_key, KeyId=key_id)
        _unavailable(srv, client.create_alias, AliasName="alias/lost", TargetKeyId=key_id)

        # Back: the server recovers by itself (each worker's audit writer tries its failed
        # trail again every half second), and the failed writes changed nothing.
        own_cluster.pg_ctl("start")
        wait_until_accepting(own_cluster)
        _until_served(client.describe_key, KeyId=key_id)
        for _ in range(4):
            assert client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
        assert _code(client.describe_key, KeyId="alias/lost") == "NotFoundException"
        assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
        assert "Traceback" not in srv.log()
    # Every request's record reached the trail, and the chain verifies.
    verified = run_cli("audit", "verify", "--data-dir", str(tmp_path / "data"), env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert own_cluster.password not in srv.log()
