"""The envelope format with raw data keys: round trips at the segment edges, frozen vectors,
every kind of tampering, and a parser that fails only one way on arbitrary bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmkms.envelope import DecryptionFailed, EnvelopeHeader, decrypt_stream, encrypt_stream
from hsmkms.envelope.format import (
    COMMITMENT_LENGTH,
    MAX_CONTEXT_BYTES,
    MAX_ENCRYPTED_DATA_KEY,
    MAX_HEADER_LENGTH,
    MAX_KEY_ARN,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    TAG_LENGTH,
    MessageCipher,
    decode_encryption_context,
)
from hsmkms.envelope.stream import verify_payload
from hsmkms.errors import ValidationException

VECTORS = Path(__file__).parent / "data" / "envelope" / "v1.json"
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SEG = MIN_SEGMENT_SIZE
KEY = bytes(range(32))
CTX = {"purpose": "test", "tenant": "t1"}


def _seal(
    plaintext: bytes,
    *,
    key: bytes = KEY,
    segment_size: int = SEG,
    context: dict[str, str] | None = None,
    edk: bytes = b"\x01" * 48,
) -> bytes:
    header = EnvelopeHeader.create(
        key,
        key_arn=ARN,
        encrypted_data_key=edk,
        encryption_context=CTX if context is None else context,
        segment_size=segment_size,
    )
    out = io.BytesIO()
    assert encrypt_stream(io.BytesIO(plaintext), out, header, key) == len(plaintext)
    return out.getvalue()


def _open(message: bytes, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(message), out, key)
    return out.getvalue()


def _header_length(message: bytes) -> int:
    return EnvelopeHeader.parse(message)[1]


def _segments(message: bytes, segment_size: int = SEG) -> list[bytes]:
    payload = message[_header_length(message) :]
    unit = segment_size + TAG_LENGTH
    return [payload[i : i + unit] for i in range(0, len(payload), unit)]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length",
    [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 3 * SEG + 17, 7 * SEG - 1],
)
def test_round_trip_at_segment_edges(length: int) -> None:
    """Lengths around the segment size round-trip, and the payload is exactly the segments."""
    plaintext = os.urandom(length)
    message = _seal(plaintext)
    assert _open(message) == plaintext
    segments = max(1, -(-length // SEG))
    assert len(message) == _header_length(message) + length + segments * TAG_LENGTH


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_round_trip_default_segment_size(delta: int) -> None:
    """1 MiB - 1, 1 MiB and 1 MiB + 1 with the default segment size (threaded I/O path)."""
    header_probe = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e")
    plaintext = os.urandom(header_probe.segment_size + delta)
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e")
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), out, header, KEY)
    assert _open(out.getvalue()) == plaintext


def test_round_trip_through_real_files_uses_threads(tmp_path: Path) -> None:
    """Regular files take the read-ahead / write-behind path; the result is the same."""
    plaintext = os.urandom(5 * (1 << 20) + 123)
    (tmp_path / "p").write_bytes(plaintext)
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e")
    with open(tmp_path / "p", "rb", buffering=0) as src, open(tmp_path / "c", "wb") as dst:
        encrypt_stream(src, dst, header, KEY)
    with open(tmp_path / "c", "rb", buffering=0) as src, open(tmp_path / "d", "wb") as dst:
        decrypt_stream(src, dst, KEY)
    assert (tmp_path / "d").read_bytes() == plaintext


class _Trickle(io.RawIOBase):
    """A pipe-like source that returns at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self._step]
        return self._data.readinto(view)


def test_short_reads_are_handled() -> None:
    """Sources that return short reads (pipes) are read until full."""
    plaintext = os.urandom(3 * SEG + 5)
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e", segment_size=SEG)
    out = io.BytesIO()
    encrypt_stream(_Trickle(plaintext, 777), out, header, KEY)
    sink = io.BytesIO()
    decrypt_stream(_Trickle(out.getvalue(), 1000), sink, KEY)
    assert sink.getvalue() == plaintext


@pytest.mark.slow
def test_round_trip_100_mb() -> None:
    """100 MB through the default segment size, with constant buffers."""
    block = os.urandom(1 << 20)
    plaintext = block * 100
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e")
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), out, header, KEY)
    digest = hashlib.sha256()

    class Hasher:
        def write(self, data: memoryview) -> int:
            digest.update(data)
            return len(data)

    decrypt_stream(io.BytesIO(out.getvalue()), Hasher(), KEY)
    assert digest.digest() == hashlib.sha256(plaintext).digest()


