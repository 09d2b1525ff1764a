"""The ciphertext blob format: layout, strict parsing, AAD and encryption-context encoding."""

from __future__ import annotations

import base64
import contextlib
import itertools
import struct
import uuid
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from hsmkms.ciphertext import (
    FORMAT_VERSION,
    MAX_CIPHERTEXT_BLOB,
    MAX_PLAINTEXT,
    XKS_FORMAT_VERSION,
    CiphertextBlob,
    XksCiphertext,
    aad_for,
    encode_encryption_context,
)
from hsmkms.errors import InvalidCiphertextException, ValidationException
from hsmkms.profiles import MechanismProfile

GCM = MechanismProfile.AES_256_GCM
CBC = MechanismProfile.AES_256_CBC_HMAC_SHA_256
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
PREFIX_LENGTH = 22  # version, key id, key version, profile


# --- strategies and helpers -------------------------------------------------------------------


@st.composite
def blobs(draw: st.DrawFn, profile: MechanismProfile | None = None) -> CiphertextBlob:
    """Any valid blob (of ``profile`` when given)."""
    if profile is None:
        profile = draw(st.sampled_from(MechanismProfile))
    key_id = str(uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16))))
    key_version = draw(st.integers(min_value=1, max_value=2**32 - 1))
    iv = draw(st.binary(min_size=profile.iv_length, max_size=profile.iv_length))
    tag = profile.tag_length
    max_body = profile.max_body_length(MAX_PLAINTEXT)
    if profile is GCM:
        body = draw(st.binary(min_size=tag, max_size=max_body))
    else:
        blocks = draw(st.integers(min_value=1, max_value=(max_body - tag) // 16))
        body = draw(st.binary(min_size=blocks * 16 + tag, max_size=blocks * 16 + tag))
    return CiphertextBlob(key_id, key_version, profile, iv, body)


# Keys are non-empty; st.text() never yields lone surrogates.
contexts = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), max_size=6)


def decode_encryption_context(data: bytes) -> dict[str, str]:
    """Test-side inverse of encode_encryption_context: proves the encoding is injective."""
    (count,) = struct.unpack_from(">H", data, 0)
    pos, out = 2, {}
    for _ in range(count):
        fields = []
        for _ in range(2):
            (length,) = struct.unpack_from(">H", data, pos)
            fields.append(data[pos + 2 : pos + 2 + length].decode("utf-8"))
            pos += 2 + length
        out[fields[0]] = fields[1]
    assert pos == len(data)
    return out


def parse_or_none(data: bytes) -> CiphertextBlob | None:
    """Parse, mapping the one allowed failure to None (anything else propagates)."""
    try:
        return CiphertextBlob.parse(data)
    except InvalidCiphertextException as exc:
        refused = exc
    assert refused.message == ""
    return None


def assert_rejected(data: bytes) -> None:
    """The blob is refused with a bare InvalidCiphertextException: no message, cause or context."""
    with pytest.raises(InvalidCiphertextException) as info:
        CiphertextBlob.parse(data)
    exc = info.value
    assert exc.message == ""
    assert str(exc) == ""
    assert exc.args == ("",)
    assert exc.__cause__ is None
    assert exc.__context__ is None
    assert exc.__suppress_context__


def valid(profile: MechanismProfile = GCM, body_length: int | None = None) -> CiphertextBlob:
    if body_length is None:
        body_length = profile.tag_length + 16
    return CiphertextBlob(
        KEY_ID, 7, profile, bytes(range(profile.iv_length)), bytes([0x5A]) * body_length
    )


# --- frozen known-answer vectors ----------------------------------------------------------------
# FROZEN: these blobs were produced by format version 1 as released. They must never change; a
# failure here means old ciphertexts would no longer decrypt. Add vectors for new versions, never
# edit these. The GCM bodies are real AES-256-GCM under KAT_KEY with the listed IV and AAD, so
# they also freeze the AAD construction; the CBC-HMAC body is structurally valid filler (the MAC
# construction belongs to the keystore).

KAT_KEY = bytes(range(32))


