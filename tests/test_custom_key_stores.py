"""Custom key stores of type AWS_CLOUDHSM end to end: a second SoftHSM2 token registered with
``hsmkms clusters add``, a real server on loopback, boto3 as the client."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from clusters import add_cluster, cluster_uri, init_token
from local_system import open_system, settings_for
from server import RunningServer, running_server

from hsmkms import models as m
from hsmkms.errors import CustomKeyStoreHasCMKsException, NotFoundException
from hsmkms.keystore.config import KeystoreConfig
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service.testing import ManualClock
from hsmkms.softhsm import CONF_NAME, find_module
from hsmkms.store.key_stores import trust_anchor_of
from hsmkms.system import cluster_identity

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

PIN = "cks-pin-7294-secret"
OTHER_PIN = "cks-other-pin-5550"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("cks") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server: RunningServer) -> Any:
    return server.client()


def raises(code: str, call: Callable[..., Any], **kwargs: Any) -> str:
    """``call(**kwargs)`` fails with botocore's ClientError of ``code`` (HTTP 400); message."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return str(error["Message"])


def describe(kms: Any, store_id: str) -> dict[str, Any]:
    stores = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"]
    assert len(stores) == 1
    found: dict[str, Any] = stores[0]
    return found


def wait_state(kms: Any, store_id: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll DescribeCustomKeyStores until the store is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        entry = describe(kms, store_id)
        if entry["ConnectionState"] in states:
            return entry
        assert entry["ConnectionState"] == "CONNECTING", entry
        assert time.monotonic() < deadline, f"still {entry['ConnectionState']}"
        time.sleep(0.1)


def token_objects(data_dir: Path, label: str, pin: str) -> list[str]:
    """The labels of this project's objects on the token ``label`` (asked in this process)."""
    keystore = Pkcs11Keystore(
        KeystoreConfig(
            module_path=find_module(),
            pin=pin,
            token_label=label,
            softhsm2_conf=str(data_dir / CONF_NAME),
        )
    )
    try:
        return [o.label for o in keystore.list_objects()]
    finally:
        keystore.close()


def test_clusters_command_refuses_bad_input_in_one_line(server: RunningServer) -> None:
    cases = [
        ("add", "--cluster-id", "cluster-1", "--pkcs11-uri", cluster_uri("x")),
        ("add", "--cluster-id", "cluster-abcdefghijk", "--pkcs11-uri", "not-a-uri"),
        ("add", "--cluster-id", "cluster-abcdefghijk", "--pkcs11-uri", "pkcs11:token=x"),
        ("add", "--cluster-id", "cluster-abcdefghijk", "--pkcs11-uri", cluster_uri("absent")),
        (
            "add", "--cluster-id", "cluster-abcdefghijk", "--pkcs11-uri",
            cluster_uri("x") + "&pin-value=1234",
        ),
        ("add", "--cluster-id", "cluster-abcdefghijk", "--pkcs11-uri", cluster_uri("hsmkms")),
        ("remove", "cluster-unknownclust"),
        ("remove", "not-a-cluster"),
    ]  # fmt: skip
    for args in cases:
        result = server.cli("clusters", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert "1234" not in result.stderr
    listed = server.cli("clusters", "list", "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == []


def test_lifecycle_of_a_custom_key_store(server: RunningServer, kms: Any) -> None:
    """clusters add -> Create -> Connect -> CONNECTED -> keys in the second token -> crypto ->
    Disconnect -> refusals -> deletion only without keys."""
    init_token(server.data_dir, "cks-one", PIN)
    anchor = add_cluster(server, "cluster-lifecycleaaa", "cks-one")
    assert anchor.startswith("-----BEGIN ")
    listed = json.loads(server.cli("clusters", "list", "--json").stdout)
    assert [c["CloudHsmClusterId"] for c in listed] == ["cluster-lifecycleaaa"]

    store_id = kms.create_custom_key_store(
        CustomKeyStoreName="store-one",
        CloudHsmClusterId="cluster-lifecycleaaa",
        TrustAnchorCertificate=anchor,
        KeyStorePassword=PIN,
    )["CustomKeyStoreId"]
    assert store_id.startswith("cks-")
    entry = describe(kms, store_id)
    assert entry["ConnectionState"] == "DISCONNECTED"
    assert entry["CustomKeyStoreName"] == "store-one"
    assert entry["CloudHsmClusterId"] == "cluster-lifecycleaaa"
    assert entry["TrustAnchorCertificate"] == anchor
    assert entry["CustomKeyStoreType"] == "AWS_CLOUDHSM"
    assert "ConnectionErrorCode" not in entry
    assert "CreationDate" in entry
    by_name = kms.describe_custom_key_stores(CustomKeyStoreName="store-one")["CustomKeyStores"]
    assert [s["CustomKeyStoreId"] for s in by_name] == [store_id]

    # No key before the store is connected.
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.create_key,
        Origin="AWS_CLOUDHSM",
        CustomKeyStoreId=store_id,
    )
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert wait_state(kms, store_id, "CONNECTED", "FAILED")["ConnectionState"] == "CONNECTED"
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)  # connected: nothing to do

    meta = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"]
    key_id = meta["KeyId"]
    assert meta["Origin"] == "AWS_CLOUDHSM"
    assert meta["CustomKeyStoreId"] == store_id
    assert meta["CloudHsmClusterId"] == "cluster-lifecycleaaa"
    described = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert described["CustomKeyStoreId"] == store_id
    assert described["CloudHsmClusterId"] == "cluster-lifecycleaaa"

    # The key's material is in the second token, not in the default one.
    compact = key_id.replace("-", "")[:20]
    assert any(compact in label for label in token_objects(server.data_dir, "cks-one", PIN))
    default_pin = (server.data_dir / "user.pin").read_text().strip()
    assert not any(
        compact in label for label in token_objects(server.data_dir, "hsmkms", default_pin)
    )

    blob = kms.encrypt(KeyId=key_id, Plaintext=b"in the second token")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"in the second token"
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert (
        kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
        == (data_key["Plaintext"])
    )
    without = kms.generate_data_key_without_plaintext(KeyId=key_id, NumberOfBytes=16)
    assert len(kms.decrypt(CiphertextBlob=without["CiphertextBlob"])["Plaintext"]) == 16
    default_key = kms.create_key()["KeyMetadata"]["KeyId"]
    moved = kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId=default_key)
    assert moved["SourceKeyId"].endswith(key_id)
    back = kms.re_encrypt(CiphertextBlob=moved["CiphertextBlob"], DestinationKeyId=key_id)
    assert kms.decrypt(CiphertextBlob=back["CiphertextBlob"])["Plaintext"] == (
        b"in the second token"
    )
    assert len(kms.generate_random(NumberOfBytes=32, CustomKeyStoreId=store_id)["Plaintext"]) == 32

    # What a key in a custom key store cannot do, and what a connected store refuses.
    raises("UnsupportedOperationException", kms.enable_key_rotation, KeyId=key_id)
    raises("UnsupportedOperationException", kms.rotate_key_on_demand, KeyId=key_id)
    raises(
        "UnsupportedOperationException",
        kms.create_key,
        Origin="AWS_CLOUDHSM",
        CustomKeyStoreId=store_id,
        KeySpec="HMAC_256",
        KeyUsage="GENERATE_VERIFY_MAC",
    )
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.delete_custom_key_store,
        CustomKeyStoreId=store_id,
    )
    # botocore: the name may change while connected; the password and cluster may not.
    kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="renamed")
    assert describe(kms, store_id)["CustomKeyStoreName"] == "renamed"
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.update_custom_key_store,
        CustomKeyStoreId=store_id,
        KeyStorePassword="another-password",
    )
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.update_custom_key_store,
        CustomKeyStoreId=store_id,
        NewCustomKeyStoreName="renamed-again",
        CloudHsmClusterId="cluster-lifecycleaaa",
    )
    assert describe(kms, store_id)["CustomKeyStoreName"] == "renamed"
    in_use = server.cli("clusters", "remove", "cluster-lifecycleaaa")
    assert in_use.returncode == 2
    assert store_id in in_use.stderr
    assert len(in_use.stderr.strip().splitlines()) == 1

    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert describe(kms, store_id)["ConnectionState"] == "DISCONNECTED"
    raises("KMSInvalidStateException", kms.encrypt, KeyId=key_id, Plaintext=b"x")
    raises("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    raises("KMSInvalidStateException", kms.generate_data_key, KeyId=key_id, KeySpec="AES_256")
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.generate_random,
        NumberOfBytes=8,
        CustomKeyStoreId=store_id,
    )
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.disconnect_custom_key_store,
        CustomKeyStoreId=store_id,
    )
    # The default store is unaffected.
    assert kms.encrypt(KeyId=default_key, Plaintext=b"y")["CiphertextBlob"]

    kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="store-uno")
    assert describe(kms, store_id)["CustomKeyStoreName"] == "store-uno"
    raises("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store, CustomKeyStoreId=store_id)
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    raises("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store, CustomKeyStoreId=store_id)

    # Connected again, the key (pending deletion) decrypts nothing but the store works.
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert wait_state(kms, store_id, "CONNECTED", "FAILED")["ConnectionState"] == "CONNECTED"
    kms.cancel_key_deletion(KeyId=key_id)
    kms.enable_key(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"in the second token"

    # The audit trail names the key store.
    search = server.cli("audit", "search", "--event-name", "Encrypt", "--json")
    assert search.returncode == 0, search.stderr
    records = [r for r in json.loads(search.stdout) if r.get("errorCode") is None]
    assert any(
        (r.get("additionalEventData") or {}).get("customKeyStoreId") == store_id for r in records
    )

    # The operator's cluster changes are recorded, failures included.
    added = json.loads(
        server.cli("audit", "search", "--event-name", "AddCloudHsmCluster", "--json").stdout
    )
    assert any(
        r["requestParameters"]["cloudHsmClusterId"] == "cluster-lifecycleaaa"
        and r["userIdentity"]["type"] == "LocalOperator"
        and r.get("errorCode") is None
        for r in added
    )
    removals = json.loads(
        server.cli("audit", "search", "--event-name", "RemoveCloudHsmCluster", "--json").stdout
    )
    assert any(
        r["requestParameters"]["cloudHsmClusterId"] == "cluster-lifecycleaaa" and r.get("errorCode")
        for r in removals
    )

    # The password is in no file of the data directory (database, audit trail) nor in the log.
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            assert PIN.encode() not in path.read_bytes(), path
    assert PIN not in server.log()


def test_wrong_password_fails_with_invalid_credentials(server: RunningServer, kms: Any) -> None:
    init_token(server.data_dir, "cks-two", OTHER_PIN)
    anchor = add_cluster(server, "cluster-wrongpinbbbb", "cks-two")
    store_id = kms.create_custom_key_store(
        CustomKeyStoreName="store-two",
        CloudHsmClusterId="cluster-wrongpinbbbb",
        TrustAnchorCertificate=anchor,
        KeyStorePassword="not-the-pin",
    )["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    entry = wait_state(kms, store_id, "CONNECTED", "FAILED")
    assert entry["ConnectionState"] == "FAILED"
    assert entry["ConnectionErrorCode"] == "INVALID_CREDENTIALS"
    # spec: a FAILED store is disconnected before it is connected again.
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.connect_custom_key_store,
        CustomKeyStoreId=store_id,
    )
    raises(
        "CustomKeyStoreInvalidStateException",
        kms.update_custom_key_store,
        CustomKeyStoreId=store_id,
        KeyStorePassword=OTHER_PIN,
    )
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    entry = describe(kms, store_id)
    assert entry["ConnectionState"] == "DISCONNECTED"
    assert "ConnectionErrorCode" not in entry
    kms.update_custom_key_store(CustomKeyStoreId=store_id, KeyStorePassword=OTHER_PIN)
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    assert wait_state(kms, store_id, "CONNECTED", "FAILED")["ConnectionState"] == "CONNECTED"
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)
    raises(
        "CustomKeyStoreNotFoundException",
        kms.describe_custom_key_stores,
        CustomKeyStoreId=store_id,
    )
    removed = server.cli("clusters", "remove", "cluster-wrongpinbbbb")
    assert removed.returncode == 0, removed.stderr
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            assert OTHER_PIN.encode() not in path.read_bytes(), path


def test_custom_key_store_errors(server: RunningServer, kms: Any) -> None:
    init_token(server.data_dir, "cks-three", PIN)
    anchor = add_cluster(server, "cluster-errorscccccc", "cks-three")
    init_token(server.data_dir, "cks-four", PIN)
    other_anchor = add_cluster(server, "cluster-unrelateddddd", "cks-four")
    # The same token under a second cluster id (as a related cluster).
    assert add_cluster(server, "cluster-relatedeeeee", "cks-three") == anchor
    create = kms.create_custom_key_store
    good = {
        "CustomKeyStoreName": "store-three",
        "CloudHsmClusterId": "cluster-errorscccccc",
        "TrustAnchorCertificate": anchor,
        "KeyStorePassword": PIN,
    }
    raises(
        "CloudHsmClusterNotFoundException",
        create,
        **{**good, "CloudHsmClusterId": "cluster-nosuchclusters"},
    )
    raises(
        "IncorrectTrustAnchorException", create, **{**good, "TrustAnchorCertificate": other_anchor}
    )
    # An external key store takes no CloudHSM members (tests/test_external_key_stores.py).
    raises("ValidationException", create, **{**good, "CustomKeyStoreType": "EXTERNAL_KEY_STORE"})
    raises("ValidationException", create, **{**good, "CloudHsmClusterId": "cluster-1111111111!"})
    raises("ValidationException", create, **{**good, "CustomKeyStoreType": "NOPE"})
    short = raises("ValidationException", create, **{**good, "KeyStorePassword": "s" * 40})
    assert "s" * 40 not in short
    raises(
        "ValidationException", create, **{k: v for k, v in good.items() if k != "KeyStorePassword"}
    )
    store_id = create(**good)["CustomKeyStoreId"]
    raises(
        "CustomKeyStoreNameInUseException",
        create,
        **{
            **good,
            "CloudHsmClusterId": "cluster-unrelateddddd",
            "TrustAnchorCertificate": other_anchor,
        },
    )
    raises("CloudHsmClusterInUseException", create, **{**good, "CustomKeyStoreName": "another"})
    # One store per token, whichever of its cluster ids names it.
    raises(
        "CloudHsmClusterInUseException",
        create,
        **{**good, "CustomKeyStoreName": "another", "CloudHsmClusterId": "cluster-relatedeeeee"},
    )

    unknown = "cks-0123456789abcdef0"
    for call in (
        kms.connect_custom_key_store,
        kms.disconnect_custom_key_store,
        kms.delete_custom_key_store,
    ):
        raises("CustomKeyStoreNotFoundException", call, CustomKeyStoreId=unknown)
    raises(
        "CustomKeyStoreNotFoundException", kms.describe_custom_key_stores, CustomKeyStoreId=unknown
    )
    raises(
        "CustomKeyStoreNotFoundException", kms.describe_custom_key_stores, CustomKeyStoreName="nope"
    )
    raises(
        "CustomKeyStoreNotFoundException",
        kms.update_custom_key_store,
        CustomKeyStoreId=unknown,
        NewCustomKeyStoreName="n",
    )
    raises(
        "CustomKeyStoreNotFoundException",
        kms.create_key,
        Origin="AWS_CLOUDHSM",
        CustomKeyStoreId=unknown,
    )
    raises(
        "CustomKeyStoreNotFoundException",
        kms.generate_random,
        NumberOfBytes=8,
        CustomKeyStoreId=unknown,
    )
    raises("ValidationException", kms.create_key, Origin="AWS_CLOUDHSM")
    raises("InvalidMarkerException", kms.describe_custom_key_stores, Marker="bm90LWEtbWFya2Vy")

    update = kms.update_custom_key_store
    raises(
        "CloudHsmClusterNotRelatedException",
        update,
        CustomKeyStoreId=store_id,
        CloudHsmClusterId="cluster-unrelateddddd",
    )
    raises(
        "CloudHsmClusterNotFoundException",
        update,
        CustomKeyStoreId=store_id,
        CloudHsmClusterId="cluster-nosuchclusters",
    )
    raises("ValidationException", update, CustomKeyStoreId=store_id)
    update(CustomKeyStoreId=store_id, CloudHsmClusterId="cluster-relatedeeeee")
    assert describe(kms, store_id)["CloudHsmClusterId"] == "cluster-relatedeeeee"

    # Pagination: every store once, in pages of one.
    seen: list[str] = []
    marker: str | None = None
    while True:
        page = kms.describe_custom_key_stores(Limit=1, **({"Marker": marker} if marker else {}))
        seen += [s["CustomKeyStoreId"] for s in page["CustomKeyStores"]]
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    assert store_id in seen
    assert len(seen) == len(set(seen))
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)


def test_purge_destroys_the_material_in_the_store_token(tmp_path: Path) -> None:
    """Through the service (the clock moved past the waiting period): the purge destroys the
    key's objects in the custom key store's token — only once the store is connected — and the
    consistency check lists that token too."""
    data_dir = tmp_path / "data"
    clock = ManualClock()
    with open_system(data_dir, clock=clock, audit=None) as system:
        init_token(data_dir, "purge-tok", PIN)
        settings = settings_for(data_dir)
        anchor = trust_anchor_of(cluster_identity(settings, cluster_uri("purge-tok")))
        service = system.service
        stores = service.custom_key_stores
        stores.table.add_cluster("cluster-purgeaaaaaaa", cluster_uri("purge-tok"), anchor)
        store_id = service.create_custom_key_store(
            m.CreateCustomKeyStoreRequest(
                CustomKeyStoreName="purge",
                CloudHsmClusterId="cluster-purgeaaaaaaa",
                TrustAnchorCertificate=anchor,
                KeyStorePassword=PIN,
            )
        ).CustomKeyStoreId
        service.connect_custom_key_store(m.ConnectCustomKeyStoreRequest(CustomKeyStoreId=store_id))
        stores.wait()
        key_id = service.create_key(
            m.CreateKeyRequest(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)
        ).KeyMetadata.KeyId
        compact = key_id.replace("-", "")[:20]
        assert any(compact in label for label in token_objects(data_dir, "purge-tok", PIN))
        assert not service.find_inconsistencies().missing

        service.schedule_key_deletion(
            m.ScheduleKeyDeletionRequest(KeyId=key_id, PendingWindowInDays=7)
        )
        service.disconnect_custom_key_store(
            m.DisconnectCustomKeyStoreRequest(CustomKeyStoreId=store_id)
        )
        clock.advance(days=8)
        assert service.purge_due() == []  # the token is not connected: tried again later
        assert any(compact in label for label in token_objects(data_dir, "purge-tok", PIN))
        with pytest.raises(NotFoundException):  # gone for callers, as in AWS
            service.describe_key(m.DescribeKeyRequest(KeyId=key_id))
        with pytest.raises(CustomKeyStoreHasCMKsException):
            service.delete_custom_key_store(
                m.DeleteCustomKeyStoreRequest(CustomKeyStoreId=store_id)
            )
        service.connect_custom_key_store(m.ConnectCustomKeyStoreRequest(CustomKeyStoreId=store_id))
        stores.wait()
        assert service.purge_due() == [key_id]
        assert not any(compact in label for label in token_objects(data_dir, "purge-tok", PIN))
        service.disconnect_custom_key_store(
            m.DisconnectCustomKeyStoreRequest(CustomKeyStoreId=store_id)
        )
        service.delete_custom_key_store(m.DeleteCustomKeyStoreRequest(CustomKeyStoreId=store_id))


def test_every_worker_connects_the_store_itself(tmp_path: Path) -> None:
    """Two worker processes: the one that did not take ConnectCustomKeyStore opens the token
    itself on first use; after DisconnectCustomKeyStore (taken by either) both refuse."""
    with running_server(tmp_path / "data", workers=2) as server:
        kms = server.client()
        init_token(server.data_dir, "cks-workers", PIN)
        anchor = add_cluster(server, "cluster-workersaaaaa", "cks-workers")
        store_id = kms.create_custom_key_store(
            CustomKeyStoreName="workers",
            CloudHsmClusterId="cluster-workersaaaaa",
            TrustAnchorCertificate=anchor,
            KeyStorePassword=PIN,
        )["CustomKeyStoreId"]
        kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        assert wait_state(kms, store_id, "CONNECTED", "FAILED")["ConnectionState"] == "CONNECTED"
        key_id = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"][
            "KeyId"
        ]
        plaintext = base64.b64encode(b"both workers").decode()

        def one(_: int) -> tuple[str, int, Any]:
            resp = server.signed("TrentService.Encrypt", {"KeyId": key_id, "Plaintext": plaintext})
            return resp.headers["x-hsmkms-worker"], resp.status, resp.json()

        def spread(status: int) -> set[str]:
            pids: set[str] = set()
            deadline = time.monotonic() + 30
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                while len(pids) < 2 and time.monotonic() < deadline:
                    for pid, got, body in pool.map(one, range(32)):
                        assert got == status, (pid, got, body)
                        pids.add(pid)
            return pids

        assert len(spread(200)) == 2
        kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
        assert len(spread(400)) == 2
        assert (
            server.signed("TrentService.Encrypt", {"KeyId": key_id, "Plaintext": plaintext}).json()[
                "__type"
            ]
            == "KMSInvalidStateException"
        )


