"""``CiphertextBlob.parse`` accepts exactly what a plain field-by-field reading accepts, and
gives the same blob as the checked constructor."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmkms.ciphertext import MAX_CIPHERTEXT_BLOB, CiphertextBlob
from hsmkms.errors import InvalidCiphertextException
from hsmkms.profiles import MechanismProfile

KEY_ID = uuid.UUID("1234abcd-12ab-34cd-56ef-1234567890ab").bytes


def reference_parse(data: bytes) -> CiphertextBlob | None:
    """Read the fields one by one and let the constructor check them (None: refused)."""
    if not 1 <= len(data) <= MAX_CIPHERTEXT_BLOB or data[0] != 1 or len(data) < 22:
        return None
    (key_version,) = struct.unpack(">I", data[17:21])
    try:
        profile = MechanismProfile.from_wire_id(data[21])
    except ValueError:
        return None
    iv_end = 22 + profile.iv_length
    if len(data) < iv_end:
        return None
    try:
        return CiphertextBlob(
            str(uuid.UUID(bytes=data[1:17])), key_version, profile, data[22:iv_end], data[iv_end:]
        )
    except ValueError:
        return None


def _check(data: bytes) -> None:
    expected = reference_parse(data)
    if expected is None:
        with pytest.raises(InvalidCiphertextException):
            CiphertextBlob.parse(data)
        return
    parsed = CiphertextBlob.parse(data)
    assert parsed == expected
    assert parsed.__dict__ == expected.__dict__
    assert parsed.to_bytes() == data


headers = st.builds(
    lambda version, key_version, wire: (
        bytes([version]) + KEY_ID + struct.pack(">IB", key_version, wire)
    ),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([0, 1, 2, 0xFFFF_FFFF]),
    st.sampled_from([0, 1, 2, 3]),
)


@given(headers, st.integers(0, 16), st.integers(0, 5000))
def test_parse_agrees_with_reference(header: bytes, iv_length: int, body_length: int) -> None:
    _check(header + b"\x00" * iv_length + b"\xab" * body_length)


@given(st.binary(max_size=80))
def test_parse_agrees_with_reference_on_any_bytes(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("size", [0, 1, 21, 22, 33, 34, 38, 50, 54, 70, 4134, 4135, 6144, 6145])
@pytest.mark.parametrize("wire", [1, 2])
def test_parse_agrees_with_reference_at_edges(size: int, wire: int) -> None:
    header = b"\x01" + KEY_ID + struct.pack(">IB", 7, wire)
    _check(
        (header + b"\x00" * size)[: max(size, 0)] if size < 22 else header + b"\x00" * (size - 22)
    )
