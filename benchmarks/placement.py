"""Key placement (``HSMKMS_KEY_PLACEMENT``): token objects against wrapped key versions, through
KmsService in process.

    .venv/bin/python benchmarks/placement.py [--keys 1000] [--seconds 2] [--first-uses 200]

For each placement, in a process of its own on a fresh SoftHSM2 token (a temporary directory)
and a SQLite metadata store sealed by the token (as served), measures:

- CreateKey: ``KmsService.create_key`` (SYMMETRIC_DEFAULT) ``--keys`` times in a row: keys/s
  over the whole run (with ``token``, each key is a token object; SoftHSM2 writes a file per
  object, and its lookups scan them all);
- Encrypt (32 B, an encryption context) cycling over 10 keys;
- Encrypt of a key never used in this process (the first use: with ``wrapped``, one
  ``C_UnwrapKey``), over ``--first-uses`` keys;
- Encrypt of a random key among all ``--keys`` (with ``wrapped``: the 1,024 most recently used
  stay unwrapped; more keys than that unwrap on a miss);
- the token's object count afterwards.

Prints ops/s per placement and the wrapped/token ratio. No assertions: the numbers are for
``docs/keystore.md``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import rate

from hsmkms.softhsm import ensure_token, find_module

LABEL = "hsmkms"
CONTEXT = {"purpose": "benchmark"}


def worker(
    data_dir: Path, placement: str, keys: int, seconds: float, first: int
) -> dict[str, float]:
    """Every measurement of one placement, in this (fresh) process."""
    import structlog

    from hsmkms import models as m
    from hsmkms.keystore.config import KeyPlacement, KeystoreConfig
    from hsmkms.keystore.pkcs11 import Pkcs11Keystore
    from hsmkms.service import KmsService
    from hsmkms.store import MetadataStore
    from hsmkms.store.integrity import TokenRowSealer

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    keystore = Pkcs11Keystore(
        KeystoreConfig(
            module_path=find_module(),
            pin=(data_dir / "user.pin").read_text().strip(),
            token_label=LABEL,
            softhsm2_conf=str(data_dir / "softhsm2.conf"),
            placement=KeyPlacement(placement),
        )
    )
    store = MetadataStore.open_sqlite(data_dir / "bench.db", sealer=TokenRowSealer(keystore))
    service = KmsService(keystore, store, region="us-east-1", account_id="111122223333")
    plaintext = b"p" * 32
    try:
        objects_before = len(keystore.list_objects())
        start = time.perf_counter()
        ids = [service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId for _ in range(keys)]
        create = keys / (time.perf_counter() - start)

        def encrypt(key_id: str) -> object:
            request = m.EncryptRequest(KeyId=key_id, Plaintext=plaintext, EncryptionContext=CONTEXT)
            return service.encrypt(request)

        ten = ids[:10]
        turn = iter(range(1 << 62))

        def cycle_ten() -> object:
            return encrypt(ten[next(turn) % 10])

        results = {"create_key": create, "encrypt_10": rate(cycle_ten, seconds)}
        # A key's first use in this process (with "token", its handle was cached at creation,
        # as happens in the process that created it; another process looks it up once).
        fresh = ids[10 : 10 + first]
        start = time.perf_counter()
        for key_id in fresh:
            encrypt(key_id)
        results["encrypt_first_use"] = len(fresh) / (time.perf_counter() - start)
        chooser = random.Random(7)
        results["encrypt_random"] = rate(lambda: encrypt(chooser.choice(ids)), seconds)
        results["objects_added"] = float(len(keystore.list_objects()) - objects_before)
        return results
    finally:
        store.close()
        keystore.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=1000, help="keys created per placement")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per Encrypt measurement")
    parser.add_argument("--first-uses", type=int, default=200, help="keys used for the first time")
    args = parser.parse_args(argv)
    if args.keys < 10 + args.first_uses:
        parser.error("--keys must be at least 10 + --first-uses")
    found: dict[str, dict[str, float]] = {}
    ctx = multiprocessing.get_context("spawn")
    for placement in ("token", "wrapped"):
        with tempfile.TemporaryDirectory(prefix=f"hsmkms-bench-{placement}-") as tmp:
            data_dir = Path(tmp)
            ensure_token(data_dir, LABEL)
            with ctx.Pool(1) as pool:
                found[placement] = pool.apply(
                    worker, (data_dir, placement, args.keys, args.seconds, args.first_uses)
                )
    print(
        f"SoftHSM2 ({find_module()}), KmsService in process, SQLite store sealed by the token, "
        f"{args.keys} SYMMETRIC_DEFAULT keys per placement, Encrypt of 32 B"
    )
    print(f"{'measurement':<44}{'token':>12}{'wrapped':>12}{'wrapped/token':>16}")
    rows = [
        ("CreateKey (keys/s)", "create_key"),
        ("Encrypt, cycling over 10 keys (ops/s)", "encrypt_10"),
        (f"Encrypt, first use of {args.first_uses} keys (ops/s)", "encrypt_first_use"),
        (f"Encrypt, random key among {args.keys} (ops/s)", "encrypt_random"),
        ("token objects added", "objects_added"),
    ]
    for name, op in rows:
        token, wrapped = found["token"][op], found["wrapped"][op]
        ratio = f"{wrapped / token:>16.2f}" if token else f"{'-':>16}"
        print(f"{name:<44}{token:>12.0f}{wrapped:>12.0f}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
