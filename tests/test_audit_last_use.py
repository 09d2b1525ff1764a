"""AuditTrail.last_use and first_event_time, what GetKeyLastUsage reads (real token seals, real
SQLite): the newest *successful* call among the named operations that used the key, found
across pages; failures, other operations, other keys and service events do not count."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from hsmkms.audit import AuditTrail, UserIdentity, api_call_record
from hsmkms.audit.records import service_event_record
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service.last_usage import LAST_USAGE_OPERATIONS
from hsmkms.service.operations import READ_ONLY_OPERATIONS

pytestmark = pytest.mark.hsm

ACCOUNT = "111122223333"
START = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
ALICE = UserIdentity("IAMUser", "AIDA", f"arn:aws:iam::{ACCOUNT}:user/alice", ACCOUNT, "AKIA")


def key(n: int) -> str:
    return f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0000000{n}-aaaa-bbbb-cccc-dddddddddddd"


def call(
    i: int, event: str, keys: list[str], *, error: str | None = None, seconds: int = 0
) -> dict[str, Any]:
    return api_call_record(
        event,
        read_only=event in READ_ONLY_OPERATIONS,
        identity=ALICE,
        account_id=ACCOUNT,
        region="us-east-1",
        request_id=f"req-{i}",
        request={"KeyId": keys[0]},
        key_arns=keys,
        error_code=error,
        error_message="" if error else None,
        event_time=START + dt.timedelta(seconds=seconds or i),
        event_id=f"event-{i}",
    )


def test_the_newest_successful_use_across_pages(tmp_path: Path, keystore: Pkcs11Keystore) -> None:
    trail = AuditTrail(f"sqlite:///{tmp_path / 'audit.db'}", keystore)
    try:
        assert trail.first_event_time() is None
        assert trail.last_use(key(1), LAST_USAGE_OPERATIONS) is None
        trail.append(call(1, "Sign", [key(1)]))
        trail.append(call(2, "ReEncrypt", [key(2), key(3)]))
        # Newer, but none counts for key 1: failures (more than a page of them), another
        # operation, another key, a service event.
        for i in range(3, 80):
            trail.append(call(i, "Sign", [key(1)], error="KMSInvalidStateException"))
        trail.append(call(80, "DescribeKey", [key(1)]))
        trail.append(call(81, "Encrypt", [key(4)]))
        trail.append(
            service_event_record(
                "RotateKey", account_id=ACCOUNT, region="us-east-1", key_arn=key(1),
                event_time=START,
            )
        )  # fmt: skip
        found = trail.last_use(key(1), LAST_USAGE_OPERATIONS)
        assert found is not None
        assert (found["eventName"], found["eventID"], found["requestID"]) == (
            "Sign", "event-1", "req-1",
        )  # fmt: skip
        # ReEncrypt counts for both of its keys; a key id finds what its ARN finds.
        for other in (key(2), key(3), key(3).rsplit("/", 1)[1]):
            again = trail.last_use(other, LAST_USAGE_OPERATIONS)
            assert again is not None
            assert again["eventID"] == "event-2"
        assert trail.last_use(key(1), {"Encrypt"}) is None
        assert trail.last_use(key(9), LAST_USAGE_OPERATIONS) is None
        assert trail.first_event_time() == START + dt.timedelta(seconds=1)
    finally:
        trail.close()


def test_a_reader_of_a_database_without_a_trail_finds_nothing(tmp_path: Path) -> None:
    reader = AuditTrail(f"sqlite:///{tmp_path / 'empty.db'}", None, create=False)
    try:
        assert reader.last_use(key(1), LAST_USAGE_OPERATIONS) is None
        assert reader.first_event_time() is None
    finally:
        reader.close()
