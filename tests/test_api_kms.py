"""Every core operation end to end through real clients: boto3 (and its errors as botocore
raises them), the AWS CLI v1 and the AWS Encryption SDK, against the real server."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from clusters import add_cluster, init_token
from server import RunningServer, clean_env, running_server
from test_api_key_types import KEY_TYPE_OPERATIONS

from hsmkms.api.protocol import MAX_BODY
from hsmkms.service import OPERATIONS

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("kms") / "data") as srv:
        yield srv


@pytest.fixture(scope="module")
def kms(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture
def key_id(kms: Any) -> str:
    key: str = kms.create_key(Description="test key")["KeyMetadata"]["KeyId"]
    return key


def raises(code: str, call: Callable[..., Any], **kwargs: Any) -> str:
    """``call(**kwargs)`` fails with botocore's ClientError of ``code`` (HTTP 400); message."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == code, error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert info.value.response["ResponseMetadata"]["RequestId"]
    message: str = error.get("Message", "")
    return message


def test_every_registered_operation_is_in_botocore(kms: Any) -> None:
    """The registry names real KMS operations, so boto3 can call each of them."""
    assert set(OPERATIONS) <= set(kms.meta.service_model.operation_names)


# -- keys -----------------------------------------------------------------------------------


def test_create_describe_list_and_update(kms: Any) -> None:
    created = kms.create_key(Description="first", Tags=[{"TagKey": "team", "TagValue": "crypto"}])[
        "KeyMetadata"
    ]
    assert created["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert created["KeyState"] == "Enabled"
    assert created["CreationDate"].year >= 2026
    described = kms.describe_key(KeyId=created["Arn"])["KeyMetadata"]
    assert described["KeyId"] == created["KeyId"]
    kms.update_key_description(KeyId=created["KeyId"], Description="second")
    assert kms.describe_key(KeyId=created["KeyId"])["KeyMetadata"]["Description"] == "second"
    listed: list[str] = []
    for page in kms.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 1}):
        listed.extend(k["KeyId"] for k in page["Keys"])
    assert created["KeyId"] in listed


def test_disable_enable(kms: Any, key_id: str) -> None:
    kms.disable_key(KeyId=key_id)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    assert "is disabled" in raises("DisabledException", kms.encrypt, KeyId=key_id, Plaintext=b"x")
    kms.enable_key(KeyId=key_id)
    assert kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]


def test_unknown_key_is_not_found(kms: Any) -> None:
    missing = str(uuid.uuid4())
    assert "does not exist" in raises("NotFoundException", kms.describe_key, KeyId=missing)


def test_unsupported_key_spec(kms: Any) -> None:
    """A spec SoftHSM 2.6.1 cannot host; the key types the token can are in
    tests/test_api_key_types.py."""
    message = raises(
        "UnsupportedOperationException", kms.create_key, KeySpec="ML_DSA_65", KeyUsage="SIGN_VERIFY"
    )
    assert "CKM_ML_DSA" in message


def test_invalid_enum_is_validation_error(kms: Any) -> None:
    # botocore validates enums client-side only for some members; send a raw bad value.
    message = raises("ValidationException", kms.create_key, KeyUsage="NOT_A_USAGE")
    assert "keyUsage" in message


def test_schedule_and_cancel_deletion(kms: Any, key_id: str) -> None:
    scheduled = kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert scheduled["KeyState"] == "PendingDeletion"
    assert scheduled["PendingWindowInDays"] == 7
    assert scheduled["DeletionDate"].year >= 2026
    raises("KMSInvalidStateException", kms.encrypt, KeyId=key_id, Plaintext=b"x")
    kms.cancel_key_deletion(KeyId=key_id)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"


def test_pending_window_out_of_range(kms: Any, key_id: str) -> None:
    raises("ValidationException", kms.schedule_key_deletion, KeyId=key_id, PendingWindowInDays=3)


# -- aliases and tags -----------------------------------------------------------------------


