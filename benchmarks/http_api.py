"""HTTP API load test: pre-signed GenerateDataKey, Encrypt and Decrypt against hsmkms and
moto_server, at several connection counts, in the same run.

Usage::

    .venv/bin/python benchmarks/http_api.py [--connections 16 64] [--seconds 10] [--workers 2]
        [--rounds 1] [--no-moto] [--baseline-tree DIR]
        [--endpoint URL --access-key-id K --secret S]
        [--log-level info --server-log FILE]

``--baseline-tree DIR`` also starts ``hsmkms serve`` from another checkout (its own
``.venv``, e.g. ``/work/main``) and loads it in the same run, alternating with this tree, to
compare two versions under the same background load. ``--rounds N`` repeats every cell N times
(alternating the targets) and prints each round plus the range.

``--log-level info`` runs the server with its access log on (one line per request), written
to ``--server-log`` (default: discarded), to measure what the access log costs.

Without ``--endpoint`` it starts ``hsmkms serve`` on a fresh temporary data directory (and,
unless ``--no-moto``, ``moto_server``), creates a key in each, and loads both in the same run.

The load generator is one asyncio (uvloop) process with raw keep-alive HTTP/1.1 connections
and requests signed once in advance (SigV4 allows replay within 5 minutes; KMS is designed for
it), so no signing or client library runs in the loop. It runs in its own process pinned away
from nothing in particular: on a 2-core machine it competes with the server for CPU, so the
figures are a lower bound for the server.

Prints requests/s, p50 and p99 latency per target, operation and connection count, the server's
CPU time per request (all its processes and threads, from /proc: a figure that other load on
the machine disturbs far less than requests/s), and the
hsmkms/moto ratio of each (median of the rounds, with the range of the per-round ratios).
hsmkms's own view of the same latencies is in its ``/metrics`` histogram
(``hsmkms_request_duration_seconds``), which starts when the request reaches the application:
the difference to the client's figures is the time in the kernel, uvicorn and the queue.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's http package: keep its directory off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

from hsmkms.sigv4 import Credential, SignedRequest, sign

REGION = "us-east-1"


def presign(
    endpoint: str, credential: Credential, target: str, body: Mapping[str, object]
) -> bytes:
    """The bytes of one complete signed HTTP/1.1 request."""
    host = urlsplit(endpoint).netloc
    data = json.dumps(body).encode()
    headers = [
        ("Host", host),
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", f"TrentService.{target}"),
    ]
    signed = sign(
        SignedRequest("POST", "/", "", headers, data),
        credential,
        region=REGION,
        when=datetime.now(UTC),
    )
    lines = ["POST / HTTP/1.1", *(f"{n}: {v}" for n, v in signed.headers)]
    lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def call(
    endpoint: str, credential: Credential, target: str, body: dict[str, object]
) -> dict[str, object]:
    """One signed request through urllib (setup only)."""
    raw = presign(endpoint, credential, target, body)
    head, _, data = raw.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    headers.pop("Content-Length")
    request = urllib.request.Request(  # noqa: S310 (loopback)
        endpoint + "/", data=data, headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (loopback)
        result: dict[str, object] = json.loads(resp.read() or b"{}")
        return result


async def _connection(
    host: str, port: int, request: bytes, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            match = re.search(rb"(?i)content-length: *(\d+)", head)
            if match:
                await reader.readexactly(int(match.group(1)))
            else:  # no length: the body runs to the end of the connection
                await asyncio.wait_for(reader.read(), 30)
            latencies.append(time.perf_counter() - start)
            if not re.match(rb"HTTP/1\.[01] 200", head):
                errors.append(1)
            if (
                not match
                or head.startswith(b"HTTP/1.0")
                or re.search(rb"(?i)connection: *close", head)
            ):
                # HTTP/1.0 servers (Werkzeug, behind moto_server) close after each response.
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _load(
    endpoint: str, request: bytes, connections: int, seconds: float
) -> tuple[list[float], int]:
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    errors: list[int] = []
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(
        *(_connection(host, port, request, stop_at, latencies, errors) for _ in range(connections))
    )
    return latencies, len(errors)


def load(
    endpoint: str, request: bytes, connections: int, seconds: float, pid: int | None = None
) -> dict[str, float]:
    """Load ``endpoint`` with ``request``; with ``pid``, also the server's CPU time per request
    (robust against other load on the machine, unlike requests/s)."""
    cpu_before = _cpu_seconds(pid) if pid is not None else 0.0
    try:
        import uvloop

        latencies, errors = uvloop.run(_load(endpoint, request, connections, seconds))
    except ImportError:  # pragma: no cover
        latencies, errors = asyncio.run(_load(endpoint, request, connections, seconds))
    cpu = _cpu_seconds(pid) - cpu_before if pid is not None else float("nan")
    latencies.sort()
    n = len(latencies)
    return {
        "cpu_us": 1e6 * cpu / n if n else float("nan"),
        "requests": n,
        "errors": errors,
        "rps": n / seconds,
        "p50_ms": 1000 * statistics.median(latencies) if n else float("nan"),
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
    }


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of ``pid`` and its descendants, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, ValueError, IndexError):
        return total
    return total + sum(_cpu_seconds(int(child)) for child in children)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 (loopback)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def start_hsmkms(
    data_dir: Path,
    workers: int,
    log_level: str = "warning",
    log: Path | None = None,
    tree: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str, Credential]:
    """``hsmkms serve`` on a fresh data directory: of this checkout, or of ``tree`` (with its
    own ``.venv``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    python = sys.executable if tree is None else str(tree / ".venv" / "bin" / "python")
    cwd = str(_HERE.parent if tree is None else tree)
    init = [python, "-m", "hsmkms.cli.main", "init", "--data-dir", str(data_dir)]
    subprocess.run(init, env=env, check=True, capture_output=True, cwd=cwd)
    stderr = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [python, "-m", "hsmkms.cli.main", "serve", "--data-dir", str(data_dir),
         "--port", "0", "--workers", str(workers), "--log-level", log_level,
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True, cwd=cwd,
    )  # fmt: skip
    assert proc.stdout is not None
    endpoint = ""
    for line in proc.stdout:
        found = re.search(rb"serving the KMS API on (\S+)", line)
        if found:
            endpoint = found.group(1).decode()
            break
    root = json.loads((data_dir / "root-credentials.json").read_text())
    wait_http(endpoint + "/healthz")
    return proc, endpoint, Credential(root["AccessKeyId"], root["SecretAccessKey"], root["Arn"])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    moto = str(Path(sys.executable).with_name("moto_server"))
    if not Path(moto).exists():
        moto = shutil.which("moto_server") or moto
    proc = subprocess.Popen(
        [moto, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/")
    return proc, endpoint


OPERATIONS = ("GenerateDataKey", "Encrypt", "Decrypt")


def prepare_target(endpoint: str, credential: Credential) -> dict[str, bytes]:
    """Create a key and pre-sign one request per operation."""
    key_id = str(call(endpoint, credential, "CreateKey", {})["KeyMetadata"]["KeyId"])  # type: ignore[index]
    context = {"bench": "1"}
    gdk: dict[str, object] = {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": context}
    blob = call(endpoint, credential, "GenerateDataKey", gdk)["CiphertextBlob"]
    encrypt: dict[str, object] = {
        "KeyId": key_id, "Plaintext": "cGxhaW50ZXh0LW9mLTMyLWJ5dGVzLi4uLi4uLi4=",
        "EncryptionContext": context,
    }  # fmt: skip
    decrypt: dict[str, object] = {"CiphertextBlob": blob, "EncryptionContext": context}
    bodies = {"GenerateDataKey": gdk, "Encrypt": encrypt, "Decrypt": decrypt}
    return {op: presign(endpoint, credential, op, bodies[op]) for op in OPERATIONS}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-moto", action="store_true")
    parser.add_argument("--baseline-tree", type=Path, help="also serve hsmkms from this checkout")
    parser.add_argument("--endpoint")
    parser.add_argument("--access-key-id")
    parser.add_argument("--secret")
    parser.add_argument("--log-level", default="warning", help="the server's (info: access log)")
    parser.add_argument("--server-log", type=Path, help="where the server's log goes")
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory(prefix="hsmkms-bench-")
    targets: dict[str, tuple[str, dict[str, bytes]]] = {}
    pids: dict[str, int] = {}
    try:
        if args.endpoint:
            endpoint = args.endpoint
            credential = Credential(args.access_key_id, args.secret, "")
        else:
            proc, endpoint, credential = start_hsmkms(
                Path(tmp.name) / "data", args.workers, args.log_level, args.server_log
            )
            procs.append(proc)
            pids["hsmkms"] = proc.pid
        targets["hsmkms"] = (endpoint, prepare_target(endpoint, credential))
        if args.baseline_tree:
            proc, base_endpoint, base_credential = start_hsmkms(
                Path(tmp.name) / "base", args.workers, tree=args.baseline_tree.resolve()
            )
            procs.append(proc)
            pids["base"] = proc.pid
            targets["base"] = (base_endpoint, prepare_target(base_endpoint, base_credential))
        if not args.no_moto:
            moto_proc, moto_endpoint = start_moto()
            procs.append(moto_proc)
            pids["moto"] = moto_proc.pid
            moto = Credential("test", "test", "")
            targets["moto"] = (moto_endpoint, prepare_target(moto_endpoint, moto))
        # results[(target, op, connections)] = one dict per round
        results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        for round_no in range(args.rounds):
            for connections in args.connections:
                for op in OPERATIONS:
                    for name, (url, requests) in targets.items():
                        load(url, requests[op], connections, 1.0)  # warm-up
                        r = load(url, requests[op], connections, args.seconds, pids.get(name))
                        results.setdefault((name, op, connections), []).append(r)
                        print(
                            f"round {round_no + 1} {name:<7} {op:<16} c={connections:<4}"
                            f"{r['rps']:>8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                            f"p99 {r['p99_ms']:6.2f} ms  server CPU {r['cpu_us']:5.0f} us/req  "
                            f"errors {int(r['errors'])}",
                            flush=True,
                        )
        print("\nsummary (median of rounds; [range]):")
        for connections in args.connections:
            for op in OPERATIONS:
                for name in targets:
                    rs = results[(name, op, connections)]
                    rps = [r["rps"] for r in rs]
                    p99 = [r["p99_ms"] for r in rs]
                    line = (
                        f"{name:<7} {op:<16} c={connections:<4}{_median(rps):>8.0f} req/s "
                        f"[{min(rps):.0f}-{max(rps):.0f}]  "
                        f"p50 {_median([r['p50_ms'] for r in rs]):6.2f} ms  "
                        f"p99 {_median(p99):6.2f} ms [{min(p99):.2f}-{max(p99):.2f}]  "
                        f"CPU {_median([r['cpu_us'] for r in rs]):4.0f} us/req"
                    )
                    print(line)
                for other in ("moto", "base"):
                    if other not in targets:
                        continue
                    ours = results[("hsmkms", op, connections)]
                    theirs = results[(other, op, connections)]
                    ratios = [
                        a["rps"] / max(b["rps"], 1e-9) for a, b in zip(ours, theirs, strict=True)
                    ]
                    print(
                        f"ratio   {op:<16} c={connections:<4} hsmkms/{other} = "
                        f"{_median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
                    )
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
