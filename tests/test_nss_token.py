"""hsmkms on a second PKCS#11 vendor: the NSS softokn (Mozilla's software token), reached through
p11-kit-proxy, through the real server and boto3.

NSS differs from SoftHSM2 where it matters: it keeps no token data objects (the anchors ride
on a secret key's label instead), its single-part AES-GCM fails (the portable CBC+HMAC profile
is chosen by the probe), and it answers a failed HMAC or signature check with CKR_DEVICE_ERROR
(a failed check, not a device away: InvalidCiphertextException, KMSInvalidMacException,
KMSInvalidSignatureException, and the service stays up).

The token and its fixtures: tests/nss.py (a fresh NSS database per module; skipped, saying
why, where ci/bootstrap.sh could not register it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nss
import pytest
from botocore.exceptions import ClientError
from server import RunningServer, run_cli, running_server

pytestmark = [pytest.mark.server, pytest.mark.nss, pytest.mark.slow]

# The fixtures of tests/nss.py, used here.
nss_token = nss.nss_token
nss_uri = nss.nss_uri
nss_server = nss.nss_server


def _code(call: object) -> str:
    with pytest.raises(ClientError) as failed:
        call()  # type: ignore[operator]
    return str(failed.value.response["Error"]["Code"])


def test_symmetric_keys_on_nss_with_aws_errors_for_bad_ciphertexts(
    nss_server: RunningServer,
) -> None:
    kms = nss_server.client()
    key_id = kms.create_key(Description="on NSS")["KeyMetadata"]["KeyId"]
    context = {"purpose": "nss"}
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"hello nss", EncryptionContext=context)[
        "CiphertextBlob"
    ]
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"hello nss"
    tampered = bytearray(blob)
    tampered[-5] ^= 1
    assert _code(
        lambda: kms.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext=context)
    ) == ("InvalidCiphertextException")
    assert _code(lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext={"purpose": "x"})) == (
        "InvalidCiphertextException"
    )
    # The service is still up after the failed checks (NSS said CKR_DEVICE_ERROR for them).
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    assert (
        kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
        == (data_key["Plaintext"])
    )
    kms.rotate_key_on_demand(KeyId=key_id)
    assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"hello nss"
    assert len(kms.generate_random(NumberOfBytes=64)["Plaintext"]) == 64


def test_mac_and_signing_keys_on_nss(nss_server: RunningServer) -> None:
    kms = nss_server.client()
    mac_key = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    mac = kms.generate_mac(KeyId=mac_key["KeyId"], Message=b"m", MacAlgorithm="HMAC_SHA_256")
    assert kms.verify_mac(
        KeyId=mac_key["KeyId"], Message=b"m", MacAlgorithm="HMAC_SHA_256", Mac=mac["Mac"]
    )["MacValid"]
    assert (
        _code(
            lambda: kms.verify_mac(
                KeyId=mac_key["KeyId"], Message=b"n", MacAlgorithm="HMAC_SHA_256", Mac=mac["Mac"]
            )
        )
        == "KMSInvalidMacException"
    )
    for spec, algorithm in (("RSA_2048", "RSASSA_PSS_SHA_256"), ("ECC_NIST_P256", "ECDSA_SHA_256")):
        key_id = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
        signature = kms.sign(KeyId=key_id, Message=b"m", SigningAlgorithm=algorithm)["Signature"]
        assert kms.verify(
            KeyId=key_id, Message=b"m", Signature=signature, SigningAlgorithm=algorithm
        )["SignatureValid"]
        assert (
            _code(
                lambda key_id=key_id, signature=signature, algorithm=algorithm: kms.verify(
                    KeyId=key_id, Message=b"n", Signature=signature, SigningAlgorithm=algorithm
                )
            )
            == "KMSInvalidSignatureException"
        )


def test_doctor_report_and_audit_on_nss(nss_server: RunningServer, nss_uri: str) -> None:
    """The anchors live on NSS (no data objects there): the audit trail verifies, doctor finds
    the keys in the token and says which profile the probe chose."""
    kms = nss_server.client()
    kms.create_key(Description="doctor on NSS")
    env = {"HSMKMS_PKCS11_URI": nss_uri}
    where = ("--data-dir", str(nss_server.data_dir))
    doctor = run_cli("doctor", "--json", *where, env=env)
    assert doctor.returncode == 0, doctor.stderr
    found = json.loads(doctor.stdout)
    assert found["token_label"] == "NSS Certificate DB"
    assert found["profile"] == "AES_256_CBC_HMAC_SHA_256"
    verify = run_cli("audit", "verify", *where, env=env)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith("audit trail intact")


def test_a_custom_key_store_on_nss_beside_a_softhsm_default_token(
    nss_token: tuple[str, str], tmp_path: Path
) -> None:
    """The other direction: the default token is SoftHSM2, and the NSS token is registered as
    the cluster of an AWS_CLOUDHSM custom key store (both modules in one process)."""
    uri, pin = nss_token
    with running_server(tmp_path / "data") as server:
        added = server.cli(
            "clusters", "add", "--cluster-id", "cluster-nsssoftokn22", "--pkcs11-uri", uri, "--json"
        )
        assert added.returncode == 0, added.stderr
        anchor = json.loads(added.stdout)["TrustAnchorCertificate"]
        kms = server.client()
        store_id = kms.create_custom_key_store(
            CustomKeyStoreName="on-nss",
            CloudHsmClusterId="cluster-nsssoftokn22",
            TrustAnchorCertificate=anchor,
            KeyStorePassword=pin,
        )["CustomKeyStoreId"]
        kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        deadline = time.monotonic() + 30
        while True:
            (entry,) = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"]
            if entry["ConnectionState"] != "CONNECTING":
                break
            assert time.monotonic() < deadline, "still CONNECTING"
            time.sleep(0.1)
        assert entry["ConnectionState"] == "CONNECTED", entry
        key_id = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"][
            "KeyId"
        ]
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"in NSS")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"in NSS"
        tampered = bytearray(blob)
        tampered[-3] ^= 1
        assert _code(lambda: kms.decrypt(CiphertextBlob=bytes(tampered))) == (
            "InvalidCiphertextException"
        )
        random = kms.generate_random(NumberOfBytes=16, CustomKeyStoreId=store_id)["Plaintext"]
        assert len(random) == 16
        assert pin not in server.log()
