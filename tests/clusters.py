"""Further SoftHSM2 tokens for custom key stores (AWS_CLOUDHSM): made in a data directory's own
SoftHSM2 configuration, registered with ``hsmkms clusters add``; and a server with custom key
stores of every kind and state an auditor should see (:func:`make_key_stores`)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from server import RunningServer

from hsmkms.softhsm import CONF_NAME, find_module


def cluster_uri(label: str) -> str:
    """The PKCS#11 URI of the token labelled ``label`` on the SoftHSM2 module."""
    return f"pkcs11:token={label}?module-path={find_module()}"


def init_token(data_dir: Path, label: str, pin: str) -> None:
    """A new SoftHSM2 token ``label`` with user PIN ``pin`` in ``data_dir``'s configuration."""
    util = shutil.which("softhsm2-util")
    assert util is not None, "softhsm2-util is needed"
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin,
         "--so-pin", secrets.token_hex(8)],
        env={**os.environ, "SOFTHSM2_CONF": str(data_dir / CONF_NAME)},
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip


def add_cluster(server: RunningServer, cluster_id: str, label: str) -> str:
    """``hsmkms clusters add`` for the token ``label``: its trust anchor."""
    result = server.cli(
        "clusters", "add", "--cluster-id", cluster_id, "--pkcs11-uri", cluster_uri(label), "--json"
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, str] = json.loads(result.stdout)
    assert found["CloudHsmClusterId"] == cluster_id
    return found["TrustAnchorCertificate"]


XKS_PREFIX = "audit-xks"
XKS_ENV = {"HSMKMS_XKS_ALLOW_HTTP": "1", "HSMKMS_XKS_TIMEOUT": "5"}
"""What a server with an external key store over http needs (a generous proxy timeout: the
tests' servers share busy cores)."""


@dataclasses.dataclass(frozen=True)
class KeyStoreSet:
    """Custom key stores of every kind in one server (:func:`make_key_stores`)."""

    cloudhsm: str
    """An AWS_CLOUDHSM store, CONNECTED, on cluster ``cluster_id`` (token ``label``)."""
    cluster_id: str
    label: str
    anchor: str
    cloudhsm_key: str
    failed: str
    """An AWS_CLOUDHSM store whose password is wrong: FAILED, INVALID_CREDENTIALS."""
    failed_cluster_id: str
    external: str
    """An EXTERNAL_KEY_STORE, CONNECTED, through ``proxy_endpoint`` + ``proxy_path``."""
    proxy_endpoint: str
    proxy_path: str
    xks_access_key_id: str
    xks_key_id: str
    external_key: str
    secrets: tuple[str, ...] = dataclasses.field(repr=False)
    """The store passwords (right and wrong) and the XKS secret access key: never shown."""


def wait_connection(kms: Any, store_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """DescribeCustomKeyStores' entry of ``store_id`` once it is no longer CONNECTING."""
    deadline = time.monotonic() + timeout
    while True:
        (entry,) = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"]
        if entry["ConnectionState"] != "CONNECTING":
            found: dict[str, Any] = entry
            return found
        assert time.monotonic() < deadline, entry
        time.sleep(0.05)


def make_key_stores(server: RunningServer, proxy: RunningServer, tag: str) -> KeyStoreSet:
    """In ``server`` (started with :data:`XKS_ENV`): a CONNECTED AWS_CLOUDHSM store on a new
    SoftHSM2 token with a key, a FAILED one (wrong password) on another token, and a CONNECTED
    EXTERNAL_KEY_STORE whose proxy is ``proxy`` with a key. ``tag``: 4-8 letters a-z making
    the names, labels and cluster ids unique."""
    kms = server.client()
    pin, wrong = f"pin-{secrets.token_hex(8)}", f"wrong-{secrets.token_hex(8)}"
    label, bad_label = f"{tag}-vault", f"{tag}-broken"
    cluster_id, bad_cluster_id = f"cluster-{tag}vaultxx", f"cluster-{tag}brokenx"
    init_token(server.data_dir, label, pin)
    init_token(server.data_dir, bad_label, secrets.token_hex(8))
    anchor = add_cluster(server, cluster_id, label)
    bad_anchor = add_cluster(server, bad_cluster_id, bad_label)

    cloudhsm = kms.create_custom_key_store(
        CustomKeyStoreName=f"{tag} vault",
        CloudHsmClusterId=cluster_id,
        TrustAnchorCertificate=anchor,
        KeyStorePassword=pin,
    )["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=cloudhsm)
    assert wait_connection(kms, cloudhsm)["ConnectionState"] == "CONNECTED"
    cloudhsm_key = kms.create_key(
        Origin="AWS_CLOUDHSM", CustomKeyStoreId=cloudhsm, Description=f"{tag} in the vault"
    )["KeyMetadata"]["KeyId"]

    failed = kms.create_custom_key_store(
        CustomKeyStoreName=f"{tag} broken",
        CloudHsmClusterId=bad_cluster_id,
        TrustAnchorCertificate=bad_anchor,
        KeyStorePassword=wrong,
    )["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=failed)
    entry = wait_connection(kms, failed)
    assert entry["ConnectionState"] == "FAILED", entry
    assert entry["ConnectionErrorCode"] == "INVALID_CREDENTIALS", entry

    made = proxy.cli("xks", "credentials", "create", "--prefix", f"{XKS_PREFIX}-{tag}", "--json")
    assert made.returncode == 0, made.stderr
    credential = json.loads(made.stdout)
    xks_key_id = proxy.client().create_key(Description="the external key")["KeyMetadata"]["KeyId"]
    path = f"/{XKS_PREFIX}-{tag}/kms/xks/v1"
    external = kms.create_custom_key_store(
        CustomKeyStoreName=f"{tag} outside",
        CustomKeyStoreType="EXTERNAL_KEY_STORE",
        XksProxyUriEndpoint=proxy.endpoint,
        XksProxyUriPath=path,
        XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyAuthenticationCredential={
            "AccessKeyId": credential["AccessKeyId"],
            "RawSecretAccessKey": credential["SecretAccessKey"],
        },
    )["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=external)
    assert wait_connection(kms, external)["ConnectionState"] == "CONNECTED"
    external_key = kms.create_key(
        Origin="EXTERNAL_KEY_STORE",
        CustomKeyStoreId=external,
        XksKeyId=xks_key_id,
        Description=f"{tag} outside",
    )["KeyMetadata"]["KeyId"]
    for key_id in (cloudhsm_key, external_key):
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"kept elsewhere")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept elsewhere"
    return KeyStoreSet(
        cloudhsm=cloudhsm,
        cluster_id=cluster_id,
        label=label,
        anchor=anchor,
        cloudhsm_key=cloudhsm_key,
        failed=failed,
        failed_cluster_id=bad_cluster_id,
        external=external,
        proxy_endpoint=proxy.endpoint,
        proxy_path=path,
        xks_access_key_id=credential["AccessKeyId"],
        xks_key_id=xks_key_id,
        external_key=external_key,
        secrets=(pin, wrong, credential["SecretAccessKey"]),
    )
