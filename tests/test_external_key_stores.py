"""External key stores end to end, hsmkms as the XKS client: two real servers on loopback,
server B the XKS proxy (a key and an XKS credential made on it), server A the KMS whose
EXTERNAL_KEY_STORE points at B; boto3 against A."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions
import pytest
from server import RunningServer, running_server
from test_api_server import self_signed

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

PREFIX = "tenant-x"
# A generous proxy timeout: the tests' servers share 2 busy cores with the rest of the suite
# (HSMKMS_XKS_TIMEOUT; the default is AWS's 250 ms).
HTTP_ENV = {"HSMKMS_XKS_ALLOW_HTTP": "1", "HSMKMS_XKS_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Server B: the XKS proxy, over http."""
    with running_server(tmp_path_factory.mktemp("xks-b") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def credential(proxy: RunningServer) -> dict[str, str]:
    made = proxy.cli("xks", "credentials", "create", "--prefix", PREFIX, "--json")
    assert made.returncode == 0, made.stderr
    found: dict[str, str] = json.loads(made.stdout)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Server A: the KMS with external key stores, http allowed."""
    with running_server(tmp_path_factory.mktemp("xks-a") / "data", env=HTTP_ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server: RunningServer) -> Any:
    return server.client()


def raises(code: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """``call(*args, **kwargs)`` fails with botocore's ClientError of ``code`` (HTTP 400)."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(*args, **kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    return str(error["Message"])


def describe(kms: Any, store_id: str) -> dict[str, Any]:
    stores = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"]
    assert len(stores) == 1
    found: dict[str, Any] = stores[0]
    return found


def wait_state(kms: Any, store_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll DescribeCustomKeyStores until the store is no longer CONNECTING."""
    deadline = time.monotonic() + timeout
    while True:
        entry = describe(kms, store_id)
        if entry["ConnectionState"] != "CONNECTING":
            return entry
        assert time.monotonic() < deadline
        time.sleep(0.05)


def create(
    kms: Any,
    name: str,
    endpoint: str,
    credential: dict[str, str],
    path: str = f"/{PREFIX}/kms/xks/v1",
    **extra: Any,
) -> str:
    store_id: str = kms.create_custom_key_store(
        CustomKeyStoreName=name,
        CustomKeyStoreType="EXTERNAL_KEY_STORE",
        XksProxyUriEndpoint=endpoint,
        XksProxyUriPath=path,
        XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyAuthenticationCredential={
            "AccessKeyId": credential["AccessKeyId"],
            "RawSecretAccessKey": credential["SecretAccessKey"],
        },
        **extra,
    )["CustomKeyStoreId"]
    return store_id


def connect(kms: Any, store_id: str) -> dict[str, Any]:
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    return wait_state(kms, store_id)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_lifecycle_of_an_external_key_store(
    proxy: RunningServer, credential: dict[str, str], server: RunningServer, kms: Any
) -> None:
    """Create -> Describe (no secret) -> Connect (B's health) -> CONNECTED -> Disconnect ->
    Delete."""
    store_id = create(kms, "ext-one", proxy.endpoint, credential)
    entry = describe(kms, store_id)
    assert entry["CustomKeyStoreType"] == "EXTERNAL_KEY_STORE"
    assert entry["ConnectionState"] == "DISCONNECTED"
    assert entry["XksProxyConfiguration"] == {
        "Connectivity": "PUBLIC_ENDPOINT",
        "AccessKeyId": credential["AccessKeyId"],
        "UriEndpoint": proxy.endpoint,
        "UriPath": f"/{PREFIX}/kms/xks/v1",
    }
    assert "CloudHsmClusterId" not in entry
    assert credential["SecretAccessKey"] not in json.dumps(entry, default=str)

    # The same endpoint and path for a second store (boto3's typed exception); the same name.
    with pytest.raises(kms.exceptions.XksProxyUriInUseException):
        create(kms, "ext-dup", proxy.endpoint, credential)
    raises("XksProxyUriInUseException", create, kms, "ext-dup", proxy.endpoint, credential)
    raises(
        "CustomKeyStoreNameInUseException",
        create,
        kms,
        "ext-one",
        proxy.endpoint,
        credential,
        path="/other/kms/xks/v1",
    )

    entry = connect(kms, store_id)
    assert entry["ConnectionState"] == "CONNECTED", entry
    assert "ConnectionErrorCode" not in entry
    # B recorded the signed health call of A's store.
    health = json.loads(
        proxy.cli("audit", "search", "--event-name", "GetHealthStatus", "--json").stdout
    )
    assert any(r["userIdentity"]["accessKeyId"] == credential["AccessKeyId"] for r in health)

    # Origin AWS_CLOUDHSM names a CloudHSM store; GenerateRandom never works here.
    raises(
        "UnsupportedOperationException",
        kms.create_key,
        Origin="AWS_CLOUDHSM",
        CustomKeyStoreId=store_id,
    )
    raises("UnsupportedOperationException", kms.generate_random, NumberOfBytes=8,
           CustomKeyStoreId=store_id)  # fmt: skip

    raises("CustomKeyStoreInvalidStateException", kms.delete_custom_key_store,
           CustomKeyStoreId=store_id)  # fmt: skip
    # botocore: a connected external store may change its name, path and credential (checked
    # with the proxy first), not its endpoint or connectivity.
    kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="ext-renamed")
    assert describe(kms, store_id)["CustomKeyStoreName"] == "ext-renamed"
    raises("CustomKeyStoreInvalidStateException", kms.update_custom_key_store,
           CustomKeyStoreId=store_id, XksProxyUriEndpoint=proxy.endpoint)  # fmt: skip
    raises("CustomKeyStoreInvalidStateException", kms.update_custom_key_store,
           CustomKeyStoreId=store_id, XksProxyConnectivity="PUBLIC_ENDPOINT")  # fmt: skip
    wrong = {"AccessKeyId": credential["AccessKeyId"], "RawSecretAccessKey": "B" * 48}
    raises("XksProxyIncorrectAuthenticationCredentialException", kms.update_custom_key_store,
           CustomKeyStoreId=store_id, XksProxyAuthenticationCredential=wrong)  # fmt: skip
    raises("XksProxyInvalidConfigurationException", kms.update_custom_key_store,
           CustomKeyStoreId=store_id, XksProxyUriPath="/nobody/kms/xks/v1")  # fmt: skip
    entry = describe(kms, store_id)
    assert entry["ConnectionState"] == "CONNECTED", entry
    assert entry["XksProxyConfiguration"]["UriPath"] == f"/{PREFIX}/kms/xks/v1"
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert describe(kms, store_id)["ConnectionState"] == "DISCONNECTED"

    # Rotate the credential (a second one of the prefix on B) while DISCONNECTED.
    second = json.loads(
        proxy.cli("xks", "credentials", "create", "--prefix", PREFIX, "--json").stdout
    )
    kms.update_custom_key_store(
        CustomKeyStoreId=store_id,
        XksProxyAuthenticationCredential={
            "AccessKeyId": second["AccessKeyId"],
            "RawSecretAccessKey": second["SecretAccessKey"],
        },
    )
    entry = describe(kms, store_id)
    assert entry["XksProxyConfiguration"]["AccessKeyId"] == second["AccessKeyId"]
    assert entry["XksProxyConfiguration"]["UriPath"] == f"/{PREFIX}/kms/xks/v1"
    assert connect(kms, store_id)["ConnectionState"] == "CONNECTED"
    # Back to the first credential while CONNECTED: the proxy accepts it, so the update does.
    kms.update_custom_key_store(
        CustomKeyStoreId=store_id,
        XksProxyAuthenticationCredential={
            "AccessKeyId": credential["AccessKeyId"],
            "RawSecretAccessKey": credential["SecretAccessKey"],
        },
    )
    entry = describe(kms, store_id)
    assert entry["XksProxyConfiguration"]["AccessKeyId"] == credential["AccessKeyId"]
    assert entry["ConnectionState"] == "CONNECTED"
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    raises("ValidationException", kms.update_custom_key_store,
           CustomKeyStoreId=store_id, XksProxyUriPath="/kms/xks/other")  # fmt: skip
    raises("ValidationException", kms.update_custom_key_store,
           CustomKeyStoreId=store_id, KeyStorePassword="some-password")  # fmt: skip
    kms.update_custom_key_store(CustomKeyStoreId=store_id, XksProxyUriPath="/nobody/kms/xks/v1")
    entry = connect(kms, store_id)
    assert entry["ConnectionErrorCode"] == "XKS_PROXY_INVALID_CONFIGURATION", entry
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    proxy.cli("xks", "credentials", "delete", second["AccessKeyId"])
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)
    raises("CustomKeyStoreNotFoundException", kms.describe_custom_key_stores,
           CustomKeyStoreId=store_id)  # fmt: skip


def test_keys_in_an_external_key_store_are_double_encrypted(
    proxy: RunningServer, credential: dict[str, str], server: RunningServer, kms: Any
) -> None:
    """CreateKey with XksKeyId = a key of B; Encrypt/Decrypt/GenerateDataKey/ReEncrypt on A;
    B's key disabled -> A's Decrypt fails; B alone cannot decrypt A's blob."""
    kms_b = proxy.client()
    b_key = kms_b.create_key()["KeyMetadata"]["KeyId"]
    # A prefix of its own: this store keeps its key (and so its URI) to the end.
    made = proxy.cli("xks", "credentials", "create", "--prefix", "tenant-keys", "--json")
    own = json.loads(made.stdout)
    store_id = create(kms, "ext-keys", proxy.endpoint, own, path=own["UriPath"])
    # Not connected yet.
    raises("CustomKeyStoreInvalidStateException", kms.create_key, Origin="EXTERNAL_KEY_STORE",
           CustomKeyStoreId=store_id, XksKeyId=b_key)  # fmt: skip
    assert connect(kms, store_id)["ConnectionState"] == "CONNECTED"
    raises("ValidationException", kms.create_key, Origin="EXTERNAL_KEY_STORE",
           CustomKeyStoreId=store_id)  # fmt: skip
    raises("ValidationException", kms.create_key, Origin="EXTERNAL_KEY_STORE",
           CustomKeyStoreId=store_id, XksKeyId="bad key id")  # fmt: skip
    raises("XksKeyNotFoundException", kms.create_key, Origin="EXTERNAL_KEY_STORE",
           CustomKeyStoreId=store_id, XksKeyId="no-such-key")  # fmt: skip
    raises("UnsupportedOperationException", kms.create_key, Origin="EXTERNAL_KEY_STORE",
           CustomKeyStoreId=store_id, XksKeyId=b_key, KeySpec="HMAC_256",
           KeyUsage="GENERATE_VERIFY_MAC")  # fmt: skip

    meta = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId=b_key)[
        "KeyMetadata"
    ]
    assert meta["Origin"] == "EXTERNAL_KEY_STORE"
    assert meta["CustomKeyStoreId"] == store_id
    assert meta["XksKeyConfiguration"] == {"Id": b_key}
    key_id = meta["KeyId"]
    raises("XksKeyAlreadyInUseException", kms.create_key, Origin="EXTERNAL_KEY_STORE",
           CustomKeyStoreId=store_id, XksKeyId=b_key)  # fmt: skip
    raises("UnsupportedOperationException", kms.enable_key_rotation, KeyId=key_id)

    context = {"purpose": "xks-test"}
    encrypted = kms.encrypt(KeyId=key_id, Plaintext=b"double", EncryptionContext=context)
    blob = encrypted["CiphertextBlob"]
    encrypt_request_id = encrypted["ResponseMetadata"]["RequestId"]
    assert blob[0] == 2
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"double"
    raises("InvalidCiphertextException", kms.decrypt, CiphertextBlob=blob,
           EncryptionContext={"purpose": "other"})  # fmt: skip
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    raises("InvalidCiphertextException", kms.decrypt, CiphertextBlob=tampered,
           EncryptionContext=context)  # fmt: skip
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert (
        kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    )
    plain_key = kms.create_key()["KeyMetadata"]["KeyId"]
    moved = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext=context,
        DestinationKeyId=plain_key,
    )["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=moved)["Plaintext"] == b"double"
    back = kms.re_encrypt(CiphertextBlob=moved, DestinationKeyId=key_id)["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=back)["Plaintext"] == b"double"

    # A's audit trail names the key store; B's records name A's caller and key.
    for name in ("Encrypt", "Decrypt"):
        search = server.cli("audit", "search", "--event-name", name, "--json")
        assert search.returncode == 0, search.stderr
        assert any(
            (r.get("additionalEventData") or {}).get("customKeyStoreId") == store_id
            for r in json.loads(search.stdout)
            if r.get("errorCode") is None
        ), name
    # B's record of A's Encrypt carries the request id A answered with (kmsRequestId).
    on_b = json.loads(proxy.cli("audit", "search", "--event-name", "Encrypt", "--json").stdout)
    assert any(
        r["requestParameters"].get("kmsKeyArn") == meta["Arn"]
        and r["requestParameters"].get("kmsOperation") == "Encrypt"
        and r["requestParameters"].get("kmsRequestId") == encrypt_request_id
        and r["requestParameters"].get("awsPrincipalArn", "").startswith("arn:aws:iam::")
        for r in on_b
    ), on_b[-1:]

    # The credential rotated while CONNECTED (no downtime): B's old credential deleted, A's
    # keys still work, so A signs with the new one.
    newer = json.loads(
        proxy.cli("xks", "credentials", "create", "--prefix", "tenant-keys", "--json").stdout
    )
    kms.update_custom_key_store(
        CustomKeyStoreId=store_id,
        XksProxyAuthenticationCredential={
            "AccessKeyId": newer["AccessKeyId"],
            "RawSecretAccessKey": newer["SecretAccessKey"],
        },
    )
    assert proxy.cli("xks", "credentials", "delete", own["AccessKeyId"]).returncode == 0
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"double"

    # B alone cannot decrypt A's blob.
    raises("InvalidCiphertextException", kms_b.decrypt, CiphertextBlob=blob,
           EncryptionContext=context)  # fmt: skip
    # B's key disabled: A's key cannot decrypt nor encrypt.
    kms_b.disable_key(KeyId=b_key)
    raises("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob, EncryptionContext=context)
    raises("KMSInvalidStateException", kms.encrypt, KeyId=key_id, Plaintext=b"x")
    kms_b.enable_key(KeyId=b_key)
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"double"

    # Disconnected: KMSInvalidStateException; the store keeps its key.
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    raises("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob, EncryptionContext=context)
    raises("CustomKeyStoreHasCMKsException", kms.delete_custom_key_store,
           CustomKeyStoreId=store_id)  # fmt: skip
    kms_b.close()


def test_a_proxy_gone_makes_the_keys_unavailable(tmp_path: Path, kms: Any) -> None:
    """A CONNECTED store whose proxy stops: its key's calls fail with a typed error
    (KeyUnavailableException), never a traceback; the proxy back, they work again."""
    data = tmp_path / "b2"
    with running_server(data) as gone:
        made = json.loads(
            gone.cli("xks", "credentials", "create", "--prefix", "gone", "--json").stdout
        )
        b_key = gone.client().create_key()["KeyMetadata"]["KeyId"]
        store_id = create(kms, "ext-gone", gone.endpoint, made, path=made["UriPath"])
        assert connect(kms, store_id)["ConnectionState"] == "CONNECTED"
        key_id = kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId=b_key
        )["KeyMetadata"]["KeyId"]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"soon gone")["CiphertextBlob"]
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.decrypt(CiphertextBlob=blob)
    assert info.value.response["Error"]["Code"] == "KeyUnavailableException"
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.encrypt(KeyId=key_id, Plaintext=b"x")
    assert info.value.response["Error"]["Code"] == "KeyUnavailableException"


def test_connection_failures_have_the_aws_error_codes(
    proxy: RunningServer, credential: dict[str, str], kms: Any
) -> None:
    wrong = dict(credential, SecretAccessKey="A" * 48)
    cases = [
        ("ext-denied", proxy.endpoint, wrong, f"/{PREFIX}/kms/xks/v1", "XKS_PROXY_ACCESS_DENIED"),
        (
            "ext-unreachable",
            f"http://127.0.0.1:{free_port()}",
            credential,
            f"/{PREFIX}/kms/xks/v1",
            "XKS_PROXY_NOT_REACHABLE",
        ),
        (
            "ext-badpath",
            proxy.endpoint,
            credential,
            "/nobody/kms/xks/v1",
            "XKS_PROXY_INVALID_CONFIGURATION",
        ),
    ]
    for name, endpoint, cred, path, code in cases:
        store_id = create(kms, name, endpoint, cred, path=path)
        entry = connect(kms, store_id)
        assert entry["ConnectionState"] == "FAILED", (name, entry)
        assert entry["ConnectionErrorCode"] == code, (name, entry)
        # spec: AWS KMS ConnectCustomKeyStore — a FAILED store must be disconnected first.
        raises("CustomKeyStoreInvalidStateException", kms.connect_custom_key_store,
               CustomKeyStoreId=store_id)  # fmt: skip
        kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
        kms.delete_custom_key_store(CustomKeyStoreId=store_id)


def test_bad_requests_are_refused_with_aws_errors(
    proxy: RunningServer, credential: dict[str, str], kms: Any
) -> None:
    base: dict[str, Any] = {
        "CustomKeyStoreName": "ext-bad",
        "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
        "XksProxyUriEndpoint": proxy.endpoint,
        "XksProxyUriPath": f"/{PREFIX}/kms/xks/v1",
        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
        "XksProxyAuthenticationCredential": {
            "AccessKeyId": credential["AccessKeyId"],
            "RawSecretAccessKey": credential["SecretAccessKey"],
        },
    }
    short_secret = {"AccessKeyId": credential["AccessKeyId"], "RawSecretAccessKey": "!" * 43}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("ValidationException", {"XksProxyUriEndpoint": proxy.endpoint + "/path"}),
        ("ValidationException", {"XksProxyUriEndpoint": "ftp://example.com"}),
        ("ValidationException", {"XksProxyUriPath": "/tenant-x/kms/xks/v1/extra"}),
        ("ValidationException", {"XksProxyUriPath": "/tenant-x/kms/other"}),
        ("ValidationException", {"XksProxyConnectivity": "SOMETHING"}),
        ("UnsupportedOperationException", {"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE"}),
        (
            "ValidationException",
            {"XksProxyAuthenticationCredential": dict(short_secret, AccessKeyId="lowercase1" * 3)},
        ),
        ("ValidationException", {"XksProxyAuthenticationCredential": short_secret}),
        ("ValidationException", {"KeyStorePassword": "some-password"}),
        ("ValidationException", {"CloudHsmClusterId": "cluster-abcdefghijk"}),
    ]
    for code, change in cases:
        raises(code, kms.create_custom_key_store, **{**base, **change})
    assert not [
        s
        for s in kms.describe_custom_key_stores()["CustomKeyStores"]
        if s["CustomKeyStoreName"] == "ext-bad"
    ]


def test_http_needs_the_opt_in(
    tmp_path: Path, proxy: RunningServer, credential: dict[str, str]
) -> None:
    """Without HSMKMS_XKS_ALLOW_HTTP an http:// endpoint is refused (AWS: https only)."""
    with running_server(tmp_path / "data") as strict:
        kms = strict.client()
        message = raises(
            "XksProxyInvalidConfigurationException", create, kms, "ext-http", proxy.endpoint,
            credential,
        )  # fmt: skip
        assert "HSMKMS_XKS_ALLOW_HTTP" in message
        kms.close()


def test_tls_is_verified_against_the_ca_bundle(tmp_path: Path) -> None:
    """B over https: A connects when given B's certificate as HSMKMS_XKS_CA_BUNDLE, and fails
    with XKS_PROXY_INVALID_TLS_CONFIGURATION without it."""
    cert, key = self_signed(tmp_path)
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with running_server(tmp_path / "b", args=args, ca_file=cert) as tls_proxy:
        made = tls_proxy.cli("xks", "credentials", "create", "--prefix", PREFIX, "--json")
        cred = json.loads(made.stdout)
        endpoint = tls_proxy.endpoint
        assert endpoint.startswith("https://")
        with running_server(tmp_path / "a", env={"HSMKMS_XKS_CA_BUNDLE": str(cert)}) as good:
            kms = good.client()
            store_id = create(kms, "ext-tls", endpoint, cred)
            assert connect(kms, store_id)["ConnectionState"] == "CONNECTED"
            kms.close()
        with running_server(tmp_path / "c") as plain:
            kms = plain.client()
            store_id = create(kms, "ext-tls", endpoint, cred)
            entry = connect(kms, store_id)
            assert entry["ConnectionState"] == "FAILED"
            assert entry["ConnectionErrorCode"] == "XKS_PROXY_INVALID_TLS_CONFIGURATION"
            kms.close()


class _GatedRelay:
    """An HTTP relay in front of B that holds the XKS encrypt calls while ``gate`` is closed
    (``arrived`` says one is held): a proxy as slow as the test wants."""

    def __init__(self, target: str) -> None:
        self.arrived = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        relay = self
        target_port = urlsplit(target).port

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.endswith("/encrypt") and not relay.gate.is_set():
                    relay.arrived.set()
                    relay.gate.wait(30)
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                conn.request("POST", self.path, body=body, headers=dict(self.headers.items()))
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_slow_proxy_does_not_hold_the_other_requests(
    proxy: RunningServer, server: RunningServer, kms: Any
) -> None:
    """An Encrypt waiting on an external key store's proxy waits on a thread, not on the
    worker's event loop: an Encrypt with a key of the default token, sent to the same (single)
    worker meanwhile, is answered while the proxy still holds the first one; then the first
    one completes."""
    relay = _GatedRelay(proxy.endpoint)
    try:
        b_key = proxy.client().create_key()["KeyMetadata"]["KeyId"]
        own = json.loads(
            proxy.cli("xks", "credentials", "create", "--prefix", "tenant-gate", "--json").stdout
        )
        store_id = create(kms, "ext-gated", relay.endpoint, own, path=own["UriPath"])
        assert connect(kms, store_id)["ConnectionState"] == "CONNECTED"
        key_id = kms.create_key(
            Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store_id, XksKeyId=b_key
        )["KeyMetadata"]["KeyId"]
        local_key = kms.create_key()["KeyMetadata"]["KeyId"]

        relay.gate.clear()
        held: dict[str, Any] = {}
        slow = threading.Thread(
            target=lambda: held.update(kms.encrypt(KeyId=key_id, Plaintext=b"slow")), daemon=True
        )
        slow.start()
        assert relay.arrived.wait(30), "the external Encrypt never reached the proxy"
        other = server.client()  # a client (connection) of its own
        quick: dict[str, Any] = {}
        fast = threading.Thread(
            target=lambda: quick.update(other.encrypt(KeyId=local_key, Plaintext=b"quick")),
            daemon=True,
        )
        fast.start()
        # A liveness bound far above an Encrypt's latency and below the proxy timeout (10 s):
        # with the call on the loop, the quick Encrypt could not be answered before the gate
        # opens.
        fast.join(8)
        answered_while_held = "CiphertextBlob" in quick and not relay.gate.is_set()
        relay.gate.set()
        slow.join(30)
        fast.join(30)
        assert answered_while_held
        assert held["CiphertextBlob"][0] == 2
        assert kms.decrypt(CiphertextBlob=held["CiphertextBlob"])["Plaintext"] == b"slow"
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
        kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    finally:
        relay.close()


def test_the_secret_is_in_no_file_or_log(server: RunningServer, credential: dict[str, str]) -> None:
    """Last of the module's server tests: A's database, audit trail and log never hold B's
    secret access key (nor its base64)."""
    secret = credential["SecretAccessKey"].encode()
    for path in server.data_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    assert credential["SecretAccessKey"] not in server.log()
    assert b"RawSecretAccessKey" not in b"".join(
        p.read_bytes() for p in server.data_dir.rglob("*") if p.is_file()
    )