def test_connection_error_codes(tmp_path: Path) -> None:
    """FAILED with NETWORK_ERRORS when the module or the token cannot be reached, and with
    CLUSTER_NOT_FOUND when the token reached is not the one registered (another trust anchor)."""
    data_dir = tmp_path / "data"
    with open_system(data_dir, audit=None) as system:
        init_token(data_dir, "codes-a", PIN)
        init_token(data_dir, "codes-b", PIN)
        settings = settings_for(data_dir)
        anchor_b = trust_anchor_of(cluster_identity(settings, cluster_uri("codes-b")))
        service = system.service
        table = service.custom_key_stores.table
        # Registered as the table would hold them had the token changed since (the CLI checks
        # a URI when it adds it).
        table.add_cluster(
            "cluster-nomoduleaaaa", "pkcs11:token=codes-a?module-path=/nonexistent/lib.so", "x"
        )
        table.add_cluster("cluster-notokenaaaaa", cluster_uri("codes-gone"), "y")
        table.add_cluster("cluster-othertokenaa", cluster_uri("codes-a"), anchor_b)
        expected = {
            "cluster-nomoduleaaaa": ("x", "NETWORK_ERRORS"),
            "cluster-notokenaaaaa": ("y", "NETWORK_ERRORS"),
            "cluster-othertokenaa": (anchor_b, "CLUSTER_NOT_FOUND"),
        }
        for cluster_id, (anchor, code) in expected.items():
            store_id = service.create_custom_key_store(
                m.CreateCustomKeyStoreRequest(
                    CustomKeyStoreName=cluster_id,
                    CloudHsmClusterId=cluster_id,
                    TrustAnchorCertificate=anchor,
                    KeyStorePassword=PIN,
                )
            ).CustomKeyStoreId
            service.connect_custom_key_store(
                m.ConnectCustomKeyStoreRequest(CustomKeyStoreId=store_id)
            )
            service.custom_key_stores.wait(30)
            (entry,) = service.describe_custom_key_stores(
                m.DescribeCustomKeyStoresRequest(CustomKeyStoreId=store_id)
            ).CustomKeyStores
            assert entry.ConnectionState == "FAILED", cluster_id
            assert entry.ConnectionErrorCode == code, cluster_id