@pytest.mark.parametrize(
    ("blob_hex", "key_id", "key_version", "profile", "iv_hex", "ctx", "aad_hex", "plaintext"),
    [
        pytest.param(
            "011234abcd12ab34cd56ef1234567890ab0000000101000102030405060708090a0b2f71bb70a896e2"
            "78e431ffeec39d1d15f7f6e15b82163e081811d4a066163a50e68fb22a9ecd051b08786e",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            1,
            GCM,
            "000102030405060708090a0b",
            {"tenant": "acme", "purpose": "test"},
            "011234abcd12ab34cd56ef1234567890ab000000010100020007707572706f736500047465737400"
            "0674656e616e74000461636d65",
            b"hsmkms ciphertext format v1",
            id="v1-gcm",
        ),
        pytest.param(
            "010987dcba09fe87dc65baab09876543210000010202a0a1a2a3a4a5a6a7a8a9aaabacadaeaf4041"
            "42434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f606162636465666768"
            "696a6b6c6d6e6f",
            "0987dcba-09fe-87dc-65ba-ab0987654321",
            258,
            CBC,
            "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
            {},
            "010987dcba09fe87dc65baab098765432100000102020000",
            None,
            id="v1-cbc-hmac",
        ),
        pytest.param(
            "01ffffffff00004000800000000000000fffffffff01ffffffffffffffffffffffffdf50b200e33593"
            "23c1a9718c08539df8",
            "ffffffff-0000-4000-8000-00000000000f",
            2**32 - 1,
            GCM,
            "ffffffffffffffffffffffff",
            {"ключ": "значение", "b": "", "a": "1"},
            "01ffffffff00004000800000000000000fffffffff010003000161000131000162000000"
            "08d0bad0bbd18ed1870010d0b7d0bdd0b0d187d0b5d0bdd0b8d0b5",
            b"",
            id="v1-gcm-max-version-unicode-context",
        ),
    ],
)
def test_frozen_vectors_parse_to_their_fields_and_aad(
    blob_hex: str,
    key_id: str,
    key_version: int,
    profile: MechanismProfile,
    iv_hex: str,
    ctx: Mapping[str, str],
    aad_hex: str,
    plaintext: bytes | None,
) -> None:
    """Released v1 blobs parse to the same fields, AAD and wire bytes forever."""
    data = bytes.fromhex(blob_hex)
    blob = CiphertextBlob.parse(data)
    assert blob.key_id == key_id
    assert blob.key_version == key_version
    assert blob.profile is profile
    assert blob.iv == bytes.fromhex(iv_hex)
    assert blob.body == data[PREFIX_LENGTH + profile.iv_length :]
    assert blob.aad(ctx).hex() == aad_hex
    assert aad_for(key_id, key_version, profile, ctx).hex() == aad_hex
    assert blob.to_bytes() == data
    if plaintext is not None:
        opened = AESGCM(KAT_KEY).decrypt(blob.iv, blob.body, bytes.fromhex(aad_hex))
        assert opened == plaintext


def test_encryption_context_known_value() -> None:
    """{"b": "2", "a": "1"} encodes as count 2, then a=1, then b=2, u16 length prefixes."""
    assert encode_encryption_context({"b": "2", "a": "1"}) == bytes.fromhex(
        "0002000161000131000162000132"
    )


def test_empty_encryption_context_is_just_a_zero_count() -> None:
    assert encode_encryption_context({}) == b"\x00\x00"


# --- round trips and layout ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", list(MechanismProfile))
@given(data=st.data())
def test_any_valid_blob_round_trips(profile: MechanismProfile, data: st.DataObject) -> None:
    """to_bytes then parse gives an equal blob, for both profiles."""
    blob = data.draw(blobs(profile))
    wire = blob.to_bytes()
    assert len(wire) <= MAX_CIPHERTEXT_BLOB
    assert CiphertextBlob.parse(wire) == blob


