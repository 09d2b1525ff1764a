"""Key placement (``HSMKMS_KEY_PLACEMENT``): token objects against wrapped key versions, through
KmsService in process.

    .venv/bin/python benchmarks/placement.py [--keys 1000] [--seconds 2] [--first-uses 200]
        [--placements token,wrapped] [--unwrapped 1024]
        [--start-keys 20000] [--start-placement wrapped] [--workers 2]

(``--keys 0``: only the server start; ``--start-keys 0``: no server start.)

For each placement, in a process of its own on a fresh SoftHSM2 token (a temporary directory)
and a SQLite metadata store sealed by the token (as served), measures:

- CreateKey: ``KmsService.create_key`` (SYMMETRIC_DEFAULT) ``--keys`` times in a row: keys/s
  over the whole run (with ``token``, each key is a token object; SoftHSM2 writes a file per
  object, and its lookups scan them all);
- Encrypt (32 B, an encryption context) cycling over 10 keys;
- Encrypt of a key never used in this process (the first use: with ``wrapped``, one
  ``C_UnwrapKey``), over ``--first-uses`` keys;
- Encrypt of a random key among all ``--keys`` right after they were made ("cold": most
  requests are a key's first use in the process), then again once every key was used once
  ("spread": the steady state of a long-running worker; with ``wrapped``, the ``--unwrapped``
  most recently used stay unwrapped, ``HSMKMS_UNWRAPPED_KEYS``, and more keys than that unwrap
  on a miss), in ten slices
  alternating with Encrypt cycling over 10 keys: the spread ratio is the median of the ten
  slices' spread/10-key ratios (the shared machine's load moves between measurements; the
  alternation cancels most of it);
- the process's resident memory (RSS) after that;
- in a second process (another worker: its own token session, handle cache and read caches),
  the first Encrypt with ``--first-uses`` keys the first process made (with ``token``, a
  ``C_FindObjects`` by id over every object of the token; with ``wrapped``, a ``C_UnwrapKey``;
  both: a read of the key's row and a reservation of a block of encryptions), in ms per key,
  and the second Encrypt with the same keys;
- the token's object count afterwards.

Then, unless ``--start-keys 0``: ``hsmkms serve --workers N`` started on a data directory holding
``--start-keys`` keys (made in process through the running system, in ``--start-placement``:
``wrapped`` by default, 170-700 keys/s here; ``token``, about 70) against one holding none, in
the same run: seconds until ``/healthz`` answers, and each worker's RSS then.

Prints the numbers per placement and ratios against the baseline of the same run. No
assertions: the numbers are for ``docs/keystore.md``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import rate

from hsmkms.softhsm import ensure_token, find_module

LABEL = "hsmkms"
CONTEXT = {"purpose": "benchmark"}


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_service(data_dir: Path, placement: str, unwrapped: int) -> tuple[Any, Any, Any]:
    """(keystore, store, service) on the benchmark's token and database, in this process;
    ``unwrapped``: ``HSMKMS_UNWRAPPED_KEYS``."""
    import structlog

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
            unwrapped_cache=unwrapped,
        )
    )
    store = MetadataStore.open_sqlite(data_dir / "bench.db", sealer=TokenRowSealer(keystore))
    service = KmsService(keystore, store, region="us-east-1", account_id="111122223333")
    return keystore, store, service


def encryptor(service: Any) -> Any:
    from hsmkms import models as m

    plaintext = b"p" * 32

    def encrypt(key_id: str) -> object:
        request = m.EncryptRequest(KeyId=key_id, Plaintext=plaintext, EncryptionContext=CONTEXT)
        return service.encrypt(request)

    return encrypt


def worker(
    data_dir: Path, placement: str, keys: int, seconds: float, first: int, unwrapped: int
) -> tuple[dict[str, float], list[str]]:
    """Every in-process measurement of one placement, in this (fresh) process; and the key
    ids."""
    from hsmkms import models as m

    keystore, store, service = open_service(data_dir, placement, unwrapped)
    encrypt = encryptor(service)
    try:
        objects_before = len(keystore.list_objects())
        start = time.perf_counter()
        ids = [service.create_key(m.CreateKeyRequest()).KeyMetadata.KeyId for _ in range(keys)]
        create = keys / (time.perf_counter() - start)
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
        for key_id in ids:  # every key used once in this process: the steady state
            encrypt(key_id)
        # The machine's load changes from second to second: the spread and 10-key rates are
        # taken in alternating slices of 1/10 of --seconds, and the ratio is the median of the
        # slices' ratios.
        spread, tens = [], []
        for _ in range(10):
            tens.append(rate(cycle_ten, seconds / 10))
            spread.append(rate(lambda: encrypt(chooser.choice(ids)), seconds / 10))
        results["encrypt_spread"] = sum(spread) / len(spread)
        results["encrypt_10_after"] = sum(tens) / len(tens)
        results["spread_ratio"] = statistics.median(
            s / t for s, t in zip(spread, tens, strict=True)
        )
        results["rss_mib"] = rss_mib()
        results["objects_added"] = float(len(keystore.list_objects()) - objects_before)
        return results, ids
    finally:
        store.close()
        keystore.close()


def elsewhere(data_dir: Path, placement: str, ids: list[str], unwrapped: int) -> dict[str, float]:
    """In another process (another worker): the first and second Encrypt with each of
    ``ids``, which this process never used."""
    keystore, store, service = open_service(data_dir, placement, unwrapped)
    encrypt = encryptor(service)
    try:
        encrypt(ids[0])  # the process's own first call (token session, caches)
        rest = ids[1:]
        start = time.perf_counter()
        for key_id in rest:
            encrypt(key_id)
        first_ms = (time.perf_counter() - start) / len(rest) * 1000
        start = time.perf_counter()
        for key_id in rest:
            encrypt(key_id)
        second_ms = (time.perf_counter() - start) / len(rest) * 1000
        return {"other_first_ms": first_ms, "other_second_ms": second_ms}
    finally:
        store.close()
        keystore.close()


def make_keys(data_dir: Path, keys: int, placement: str) -> float:
    """``keys`` SYMMETRIC_DEFAULT keys (``placement``) in ``data_dir`` through the running
    system, as ``hsmkms serve`` opens it; keys/s."""
    import structlog

    from hsmkms import models as m
    from hsmkms.config import Settings
    from hsmkms.system import System

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    settings = Settings.load(data_dir).model_copy(update={"key_placement": placement})
    with System.open(settings, audit=None) as system:
        start = time.perf_counter()
        for _ in range(keys):
            system.service.create_key(m.CreateKeyRequest())
        return keys / (time.perf_counter() - start) if keys else 0.0


def descendants(pid: int) -> list[int]:
    """Every live descendant of process ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def serve_start(keys: int, workers: int, placement: str) -> dict[str, float]:
    """Seconds from ``hsmkms serve`` to its first ``/healthz`` answer on a data directory with
    ``keys`` keys (``placement``), and the mean and largest RSS of its processes (MiB)."""
    from scale import start_node

    # scale.py's import of http_api.py takes this directory off sys.path; spawned children
    # (make_keys) import this script again and need _timing.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.append(here)
    with tempfile.TemporaryDirectory(prefix="hsmkms-bench-start-") as tmp:
        data_dir = Path(tmp)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            created = pool.apply(make_keys, (data_dir, keys, placement))
        env = {"HSMKMS_KEY_PLACEMENT": placement}
        start = time.perf_counter()
        proc, _endpoint = start_node(data_dir, workers, env)
        seconds = time.perf_counter() - start
        try:
            rss = [rss_mib(pid) for pid in descendants(proc.pid)] + [rss_mib(proc.pid)]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        return {
            "start_s": seconds,
            "create_key": created,
            "rss_max_mib": max(rss),
            "rss_mean_mib": sum(rss) / len(rss),
            "processes": float(len(rss)),
        }


