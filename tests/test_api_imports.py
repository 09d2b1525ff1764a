"""Imported key material end to end through the real server: boto3 (and the AWS CLI) wrap key
material offline with ``cryptography`` against the public key GetParametersForImport returns,
import it, and use the key; the token objects are read back from the server's token; the
material, the wrapped material and the import token appear in no log, database or audit
record."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from server import RunningServer, clean_env, running_server

from conftest import token_config
from hsmkms.ciphertext import CiphertextBlob
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.pkcs11 import Pkcs11Keystore

pytestmark = [pytest.mark.server, pytest.mark.hsm]

SHA1_ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1")
# Every secret a test of this module handled: none may show up in a log, database or record.
SECRETS: list[bytes] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("imports") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture(scope="module")
def token(server: RunningServer) -> Iterator[Pkcs11Keystore]:
    """The server's own token, opened by this process (SoftHSM2 serves several processes)."""
    keystore = Pkcs11Keystore(token_config(server.data_dir, "hsmkms"))
    yield keystore
    keystore.close()


def raises(code: str, call: Callable[..., Any], **kwargs: Any) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message: str = error.get("Message", "")
    return message


def secret(value: bytes) -> bytes:
    SECRETS.append(value)
    return value


def wrap(public_der: bytes, algorithm: str, material: bytes) -> bytes:
    """What an AWS KMS client does with the public key (reference/xks-and-key-stores.md §3)."""
    public = serialization.load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    sha1 = algorithm.endswith("_SHA_1")
    digest: hashes.HashAlgorithm = hashes.SHA1() if sha1 else hashes.SHA256()  # noqa: S303
    oaep = padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)
    ephemeral = secret(os.urandom(32))
    return public.encrypt(ephemeral, oaep) + keywrap.aes_key_wrap_with_padding(ephemeral, material)


def import_material(
    kms: Any, key_id: str, material: bytes, algorithm: str = "RSAES_OAEP_SHA_1", **kwargs: Any
) -> dict[str, Any]:
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048"
    )
    secret(params["ImportToken"])
    wrapped = secret(wrap(params["PublicKey"], algorithm, material))
    kwargs.setdefault("ExpirationModel", "KEY_MATERIAL_DOES_NOT_EXPIRE")
    result: dict[str, Any] = kms.import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped, **kwargs
    )
    return result


def offline_decrypt(material: bytes, blob: bytes) -> bytes:
    parsed = CiphertextBlob.parse(blob)
    return AESGCM(material).decrypt(parsed.iv, parsed.body, parsed.aad({}))


def version_refs(server: RunningServer, key_id: str) -> list[KeyMaterialRef]:
    with sqlite3.connect(server.data_dir / "hsmkms.db") as conn:
        rows = conn.execute(
            "SELECT material_ref FROM key_versions WHERE key_id = ? ORDER BY version", (key_id,)
        ).fetchall()
    conn.close()
    return [KeyMaterialRef.from_str(text) for (text,) in rows]


