"""The PKCS#11 keystore against real SoftHSM2 tokens."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from conftest import GCM_LABEL, SCRATCH_LABEL, new_key_version, new_mac_key, token_config
from hsmkms.keystore.base import KeyMaterialRef
from hsmkms.keystore.errors import (
    DecryptionFailed,
    KeyMaterialMissing,
    ModuleLoadError,
    MultipleTokens,
    PinIncorrect,
    TokenConfigError,
    TokenNotFound,
    TokenRejected,
)
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.profiles import MechanismProfile
from hsmkms.softhsm import TOKEN_WRITE_LOCK

pytestmark = pytest.mark.hsm

AAD = b"header-and-context"


def new_ref(ks: Pkcs11Keystore, version: int = 1) -> KeyMaterialRef:
    return new_key_version(ks, str(uuid.uuid4()), version)


def test_profile_probed_as_gcm_on_softhsm(keystore: Pkcs11Keystore) -> None:
    assert keystore.profile is MechanismProfile.AES_256_GCM


def test_portable_profile_is_forced_by_configuration(portable_keystore: Pkcs11Keystore) -> None:
    assert portable_keystore.profile is MechanismProfile.AES_256_CBC_HMAC_SHA_256
    ref = new_ref(portable_keystore)
    assert ref.profile is MechanismProfile.AES_256_CBC_HMAC_SHA_256
    assert len(ref.object_ids) == 2


def test_created_key_is_sensitive_and_never_extractable(any_keystore: Pkcs11Keystore) -> None:
    ref = new_ref(any_keystore)
    for object_id in ref.object_ids:
        attrs = any_keystore.attributes(
            object_id,
            ["TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "MODIFIABLE"],
        )
        assert attrs == {
            "TOKEN": True,
            "PRIVATE": True,
            "SENSITIVE": True,
            "EXTRACTABLE": False,
            "NEVER_EXTRACTABLE": True,
            "MODIFIABLE": False,
        }
        with pytest.raises(TokenRejected):
            any_keystore.attributes(object_id, ["VALUE"])


def test_keys_have_only_the_capabilities_they_need(portable_keystore: Pkcs11Keystore) -> None:
    ref = new_ref(portable_keystore)
    caps = ["ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE"]
    aes = portable_keystore.attributes(ref.object_ids[0], caps)
    mac = portable_keystore.attributes(ref.object_ids[1], caps)
    assert [c for c in caps if aes[c]] == ["ENCRYPT", "DECRYPT"]
    assert [c for c in caps if mac[c]] == ["SIGN", "VERIFY"]


@pytest.mark.parametrize("size", [1, 15, 16, 17, 32, 4096])
def test_round_trip(any_keystore: Pkcs11Keystore, size: int) -> None:
    ref = new_ref(any_keystore)
    plaintext = os.urandom(size)
    iv, body = any_keystore.encrypt(ref, plaintext, AAD)
    assert len(iv) == ref.encryption_profile.iv_length
    if size >= 16:  # shorter strings can occur in random ciphertext by chance
        assert plaintext not in body
    assert any_keystore.decrypt(ref, iv, body, AAD) == plaintext


def test_each_encryption_uses_a_fresh_iv(any_keystore: Pkcs11Keystore) -> None:
    ref = new_ref(any_keystore)
    ivs = {any_keystore.encrypt(ref, b"same", AAD)[0] for _ in range(50)}
    assert len(ivs) == 50


def test_wrong_aad_fails(any_keystore: Pkcs11Keystore) -> None:
    ref = new_ref(any_keystore)
    iv, body = any_keystore.encrypt(ref, b"secret", AAD)
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, iv, body, AAD + b"x")
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, iv, body, b"")


def test_every_single_byte_flip_fails(any_keystore: Pkcs11Keystore) -> None:
    """Flipping any bit of any byte of IV or body is detected (GCM's CKR_GENERAL_ERROR on
    SoftHSM 2.6.1 surfaces as DecryptionFailed, not as a device error)."""
    ref = new_ref(any_keystore)
    iv, body = any_keystore.encrypt(ref, b"0123456789abcdef0123", AAD)
    blob = iv + body
    n_iv = len(iv)
    for index in range(len(blob)):
        flipped = bytearray(blob)
        flipped[index] ^= 1 << (index % 8)
        with pytest.raises(DecryptionFailed):
            any_keystore.decrypt(ref, bytes(flipped[:n_iv]), bytes(flipped[n_iv:]), AAD)


def test_truncation_fails(any_keystore: Pkcs11Keystore) -> None:
    ref = new_ref(any_keystore)
    iv, body = any_keystore.encrypt(ref, b"0123456789abcdef0123", AAD)
    for cut in range(len(body)):
        with pytest.raises(DecryptionFailed):
            any_keystore.decrypt(ref, iv, body[:cut], AAD)
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(ref, iv[:-1], body, AAD)


def test_wrong_key_fails(any_keystore: Pkcs11Keystore) -> None:
    ref, other = new_ref(any_keystore), new_ref(any_keystore)
    iv, body = any_keystore.encrypt(ref, b"secret", AAD)
    with pytest.raises(DecryptionFailed):
        any_keystore.decrypt(other, iv, body, AAD)


def test_random_bytes_from_the_token(keystore: Pkcs11Keystore) -> None:
    values = [keystore.random(n) for n in (1, 32, 1024)]
    assert [len(v) for v in values] == [1, 32, 1024]
    assert keystore.random(32) != keystore.random(32)
    with pytest.raises(TokenRejected):
        keystore.random(0)


def test_destroy_removes_objects_and_is_idempotent(any_keystore: Pkcs11Keystore) -> None:
    ref = new_ref(any_keystore)
    listed = {o.object_id for o in any_keystore.list_objects()}
    assert set(ref.object_ids) <= listed
    assert any_keystore.exists(ref)
    any_keystore.destroy(ref)
    assert not any_keystore.exists(ref)
    assert not set(ref.object_ids) & {o.object_id for o in any_keystore.list_objects()}
    any_keystore.destroy(ref)
    with pytest.raises(KeyMaterialMissing):
        any_keystore.encrypt(ref, b"x", AAD)


def test_labels_fit_a_yubihsm(keystore: Pkcs11Keystore) -> None:
    """Labels stay within 40 bytes and name the key id and version."""
    key_id = str(uuid.uuid4())
    ref = new_key_version(keystore, key_id, 123456)
    labels = {o.object_id: o.label for o in keystore.list_objects()}
    label = labels[ref.object_ids[0]]
    assert len(label.encode()) <= 40
    assert label.startswith("hsmkms:" + key_id.replace("-", "")[:20] + ":123456:")


def test_repr_never_shows_the_pin(softhsm_dir: Path, keystore: Pkcs11Keystore) -> None:
    pin = (softhsm_dir / "user.pin").read_text().strip()
    config = token_config(softhsm_dir, GCM_LABEL)
    assert pin not in repr(keystore)
    assert pin not in repr(config)


def test_sixteen_threads_two_thousand_mixed_operations(keystore: Pkcs11Keystore) -> None:
    """The regression test for the python-pkcs11 + SoftHSM2 crash under threads."""
    refs = [new_ref(keystore) for _ in range(4)]
    errors: list[BaseException] = []
    checked = [0] * 16

    def worker(n: int) -> None:
        rng = random.Random(n)
        try:
            for i in range(2000):
                ref = refs[rng.randrange(len(refs))]
                op = i % 4
                if op == 3:
                    assert len(keystore.random(16)) == 16
                else:
                    plaintext = rng.randbytes(rng.choice((1, 32, 300)))
                    aad = f"{n}:{i}".encode()
                    iv, body = keystore.encrypt(ref, plaintext, aad)
                    assert keystore.decrypt(ref, iv, body, aad) == plaintext
                checked[n] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert checked == [2000] * 16


def test_key_created_in_one_process_is_used_by_another(
    softhsm_dir: Path, keystore: Pkcs11Keystore
) -> None:
    """The handle cache misses, looks the object up on the token, and finds it."""
    ref = new_ref(keystore)
    iv, body = keystore.encrypt(ref, b"cross-process", AAD)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from conftest import new_key_version, token_config
        from hsmkms.keystore.base import KeyMaterialRef
        from hsmkms.keystore.pkcs11 import Pkcs11Keystore
        ks = Pkcs11Keystore(token_config(Path({str(softhsm_dir)!r}), {GCM_LABEL!r}))
        ref = KeyMaterialRef.from_str({ref.to_str()!r})
        iv, body = bytes.fromhex({iv.hex()!r}), bytes.fromhex({body.hex()!r})
        out = ks.decrypt(ref, iv, body, {AAD!r})
        assert out == b"cross-process", out
        new = new_key_version(ks, "00000000-0000-4000-8000-000000000000")
        iv, body = ks.encrypt(new, b"from-child", b"a")
        print(new.to_str(), iv.hex(), body.hex())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    ref_str, iv_hex, body_hex = proc.stdout.split()
    other = KeyMaterialRef.from_str(ref_str)
    plain = keystore.decrypt(other, bytes.fromhex(iv_hex), bytes.fromhex(body_hex), b"a")
    assert plain == b"from-child"


def _child_round_trip(
    ks: Pkcs11Keystore, ref: KeyMaterialRef, queue: multiprocessing.Queue[str]
) -> None:
    try:
        iv, body = ks.encrypt(ref, b"child", AAD)
        assert ks.decrypt(ref, iv, body, AAD) == b"child"
        assert len(ks.random(8)) == 8
        queue.put("ok")
    except BaseException as exc:  # report, do not hang the parent
        queue.put(repr(exc))


def test_forked_child_can_use_the_keystore(keystore: Pkcs11Keystore) -> None:
    """A forked child re-initializes the module and logs in again before its first call;
    the parent keeps working afterwards."""
    ref = new_ref(keystore)
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=_child_round_trip, args=(keystore, ref, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert result == "ok"
    assert child.exitcode == 0
    iv, body = keystore.encrypt(ref, b"parent", AAD)
    assert keystore.decrypt(ref, iv, body, AAD) == b"parent"


def test_reconnects_after_the_sessions_are_closed(softhsm_dir: Path) -> None:
    """After the login session is closed behind its back (CKR_USER_NOT_LOGGED_IN or an invalid
    session), the keystore reopens, logs in again and the operation succeeds."""
    ks = Pkcs11Keystore(token_config(softhsm_dir, SCRATCH_LABEL))
    try:
        ref = new_ref(ks)
        conn = ks._connection()
        conn.anchor.close()  # C_Logout + C_CloseSession: every session of the process logs out
        iv, body = ks.encrypt(ref, b"after logout", AAD)
        assert ks.decrypt(ref, iv, body, AAD) == b"after logout"
        assert ks._connection() is not conn
        conn2 = ks._connection()
        conn2.session.close()  # the work session's handle becomes invalid
        assert len(ks.random(4)) == 4
    finally:
        ks.close()


def test_wrong_pin_is_reported(softhsm_dir: Path) -> None:
    ks = Pkcs11Keystore(token_config(softhsm_dir, SCRATCH_LABEL, pin="not-the-pin"))
    with pytest.raises(PinIncorrect, match="wrong PIN for token 'hsmkms-scratch'") as info:
        ks.random(1)
    assert "not-the-pin" not in str(info.value)


def test_missing_module_is_reported(softhsm_dir: Path) -> None:
    ks = Pkcs11Keystore(token_config(softhsm_dir, GCM_LABEL, module_path="/nope/libp11.so"))
    with pytest.raises(ModuleLoadError, match=r"not found: /nope/libp11\.so"):
        ks.random(1)


def test_unloadable_module_is_reported(softhsm_dir: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not an ELF file")
    ks = Pkcs11Keystore(token_config(softhsm_dir, GCM_LABEL, module_path=str(bogus)))
    with pytest.raises(ModuleLoadError, match="cannot load PKCS#11 module"):
        ks.random(1)


def test_missing_token_is_reported_after_retrying(softhsm_dir: Path) -> None:
    sleeps: list[float] = []
    config = token_config(softhsm_dir, "no-such-token", discovery_timeout=0.3)
    ks = Pkcs11Keystore(config, sleep=sleeps.append)
    with pytest.raises(TokenNotFound, match="no token matches label=no-such-token"):
        ks.random(1)
    assert sleeps  # discovery was retried before giving up


def test_unreadable_softhsm_config_is_reported(softhsm_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "softhsm2.conf"
    ks = Pkcs11Keystore(token_config(softhsm_dir, GCM_LABEL, softhsm2_conf=str(missing)))
    with pytest.raises(TokenConfigError, match="cannot read SoftHSM2 configuration"):
        ks.random(1)


def test_closed_keystore_refuses_work(softhsm_dir: Path) -> None:
    ks = Pkcs11Keystore(token_config(softhsm_dir, SCRATCH_LABEL))
    assert len(ks.random(2)) == 2
    ks.close()
    with pytest.raises(Exception, match="closed"):
        ks.random(2)


def test_info_describes_module_and_token(keystore: Pkcs11Keystore) -> None:
    info = keystore.info()
    assert info.label == GCM_LABEL
    assert info.manufacturer == "SoftHSM project"
    assert info.module.endswith("libsofthsm2.so")
    assert "AES_GCM" in info.mechanisms
    assert info.profile is MechanismProfile.AES_256_GCM
    assert info.serial


def test_mac_keys_compute_and_verify_inside_the_token(keystore: Pkcs11Keystore) -> None:
    ref = new_mac_key(keystore, f"test-{uuid.uuid4().hex[:8]}")
    assert KeyMaterialRef.from_str(ref.to_str()) == ref
    attrs = keystore.attributes(ref.object_ids[0], ["SIGN", "VERIFY", "ENCRYPT", "EXTRACTABLE"])
    assert attrs == {"SIGN": True, "VERIFY": True, "ENCRYPT": False, "EXTRACTABLE": False}
    tag = keystore.mac(ref, b"record 1")
    assert len(tag) == 32
    assert keystore.mac(ref, b"record 1") == tag
    assert keystore.verify_mac(ref, b"record 1", tag)
    assert not keystore.verify_mac(ref, b"record 2", tag)
    assert not keystore.verify_mac(ref, b"record 1", tag[:-1] + bytes([tag[-1] ^ 1]))
    assert not keystore.verify_mac(ref, b"record 1", tag[:16])
    other = new_mac_key(keystore, f"test-{uuid.uuid4().hex[:8]}")
    assert keystore.mac(other, b"record 1") != tag


def test_mac_key_names_must_fit_a_label(keystore: Pkcs11Keystore) -> None:
    with pytest.raises(TokenRejected):
        new_mac_key(keystore, "x" * 40)


def test_two_softhsm_configurations_in_one_process(
    softhsm_dir: Path, keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    """SoftHSM2 reads SOFTHSM2_CONF only at C_Initialize: a keystore on another data directory
    re-initializes the module for its own config (and must not reach the first one's token,
    whose label is the same); the first keystore reconnects to its own token afterwards."""
    from hsmkms.softhsm import ensure_token

    ref = new_ref(keystore)
    iv, body = keystore.encrypt(ref, b"first", AAD)
    first_serial = keystore.info().serial
    ensure_token(tmp_path)  # another token labelled "hsmkms", with another PIN
    other = Pkcs11Keystore(token_config(tmp_path, GCM_LABEL))
    try:
        assert other.info().serial != first_serial
        assert not set(ref.object_ids) & {o.object_id for o in other.list_objects()}
    finally:
        other.close()
    assert keystore.info().serial == first_serial
    assert keystore.decrypt(ref, iv, body, AAD) == b"first"


def _create_and_use(data_dir: str, count: int) -> list[str]:
    lock = str(Path(data_dir) / "tokens" / TOKEN_WRITE_LOCK)  # as hsmkms configures SoftHSM2
    ks = Pkcs11Keystore(token_config(Path(data_dir), SCRATCH_LABEL, write_lock=lock))
    errors, refs = [], []
    try:
        for _ in range(count):
            try:
                ref = new_ref(ks)
                refs.append(ref)
                iv, body = ks.encrypt(ref, b"x", AAD)
                assert ks.decrypt(ref, iv, body, AAD) == b"x"
            except Exception as exc:
                errors.append(repr(exc))
        for ref in refs:
            ks.destroy(ref)
    finally:
        ks.close()
    return errors


def test_processes_creating_and_using_keys_at_once(softhsm_dir: Path) -> None:
    """SoftHSM 2.6.1 fails about 1 in 1,000 key creations and uses with FunctionFailed,
    MechanismInvalid or GeneralError while other processes write the token (SoftHSMv2 #573,
    #576, #578); the keystore retries those, so three busy processes see no error.

    Each process lists the token's objects when it opens it (the handle cache). Without the
    token write lock that listing, reading a key another process was still making, wrote the
    key's early state over it: the key lost its CKA_ID and CKA_VALUE (the creator's next use
    failed with KeyMaterialMissing, a fresh process found it nowhere). Measured here without
    the lock: 3 lost keys in 120 runs of this test; the CI run of d773048 lost one."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_create_and_use, [(str(softhsm_dir), 40)] * 3)
    assert results == [[], [], []]


def test_two_tokens_with_one_label_are_named_by_serial(tmp_path: Path) -> None:
    """A data directory holding two "hsmkms" tokens (older hsmkms could make one while another
    process wrote the first): the error names both serials; configuring one of them works."""
    from hsmkms.softhsm import ensure_token

    conf = ensure_token(tmp_path)
    pin = (tmp_path / "user.pin").read_text().strip()
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "hsmkms",
         "--so-pin", pin, "--pin", pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    with pytest.raises(MultipleTokens) as info:
        Pkcs11Keystore(token_config(tmp_path, "hsmkms")).info()
    serials = re.findall(r"[0-9a-f]{16}", str(info.value))
    assert len(set(serials)) == 2, str(info.value)
    assert str(info.value).endswith("configure a serial or slot-id")
    chosen = Pkcs11Keystore(token_config(tmp_path, "hsmkms", token_serial=serials[1]))
    try:
        assert chosen.info().serial == serials[1]
    finally:
        chosen.close()