def test_each_message_gets_a_fresh_salt_and_key() -> None:
    """The same data key and plaintext give different messages (fresh salt, fresh message
    key), so a cached data key never repeats a nonce under one key."""
    a, b = _seal(b"x" * 100), _seal(b"x" * 100)
    assert a != b
    ha, hb = EnvelopeHeader.parse(a)[0], EnvelopeHeader.parse(b)[0]
    assert ha.salt != hb.salt
    assert ha.commitment != hb.commitment


def test_nonce_layout() -> None:
    """7 zero bytes, the counter big-endian, the last flag."""
    assert MessageCipher.nonce(0, False) == bytes(12)
    assert MessageCipher.nonce(1, True) == bytes(7) + b"\x00\x00\x00\x01\x01"
    assert MessageCipher.nonce(2**32 - 1, False) == bytes(7) + b"\xff\xff\xff\xff\x00"


# --- frozen vectors ----------------------------------------------------------------------------


def _vectors() -> list[dict[str, Any]]:
    doc = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert doc["version"] == 1
    vectors: list[dict[str, Any]] = doc["vectors"]
    return vectors


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_frozen_vector_decrypts(vector: dict[str, Any]) -> None:
    """Released messages stay readable: each frozen message opens to its plaintext."""
    message = bytes.fromhex(vector["message"])
    header, length = EnvelopeHeader.parse(message)
    assert length == vector["header_length"]
    assert header.key_arn == vector["key_arn"]
    assert header.encrypted_data_key == bytes.fromhex(vector["encrypted_data_key"])
    assert dict(header.encryption_context) == vector["encryption_context"]
    assert header.segment_size == vector["segment_size"]
    assert header.to_bytes() == message[:length]
    assert _open(message, bytes.fromhex(vector["data_key"])) == bytes.fromhex(vector["plaintext"])


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_frozen_vector_encrypts_identically(vector: dict[str, Any]) -> None:
    """Given the same salt, encryption reproduces the frozen bytes exactly."""
    key = bytes.fromhex(vector["data_key"])
    header = EnvelopeHeader.create(
        key,
        key_arn=vector["key_arn"],
        encrypted_data_key=bytes.fromhex(vector["encrypted_data_key"]),
        encryption_context=vector["encryption_context"],
        segment_size=vector["segment_size"],
        salt=bytes.fromhex(vector["salt"]),
    )
    assert header.commitment.hex() == vector["commitment"]
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(bytes.fromhex(vector["plaintext"])), out, header, key)
    assert out.getvalue().hex() == vector["message"]


# --- tampering ---------------------------------------------------------------------------------

