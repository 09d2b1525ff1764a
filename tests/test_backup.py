"""``hsmkms backup`` and ``hsmkms restore`` through the real commands and server: a backup taken
under load restores into a working data directory where every earlier ciphertext decrypts; the
token files are copied consistently while SoftHSM2 writes them; a restore refuses whatever is
not exactly what the backup's sealed manifest lists."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError as BotoClientError
from server import clean_env, run_cli, running_server

from hsmkms.softhsm import (
    TOKEN_WRITE_LOCK,
    copy_token_files,
    ensure_token,
    find_module,
    hold_token_writes,
)

pytestmark = [pytest.mark.hsm]


def _cli_ok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _digest_of(backup_stdout: str) -> str:
    (line,) = [x for x in backup_stdout.splitlines() if x.startswith("manifest SHA-256 ")]
    return line.split()[-1]


class EncryptLoad:
    """Clients encrypting in a loop against a server, keeping every (key, ciphertext,
    plaintext) the server answered, with the time each call returned."""

    def __init__(self, clients: list[Any], keys: list[str]) -> None:
        self._clients = clients
        self._keys = keys
        self.results: list[tuple[float, str, bytes, bytes]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(c, n), daemon=True)
            for n, c in enumerate(clients)
        ]

    def _loop(self, client: Any, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            key = self._keys[(i + n) % len(self._keys)]
            plaintext = f"load {n} {i} ".encode() + os.urandom(16)
            try:
                blob = client.encrypt(KeyId=key, Plaintext=plaintext)["CiphertextBlob"]
            except Exception as exc:
                self.errors.append(repr(exc))
                return
            with self._lock:
                self.results.append((time.monotonic(), key, blob, plaintext))
            i += 1

    def __enter__(self) -> EncryptLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.results)


class KeyMaker(threading.Thread):
    """Creates keys (new token objects and rows) and uses each once, in a loop: the token and
    the database change while the backup copies them."""

    def __init__(self, client: Any) -> None:
        super().__init__(daemon=True)
        self._client = client
        self.made: list[tuple[str, bytes]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            key = self._client.create_key()["KeyMetadata"]["KeyId"]
            blob = self._client.encrypt(KeyId=key, Plaintext=b"made during load")
            self.made.append((key, blob["CiphertextBlob"]))

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


@pytest.mark.slow
@pytest.mark.server
def test_a_backup_under_load_restores_and_every_earlier_ciphertext_decrypts(
    tmp_path: Path,
) -> None:
    original = tmp_path / "original"
    out = tmp_path / "backup.tar.gz"
    with running_server(original, workers=2) as server:
        admin = server.client()
        keys = [admin.create_key(Description=f"load {n}")["KeyMetadata"]["KeyId"] for n in range(3)]
        admin.rotate_key_on_demand(KeyId=keys[0])  # two versions of one key
        admin.create_alias(AliasName="alias/load", TargetKeyId=keys[1])
        before = [(k, admin.encrypt(KeyId=k, Plaintext=b"before")["CiphertextBlob"]) for k in keys]
        maker = KeyMaker(server.client())
        with EncryptLoad([server.client(), server.client()], keys) as load:
            maker.start()
            while load.count() < 50 or len(maker.made) < 2:
                time.sleep(0.05)
            started = time.monotonic()
            backup = _cli_ok("backup", "--out", str(out), "--data-dir", str(original))
            finished = time.monotonic()
            during = load.count()
            while load.count() < during + 50:  # and on, after the backup
                time.sleep(0.05)
            maker.stop()
        assert load.errors == []
        assert server.stop() == 0
    assert out.stat().st_mode & 0o777 == 0o600
    digest = _digest_of(backup.stdout)
    made_before = {k for k, _ in maker.made}
    shutil.rmtree(original)  # the original is gone

    restored = tmp_path / "restored"
    proc = _cli_ok("restore", str(out), "--data-dir", str(restored), "--expect-digest", digest)
    assert "doctor:       ok" in proc.stdout
    assert "audit verify: ok" in proc.stdout
    doctor = _cli_ok("doctor", "--json", "--data-dir", str(restored))
    assert json.loads(doctor.stdout)["missing"] == []
    verify = _cli_ok("audit", "verify", "--data-dir", str(restored))
    assert verify.stdout.startswith("audit trail intact")
    events = _cli_ok(
        "audit", "search", "--event-name", "RestoreDataDirectory", "--data-dir", str(restored)
    )
    (record,) = [json.loads(line) for line in events.stdout.splitlines()]
    assert record["serviceEventDetails"]["backupDigest"] == digest
    assert record["userIdentity"]["type"] == "LocalOperator"

    with running_server(restored, workers=2) as server:
        kms = server.client()
        for key, blob in before:
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
            assert kms.decrypt(CiphertextBlob=blob)["KeyId"].endswith(key)
        # Every ciphertext the load received before the backup finished decrypts (no key
        # rotated during the load, so those after it too).
        old = [r for r in load.results if r[0] < finished]
        assert len(old) >= 50
        for _, _, blob, plaintext in load.results:
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == plaintext
        assert kms.describe_key(KeyId="alias/load")["KeyMetadata"]["KeyId"] == keys[1]
        # A key made while the backup ran is there whole (and decrypts) or not at all.
        present, absent = 0, []
        for key, blob in maker.made:
            try:
                kms.describe_key(KeyId=key)
            except BotoClientError as exc:
                absent.append(exc.response["Error"]["Code"])
                continue
            present += 1
            assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"made during load"
        assert set(absent) <= {"NotFoundException"}
        assert present >= 2  # those made before the backup started
        assert made_before
        kms.encrypt(KeyId=keys[2], Plaintext=b"the restored server writes too")
    assert started < finished


def _checker() -> str:
    """A script: for each (SoftHSM2 config, object ids) given as JSON on stdin, open the token
    and encrypt and decrypt with each AES key named; print the ids it listed per config."""
    return textwrap.dedent(
        """
        import json, sys
        from hsmkms.keystore.base import KeyMaterialRef
        from hsmkms.keystore.config import KeystoreConfig
        from hsmkms.keystore.pkcs11 import Pkcs11Keystore
        from hsmkms.keystore.specs import KeyMaterialSpec
        from hsmkms.profiles import MechanismProfile
        module, pin = sys.argv[1:3]
        listed = []
        for conf, ids in json.load(sys.stdin):
            ks = Pkcs11Keystore(KeystoreConfig(module_path=module, pin=pin, token_label="hsmkms",
                                               softhsm2_conf=conf))
            try:
                listed.append(sorted(o.object_id for o in ks.list_objects()))
                for object_id in ids:
                    ref = KeyMaterialRef(KeyMaterialSpec.SYMMETRIC_DEFAULT,
                                         MechanismProfile.AES_256_GCM, (object_id,))
                    iv, body = ks.encrypt(ref, b"whole", b"aad")
                    assert ks.decrypt(ref, iv, body, b"aad") == b"whole"
            finally:
                ks.close()
        print(json.dumps(listed))
        """
    )


def _writer_script() -> str:
    """A script creating and destroying token objects in a loop until its stdin closes,
    printing ``+ <id> <time>`` once an object is whole and ``- <id> <time>`` before it is
    destroyed."""
    return textwrap.dedent(
        """
        import sys, threading, time
        from hsmkms.keystore.base import MaterialName
        from hsmkms.keystore.config import KeystoreConfig
        from hsmkms.keystore.pkcs11 import Pkcs11Keystore
        from hsmkms.keystore.specs import KeyMaterialSpec
        module, pin, conf = sys.argv[1:4]
        ks = Pkcs11Keystore(KeystoreConfig(module_path=module, pin=pin, token_label="hsmkms",
                                           softhsm2_conf=conf, write_lock=sys.argv[4]))
        done = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        kept, n = [], 0
        print("ready", flush=True)
        while not done.is_set():
            ref = ks.create(KeyMaterialSpec.SYMMETRIC_DEFAULT,
                            MaterialName.key_version(f"{n:032x}", 1))
            print("+", ref.object_ids[0], time.time(), flush=True)
            kept.append(ref)
            if len(kept) > 5:
                old = kept.pop(0)
                print("-", old.object_ids[0], time.time(), flush=True)
                ks.destroy(old)
            n += 1
        ks.close()
        print("end", flush=True)
        """
    )


@pytest.mark.slow
def test_token_files_copied_while_softhsm_writes_them_hold_every_whole_object(
    tmp_path: Path,
) -> None:
    """Another process creates and destroys AES keys as fast as it can (holding the token's
    write lock shared, as every hsmkms process does) while the token is copied again and again
    under that lock: each copy, opened by SoftHSM2, holds every key that was whole before the
    copy began and not destroyed before it ended, each of them still encrypts and decrypts,
    and every object file a copy holds is an object SoftHSM2 lists (none half made)."""
    data_dir = tmp_path / "live"
    conf = ensure_token(data_dir)
    pin = (data_dir / "user.pin").read_text().strip()
    writer = subprocess.Popen(
        [sys.executable, "-c", _writer_script(), find_module(), pin, str(conf),
         str(data_dir / "tokens" / TOKEN_WRITE_LOCK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    copies: list[tuple[Path, float, float, int]] = []
    try:
        for n in range(25):
            copy = tmp_path / f"copy{n}"
            copy.mkdir()
            with hold_token_writes(data_dir / "tokens" / TOKEN_WRITE_LOCK):
                began = time.time()
                result = copy_token_files(data_dir / "tokens", copy / "tokens", since=began)
                ended = time.time()
            (copy / "softhsm2.conf").write_text(conf.read_text().replace(str(data_dir), str(copy)))
            objects = [f for f in result.files if f.suffix == ".object" and f.stem != "token"]
            copies.append((copy, began, ended, len(objects)))
            time.sleep(0.03)
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        log = writer.stdout.read().splitlines()
        writer.wait(30)
    assert log[-1] == "end"
    created = {line.split()[1]: float(line.split()[2]) for line in log if line.startswith("+")}
    destroyed = {line.split()[1]: float(line.split()[2]) for line in log if line.startswith("-")}
    assert len(created) > 25  # the writer really ran during the copies
    jobs = []
    for copy, began, ended, _ in copies:
        whole = [
            i for i, at in created.items() if at < began and destroyed.get(i, ended + 1) > ended
        ]
        jobs.append((str(copy / "softhsm2.conf"), whole))
    check = subprocess.run(
        [sys.executable, "-c", _checker(), find_module(), pin], input=json.dumps(jobs),
        capture_output=True, text=True, timeout=300, check=True, env=clean_env(),
    )  # fmt: skip
    listed = json.loads(check.stdout)
    for (_, whole), ids, (_, _, _, files) in zip(jobs, listed, copies, strict=True):
        assert set(whole) <= set(ids)
        assert len(ids) == files
    assert any(whole for _, whole in jobs)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small data directory's backup and its manifest digest."""
    base = tmp_path_factory.mktemp("backup")
    data_dir = base / "data"
    _cli_ok("init", "--data-dir", str(data_dir))
    _cli_ok("credentials", "create", "--name", "app", "--data-dir", str(data_dir))
    out = base / "b.tar.gz"
    proc = _cli_ok("backup", "--out", str(out), "--data-dir", str(data_dir))
    again = run_cli("backup", "--out", str(out), "--data-dir", str(data_dir))
    assert again.returncode == 1
    assert again.stderr == f"hsmkms backup: {out} exists: a backup never replaces a file\n"
    return out, _digest_of(proc.stdout)


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:gz") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _rewrite(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def _restore_fails(backup: Path, target: Path, expected: str, *args: str) -> None:
    proc = run_cli("restore", str(backup), "--data-dir", str(target), *args)
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert not target.exists() or not any(target.iterdir())
    assert not [p for p in target.parent.iterdir() if ".restoring-" in p.name]


