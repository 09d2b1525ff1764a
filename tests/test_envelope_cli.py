"""``hsmkms encrypt-file`` / ``decrypt-file`` / ``rewrap`` as subprocesses on a real data
directory: files, stdin/stdout, failures in one line, and no partial output ever — after a
wrong context, tampering, a full disk (file size limit), SIGTERM or SIGKILL."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cli_process
import pytest

from hsmkms.envelope import EnvelopeHeader

pytestmark = [pytest.mark.hsm, pytest.mark.database]

SEGMENT = 4096
PLAINTEXT = os.urandom(10 * SEGMENT + 77)

_MAKE_KEYS = """
import sys
from pathlib import Path
from hsmkms import models as m
from hsmkms.cli.envelope import _local_service
with _local_service(Path(sys.argv[1])) as service:
    for _ in range(2):
        print(service.create_key(m.CreateKeyRequest()).KeyMetadata.Arn)
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("HSMKMS_", "AWS_"))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A data directory with an embedded token and two keys (made in a subprocess, so that
    this process's PKCS#11 state is not involved)."""
    path = tmp_path_factory.mktemp("envelope-cli") / "data"
    done = subprocess.run(
        [sys.executable, "-c", _MAKE_KEYS, str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        check=True,
    )
    arns = [line for line in done.stdout.splitlines() if line.startswith("arn:")]
    assert len(arns) == 2
    return path, arns


def _cmd(args: Sequence[str], data: Path) -> list[str]:
    return [sys.executable, "-m", "hsmkms.cli.main", *args, "--data-dir", str(data)]


def hsmkms(
    data: Path,
    *args: str,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return cli_process.run(
        _cmd(args, data),
        input=stdin,
        capture_output=True,
        env=_env(),
        timeout=120,
        check=False,
        cwd=cwd,
        preexec_fn=preexec_fn,
    )


def _one_line_error(done: subprocess.CompletedProcess[bytes], command: str) -> str:
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"hsmkms {command}: "), err
    assert "Traceback" not in err
    return err


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_bytes(PLAINTEXT)
    return tmp_path


def test_files_round_trip_with_context(data_dir: tuple[Path, list[str]], work: Path) -> None:
    data, (arn, _) = data_dir
    done = hsmkms(data, "encrypt-file", str(work / "plain"), str(work / "ct"),
                  "--key-id", arn, "--context", "a=1", "--context", "b=x=y",
                  "--segment-size", str(SEGMENT))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    header = EnvelopeHeader.parse((work / "ct").read_bytes())[0]
    assert dict(header.encryption_context) == {"a": "1", "b": "x=y"}
    assert header.key_arn == arn
    done = hsmkms(data, "decrypt-file", str(work / "ct"), str(work / "out"), "--context", "a=1")
    assert done.returncode == 0, done.stderr
    assert (work / "out").read_bytes() == PLAINTEXT
    assert _leftovers(work) == []


def test_stdin_to_stdout_both_ways(data_dir: tuple[Path, list[str]]) -> None:
    data, (arn, _) = data_dir
    enc = hsmkms(data, "encrypt-file", "-", "-", "--key-id", arn, stdin=PLAINTEXT)
    assert enc.returncode == 0, enc.stderr
    dec = hsmkms(data, "decrypt-file", "-", "-", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    assert dec.stdout == PLAINTEXT
    assert dec.stderr == b""


@pytest.fixture(scope="module")
def small_ciphertext(data_dir: tuple[Path, list[str]]) -> bytes:
    """PLAINTEXT under the first key, context a=1, 4 KiB segments (11 segments)."""
    data, (arn, _) = data_dir
    done = hsmkms(data, "encrypt-file", "-", "-", "--key-id", arn, "--context", "a=1",
                  "--segment-size", str(SEGMENT), stdin=PLAINTEXT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wrong_context_or_key_is_one_line_and_leaves_nothing(
    data_dir: tuple[Path, list[str]], small_ciphertext: bytes, work: Path
) -> None:
    data, (_, other) = data_dir
    (work / "ct").write_bytes(small_ciphertext)
    for args in (["--context", "a=2"], ["--key-id", other]):
        done = hsmkms(data, "decrypt-file", str(work / "ct"), str(work / "out"), *args)
        assert "decryption failed" in _one_line_error(done, "decrypt-file")
        assert not (work / "out").exists()
        assert _leftovers(work) == []


def test_tampered_file_to_stdout_writes_nothing(
    data_dir: tuple[Path, list[str]], small_ciphertext: bytes, work: Path
) -> None:
    """By default stdout gets no byte unless every segment authenticated first."""
    data, _ = data_dir
    message = bytearray(small_ciphertext)
    message[-1] ^= 1
    (work / "bad").write_bytes(message)
    done = hsmkms(data, "decrypt-file", str(work / "bad"), "-")
    _one_line_error(done, "decrypt-file")
    assert done.stdout == b""
    done = hsmkms(data, "decrypt-file", "-", "-", stdin=bytes(message))
    _one_line_error(done, "decrypt-file")
    assert done.stdout == b""
    # Opting into one-pass streaming releases the authenticated segments, then fails.
    done = hsmkms(data, "decrypt-file", str(work / "bad"), "-", "--stream-unverified")
    _one_line_error(done, "decrypt-file")
    assert PLAINTEXT.startswith(done.stdout)
    assert len(done.stdout) == 10 * SEGMENT


def test_tampered_last_segment_fails_and_leaves_the_target_as_it_was(
    data_dir: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Default 1 MiB segments (the threaded engine, outputs preallocated to a size bound and
    cut to the exact length): the files have exactly their format's sizes, and a flipped
    byte in the last segment — found only after every earlier segment was decrypted into the
    unnamed output — fails in one line, with no file made and an existing target unchanged."""
    data, (arn, _) = data_dir
    plaintext = os.urandom((5 << 20) // 2)  # 2.5 segments
    (tmp_path / "plain").write_bytes(plaintext)
    done = hsmkms(data, "encrypt-file", str(tmp_path / "plain"), str(tmp_path / "ct"),
                  "--key-id", arn)  # fmt: skip
    assert done.returncode == 0, done.stderr
    message = (tmp_path / "ct").read_bytes()
    header_length = EnvelopeHeader.parse(message)[1]
    assert len(message) == header_length + len(plaintext) + 3 * 16
    done = hsmkms(data, "decrypt-file", str(tmp_path / "ct"), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_bytes() == plaintext
    (tmp_path / "out").unlink()

    tampered = bytearray(message)
    tampered[-20] ^= 0x01  # inside the last segment's ciphertext
    (tmp_path / "bad").write_bytes(tampered)
    done = hsmkms(data, "decrypt-file", str(tmp_path / "bad"), str(tmp_path / "out"))
    assert "decryption failed" in _one_line_error(done, "decrypt-file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ct", "plain"]
    (tmp_path / "out").write_bytes(b"old")
    done = hsmkms(data, "decrypt-file", str(tmp_path / "bad"), str(tmp_path / "out"))
    _one_line_error(done, "decrypt-file")
    assert (tmp_path / "out").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ct", "out", "plain"]


def test_truncated_input_stream_leaves_no_output(
    data_dir: tuple[Path, list[str]], small_ciphertext: bytes, work: Path
) -> None:
    data, _ = data_dir
    message = small_ciphertext
    for cut in (10, len(message) - SEGMENT - 16, len(message) - 1):
        done = hsmkms(data, "decrypt-file", "-", str(work / "out"), stdin=message[:cut])
        _one_line_error(done, "decrypt-file")
        assert not (work / "out").exists()
        assert _leftovers(work) == []


def test_rewrap_then_decrypt(data_dir: tuple[Path, list[str]], work: Path) -> None:
    data, (arn, other) = data_dir
    hsmkms(data, "encrypt-file", str(work / "plain"), str(work / "ct"), "--key-id", arn,
           "--context", "k=v")  # fmt: skip
    done = hsmkms(data, "rewrap", str(work / "ct"), "--key-id", other)
    assert done.returncode == 0, done.stderr
    assert EnvelopeHeader.parse((work / "ct").read_bytes())[0].key_arn == other
    done = hsmkms(data, "decrypt-file", str(work / "ct"), "-", "--context", "k=v")
    assert done.returncode == 0
    assert done.stdout == PLAINTEXT
    assert _leftovers(work) == []


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["encrypt-file", "plain", "ct", "--key-id", "alias/none"], "not", 1),
        (["encrypt-file", "missing", "ct", "--key-id", "alias/x"], "missing does not exist", 1),
        (["decrypt-file", "plain", "out", "--context", "novalue"], "KEY=VALUE", 2),
        (["rewrap", "-", "--key-id", "alias/x"], "rewrap needs a file, not -", 2),
        (["rewrap", "plain", "--key-id", "alias/x"], "decryption failed", 1),
    ],
)
def test_errors_are_one_line(
    data_dir: tuple[Path, list[str]], work: Path, args: list[str], message: str, code: int
) -> None:
    """One line naming the problem; a usage error (a malformed option) exits 2."""
    data, _ = data_dir
    done = hsmkms(data, *args, cwd=work)
    command = args[0]
    err = done.stderr.decode()
    assert done.returncode == code, err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert err.startswith(f"hsmkms {command}: ")
    assert message.lower() in err.lower()
    assert not (work / "ct").exists()
    assert not (work / "out").exists()


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_leaves_no_output(data_dir: tuple[Path, list[str]], work: Path) -> None:
    """A write that fails midway (here: a 64 KiB file size limit, as EFBIG) leaves nothing."""
    data, (arn, _) = data_dir
    (work / "big").write_bytes(os.urandom(1 << 20))
    done = hsmkms(data, "encrypt-file", str(work / "big"), str(work / "ct"), "--key-id", arn,
                  preexec_fn=_limit_file_size)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert b"Traceback" not in done.stderr
    assert not (work / "ct").exists()
    assert _leftovers(work) == []


@pytest.fixture(scope="module")
def big_ciphertext(data_dir: tuple[Path, list[str]]) -> bytes:
    """3 MiB encrypted under the first key (default 1 MiB segments)."""
    data, (arn, _) = data_dir
    done = hsmkms(data, "encrypt-file", "-", "-", "--key-id", arn, stdin=os.urandom(3 << 20))
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait_for_output(pid: int, directory: Path, at_least: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has an (unnamed) output file in ``directory`` holding at
    least ``at_least`` bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = f"/proc/{pid}/fd/{fd}"
            try:
                if (
                    os.readlink(link).startswith(str(directory))
                    and os.stat(link).st_size >= at_least
                ):
                    return
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError("the output never grew")


@pytest.mark.parametrize(
    ("command", "sig"),
    [
        ("encrypt-file", signal.SIGTERM),
        ("encrypt-file", signal.SIGKILL),
        ("decrypt-file", signal.SIGINT),
        ("decrypt-file", signal.SIGKILL),
    ],
)
def test_interrupted_run_leaves_no_output(
    data_dir: tuple[Path, list[str]], big_ciphertext: bytes, work: Path, command: str, sig: int
) -> None:
    """Killed mid-stream, after output was written: the output file never appears."""
    data, (arn, _) = data_dir
    if command == "encrypt-file":
        feed, args = os.urandom(3 << 20), ["--key-id", arn]
    else:
        feed, args = big_ciphertext, []
    process = subprocess.Popen(
        _cmd([command, "-", str(work / "out"), *args], data),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert process.stdin is not None
    assert process.stderr is not None
    # All but the end: a segment is processed once the next one is in (the last-segment
    # check), so at least one segment of output is written; stdin stays open.
    process.stdin.write(feed[:-1000])
    process.stdin.flush()
    _wait_for_output(process.pid, work, 1 << 20)
    process.send_signal(sig)
    process.wait(30)
    process.stdin.close()
    stderr = process.stderr.read()
    process.stderr.close()
    assert b"Traceback" not in stderr, stderr
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert not (work / "out").exists()
    assert _leftovers(work) == []