@given(blob=blobs())
def test_layout_is_header_then_body(blob: CiphertextBlob) -> None:
    """The wire form is version, key id, u32 key version, profile id, IV, then the body."""
    wire = blob.to_bytes()
    header = blob.header()
    assert wire == header + blob.body
    assert len(header) == PREFIX_LENGTH + blob.profile.iv_length
    assert wire[0] == FORMAT_VERSION
    assert wire[1:17] == uuid.UUID(blob.key_id).bytes
    assert wire[17:21] == blob.key_version.to_bytes(4, "big")
    assert wire[21] == blob.profile.wire_id
    assert wire[22 : 22 + blob.profile.iv_length] == blob.iv


@given(blob=blobs(), ctx=contexts)
def test_aad_is_header_without_iv_then_context(
    blob: CiphertextBlob, ctx: Mapping[str, str]
) -> None:
    """aad(ctx) = header minus IV || canonical context, and equals aad_for with the same fields."""
    aad = blob.aad(ctx)
    assert aad == blob.header()[:PREFIX_LENGTH] + encode_encryption_context(ctx)
    assert aad == aad_for(blob.key_id, blob.key_version, blob.profile, ctx)


def test_aad_does_not_depend_on_iv_or_body() -> None:
    """The IV is drawn after the AAD is fixed, so it must not be part of it."""
    a = valid()
    b = CiphertextBlob(a.key_id, a.key_version, a.profile, b"\xff" * 12, b"\x00" * 40)
    assert a.aad({"k": "v"}) == b.aad({"k": "v"})


@pytest.mark.parametrize(
    "change",
    [
        {"key_id": "00000000-0000-0000-0000-000000000001"},
        {"key_version": 8},
        {"profile": CBC, "iv": bytes(16), "body": bytes(48)},
    ],
    ids=["key-id", "key-version", "profile"],
)
def test_aad_binds_key_id_version_and_profile(change: dict[str, object]) -> None:
    """Changing any authenticated header field changes the AAD."""
    a = valid()
    fields: dict[str, object] = {
        "key_id": a.key_id,
        "key_version": a.key_version,
        "profile": a.profile,
        "iv": a.iv,
        "body": a.body,
    }
    fields.update(change)
    b = CiphertextBlob(**fields)  # type: ignore[arg-type]
    assert a.aad({}) != b.aad({})


def test_aad_binds_encryption_context() -> None:
    """A different context (value, key, extra pair, or none) gives a different AAD."""
    blob = valid()
    variants = [{}, {"a": "1"}, {"a": "2"}, {"A": "1"}, {"a": "1", "b": ""}]
    aads = {blob.aad(ctx) for ctx in variants}
    assert len(aads) == len(variants)


def test_repr_hides_the_body() -> None:
    """repr and str of a blob show neither the body bytes nor their hex or base64."""
    body = bytes.fromhex("c0ffee00deadbeef" * 4) + b"SECRET-BODY-BYTES"
    body += bytes(16 - len(body) % 16)  # CBC: a whole number of blocks before the tag
    blob = CiphertextBlob(KEY_ID, 1, CBC, bytes(16), body + bytes(32))
    for text in (repr(blob), str(blob)):
        assert "body" not in text
        assert "SECRET" not in text
        assert "c0ffee" not in text.lower()
        assert repr(blob.body) not in text
        assert base64.b64encode(blob.body).decode() not in text
        assert KEY_ID in text


# --- strict parsing ----------------------------------------------------------------------------


@given(data=st.binary(max_size=200))
def test_parse_of_arbitrary_bytes_only_raises_invalid_ciphertext(data: bytes) -> None:
    """Random bytes either parse canonically or raise InvalidCiphertextException."""
    blob = parse_or_none(data)
    if blob is not None:
        assert blob.to_bytes() == data


@given(
    profile=st.sampled_from(MechanismProfile),
    key_version=st.integers(min_value=0, max_value=3),
    rest=st.binary(max_size=120),
)
def test_parse_of_plausible_prefix_and_random_tail_only_raises_invalid_ciphertext(
    profile: MechanismProfile, key_version: int, rest: bytes
) -> None:
    """A valid prefix followed by random bytes parses canonically or is refused."""
    data = bytes([FORMAT_VERSION]) + bytes(16) + struct.pack(">IB", key_version, profile.wire_id)
    blob = parse_or_none(data + rest)
    if blob is not None:
        assert blob.to_bytes() == data + rest
        assert blob.key_version >= 1


