"""Envelope encryption throughput: hsmkms against the AWS Encryption SDK for Python, same key.

Starts an ``hsmkms serve`` on a fresh data directory, creates one KMS key, writes a random
file (1 GiB by default) and times, file to file:

* hsmkms in-process (``ServiceProvider`` on the same data directory),
* hsmkms through the server (``Boto3Provider``, SigV4 over loopback),
* hsmkms engine only (raw data key, output to /dev/null: the cryptography and reads alone),
* the AWS Encryption SDK through the same server (``StrictAwsKmsMasterKeyProvider``, its
  default algorithm suite with key commitment and ECDSA signatures, default 4 KiB frames).

Input files are in the page cache (just written); outputs are not fsynced (``--fsync`` to
include it). Throughput is MB/s = 10**6 bytes of plaintext per second, best of ``--repeat``.

    .venv/bin/python benchmarks/envelope.py [--size-mib 1024] [--dir /dev/shm] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Not this script's directory on the path: another benchmark there is named like a stdlib
# module (http).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


def _load_server_launcher() -> Any:
    """The test suite's ``hsmkms serve`` launcher (tests/server.py)."""
    spec = importlib.util.spec_from_file_location(
        "hsmkms_tests_server", _HERE.parent / "tests" / "server.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


from hsmkms.envelope import (
    Boto3Provider,
    EnvelopeClient,
    EnvelopeHeader,
    ServiceProvider,
    decrypt_stream,
    encrypt_stream,
)

MB = 1_000_000


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


def _best(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def _local_service(data_dir: Path) -> Iterator[Any]:
    from hsmkms.cli.envelope import _local_service as open_local
    from hsmkms.log import configure_logging

    # As a command would (hsmkms.cli.main): logs to stderr, warnings and errors only.
    configure_logging("WARNING")
    with open_local(data_dir) as service:
        yield service


def _hsmkms_rows(
    label: str, client: EnvelopeClient, key: str, work: Path, size: int, args: argparse.Namespace
) -> list[tuple[str, float, float]]:
    plain, ct, out = work / "plain", work / f"{label}.ct", work / f"{label}.out"
    enc = _best(args.repeat, lambda: client.encrypt_file(plain, ct, key, fsync=args.fsync))
    dec = _best(args.repeat, lambda: client.decrypt_file(ct, out, fsync=args.fsync))
    if args.check and _digest(out) != _digest(plain):
        raise SystemExit(f"{label}: round trip mismatch")
    ct.unlink()
    out.unlink()
    return [(label, size / enc / MB, size / dec / MB)]


def _engine_row(work: Path, size: int, args: argparse.Namespace) -> tuple[str, float, float]:
    key = os.urandom(32)
    header = EnvelopeHeader.create(key, key_arn="arn:bench", encrypted_data_key=b"e")
    ct = work / "engine.ct"

    def enc_null() -> None:
        with open(work / "plain", "rb", buffering=0) as src, open(os.devnull, "wb") as dst:
            encrypt_stream(src, dst, header, key)

    def dec_null() -> None:
        with open(ct, "rb", buffering=0) as src, open(os.devnull, "wb") as dst:
            decrypt_stream(src, dst, key)

    with open(work / "plain", "rb", buffering=0) as src, open(ct, "wb", buffering=0) as dst:
        encrypt_stream(src, dst, header, key)
    enc = _best(args.repeat, enc_null)
    dec = _best(args.repeat, dec_null)
    ct.unlink()
    return ("hsmkms engine, raw key -> /dev/null", size / enc / MB, size / dec / MB)


def _sdk_row(
    server: Any, key: str, work: Path, size: int, args: argparse.Namespace
) -> tuple[str, float, float]:
    import aws_encryption_sdk  # type: ignore[import-untyped]
    import botocore.session
    from aws_encryption_sdk.identifiers import CommitmentPolicy  # type: ignore[import-untyped]

    os.environ["AWS_ENDPOINT_URL_KMS"] = server.endpoint
    session = botocore.session.Session()
    session.set_credentials(server.access_key_id, server.secret_access_key)
    session.set_config_variable("region", server.region)
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[key], botocore_session=session
    )
    sdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    plain, ct, out = work / "sdk.plain", work / "sdk.ct", work / "sdk.out"
    if size == args.size:
        plain = work / "plain"
    else:
        _make_input(plain, size)

    def run(mode: str, src_path: Path, dst_path: Path) -> None:
        with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
            with sdk.stream(mode=mode, source=src, key_provider=provider) as stream:
                for chunk in stream:
                    dst.write(chunk)
            if args.fsync:
                dst.flush()
                os.fsync(dst.fileno())

    enc = _best(1, lambda: run("e", plain, ct))
    dec = _best(1, lambda: run("d", ct, out))
    if args.check and _digest(out) != _digest(plain):
        raise SystemExit("sdk: round trip mismatch")
    for path in (ct, out):
        path.unlink()
    return (f"AWS Encryption SDK {aws_encryption_sdk.__version__} via server", size / enc / MB,
            size / dec / MB)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument(
        "--sdk-size-mib", type=int, default=None, help="smaller input for the slow SDK"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the files go")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--fsync", action="store_true", help="fsync outputs (disk-bound)")
    parser.add_argument("--no-sdk", dest="sdk", action="store_false")
    parser.add_argument("--no-check", dest="check", action="store_false")
    args = parser.parse_args()
    args.size = args.size_mib << 20
    sdk_size = (args.sdk_size_mib << 20) if args.sdk_size_mib else args.size

    base = Path(tempfile.mkdtemp(prefix="hsmkms-bench-envelope-", dir=args.dir))
    try:
        work = base / "work"
        work.mkdir()
        print(f"# {args.size_mib} MiB in {work} (cpus: {os.cpu_count()})", flush=True)
        _make_input(work / "plain", args.size)
        rows: list[tuple[str, float, float]] = []
        with _load_server_launcher().running_server(base / "data") as server:
            kms = server.client()
            key = kms.create_key()["KeyMetadata"]["Arn"]
            remote = EnvelopeClient(Boto3Provider(kms))
            rows += _hsmkms_rows("hsmkms via server (boto3)", remote, key, work, args.size, args)
            with _local_service(base / "data") as service:
                local = EnvelopeClient(ServiceProvider(service))
                rows += _hsmkms_rows("hsmkms in-process", local, key, work, args.size, args)
            rows.append(_engine_row(work, args.size, args))
            if args.sdk:
                rows.append(_sdk_row(server, key, work, sdk_size, args))
        width = max(len(r[0]) for r in rows)
        print(f"{'':<{width}}  {'encrypt MB/s':>12}  {'decrypt MB/s':>12}")
        for label, enc, dec in rows:
            print(f"{label:<{width}}  {enc:>12.0f}  {dec:>12.0f}")
        if args.sdk:
            sdk_enc, sdk_dec = rows[-1][1], rows[-1][2]
            for label, enc, dec in rows[:-1]:
                print(f"ratio {label}: encrypt {enc / sdk_enc:.1f}x, decrypt {dec / sdk_dec:.1f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
