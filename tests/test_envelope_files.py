"""Atomic output files and the in-kernel payload copy used by rewrap."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hsmkms.envelope import files
from hsmkms.envelope.files import atomic_output, copy_range


class Boom(Exception):
    pass


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(params=["unnamed", "named"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with O_TMPFILE and with the hidden-temporary-file fallback."""
    if request.param == "named":
        monkeypatch.setattr(files, "_open_unnamed", lambda directory, mode: None)
    return str(request.param)


def test_file_appears_only_when_complete(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "out"
    with atomic_output(target) as f:
        f.write(b"hello")
        assert not target.exists()
        if mode == "unnamed":
            assert _names(tmp_path) == []
    assert target.read_bytes() == b"hello"
    assert _names(tmp_path) == ["out"]


def _write_then_fail(target: Path) -> None:
    with atomic_output(target) as f:
        f.write(b"partial")
        raise Boom


def test_failure_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "out"
    with pytest.raises(Boom):
        _write_then_fail(target)
    assert _names(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(Boom):
        _write_then_fail(target)
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out"]


def test_replaces_an_existing_file(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with atomic_output(target, fsync=False) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out"]


def test_mode_is_filtered_by_the_umask(tmp_path: Path, mode: str) -> None:
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "secret", mode=0o600) as f:
            f.write(b"x")
        with atomic_output(tmp_path / "public", mode=0o666) as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_output(tmp_path / "nope" / "out"):
        pass


def test_copy_range_copies_the_tail(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb", buffering=0) as src, open(tmp_path / "dst", "wb") as dst:
        dst.write(b"HEADER")
        dst.flush()
        copy_range(src, dst, 1000, len(data) - 1000)
    assert (tmp_path / "dst").read_bytes() == b"HEADER" + data[1000:]


def test_copy_range_falls_back_without_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "copy_file_range")
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb", buffering=0) as src, open(tmp_path / "dst", "wb") as dst:
        copy_range(src, dst, 10, len(data) - 10)
    assert (tmp_path / "dst").read_bytes() == data[10:]
