"""KmsService shared by threads, and by processes (the deployment model: worker processes on one
token and one SQLite file)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from postgres import store_url

from conftest import GCM_LABEL
from hsmkms import models as m
from hsmkms.ciphertext import CiphertextBlob
from hsmkms.errors import DisabledException
from hsmkms.keystore.pkcs11 import Pkcs11Keystore
from hsmkms.service import KmsService
from hsmkms.store import MetadataStore

pytestmark = [pytest.mark.hsm, pytest.mark.database]

REGION = "eu-central-1"
ACCOUNT = "111122223333"


def _child(softhsm_dir: Path, db: Path, body: str) -> dict[str, str]:
    """Run ``body`` in a fresh Python process with ``service`` open on the same token and
    database; it sets ``out`` (a dict of strings), which comes back as JSON."""
    script = (
        textwrap.dedent(
            f"""
        import base64, json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from conftest import token_config
        from hsmkms import models as m
        from hsmkms.keystore.pkcs11 import Pkcs11Keystore
        from hsmkms.service import KmsService
        from hsmkms.store import MetadataStore
        import logging, structlog
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
        ks = Pkcs11Keystore(token_config(Path({str(softhsm_dir)!r}), {GCM_LABEL!r}))
        store = MetadataStore({store_url(db)!r})
        service = KmsService(ks, store, region={REGION!r}, account_id={ACCOUNT!r})
        out = {{}}
        """
        )
        + textwrap.dedent(body)
        + "\nprint(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_keys_made_in_one_process_serve_another(
    softhsm_dir: Path, keystore: Pkcs11Keystore, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    store = MetadataStore(store_url(db))
    service = KmsService(keystore, store, region=REGION, account_id=ACCOUNT)
    mine = service.create_key(m.CreateKeyRequest()).KeyMetadata
    mine_blob = service.encrypt(
        m.EncryptRequest(KeyId=mine.KeyId, Plaintext=b"from-parent")
    ).CiphertextBlob

    out = _child(
        softhsm_dir,
        db,
        f"""
        key = service.create_key(m.CreateKeyRequest()).KeyMetadata
        service.create_alias(m.CreateAliasRequest(AliasName="alias/child", TargetKeyId=key.KeyId))
        blob = service.encrypt(m.EncryptRequest(KeyId="alias/child", Plaintext=b"from-child"))
        service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId={mine.KeyId!r}))
        parent = service.decrypt(m.DecryptRequest(
            CiphertextBlob=base64.b64decode({base64.b64encode(mine_blob).decode()!r})))
        service.disable_key(m.DisableKeyRequest(KeyId={mine.KeyId!r}))
        out = {{"key": key.KeyId, "blob": base64.b64encode(blob.CiphertextBlob).decode(),
               "parent": parent.Plaintext.decode()}}
        """,
    )
    assert out["parent"] == "from-parent"
    # The child's key, alias, ciphertext and rotation are visible here.
    child_blob = base64.b64decode(out["blob"])
    got = service.decrypt(m.DecryptRequest(CiphertextBlob=child_blob, KeyId="alias/child"))
    assert got.Plaintext == b"from-child"
    # The child disabled our key: seen without restarting (the read cache notices commits).
    with pytest.raises(DisabledException):
        service.encrypt(m.EncryptRequest(KeyId=mine.KeyId, Plaintext=b"x"))
    service.enable_key(m.EnableKeyRequest(KeyId=mine.KeyId))
    new_blob = service.encrypt(m.EncryptRequest(KeyId=mine.KeyId, Plaintext=b"x")).CiphertextBlob
    assert CiphertextBlob.parse(new_blob).key_version == 2  # the child's rotation
    assert service.find_inconsistencies().missing == []
    store.close()


def test_threads_share_one_service(keystore: Pkcs11Keystore, tmp_path: Path) -> None:
    store = MetadataStore(store_url(tmp_path / "threads.db"))
    service = KmsService(keystore, store, region=REGION, account_id=ACCOUNT)
    key = service.create_key(m.CreateKeyRequest()).KeyMetadata
    errors: list[BaseException] = []
    versions: set[int] = set()
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(40):
                data = f"{n}-{i}".encode()
                blob = service.encrypt(
                    m.EncryptRequest(
                        KeyId=key.KeyId, Plaintext=data, EncryptionContext={"n": str(n)}
                    )
                ).CiphertextBlob
                out = service.decrypt(
                    m.DecryptRequest(CiphertextBlob=blob, EncryptionContext={"n": str(n)})
                )
                assert out.Plaintext == data
                with lock:
                    versions.add(CiphertextBlob.parse(blob).key_version)
        except BaseException as exc:  # collected and re-raised by the main thread
            errors.append(exc)

    def rotator() -> None:
        try:
            for _ in range(3):
                service.rotate_key_on_demand(m.RotateKeyOnDemandRequest(KeyId=key.KeyId))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=rotator))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert versions <= {1, 2, 3, 4}
    assert service.store.get_key(key.KeyId).current_version == 4  # type: ignore[union-attr]
    store.close()


def test_due_rotation_races_between_services(keystore: Pkcs11Keystore, tmp_path: Path) -> None:
    """Two services (as two workers would) find the same rotation due: exactly one happens."""
    db = tmp_path / "race.db"
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    now = [start]
    stores = [MetadataStore(store_url(db)) for _ in range(2)]
    services = [
        KmsService(keystore, s, region=REGION, account_id=ACCOUNT, clock=lambda: now[0])
        for s in stores
    ]
    key = services[0].create_key(m.CreateKeyRequest()).KeyMetadata
    services[0].enable_key_rotation(
        m.EnableKeyRotationRequest(KeyId=key.KeyId, RotationPeriodInDays=90)
    )
    now[0] = start + dt.timedelta(days=91)
    before = {o.object_id for o in keystore.list_objects()}
    reports: list[list[str]] = []
    barrier = threading.Barrier(2)

    def run(service: KmsService) -> None:
        barrier.wait()
        reports.append(service.rotate_due())

    threads = [threading.Thread(target=run, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(len(r) for r in reports) == [0, 1]
    assert stores[0].get_key(key.KeyId).current_version == 2  # type: ignore[union-attr]
    # One new token object: the loser destroyed its own.
    assert len({o.object_id for o in keystore.list_objects()} - before) == 1
    for s in stores:
        s.close()