def compare_placements(
    keys: int, seconds: float, first: int, placements: list[str], unwrapped: int
) -> None:
    """The in-process measurements of ``placements``, printed side by side."""
    found: dict[str, dict[str, float]] = {}
    ctx = multiprocessing.get_context("spawn")
    for placement in placements:
        with tempfile.TemporaryDirectory(prefix=f"hsmkms-bench-{placement}-") as tmp:
            data_dir = Path(tmp)
            ensure_token(data_dir, LABEL)
            with ctx.Pool(1) as pool:
                found[placement], ids = pool.apply(
                    worker, (data_dir, placement, keys, seconds, first, unwrapped)
                )
            # Keys the first process made but never used: those after the first-use run.
            unused = ids[10 + first :][: first + 1]
            with ctx.Pool(1) as pool:
                found[placement].update(
                    pool.apply(elsewhere, (data_dir, placement, unused, unwrapped))
                )
            base = (found[placement]["encrypt_10"] + found[placement]["encrypt_10_after"]) / 2
            found[placement]["cold_ratio"] = found[placement]["encrypt_random"] / base
    print(
        f"SoftHSM2 ({find_module()}), KmsService in process, SQLite store sealed by the token, "
        f"{keys} SYMMETRIC_DEFAULT keys per placement, Encrypt of 32 B, "
        f"HSMKMS_UNWRAPPED_KEYS={unwrapped}"
    )
    ratio_head = "wrapped/token" if len(placements) == 2 else ""
    print(f"{'measurement':<46}" + "".join(f"{p:>12}" for p in placements) + f"{ratio_head:>16}")
    rows = [
        ("CreateKey (keys/s)", "create_key", ".0f"),
        ("Encrypt, cycling over 10 keys (ops/s)", "encrypt_10", ".0f"),
        (f"Encrypt, first use of {first} keys (ops/s)", "encrypt_first_use", ".0f"),
        (f"Encrypt, random among {keys}, cold (ops/s)", "encrypt_random", ".0f"),
        (f"Encrypt, random among {keys}, spread (ops/s)", "encrypt_spread", ".0f"),
        ("Encrypt, 10 keys, alternating with spread (ops/s)", "encrypt_10_after", ".0f"),
        ("spread / 10 keys (median of 10 alternations)", "spread_ratio", ".2f"),
        ("cold / 10 keys (mean of both 10-key rates)", "cold_ratio", ".2f"),
        ("other process: first Encrypt of a key (ms)", "other_first_ms", ".3f"),
        ("other process: second Encrypt (ms)", "other_second_ms", ".3f"),
        ("RSS after the spread run (MiB)", "rss_mib", ".0f"),
        ("token objects added", "objects_added", ".0f"),
    ]
    for name, op, fmt in rows:
        values = [found[p][op] for p in placements]
        line = f"{name:<46}" + "".join(f"{v:>12{fmt}}" for v in values)
        if len(placements) == 2:
            token, wrapped = values
            line += f"{wrapped / token:>16.2f}" if token else f"{'-':>16}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--keys", type=int, default=1000, help="keys created per placement (0: skip)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time per Encrypt measurement")
    parser.add_argument("--first-uses", type=int, default=200, help="keys used for the first time")
    parser.add_argument(
        "--start-keys",
        type=int,
        default=20_000,
        help="keys when starting (0: skip)",
    )
    parser.add_argument("--workers", type=int, default=2, help="hsmkms serve --workers")
    parser.add_argument(
        "--placements",
        default="token,wrapped",
        help="the placements measured in process, comma-separated (token,wrapped)",
    )
    parser.add_argument(
        "--unwrapped",
        type=int,
        default=1024,
        help="HSMKMS_UNWRAPPED_KEYS: wrapped versions a process keeps unwrapped",
    )
    parser.add_argument(
        "--start-placement",
        choices=("token", "wrapped"),
        default="wrapped",
        help="placement of the --start-keys keys",
    )
    args = parser.parse_args(argv)
    if args.keys and args.keys < 10 + args.first_uses:
        parser.error("--keys must be at least 10 + --first-uses (or 0: only the start)")
    placements = args.placements.split(",")
    if not placements or any(p not in ("token", "wrapped") for p in placements):
        parser.error("--placements: token, wrapped or token,wrapped")
    if args.keys:
        compare_placements(args.keys, args.seconds, args.first_uses, placements, args.unwrapped)
    if args.start_keys:
        empty = serve_start(0, args.workers, args.start_placement)
        full = serve_start(args.start_keys, args.workers, args.start_placement)
        print(
            f"\nhsmkms serve --workers {args.workers}, {args.start_placement} placement: "
            f"{args.start_keys} keys made in process at {full['create_key']:.0f} keys/s"
        )
        print(f"{'measurement':<46}{'no keys':>12}{args.start_keys:>12}{'ratio':>16}")
        for name, op, fmt in (
            ("start until /healthz answers (s)", "start_s", ".2f"),
            ("RSS per process, mean (MiB)", "rss_mean_mib", ".0f"),
            ("RSS per process, largest (MiB)", "rss_max_mib", ".0f"),
            ("processes (server + workers)", "processes", ".0f"),
        ):
            factor = full[op] / empty[op] if empty[op] else 0.0
            print(f"{name:<46}{empty[op]:>12{fmt}}{full[op]:>12{fmt}}{factor:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