def test_aliases(kms: Any, key_id: str) -> None:
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    name = f"alias/test-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=name, TargetKeyId=key_id)
    raises("AlreadyExistsException", kms.create_alias, AliasName=name, TargetKeyId=key_id)
    assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == key_id
    blob = kms.encrypt(KeyId=name, Plaintext=b"via alias")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"via alias"
    names = [a["AliasName"] for a in kms.list_aliases(KeyId=key_id)["Aliases"]]
    assert names == [name]
    kms.update_alias(AliasName=name, TargetKeyId=other)
    assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == other
    kms.delete_alias(AliasName=name)
    raises("NotFoundException", kms.describe_key, KeyId=name)
    raises("ValidationException", kms.create_alias, AliasName="no-prefix", TargetKeyId=key_id)


def test_tags(kms: Any, key_id: str) -> None:
    kms.tag_resource(
        KeyId=key_id,
        Tags=[{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b", "TagValue": "2"}],
    )
    kms.untag_resource(KeyId=key_id, TagKeys=["a"])
    tags = kms.list_resource_tags(KeyId=key_id)["Tags"]
    assert tags == [{"TagKey": "b", "TagValue": "2"}]
    raises(
        "TagException", kms.tag_resource, KeyId=key_id, Tags=[{"TagKey": "aws:x", "TagValue": ""}]
    )


# -- cryptography ---------------------------------------------------------------------------


def test_encrypt_decrypt_with_context(kms: Any, key_id: str) -> None:
    context = {"purpose": "test", "tenant": "t1"}
    out = kms.encrypt(KeyId=key_id, Plaintext=b"secret", EncryptionContext=context)
    assert out["KeyId"].endswith(key_id)
    assert out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context)
    assert back["Plaintext"] == b"secret"
    assert back["KeyId"] == out["KeyId"]
    raises("InvalidCiphertextException", kms.decrypt, CiphertextBlob=out["CiphertextBlob"])
    raises(
        "InvalidCiphertextException",
        kms.decrypt,
        CiphertextBlob=out["CiphertextBlob"],
        EncryptionContext={"purpose": "other", "tenant": "t1"},
    )


def test_decrypt_tampered_or_garbage_ciphertext(kms: Any, key_id: str) -> None:
    blob = bytearray(kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"])
    blob[-1] ^= 1
    assert raises("InvalidCiphertextException", kms.decrypt, CiphertextBlob=bytes(blob)) == ""
    raises("InvalidCiphertextException", kms.decrypt, CiphertextBlob=b"garbage" * 10)


def test_decrypt_with_wrong_key_id_is_incorrect_key(kms: Any, key_id: str) -> None:
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    raises("IncorrectKeyException", kms.decrypt, CiphertextBlob=blob, KeyId=other)


def test_plaintext_limits(kms: Any, key_id: str) -> None:
    assert len(kms.encrypt(KeyId=key_id, Plaintext=b"p" * 4096)["CiphertextBlob"]) > 4096
    message = raises("ValidationException", kms.encrypt, KeyId=key_id, Plaintext=b"p" * 4097)
    assert message == (
        "1 validation error detected: Value at 'plaintext' failed to satisfy constraint: "
        "Member must have length less than or equal to 4096"
    )


def test_re_encrypt(kms: Any, key_id: str) -> None:
    destination = kms.create_key()["KeyMetadata"]["KeyId"]
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"move me", EncryptionContext={"a": "1"})[
        "CiphertextBlob"
    ]
    moved = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext={"a": "1"},
        DestinationKeyId=destination,
        DestinationEncryptionContext={"b": "2"},
    )
    assert moved["SourceKeyId"].endswith(key_id)
    assert moved["KeyId"].endswith(destination)
    back = kms.decrypt(CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"b": "2"})
    assert back["Plaintext"] == b"move me"


