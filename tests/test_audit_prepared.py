"""The API's fast record encoder (``prepare_api_call``) gives exactly what encoding the record
``api_call_record`` builds gives (``prepare_record``): the same bytes — so the same hash chain —
and the same search columns, or verify would report the trail as edited."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkms import models as m
from hsmkms.audit import UserIdentity, api_call_record, prepare_api_call, prepare_record
from hsmkms.audit.records import search_columns
from hsmkms.service.operations import ALL_OPERATIONS, READ_ONLY_OPERATIONS

ACCOUNT = "111122223333"
ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0ab1b025-531d-4119-b95a-0dcdf3c2795b"

text = st.text(max_size=40)  # any code point: escapes and non-ASCII must encode alike
maybe_text = st.none() | text
identities = st.builds(
    UserIdentity,
    type=st.sampled_from(["Root", "IAMUser", "Unknown"]),
    principal_id=maybe_text,
    arn=maybe_text,
    account_id=maybe_text,
    access_key_id=maybe_text,
    user_name=maybe_text,
)
member_values = st.none() | text | st.binary(max_size=20) | st.integers() | st.booleans()
requests = st.none() | st.dictionaries(
    st.sampled_from(
        ["KeyId", "Plaintext", "CiphertextBlob", "EncryptionContext", "KeySpec", "NumberOfBytes",
         "GrantTokens", "Description", "Limit", "Unknown"]
    ),
    member_values | st.dictionaries(text, text, max_size=3) | st.lists(text, max_size=3),
    max_size=6,
)  # fmt: skip
responses = st.none() | st.dictionaries(
    st.sampled_from(["KeyId", "Plaintext", "CiphertextBlob", "KeyState", "GrantToken"]),
    member_values,
    max_size=4,
)
event_names = st.sampled_from(sorted(ALL_OPERATIONS)) | st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=20
)
extras = st.none() | st.dictionaries(
    st.sampled_from(["keyVersion", "keyMaterialId", "failureReason", "dryRun"]),
    st.none() | text | st.integers() | st.booleans(),
    max_size=3,
)
times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)
)


@settings(max_examples=400, deadline=None)
@given(
    event_name=event_names,
    read_only=st.booleans(),
    identity=identities,
    request=requests,
    response=responses,
    key_arns=st.lists(st.sampled_from([ARN, ARN + "x", "alias/a", "not an arn", ""]), max_size=3),
    source_ip=maybe_text,
    user_agent=maybe_text,
    error=st.none() | st.tuples(st.sampled_from(["ValidationException", "X"]), maybe_text),
    extra=extras,
    when=times,
    request_id=text,
    event_id=st.text(min_size=1, max_size=40),
)
def test_fast_encoder_equals_encoding_the_built_record(
    event_name: str,
    read_only: bool,
    identity: UserIdentity,
    request: dict[str, Any] | None,
    response: dict[str, Any] | None,
    key_arns: list[str],
    source_ip: str | None,
    user_agent: str | None,
    error: tuple[str, str | None] | None,
    extra: dict[str, Any] | None,
    when: dt.datetime,
    request_id: str,
    event_id: str,
) -> None:
    kwargs: dict[str, Any] = {
        "identity": identity, "account_id": ACCOUNT, "region": "us-east-1",
        "read_only": read_only, "request_id": request_id, "request": request, "response": response,
        "key_arns": key_arns, "source_ip": source_ip, "user_agent": user_agent,
        "error_code": error[0] if error else None, "error_message": error[1] if error else None,
        "additional_event_data": extra, "event_time": when, "event_id": event_id,
    }  # fmt: skip
    fast = prepare_api_call(event_name, **kwargs)
    slow = prepare_record(api_call_record(event_name, **kwargs))
    assert fast == slow
    assert fast.columns == search_columns(json.loads(fast.body))


def test_fast_encoder_takes_wire_models_like_the_builder() -> None:
    request = m.GenerateDataKeyRequest(
        KeyId=ARN, KeySpec="AES_256", EncryptionContext={"é": "✓"}, GrantTokens=["t"]
    )
    response = m.GenerateDataKeyResponse(CiphertextBlob=b"c" * 40, Plaintext=b"p" * 32, KeyId=ARN)
    kwargs: dict[str, Any] = {
        "identity": UserIdentity("Root", ACCOUNT, f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT, "AKIA1"),
        "account_id": ACCOUNT, "region": "us-east-1", "request_id": "r", "request": request,
        "response": response, "key_arns": [ARN], "additional_event_data": {"keyVersion": 2},
        "read_only": True,
    }  # fmt: skip
    fast = prepare_api_call("GenerateDataKey", **kwargs)
    record = api_call_record("GenerateDataKey", **kwargs)
    assert json.loads(fast.body) == {**record, "eventID": json.loads(fast.body)["eventID"]}
    assert b"pppp" not in fast.body
    assert fast.columns[1:] == ("GenerateDataKey", f"arn:aws:iam::{ACCOUNT}:root", "AKIA1",
                                " 0ab1b025-531d-4119-b95a-0dcdf3c2795b ")  # fmt: skip


def test_fast_encoder_refuses_what_the_trail_refuses() -> None:
    identity = UserIdentity("Unknown")
    with pytest.raises(ValueError, match="eventName"):
        prepare_api_call(
            "", identity=identity, account_id=ACCOUNT, region="r", request_id="r", read_only=False
        )
    with pytest.raises(ValueError, match="not an allowed member"):
        prepare_api_call(
            "Decrypt", identity=identity, account_id=ACCOUNT, region="r", request_id="r",
            read_only=True, additional_event_data={"plaintext": "x"},
        )  # fmt: skip
    with pytest.raises(ValueError, match="aware"):
        prepare_api_call(
            "Decrypt", identity=identity, account_id=ACCOUNT, region="r", request_id="r",
            read_only=True, event_time=dt.datetime(2026, 1, 1),
        )  # fmt: skip


contexts = st.none() | st.dictionaries(text, text, max_size=3)
models = st.one_of(
    st.builds(
        m.GenerateDataKeyRequest.model_construct,
        KeyId=text, EncryptionContext=contexts, NumberOfBytes=st.none() | st.integers(1, 1024),
        KeySpec=st.none() | st.sampled_from(list(m.DataKeySpec)),
        GrantTokens=st.none() | st.lists(text, max_size=2), DryRun=st.none() | st.booleans(),
        Recipient=st.none() | st.dictionaries(text, text | st.binary(max_size=8), max_size=2),
    ),
    st.builds(
        m.DecryptRequest.model_construct,
        CiphertextBlob=st.none() | st.binary(max_size=40), EncryptionContext=contexts,
        KeyId=st.none() | text, EncryptionAlgorithm=st.none() | st.sampled_from(
            list(m.EncryptionAlgorithmSpec)
        ),
        DryRunModifiers=st.none() | st.lists(text, max_size=2),
    ),
    st.builds(
        m.CreateKeyRequest.model_construct,
        Description=st.none() | text, KeyUsage=st.none() | st.sampled_from(list(m.KeyUsage)),
        Tags=st.none() | st.lists(st.builds(m.Tag, TagKey=st.just("k"), TagValue=text), max_size=2),
        Policy=st.none() | text,
    ),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(request=models, error=st.booleans(), secret=st.binary(min_size=6, max_size=20))
def test_fast_encoder_equals_the_builder_on_wire_models(
    request: Any, error: bool, secret: bytes
) -> None:
    message = f"echo {base64.b64encode(secret).decode()} {request.model_dump()!r}"
    kwargs: dict[str, Any] = {
        "identity": UserIdentity("IAMUser", None, f"arn:aws:iam::{ACCOUNT}:user/u", ACCOUNT, "AK"),
        "account_id": ACCOUNT, "region": "us-east-1", "request_id": "r", "request": request,
        "key_arns": [ARN], "event_time": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "event_id": "e",
        "error_code": "ValidationException" if error else None,
        "error_message": message if error else None,
    }  # fmt: skip
    name = type(request).__name__.removesuffix("Request")
    kwargs["read_only"] = name in READ_ONLY_OPERATIONS
    fast = prepare_api_call(name, **kwargs)
    assert fast == prepare_record(api_call_record(name, **kwargs))
