"""GenerateDataKey through the HTTP API: one node on SQLite against one and two nodes on
PostgreSQL, in the same run (issue 13, "Benchmarks").

    .venv/bin/python benchmarks/scale.py [--seconds 8] [--connections 16] [--workers 2]

Starts a throwaway PostgreSQL server (as the tests do, ``tests/postgres.py``), then, one after
the other:

- one ``hsmkms serve`` node on the embedded default (SQLite) — the baseline;
- one node on PostgreSQL;
- two nodes on the same PostgreSQL database and the same SoftHSM2 token (the second node is
  "another machine": its own data directory, the first one's token by label and PIN file).

Each configuration is loaded with pre-signed GenerateDataKey requests (the load generator of
``benchmarks/http_api.py``: raw keep-alive HTTP/1.1, signed once in advance); two nodes get one
load process each with half the connections. Prints req/s, p50 and p99, and each rate's ratio
to the baseline. The machine's cores are shared by the nodes and the load generators: on two
cores a second node adds contention, not capacity; the ratio says where it saturates.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import argparse
import json
import multiprocessing
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Mapping

from http_api import call, load, presign, wait_http

from hsmkms.sigv4 import Credential
from hsmkms.softhsm import find_module

ROOT = {
    "HSMKMS_ROOT_ACCESS_KEY_ID": "AKIABENCHSCALE000001",
    "HSMKMS_ROOT_SECRET_ACCESS_KEY": "bench-scale-root-secret-0123456789",
}


def start_node(
    data_dir: Path, workers: int, env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """``hsmkms serve`` on a free port with ``env`` (and nothing else of ours); its endpoint."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsmkms.cli.main", "serve", "--data-dir", str(data_dir),
         "--port", "0", "--workers", str(workers), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**clean, **env},
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    endpoint = ""
    for line in proc.stdout:
        found = re.search(rb"serving the KMS API on (\S+)", line)
        if found:
            endpoint = found.group(1).decode()
            break
    if not endpoint:
        raise RuntimeError(f"hsmkms serve on {data_dir} did not start")
    wait_http(endpoint + "/healthz")
    return proc, endpoint


def _load_one(endpoint: str, request: bytes, connections: int, seconds: float) -> dict[str, float]:
    return load(endpoint, request, connections, seconds)


def measure(
    endpoints: list[str], credential: Credential, connections: int, seconds: float
) -> dict[str, float]:
    """GenerateDataKey on every endpoint at once (one load process each); summed req/s and the
    worst p50/p99."""
    key_id = str(call(endpoints[0], credential, "CreateKey", {})["KeyMetadata"]["KeyId"])  # type: ignore[index]
    body = {"KeyId": key_id, "KeySpec": "AES_256"}
    requests = [presign(e, credential, "GenerateDataKey", body) for e in endpoints]
    share = max(1, connections // len(endpoints))
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(endpoints)) as pool:
        pool.starmap(
            _load_one, [(e, r, share, 1.0) for e, r in zip(endpoints, requests, strict=True)]
        )
        results = pool.starmap(
            _load_one, [(e, r, share, seconds) for e, r in zip(endpoints, requests, strict=True)]
        )
    return {
        "rps": sum(r["rps"] for r in results),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "errors": sum(r["errors"] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(_HERE.parent / "tests"))
    import postgres

    credential = Credential(
        ROOT["HSMKMS_ROOT_ACCESS_KEY_ID"], ROOT["HSMKMS_ROOT_SECRET_ACCESS_KEY"], ""
    )
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="hsmkms-scale-") as tmp:
        base = Path(tmp)
        try:
            configurations: list[tuple[str, list[tuple[Path, dict[str, str]]]]] = []
            configurations.append(("1 node, SQLite", [(base / "sqlite", dict(ROOT))]))
            one = {"HSMKMS_DATABASE_URL": postgres.fresh_database_url("scale"), **ROOT}
            configurations.append(("1 node, PostgreSQL", [(base / "pg1", one)]))
            two = {"HSMKMS_DATABASE_URL": postgres.fresh_database_url("scale"), **ROOT}
            first = base / "pg2a"
            other = {
                **two,
                "HSMKMS_MODULE_PATH": find_module(),
                "HSMKMS_TOKEN_LABEL": "hsmkms",
                "HSMKMS_PIN_FILE": str(first / "user.pin"),
                "SOFTHSM2_CONF": str(first / "softhsm2.conf"),
            }
            configurations.append(("2 nodes, PostgreSQL", [(first, two), (base / "pg2b", other)]))
            for name, nodes in configurations:
                procs: list[subprocess.Popen[bytes]] = []
                try:
                    endpoints = []
                    for data_dir, env in nodes:  # in order: the first node makes the token
                        proc, endpoint = start_node(data_dir, args.workers, env)
                        procs.append(proc)
                        endpoints.append(endpoint)
                    result = measure(endpoints, credential, args.connections, args.seconds)
                finally:
                    for proc in procs:
                        os.killpg(proc.pid, signal.SIGTERM)
                        proc.wait(30)
                rows.append((name, result))
                print(
                    f"{name:<22} {result['rps']:>8.0f} req/s  p50 {result['p50_ms']:6.2f} ms  "
                    f"p99 {result['p99_ms']:6.2f} ms  errors {int(result['errors'])}",
                    flush=True,
                )
        finally:
            postgres.stop_cluster()
    baseline = rows[0][1]["rps"]
    for name, result in rows[1:]:
        print(f"ratio  {name:<22} / 1 node, SQLite = {result['rps'] / max(baseline, 1e-9):.2f}")
    print(json.dumps(dict(rows)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