def _edited(made: tuple[Path, str], tmp_path: Path, edit: Any) -> Path:
    members = _members(made[0])
    edit(members)
    return _rewrite(tmp_path / "edited.tar.gz", members)


def _set_file(members: list[tuple[tarfile.TarInfo, bytes]], suffix: str, data: bytes) -> None:
    for n, (member, _) in enumerate(members):
        if member.name.endswith(suffix):
            members[n] = (member, data)
            return
    raise AssertionError(suffix)


def _manifest(members: list[tuple[tarfile.TarInfo, bytes]]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(members[0][1])
    return loaded


def test_restore_refuses_a_target_that_exists_and_is_not_empty(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "something").write_text("mine")
    proc = run_cli("restore", str(made[0]), "--data-dir", str(target))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"hsmkms restore: {target} exists and is not empty: restore never overwrites (name a "
        "new directory)\n"
    )
    assert [p.name for p in target.iterdir()] == ["something"]


def test_restore_into_an_empty_directory_with_the_digest(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    proc = _cli_ok("restore", str(made[0]), "--data-dir", str(target), "--expect-digest", made[1])
    assert f"manifest SHA-256 {made[1]}" in proc.stdout
    listed = _cli_ok("credentials", "list", "--json", "--data-dir", str(target))
    assert sorted(c["Name"] for c in json.loads(listed.stdout)) == ["app", "root"]
    assert (target / "softhsm2.conf").read_text().count(str(target / "tokens")) == 1
    assert target.stat().st_mode & 0o777 == 0o700


def test_restore_refuses_another_digest(made: tuple[Path, str], tmp_path: Path) -> None:
    wrong = "0" * 64
    _restore_fails(made[0], tmp_path / "t", f"not the {wrong} expected", "--expect-digest", wrong)


def test_restore_refuses_a_changed_file(made: tuple[Path, str], tmp_path: Path) -> None:
    edited = _edited(made, tmp_path, lambda m: _set_file(m, "/root-credentials.json", b"{}" * 10))
    _restore_fails(edited, tmp_path / "t", "root-credentials.json: not the")


def test_restore_refuses_a_changed_file_of_the_same_size(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    def flip(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        for n, (member, data) in enumerate(members):
            if member.name.endswith("/hsmkms.db"):
                members[n] = (member, data[:-1] + bytes([data[-1] ^ 1]))

    _restore_fails(_edited(made, tmp_path, flip), tmp_path / "t", "hsmkms.db: its SHA-256")


def test_restore_refuses_a_manifest_edited_with_its_hashes(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    """Someone who rebuilds the manifest for a changed file, without the token's backup key."""

    def forge(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        forged = b'{"AccessKeyId": "AKIAFORGED"}'
        _set_file(members, "/root-credentials.json", forged)
        manifest = _manifest(members)
        for entry in manifest["files"]:
            if entry["path"] == "root-credentials.json":
                entry["size"], entry["sha256"] = len(forged), hashlib.sha256(forged).hexdigest()
        members[0] = (members[0][0], json.dumps(manifest, sort_keys=True).encode())

    _restore_fails(_edited(made, tmp_path, forge), tmp_path / "t", "MAC does not verify")


def test_restore_refuses_extra_missing_and_escaping_files(
    made: tuple[Path, str], tmp_path: Path
) -> None:
    def extra(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        members.append((tarfile.TarInfo("hsmkms-backup/files/extra"), b"x"))

    _restore_fails(_edited(made, tmp_path, extra), tmp_path / "a", "which its manifest does not")
    _restore_fails(
        _edited(made, tmp_path, lambda m: m.pop()), tmp_path / "b", "which its manifest lists: cut"
    )

    def escape(members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        members.append((tarfile.TarInfo("hsmkms-backup/files/../../evil"), b"x"))

    _restore_fails(_edited(made, tmp_path, escape), tmp_path / "c", "refused")
    assert not (tmp_path / "evil").exists()


def test_restore_refuses_a_cut_or_foreign_file(made: tuple[Path, str], tmp_path: Path) -> None:
    data = made[0].read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    _restore_fails(cut, tmp_path / "a", "damaged or cut short")
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(4096))
    _restore_fails(other, tmp_path / "b", "is not an hsmkms backup")


def test_restore_refuses_another_account(made: tuple[Path, str], tmp_path: Path) -> None:
    proc = run_cli(
        "restore", str(made[0]), "--data-dir", str(tmp_path / "t"),
        env={"HSMKMS_ACCOUNT_ID": "444455556666"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "the backup belongs to account 111122223333, but HSMKMS_ACCOUNT_ID is 444455556666" in (
        proc.stderr
    )
    assert not (tmp_path / "t").exists()


def test_backup_refuses_a_database_server_and_a_missing_directory(tmp_path: Path) -> None:
    proc = run_cli("backup", "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert "no data directory at" in proc.stderr
    server = run_cli(
        "backup", "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path),
        env={"HSMKMS_DATABASE_URL": "postgresql+psycopg://kms@db/kms"},
    )  # fmt: skip
    assert server.returncode == 1
    assert "back it up with its own tools (pg_dump" in server.stderr
    assert not (tmp_path / "b").exists()


def test_backup_of_a_hardware_token_holds_what_hsmkms_keeps(tmp_path: Path) -> None:
    """A token outside the data directory (any PKCS#11 module; here SoftHSM2 named by a URI):
    the backup holds the databases, not the key material, and says so; a restore on the same
    token verifies the MAC there and works."""
    token_dir = tmp_path / "hsm"
    conf = ensure_token(token_dir)
    env = {
        "HSMKMS_PKCS11_URI": f"pkcs11:token=hsmkms?module-path={find_module()}"
        f"&pin-source=file:{token_dir / 'user.pin'}",
        "SOFTHSM2_CONF": str(conf),
    }
    data_dir = tmp_path / "data"
    _cli_ok("init", "--data-dir", str(data_dir), env=env)
    out = tmp_path / "b.tar.gz"
    proc = _cli_ok("backup", "--out", str(out), "--data-dir", str(data_dir), env=env)
    assert "key material NOT included: it stays in SoftHSM project SoftHSM v2 serial" in proc.stdout
    names = {m.name.removeprefix("hsmkms-backup/files/") for m, _ in _members(out)}
    assert names == {
        "hsmkms-backup/manifest.json", "hsmkms-backup/manifest.mac", "hsmkms.db",
        "audit.db",  # init records the root's access key it made
        "root-credentials.json",
    }  # fmt: skip
    restored = tmp_path / "restored"
    done = _cli_ok("restore", str(out), "--data-dir", str(restored), env=env)
    assert "doctor:       ok" in done.stdout
    embedded = run_cli("restore", str(out), "--data-dir", str(tmp_path / "x"))
    assert embedded.returncode == 1
    assert "configure it (HSMKMS_PKCS11_URI) to restore" in embedded.stderr
