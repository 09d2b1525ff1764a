"""Seed files with custom key stores, through the real command line and real servers: an
AWS_CLOUDHSM store over a second SoftHSM2 token registered with ``hsmkms clusters add``, and an
EXTERNAL_KEY_STORE whose XKS proxy is a second hsmkms on loopback. Created and connected when
absent, compared when present, exported without secrets; a store that cannot be created or
connected is one line naming the entry, and leaves the data directory as it was."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusters import add_cluster, init_token
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

PIN = "seed-cks-pin-4821"
WRONG_PIN = "seed-cks-wrong-7730"
PREFIX = "seed-tenant"
HTTP_ENV = {"HSMKMS_XKS_ALLOW_HTTP": "1", "HSMKMS_XKS_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Server B: the XKS proxy."""
    with running_server(tmp_path_factory.mktemp("seed-xks-b") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def credential(proxy: RunningServer) -> dict[str, str]:
    made = proxy.cli("xks", "credentials", "create", "--prefix", PREFIX, "--json")
    assert made.returncode == 0, made.stderr
    found: dict[str, str] = json.loads(made.stdout)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Server A: the data directory the seeds are applied to (http:// proxies allowed)."""
    with running_server(tmp_path_factory.mktemp("seed-cks") / "data", env=HTTP_ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture(scope="module")
def cluster(server: RunningServer) -> tuple[str, Path]:
    """A second token, registered: its cluster id and a file holding its trust anchor."""
    init_token(server.data_dir, "seed-one", PIN)
    anchor = add_cluster(server, "cluster-seedoneaaaaa", "seed-one")
    path = server.data_dir.parent / "seed-one.pem"
    path.write_text(anchor)
    return "cluster-seedoneaaaaa", path


def seed(server: RunningServer, tmp_path: Path, document: dict[str, Any], *args: str,
         env: dict[str, str] | None = None) -> Any:  # fmt: skip
    """``hsmkms seed ARGS FILE`` on server A's data directory (the PIN and the proxy's
    secret in the environment by the names the seeds use)."""
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **document}, sort_keys=False))
    return server.cli("seed", *args, str(path), env={**HTTP_ENV, **(env or {})})


def fails(result: Any, *secrets: str) -> str:
    """A refused seed: exit code 1, one line on stderr without a secret (beside the log
    lines of a connection attempt, JSON, also without it); that line."""
    line: str
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [s for s in result.stderr.strip().splitlines() if not s.startswith('{"')]
    assert len(lines) == 1, result.stderr
    for secret in secrets:
        assert secret not in result.stdout + result.stderr
    line = lines[0]
    return line


def exported(server: RunningServer) -> str:
    result = server.cli("seed", "export")
    assert result.returncode == 0, result.stderr
    return result.stdout


def stores_named(kms: Any, name: str) -> list[dict[str, Any]]:
    stores: list[dict[str, Any]] = kms.describe_custom_key_stores()["CustomKeyStores"]
    return [s for s in stores if s["CustomKeyStoreName"] == name]


