"""Which requests that did not authenticate get a full audit record and which are counted into
a summary (hsmkms.api.unauthenticated), with an injected clock; the same through the real
server is in tests/test_api_security.py."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkms.api.unauthenticated import (
    OTHER_SOURCES,
    UnauthenticatedRecords,
    source_of,
)
from hsmkms.audit import prepare_record, unauthenticated_summary_record


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_request_of_a_source_is_recorded_the_rest_counted() -> None:
    clock = Clock()
    records = UnauthenticatedRecords(interval=60, clock=clock)
    assert records.admit("192.0.2.1", "InvalidSignatureException")
    for _ in range(5):
        clock.now += 1
        assert not records.admit("192.0.2.1", "InvalidSignatureException")
    assert not records.admit("192.0.2.1", "UnrecognizedClientException")
    assert records.admit("192.0.2.2", "MissingAuthenticationTokenException")  # another source
    assert records.due() == []  # the interval has not ended
    clock.now += 60
    (summary,) = records.due()
    assert summary.source == "192.0.2.1"
    assert summary.count == 6
    assert summary.first == 1_000_001.0
    assert summary.last == 1_000_005.0  # the 6th counted request came at the same time
    assert summary.error_codes == (
        ("InvalidSignatureException", 5),
        ("UnrecognizedClientException", 1),
    )
    assert records.due() == []  # returned once
    # A new interval: each source gets a full record again.
    assert records.admit("192.0.2.1", "InvalidSignatureException")


def test_full_records_and_sources_are_bounded() -> None:
    clock = Clock()
    records = UnauthenticatedRecords(interval=60, clock=clock, full_records=3, max_sources=2)
    admitted = [records.admit(f"198.51.100.{i}", "X") for i in range(10)]
    assert admitted == [True, True, True] + [False] * 7
    summaries = records.drain()
    # Two sources counted by name, the other five under "*".
    assert [(s.source, s.count) for s in summaries] == [
        (OTHER_SOURCES, 5),
        ("198.51.100.3", 1),
        ("198.51.100.4", 1),
    ]


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", None]),
            st.sampled_from(["A", "B"]),
            st.floats(min_value=0, max_value=30),
        ),
        max_size=200,
    )
)
def test_every_request_is_either_recorded_or_counted_once(
    requests: list[tuple[str | None, str, float]],
) -> None:
    """Nothing is lost and nothing counted twice: full records plus the counts of every summary
    equal the requests, and the records written per interval never exceed the bounds."""
    clock = Clock()
    records = UnauthenticatedRecords(interval=10, clock=clock, full_records=2, max_sources=2)
    full = 0
    summaries = []
    for address, code, step in requests:
        clock.now += step
        full += records.admit(address, code)
        summaries += records.due()
    summaries += records.drain()
    assert full + sum(s.count for s in summaries) == len(requests)
    assert all(s.count > 0 for s in summaries)


def test_sources_group_ipv6_by_64_and_keep_ipv4() -> None:
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of(None) == "-"
    assert source_of("not an address" * 10) == ("not an address" * 10)[:64]


def test_one_host_of_a_64_cannot_escape_the_bound_by_changing_address() -> None:
    clock = Clock()
    records = UnauthenticatedRecords(interval=60, clock=clock)
    assert records.admit("2001:db8::1", "X")
    assert not any(records.admit(f"2001:db8::{i:x}", "X") for i in range(2, 500))
    (summary,) = records.drain()
    assert (summary.source, summary.count) == ("2001:db8::/64", 498)


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        UnauthenticatedRecords(interval=0, clock=Clock())


def test_the_summary_record() -> None:
    first = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    record = unauthenticated_summary_record(
        account_id="111122223333",
        region="us-east-1",
        source_ip="192.0.2.1",
        count=1234,
        first=first,
        last=first + dt.timedelta(seconds=59),
        error_codes=[("InvalidSignatureException", 1200), ("UnrecognizedClientException", 34)],
    )
    assert record["eventName"] == "UnauthenticatedRequests"
    assert record["userIdentity"] == {"type": "Unknown"}
    assert record["sourceIPAddress"] == "192.0.2.1"
    assert record["eventTime"] == "2026-05-01T12:00:59Z"
    assert record["additionalEventData"] == {
        "requestCount": 1234,
        "firstEventTime": "2026-05-01T12:00:00Z",
        "lastEventTime": "2026-05-01T12:00:59Z",
        "errorCodes": "InvalidSignatureException:1200,UnrecognizedClientException:34",
    }
    prepared = prepare_record(record)  # a valid record for the trail
    assert prepared.columns[1] == "UnauthenticatedRequests"
    assert len(prepared.body) < 1000