def test_generate_data_key_family(kms: Any, key_id: str) -> None:
    for spec, size in (("AES_256", 32), ("AES_128", 16)):
        out = kms.generate_data_key(KeyId=key_id, KeySpec=spec, EncryptionContext={"k": "v"})
        assert len(out["Plaintext"]) == size
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"k": "v"})
        assert back["Plaintext"] == out["Plaintext"]
    out = kms.generate_data_key(KeyId=key_id, NumberOfBytes=64)
    assert len(out["Plaintext"]) == 64
    bare = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")
    assert "Plaintext" not in bare
    assert len(kms.decrypt(CiphertextBlob=bare["CiphertextBlob"])["Plaintext"]) == 32
    raises("ValidationException", kms.generate_data_key, KeyId=key_id)
    message = raises("ValidationException", kms.generate_data_key, KeyId=key_id, NumberOfBytes=1025)
    assert "Value '1025' at 'numberOfBytes'" in message


def test_generate_random(kms: Any) -> None:
    assert len(kms.generate_random(NumberOfBytes=1024)["Plaintext"]) == 1024
    message = raises("ValidationException", kms.generate_random, NumberOfBytes=1025)
    assert message == (
        "1 validation error detected: Value '1025' at 'numberOfBytes' failed to satisfy "
        "constraint: Member must have value less than or equal to 1024"
    )
    raises("ValidationException", kms.generate_random)


def test_dry_run(kms: Any, key_id: str) -> None:
    raises("DryRunOperationException", kms.encrypt, KeyId=key_id, Plaintext=b"x", DryRun=True)


# -- rotation -------------------------------------------------------------------------------


def test_rotation_operations(server: RunningServer, kms: Any, key_id: str) -> None:
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False
    kms.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=90)
    status = kms.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is True
    assert status["RotationPeriodInDays"] == 90
    old = kms.encrypt(KeyId=key_id, Plaintext=b"before")["CiphertextBlob"]
    kms.rotate_key_on_demand(KeyId=key_id)
    rotations = kms.list_key_rotations(KeyId=key_id)["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"]
    assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
    new = kms.encrypt(KeyId=key_id, Plaintext=b"after")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=new)["Plaintext"] == b"after"
    kms.disable_key_rotation(KeyId=key_id)
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False
    # botocore refuses 10 before sending; the server must refuse it too.
    resp = server.signed(
        "TrentService.EnableKeyRotation", {"KeyId": key_id, "RotationPeriodInDays": 10}
    )
    assert resp.status == 400
    assert resp.json()["__type"] == "ValidationException"


# -- key policies ---------------------------------------------------------------------------


def test_key_policies(kms: Any, key_id: str) -> None:
    assert kms.list_key_policies(KeyId=key_id)["PolicyNames"] == ["default"]
    policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    assert policy["Statement"]
    policy["Statement"][0]["Sid"] = "Changed"
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    again = json.loads(kms.get_key_policy(KeyId=key_id)["Policy"])
    assert again["Statement"][0]["Sid"] == "Changed"
    raises("MalformedPolicyDocumentException", kms.put_key_policy, KeyId=key_id, Policy="{not json")


def test_grants(kms: Any, key_id: str) -> None:
    root = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"].split(":")[4]
    user = f"arn:aws:iam::{root}:user/app"
    created = kms.create_grant(
        KeyId=key_id,
        GranteePrincipal=user,
        RetiringPrincipal=user,
        Operations=["Encrypt", "Decrypt"],
        Constraints={"EncryptionContextSubset": {"app": "x"}},
        Name="g1",
    )
    listed = kms.list_grants(KeyId=key_id)["Grants"]
    assert [g["GrantId"] for g in listed] == [created["GrantId"]]
    assert listed[0]["Constraints"] == {"EncryptionContextSubset": {"app": "x"}}
    retirable = kms.list_retirable_grants(RetiringPrincipal=user)["Grants"]
    assert [g["GrantId"] for g in retirable] == [created["GrantId"]]
    kms.retire_grant(GrantToken=created["GrantToken"])  # the account root may retire
    assert kms.list_grants(KeyId=key_id)["Grants"] == []
    again = kms.create_grant(KeyId=key_id, GranteePrincipal=user, Operations=["Decrypt"])
    kms.revoke_grant(KeyId=key_id, GrantId=again["GrantId"])
    raises("NotFoundException", kms.revoke_grant, KeyId=key_id, GrantId=again["GrantId"])
    raises("InvalidGrantTokenException", kms.retire_grant, GrantToken="nope")


