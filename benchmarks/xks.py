"""The XKS proxy API under load: Encrypt and Decrypt through ``/<prefix>/kms/xks/v1``, with
the KMS API's Encrypt on the same server in the same run as the baseline (issue 12: AWS KMS
gives up on an XKS call after 250 ms, so p99 under load is what matters).

    .venv/bin/python benchmarks/xks.py [--seconds 8] [--connections 16 64] [--workers 2]

Starts ``hsmkms serve`` on a fresh data directory, creates a key and an XKS proxy credential
(``hsmkms xks credentials create``), then loads each request, pre-signed once (SigV4 for
``kms-xks-proxy``; the load generator of ``benchmarks/http_api.py``), at each connection count.
With ``--policy`` the prefix also carries a secondary authorization policy (what it costs).
Prints req/s, p50 and p99 per request, each XKS rate's ratio to the KMS API's Encrypt, and
p99 against the 250 ms budget. Nothing is asserted: the figures depend on the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import argparse
import base64
import json
import os
import signal
import subprocess
import tempfile
import urllib.request
from datetime import UTC, datetime
from urllib.parse import urlsplit

from http_api import REGION, call, load, presign, start_hsmkms

from hsmkms.sigv4 import Credential, SignedRequest, sign

PREFIX = "bench"
PATH = f"/{PREFIX}/kms/xks/v1"
BUDGET_MS = 250.0
"""AWS KMS's timeout for one XKS proxy call (reference/xks-and-key-stores.md)."""


def presign_xks(
    endpoint: str, credential: Credential, route: str, body: dict[str, object]
) -> bytes:
    """The bytes of one complete XKS request signed as AWS KMS signs it (host, x-amz-date)."""
    host = urlsplit(endpoint).netloc
    data = json.dumps(body).encode()
    signed = sign(
        SignedRequest("POST", PATH + route, "", [("Host", host)], data),
        credential,
        region=REGION,
        service="kms-xks-proxy",
        when=datetime.now(UTC),
    )
    lines = [f"POST {PATH}{route} HTTP/1.1", *(f"{n}: {v}" for n, v in signed.headers)]
    lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def send(endpoint: str, raw: bytes) -> dict[str, object]:
    """One pre-signed request through urllib (setup only)."""
    head, _, data = raw.partition(b"\r\n\r\n")
    first, *rest = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in rest)
    headers.pop("Content-Length")
    request = urllib.request.Request(  # noqa: S310 (loopback)
        endpoint + first.split(" ")[1], data=data, headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (loopback)
        found: dict[str, object] = json.loads(resp.read())
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policy", action="store_true", help="give the prefix a policy")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="hsmkms-bench-xks-")
    data_dir = Path(tmp.name) / "data"
    proc, endpoint, root = start_hsmkms(data_dir, args.workers)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSMKMS_")}
        cli = [sys.executable, "-m", "hsmkms.cli.main", "xks"]
        where = ["--data-dir", str(data_dir)]
        create = [*cli, "credentials", "create", "--prefix", PREFIX, "--json", *where]
        made = subprocess.run(create, env=env, check=True, capture_output=True, text=True)
        issued = json.loads(made.stdout)
        credential = Credential(issued["AccessKeyId"], issued["SecretAccessKey"], "")
        key_id = str(call(endpoint, root, "CreateKey", {})["KeyMetadata"]["KeyId"])  # type: ignore[index]
        key_arn = f"arn:aws:kms:{REGION}:111122223333:key/{key_id}"
        principal = "arn:aws:iam::111122223333:role/bench"
        if args.policy:
            policy = Path(tmp.name) / "policy.json"
            policy.write_text(json.dumps({"Statement": [{
                "Effect": "Allow", "Principal": {"AWS": principal},
                "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": key_arn}]}))  # fmt: skip
            subprocess.run(
                [*cli, "policy", "put", "--prefix", PREFIX, "--policy-file", str(policy),
                 "--data-dir", str(data_dir)], env=env, check=True, capture_output=True,
            )  # fmt: skip

        def metadata(operation: str) -> dict[str, str]:
            return {"awsPrincipalArn": principal, "kmsOperation": operation,
                    "kmsRequestId": "bench", "kmsKeyArn": key_arn}  # fmt: skip

        plaintext = base64.b64encode(os.urandom(32)).decode()
        encrypt: dict[str, object] = {
            "requestMetadata": metadata("Encrypt"),
            "plaintext": plaintext,
            "encryptionAlgorithm": "AES_GCM",
        }
        xks_encrypt = presign_xks(endpoint, credential, f"/keys/{key_id}/encrypt", encrypt)
        sealed = send(endpoint, xks_encrypt)
        sealed_members = ("ciphertext", "initializationVector", "authenticationTag",
                          "ciphertextMetadata")  # fmt: skip
        decrypt: dict[str, object] = {
            "requestMetadata": metadata("Decrypt"),
            "encryptionAlgorithm": "AES_GCM",
            **{k: sealed[k] for k in sealed_members},
        }
        kms_encrypt = {"KeyId": key_id, "Plaintext": plaintext}
        requests = {
            "KMS API Encrypt": presign(endpoint, root, "Encrypt", kms_encrypt),
            "XKS Encrypt": xks_encrypt,
            "XKS Decrypt": presign_xks(endpoint, credential, f"/keys/{key_id}/decrypt", decrypt),
        }
        results: dict[str, dict[str, float]] = {}
        for connections in args.connections:
            for name, raw in requests.items():
                load(endpoint, raw, connections, 1.0)  # warm-up
                r = results[f"{name} @{connections}"] = load(
                    endpoint, raw, connections, args.seconds
                )
                print(
                    f"{name:<16} {connections:>3} conns {r['rps']:>7.0f} req/s  "
                    f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                    f"errors {int(r['errors'])}",
                    flush=True,
                )
            base = results[f"KMS API Encrypt @{connections}"]["rps"]
            for name in ("XKS Encrypt", "XKS Decrypt"):
                r = results[f"{name} @{connections}"]
                print(
                    f"ratio  {name:<12} / KMS API Encrypt @{connections} = {r['rps'] / base:.2f}; "
                    f"p99 {r['p99_ms']:.1f} ms = {r['p99_ms'] / BUDGET_MS:.2f} of KMS's 250 ms"
                )
        print(json.dumps(results))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
