"""The SoftHSM2 token set-up: the standalone script and the embedded default agree."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import token_config
from hsmkms import softhsm
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.softhsm import SoftHSMSetupError, ensure_token

pytestmark = pytest.mark.hsm

SCRIPT = Path(__file__).resolve().parents[1] / "softhsm" / "init-token.sh"


def _init(data_dir: Path, *label: str) -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(data_dir), *label],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return proc.stdout


def _token_files(data_dir: Path) -> set[str]:
    return {str(p.relative_to(data_dir)) for p in (data_dir / "tokens").rglob("*")}


def test_script_creates_owner_only_pins_and_a_usable_token(tmp_path: Path) -> None:
    out = _init(tmp_path)
    assert out.strip() == f"export SOFTHSM2_CONF={tmp_path}/softhsm2.conf"
    for name in ("user.pin", "so.pin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
        assert len((tmp_path / name).read_text().strip()) == 32
    assert (tmp_path / "tokens").stat().st_mode & 0o077 == 0
    conf = (tmp_path / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {tmp_path}/tokens" in conf
    ks = Pkcs11Keystore(token_config(tmp_path, "hsmkms"))
    try:
        assert ks.info().label == "hsmkms"
    finally:
        ks.close()


def test_script_is_idempotent(tmp_path: Path) -> None:
    _init(tmp_path)
    pins = [(tmp_path / n).read_text() for n in ("user.pin", "so.pin")]
    files = _token_files(tmp_path)
    _init(tmp_path)
    assert [(tmp_path / n).read_text() for n in ("user.pin", "so.pin")] == pins
    assert _token_files(tmp_path) == files


def test_script_and_embedded_default_recognise_each_others_token(tmp_path: Path) -> None:
    _init(tmp_path, "shared")
    files = _token_files(tmp_path)
    ensure_token(tmp_path, "shared")
    assert _token_files(tmp_path) == files


def test_embedded_default_refuses_a_token_without_its_pin_file(tmp_path: Path) -> None:
    ensure_token(tmp_path)
    os.remove(tmp_path / "user.pin")
    with pytest.raises(SoftHSMSetupError, match=r"user\.pin is missing"):
        ensure_token(tmp_path)


def _unreadable_for_a_moment(data_dir: Path, seconds: float) -> threading.Timer:
    """Make the token's main file unreadable to SoftHSM2 — as it is to a process reading it
    while another one rewrites it — and restore it after ``seconds``."""
    (token_object,) = (data_dir / "tokens").glob("*/token.object")
    original = token_object.read_bytes()
    token_object.write_bytes(b"\0" * 7)
    shown = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env={**os.environ, "SOFTHSM2_CONF": str(data_dir / "softhsm2.conf")},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "Initialized:      yes" not in shown  # SoftHSM2 now shows no initialized token
    timer = threading.Timer(seconds, token_object.write_bytes, (original,))
    timer.start()
    return timer


@pytest.mark.parametrize("how", ["embedded", "script"])
def test_a_token_busy_in_another_process_is_not_initialized_twice(tmp_path: Path, how: str) -> None:
    # Seen in CI: six `hsmkms credentials create` at once; one saw no token while another
    # wrote it, initialized a second "hsmkms" token, and every later opening failed.
    ensure_token(tmp_path)
    files = _token_files(tmp_path)
    timer = _unreadable_for_a_moment(tmp_path, 0.3)
    if how == "embedded":
        ensure_token(tmp_path)
    else:
        _init(tmp_path)
    timer.join()
    assert _token_files(tmp_path) == files
    ks = Pkcs11Keystore(token_config(tmp_path, "hsmkms"))
    try:
        assert ks.info().label == "hsmkms"
    finally:
        ks.close()


def test_a_token_that_stays_unreadable_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_token(tmp_path)
    files = _token_files(tmp_path)
    monkeypatch.setattr(softhsm, "CONSISTENT_VIEW_TIMEOUT", 0.2)
    timer = _unreadable_for_a_moment(tmp_path, 0.5)
    with pytest.raises(
        SoftHSMSetupError, match=r"holds 1 token\(s\) but SoftHSM2 could read only 0"
    ):
        ensure_token(tmp_path)
    timer.join()
    assert _token_files(tmp_path) == files
