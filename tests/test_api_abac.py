"""Attribute-based access control end to end: an identity policy that tests the key's tags
(``aws:ResourceTag/<k>``) and aliases (``kms:ResourceAliases``), attached with ``hsmkms
credentials create --policy-file`` while the server runs, decides boto3 requests as the root
retags and realiases the key. The decisions in detail are in
tests/test_service_authorization.py (ABAC section) and tests/test_policy_evaluate.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]

ACCOUNT = "444455556666"
ENV = {"HSMKMS_ACCOUNT_ID": ACCOUNT}

ABAC_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "UseBlueKeys",
            "Effect": "Allow",
            "Action": ["kms:Encrypt", "kms:Decrypt"],
            "Resource": f"arn:aws:kms:*:{ACCOUNT}:key/*",
            "Condition": {"StringEquals": {"aws:ResourceTag/Project": "blue"}},
        },
        {
            "Sid": "DescribeAppKeys",
            "Effect": "Allow",
            "Action": "kms:DescribeKey",
            "Resource": "*",
            "Condition": {"ForAnyValue:StringEquals": {"kms:ResourceAliases": "alias/abac-app"}},
        },
    ],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("abac") / "data", env=ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def user(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """A user made by the CLI with ABAC_POLICY; its ARN and a boto3 client signing as it."""
    path = tmp_path_factory.mktemp("policies") / "abac.json"
    path.write_text(json.dumps(ABAC_POLICY))
    proc = server.cli(
        "credentials", "create", "--name", "abac", "--json", "--policy-file", str(path), env=ENV
    )
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    return made["Arn"], server.client(made["AccessKeyId"], made["SecretAccessKey"])


def denied_message(call: Any, **kwargs: Any) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == "AccessDeniedException", error
    message: str = error["Message"]
    return message


def test_tags_and_aliases_decide_requests_as_they_change(
    server: RunningServer, user: tuple[str, Any]
) -> None:
    """The user may Encrypt/Decrypt a key while it is tagged Project=blue and DescribeKey it
    (by key id) while alias/abac-app points at it; each TagResource, UntagResource,
    CreateAlias and DeleteAlias by the root changes the very next decision."""
    arn, kms = user
    root = server.client()
    key = root.create_key(Tags=[{"TagKey": "Project", "TagValue": "blue"}])["KeyMetadata"]["Arn"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"abac")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"abac"

    root.tag_resource(KeyId=key, Tags=[{"TagKey": "Project", "TagValue": "red"}])
    assert denied_message(kms.decrypt, CiphertextBlob=blob) == (
        f"User: {arn} is not authorized to perform: kms:Decrypt on resource: {key} "
        "because no identity-based policy allows the kms:Decrypt action"
    )
    root.tag_resource(KeyId=key, Tags=[{"TagKey": "Project", "TagValue": "blue"}])
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"abac"
    root.untag_resource(KeyId=key, TagKeys=["Project"])
    denied_message(kms.encrypt, KeyId=key, Plaintext=b"x")

    key_id = key.rsplit("/", 1)[1]
    denied_message(kms.describe_key, KeyId=key_id)
    root.create_alias(AliasName="alias/abac-app", TargetKeyId=key_id)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"] == key
    root.delete_alias(AliasName="alias/abac-app")
    denied_message(kms.describe_key, KeyId=key_id)