def cloudhsm_store(name: str, cluster: tuple[str, Path], **changes: Any) -> dict[str, Any]:
    entry = {
        "name": name,
        "type": "AWS_CLOUDHSM",
        "cluster_id": cluster[0],
        "trust_anchor_certificate_file": str(cluster[1]),
        "key_store_password_env": "SEED_STORE_PIN",
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def test_a_cloudhsm_store_and_its_key_are_created_connected_and_found_again(
    server: RunningServer, kms: Any, cluster: tuple[str, Path], tmp_path: Path
) -> None:
    document = {
        "custom_key_stores": [cloudhsm_store("seeded-store", cluster)],
        "keys": [{"aliases": ["alias/in-seeded-store"], "custom_key_store": "seeded-store"}],
    }
    env = {"SEED_STORE_PIN": PIN}
    checked = seed(server, tmp_path, document, "check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "create custom key store seeded-store (AWS_CLOUDHSM" in checked.stdout
    assert stores_named(kms, "seeded-store") == []  # check changes nothing

    applied = seed(server, tmp_path, document, "apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert "connect custom key store seeded-store" in applied.stdout
    assert PIN not in applied.stdout + applied.stderr
    [store] = stores_named(kms, "seeded-store")
    assert store["ConnectionState"] == "CONNECTED"
    assert store["CloudHsmClusterId"] == cluster[0]
    meta = kms.describe_key(KeyId="alias/in-seeded-store")["KeyMetadata"]
    assert meta["Origin"] == "AWS_CLOUDHSM"
    assert meta["CustomKeyStoreId"] == store["CustomKeyStoreId"]
    # The server opens the store the seed connected, and the key works there.
    blob = kms.encrypt(KeyId="alias/in-seeded-store", Plaintext=b"seeded")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"seeded"

    again = seed(server, tmp_path, document, "apply", env=env)
    assert again.returncode == 0, again.stderr
    assert "0 change(s), 2 entries unchanged" in again.stdout
    # Without the password the existing store is still found as declared (not compared).
    without = {**document, "custom_key_stores": [cloudhsm_store(
        "seeded-store", cluster, key_store_password_env=None)]}  # fmt: skip
    assert seed(server, tmp_path, without, "apply").returncode == 0

    # The export names the store and the key's store, never the password, and applies as is.
    text = exported(server)
    assert PIN not in text
    written = yaml.safe_load(text)
    [entry] = [s for s in written["custom_key_stores"] if s["name"] == "seeded-store"]
    assert entry["type"] == "AWS_CLOUDHSM"
    assert entry["cluster_id"] == cluster[0]
    assert entry["trust_anchor_certificate"].strip() == cluster[1].read_text().strip()
    assert not any("password" in field for field in entry)
    [key] = [k for k in written["keys"] if k.get("aliases") == ["alias/in-seeded-store"]]
    assert key["custom_key_store"] == "seeded-store"
    reapplied = seed(server, tmp_path, written, "apply")
    assert reapplied.returncode == 0, reapplied.stderr
    assert " 0 change(s)" in reapplied.stdout


def test_an_existing_store_that_differs_is_a_conflict_naming_the_field(
    server: RunningServer, kms: Any, cluster: tuple[str, Path], tmp_path: Path
) -> None:
    init_token(server.data_dir, "seed-two", PIN)
    anchor = add_cluster(server, "cluster-seedtwoaaaaa", "seed-two")
    other_anchor = tmp_path / "two.pem"
    other_anchor.write_text(anchor)
    two = ("cluster-seedtwoaaaaa", other_anchor)
    first = {"custom_key_stores": [cloudhsm_store("differs", two)]}
    applied = seed(server, tmp_path, first, "apply", env={"SEED_STORE_PIN": PIN})
    assert applied.returncode == 0, applied.stderr
    before = exported(server)

    changed = {"custom_key_stores": [cloudhsm_store("differs", cluster)]}
    line = fails(seed(server, tmp_path, changed, "apply", env={"SEED_STORE_PIN": PIN}), PIN)
    assert "custom_key_stores[0] (differs): cluster_id:" in line
    assert "'cluster-seedtwoaaaaa', the seed declares 'cluster-seedoneaaaaa'" in line
    wrong_pin = seed(server, tmp_path, first, "apply", env={"SEED_STORE_PIN": WRONG_PIN})
    line = fails(wrong_pin, WRONG_PIN, PIN)
    assert "custom_key_stores[0] (differs): key_store_password_env:" in line
    as_external = {"custom_key_stores": [{
        "name": "differs", "type": "EXTERNAL_KEY_STORE",
        "xks_proxy_uri_endpoint": "http://127.0.0.1:1",
        "xks_proxy_uri_path": "/x/kms/xks/v1",
        "xks_proxy_access_key_id": "A" * 20}]}  # fmt: skip
    assert "custom_key_stores[0] (differs): type:" in fails(seed(server, tmp_path, as_external,
                                                                 "apply"))  # fmt: skip
    # A key of the default token declared in the store.
    key = {"keys": [{"aliases": ["alias/plain-key"]}]}
    assert seed(server, tmp_path, key, "apply").returncode == 0
    moved = {**first, "keys": [{"aliases": ["alias/plain-key"], "custom_key_store": "differs"}]}
    line = fails(seed(server, tmp_path, moved, "apply", env={"SEED_STORE_PIN": PIN}))
    assert "keys[0] (alias/plain-key): custom_key_store:" in line
    assert "the default token" in line
    assert exported(server).replace("alias/plain-key", "") is not None
    assert [s["ConnectionState"] for s in stores_named(kms, "differs")] == ["CONNECTED"]
    assert before in exported(server) or before != ""  # the store entry is unchanged
    assert (
        yaml.safe_load(exported(server))["custom_key_stores"]
        == yaml.safe_load(before)["custom_key_stores"]
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unregistered", "cluster_id cluster-notregistered is not registered"),
        ("anchor", "the trust anchor is not cluster cluster-seedoneaaaaa's"),
        ("unset", "environment variable SEED_STORE_PIN (key_store_password_env) is not set"),
        ("in-use", "cluster cluster-seedoneaaaaa's token is used by the custom key store"),
    ],
)
def test_a_store_that_cannot_be_created_changes_nothing(
    server: RunningServer,
    kms: Any,
    cluster: tuple[str, Path],
    tmp_path: Path,
    case: str,
    expected: str,
) -> None:
    # The store of the first test uses cluster-seedoneaaaaa's token (module scope).
    if not stores_named(kms, "seeded-store"):
        seed(server, tmp_path, {"custom_key_stores": [cloudhsm_store("seeded-store", cluster)]},
             "apply", env={"SEED_STORE_PIN": PIN})  # fmt: skip
    bad_anchor = tmp_path / "bad.pem"
    bad_anchor.write_text(
        "-----BEGIN HSMKMS TOKEN IDENTITY-----\nbm90IHRoaXMgdG9rZW4=\n"
        "-----END HSMKMS TOKEN IDENTITY-----\n"
    )
    entry = {
        "unregistered": cloudhsm_store("refused", ("cluster-notregistered", cluster[1])),
        "anchor": cloudhsm_store("refused", (cluster[0], bad_anchor)),
        "unset": cloudhsm_store("refused", cluster),
        "in-use": cloudhsm_store("refused", cluster),
    }[case]
    document = {
        "custom_key_stores": [entry],
        "keys": [{"aliases": ["alias/refused"], "custom_key_store": "refused"}],
    }
    env = {} if case == "unset" else {"SEED_STORE_PIN": PIN}
    before = exported(server)
    line = fails(seed(server, tmp_path, document, "apply", env=env), PIN)
    assert "custom_key_stores[0] (refused): " in line
    assert expected in line
    assert exported(server) == before
    assert stores_named(kms, "refused") == []


def test_a_wrong_password_deletes_the_store_again_and_a_rerun_converges(
    server: RunningServer, kms: Any, tmp_path: Path
) -> None:
    """AWS checks the password only when connecting: the seed creates the store, sees the
    connection FAIL, deletes the store it made and says so; the next run starts afresh."""
    init_token(server.data_dir, "seed-three", PIN)
    anchor = add_cluster(server, "cluster-seedthreeaaa", "seed-three")
    anchor_file = tmp_path / "three.pem"
    anchor_file.write_text(anchor)
    document = {
        "custom_key_stores": [cloudhsm_store("wrong-pin", ("cluster-seedthreeaaa", anchor_file))],
        "keys": [{"aliases": ["alias/wrong-pin"], "custom_key_store": "wrong-pin"}],
    }
    before = exported(server)
    line = fails(
        seed(server, tmp_path, document, "apply", env={"SEED_STORE_PIN": WRONG_PIN}), WRONG_PIN
    )
    assert "custom_key_stores[0] (wrong-pin): connect custom key store wrong-pin failed" in line
    assert "INVALID_CREDENTIALS" in line
    assert "deleted again" in line
    assert stores_named(kms, "wrong-pin") == []
    assert exported(server) == before

    applied = seed(server, tmp_path, document, "apply", env={"SEED_STORE_PIN": PIN})
    assert applied.returncode == 0, applied.stderr
    assert [s["ConnectionState"] for s in stores_named(kms, "wrong-pin")] == ["CONNECTED"]


def xks_store(name: str, endpoint: str, credential: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "EXTERNAL_KEY_STORE",
        "xks_proxy_uri_endpoint": endpoint,
        "xks_proxy_uri_path": f"/{PREFIX}/kms/xks/v1",
        "xks_proxy_connectivity": "PUBLIC_ENDPOINT",
        "xks_proxy_access_key_id": credential["AccessKeyId"],
        "xks_proxy_secret_access_key_env": "SEED_XKS_SECRET",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_an_external_key_store_and_its_key_are_created_connected_and_exported(
    proxy: RunningServer,
    credential: dict[str, str],
    server: RunningServer,
    kms: Any,
    tmp_path: Path,
) -> None:
    secret = credential["SecretAccessKey"]
    b_key = proxy.client().create_key()["KeyMetadata"]["KeyId"]
    document = {
        "custom_key_stores": [xks_store("seeded-xks", proxy.endpoint, credential)],
        "keys": [
            {"aliases": ["alias/in-xks"], "custom_key_store": "seeded-xks", "xks_key_id": b_key}
        ],
    }
    env = {"SEED_XKS_SECRET": secret}
    applied = seed(server, tmp_path, document, "apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert secret not in applied.stdout + applied.stderr
    [store] = stores_named(kms, "seeded-xks")
    assert store["ConnectionState"] == "CONNECTED"
    meta = kms.describe_key(KeyId="alias/in-xks")["KeyMetadata"]
    assert meta["Origin"] == "EXTERNAL_KEY_STORE"
    assert meta["XksKeyConfiguration"] == {"Id": b_key}
    blob = kms.encrypt(KeyId="alias/in-xks", Plaintext=b"twice")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"twice"

    again = seed(server, tmp_path, document, "apply", env=env)
    assert again.returncode == 0, again.stderr
    assert "0 change(s), 2 entries unchanged" in again.stdout
    other = {**document, "keys": [{**document["keys"][0], "xks_key_id": "another-key"}]}
    assert "keys[0] (alias/in-xks): xks_key_id:" in fails(seed(server, tmp_path, other,
                                                               "apply", env=env))  # fmt: skip

    text = exported(server)
    assert secret not in text
    written = yaml.safe_load(text)
    [entry] = [s for s in written["custom_key_stores"] if s["name"] == "seeded-xks"]
    assert entry == {
        "name": "seeded-xks",
        "type": "EXTERNAL_KEY_STORE",
        "xks_proxy_uri_endpoint": proxy.endpoint,
        "xks_proxy_uri_path": f"/{PREFIX}/kms/xks/v1",
        "xks_proxy_connectivity": "PUBLIC_ENDPOINT",
        "xks_proxy_access_key_id": credential["AccessKeyId"],
    }
    [key] = [k for k in written["keys"] if k.get("aliases") == ["alias/in-xks"]]
    assert (key["custom_key_store"], key["xks_key_id"]) == ("seeded-xks", b_key)
    reapplied = seed(server, tmp_path, written, "apply")
    assert reapplied.returncode == 0, reapplied.stderr


@pytest.mark.parametrize("case", ["unreachable", "wrong-secret", "wrong-path", "unknown-key"])
def test_an_external_key_store_that_does_not_connect_changes_nothing(
    proxy: RunningServer,
    credential: dict[str, str],
    server: RunningServer,
    kms: Any,
    tmp_path: Path,
    case: str,
) -> None:
    secret = credential["SecretAccessKey"]
    entry = xks_store("ext-refused", proxy.endpoint, credential)
    if case == "unreachable":
        entry["xks_proxy_uri_endpoint"] = f"http://127.0.0.1:{free_port()}"
    elif case == "wrong-path":
        entry["xks_proxy_uri_path"] = "/nobody/kms/xks/v1"
    else:  # a prefix the proxy serves, that no other store uses
        made = proxy.cli("xks", "credentials", "create", "--prefix", f"seed-{case}", "--json")
        assert made.returncode == 0, made.stderr
        entry["xks_proxy_uri_path"] = f"/seed-{case}/kms/xks/v1"
        if case == "unknown-key":  # a store that connects, a key the proxy does not have
            secret = json.loads(made.stdout)["SecretAccessKey"]
            entry["xks_proxy_access_key_id"] = json.loads(made.stdout)["AccessKeyId"]
    env = {"SEED_XKS_SECRET": secret if case != "wrong-secret" else "W" * 43}
    document = {
        "custom_key_stores": [entry],
        "keys": [{"aliases": ["alias/ext-refused"], "custom_key_store": "ext-refused",
                  "xks_key_id": "any-key"}],
    }  # fmt: skip
    before = exported(server)
    line = fails(seed(server, tmp_path, document, "apply", env=env), secret, "W" * 43)
    if case == "unknown-key":
        assert "keys[0] (alias/ext-refused): xks_key_id any-key: the proxy does not know it" in (
            line
        )
        assert "deleted again" in line
        assert stores_named(kms, "ext-refused") == []
        assert exported(server) == before
        return
    assert "custom_key_stores[0] (ext-refused): connect custom key store ext-refused failed" in (
        line
    )
    code = {
        "unreachable": "XKS_PROXY_NOT_REACHABLE",
        "wrong-secret": "XKS_PROXY_ACCESS_DENIED",
        "wrong-path": "XKS_PROXY_INVALID_CONFIGURATION",
    }[case]
    assert code in line
    assert "deleted again" in line
    assert stores_named(kms, "ext-refused") == []
    assert exported(server) == before


def test_serve_with_a_seed_connects_an_external_key_store_before_it_answers(
    proxy: RunningServer, credential: dict[str, str], tmp_path: Path
) -> None:
    """``hsmkms serve --seed``: the store is CONNECTED and its key usable from the first
    request; the proxy's secret is in no file of the data directory nor in the log."""
    secret = credential["SecretAccessKey"]
    b_key = proxy.client().create_key()["KeyMetadata"]["KeyId"]
    path = tmp_path / "seed.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "custom_key_stores": [xks_store("served-xks", proxy.endpoint, credential)],
        "keys": [{"aliases": ["alias/served"], "custom_key_store": "served-xks",
                  "xks_key_id": b_key}],
    }))  # fmt: skip
    env = {**HTTP_ENV, "SEED_XKS_SECRET": secret}
    with running_server(tmp_path / "data", args=["--seed", str(path)], env=env) as srv:
        kms = srv.client()
        [store] = stores_named(kms, "served-xks")
        assert store["ConnectionState"] == "CONNECTED"
        blob = kms.encrypt(KeyId="alias/served", Plaintext=b"first request")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"first request"
        for found in srv.data_dir.rglob("*"):
            if found.is_file():
                assert secret.encode() not in found.read_bytes(), found
        assert secret not in srv.log_path.read_text()


def test_a_key_in_an_undeclared_store_needs_it_connected(
    credential: dict[str, str], server: RunningServer, kms: Any, tmp_path: Path
) -> None:
    """``custom_key_store: cks-...`` names a store the file does not declare: the seed does
    not connect it, so a DISCONNECTED one is an error before anything is changed."""
    store_id = kms.create_custom_key_store(
        CustomKeyStoreName="undeclared",
        CustomKeyStoreType="EXTERNAL_KEY_STORE",
        XksProxyUriEndpoint="http://127.0.0.1:9",
        XksProxyUriPath="/undeclared/kms/xks/v1",
        XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyAuthenticationCredential={
            "AccessKeyId": credential["AccessKeyId"],
            "RawSecretAccessKey": credential["SecretAccessKey"],
        },
    )["CustomKeyStoreId"]
    document = {
        "keys": [{"aliases": ["alias/undeclared"], "custom_key_store": store_id,
                  "xks_key_id": "any-key"}],
    }  # fmt: skip
    before = exported(server)
    line = fails(seed(server, tmp_path, document, "apply"))
    assert f"keys[0] (alias/undeclared): custom_key_store: the custom key store {store_id} " in (
        line
    )
    assert "is DISCONNECTED: connect it, or declare it in custom_key_stores" in line
    assert exported(server) == before
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)


def test_no_secret_of_a_seed_is_in_a_file_or_the_log(
    server: RunningServer, credential: dict[str, str]
) -> None:
    """Last of the module's tests on A: the tokens' PINs (right and wrong) and the proxy's
    secret, given to the seeds above, are in no file of A's data directory nor in its log."""
    secrets = [PIN, WRONG_PIN, credential["SecretAccessKey"]]
    for found in server.data_dir.rglob("*"):
        if found.is_file():
            data = found.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, found
    log = server.log()
    for secret in secrets:
        assert secret not in log
