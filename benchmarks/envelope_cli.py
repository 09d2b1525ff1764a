"""``hsmkms encrypt-file`` / ``decrypt-file --endpoint-url`` against ``cp``, as subprocesses.

Starts an ``hsmkms serve`` on loopback on a fresh data directory, creates one KMS key, writes
a random file (1 GiB by default) on ``--dir`` (default /dev/shm) and, ``--repeat`` times for
each ``--memory`` kind, times by wall clock (the whole process: start-up, imports, the KMS
client, the KMS call, the data)::

    cp PLAIN COPY
    hsmkms encrypt-file PLAIN CT --key-id KEY --endpoint-url URL     [and the --before tree's]
    cp PLAIN COPY
    hsmkms decrypt-file CT OUT --endpoint-url URL                    [and the --before tree's]

Every run writes a fresh 1 GiB file (removed afterwards) and is compared with the ``cp`` just
before it. On a VM, tmpfs speed depends on whether the guest's free pages are still backed by
the host: writing into memory freed a moment ago (``warm``) runs at several GB/s, into memory
the guest handed back to the host (``cold``: free page reporting, a few seconds after a free)
at a fifth of that. So each timed run is prepared the same way: ``warm``: a ``cp`` to a
scratch file, deleted, right before; ``cold``: ``--cold-delay`` seconds of idle first. On a
shared machine the other processes' load still moves every figure: read the same-run ratios.

The CLI runs with the options a user gives (fsync on: free on tmpfs), with its bytecode cached
as an installed package has it (PYTHONDONTWRITEBYTECODE is dropped). ``--before DIR``: also
time the command line of another source tree (``git archive REV | tar -x -C DIR``) run as
``python -m hsmkms.cli.main`` with ``PYTHONPATH=DIR``. Also shows the fixed cost (a 1-byte
file), and from ``wait4`` each process's minor page faults and CPU seconds. MB/s = 10**6 bytes
of plaintext per second.

    .venv/bin/python benchmarks/envelope_cli.py [--size-mib 1024] [--dir /dev/shm] [--repeat 3]
        [--memory warm|cold] [--before DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# Not this script's directory on the path (another benchmark there is named like the stdlib's
# http); tests/ is, for the server launcher and its helpers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

MB = 1_000_000


def _load_server_launcher() -> Any:
    """The test suite's ``hsmkms serve`` launcher (tests/server.py)."""
    spec = importlib.util.spec_from_file_location("hsmkms_tests_server", _ROOT / "tests/server.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _make_input(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Run:
    """One timed subprocess: wall seconds and its resource usage (``wait4``)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        start = time.perf_counter()
        # From a neutral directory: python -m puts the working directory first on the path.
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=tempfile.gettempdir(),
        )
        _, status, usage = os.wait4(proc.pid, 0)
        self.seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        if proc.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {err}")
        self.minflt = usage.ru_minflt
        self.maxrss_mib = usage.ru_maxrss / 1024
        self.cpu = usage.ru_utime + usage.ru_stime

    def mbps(self, size: int) -> float:
        return size / self.seconds / MB


def _hsmkms() -> list[str]:
    script = Path(sys.executable).with_name("hsmkms")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "hsmkms.cli.main"]  # pragma: no cover


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/dev/shm"),  # noqa: S108 - tmpfs, a fresh directory is made in it
        help="where the files go",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-fsync", action="store_true", help="pass --no-fsync to the CLI")
    parser.add_argument("--before", type=Path, help="another hsmkms source tree to time too")
    parser.add_argument(
        "--memory",
        choices=("warm", "cold"),
        action="append",
        help="warm: each timed run writes into memory that a copy just freed (the VM's guest "
        "pages are backed); cold: each timed run starts --cold-delay seconds after the last "
        "free, once the guest has handed freed pages back to the host (free page reporting), "
        "so the output pays for first-touched memory (default: both)",
    )
    parser.add_argument("--cold-delay", type=float, default=6.0)
    parser.add_argument("--no-check", dest="check", action="store_false")
    args = parser.parse_args()
    size = args.size_mib << 20
    args.memory = args.memory or ["warm", "cold"]

    base = Path(tempfile.mkdtemp(prefix="hsmkms-bench-cli-", dir=args.dir))
    server_dir = Path(tempfile.mkdtemp(prefix="hsmkms-bench-cli-server-"))
    try:
        plain, copy, ct, out, scratch = (
            base / n for n in ("plain", "copy", "plain.hkms", "out", "scratch")
        )
        tiny, tiny_ct, tiny_out = (base / n for n in ("tiny", "tiny.hkms", "tiny.out"))
        print(f"# {args.size_mib} MiB in {base} (cpus: {os.cpu_count()})", flush=True)
        _make_input(plain, size)
        tiny.write_bytes(b"x")
        with _load_server_launcher().running_server(server_dir / "data") as server:
            key = server.client().create_key()["KeyMetadata"]["Arn"]
            # As an installed package runs: pip compiles the bytecode at install, so the CLI
            # may cache it here too (PYTHONDONTWRITEBYTECODE would recompile it every run).
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("HSMKMS_", "AWS_")) and k != "PYTHONDONTWRITEBYTECODE"
            }
            env |= {
                "AWS_ACCESS_KEY_ID": server.access_key_id,
                "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
                "AWS_DEFAULT_REGION": server.region,
            }
            common = [
                "--endpoint-url",
                server.endpoint,
                *(("--no-fsync",) if args.no_fsync else ()),
            ]
            clis = {"hsmkms": (_hsmkms(), env)}
            if args.before is not None:
                before_env = env | {"PYTHONPATH": str(args.before.resolve())}
                clis["before"] = ([sys.executable, "-m", "hsmkms.cli.main"], before_env)

            def command(label: str, step: str, src: Path, dst: Path) -> Run:
                cli, cli_env = clis[label]
                extra = ["--key-id", key] if step == "encrypt-file" else []
                return Run([*cli, step, str(src), str(dst), *extra, *common], cli_env)

            for label in clis:
                fixed_enc = command(label, "encrypt-file", tiny, tiny_ct)
                fixed_dec = command(label, "decrypt-file", tiny_ct, tiny_out)
                print(
                    f"{label}: fixed cost (1-byte file): encrypt-file "
                    f"{fixed_enc.seconds * 1000:.0f} ms ({fixed_enc.cpu * 1000:.0f} ms CPU), "
                    f"decrypt-file {fixed_dec.seconds * 1000:.0f} ms "
                    f"({fixed_dec.cpu * 1000:.0f} ms CPU)",
                    flush=True,
                )
            header = (
                f"{'memory':<6} {'run':>3}  {'step':<21} {'seconds':>8} {'MB/s':>7} {'x cp':>6} "
                f"{'minflt':>8} {'cpu s':>6}"
            )
            print(header, flush=True)
            ratios: dict[tuple[str, str], list[float]] = {}
            speeds: dict[tuple[str, str], list[float]] = {}
            cpu: dict[tuple[str, str], list[float]] = {}

            def prepare(memory: str) -> None:
                """Put the next 1 GiB of output on memory of the given kind (see --memory)."""
                if memory == "warm":
                    Run(["cp", str(plain), str(scratch)], env)
                    scratch.unlink()
                else:
                    time.sleep(args.cold_delay)

            def show(memory: str, i: int, name: str, run: Run, ratio: str) -> None:
                print(
                    f"{memory:<6} {i:>3}  {name:<21} {run.seconds:>8.2f} {run.mbps(size):>7.0f} "
                    f"{ratio:>6} {run.minflt:>8} {run.cpu:>6.2f}",
                    flush=True,
                )

            for memory in args.memory:
                for i in range(1, args.repeat + 1):
                    for step in ("encrypt-file", "decrypt-file"):
                        for label in clis:
                            prepare(memory)
                            base_run = Run(["cp", str(plain), str(copy)], env)
                            copy.unlink()
                            speeds.setdefault((memory, "cp"), []).append(base_run.mbps(size))
                            cpu.setdefault((memory, "cp"), []).append(base_run.cpu)
                            show(memory, i, "cp", base_run, "")
                            prepare(memory)
                            if step == "encrypt-file":
                                ct.unlink(missing_ok=True)
                                run = command(label, step, plain, ct)
                            else:
                                out.unlink(missing_ok=True)
                                run = command(label, step, ct, out)
                            name = f"{label} {step}"
                            ratio = run.mbps(size) / base_run.mbps(size)
                            ratios.setdefault((memory, name), []).append(ratio)
                            speeds.setdefault((memory, name), []).append(run.mbps(size))
                            cpu.setdefault((memory, name), []).append(run.cpu)
                            show(memory, i, name, run, f"{ratio:.2f}")
                            if step == "decrypt-file":
                                if args.check and _digest(out) != _digest(plain):
                                    raise SystemExit(f"{label}: round trip mismatch")
                                out.unlink()
        print(
            "summary (MB/s min-max; median CPU seconds; ratio to the cp run just before, "
            "min / median / max):"
        )
        for (memory, name), values in speeds.items():
            line = (
                f"  {memory:<6} {name:<21} {min(values):>5.0f}-{max(values):<5.0f} "
                f"cpu {statistics.median(cpu[memory, name]):.2f} s"
            )
            if (memory, name) in ratios:
                got = ratios[memory, name]
                line += f"  x cp {min(got):.2f} / {statistics.median(got):.2f} / {max(got):.2f}"
            print(line)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(server_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