PLAINTEXT = bytes(range(256)) * (3 * SEG // 256) + b"tail"  # 4 segments, the last short
MESSAGE = _seal(PLAINTEXT)
HEADER_LENGTH = _header_length(MESSAGE)


def _fails(message: bytes, key: bytes = KEY) -> None:
    out = io.BytesIO()
    with pytest.raises(DecryptionFailed):
        decrypt_stream(io.BytesIO(message), out, key)


def _regions() -> dict[str, tuple[int, int]]:
    header = EnvelopeHeader.parse(MESSAGE)[0]
    ctx_end = 40 + (len(header.bound_prefix()) - 40)
    arn_end = ctx_end + 2 + len(header.key_arn)
    edk_end = arn_end + 2 + len(header.encrypted_data_key)
    return {
        "version": (0, 1),
        "suite": (1, 2),
        "segment_size": (2, 6),
        "salt": (6, 38),
        "context_length": (38, 40),
        "context": (40, ctx_end),
        "commitment": (edk_end, edk_end + COMMITMENT_LENGTH),
    }


@pytest.mark.parametrize("region", list(_regions()))
def test_every_bit_flip_in_bound_header_regions_fails(region: str) -> None:
    """A flipped bit anywhere in the bound prefix or the commitment is detected."""
    start, end = _regions()[region]
    for offset in range(start, end):
        for bit in (0x01, 0x80):
            tampered = bytearray(MESSAGE)
            tampered[offset] ^= bit
            _fails(bytes(tampered))


def test_key_wrap_fields_are_not_checked_by_the_format() -> None:
    """The key ARN and encrypted data key are authenticated by KMS, not by the format (so
    rewrap can change them): with the right data key, changing them still opens. The client
    passes the ARN as KeyId and KMS rejects a changed blob (tests/test_envelope_service.py)."""
    header = EnvelopeHeader.parse(MESSAGE)[0]
    rewrapped = header.with_wrapped_key(ARN.replace("1234abcd", "99999999"), b"\x02" * 60)
    assert rewrapped.commitment == header.commitment
    assert _open(rewrapped.to_bytes() + MESSAGE[HEADER_LENGTH:]) == PLAINTEXT


def test_every_payload_byte_is_authenticated() -> None:
    """Flipping any byte of any segment (sampled every 97 bytes, plus each tag) fails."""
    payload_offsets = list(range(HEADER_LENGTH, len(MESSAGE), 97))
    unit = SEG + TAG_LENGTH
    tags = [HEADER_LENGTH + i * unit + SEG for i in range(3)] + [len(MESSAGE) - 1]
    for offset in payload_offsets + tags:
        tampered = bytearray(MESSAGE)
        tampered[offset] ^= 0x40
        _fails(bytes(tampered))


def test_truncation_at_every_segment_boundary_fails() -> None:
    """Dropping whole trailing segments (the rest still authentic) is detected."""
    unit = SEG + TAG_LENGTH
    for boundary in range(HEADER_LENGTH, len(MESSAGE), unit):
        _fails(MESSAGE[:boundary])


def test_truncation_inside_segments_and_header_fails() -> None:
    """Cutting the message anywhere (sampled) is detected, in the header or the payload."""
    for cut in [*range(0, HEADER_LENGTH, 7), *range(HEADER_LENGTH, len(MESSAGE), 331)]:
        _fails(MESSAGE[:cut])
    _fails(MESSAGE[:-1])


@pytest.mark.parametrize(
    "suffix", [b"\x00", b"x" * TAG_LENGTH, b"y" * (SEG + TAG_LENGTH), None], ids=str
)
def test_extension_fails(suffix: bytes | None) -> None:
    """Appending bytes, or a copy of a real segment, is detected."""
    extra = _segments(MESSAGE)[1] if suffix is None else suffix
    _fails(MESSAGE + extra)


def test_swapped_reordered_duplicated_and_dropped_segments_fail() -> None:
    header = MESSAGE[:HEADER_LENGTH]
    s = _segments(MESSAGE)
    assert len(s) == 4
    for order in ([1, 0, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2], [0, 0, 1, 2, 3], [0, 1, 2, 2, 3],
                  [0, 2, 3], [1, 2, 3], [3], [0, 1, 2, 3, 3]):  # fmt: skip
        _fails(header + b"".join(s[i] for i in order))


def test_segments_from_another_message_fail() -> None:
    """A segment spliced in from a message under the same data key (another salt) fails."""
    other = _seal(PLAINTEXT)
    s, t = _segments(MESSAGE), _segments(other)
    _fails(MESSAGE[:HEADER_LENGTH] + s[0] + t[1] + s[2] + s[3])


def test_header_from_another_message_fails() -> None:
    other = _seal(PLAINTEXT)
    _fails(other[:HEADER_LENGTH] + MESSAGE[HEADER_LENGTH:])


def test_wrong_data_key_fails_on_the_commitment() -> None:
    _fails(MESSAGE, bytes(32))
    _fails(MESSAGE, KEY[:16])


def test_changed_context_fails() -> None:
    """Rewriting the context (re-encoded validly, lengths fixed up) is detected."""
    header = EnvelopeHeader.parse(MESSAGE)[0]
    forged = EnvelopeHeader(
        header.segment_size,
        header.salt,
        {"purpose": "prod", "tenant": "t1"},
        header.key_arn,
        header.encrypted_data_key,
        header.commitment,
    )
    _fails(forged.to_bytes() + MESSAGE[HEADER_LENGTH:])


def test_changed_segment_size_fails() -> None:
    """A header claiming another segment size (bound, and re-segmenting) fails."""
    tampered = bytearray(MESSAGE)
    struct.pack_into(">I", tampered, 2, SEG * 2)
    _fails(bytes(tampered))


def test_empty_trailing_segment_is_refused() -> None:
    """The encoder never writes an empty last segment after a full one; the decoder refuses
    one even when its tag is genuine."""
    plaintext = b"a" * SEG
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e", segment_size=SEG)
    cipher = header.seal_cipher(KEY)
    first = bytearray(SEG + TAG_LENGTH)
    cipher.seal_into(0, False, memoryview(plaintext), memoryview(first))
    empty = bytearray(TAG_LENGTH)
    cipher.seal_into(1, True, memoryview(b""), memoryview(empty))
    _fails(header.to_bytes() + bytes(first) + bytes(empty))


def test_verify_payload_releases_nothing() -> None:
    header, length = EnvelopeHeader.parse(MESSAGE)
    cipher = header.open_cipher(KEY)
    assert verify_payload(io.BytesIO(MESSAGE[length:]), cipher, SEG) == len(PLAINTEXT)
    with pytest.raises(DecryptionFailed):
        verify_payload(io.BytesIO(MESSAGE[length:-1]), cipher, SEG)


def test_decryption_failed_carries_no_detail() -> None:
    """Every failure has the same fixed message and is an InvalidCiphertextException."""
    from hsmkms.errors import InvalidCiphertextException

    messages = set()
    for bad in (b"", MESSAGE[:10], MESSAGE[:-1], MESSAGE + b"x"):
        with pytest.raises(DecryptionFailed) as info:
            _open(bad)
        assert isinstance(info.value, InvalidCiphertextException)
        messages.add(str(info.value))
    assert len(messages) == 1


# --- strict parsing and limits -------------------------------------------------------------------


def _raw_header(
    *,
    version: int = 1,
    suite: int = 1,
    segment_size: int = SEG,
    context: bytes = b"\x00\x00",
    arn: bytes = ARN.encode(),
    edk: bytes = b"e",
) -> bytes:
    return (
        struct.pack(">BBI32sH", version, suite, segment_size, bytes(32), len(context))
        + context
        + struct.pack(">H", len(arn))
        + arn
        + struct.pack(">H", len(edk))
        + edk
        + bytes(COMMITMENT_LENGTH)
    )


def test_raw_header_helper_parses() -> None:
    header, length = EnvelopeHeader.parse(_raw_header())
    assert length == len(_raw_header())
    assert header.key_arn == ARN


@pytest.mark.parametrize(
    "fields",
    [
        {"version": 0},
        {"version": 2},
        {"suite": 0},
        {"suite": 2},
        {"segment_size": MIN_SEGMENT_SIZE - 1},
        {"segment_size": MAX_SEGMENT_SIZE + 1},
        {"segment_size": 0},
        {"context": b""},
        {"context": b"\x00"},
        {"context": b"\x00\x01"},  # one pair announced, none present
        {"context": b"\x00\x00\x00"},  # trailing byte
        {"context": b"\x00\x01\x00\x00\x00\x00"},  # empty key
        {"context": b"\x00\x02\x00\x01b\x00\x00\x00\x01a\x00\x00"},  # unsorted
        {"context": b"\x00\x02\x00\x01a\x00\x00\x00\x01a\x00\x00"},  # duplicate
        {"context": b"\x00\x01\x00\x01\xff\x00\x00"},  # invalid UTF-8
        {"context": b"\x00\x01\x00\x02\xed\xa0\x00\x00"},  # encoded surrogate
        {"context": b"\x00\x00" + b"\x00" * MAX_CONTEXT_BYTES},  # over the limit
        {"arn": b""},
        {"arn": b"arn with space"},
        {"arn": b"arn:\x00"},
        {"arn": "arn:é".encode()},
        {"arn": b"a" * (MAX_KEY_ARN + 1)},
        {"edk": b""},
        {"edk": b"e" * (MAX_ENCRYPTED_DATA_KEY + 1)},
    ],
    ids=repr,
)
def test_malformed_headers_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(DecryptionFailed):
        EnvelopeHeader.parse(_raw_header(**fields))


def test_limits_at_the_maxima_parse() -> None:
    big_ctx = {"k": "v" * (MAX_CONTEXT_BYTES - 7)}
    header = EnvelopeHeader.create(
        KEY,
        key_arn="a" * MAX_KEY_ARN,
        encrypted_data_key=b"e" * MAX_ENCRYPTED_DATA_KEY,
        encryption_context=big_ctx,
        segment_size=MAX_SEGMENT_SIZE,
    )
    parsed, length = EnvelopeHeader.parse(header.to_bytes())
    assert parsed == header
    assert length == header.length == MAX_HEADER_LENGTH


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment_size": MIN_SEGMENT_SIZE - 1},
        {"segment_size": MAX_SEGMENT_SIZE + 1},
        {"key_arn": ""},
        {"key_arn": "ärn"},
        {"encrypted_data_key": b""},
        {"encryption_context": {"k": "v" * MAX_CONTEXT_BYTES}},
        {"encryption_context": {"": "v"}},
    ],
    ids=repr,
)
def test_create_refuses_out_of_range_values(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {"key_arn": ARN, "encrypted_data_key": b"e"}
    values.update(kwargs)
    with pytest.raises(ValidationException):
        EnvelopeHeader.create(KEY, **values)


def test_create_refuses_a_short_data_key() -> None:
    with pytest.raises(ValidationException):
        EnvelopeHeader.create(KEY[:16], key_arn=ARN, encrypted_data_key=b"e")


def test_seal_cipher_refuses_another_data_key() -> None:
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e")
    with pytest.raises(ValidationException):
        header.seal_cipher(bytes(32))


def test_reprs_show_no_key_material() -> None:
    header = EnvelopeHeader.parse(MESSAGE)[0]
    cipher = header.open_cipher(KEY)
    assert KEY.hex() not in repr(header)
    assert "redacted" in repr(cipher)


# --- property tests ----------------------------------------------------------------------------

contexts = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), max_size=5)


