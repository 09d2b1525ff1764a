"""Aliases and tags edited in the database while the real server runs: a boto3 client gets
``KMSInvalidStateException`` naming the alias or the key, and ``hsmkms doctor`` names the rows.
The same refusals without HTTP: tests/test_store_integrity.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from postgres import outside_sql
from server import RunningServer, running_server

pytestmark = [pytest.mark.server, pytest.mark.hsm, pytest.mark.database]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "data") as srv:
        yield srv


def _sql(server: RunningServer, statement: str, *params: object) -> None:
    assert outside_sql(server.data_dir / "hsmkms.db", statement, *params) == 1


def _invalid_state(call: Callable[..., Any], **kwargs: Any) -> str:
    """``call(**kwargs)`` fails closed with the integrity error; its message."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call(**kwargs)
    error = info.value.response["Error"]
    assert error["Code"] == "KMSInvalidStateException"
    message = str(error["Message"])
    assert "failed its integrity check" in message
    return message


def test_an_alias_repointed_and_a_tag_edited_in_the_database_are_refused(
    server: RunningServer,
) -> None:
    kms = server.client()
    prod = kms.create_key()["KeyMetadata"]["KeyId"]
    attacker = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/prod", TargetKeyId=prod)
    kms.tag_resource(KeyId=prod, Tags=[{"TagKey": "Project", "TagValue": "alpha"}])
    kms.encrypt(KeyId="alias/prod", Plaintext=b"x")

    _sql(server, "UPDATE aliases SET key_id = ? WHERE name = 'alias/prod'", attacker)
    _sql(server, "UPDATE tags SET tag_value = 'owned' WHERE key_id = ?", prod)
    message = _invalid_state(kms.encrypt, KeyId="alias/prod", Plaintext=b"x")
    assert "alias/prod" in message
    assert attacker not in message
    assert "alias/prod" in _invalid_state(kms.list_aliases)
    message = _invalid_state(kms.list_resource_tags, KeyId=prod)
    assert prod in message
    assert "owned" not in message

    doctor = server.cli("doctor")
    assert doctor.returncode != 0
    lines = doctor.stdout.splitlines()
    assert "integrity:       2 bad rows" in lines, doctor.stdout
    assert f"  aliases row of key {attacker}: alias alias/prod: MAC does not match the row" in lines
    assert f"  tags row of key {prod}: tag Project: MAC does not match the row" in lines
    assert "owned" not in doctor.stdout + doctor.stderr

    # Restored by hand: the MACs match again.
    _sql(server, "UPDATE aliases SET key_id = ? WHERE name = 'alias/prod'", prod)
    _sql(server, "UPDATE tags SET tag_value = 'alpha' WHERE key_id = ?", prod)
    blob = kms.encrypt(KeyId="alias/prod", Plaintext=b"x")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["KeyId"].endswith(prod)
    assert kms.list_resource_tags(KeyId=prod)["Tags"] == [
        {"TagKey": "Project", "TagValue": "alpha"}
    ]
    assert server.cli("doctor").returncode == 0
