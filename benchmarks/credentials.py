"""The cost of the credential set's freshness check (docs/credentials.md, "Freshness").

    .venv/bin/python benchmarks/credentials.py [--seconds 1] [--sizes 1,100,1000]

Makes a fresh SoftHSM2 token and SQLite database in a temporary directory, creates N access
keys, then measures in the same run:

- a lookup answered from memory (the database unchanged: no query, no token call);
- the first lookup after a change of the database (another connection commits a row of an
  unrelated table), which reads the row and checks the set's digest (one SELECT of every key
  id, IV and sealed secret; the token read is skipped while the set is the one last verified);
- the first lookup after a change of the credential set itself (another store rotated a key),
  which also reads the anchors in the token;
- as the baseline measured in the same run, a plain indexed SELECT of one credential row.

Prints microseconds per lookup for each N.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from hsmkms.identity import CredentialStore
from hsmkms.keystore.config import KeystoreConfig
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.log import configure_logging
from hsmkms.softhsm import ensure_token, find_module

ACCOUNT = "111122223333"


def _per_call(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call of ``fn`` over about ``seconds``."""
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return (time.perf_counter() - start) / count * 1e6


def measure(data_dir: Path, size: int, seconds: float) -> dict[str, float]:
    ensure_token(data_dir, "hsmkms")
    keystore = Pkcs11Keystore(
        KeystoreConfig(
            module_path=find_module(),
            pin=(data_dir / "user.pin").read_text().strip(),
            token_label="hsmkms",
            softhsm2_conf=str(data_dir / "softhsm2.conf"),
        )
    )
    url = f"sqlite:///{data_dir / 'id.db'}"
    store = CredentialStore(url, keystore, account_id=ACCOUNT)
    other = CredentialStore(url, keystore, account_id=ACCOUNT)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE touch (n INTEGER)"))
    try:
        ids = [store.create(f"user{i}").access_key_id for i in range(size)]
        probe = ids[0]
        assert store.lookup(probe) is not None

        def cached() -> object:
            return store.lookup(probe)

        def after_database_change() -> object:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO touch VALUES (1)"))
            return store.lookup(probe)

        def database_change_only() -> object:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO touch VALUES (1)"))
            return None

        def after_set_change() -> object:
            issued = other.rotate("user0" if size > 0 else "root")
            other.delete(issued.access_key_id)
            return store.lookup(probe)

        def set_change_only() -> object:
            issued = other.rotate("user0")
            other.delete(issued.access_key_id)
            return None

        def select_row() -> object:
            with engine.connect() as conn:
                return conn.execute(
                    text("SELECT * FROM identity_credentials WHERE access_key_id = :k"),
                    {"k": probe},
                ).first()

        return {
            "lookup, from memory": _per_call(cached, seconds),
            "lookup after a database change": _per_call(after_database_change, seconds)
            - _per_call(database_change_only, seconds),
            "lookup after a change of the set": _per_call(after_set_change, seconds)
            - _per_call(set_change_only, seconds),
            "baseline: one indexed SELECT": _per_call(select_row, seconds),
        }
    finally:
        engine.dispose()
        other.close()
        store.close()
        keystore.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--sizes", default="1,100,1000")
    args = parser.parse_args()
    configure_logging("WARNING")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(Path(tmp), size, args.seconds)
        print(f"{size} access keys:")
        for name, micros in results.items():
            print(f"  {name:<36} {micros:>10.1f} us")


if __name__ == "__main__":
    main()