@given(contexts)
def test_context_encoding_round_trips(context: dict[str, str]) -> None:
    from hsmkms.ciphertext import encode_encryption_context

    assert decode_encryption_context(encode_encryption_context(context)) == context


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_fail_only_as_decryption_failed(data: bytes) -> None:
    """Any byte string is either a message or exactly DecryptionFailed, nothing else."""
    with pytest.raises(DecryptionFailed):
        _open(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=len(MESSAGE)))
def test_mutated_messages_fail_only_as_decryption_failed(junk: bytes, at: int) -> None:
    """Splicing arbitrary bytes into a valid message gives DecryptionFailed, nothing else,
    unless only the key-wrap fields changed (KMS checks those: see above)."""
    mutated = MESSAGE[:at] + junk + MESSAGE[at + len(junk) :]
    original = EnvelopeHeader.parse(MESSAGE)[0]
    try:
        header, length = EnvelopeHeader.parse(mutated)
    except DecryptionFailed:
        return
    if (
        header.bound_prefix() == original.bound_prefix()
        and header.commitment == original.commitment
        and mutated[length:] == MESSAGE[HEADER_LENGTH:]
    ):
        assert _open(mutated) == PLAINTEXT
        return
    with pytest.raises(DecryptionFailed):
        _open(mutated)


