"""Real ``hsmkms serve`` processes on PostgreSQL: two servers (standing for two machines) sharing
one database and one SoftHSM2 token directory decide each request on what the other just
changed; a server whose PostgreSQL restarts, or goes away for a while, answers 503s naming the
cause and recovers by itself, with nothing lost from the audit trail."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from load import Load
from postgres import Cluster, wait_until_accepting
from server import RunningServer, run_cli, running_server, start_server

from hsmkms.config import Settings
from hsmkms.softhsm import find_module
from hsmkms.system import open_audit_reader

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


def _trail_request_ids(data_dir: Path, database_url: str) -> set[str]:
    reader = open_audit_reader(Settings(data_dir=data_dir, database_url=database_url))
    try:
        return {str(r.get("requestID")) for r in reader.search()}
    finally:
        reader.close()


def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_three_nodes_under_load_lose_nothing_when_one_is_killed(
    pg_url: str, tmp_path: Path
) -> None:
    """Three nodes on one database and one token, each under load: ``kill -9`` of one node
    (its whole process group) leaves the other two answering, every request any node answered
    200 — the killed one's too — has its record in the one trail, and ``hsmkms audit verify``
    proves the chain and names the killed node's unclean stop."""
    env = {"HSMKMS_DATABASE_URL": pg_url, "HSMKMS_AUDIT_SEAL_INTERVAL": "1", **ROOT}
    other = {**env, **_second_machine(tmp_path / "a")}
    args = ["--task-interval", "0.5"]  # the periodic work on every node, one at a time
    nodes = [start_server(tmp_path / "a", env=env, args=args)]
    loads: list[Load] = []
    try:
        nodes += [start_server(tmp_path / n, env=other, args=args) for n in ("b", "c")]
        key_id = nodes[0].client().create_key()["KeyMetadata"]["KeyId"]
        mix = [
            ("Encrypt", lambda i: {"KeyId": key_id, "Plaintext": "aGVsbG8="}),
            ("GenerateDataKey", lambda i: {"KeyId": key_id, "KeySpec": "AES_256"}),
            ("CreateKey", lambda i: {"Description": f"load {i}"}),
        ]
        loads = [Load(node, mix, threads=2).start() for node in nodes]
        _wait_for(lambda: all(load.count() > 30 for load in loads))
        victim = nodes[1]
        victim.stop(signal.SIGKILL)
        during = [load.count() for load in loads]
        _wait_for(lambda: all(loads[i].count() > during[i] + 60 for i in (0, 2)))
        answers = [load.stop() for load in loads]
        for survivor in (answers[0], answers[2]):
            assert [a.status for a in survivor[-30:]] == [200] * 30
        answered = [a for node in answers for a in node if a.status == 200]
        assert any(a.target == "CreateKey" for a in answers[1] if a.status == 200)
        recorded = _trail_request_ids(tmp_path / "a", pg_url)
        missing = [a for a in answered if a.request_id not in recorded]
        assert missing == [], f"{len(missing)} of {len(answered)} answered requests unrecorded"

        # The killed node's writer left no shutdown seal: a live node notes it, and verify
        # proves the chain with the unclean stop in its history.
        seen: list[str] = []

        def noted() -> bool:
            done = nodes[0].cli("audit", "verify", env=env)
            if done.returncode == 0 and "stopped without a clean shutdown" in done.stderr:
                seen.append(done.stdout)
                return True
            return False

        _wait_for(noted)
        assert seen[-1].startswith("audit trail intact: ")
        # A key created on the killed node before it died is served by the others.
        made = [a.body["KeyMetadata"]["KeyId"] for a in answers[1]
                if a.status == 200 and a.target == "CreateKey"]  # fmt: skip
        assert nodes[2].client().describe_key(KeyId=made[-1])["KeyMetadata"]["Enabled"]
    finally:
        for load in loads:
            load.stop()
        for node in nodes:
            node.stop()
