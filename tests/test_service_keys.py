"""KmsService key management on a real SoftHSM2 token and a real SQLite file: lifecycle, the
operation x key state matrix, identifiers, aliases, tags and key policies."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from postgres import store_url

from hsmkms import models as m
from hsmkms.errors import (
    AlreadyExistsException,
    DisabledException,
    InvalidAliasNameException,
    InvalidArnException,
    InvalidMarkerException,
    KMSError,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.service.testing import ManualClock
from hsmkms.store import MetadataStore

pytestmark = [pytest.mark.hsm, pytest.mark.database, pytest.mark.vendors]

REGION = "eu-west-1"
ACCOUNT = "111122223333"
T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def service(keystore: Pkcs11Keystore, tmp_path: Path, clock: ManualClock) -> Iterator[KmsService]:
    store = MetadataStore(store_url(tmp_path / "kms.db"), clock=clock)
    yield KmsService(keystore, store, region=REGION, account_id=ACCOUNT, clock=clock)
    store.close()


def _new_key(service: KmsService, **kwargs: Any) -> m.KeyMetadata:
    return service.create_key(m.CreateKeyRequest(**kwargs)).KeyMetadata


# -- CreateKey / DescribeKey ------------------------------------------------------------------


def test_create_key_defaults(service: KmsService) -> None:
    meta = _new_key(service)
    assert str(uuid.UUID(meta.KeyId)) == meta.KeyId
    assert meta.Arn == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{meta.KeyId}"
    assert meta.AWSAccountId == ACCOUNT
    assert meta.Enabled is True
    assert meta.KeyState is m.KeyState.Enabled
    assert meta.KeySpec is m.KeySpec.SYMMETRIC_DEFAULT
    assert meta.CustomerMasterKeySpec is m.CustomerMasterKeySpec.SYMMETRIC_DEFAULT
    assert meta.KeyUsage is m.KeyUsage.ENCRYPT_DECRYPT
    assert meta.Origin is m.OriginType.AWS_KMS
    assert meta.KeyManager is m.KeyManager.CUSTOMER
    assert meta.EncryptionAlgorithms == [m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT]
    assert meta.Description == ""
    assert meta.CreationDate == T0
    assert meta.CurrentKeyMaterialId is not None
    assert len(meta.CurrentKeyMaterialId) == 64


def test_create_key_with_description_tags_and_policy(service: KmsService) -> None:
    policy = json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*"}]}
    )
    meta = _new_key(
        service,
        Description="payments",
        Tags=[m.Tag(TagKey="team", TagValue="blue")],
        Policy=policy,
    )
    assert meta.Description == "payments"
    tags = service.list_resource_tags(m.ListResourceTagsRequest(KeyId=meta.KeyId)).Tags
    assert [(t.TagKey, t.TagValue) for t in tags] == [("team", "blue")]
    assert service.get_key_policy(m.GetKeyPolicyRequest(KeyId=meta.KeyId)).Policy == policy


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"KeySpec": "RSA_2048"}, ValidationException),
        ({"KeySpec": "HMAC_256", "KeyUsage": "SIGN_VERIFY"}, ValidationException),
        ({"KeySpec": "SM2", "KeyUsage": "SIGN_VERIFY"}, UnsupportedOperationException),
        ({"KeySpec": "ML_DSA_44", "KeyUsage": "SIGN_VERIFY"}, UnsupportedOperationException),
        ({"KeyUsage": "SIGN_VERIFY"}, ValidationException),
        ({"Origin": "EXTERNAL", "MultiRegion": True}, UnsupportedOperationException),
        ({"KeySpec": "HMAC_256", "Origin": "EXTERNAL"}, ValidationException),
        (
            {"KeySpec": "HMAC_256", "KeyUsage": "ENCRYPT_DECRYPT", "Origin": "EXTERNAL"},
            ValidationException,
        ),
        ({"Origin": "AWS_CLOUDHSM"}, ValidationException),
        (
            {
                "Origin": "AWS_CLOUDHSM",
                "CustomKeyStoreId": "cks-1234567890abcdef0",
                "KeySpec": "RSA_2048",
                "KeyUsage": "ENCRYPT_DECRYPT",
            },
            UnsupportedOperationException,
        ),
        # Without CustomKeyStoreId and XksKeyId (tests/test_external_key_stores.py: with them).
        ({"Origin": "EXTERNAL_KEY_STORE"}, ValidationException),
        ({"CustomKeyStoreId": "cks-1234567890abcdef0"}, UnsupportedOperationException),
        ({"MultiRegion": True}, UnsupportedOperationException),
        (
            {"KeySpec": "SYMMETRIC_DEFAULT", "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT"},
            ValidationException,
        ),
        ({"Description": "x" * 8193}, ValidationException),
        ({"Policy": "not json"}, MalformedPolicyDocumentException),
        ({"Tags": [{"TagKey": "aws:x", "TagValue": "v"}]}, TagException),
    ],
)
def test_create_key_refusals(
    service: KmsService, kwargs: dict[str, Any], error: type[KMSError]
) -> None:
    with pytest.raises(error):
        service.create_key(m.CreateKeyRequest(**kwargs))


def test_create_key_description_limits(service: KmsService) -> None:
    assert _new_key(service, Description="x" * 8192).Description == "x" * 8192
    with pytest.raises(ValidationException) as info:
        _new_key(service, Description="x" * 8193)
    assert "at 'description' failed to satisfy constraint: Member must have length less than " in (
        info.value.message
    )


def test_describe_key_by_every_identifier(service: KmsService) -> None:
    meta = _new_key(service)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/desc", TargetKeyId=meta.KeyId))
    alias_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/desc"
    for identifier in (meta.KeyId, meta.Arn, "alias/desc", alias_arn):
        found = service.describe_key(m.DescribeKeyRequest(KeyId=identifier)).KeyMetadata
        assert found.KeyId == meta.KeyId


@pytest.mark.parametrize(
    ("identifier", "error", "message"),
    [
        ("not-a-uuid", NotFoundException, "Invalid keyId 'not-a-uuid'"),
        (str(uuid.UUID(int=1)), NotFoundException, "does not exist"),
        ("alias/nope", NotFoundException, f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/nope"),
        (f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{uuid.UUID(int=1)}", NotFoundException, "arn"),
        (f"arn:aws:kms:{REGION}:999999999999:key/{uuid.UUID(int=1)}", NotFoundException, "arn"),
        (f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/nope", NotFoundException, "not found"),
        ("arn:aws:kms:short", InvalidArnException, "Invalid arn"),
        (f"arn:aws:s3:{REGION}:{ACCOUNT}:key/x", InvalidArnException, "Invalid arn"),
        (f"arn:aws:kms:{REGION}:{ACCOUNT}:grant/x", InvalidArnException, "Invalid arn"),
    ],
)
def test_unknown_identifiers(
    service: KmsService, identifier: str, error: type[KMSError], message: str
) -> None:
    with pytest.raises(error) as info:
        service.describe_key(m.DescribeKeyRequest(KeyId=identifier))
    assert message in info.value.message


def test_other_region_arn_of_an_existing_key_is_not_found(service: KmsService) -> None:
    meta = _new_key(service)
    for arn in (
        meta.Arn.replace(REGION, "us-west-2"),
        meta.Arn.replace(ACCOUNT, "444455556666"),
        meta.Arn.replace("arn:aws:", "arn:aws-cn:"),
    ):
        with pytest.raises(NotFoundException):
            service.describe_key(m.DescribeKeyRequest(KeyId=arn))


def test_key_id_length_limit(service: KmsService) -> None:
    with pytest.raises(ValidationException) as info:
        service.describe_key(m.DescribeKeyRequest(KeyId="k" * 2049))
    assert info.value.message.startswith("1 validation error detected: Value '")
    assert "at 'keyId' failed to satisfy constraint: Member must have length less than or " in (
        info.value.message
    )


def test_management_operations_take_key_id_or_arn_but_not_alias(service: KmsService) -> None:
    meta = _new_key(service)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/mgmt", TargetKeyId=meta.KeyId))
    service.disable_key(m.DisableKeyRequest(KeyId=meta.Arn))
    service.enable_key(m.EnableKeyRequest(KeyId=meta.KeyId))
    with pytest.raises(NotFoundException):
        service.disable_key(m.DisableKeyRequest(KeyId="alias/mgmt"))


# -- ListKeys ---------------------------------------------------------------------------------


def test_list_keys_pagination(service: KmsService) -> None:
    ids = sorted(_new_key(service).KeyId for _ in range(5))
    first = service.list_keys(m.ListKeysRequest(Limit=2))
    assert first.Truncated
    assert first.NextMarker
    second = service.list_keys(m.ListKeysRequest(Limit=2, Marker=first.NextMarker))
    third = service.list_keys(m.ListKeysRequest(Limit=2, Marker=second.NextMarker))
    assert not third.Truncated
    assert third.NextMarker is None
    listed = [k.KeyId for page in (first, second, third) for k in page.Keys]
    assert listed == ids
    assert all(k.KeyArn.endswith(k.KeyId) for k in first.Keys)
    assert len(service.list_keys(m.ListKeysRequest()).Keys) == 5


@pytest.mark.parametrize(("limit", "bound"), [(0, "greater than or equal to 1"), (1001, "1000")])
def test_list_keys_limit_range(service: KmsService, limit: int, bound: str) -> None:
    with pytest.raises(ValidationException) as info:
        service.list_keys(m.ListKeysRequest(Limit=limit))
    assert f"Value '{limit}' at 'limit' failed to satisfy constraint" in info.value.message
    assert bound in info.value.message


def test_list_keys_limit_bounds_accepted(service: KmsService) -> None:
    _new_key(service)
    assert len(service.list_keys(m.ListKeysRequest(Limit=1)).Keys) == 1
    assert len(service.list_keys(m.ListKeysRequest(Limit=1000)).Keys) == 1


def test_list_keys_bad_marker(service: KmsService) -> None:
    with pytest.raises(InvalidMarkerException):
        service.list_keys(m.ListKeysRequest(Marker="bogus"))


# -- lifecycle ----------------------------------------------------------------------------------


def test_update_key_description(service: KmsService) -> None:
    meta = _new_key(service, Description="old")
    service.update_key_description(m.UpdateKeyDescriptionRequest(KeyId=meta.Arn, Description=""))
    assert (
        service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId)).KeyMetadata.Description == ""
    )
    with pytest.raises(ValidationException):
        service.update_key_description(
            m.UpdateKeyDescriptionRequest(KeyId=meta.KeyId, Description="d" * 8193)
        )


def test_disable_enable_round_trip(service: KmsService) -> None:
    meta = _new_key(service)
    service.disable_key(m.DisableKeyRequest(KeyId=meta.KeyId))
    service.disable_key(m.DisableKeyRequest(KeyId=meta.KeyId))  # idempotent
    got = service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId)).KeyMetadata
    assert got.KeyState is m.KeyState.Disabled
    assert got.Enabled is False
    service.enable_key(m.EnableKeyRequest(KeyId=meta.KeyId))
    service.enable_key(m.EnableKeyRequest(KeyId=meta.KeyId))
    got = service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId)).KeyMetadata
    assert got.KeyState is m.KeyState.Enabled
    assert got.Enabled is True


def test_schedule_and_cancel_deletion(service: KmsService, clock: ManualClock) -> None:
    meta = _new_key(service)
    resp = service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=meta.KeyId))
    assert resp.KeyId == meta.Arn
    assert resp.PendingWindowInDays == 30
    assert resp.DeletionDate == T0 + dt.timedelta(days=30)
    assert resp.KeyState is m.KeyState.PendingDeletion
    got = service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId)).KeyMetadata
    assert got.KeyState is m.KeyState.PendingDeletion
    assert got.DeletionDate == resp.DeletionDate
    assert got.PendingDeletionWindowInDays == 30
    clock.advance(days=29)
    cancel = service.cancel_key_deletion(m.CancelKeyDeletionRequest(KeyId=meta.KeyId))
    assert cancel.KeyId == meta.Arn
    got = service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId)).KeyMetadata
    # spec: CancelKeyDeletion always leaves the key Disabled (§3.5, §8).
    assert got.KeyState is m.KeyState.Disabled
    assert got.DeletionDate is None
    assert got.PendingDeletionWindowInDays is None


@pytest.mark.parametrize(("days", "ok"), [(6, False), (7, True), (30, True), (31, False)])
def test_pending_window_range(service: KmsService, days: int, ok: bool) -> None:
    meta = _new_key(service)
    request = m.ScheduleKeyDeletionRequest(KeyId=meta.KeyId, PendingWindowInDays=days)
    if ok:
        resp = service.schedule_key_deletion(request)
        assert resp.DeletionDate == T0 + dt.timedelta(days=days)
    else:
        with pytest.raises(ValidationException) as info:
            service.schedule_key_deletion(request)
        assert f"Value '{days}' at 'pendingWindowInDays'" in info.value.message


def test_key_is_gone_once_its_deletion_date_passes(service: KmsService, clock: ManualClock) -> None:
    meta = _new_key(service)
    service.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=meta.KeyId, PendingWindowInDays=7)
    )
    clock.advance(days=7)
    with pytest.raises(NotFoundException):
        service.describe_key(m.DescribeKeyRequest(KeyId=meta.KeyId))
    assert service.list_keys(m.ListKeysRequest()).Keys == []
    with pytest.raises(NotFoundException):
        service.cancel_key_deletion(m.CancelKeyDeletionRequest(KeyId=meta.KeyId))


# -- the operation x key state matrix (reference §3.5) -----------------------------------------

Call = Callable[[KmsService, m.KeyMetadata, dict[str, Any]], object]

USE_OPS: dict[str, Call] = {
    "Encrypt": lambda s, k, x: s.encrypt(m.EncryptRequest(KeyId=k.KeyId, Plaintext=b"p")),
    "Decrypt": lambda s, k, x: s.decrypt(m.DecryptRequest(CiphertextBlob=x["blob"])),
    "ReEncrypt(source)": lambda s, k, x: s.re_encrypt(
        m.ReEncryptRequest(CiphertextBlob=x["blob"], DestinationKeyId=x["other"])
    ),
    "ReEncrypt(destination)": lambda s, k, x: s.re_encrypt(
        m.ReEncryptRequest(CiphertextBlob=x["other_blob"], DestinationKeyId=k.KeyId)
    ),
    "GenerateDataKey": lambda s, k, x: s.generate_data_key(
        m.GenerateDataKeyRequest(KeyId=k.KeyId, KeySpec=m.DataKeySpec.AES_256)
    ),
    "GenerateDataKeyWithoutPlaintext": lambda s, k, x: s.generate_data_key_without_plaintext(
        m.GenerateDataKeyWithoutPlaintextRequest(KeyId=k.KeyId, NumberOfBytes=16)
    ),
    "EnableKeyRotation": lambda s, k, x: s.enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=k.KeyId)
    ),
    "DisableKeyRotation": lambda s, k, x: s.disable_key_rotation(
        m.DisableKeyRotationRequest(KeyId=k.KeyId)
    ),
    "RotateKeyOnDemand": lambda s, k, x: s.rotate_key_on_demand(
        m.RotateKeyOnDemandRequest(KeyId=k.KeyId)
    ),
}
MANAGE_OPS: dict[str, Call] = {
    "UpdateKeyDescription": lambda s, k, x: s.update_key_description(
        m.UpdateKeyDescriptionRequest(KeyId=k.KeyId, Description="d")
    ),
    "EnableKey": lambda s, k, x: s.enable_key(m.EnableKeyRequest(KeyId=k.KeyId)),
    "DisableKey": lambda s, k, x: s.disable_key(m.DisableKeyRequest(KeyId=k.KeyId)),
    "ScheduleKeyDeletion": lambda s, k, x: s.schedule_key_deletion(
        m.ScheduleKeyDeletionRequest(KeyId=k.KeyId)
    ),
    "CreateAlias": lambda s, k, x: s.create_alias(
        m.CreateAliasRequest(AliasName=x["new_alias"], TargetKeyId=k.KeyId)
    ),
    "UpdateAlias": lambda s, k, x: s.update_alias(
        m.UpdateAliasRequest(AliasName=x["other_alias"], TargetKeyId=k.KeyId)
    ),
    "TagResource": lambda s, k, x: s.tag_resource(
        m.TagResourceRequest(KeyId=k.KeyId, Tags=[m.Tag(TagKey="k", TagValue="v")])
    ),
    "UntagResource": lambda s, k, x: s.untag_resource(
        m.UntagResourceRequest(KeyId=k.KeyId, TagKeys=["k"])
    ),
}
READ_OPS: dict[str, Call] = {
    "DescribeKey": lambda s, k, x: s.describe_key(m.DescribeKeyRequest(KeyId=k.KeyId)),
    "GetKeyPolicy": lambda s, k, x: s.get_key_policy(m.GetKeyPolicyRequest(KeyId=k.KeyId)),
    "PutKeyPolicy": lambda s, k, x: s.put_key_policy(
        m.PutKeyPolicyRequest(KeyId=k.KeyId, Policy=x["policy"])
    ),
    "ListKeyPolicies": lambda s, k, x: s.list_key_policies(m.ListKeyPoliciesRequest(KeyId=k.KeyId)),
    "ListResourceTags": lambda s, k, x: s.list_resource_tags(
        m.ListResourceTagsRequest(KeyId=k.KeyId)
    ),
    "ListAliases": lambda s, k, x: s.list_aliases(m.ListAliasesRequest(KeyId=k.KeyId)),
    "GetKeyRotationStatus": lambda s, k, x: s.get_key_rotation_status(
        m.GetKeyRotationStatusRequest(KeyId=k.KeyId)
    ),
    "ListKeyRotations": lambda s, k, x: s.list_key_rotations(
        m.ListKeyRotationsRequest(KeyId=k.KeyId)
    ),
    "DeleteAlias": lambda s, k, x: s.delete_alias(m.DeleteAliasRequest(AliasName=x["alias"])),
}
CANCEL_OPS: dict[str, Call] = {
    "CancelKeyDeletion": lambda s, k, x: s.cancel_key_deletion(
        m.CancelKeyDeletionRequest(KeyId=k.KeyId)
    ),
}

STATES = ("Enabled", "Disabled", "PendingDeletion")


def _expected(group: str, state: str) -> tuple[type[KMSError], str] | None:
    if group == "use":
        if state == "Disabled":
            return DisabledException, "is disabled."
        if state == "PendingDeletion":
            return KMSInvalidStateException, "is pending deletion."
        return None
    if group == "manage":
        return (
            (KMSInvalidStateException, "is pending deletion.")
            if state == "PendingDeletion"
            else None
        )
    if group == "cancel":
        return (
            None
            if state == "PendingDeletion"
            else (KMSInvalidStateException, "is not pending deletion.")
        )
    return None


MATRIX = [
    pytest.param(group, name, call, state, id=f"{name}-{state}")
    for group, ops in (
        ("use", USE_OPS),
        ("manage", MANAGE_OPS),
        ("read", READ_OPS),
        ("cancel", CANCEL_OPS),
    )
    for name, call in ops.items()
    for state in STATES
]


@dataclasses.dataclass
class MatrixEnv:
    service: KmsService
    store: MetadataStore
    keys: dict[str, tuple[m.KeyMetadata, dict[str, Any]]]


@pytest.fixture(scope="module")
def matrix_env(
    keystore: Pkcs11Keystore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MatrixEnv]:
    """One service and one key per state for the whole matrix: token keys are slow to make
    (tens of ms each on SoftHSM2), and each case puts its key back into the state it needs."""
    clock = ManualClock(T0)
    store = MetadataStore(store_url(tmp_path_factory.mktemp("matrix") / "kms.db"), clock=clock)
    service = KmsService(keystore, store, region=REGION, account_id=ACCOUNT, clock=clock)
    keys = {}
    for state in STATES:
        key = _new_key(service)
        other = _new_key(service)
        extra: dict[str, Any] = {
            "blob": service.encrypt(
                m.EncryptRequest(KeyId=key.KeyId, Plaintext=b"x")
            ).CiphertextBlob,
            "other": other.KeyId,
            "other_blob": service.encrypt(
                m.EncryptRequest(KeyId=other.KeyId, Plaintext=b"y")
            ).CiphertextBlob,
            "policy": service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key.KeyId)).Policy,
            "alias": f"alias/matrix-{state}",
            "other_alias": f"alias/matrix-other-{state}",
        }
        keys[state] = (key, extra)
    yield MatrixEnv(service, store, keys)
    store.close()


def _prepare(env: MatrixEnv, state: str) -> tuple[m.KeyMetadata, dict[str, Any]]:
    """Put the key of ``state`` back into that state, whatever earlier cases did to it."""
    service, store = env.service, env.store
    key, extra = env.keys[state]
    extra = {**extra, "new_alias": f"alias/matrix-new-{uuid.uuid4()}"}
    store.transition(key.KeyId, STATES, "Enabled")
    for alias, target in ((extra["alias"], key.KeyId), (extra["other_alias"], extra["other"])):
        if store.get_alias(alias) is None:
            store.create_alias(alias, target, T0)
        else:
            store.update_alias(alias, target, T0)
    if state == "Disabled":
        service.disable_key(m.DisableKeyRequest(KeyId=key.KeyId))
    elif state == "PendingDeletion":
        service.schedule_key_deletion(m.ScheduleKeyDeletionRequest(KeyId=key.KeyId))
    return key, extra


@pytest.mark.parametrize(("group", "name", "call", "state"), MATRIX)
def test_operation_by_key_state(
    matrix_env: MatrixEnv, group: str, name: str, call: Call, state: str
) -> None:
    key, extra = _prepare(matrix_env, state)
    expected = _expected(group, state)
    if expected is None:
        call(matrix_env.service, key, extra)
        return
    error, suffix = expected
    with pytest.raises(error) as info:
        call(matrix_env.service, key, extra)
    assert type(info.value) is error
    assert info.value.message == f"{key.Arn} {suffix}"


# spec: aliases are accepted by DescribeKey and the cryptographic operations; the others take a
# key id or key ARN only (reference §1.8).
ALIAS_OPS = {
    "Encrypt",
    "ReEncrypt(destination)",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "DescribeKey",
}
KEYED_OPS = {
    name: call
    for ops in (USE_OPS, MANAGE_OPS, READ_OPS)
    for name, call in ops.items()
    # Decrypt and ReEncrypt's source name their key in the ciphertext; DeleteAlias takes none.
    if name not in {"Decrypt", "ReEncrypt(source)", "DeleteAlias"}
}


@pytest.mark.parametrize("form", ["key-arn", "alias-name", "alias-arn"])
@pytest.mark.parametrize("name", sorted(KEYED_OPS))
def test_identifier_forms(matrix_env: MatrixEnv, name: str, form: str) -> None:
    key, extra = _prepare(matrix_env, "Enabled")
    alias_name = extra["alias"]
    identifier = {
        "key-arn": key.Arn,
        "alias-name": alias_name,
        "alias-arn": f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias_name}",
    }[form]
    named = key.model_copy(update={"KeyId": identifier})
    if form == "key-arn" or name in ALIAS_OPS:
        KEYED_OPS[name](matrix_env.service, named, extra)
    else:
        with pytest.raises(NotFoundException):
            KEYED_OPS[name](matrix_env.service, named, extra)


# -- aliases ------------------------------------------------------------------------------------


def test_alias_lifecycle(service: KmsService, clock: ManualClock) -> None:
    a = _new_key(service)
    b = _new_key(service)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/app/db_key-1", TargetKeyId=a.Arn))
    listed = service.list_aliases(m.ListAliasesRequest()).Aliases
    assert [(x.AliasName, x.TargetKeyId) for x in listed] == [("alias/app/db_key-1", a.KeyId)]
    assert listed[0].AliasArn == f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/app/db_key-1"
    assert listed[0].CreationDate == T0 == listed[0].LastUpdatedDate
    clock.advance(hours=1)
    service.update_alias(m.UpdateAliasRequest(AliasName="alias/app/db_key-1", TargetKeyId=b.KeyId))
    entry = service.list_aliases(m.ListAliasesRequest(KeyId=b.KeyId)).Aliases[0]
    assert entry.TargetKeyId == b.KeyId
    assert entry.LastUpdatedDate == T0 + dt.timedelta(hours=1)
    assert service.list_aliases(m.ListAliasesRequest(KeyId=a.KeyId)).Aliases == []
    service.delete_alias(m.DeleteAliasRequest(AliasName="alias/app/db_key-1"))
    with pytest.raises(NotFoundException):
        service.delete_alias(m.DeleteAliasRequest(AliasName="alias/app/db_key-1"))
    with pytest.raises(NotFoundException):
        service.update_alias(m.UpdateAliasRequest(AliasName="alias/nope", TargetKeyId=b.KeyId))


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("alias/aws/mine", InvalidAliasNameException),
        ("alias/", InvalidAliasNameException),
        ("no-prefix", ValidationException),
        ("alias/with space", ValidationException),
        ("alias/" + "a" * 251, ValidationException),
        ("", ValidationException),
    ],
)
def test_alias_name_rules(service: KmsService, name: str, error: type[KMSError]) -> None:
    key = _new_key(service)
    with pytest.raises(error):
        service.create_alias(m.CreateAliasRequest(AliasName=name, TargetKeyId=key.KeyId))


def test_alias_name_length_limit_accepted(service: KmsService) -> None:
    key = _new_key(service)
    name = "alias/" + "a" * 250
    service.create_alias(m.CreateAliasRequest(AliasName=name, TargetKeyId=key.KeyId))
    assert service.describe_key(m.DescribeKeyRequest(KeyId=name)).KeyMetadata.KeyId == key.KeyId


def test_duplicate_alias(service: KmsService) -> None:
    key = _new_key(service)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/dup", TargetKeyId=key.KeyId))
    with pytest.raises(AlreadyExistsException) as info:
        service.create_alias(m.CreateAliasRequest(AliasName="alias/dup", TargetKeyId=key.KeyId))
    assert f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/dup" in info.value.message


def test_alias_target_must_be_key_id_or_arn(service: KmsService) -> None:
    key = _new_key(service)
    service.create_alias(m.CreateAliasRequest(AliasName="alias/one", TargetKeyId=key.KeyId))
    with pytest.raises(NotFoundException):
        service.create_alias(m.CreateAliasRequest(AliasName="alias/two", TargetKeyId="alias/one"))


def test_fifty_aliases_per_key(service: KmsService) -> None:
    key = _new_key(service)
    for i in range(50):
        service.create_alias(
            m.CreateAliasRequest(AliasName=f"alias/n{i:02d}", TargetKeyId=key.KeyId)
        )
    with pytest.raises(LimitExceededException):
        service.create_alias(m.CreateAliasRequest(AliasName="alias/n50", TargetKeyId=key.KeyId))
    first = service.list_aliases(m.ListAliasesRequest(KeyId=key.KeyId))
    assert len(first.Aliases) == 50
    assert not first.Truncated
    page = service.list_aliases(m.ListAliasesRequest(Limit=20))
    assert page.Truncated
    assert len(page.Aliases) == 20
    rest = service.list_aliases(m.ListAliasesRequest(Limit=100, Marker=page.NextMarker))
    assert len(rest.Aliases) == 30
    with pytest.raises(ValidationException):
        service.list_aliases(m.ListAliasesRequest(Limit=101))


# -- tags ---------------------------------------------------------------------------------------


def test_tag_untag_list(service: KmsService) -> None:
    key = _new_key(service)
    service.tag_resource(
        m.TagResourceRequest(
            KeyId=key.Arn,
            Tags=[m.Tag(TagKey="b", TagValue=""), m.Tag(TagKey="a", TagValue="v" * 256)],
        )
    )
    service.tag_resource(
        m.TagResourceRequest(KeyId=key.KeyId, Tags=[m.Tag(TagKey="b", TagValue="2")])
    )
    tags = service.list_resource_tags(m.ListResourceTagsRequest(KeyId=key.KeyId)).Tags
    assert [(t.TagKey, t.TagValue) for t in tags] == [("a", "v" * 256), ("b", "2")]
    service.untag_resource(m.UntagResourceRequest(KeyId=key.KeyId, TagKeys=["a", "zzz"]))
    tags = service.list_resource_tags(m.ListResourceTagsRequest(KeyId=key.KeyId)).Tags
    assert [t.TagKey for t in tags] == ["b"]


@pytest.mark.parametrize(
    ("tags", "error"),
    [
        ([("aws:reserved", "v")], TagException),
        ([("AWS:reserved", "v")], TagException),
        ([("dup", "1"), ("dup", "2")], TagException),
        ([("", "v")], ValidationException),
        ([("k" * 129, "v")], ValidationException),
        ([("k", "v" * 257)], ValidationException),
        ([(f"t{i}", "v") for i in range(51)], TagException),
    ],
)
def test_tag_refusals(
    service: KmsService, tags: list[tuple[str, str]], error: type[KMSError]
) -> None:
    key = _new_key(service)
    request = m.TagResourceRequest(
        KeyId=key.KeyId, Tags=[m.Tag(TagKey=k, TagValue=v) for k, v in tags]
    )
    with pytest.raises(error):
        service.tag_resource(request)


def test_tag_key_length_message_names_the_member(service: KmsService) -> None:
    key = _new_key(service)
    with pytest.raises(ValidationException) as info:
        service.tag_resource(
            m.TagResourceRequest(KeyId=key.KeyId, Tags=[m.Tag(TagKey="k" * 129, TagValue="v")])
        )
    assert "at 'tags.1.member.tagKey' failed to satisfy constraint" in info.value.message


def test_fifty_tags_per_key(service: KmsService) -> None:
    key = _new_key(service)
    service.tag_resource(
        m.TagResourceRequest(
            KeyId=key.KeyId, Tags=[m.Tag(TagKey=f"t{i:02d}", TagValue="v") for i in range(50)]
        )
    )
    with pytest.raises(TagException):
        service.tag_resource(
            m.TagResourceRequest(KeyId=key.KeyId, Tags=[m.Tag(TagKey="x", TagValue="v")])
        )
    # Overwriting an existing tag stays within the limit.
    service.tag_resource(
        m.TagResourceRequest(KeyId=key.KeyId, Tags=[m.Tag(TagKey="t00", TagValue="w")])
    )
    page = service.list_resource_tags(m.ListResourceTagsRequest(KeyId=key.KeyId, Limit=30))
    assert page.Truncated
    assert len(page.Tags) == 30
    rest = service.list_resource_tags(
        m.ListResourceTagsRequest(KeyId=key.KeyId, Limit=50, Marker=page.NextMarker)
    )
    assert len(rest.Tags) == 20
    assert not rest.Truncated
    with pytest.raises(ValidationException):
        service.list_resource_tags(m.ListResourceTagsRequest(KeyId=key.KeyId, Limit=51))


def test_untag_reserved_prefix(service: KmsService) -> None:
    key = _new_key(service)
    with pytest.raises(TagException):
        service.untag_resource(m.UntagResourceRequest(KeyId=key.KeyId, TagKeys=["aws:x"]))


# -- key policies -------------------------------------------------------------------------------


def test_default_policy_is_awss(service: KmsService) -> None:
    key = _new_key(service)
    resp = service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key.KeyId, PolicyName="default"))
    assert resp.PolicyName == "default"
    assert json.loads(resp.Policy) == {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    names = service.list_key_policies(m.ListKeyPoliciesRequest(KeyId=key.KeyId))
    assert names.PolicyNames == ["default"]
    assert not names.Truncated


def test_put_key_policy(service: KmsService) -> None:
    key = _new_key(service)
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": {
                "Sid": "users",
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": ["kms:Encrypt", "kms:Decrypt"],
                "Resource": "*",
                "Condition": {"StringEquals": {"kms:EncryptionContext:app": "x"}},
            },
        }
    )
    service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key.Arn, Policy=policy))
    assert service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key.KeyId)).Policy == policy


def _padded_policy(size: int) -> str:
    base = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Sid": ""}],
    }
    empty = len(json.dumps(base))
    base["Statement"][0]["Sid"] = "s" * (size - empty)  # type: ignore[index]
    text = json.dumps(base)
    assert len(text) == size
    return text


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        ("{", MalformedPolicyDocumentException),
        ("[]", MalformedPolicyDocumentException),
        ('{"Version":"2012-10-17"}', MalformedPolicyDocumentException),
        ('{"Statement":[]}', MalformedPolicyDocumentException),
        ('{"Statement":[{"Effect":"Maybe","Principal":"*"}]}', MalformedPolicyDocumentException),
        ('{"Statement":[{"Effect":"Allow"}]}', MalformedPolicyDocumentException),
        (
            '{"Version":"1999","Statement":[{"Effect":"Allow","Principal":"*"}]}',
            MalformedPolicyDocumentException,
        ),
        (
            '{"Statement":[{"Effect":"Allow","Principal":"*","Bogus":1}]}',
            MalformedPolicyDocumentException,
        ),
        (
            '{"Statement":[{"Sid":"a","Effect":"Allow","Principal":"*"},'
            '{"Sid":"a","Effect":"Deny","Principal":"*"}]}',
            MalformedPolicyDocumentException,
        ),
        ("", ValidationException),
    ],
)
def test_put_key_policy_refusals(service: KmsService, policy: str, error: type[KMSError]) -> None:
    key = _new_key(service)
    with pytest.raises(error):
        service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key.KeyId, Policy=policy))


def test_policy_size_limit(service: KmsService) -> None:
    key = _new_key(service)
    service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key.KeyId, Policy=_padded_policy(32768)))
    with pytest.raises(LimitExceededException):
        service.put_key_policy(m.PutKeyPolicyRequest(KeyId=key.KeyId, Policy=_padded_policy(32769)))


def test_policy_name_must_be_default(service: KmsService) -> None:
    key = _new_key(service)
    with pytest.raises(NotFoundException):
        service.get_key_policy(m.GetKeyPolicyRequest(KeyId=key.KeyId, PolicyName="other"))
