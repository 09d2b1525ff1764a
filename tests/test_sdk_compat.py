"""Every major AWS SDK against the real server, the same checks for each: create a key,
encrypt and decrypt with an encryption context, GenerateDataKey, sign and verify where the
server has signing keys (skipped with the reason otherwise), and errors surfacing as each SDK's
own typed exceptions. The SDKs: boto3, the AWS CLI v1, the AWS Encryption SDK for Python and
its CLI (``aws-encryption-sdk-cli``, in an environment of its own: tests/esdk_cli), and the AWS
SDK for JavaScript v3 (``@aws-sdk/client-kms``, tests/js, run with node). README.md's
compatibility table names the versions tested here, and a test keeps it true."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.session
import pytest
from server import RunningServer, clean_env, running_server

pytestmark = [pytest.mark.hsm, pytest.mark.server]

ROOT = Path(__file__).resolve().parents[1]
ESDK_CLI = ROOT / ".cache" / "esdk-cli-venv" / "bin" / "aws-encryption-cli"
JS_DIR = ROOT / "tests" / "js"
NODE_MAJOR = 20  # @aws-sdk/client-kms's "engines"
CONTEXT = {"tenant": "t-1", "purpose": "compat"}
COMMITMENT = "require-encrypt-require-decrypt"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("sdk") / "data") as running:
        yield running


@pytest.fixture(scope="module")
def kms(server: RunningServer) -> Any:
    return server.client()


@pytest.fixture(scope="module")
def key_arn(kms: Any) -> str:
    arn: str = kms.create_key(Description="sdk compatibility")["KeyMetadata"]["Arn"]
    return arn


@pytest.fixture(scope="module")
def signing(kms: Any) -> str | None:
    """An ECC_NIST_P256 signing key's id, or None when the server has no signing keys."""
    try:
        created = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
    except kms.exceptions.UnsupportedOperationException:
        return None
    key_id: str = created["KeyMetadata"]["KeyId"]
    return key_id


@pytest.fixture
def signing_key(signing: str | None) -> str:
    """The signing key, or a skip naming why there is none."""
    if signing is None:
        pytest.skip("no signing keys on this server: CreateKey(ECC_NIST_P256) is unsupported")
    return signing