def test_imported_key_material(kms: Any) -> None:
    """The import operations answer here too (their own module, test_api_imports.py, covers
    them in depth)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key_id = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    params = kms.get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    public = serialization.load_der_public_key(params["PublicKey"])
    assert isinstance(public, rsa.RSAPublicKey)
    sha1 = hashes.SHA1()  # noqa: S303 - AWS's RSAES_OAEP_SHA_1
    wrapped = public.encrypt(
        os.urandom(32), padding.OAEP(mgf=padding.MGF1(sha1), algorithm=sha1, label=None)
    )
    kms.import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"], EncryptedKeyMaterial=wrapped,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )  # fmt: skip
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"imported")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"imported"
    kms.delete_imported_key_material(KeyId=key_id)
    raises("KMSInvalidStateException", kms.decrypt, CiphertextBlob=blob)


# -- other clients --------------------------------------------------------------------------


def test_aws_cli_create_encrypt_decrypt(server: RunningServer, tmp_path: Path) -> None:
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
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    key = cli("create-key", "--description", "from the aws cli")["KeyMetadata"]["KeyId"]
    (tmp_path / "plain.txt").write_bytes(b"hello from the AWS CLI")
    blob = cli("encrypt", "--key-id", key, "--plaintext", f"fileb://{tmp_path / 'plain.txt'}")[
        "CiphertextBlob"
    ]
    (tmp_path / "blob.bin").write_bytes(base64.b64decode(blob))
    plain = cli("decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'blob.bin'}")["Plaintext"]
    assert base64.b64decode(plain) == b"hello from the AWS CLI"


def test_aws_encryption_sdk_10_mb(
    server: RunningServer, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aws_encryption_sdk  # type: ignore[import-untyped]
    import botocore.session
    from aws_encryption_sdk import CommitmentPolicy

    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", server.endpoint)
    session = botocore.session.Session()
    session.set_credentials(server.access_key_id, server.secret_access_key)
    arn = f"arn:aws:kms:{server.region}:111122223333:key/{key_id}"
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[arn], botocore_session=session
    )
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    data = os.urandom(10 * 1024 * 1024)
    ciphertext, _ = client.encrypt(
        source=data, key_provider=provider, encryption_context={"test": "esdk"}
    )
    plaintext, header = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == data
    assert header.encryption_context["test"] == "esdk"


def test_custom_key_store_operations(server: RunningServer, kms: Any) -> None:
    """Every custom key store operation once (the full story: tests/test_custom_key_stores.py)."""
    init_token(server.data_dir, "kms-cks", "kms-cks-pin")
    anchor = add_cluster(server, "cluster-apikmsaaaaaa", "kms-cks")
    store_id = kms.create_custom_key_store(
        CustomKeyStoreName="api-kms",
        CloudHsmClusterId="cluster-apikmsaaaaaa",
        TrustAnchorCertificate=anchor,
        KeyStorePassword="kms-cks-pin",
    )["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    for _ in range(300):
        (entry,) = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"]
        if entry["ConnectionState"] != "CONNECTING":
            break
        time.sleep(0.1)
    assert entry["ConnectionState"] == "CONNECTED"
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="api-kms-2")
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)


def test_body_limit_leaves_room_for_every_request() -> None:
    """The largest KMS request (a 32 KiB policy, a 6 KiB blob in base64) fits many times."""
    assert MAX_BODY >= 64 * 1024


def test_every_registered_operation_was_called_end_to_end(server: RunningServer) -> None:
    """Last in the module: the server's own metrics show every operation of the registry
    answered at least once with OK through this module's clients (a new operation needs an
    end-to-end test here)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = server.raw("GET", "/metrics").body.decode()
    answered = {
        sample.labels["operation"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hsmkms_requests_total" and sample.labels.get("code") == "OK"
    }
    if "Encrypt" not in answered:
        pytest.skip("meaningful only after the rest of this module ran")
    missing = sorted(set(OPERATIONS) - answered - KEY_TYPE_OPERATIONS)
    assert not missing, f"operations without an end-to-end call: {missing}"