@given(blob=blobs(), cut=st.integers(min_value=0, max_value=MAX_CIPHERTEXT_BLOB))
def test_truncated_blob_is_refused_or_parses_canonically(blob: CiphertextBlob, cut: int) -> None:
    """Any prefix of a valid blob is refused, or is itself a valid blob with a shorter body."""
    wire = blob.to_bytes()
    truncated = wire[: min(cut, len(wire) - 1)]
    parsed = parse_or_none(truncated)
    if parsed is not None:
        assert parsed.to_bytes() == truncated
        assert parsed.header() == blob.header()
        assert parsed.body != blob.body


def _assert_flip_detected(blob: CiphertextBlob, flipped: bytes) -> None:
    parsed = parse_or_none(flipped)
    if parsed is not None:
        assert parsed.to_bytes() == flipped
        assert (parsed.header(), parsed.body) != (blob.header(), blob.body)


@given(blob=blobs(), position=st.integers(min_value=0), mask=st.integers(1, 255))
def test_byte_flip_is_refused_or_changes_header_or_body(
    blob: CiphertextBlob, position: int, mask: int
) -> None:
    """Flipping one byte anywhere never yields the same header and body back."""
    wire = bytearray(blob.to_bytes())
    wire[position % len(wire)] ^= mask
    _assert_flip_detected(blob, bytes(wire))


@pytest.mark.parametrize("profile", list(MechanismProfile))
def test_every_single_bit_flip_is_refused_or_changes_header_or_body(
    profile: MechanismProfile,
) -> None:
    """Exhaustively, for every bit of a small blob: each header region included."""
    blob = valid(profile)
    wire = blob.to_bytes()
    refused_in_version = refused_in_profile = 0
    for position, bit in itertools.product(range(len(wire)), range(8)):
        flipped = bytearray(wire)
        flipped[position] ^= 1 << bit
        _assert_flip_detected(blob, bytes(flipped))
        refused = parse_or_none(bytes(flipped)) is None
        refused_in_version += refused and position == 0
        refused_in_profile += refused and position == 21
    assert refused_in_version == 8
    assert refused_in_profile == 8


def test_empty_input_is_refused() -> None:
    assert_rejected(b"")


@pytest.mark.parametrize("size", [MAX_CIPHERTEXT_BLOB + 1, 1 << 20])
def test_oversize_input_is_refused(size: int) -> None:
    """More than 6144 bytes is refused before anything else is looked at."""
    wire = valid().to_bytes()
    assert_rejected(wire + bytes(size - len(wire)))


@pytest.mark.parametrize("version", [0x00, 0x02, 0x80, 0xFF])
def test_unknown_version_is_refused(version: int) -> None:
    wire = bytearray(valid().to_bytes())
    wire[0] = version
    assert_rejected(bytes(wire))


@pytest.mark.parametrize("profile_id", [0, 3, 0x81, 0xFF])
def test_unknown_profile_is_refused(profile_id: int) -> None:
    wire = bytearray(valid().to_bytes())
    wire[21] = profile_id
    assert_rejected(bytes(wire))


def test_key_version_zero_is_refused() -> None:
    wire = bytearray(valid().to_bytes())
    wire[17:21] = bytes(4)
    assert_rejected(bytes(wire))


@pytest.mark.parametrize("length", [1, 17, 21, 22, 33])
def test_input_ending_inside_the_header_is_refused(length: int) -> None:
    """Too short for version, key id, key version, profile or the IV."""
    assert_rejected(valid().to_bytes()[:length])