def sdk_env(server: RunningServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment pointing any AWS SDK at ``server`` (no user config files)."""
    return clean_env(
        AWS_ACCESS_KEY_ID=server.access_key_id,
        AWS_SECRET_ACCESS_KEY=server.secret_access_key,
        AWS_DEFAULT_REGION=server.region,
        AWS_REGION=server.region,
        AWS_ENDPOINT_URL_KMS=server.endpoint,
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        **extra,
    )


def error_code(exc: BaseException | None) -> str:
    assert isinstance(exc, botocore.exceptions.ClientError), repr(exc)
    return str(exc.response["Error"]["Code"])


# -- boto3 ----------------------------------------------------------------------------------


def test_boto3_encrypts_with_a_context_and_makes_data_keys(kms: Any, key_arn: str) -> None:
    blob = kms.encrypt(KeyId=key_arn, Plaintext=b"boto3", EncryptionContext=CONTEXT)
    assert blob["KeyId"] == key_arn
    plain = kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert (plain["Plaintext"], plain["KeyId"]) == (b"boto3", key_arn)
    data_key = kms.generate_data_key(KeyId=key_arn, KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert len(data_key["Plaintext"]) == 32
    unwrapped = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert unwrapped["Plaintext"] == data_key["Plaintext"]


def test_boto3_raises_its_typed_exceptions(server: RunningServer, kms: Any, key_arn: str) -> None:
    blob = kms.encrypt(KeyId=key_arn, Plaintext=b"x", EncryptionContext=CONTEXT)["CiphertextBlob"]
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "t-2"})
    with pytest.raises(kms.exceptions.NotFoundException):
        kms.describe_key(KeyId="alias/does-not-exist")
    disabled = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=disabled)
    with pytest.raises(kms.exceptions.DisabledException):
        kms.encrypt(KeyId=disabled, Plaintext=b"x")
    forged = server.client(server.access_key_id, "not-the-secret-of-this-access-key-id")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        forged.describe_key(KeyId=key_arn)
    assert error_code(info.value) == "InvalidSignatureException"


def test_boto3_signs_and_verifies(kms: Any, signing_key: str) -> None:
    signature = kms.sign(
        KeyId=signing_key, Message=b"m", MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    verified = kms.verify(
        KeyId=signing_key,
        Message=b"m",
        MessageType="RAW",
        Signature=signature,
        SigningAlgorithm="ECDSA_SHA_256",
    )
    assert verified["SignatureValid"] is True
    with pytest.raises(kms.exceptions.KMSInvalidSignatureException):
        kms.verify(
            KeyId=signing_key,
            Message=b"other",
            MessageType="RAW",
            Signature=signature,
            SigningAlgorithm="ECDSA_SHA_256",
        )


# -- the AWS CLI v1 -------------------------------------------------------------------------


def aws_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("aws")), "kms", *args, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def aws_json(env: dict[str, str], *args: str) -> Any:
    result = aws_cli(env, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_aws_cli_encrypts_with_a_context_and_makes_data_keys(
    server: RunningServer, tmp_path: Path
) -> None:
    env = sdk_env(server, tmp_path)  # AWS_ENDPOINT_URL_KMS: no --endpoint-url needed
    key = aws_json(env, "create-key", "--description", "from the AWS CLI")["KeyMetadata"]["Arn"]
    (tmp_path / "plain").write_bytes(b"hello from the AWS CLI")
    context = ",".join(f"{k}={v}" for k, v in CONTEXT.items())
    encrypted = aws_json(
        env,
        "encrypt",
        "--key-id",
        key,
        "--plaintext",
        f"fileb://{tmp_path / 'plain'}",
        "--encryption-context",
        context,
    )
    (tmp_path / "blob").write_bytes(base64.b64decode(encrypted["CiphertextBlob"]))
    blob = f"fileb://{tmp_path / 'blob'}"
    decrypted = aws_json(env, "decrypt", "--ciphertext-blob", blob, "--encryption-context", context)
    assert base64.b64decode(decrypted["Plaintext"]) == b"hello from the AWS CLI"
    data_key = aws_json(
        env, "generate-data-key", "--key-id", key, "--key-spec", "AES_256",
        "--encryption-context", context,
    )  # fmt: skip
    (tmp_path / "dk").write_bytes(base64.b64decode(data_key["CiphertextBlob"]))
    unwrapped = aws_json(
        env, "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'dk'}",
        "--encryption-context", context,
    )  # fmt: skip
    assert unwrapped["Plaintext"] == data_key["Plaintext"]

    wrong = aws_cli(env, "decrypt", "--ciphertext-blob", blob, "--encryption-context", "a=b")
    assert wrong.returncode == 255  # v1: the service answered with an error
    assert "An error occurred (InvalidCiphertextException) when calling the Decrypt" in wrong.stderr
    missing = aws_cli(env, "describe-key", "--key-id", "alias/does-not-exist")
    assert missing.returncode == 255
    assert "An error occurred (NotFoundException) when calling the DescribeKey" in missing.stderr
    forged = aws_cli({**env, "AWS_SECRET_ACCESS_KEY": "x" * 40}, "describe-key", "--key-id", key)
    assert forged.returncode == 255
    assert "(InvalidSignatureException)" in forged.stderr


def test_aws_cli_signs_and_verifies(
    server: RunningServer, tmp_path: Path, signing_key: str
) -> None:
    env = sdk_env(server, tmp_path)
    (tmp_path / "message").write_bytes(b"signed by the AWS CLI")
    message = f"fileb://{tmp_path / 'message'}"
    signed = aws_json(
        env, "sign", "--key-id", signing_key, "--message", message, "--message-type", "RAW",
        "--signing-algorithm", "ECDSA_SHA_256",
    )  # fmt: skip
    (tmp_path / "signature").write_bytes(base64.b64decode(signed["Signature"]))
    verified = aws_json(
        env, "verify", "--key-id", signing_key, "--message", message, "--message-type", "RAW",
        "--signature", f"fileb://{tmp_path / 'signature'}", "--signing-algorithm",
        "ECDSA_SHA_256",
    )  # fmt: skip
    assert verified["SignatureValid"] is True


# -- the AWS Encryption SDK for Python ------------------------------------------------------


@pytest.fixture
def esdk_session(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", server.endpoint)
    session = botocore.session.Session()
    session.set_credentials(server.access_key_id, server.secret_access_key)
    return session


def test_encryption_sdk_encrypts_with_a_context(esdk_session: Any, key_arn: str) -> None:
    """The SDK calls GenerateDataKey and Decrypt (with its context plus its own pair)."""
    import aws_encryption_sdk  # type: ignore[import-untyped]

    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[key_arn], botocore_session=esdk_session
    )
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=aws_encryption_sdk.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    data = os.urandom(100_000)
    ciphertext, header = client.encrypt(
        source=data, key_provider=provider, encryption_context=CONTEXT
    )
    (data_key,) = header.encrypted_data_keys
    assert data_key.key_provider.key_info.decode() == key_arn
    plaintext, header = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == data
    assert {k: header.encryption_context[k] for k in CONTEXT} == CONTEXT


def test_encryption_sdk_raises_its_typed_exceptions(esdk_session: Any, key_arn: str) -> None:
    import aws_encryption_sdk
    from aws_encryption_sdk.exceptions import DecryptKeyError, GenerateKeyError  # type: ignore[import-untyped]

    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=aws_encryption_sdk.CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    missing = key_arn.rsplit("/", 1)[0] + "/00000000-0000-4000-8000-000000000000"
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[missing], botocore_session=esdk_session
    )
    with pytest.raises(GenerateKeyError) as generate:
        client.encrypt(source=b"x", key_provider=provider)
    assert error_code(generate.value.__cause__) == "NotFoundException"

    good = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[key_arn], botocore_session=esdk_session
    )
    ciphertext, _ = client.encrypt(source=b"x", key_provider=good)
    kms = esdk_session.create_client("kms", region_name=key_arn.split(":")[3])
    key_id = key_arn.rsplit("/", 1)[1]
    kms.disable_key(KeyId=key_id)
    try:
        # The provider tries every data key and says only that none decrypted.
        with pytest.raises(DecryptKeyError, match="Unable to decrypt any data key"):
            client.decrypt(source=ciphertext, key_provider=good)
    finally:
        kms.enable_key(KeyId=key_id)
    assert client.decrypt(source=ciphertext, key_provider=good)[0] == b"x"


# -- the AWS Encryption SDK CLI -------------------------------------------------------------


def esdk_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    if not ESDK_CLI.exists():
        pytest.fail(f"{ESDK_CLI} is missing: run ci/bootstrap.sh")
    return subprocess.run(
        [str(ESDK_CLI), *args, "--commitment-policy", COMMITMENT, "-S"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_encryption_sdk_cli_encrypts_with_a_context(
    server: RunningServer, tmp_path: Path, key_arn: str
) -> None:
    env = sdk_env(server, tmp_path)
    source, sealed, opened = tmp_path / "plain", tmp_path / "plain.ct", tmp_path / "plain.out"
    source.write_bytes(os.urandom(50_000))
    context = [f"{k}={v}" for k, v in CONTEXT.items()]
    wrapping = ["-w", f"key={key_arn}"]
    done = esdk_cli(env, "-e", "-i", str(source), "-o", str(sealed), *wrapping, "-c", *context)
    assert done.returncode == 0, done.stderr
    # On decryption, -c names pairs the message must carry (checked by the CLI).
    done = esdk_cli(env, "-d", "-i", str(sealed), "-o", str(opened), *wrapping, "-c", *context)
    assert done.returncode == 0, done.stderr
    assert opened.read_bytes() == source.read_bytes()

    refused = esdk_cli(
        {**env, "AWS_SECRET_ACCESS_KEY": "x" * 40},
        "-d", "-i", str(sealed), "-o", str(tmp_path / "forged.out"), *wrapping,
    )  # fmt: skip
    # The CLI names the SDK's typed error (its KMS cause only at higher verbosity).
    assert refused.returncode == 1
    assert 'DecryptKeyError("Unable to decrypt any data key")' in refused.stderr
    assert not (tmp_path / "forged.out").exists()
    missing = key_arn.rsplit("/", 1)[0] + "/00000000-0000-4000-8000-000000000000"
    unknown = esdk_cli(
        env, "-e", "-i", str(source), "-o", str(tmp_path / "x.ct"), "-w", f"key={missing}"
    )
    assert unknown.returncode == 1
    assert f'GenerateKeyError("Master Key {missing} unable to generate data key")' in unknown.stderr


# -- the AWS SDK for JavaScript v3 ----------------------------------------------------------


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (ci/bootstrap.sh installs it)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < NODE_MAJOR:
        pytest.skip(f"node {version.stdout.strip()} is older than @aws-sdk/client-kms needs (20)")
    if not (JS_DIR / "node_modules" / "@aws-sdk" / "client-kms").is_dir():
        pytest.fail(f"{JS_DIR}/node_modules is missing: run ci/bootstrap.sh (npm ci)")
    return node


def test_javascript_sdk_v3(server: RunningServer, signing: str | None, tmp_path: Path) -> None:
    """Signing is part of the run when the server has signing keys."""
    node = _node()
    sign = signing is not None
    env = sdk_env(
        server, tmp_path, HSMKMS_ENDPOINT=server.endpoint, HSMKMS_SIGN="1" if sign else "0"
    )
    result = subprocess.run(
        [node, "kms_compat.mjs"],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert (facts["keySpec"], facts["keyState"]) == ("SYMMETRIC_DEFAULT", "Enabled")
    assert facts["roundTrip"] is True
    assert facts["encryptKeyId"] == facts["decryptKeyId"]
    assert (facts["dataKeyLength"], facts["dataKeyUnwraps"]) == (32, True)
    for name, expected in (
        ("wrongContext", "InvalidCiphertextException"),
        ("missingKey", "NotFoundException"),
        ("disabledKey", "DisabledException"),
        ("wrongSecret", "InvalidSignatureException"),
    ):
        error = facts[name]
        assert error == {
            "raised": True,
            "name": expected,
            "typed": True,
            "service": True,
            "status": 400,
        }, name
    if sign:
        assert facts["signatureValid"] is True
        assert facts["badSignature"]["typed"] is True
    else:
        assert "signatureValid" not in facts


# -- the compatibility table ----------------------------------------------------------------


def versions_under_test() -> dict[str, str]:
    """What this module runs, by the names README.md's table gives them."""
    versions = {
        "boto3": importlib.metadata.version("boto3"),
        "AWS CLI v1": importlib.metadata.version("awscli"),
        "AWS Encryption SDK for Python": importlib.metadata.version("aws-encryption-sdk"),
    }
    lock = (ROOT / "tests" / "esdk_cli" / "uv.lock").read_text()
    found = re.search(r'name = "aws-encryption-sdk-cli"\nversion = "([^"]+)"', lock)
    assert found is not None
    versions["AWS Encryption SDK CLI"] = found.group(1)
    package = json.loads((JS_DIR / "package-lock.json").read_text())
    versions["AWS SDK for JavaScript v3"] = package["packages"]["node_modules/@aws-sdk/client-kms"][
        "version"
    ]
    return versions


def test_the_readme_table_names_the_versions_tested_here() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = {
        cells[0]: cells[1]
        for line in readme.splitlines()
        if line.startswith("| ")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
        if len(cells) >= 2
    }
    for name, version in versions_under_test().items():
        assert name in rows, f"README.md's compatibility table has no row {name!r}"
        assert version in rows[name], f"README.md: {name} tested with {version}"
