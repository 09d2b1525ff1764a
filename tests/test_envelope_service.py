"""Envelope encryption against the real KMS service (SoftHSM2 token, SQLite store): keys from
the header, wrong key, wrong context, rewrap, data-key caching, atomic files."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from postgres import store_url

from hsmkms import models as m
from hsmkms.envelope import (
    DataKey,
    DataKeyCache,
    DecryptionFailed,
    EnvelopeClient,
    EnvelopeHeader,
    ServiceProvider,
    WrappedKey,
)
from hsmkms.envelope.format import MIN_SEGMENT_SIZE
from hsmkms.errors import DisabledException, NotFoundException, ValidationException
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.store import MetadataStore
from hsmkms.types import EncryptionContext

pytestmark = [pytest.mark.hsm, pytest.mark.database]

CTX = {"purpose": "backup", "host": "db1"}


@pytest.fixture
def service(keystore: Pkcs11Keystore, tmp_path: Path) -> Iterator[KmsService]:
    store = MetadataStore(store_url(tmp_path / "kms.db"))
    yield KmsService(keystore, store, region="us-east-1", account_id="111122223333")
    store.close()


def _key(service: KmsService) -> m.KeyMetadata:
    return service.create_key(m.CreateKeyRequest()).KeyMetadata


@pytest.fixture
def key_a(service: KmsService) -> m.KeyMetadata:
    return _key(service)


@pytest.fixture
def key_b(service: KmsService) -> m.KeyMetadata:
    return _key(service)


class CountingProvider:
    """A real ServiceProvider that counts the KMS calls made through it."""

    def __init__(self, inner: ServiceProvider) -> None:
        self.inner = inner
        self.generated = 0
        self.decrypted = 0
        self.re_encrypted = 0

    def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
        self.generated += 1
        return self.inner.generate_data_key(key_id, context)

    def decrypt_data_key(
        self, encrypted: bytes, context: EncryptionContext, key_id: str | None
    ) -> DataKey:
        self.decrypted += 1
        return self.inner.decrypt_data_key(encrypted, context, key_id)

    def re_encrypt(
        self, encrypted: bytes, context: EncryptionContext, new_key_id: str
    ) -> WrappedKey:
        self.re_encrypted += 1
        return self.inner.re_encrypt(encrypted, context, new_key_id)


@pytest.fixture
def provider(service: KmsService) -> CountingProvider:
    return CountingProvider(ServiceProvider(service))


@pytest.fixture
def client(provider: CountingProvider) -> EnvelopeClient:
    return EnvelopeClient(provider, segment_size=MIN_SEGMENT_SIZE)


PLAINTEXT = os.urandom(5 * MIN_SEGMENT_SIZE + 123)


def _replace_wrap(message: bytes, key_arn: str | None = None, edk: bytes | None = None) -> bytes:
    header, length = EnvelopeHeader.parse(message)
    changed = header.with_wrapped_key(
        key_arn or header.key_arn, edk if edk is not None else header.encrypted_data_key
    )
    return changed.to_bytes() + message[length:]


# --- round trips and the header -----------------------------------------------------------------


def test_round_trip_names_the_key_in_the_header(
    client: EnvelopeClient, key_a: m.KeyMetadata, provider: CountingProvider
) -> None:
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    header = EnvelopeHeader.parse(message)[0]
    assert header.key_arn == key_a.Arn
    assert dict(header.encryption_context) == CTX
    assert client.decrypt_bytes(message) == PLAINTEXT
    assert client.decrypt_bytes(message, CTX) == PLAINTEXT
    assert client.decrypt_bytes(message, {"host": "db1"}) == PLAINTEXT  # a subset is enough
    assert (provider.generated, provider.decrypted) == (1, 3)


def test_alias_and_arn_work_as_key_id(
    service: KmsService, client: EnvelopeClient, key_a: m.KeyMetadata
) -> None:
    service.create_alias(m.CreateAliasRequest(AliasName="alias/files", TargetKeyId=key_a.KeyId))
    message = client.encrypt_bytes(b"data", "alias/files")
    assert EnvelopeHeader.parse(message)[0].key_arn == key_a.Arn
    assert client.decrypt_bytes(message, key_id="alias/files") == b"data"
    assert client.decrypt_bytes(message, key_id=key_a.Arn) == b"data"


def test_files_round_trip(client: EnvelopeClient, key_a: m.KeyMetadata, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(PLAINTEXT)
    info = client.encrypt_file(tmp_path / "plain", tmp_path / "ct", key_a.KeyId, CTX)
    assert info.plaintext_length == len(PLAINTEXT)
    assert info.key_arn == key_a.Arn
    client.decrypt_file(tmp_path / "ct", tmp_path / "out", CTX)
    assert (tmp_path / "out").read_bytes() == PLAINTEXT
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o600
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- wrong key, wrong context, tampering -------------------------------------------------------


def test_wrong_context_fails(client: EnvelopeClient, key_a: m.KeyMetadata) -> None:
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    for expected in ({"purpose": "prod"}, {"other": "x"}, {**CTX, "extra": "1"}):
        with pytest.raises(DecryptionFailed):
            client.decrypt_bytes(message, expected)


def test_context_changed_in_the_header_fails_at_kms(
    client: EnvelopeClient, key_a: m.KeyMetadata, provider: CountingProvider
) -> None:
    """A header context rewritten (validly encoded) is refused by KMS (AAD of the data key)."""
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    header, length = EnvelopeHeader.parse(message)
    forged = EnvelopeHeader(
        header.segment_size,
        header.salt,
        {"purpose": "backup", "host": "db2"},
        header.key_arn,
        header.encrypted_data_key,
        header.commitment,
    )
    with pytest.raises(DecryptionFailed):
        client.decrypt_bytes(forged.to_bytes() + message[length:])
    assert provider.decrypted == 1


def test_wrong_key_id_fails(
    client: EnvelopeClient, key_a: m.KeyMetadata, key_b: m.KeyMetadata
) -> None:
    """Requiring another key than the one in the header fails (KMS IncorrectKeyException)."""
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    with pytest.raises(DecryptionFailed):
        client.decrypt_bytes(message, key_id=key_b.KeyId)


def test_header_naming_another_key_fails(
    client: EnvelopeClient, key_a: m.KeyMetadata, key_b: m.KeyMetadata
) -> None:
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    with pytest.raises(DecryptionFailed):
        client.decrypt_bytes(_replace_wrap(message, key_arn=key_b.Arn))


def test_encrypted_data_key_from_another_message_fails(
    client: EnvelopeClient, key_a: m.KeyMetadata
) -> None:
    """A valid wrapped key of another message (same key, same context) opens at KMS but
    gives another data key: the commitment check refuses it."""
    first = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    second = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    other_edk = EnvelopeHeader.parse(second)[0].encrypted_data_key
    with pytest.raises(DecryptionFailed):
        client.decrypt_bytes(_replace_wrap(first, edk=other_edk))


def test_flipped_encrypted_data_key_fails(client: EnvelopeClient, key_a: m.KeyMetadata) -> None:
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    edk = bytearray(EnvelopeHeader.parse(message)[0].encrypted_data_key)
    for offset in (0, 1, 20, len(edk) // 2, len(edk) - 1):
        tampered = bytearray(edk)
        tampered[offset] ^= 1
        with pytest.raises(DecryptionFailed):
            client.decrypt_bytes(_replace_wrap(message, edk=bytes(tampered)))


def test_disabled_key_reports_the_kms_error(
    service: KmsService, client: EnvelopeClient, key_a: m.KeyMetadata
) -> None:
    """Operational KMS errors keep their class: the operator needs to know the key is off."""
    message = client.encrypt_bytes(b"x", key_a.KeyId)
    service.disable_key(m.DisableKeyRequest(KeyId=key_a.KeyId))
    with pytest.raises(DisabledException):
        client.decrypt_bytes(message)
    with pytest.raises(DisabledException):
        client.encrypt_bytes(b"x", key_a.KeyId)


def test_unknown_key_reports_not_found(client: EnvelopeClient) -> None:
    with pytest.raises(NotFoundException):
        client.encrypt_bytes(b"x", "alias/nope")


def test_failed_decrypt_file_leaves_no_output(
    client: EnvelopeClient, key_a: m.KeyMetadata, tmp_path: Path
) -> None:
    """Tampering in the last segment: the output never appears, an old file is kept."""
    message = bytearray(client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX))
    message[-3] ^= 1
    (tmp_path / "ct").write_bytes(message)
    before = set(os.listdir(tmp_path))
    with pytest.raises(DecryptionFailed):
        client.decrypt_file(tmp_path / "ct", tmp_path / "out")
    assert set(os.listdir(tmp_path)) == before
    (tmp_path / "existing").write_bytes(b"old")
    with pytest.raises(DecryptionFailed):
        client.decrypt_file(tmp_path / "ct", tmp_path / "existing")
    assert (tmp_path / "existing").read_bytes() == b"old"
    assert set(os.listdir(tmp_path)) == before | {"existing"}


def test_authenticate_first_writes_nothing_on_failure(
    client: EnvelopeClient, key_a: m.KeyMetadata
) -> None:
    """To a stream, a bad last segment means not a single byte was written."""
    message = bytearray(client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX))
    message[-1] ^= 1
    sink = io.BytesIO()
    with pytest.raises(DecryptionFailed):
        client.decrypt(io.BytesIO(bytes(message)), sink, authenticate_first=True)
    assert sink.getvalue() == b""
    good = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    client.decrypt(io.BytesIO(good), sink, authenticate_first=True)
    assert sink.getvalue() == PLAINTEXT


def test_authenticate_first_from_a_seekable_file(
    client: EnvelopeClient, key_a: m.KeyMetadata, tmp_path: Path
) -> None:
    (tmp_path / "ct").write_bytes(client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX))
    sink = io.BytesIO()
    with open(tmp_path / "ct", "rb", buffering=0) as source:
        client.decrypt(source, sink, authenticate_first=True)
    assert sink.getvalue() == PLAINTEXT


# --- rewrap ------------------------------------------------------------------------------------


def test_rewrap_then_decrypt(
    client: EnvelopeClient,
    key_a: m.KeyMetadata,
    key_b: m.KeyMetadata,
    provider: CountingProvider,
    tmp_path: Path,
) -> None:
    path = tmp_path / "ct"
    path.write_bytes(client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX))
    path.chmod(0o640)
    old = path.read_bytes()
    old_header, old_length = EnvelopeHeader.parse(old)
    info = client.rewrap_file(path, key_b.KeyId)
    new = path.read_bytes()
    new_header, new_length = EnvelopeHeader.parse(new)
    assert info.key_arn == new_header.key_arn == key_b.Arn
    assert new[new_length:] == old[old_length:]  # the payload is copied as it is
    assert new_header.bound_prefix() == old_header.bound_prefix()
    assert new_header.encrypted_data_key != old_header.encrypted_data_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert provider.re_encrypted == 1
    assert provider.decrypted == 0
    assert client.decrypt_bytes(new, CTX) == PLAINTEXT
    assert client.decrypt_bytes(new, key_id=key_b.KeyId) == PLAINTEXT
    with pytest.raises(DecryptionFailed):
        client.decrypt_bytes(new, key_id=key_a.KeyId)


def test_rewrap_of_a_tampered_file_fails_and_keeps_it(
    client: EnvelopeClient, key_a: m.KeyMetadata, key_b: m.KeyMetadata, tmp_path: Path
) -> None:
    message = client.encrypt_bytes(PLAINTEXT, key_a.KeyId, CTX)
    edk = bytearray(EnvelopeHeader.parse(message)[0].encrypted_data_key)
    edk[-1] ^= 1
    tampered = _replace_wrap(message, edk=bytes(edk))
    path = tmp_path / "ct"
    path.write_bytes(tampered)
    with pytest.raises(DecryptionFailed):
        client.rewrap_file(path, key_b.KeyId)
    assert path.read_bytes() == tampered
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rewrap_refuses_garbage(
    client: EnvelopeClient, key_b: m.KeyMetadata, tmp_path: Path
) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"not an envelope at all" * 10)
    with pytest.raises(DecryptionFailed):
        client.rewrap_file(path, key_b.KeyId)


# --- data-key caching --------------------------------------------------------------------------


def test_cache_is_off_by_default(
    client: EnvelopeClient, key_a: m.KeyMetadata, provider: CountingProvider
) -> None:
    for _ in range(5):
        client.encrypt_bytes(b"small", key_a.KeyId, CTX)
    assert client.cache is None
    assert provider.generated == 5


def test_cache_reuses_a_key_for_max_messages(
    provider: CountingProvider, key_a: m.KeyMetadata
) -> None:
    cache = DataKeyCache(max_messages=4, max_bytes=1 << 30, max_age=300)
    client = EnvelopeClient(provider, cache=cache)
    messages = [client.encrypt_bytes(b"object %d" % i, key_a.KeyId, CTX) for i in range(10)]
    assert provider.generated == 3  # messages 1-4, 5-8, 9-10
    stats = cache.stats
    assert (stats.kms_calls, stats.kms_calls_saved, stats.entries) == (3, 7, 1)
    edks = [EnvelopeHeader.parse(msg)[0].encrypted_data_key for msg in messages]
    assert len(set(edks)) == 3
    salts = {EnvelopeHeader.parse(msg)[0].salt for msg in messages}
    assert len(salts) == 10  # a fresh message key every time
    for i, message in enumerate(messages):
        assert client.decrypt_bytes(message, CTX) == b"object %d" % i


def test_cache_byte_limit(provider: CountingProvider, key_a: m.KeyMetadata) -> None:
    cache = DataKeyCache(max_messages=100, max_bytes=250, max_age=300)
    client = EnvelopeClient(provider, cache=cache)
    for _ in range(5):
        client.encrypt_bytes(b"x" * 100, key_a.KeyId)  # 2 messages per key fit in 250 bytes
    assert cache.stats.kms_calls == 3
    assert cache.stats.kms_calls_saved == 2
    client.encrypt_bytes(b"x" * 251, key_a.KeyId)  # larger than the limit: never cached
    assert provider.generated == 4


def test_cache_age_limit(provider: CountingProvider, key_a: m.KeyMetadata) -> None:
    now = [1000.0]
    cache = DataKeyCache(max_messages=100, max_bytes=1 << 20, max_age=60, clock=lambda: now[0])
    client = EnvelopeClient(provider, cache=cache)
    client.encrypt_bytes(b"a", key_a.KeyId)
    now[0] += 59
    client.encrypt_bytes(b"b", key_a.KeyId)
    now[0] += 2
    client.encrypt_bytes(b"c", key_a.KeyId)
    assert provider.generated == 2
    assert cache.stats.kms_calls_saved == 1


def test_cache_keys_by_key_id_and_context(
    provider: CountingProvider, key_a: m.KeyMetadata, key_b: m.KeyMetadata
) -> None:
    cache = DataKeyCache(max_messages=100, max_bytes=1 << 20, max_age=300)
    client = EnvelopeClient(provider, cache=cache)
    for key_id, context in [(key_a.KeyId, CTX), (key_a.KeyId, {"other": "1"}), (key_b.KeyId, CTX)]:
        for _ in range(3):
            message = client.encrypt_bytes(b"z", key_id, context)
            assert client.decrypt_bytes(message, context) == b"z"
    assert provider.generated == 3
    assert cache.stats.entries == 3
    assert cache.stats.kms_calls_saved == 6


def test_cache_bypasses_streams_of_unknown_length(
    provider: CountingProvider, key_a: m.KeyMetadata
) -> None:
    cache = DataKeyCache(max_messages=100, max_bytes=1 << 20, max_age=300)
    client = EnvelopeClient(provider, cache=cache)
    for _ in range(3):
        client.encrypt(io.BytesIO(b"stream"), io.BytesIO(), key_a.KeyId)
    stats = cache.stats
    assert (stats.kms_calls, stats.bypassed, stats.kms_calls_saved, stats.entries) == (3, 3, 0, 0)


def test_cache_clear_wipes_keys(provider: CountingProvider, key_a: m.KeyMetadata) -> None:
    cache = DataKeyCache(max_messages=100, max_bytes=1 << 20, max_age=300)
    client = EnvelopeClient(provider, cache=cache)
    client.encrypt_bytes(b"a", key_a.KeyId)
    entry = next(iter(cache._entries.values()))
    held = entry.key.plaintext
    cache.clear()
    assert held == bytearray(32)
    assert cache.stats.entries == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_messages": 0, "max_bytes": 1, "max_age": 1},
        {"max_messages": 2**32 + 1, "max_bytes": 1, "max_age": 1},
        {"max_messages": 1, "max_bytes": -1, "max_age": 1},
        {"max_messages": 1, "max_bytes": 1, "max_age": 0},
    ],
)
def test_cache_limits_are_validated(kwargs: Mapping[str, int]) -> None:
    with pytest.raises(ValidationException):
        DataKeyCache(
            max_messages=kwargs["max_messages"],
            max_bytes=kwargs["max_bytes"],
            max_age=kwargs["max_age"],
        )


# --- secrets -----------------------------------------------------------------------------------


def test_data_keys_are_redacted_and_wiped(provider: CountingProvider, key_a: m.KeyMetadata) -> None:
    key = provider.generate_data_key(key_a.KeyId, CTX)
    secret = bytes(key.plaintext)
    for text in (repr(key), str(key)):
        assert secret.hex() not in text
        assert "redacted" in text
    key.wipe()
    assert key.plaintext == bytearray(32)


def test_client_wipes_the_data_key_after_use(service: KmsService, key_a: m.KeyMetadata) -> None:
    seen: list[DataKey] = []

    class Spy(ServiceProvider):
        def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
            key = super().generate_data_key(key_id, context)
            seen.append(key)
            return key

        def decrypt_data_key(
            self, encrypted: bytes, context: EncryptionContext, key_id: str | None
        ) -> DataKey:
            key = super().decrypt_data_key(encrypted, context, key_id)
            seen.append(key)
            return key

    client = EnvelopeClient(Spy(service))
    client.decrypt_bytes(client.encrypt_bytes(b"secret", key_a.KeyId))
    assert len(seen) == 2
    assert all(k.plaintext == bytearray(32) for k in seen)


def test_nothing_secret_reaches_the_logs(service: KmsService, key_a: m.KeyMetadata) -> None:
    """Neither the data key nor the plaintext appears in any log event of a round trip."""
    import base64

    from structlog.testing import capture_logs

    seen: list[DataKey] = []

    class Keep(ServiceProvider):
        def generate_data_key(self, key_id: str, context: EncryptionContext) -> DataKey:
            key = super().generate_data_key(key_id, context)
            seen.append(key.copy())
            return key

    plaintext = b"top secret payload " * 10
    client = EnvelopeClient(Keep(service))
    with capture_logs() as events:
        message = client.encrypt_bytes(plaintext, key_a.KeyId, CTX)
        assert client.decrypt_bytes(message, CTX) == plaintext
    text = repr(events)
    data_key = bytes(seen[0].plaintext)
    for secret in (data_key, plaintext):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
        assert repr(secret) not in text
