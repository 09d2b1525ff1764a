"""The composition root (``hsmkms.system``): what it opens, the order it closes in, and the
layer rules it exists for (source scans of ``hsmkms/``)."""

from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_system import open_system, settings_for
from postgres import outside_fetch

import hsmkms
from hsmkms import models as m
from hsmkms.audit import service_event_record
from hsmkms.audit.trail import VerifyStatus
from hsmkms.config import Settings
from hsmkms.errors import ClientError, KMSInternalException, StorageUnavailable
from hsmkms.system import initialize, open_audit_reader, open_audit_verifier

pytestmark = pytest.mark.database

PACKAGE = Path(hsmkms.__file__).parent
ROOT_MODULE = "hsmkms/system/root.py"

# -- layer rules ------------------------------------------------------------------------------


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names (at any depth of the file),
    including ``a.b.c`` for ``from a.b import c``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _reaches(imports: set[str], module: str) -> bool:
    return any(name == module or name.startswith(module + ".") for name in imports)


ROOT_PARTS = frozenset(
    {
        "Pkcs11Keystore",
        "MetadataStore",
        "MetadataStore.open_sqlite",
        "CredentialStore",
        "AuditTrail",
        "AuditWriter",
        "KmsService",
        "TokenRowSealer",
    }
)


def _constructed(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            name = func.id
        elif isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            name = f"{owner}.{func.attr}" if func.attr == "open_sqlite" else func.attr
        else:
            continue
        if name in ROOT_PARTS:
            yield node.lineno, name


def test_only_the_composition_root_builds_the_system() -> None:
    """The keystore, stores, audit trail and writer, and the service are constructed in
    hsmkms/system/root.py and nowhere else in the package."""
    found = [
        (module, line, name) for module, tree in _sources() for line, name in _constructed(tree)
    ]
    elsewhere = [f"{module}:{line} {name}" for module, line, name in found if module != ROOT_MODULE]
    assert elsewhere == []
    built = {name for module, _, name in found if module == ROOT_MODULE}
    assert built == ROOT_PARTS - {"MetadataStore.open_sqlite"}


def test_the_command_line_reaches_the_http_layer_only_to_serve() -> None:
    offenders = [
        module
        for module, tree in _sources()
        if module.startswith("hsmkms/cli/")
        and module != "hsmkms/cli/serve.py"
        and _reaches(_imports(tree), "hsmkms.api")
    ]
    assert offenders == []


def test_the_service_reads_no_settings_and_knows_no_token_backend() -> None:
    """hsmkms/service/ imports neither the settings, nor the SoftHSM2 set-up, nor the PKCS#11
    keystore: it is handed a keystore and a store."""
    forbidden = ("hsmkms.config", "hsmkms.softhsm", "hsmkms.keystore.pkcs11", "hsmkms.system")
    offenders = [
        (module, name)
        for module, tree in _sources()
        if module.startswith("hsmkms/service/")
        for name in forbidden
        if _reaches(_imports(tree), name)
    ]
    assert offenders == []
    code = f"import sys, hsmkms.service; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_root_and_the_entry_points_read_settings() -> None:
    """Layers below the composition root never read settings (architecture decision 12), and
    the root depends on no entry point."""
    readers = {
        module
        for module, tree in _sources()
        if _reaches(_imports(tree), "hsmkms.config") or _reaches(_imports(tree), "hsmkms.softhsm")
    }
    allowed = ("hsmkms/system/", "hsmkms/api/", "hsmkms/cli/", "hsmkms/config.py")
    assert sorted(r for r in readers if not r.startswith(allowed)) == []
    upward = [
        module
        for module, tree in _sources()
        if module.startswith("hsmkms/system/")
        and (_reaches(_imports(tree), "hsmkms.api") or _reaches(_imports(tree), "hsmkms.cli"))
    ]
    assert upward == []


def test_one_logging_set_up() -> None:
    """structlog and the root logger are configured in hsmkms/log.py only."""
    offenders = []
    for module, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                owner_name = owner.id if isinstance(owner, ast.Name) else ""
                call = f"{owner_name}.{node.func.attr}"
                if call in ("structlog.configure", "logging.basicConfig", "logging.dictConfig"):
                    offenders.append((module, call))
    assert offenders == [("hsmkms/log.py", "structlog.configure")]


# -- opening and closing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("system") / "data"


def _settings_rows(db: Path) -> dict[str, str]:
    return dict(outside_fetch(db, "SELECT name, value FROM store_settings"))


@pytest.mark.hsm
def test_initialize_opens_the_store_with_its_row_sealer(data_dir: Path) -> None:
    """Initialization (serve's parent, ``hsmkms credentials``) opens the metadata store the way
    every other entry point does: with its sealer, so the integrity key exists from the start
    and no unsealed row is ever written."""
    report = initialize(settings_for(data_dir))
    assert report.root_created
    assert report.root_credentials_file == data_dir / "root-credentials.json"
    assert report.root_credentials_file.stat().st_mode & 0o077 == 0
    integrity_key = _settings_rows(data_dir / "hsmkms.db")["integrity_key"]
    assert integrity_key.startswith("v2:default:HMAC_256:")
    again = initialize(settings_for(data_dir))
    assert not again.root_created
    assert again.root_access_key_id == report.root_access_key_id


@pytest.mark.hsm
def test_a_writer_system_seals_at_start_and_after_its_last_record(data_dir: Path) -> None:
    """audit="writer" (a server): the trail opens with a start seal; close() drains the writer
    and writes the shutdown seal while the token is still open, so the trail verifies."""
    with open_system(data_dir, audit="writer", identity=True) as system:
        assert isinstance(system.credentials.list(), list)  # identity=True: the store is open
        key = system.service.create_key(m.CreateKeyRequest()).KeyMetadata
        system.audit(
            service_event_record(
                "RotateKey", account_id=key.AWSAccountId, region="us-east-1", key_arn=key.Arn
            )
        )
    settings = settings_for(data_dir)
    with open_audit_verifier(settings) as trail:
        result = trail.verify()
    assert result.status is VerifyStatus.OK, result.problem
    assert result.records >= 1
    assert result.newest_seal is not None
    assert result.newest_seal.reason == "shutdown"


@pytest.mark.hsm
def test_a_direct_system_opens_the_trail_only_for_a_record(tmp_path: Path) -> None:
    """audit="direct" (a command): no trail until something is recorded; then each record is
    in the trail, sealed by a ``command`` seal (no writer session: no start, no shutdown), when
    audit() returns: the trail verifies while the command still runs."""
    data_dir = tmp_path / "data"
    with open_system(data_dir) as system:
        key = system.service.create_key(m.CreateKeyRequest()).KeyMetadata
        assert not (data_dir / "audit.db").exists()
        system.audit(
            service_event_record(
                "RotateKey", account_id=key.AWSAccountId, region="us-east-1", key_arn=key.Arn
            )
        )
        reader = open_audit_reader(system.settings)
        try:
            assert [r["eventName"] for r in reader.tail()] == ["RotateKey"]
        finally:
            reader.close()
        assert system.trail is None
        with open_audit_verifier(system.settings) as trail:
            result = trail.verify()
        assert result.status is VerifyStatus.OK, result.problem
        assert result.newest_seal is not None
        assert result.newest_seal.reason == "command"
        assert result.newest_seal.writer is not None
        assert result.newest_seal.writer.startswith("command:")
        assert (result.unsealed, result.live, result.unclean) == (0, (), ())
        reader = open_audit_reader(system.settings)
        try:
            with reader.engine.connect() as conn:
                reasons = [r for (r,) in conn.exec_driver_sql("SELECT reason FROM audit_seals")]
        finally:
            reader.close()
        assert reasons == ["genesis", "command"]


@pytest.mark.hsm
def test_a_system_without_audit_refuses_records(data_dir: Path) -> None:
    with open_system(data_dir, audit=None) as system:
        with pytest.raises(KMSInternalException, match="without an audit trail"):
            system.audit(
                service_event_record(
                    "DeleteKey",
                    account_id="111122223333",
                    region="us-east-1",
                    key_arn="arn:aws:kms:us-east-1:111122223333:key/x",
                )
            )
        with pytest.raises(KMSInternalException, match="without the identities"):
            _ = system.credentials


def test_reading_the_trail_of_a_missing_database_is_one_error(tmp_path: Path) -> None:
    settings = Settings.load(tmp_path / "nothing")
    with pytest.raises(ClientError, match="no database at"):
        open_audit_reader(settings)
    with pytest.raises(ClientError, match="no database at"), open_audit_verifier(settings):
        pass
    assert not (tmp_path / "nothing").exists()


@pytest.mark.hsm
@pytest.mark.sqlite  # breaks the trail's own SQLite file
def test_a_part_that_fails_to_open_closes_the_parts_before_it(tmp_path: Path) -> None:
    """An audit trail that is wrong (its key reference names another key) fails System.open
    with one KMSError, after closing the keystore and store opened before it; the next open in
    this process works."""
    data_dir = tmp_path / "data"
    with open_system(data_dir, audit="writer"):
        pass
    with sqlite3.connect(data_dir / "audit.db") as conn:
        conn.execute(
            "UPDATE audit_settings SET value = 'HMAC_SHA_256:abcd' WHERE name = 'audit_key'"
        )
    conn.close()
    with pytest.raises(KMSInternalException, match="audit key is wrong"):
        open_system(data_dir, audit="writer")
    with open_system(data_dir, audit=None) as system:
        assert system.keystore.info().label == "hsmkms"


@pytest.mark.hsm
@pytest.mark.sqlite  # the trail's own SQLite file made a directory
def test_a_server_opens_with_a_trail_it_cannot_write_yet(tmp_path: Path) -> None:
    """A server's trail that cannot be written (a full disk, an I/O error; here a directory
    where its file should be) does not stop the worker: System.open succeeds, records are
    refused with the cause (503), and the writer opens the trail once it can."""
    data_dir = tmp_path / "data"
    with open_system(data_dir):
        pass
    (data_dir / "audit.db").mkdir()
    with open_system(data_dir, audit="writer") as system:
        assert system.writer is not None
        failure = system.writer.failure
        assert isinstance(failure, StorageUnavailable)
        assert failure.status == 503
        assert failure.message == (
            "The audit trail failed: I/O error on the data directory's device."
        )
        record = service_event_record(
            "RotateKey", account_id="111122223333", region="us-east-1",
            key_arn="arn:aws:kms:us-east-1:111122223333:key/k",
        )  # fmt: skip
        with pytest.raises(StorageUnavailable):
            system.audit(record)
        (data_dir / "audit.db").rmdir()
        deadline = time.monotonic() + 15
        while system.writer.failure is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        system.audit(record)
    with open_audit_verifier(system.settings) as trail:
        result = trail.verify()
    assert result.ok, result.problem
    assert result.records == 1
