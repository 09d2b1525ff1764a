"""The PKCS#11 keystore's anchors (short values kept in the token for the service) and its
behaviour when the token goes away and comes back, on real SoftHSM2 tokens."""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11e
import pytest

from conftest import new_key_version, token_config
from hsmkms.keystore import pkcs11 as keystore_pkcs11
from hsmkms.keystore.base import MaterialName
from hsmkms.keystore.errors import TokenRejected, TokenUnavailable
from hsmkms.keystore.pkcs11 import Pkcs11Keystore, process_lock
from hsmkms.keystore.pkcs11_mechanisms import MATERIALS, Generated, SymmetricMaterial
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.softhsm import ensure_token

pytestmark = pytest.mark.hsm

KEY_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    """A data directory with a token of its own (the tests move it away)."""
    ensure_token(tmp_path, "hsmkms")
    return tmp_path


@pytest.fixture
def own(token_dir: Path) -> Iterator[Pkcs11Keystore]:
    ks = Pkcs11Keystore(token_config(token_dir, "hsmkms"))
    yield ks
    ks.close()


# -- anchors ----------------------------------------------------------------------------------


def test_an_anchor_reads_back_the_last_value_written(keystore: Pkcs11Keystore) -> None:
    assert keystore.read_anchor("test-anchor-a") is None
    keystore.write_anchor("test-anchor-a", "1:aaaa")
    keystore.write_anchor("test-anchor-a", "2:bbbb")
    keystore.write_anchor("test-anchor-b", "7:cccc")
    assert keystore.read_anchor("test-anchor-a") == "2:bbbb"
    assert keystore.read_anchor("test-anchor-b") == "7:cccc"


def test_an_anchor_value_is_short_ascii(keystore: Pkcs11Keystore) -> None:
    with pytest.raises(TokenRejected, match="at most 40 ASCII characters"):
        keystore.write_anchor("test-anchor-c", "x" * 41)
    with pytest.raises(TokenRejected):
        keystore.write_anchor("test-anchor-c", "é")
    assert keystore.read_anchor("test-anchor-c") is None


def _read_and_write(data_dir: str, queue: multiprocessing.Queue[object]) -> None:
    ks = Pkcs11Keystore(token_config(Path(data_dir), "hsmkms"))
    try:
        queue.put(ks.read_anchor("shared"))
        ks.write_anchor("shared", "from-the-child")
        queue.put(_object_facts(ks))
    finally:
        ks.close()


def _object_facts(ks: Pkcs11Keystore) -> dict[str, object]:
    """The anchor's data object as the token reports it (through the keystore's session)."""
    from pkcs11 import Attribute, ObjectClass

    with process_lock():
        session = ks._connection().session
        query = {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: "hsmkms:shared"}
        (obj,) = list(session.get_objects(query))
        return {name: obj[getattr(Attribute, name)] for name in ("TOKEN", "PRIVATE", "LABEL")}


def test_an_anchor_written_by_another_process_is_read_here(
    own: Pkcs11Keystore, token_dir: Path
) -> None:
    own.write_anchor("shared", "from-the-parent")
    assert own.read_anchor("shared") == "from-the-parent"
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    child = ctx.Process(target=_read_and_write, args=(str(token_dir), queue))
    child.start()
    seen, facts = queue.get(timeout=60), queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert seen == "from-the-parent"
    assert own.read_anchor("shared") == "from-the-child"  # through this process's cached handle
    # A private token object: kept across restarts, readable only after login.
    assert facts == {"TOKEN": True, "PRIVATE": True, "LABEL": "from-the-child"}


# -- the token away -----------------------------------------------------------------------------


def _move_token_away(token_dir: Path) -> tuple[Path, Path]:
    (slot_dir,) = (token_dir / "tokens").iterdir()
    away = token_dir / "away"
    shutil.move(str(slot_dir), str(away))
    return away, slot_dir


def test_a_token_that_went_away_fails_with_the_pkcs11_reason_and_comes_back(
    own: Pkcs11Keystore, token_dir: Path
) -> None:
    ref = new_key_version(own, KEY_ID)
    own.encrypt(ref, b"before", b"")
    assert own.outage() is None
    away, home = _move_token_away(token_dir)
    for _ in range(3):
        with pytest.raises(TokenUnavailable) as gone:
            own.encrypt(ref, b"while away", b"")
        assert gone.value.status == 503
        assert gone.value.shows_cause
        assert gone.value.message == (
            "The HSM token is unavailable (no token matches label=hsmkms). Retry later."
        )
    assert own.outage() == "no token matches label=hsmkms"
    with pytest.raises(TokenUnavailable):
        own.self_test()
    with pytest.raises(TokenUnavailable):
        own.write_anchor("while-away", "1:x")
    shutil.move(str(away), str(home))
    # The next attempt after the retry pause reconnects by itself.
    deadline = time.monotonic() + 30
    while True:
        try:
            iv, body = own.encrypt(ref, b"after", b"")
            break
        except TokenUnavailable:
            assert time.monotonic() < deadline, "no reconnect once the token came back"
            time.sleep(0.05)
    assert own.decrypt(ref, iv, body, b"") == b"after"
    assert own.outage() is None