# -- the whole flow --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", SHA1_ALGORITHMS)
def test_import_use_delete_and_reimport(kms: Any, algorithm: str) -> None:
    key = kms.create_key(Origin="EXTERNAL", Description="byok")["KeyMetadata"]
    key_id = key["KeyId"]
    assert (key["Origin"], key["KeyState"], key["Enabled"]) == ("EXTERNAL", "PendingImport", False)
    assert "pending import" in raises("KMSInvalidStateException", kms.encrypt, KeyId=key_id,
                                      Plaintext=b"x")  # fmt: skip
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048"
    )
    assert params["KeyId"] == key["Arn"]
    valid_for = params["ParametersValidTo"] - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23, minutes=59) < valid_for <= dt.timedelta(hours=24)
    material = secret(os.urandom(32))
    wrapped = secret(wrap(params["PublicKey"], algorithm, material))
    secret(params["ImportToken"])
    imported = kms.import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    described = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert described["KeyState"] == "Enabled"
    assert described["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    assert "ValidTo" not in described
    assert imported["KeyMaterialId"] == described["CurrentKeyMaterialId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"imported, end to end")["CiphertextBlob"]
    assert offline_decrypt(material, blob) == b"imported, end to end"
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported, end to end"

    deleted = kms.delete_imported_key_material(KeyId=key_id)
    assert deleted["KeyMaterialId"] == imported["KeyMaterialId"]
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"
    raises("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)
    raises(
        "IncorrectKeyMaterialException", import_material, kms=kms, key_id=key_id,
        material=os.urandom(32),
    )  # fmt: skip
    other = "RSA_AES_KEY_WRAP_SHA_1" if algorithm == "RSAES_OAEP_SHA_1" else "RSAES_OAEP_SHA_1"
    again = import_material(kms, key_id, material, other)
    assert again["KeyMaterialId"] == imported["KeyMaterialId"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported, end to end"


def test_expiring_material(kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    message = raises(
        "ValidationException", import_material, kms=kms, key_id=key_id,
        material=os.urandom(32), ExpirationModel="KEY_MATERIAL_EXPIRES",
    )  # fmt: skip
    assert message == "A validTo date must be set if the ExpirationModel is KEY_MATERIAL_EXPIRES"
    valid_to = (dt.datetime.now(dt.UTC) + dt.timedelta(days=10)).replace(microsecond=0)
    raises(
        "ValidationException", import_material, kms=kms, key_id=key_id, material=os.urandom(32),
        ValidTo=valid_to + dt.timedelta(days=400), ExpirationModel="KEY_MATERIAL_EXPIRES",
    )  # fmt: skip
    import_material(
        kms, key_id, secret(os.urandom(32)), ExpirationModel="KEY_MATERIAL_EXPIRES",
        ValidTo=valid_to,
    )  # fmt: skip
    described = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert described["ExpirationModel"] == "KEY_MATERIAL_EXPIRES"
    assert described["ValidTo"] == valid_to


def test_sha_256_wrapping_is_refused_on_this_token(kms: Any) -> None:
    """Measured: SoftHSM 2.6.1 unwraps RSA-OAEP with SHA-1 only; decoding OAEP on the host
    would put the material in host memory, so these algorithms are refused, by name."""
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    for algorithm in ("RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"):
        message = raises(
            "UnsupportedOperationException", kms.get_parameters_for_import, KeyId=key_id,
            WrappingAlgorithm=algorithm, WrappingKeySpec="RSA_2048",
        )  # fmt: skip
        assert algorithm in message
        assert "SHA-256" in message
    message = raises(
        "ValidationException", kms.get_parameters_for_import, KeyId=key_id,
        WrappingAlgorithm="RSAES_PKCS1_V1_5", WrappingKeySpec="RSA_2048",
    )  # fmt: skip
    assert "RSAES_PKCS1_V1_5" in message


def test_import_tokens_expired_tampered_or_for_another_key(kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    other = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    token = params["ImportToken"]
    wrapped = wrap(params["PublicKey"], "RSAES_OAEP_SHA_1", os.urandom(32))

    def attempt(key: str, import_token: bytes) -> None:
        kms.import_key_material(
            KeyId=key, ImportToken=import_token, EncryptedKeyMaterial=wrapped,
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
        )  # fmt: skip

    raises("InvalidImportTokenException", attempt, key=other, import_token=token)
    for position in (0, 5, 20, 38):
        tampered = token[:position] + bytes([token[position] ^ 1]) + token[position + 1 :]
        raises("InvalidImportTokenException", attempt, key=key_id, import_token=tampered)
    raises("InvalidImportTokenException", attempt, key=key_id, import_token=b"not a token")
    # A token whose time has passed (its row purged): the layout of hsmkms.service.imports.
    past = int((time.time() - 3600) * 1000).to_bytes(8, "big")
    expired = b"\x01" + os.urandom(16) + uuid.UUID(key_id).bytes + past
    raises("ExpiredImportTokenException", attempt, key=key_id, import_token=expired)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingImport"


def test_tampered_or_wrong_material_is_invalid_ciphertext(kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    wrapped = bytearray(wrap(params["PublicKey"], "RSA_AES_KEY_WRAP_SHA_1", os.urandom(32)))
    wrapped[-3] ^= 0x10
    message = raises(
        "InvalidCiphertextException", kms.import_key_material, KeyId=key_id,
        ImportToken=params["ImportToken"], EncryptedKeyMaterial=bytes(wrapped),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    assert message == ""
    short = wrap(params["PublicKey"], "RSA_AES_KEY_WRAP_SHA_1", os.urandom(16))
    raises(
        "InvalidCiphertextException", kms.import_key_material, KeyId=key_id,
        ImportToken=params["ImportToken"], EncryptedKeyMaterial=short,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    message = raises(
        "ValidationException", kms.import_key_material, KeyId=key_id,
        ImportToken=params["ImportToken"], EncryptedKeyMaterial=b"\x00" * 100,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    assert message == "Invalid encrypted key size."


def test_keys_whose_material_the_token_made_do_not_import(kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]
    message = raises(
        "UnsupportedOperationException", kms.get_parameters_for_import, KeyId=key["KeyId"],
        WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048",
    )  # fmt: skip
    assert message == f"{key['Arn']} origin is AWS_KMS which is not valid for this operation."
    raises("UnsupportedOperationException", kms.delete_imported_key_material, KeyId=key["KeyId"])


# -- inside the token --------------------------------------------------------------------------


def test_the_token_objects_read_back(
    server: RunningServer, kms: Any, token: Pkcs11Keystore
) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    public = serialization.load_der_public_key(params["PublicKey"])
    assert isinstance(public, rsa.RSAPublicKey)
    # The wrapping key pair's private half: in the token, unwrap only, never extractable.
    prefix = f"hsmkms:import:{key_id.replace('-', '')[:16]}:"
    wrapping = [o for o in token.list_objects() if o.label.startswith(prefix)]
    assert len(wrapping) == 1
    found = token.attributes(
        wrapping[0].object_id, ["MODULUS", "UNWRAP", "DECRYPT", "SIGN", "EXTRACTABLE", "SENSITIVE"]
    )
    assert int.from_bytes(found.pop("MODULUS"), "big") == public.public_numbers().n
    assert found == {
        "UNWRAP": True, "DECRYPT": False, "SIGN": False, "EXTRACTABLE": False, "SENSITIVE": True,
    }  # fmt: skip
    material = secret(os.urandom(32))
    kms.import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(params["PublicKey"], "RSAES_OAEP_SHA_1", material),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    (ref,) = version_refs(server, key_id)
    attributes = token.attributes(
        ref.object_ids[0],
        ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "LOCAL",
         "ENCRYPT", "DECRYPT", "SIGN", "WRAP", "UNWRAP", "DERIVE", "MODIFIABLE"],
    )  # fmt: skip
    assert attributes == {
        "TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
        "NEVER_EXTRACTABLE": False, "LOCAL": False, "ENCRYPT": True, "DECRYPT": True,
        "SIGN": False, "WRAP": False, "UNWRAP": False, "DERIVE": False, "MODIFIABLE": False,
    }  # fmt: skip
    kms.delete_imported_key_material(KeyId=key_id)
    assert not token.exists(ref)


def test_imported_hmac_material(server: RunningServer, kms: Any, token: Pkcs11Keystore) -> None:
    key = kms.create_key(Origin="EXTERNAL", KeySpec="HMAC_384", KeyUsage="GENERATE_VERIFY_MAC")[
        "KeyMetadata"
    ]
    assert key["MacAlgorithms"] == ["HMAC_SHA_384"]
    assert "EncryptionAlgorithms" not in key
    material = secret(os.urandom(48))
    result = import_material(kms, key["KeyId"], material, "RSA_AES_KEY_WRAP_SHA_1")
    assert "KeyMaterialId" not in result  # spec: for symmetric encryption keys only
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    (ref,) = version_refs(server, key["KeyId"])
    assert token.mac(ref, b"hello") == hmac.new(material, b"hello", hashlib.sha384).digest()
    message = raises(
        "ValidationException", import_material, kms=kms, key_id=key["KeyId"], material=material,
        ImportType="EXISTING_KEY_MATERIAL",
    )  # fmt: skip
    assert "symmetric encryption" in message


# -- any process completes an import -------------------------------------------------------------


@pytest.mark.slow
def test_an_import_token_survives_a_server_restart(tmp_path: Path) -> None:
    """The token's state is a row in the database and a key pair in the token: another server
    process (here, a new server on the same data directory) completes the import."""
    data_dir = tmp_path / "data"
    with running_server(data_dir) as first:
        kms = first.client()
        key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
        params = kms.get_parameters_for_import(
            KeyId=key_id, WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_1", WrappingKeySpec="RSA_3072"
        )
    material = os.urandom(32)
    with running_server(data_dir) as second:
        kms = second.client()
        kms.import_key_material(
            KeyId=key_id, ImportToken=params["ImportToken"],
            EncryptedKeyMaterial=wrap(params["PublicKey"], "RSA_AES_KEY_WRAP_SHA_1", material),
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
        )  # fmt: skip
        blob = kms.encrypt(KeyId=key_id, Plaintext=b"after a restart")["CiphertextBlob"]
    assert offline_decrypt(material, blob) == b"after a restart"


# -- other clients ---------------------------------------------------------------------------------


def test_aws_cli_import(server: RunningServer, tmp_path: Path) -> None:
    aws = Path(sys.executable).with_name("aws")
    env = clean_env(
        AWS_ACCESS_KEY_ID=server.access_key_id,
        AWS_SECRET_ACCESS_KEY=server.secret_access_key,
        AWS_DEFAULT_REGION=server.region,
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
    )

    def cli(*args: str) -> Any:
        proc = subprocess.run(
            [str(aws), "kms", *args, "--endpoint-url", server.endpoint, "--output", "json"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    key_id = cli("create-key", "--origin", "EXTERNAL")["KeyMetadata"]["KeyId"]
    params = cli(
        "get-parameters-for-import", "--key-id", key_id,
        "--wrapping-algorithm", "RSA_AES_KEY_WRAP_SHA_1", "--wrapping-key-spec", "RSA_4096",
    )  # fmt: skip
    material = secret(os.urandom(32))
    wrapped = wrap(base64.b64decode(params["PublicKey"]), "RSA_AES_KEY_WRAP_SHA_1", material)
    (tmp_path / "material.bin").write_bytes(wrapped)
    (tmp_path / "token.bin").write_bytes(base64.b64decode(params["ImportToken"]))
    cli(
        "import-key-material", "--key-id", key_id,
        "--encrypted-key-material", f"fileb://{tmp_path / 'material.bin'}",
        "--import-token", f"fileb://{tmp_path / 'token.bin'}",
        "--expiration-model", "KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    (tmp_path / "plain.txt").write_bytes(b"via the AWS CLI")
    blob = cli("encrypt", "--key-id", key_id, "--plaintext", f"fileb://{tmp_path / 'plain.txt'}")
    assert offline_decrypt(material, base64.b64decode(blob["CiphertextBlob"])) == (
        b"via the AWS CLI"
    )


# -- audit, metrics, and no secret anywhere --------------------------------------------------------


def _records(server: RunningServer, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The audit records of the request ids ``wanted`` (the writer commits them shortly)."""
    deadline = time.monotonic() + 30
    while True:
        with sqlite3.connect(server.data_dir / "audit.db") as conn:
            rows = conn.execute("SELECT record FROM audit_records").fetchall()
        conn.close()
        found = {r["requestID"]: r for r in (json.loads(b) for (b,) in rows) if "requestID" in r}
        if wanted <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_audit_records_and_metrics(server: RunningServer, kms: Any) -> None:
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    valid_to = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).replace(microsecond=0)
    imported = kms.import_key_material(
        KeyId=key_id, ImportToken=secret(params["ImportToken"]),
        EncryptedKeyMaterial=secret(wrap(params["PublicKey"], "RSAES_OAEP_SHA_1", secret(
            os.urandom(32)))),
        ExpirationModel="KEY_MATERIAL_EXPIRES", ValidTo=valid_to,
    )  # fmt: skip
    deleted = kms.delete_imported_key_material(KeyId=key_id)
    ids = {
        "GetParametersForImport": params["ResponseMetadata"]["RequestId"],
        "ImportKeyMaterial": imported["ResponseMetadata"]["RequestId"],
        "DeleteImportedKeyMaterial": deleted["ResponseMetadata"]["RequestId"],
    }
    records = _records(server, set(ids.values()))
    parameters = records[ids["GetParametersForImport"]]
    assert parameters["eventName"] == "GetParametersForImport"
    assert parameters["readOnly"] is True
    assert parameters["requestParameters"] == {
        "keyId": key_id, "wrappingAlgorithm": "RSAES_OAEP_SHA_1", "wrappingKeySpec": "RSA_2048",
    }  # fmt: skip
    assert parameters["responseElements"] is None  # never the import token or public key
    record = records[ids["ImportKeyMaterial"]]
    assert record["requestParameters"] == {
        "keyId": key_id,
        "expirationModel": "KEY_MATERIAL_EXPIRES",
        "validTo": valid_to.isoformat().replace("+00:00", "Z"),
    }
    assert record["responseElements"] == {
        "keyId": imported["KeyId"], "keyMaterialId": imported["KeyMaterialId"],
    }  # fmt: skip
    assert record["resources"][0]["ARN"] == imported["KeyId"]
    assert (
        records[ids["DeleteImportedKeyMaterial"]]["responseElements"]["keyId"]
        == (imported["KeyId"])
    )
    metrics = server.raw("GET", "/metrics").body.decode()
    for line in (
        'hsmkms_requests_total{code="OK",operation="ImportKeyMaterial"}',
        'hsmkms_requests_total{code="OK",operation="GetParametersForImport"}',
        'hsmkms_hsm_call_duration_seconds_count{call="import_material"}',
        'hsmkms_hsm_call_duration_seconds_count{call="create_wrapping_key"}',
    ):
        assert line in metrics


def test_no_secret_in_logs_databases_or_audit(server: RunningServer, kms: Any) -> None:
    """Runs last in the module: every material, wrapped material, ephemeral AES key and import
    token the tests above handled, in every form, is absent from the server's log and files."""
    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    import_material(kms, key_id, secret(os.urandom(32)), "RSA_AES_KEY_WRAP_SHA_1")
    deleted = kms.delete_imported_key_material(KeyId=key_id)
    _records(server, {deleted["ResponseMetadata"]["RequestId"]})  # the audit writer committed
    files = [server.log_path] + [
        p for p in server.data_dir.iterdir() if p.is_file() and p.name.endswith((".db", "-wal"))
    ]
    haystack = b"".join(p.read_bytes() for p in files)
    # The search reaches what the service wrote: the key's id is in the log, database and trail.
    assert haystack.count(key_id.encode()) >= 3
    assert len(SECRETS) >= 4
    for value in SECRETS:
        for form in (
            value, value.hex().encode(), base64.b64encode(value),
            base64.b64encode(value).rstrip(b"="),
        ):  # fmt: skip
            assert form not in haystack
