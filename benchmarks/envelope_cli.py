"""``hsmkms encrypt-file`` / ``decrypt-file --endpoint-url`` against ``cp``, as subprocesses.

Starts an ``hsmkms serve`` on loopback on a fresh data directory, creates one KMS key, writes
a random file (1 GiB by default) on ``--dir`` (default /dev/shm) and, ``--repeat`` times, runs
in this order and times by wall clock (the whole process: start-up, imports, the boto3 client,
the KMS call, the data)::

    cp PLAIN COPY
    hsmkms encrypt-file PLAIN CT --key-id KEY --endpoint-url URL
    cp PLAIN COPY
    hsmkms decrypt-file CT OUT --endpoint-url URL

Each output is removed after its run (every run writes a fresh 1 GiB file, as a user's would),
and each CLI run is compared with the ``cp`` just before it: on a VM that pays heavily for
first-touched memory, tmpfs speed drifts from one second to the next, so only a same-run ratio
means anything. Also shows the fixed cost (a 1-byte file) and, from ``wait4``, each process's
page faults and peak RSS. MB/s = 10**6 bytes of plaintext per second. Outputs are not fsynced
(``--fsync`` to include it: on tmpfs it costs nothing anyway).

    .venv/bin/python benchmarks/envelope_cli.py [--size-mib 1024] [--dir /dev/shm] [--repeat 3]
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
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    parser.add_argument("--fsync", action="store_true", help="let the CLI fsync its outputs")
    parser.add_argument("--no-check", dest="check", action="store_false")
    args = parser.parse_args()
    size = args.size_mib << 20

    base = Path(tempfile.mkdtemp(prefix="hsmkms-bench-cli-", dir=args.dir))
    server_dir = Path(tempfile.mkdtemp(prefix="hsmkms-bench-cli-server-"))
    try:
        plain, copy, ct, out = (base / n for n in ("plain", "copy", "plain.hkms", "out"))
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
            common = ["--endpoint-url", server.endpoint, *(() if args.fsync else ("--no-fsync",))]
            cli = _hsmkms()

            def encrypt(src: Path, dst: Path) -> Run:
                argv = [*cli, "encrypt-file", str(src), str(dst), "--key-id", key, *common]
                return Run(argv, env)

            def decrypt(src: Path, dst: Path) -> Run:
                return Run([*cli, "decrypt-file", str(src), str(dst), *common], env)

            fixed_enc = encrypt(tiny, tiny_ct)
            fixed_dec = decrypt(tiny_ct, tiny_out)
            print(
                f"fixed cost (1-byte file): encrypt-file {fixed_enc.seconds * 1000:.0f} ms, "
                f"decrypt-file {fixed_dec.seconds * 1000:.0f} ms",
                flush=True,
            )
            header = (
                f"{'run':>3}  {'step':<12} {'seconds':>8} {'MB/s':>7} {'x cp':>6} "
                f"{'minflt':>8} {'maxrss MiB':>10} {'cpu s':>6}"
            )
            print(header, flush=True)
            ratios: dict[str, list[float]] = {"encrypt-file": [], "decrypt-file": []}
            speeds: dict[str, list[float]] = {"cp": [], "encrypt-file": [], "decrypt-file": []}
            for i in range(1, args.repeat + 1):
                if out.exists():
                    out.unlink()
                ct.unlink(missing_ok=True)
                for name in ("encrypt-file", "decrypt-file"):
                    base_run = Run(["cp", str(plain), str(copy)], env)
                    copy.unlink()
                    run = encrypt(plain, ct) if name == "encrypt-file" else decrypt(ct, out)
                    ratio = run.mbps(size) / base_run.mbps(size)
                    ratios[name].append(ratio)
                    speeds["cp"].append(base_run.mbps(size))
                    speeds[name].append(run.mbps(size))
                    for label, r, x in (("cp", base_run, ""), (name, run, f"{ratio:.2f}")):
                        print(
                            f"{i:>3}  {label:<12} {r.seconds:>8.2f} {r.mbps(size):>7.0f} "
                            f"{x:>6} {r.minflt:>8} {r.maxrss_mib:>10.1f} {r.cpu:>6.2f}",
                            flush=True,
                        )
                if args.check and _digest(out) != _digest(plain):
                    raise SystemExit("round trip mismatch")
                out.unlink()
        print("summary (MB/s min-max; ratio to the cp run just before, min / median / max):")
        for name, values in speeds.items():
            line = f"  {name:<12} {min(values):>5.0f}-{max(values):<5.0f}"
            if name in ratios:
                got = ratios[name]
                line += f"  x cp {min(got):.2f} / {statistics.median(got):.2f} / {max(got):.2f}"
            print(line)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(server_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