@given(
    st.binary(max_size=3 * SEG + 50),
    contexts,
    st.integers(min_value=MIN_SEGMENT_SIZE, max_value=MIN_SEGMENT_SIZE + 50),
)
@settings(max_examples=40)
def test_property_round_trip(plaintext: bytes, context: dict[str, str], seg: int) -> None:
    message = _seal(plaintext, context=context, segment_size=seg)
    header, length = EnvelopeHeader.parse(message)
    assert header.to_bytes() == message[:length]
    assert dict(header.encryption_context) == context
    assert _open(message) == plaintext


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=0xFFFF),
    st.binary(max_size=600),
)
def test_headers_with_a_valid_start_fail_only_as_decryption_failed(
    segment_size: int, context_length: int, rest: bytes
) -> None:
    """Past the version and suite bytes, arbitrary fields still fail only one way."""
    data = struct.pack(">BBI32sH", 1, 1, segment_size, bytes(32), context_length) + rest
    with pytest.raises(DecryptionFailed):
        _open(data)


class _Zeros:
    """``n`` zero bytes, produced on demand (a source that holds nothing)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readinto(self, buffer: memoryview, /) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


class _Discard:
    """Counts what it is given and keeps none of it."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: memoryview, /) -> int:
        self.written += len(data)
        return len(data)


def test_memory_stays_constant_for_large_streams() -> None:
    """64 MiB through the default segment size allocates a few segments' worth, not more."""
    import tracemalloc

    size = 64 << 20
    header = EnvelopeHeader.create(KEY, key_arn=ARN, encrypted_data_key=b"e")
    sink = _Discard()
    tracemalloc.start()
    try:
        encrypt_stream(_Zeros(size), sink, header, KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.written == header.length + size + 64 * TAG_LENGTH
    assert peak < 12 << 20, peak