def test_key_store_actions_are_decided_by_identity_policies(
    server: RunningServer, kms: Any, tmp_path: Path
) -> None:
    """kms:*CustomKeyStore* are account-level: a user without an identity policy allowing them
    is refused (AccessDeniedException); one whose policy allows DescribeCustomKeyStores may
    describe but not create; the root may do everything (the other tests)."""
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "kms:DescribeCustomKeyStores", "Resource": "*"}
                ],
            }
        )
    )
    made = {}
    for name, extra in (("nobody", []), ("reader", ["--policy-file", str(path)])):
        proc = server.cli("credentials", "create", "--name", name, "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        made[name] = json.loads(proc.stdout)
    nobody = server.client(made["nobody"]["AccessKeyId"], made["nobody"]["SecretAccessKey"])
    reader = server.client(made["reader"]["AccessKeyId"], made["reader"]["SecretAccessKey"])
    raises("AccessDeniedException", nobody.describe_custom_key_stores)
    request = {
        "CustomKeyStoreName": "denied",
        "CloudHsmClusterId": "cluster-nosuchclusters",
        "TrustAnchorCertificate": "x",
        "KeyStorePassword": PIN,
    }
    raises("AccessDeniedException", nobody.create_custom_key_store, **request)
    raises("AccessDeniedException", reader.create_custom_key_store, **request)
    assert "CustomKeyStores" in reader.describe_custom_key_stores()
    raises("CloudHsmClusterNotFoundException", kms.create_custom_key_store, **request)


def test_an_abandoned_connection_attempt_is_settled(tmp_path: Path) -> None:
    """A store left CONNECTING (the process trying it ended) is set FAILED with INTERNAL_ERROR
    by the periodic work once five minutes have passed, so it can be disconnected and tried
    again; a recent CONNECTING is left alone."""
    data_dir = tmp_path / "data"
    clock = ManualClock()
    with open_system(data_dir, clock=clock, audit=None) as system:
        init_token(data_dir, "stale-tok", PIN)
        anchor = trust_anchor_of(cluster_identity(settings_for(data_dir), cluster_uri("stale-tok")))
        service = system.service
        table = service.custom_key_stores.table
        table.add_cluster("cluster-staleaaaaaaa", cluster_uri("stale-tok"), anchor)
        store_id = service.create_custom_key_store(
            m.CreateCustomKeyStoreRequest(
                CustomKeyStoreName="stale",
                CloudHsmClusterId="cluster-staleaaaaaaa",
                TrustAnchorCertificate=anchor,
                KeyStorePassword=PIN,
            )
        ).CustomKeyStoreId
        # What ConnectCustomKeyStore leaves when its process dies before the attempt ends.
        assert table.set_state(store_id, "CONNECTING", expect=("DISCONNECTED",))
        clock.advance(minutes=1)
        service.run_due_tasks()
        assert table.require(store_id).connection_state == "CONNECTING"
        clock.advance(minutes=5)
        service.run_due_tasks()
        record = table.require(store_id)
        assert record.connection_state == "FAILED"
        assert record.connection_error_code == "INTERNAL_ERROR"
        service.disconnect_custom_key_store(
            m.DisconnectCustomKeyStoreRequest(CustomKeyStoreId=store_id)
        )
        service.connect_custom_key_store(m.ConnectCustomKeyStoreRequest(CustomKeyStoreId=store_id))
        service.custom_key_stores.wait()
        assert table.require(store_id).connection_state == "CONNECTED"


def test_no_password_in_any_file_or_log(server: RunningServer) -> None:
    """Last of the module's server tests: after every call above (created, updated, refused,
    denied), no key store password is in any file of the data directory (databases, audit
    trail, token files) nor in the server's log."""
    for pin in (PIN, OTHER_PIN, "not-the-pin"):
        for path in server.data_dir.rglob("*"):
            if path.is_file():
                assert pin.encode() not in path.read_bytes(), path
        assert pin not in server.log()