def test_an_anchor_read_while_the_token_is_away_is_unavailable_not_missing(
    own: Pkcs11Keystore, token_dir: Path
) -> None:
    """A cached anchor object whose token went away reports its handle invalid: that is the
    token away (503), never a missing object (500) or no anchor at all (which would let the
    credential store anchor whatever set the database holds)."""
    new_key_version(own, KEY_ID)
    own.write_anchor("identity:test", "1:a")
    assert own.read_anchor("identity:test") == "1:a"  # the handle is cached now
    away, home = _move_token_away(token_dir)
    with pytest.raises(TokenUnavailable):
        own.read_anchor("identity:test")
    with pytest.raises(TokenUnavailable):
        own.write_anchor("identity:test", "1:b")
    shutil.move(str(away), str(home))
    deadline = time.monotonic() + 30
    while True:
        try:
            assert own.read_anchor("identity:test") == "1:a"
            break
        except TokenUnavailable:
            assert time.monotonic() < deadline, "no reconnect once the token came back"
            time.sleep(0.05)


class _GoneAfterGenerating(SymmetricMaterial):
    """A token whose directory goes away right after it wrote a new object and before it
    answered: the real generation, then the token moved away and its error."""

    def __init__(self, token_dir: Path, moved: list[tuple[Path, Path]]) -> None:
        super().__init__(MATERIALS[KeyMaterialSpec.SYMMETRIC_DEFAULT].facts)
        self._token_dir = token_dir
        self._moved = moved

    def generate(self, session: Any, *args: Any, **kwargs: Any) -> Generated:
        super().generate(session, *args, **kwargs)  # the object is on the token now
        self._moved.append(_move_token_away(self._token_dir))
        raise p11e.GeneralError()


def test_an_object_left_by_a_creation_failing_with_the_token_away_is_destroyed_on_its_return(
    own: Pkcs11Keystore, token_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A creation can fail after the token kept its object (the token's directory moved away
    between the two): the id is remembered, and the object destroyed once the token answers
    again, by the periodic work (settle_abandoned) or the next creation. No orphan stays."""
    spec = KeyMaterialSpec.SYMMETRIC_DEFAULT
    new_key_version(own, KEY_ID)
    before = own.list_objects()
    moved: list[tuple[Path, Path]] = []
    failing = {**MATERIALS, spec: _GoneAfterGenerating(token_dir, moved)}
    monkeypatch.setattr(keystore_pkcs11, "MATERIALS", failing)
    with pytest.raises(TokenUnavailable):
        new_key_version(own, KEY_ID, version=2)
    monkeypatch.undo()
    ((away, home),) = moved
    with pytest.raises(TokenUnavailable):
        own.settle_abandoned()  # still away: kept for later
    shutil.move(str(away), str(home))
    # The object the failed creation left is back with its directory.
    other = Pkcs11Keystore(token_config(token_dir, "hsmkms"))
    left = [o for o in other.list_objects() if o not in before]
    other.close()
    assert [o.label.startswith(f"{MaterialName.key_version(KEY_ID, 2).base}:") for o in left] == [
        True
    ]
    deadline = time.monotonic() + 30
    while True:
        try:
            assert own.settle_abandoned() == 0
            break
        except TokenUnavailable:
            assert time.monotonic() < deadline, "no reconnect once the token came back"
            time.sleep(0.05)
    assert own.list_objects() == before


def test_a_token_directory_removed_entirely_names_the_module_error(
    own: Pkcs11Keystore, token_dir: Path
) -> None:
    ref = new_key_version(own, KEY_ID)
    tokens = token_dir / "tokens"
    aside = token_dir / "tokens-aside"
    tokens.rename(aside)
    try:
        with pytest.raises(TokenUnavailable) as gone:
            own.encrypt(ref, b"x", b"")
        assert "CKR_" in gone.value.detail
        assert str(token_dir) not in gone.value.message  # no path reaches a caller
    finally:
        aside.rename(tokens)