@pytest.mark.parametrize(
    ("profile", "body_length", "accepted"),
    [
        (GCM, 0, False),
        (GCM, 15, False),
        (GCM, 16, True),  # empty plaintext, tag only
        (GCM, MAX_PLAINTEXT + 16, True),
        (GCM, MAX_PLAINTEXT + 17, False),
        (CBC, 32, False),  # tag only: CBC-PAD always yields at least one block
        (CBC, 32 + 15, False),
        (CBC, 32 + 16, True),
        (CBC, 32 + 17, False),
        (CBC, 32 + MAX_PLAINTEXT + 16, True),
        (CBC, 32 + MAX_PLAINTEXT + 32, False),
    ],
)
def test_body_length_limits(profile: MechanismProfile, body_length: int, accepted: bool) -> None:
    """The body holds at least a tag, whole CBC blocks, and no more than 4096 bytes' worth."""
    header = valid(profile).header()
    wire = header + bytes(body_length)
    if accepted:
        assert CiphertextBlob.parse(wire).body == bytes(body_length)
    else:
        assert_rejected(wire)


def test_largest_valid_blob_is_within_the_cap() -> None:
    """The blob cap is a hard outer guard: the largest real blob is well below it."""
    largest = max(valid(p, p.max_body_length(MAX_PLAINTEXT)).to_bytes() for p in MechanismProfile)
    assert len(largest) < MAX_CIPHERTEXT_BLOB


@pytest.mark.parametrize("value", ["not bytes", 12, None])
def test_parse_of_a_non_bytes_value_is_refused(value: object) -> None:
    assert_rejected(value)  # type: ignore[arg-type]


# --- construction invariants --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"key_id": KEY_ID.upper()}, ValueError),
        ({"key_id": KEY_ID.replace("-", "")}, ValueError),
        ({"key_id": "alias/foo"}, ValueError),
        ({"key_version": 0}, ValueError),
        ({"key_version": 2**32}, ValueError),
        ({"key_version": True}, TypeError),
        ({"iv": bytes(16)}, ValueError),
        ({"body": bytes(15)}, ValueError),
        ({"body": bytearray(32)}, TypeError),
        ({"profile": "AES_256_GCM"}, TypeError),
    ],
)
def test_constructor_refuses_what_parse_would_refuse(
    change: dict[str, object], error: type[Exception]
) -> None:
    """Every CiphertextBlob instance serializes to bytes that parse back."""
    fields: dict[str, object] = {
        "key_id": KEY_ID,
        "key_version": 1,
        "profile": GCM,
        "iv": bytes(12),
        "body": bytes(32),
    }
    fields.update(change)
    with pytest.raises(error):
        CiphertextBlob(**fields)  # type: ignore[arg-type]


def test_aad_for_refuses_non_canonical_key_id_and_bad_version() -> None:
    with pytest.raises(ValueError, match="canonical"):
        aad_for(KEY_ID.upper(), 1, GCM, {})
    with pytest.raises(ValueError, match="key_version"):
        aad_for(KEY_ID, 0, GCM, {})


# --- encryption context encoding ----------------------------------------------------------------


@given(ctx=contexts, data=st.data())
def test_encryption_context_encoding_is_order_independent(
    ctx: dict[str, str], data: st.DataObject
) -> None:
    """Any insertion order of the same pairs encodes to the same bytes."""
    items = data.draw(st.permutations(list(ctx.items())))
    assert encode_encryption_context(dict(items)) == encode_encryption_context(ctx)


@given(ctx=contexts)
def test_encryption_context_encoding_decodes_back(ctx: dict[str, str]) -> None:
    """The encoding is invertible (hence injective), with keys in UTF-8 byte order."""
    encoded = encode_encryption_context(ctx)
    assert decode_encryption_context(encoded) == ctx
    keys = list(decode_encryption_context(encoded))
    assert keys == sorted(keys, key=lambda k: k.encode("utf-8"))


@given(a=contexts, b=contexts)
def test_different_contexts_encode_differently(a: dict[str, str], b: dict[str, str]) -> None:
    """Injective: equal bytes only for equal contexts."""
    assert (encode_encryption_context(a) == encode_encryption_context(b)) == (a == b)


def test_encryption_context_sorts_by_utf8_bytes_not_insertion() -> None:
    """Keys are ordered by their UTF-8 bytes: "B" < "a" < "é"."""
    encoded = encode_encryption_context({"é": "", "a": "", "B": ""})
    assert list(decode_encryption_context(encoded)) == ["B", "a", "é"]


def test_encryption_context_accepts_the_limits() -> None:
    """65535-byte keys and values and 65535 pairs are allowed."""
    big = "x" * 0xFFFF
    assert len(encode_encryption_context({big: big})) == 2 + 2 * (2 + 0xFFFF)
    many = {str(i): "" for i in range(0xFFFF)}
    assert encode_encryption_context(many)[:2] == b"\xff\xff"


@pytest.mark.parametrize(
    "ctx",
    [
        pytest.param({1: "x"}, id="non-str-key"),
        pytest.param({"k": 1}, id="non-str-value"),
        pytest.param({"k": None}, id="none-value"),
        pytest.param({"k": b"v"}, id="bytes-value"),
        pytest.param({"": "v"}, id="empty-key"),
        pytest.param({"k" * 0x10000: "v"}, id="key-too-long"),
        pytest.param({"k": "v" * 0x10000}, id="value-too-long"),
        pytest.param({"é" * 0x8000: "v"}, id="key-too-long-in-utf8-bytes"),
        pytest.param({"\ud800": "v"}, id="lone-surrogate-key"),
        pytest.param({"k": "a\udfffb"}, id="lone-surrogate-value"),
        pytest.param([("k", "v")], id="not-a-mapping"),
        pytest.param(None, id="none"),
    ],
)
def test_encryption_context_refuses_invalid_input(ctx: object) -> None:
    with pytest.raises(ValidationException) as info:
        encode_encryption_context(ctx)  # type: ignore[arg-type]
    assert info.value.status == 400


def test_encryption_context_refuses_more_than_65535_pairs() -> None:
    with pytest.raises(ValidationException, match="65535 pairs"):
        encode_encryption_context({str(i): "" for i in range(0x10000)})


def test_bad_context_fails_aad_with_validation_not_invalid_ciphertext() -> None:
    """A malformed context is the caller's request error, raised before any decryption."""
    with pytest.raises(ValidationException):
        valid().aad({"": "v"})


# -- version 2: the ciphertext of a key in an external key store -----------------------------

xks_ciphertexts = st.builds(
    XksCiphertext,
    key_id=st.uuids().map(str),
    iv=st.sampled_from([12, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    tag=st.binary(min_size=16, max_size=16),
    metadata=st.binary(max_size=20),
    outer=st.binary(min_size=1, max_size=4146),
)


@given(blob=xks_ciphertexts)
def test_xks_ciphertext_round_trips(blob: XksCiphertext) -> None:
    data = blob.to_bytes()
    assert data[0] == XKS_FORMAT_VERSION
    assert XksCiphertext.parse(data) == blob
    assert XksCiphertext.parse(data).to_bytes() == data
    # The version-1 parser refuses it.
    with pytest.raises(InvalidCiphertextException):
        CiphertextBlob.parse(data)


@given(blob=xks_ciphertexts, cut=st.integers(min_value=0, max_value=60))
def test_xks_ciphertext_refuses_truncation_inside_its_header(blob: XksCiphertext, cut: int) -> None:
    data = blob.to_bytes()
    header = 1 + 16 + 1 + len(blob.iv) + 16 + 1 + len(blob.metadata)
    if cut < header + 1:
        with pytest.raises(InvalidCiphertextException) as info:
            XksCiphertext.parse(data[:cut])
        assert info.value.__cause__ is None
        assert info.value.__context__ is None


@given(data=st.binary(max_size=200))
def test_xks_parser_never_fails_otherwise(data: bytes) -> None:
    with contextlib.suppress(InvalidCiphertextException):
        XksCiphertext.parse(data)


def test_xks_proxy_aad_binds_key_and_context() -> None:
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    aad = XksCiphertext.proxy_aad(arn, {"b": "2", "a": "1"})
    assert aad == (
        b"hsmkms:xks:v1\x00" + arn.encode() + b"\x00"
        + bytes.fromhex("0002 0001 61 0001 31 0001 62 0001 32")
    )  # fmt: skip
    assert aad != XksCiphertext.proxy_aad(arn, {"a": "1"})
    assert aad != XksCiphertext.proxy_aad(arn.replace("1234abcd", "1234abce"), {"b": "2", "a": "1"})
