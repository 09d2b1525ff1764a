"""``hsmkms backup`` and ``hsmkms restore``: a data directory as one file, taken while the
server runs, and brought back in a new place after a check of every byte.

**The file** is a gzip-compressed POSIX tar archive::

    hsmkms-backup/manifest.json     canonical JSON (sorted keys, no spaces): what is inside
    hsmkms-backup/manifest.mac      {"algorithm": "HMAC-SHA-256", "key": <reference>,
                                     "tag": <hex>}: the manifest's MAC, made in the token
    hsmkms-backup/files/<path>      the files, as listed in the manifest with their size and
                                    SHA-256

written in that order (a restore reads the manifest before any file), mode 0600, and never over
an existing file. The manifest (``FORMAT`` ``hsmkms-backup``, ``version`` 1) names the hsmkms
version, the time, the account and region, the data directory it came from, the token (module,
label, serial, whether its key material is in the file), the audit trail's record count and
newest seal (``N:TAG``) at that moment, the MAC key, and per file its path, size and SHA-256.

**What is in it.** On the embedded default: the SoftHSM2 token files (``tokens/``) and the PIN
files — every key, usable by whoever holds the file: keep it as you keep the token — the
metadata database (``hsmkms.db``), the audit trail (``audit.db``) and, when present,
``root-credentials.json``. ``softhsm2.conf`` is written anew on restore. With a hardware token
(any other PKCS#11 module) only what hsmkms keeps: the databases and ``root-credentials.json``;
the key material stays in the HSM, whose backup is its vendor's matter (``docs/operations.md``).
With ``HSMKMS_DATABASE_URL`` (a database server) the command refuses: that database is backed
up with its own tools.

**Consistency while the server runs.** In this order, with both write locks held — the metadata
database's (no key, version, alias, grant or credential change commits meanwhile) and the audit
trail's (no record or seal is appended): the metadata database and the trail are copied with
SQLite's online backup API (each copy is the database as of one commit), then the token files,
each under the read lock SoftHSM2 itself reads under, while holding the token's write lock
(every hsmkms process holds it shared while it creates or destroys an object: SoftHSM2 writes a
new object in many steps) and leaving out objects written after the database lock was taken
(:func:`hsmkms.softhsm.copy_token_files`). hsmkms creates a key version's token object before it
commits the row, never changes it, and destroys objects only after a committed ``Deleting``
mark, so every row of the copy names objects the copy holds, whole, and no half-made object (a
key being created during the backup) is in it. Writers wait while
the locks are held (measured in ``docs/operations.md``); reads and cryptographic requests do
not. The MAC key (``hsmkms:backup``, HMAC-SHA-256 in the token, never extractable) is made before
the copy, so the copy holds it.

**What a restore verifies**, before anything appears under the target name: the archive holds
exactly the manifest's files, each of its size and SHA-256; the SQLite files pass SQLite's
integrity check; and the manifest's MAC verifies in the token — on the embedded default the
restored token itself, opened with the restored PIN. That proves every file is the one the
manifest lists and that the manifest was made with that token's backup key. It cannot prove,
on a machine that holds nothing else, that the file was not rebuilt by someone who had it
(the token and its PIN are inside): for that compare the manifest's SHA-256, which ``hsmkms
backup`` prints, with a copy kept elsewhere (``--expect-digest``), and the trail's newest seal
with one kept elsewhere (``hsmkms audit verify --expect-seal``). The restore is recorded in the
restored trail (``RestoreDataDirectory``), each backup in the live one (``BackupDataDirectory``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

import structlog

from hsmkms import __version__
from hsmkms.audit import canonical_json, operator_event_record
from hsmkms.config import ConfigError, Settings, embedded_module_path, token_write_lock
from hsmkms.db import check_database_file, database_exists, snapshot_database
from hsmkms.errors import ClientError
from hsmkms.keystore.base import (
    DEFAULT_STORE,
    KeyMaterialRef,
    Keystore,
    MaterialName,
    checked_mac_key,
)
from hsmkms.keystore.specs import KeyMaterialSpec
from hsmkms.profiles import ObjectRole
from hsmkms.softhsm import TOKEN_DIR_NAME, copy_token_files, hold_token_writes, write_conf
from hsmkms.system.datadir import ROOT_CREDENTIALS_FILE, require_data_directory
from hsmkms.system.operator import local_operator_identity
from hsmkms.system.root import System, open_audit_reader

__all__ = [
    "BACKUP_KEY_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "BackupError",
    "BackupResult",
    "RestoreResult",
    "backup_data_directory",
    "backup_key",
    "restore_data_directory",
]

FORMAT: Final = "hsmkms-backup"
FORMAT_VERSION: Final = 1
BACKUP_KEY_NAME: Final = "backup"
_PREFIX: Final = "hsmkms-backup/"
_MANIFEST: Final = _PREFIX + "manifest.json"
_MAC: Final = _PREFIX + "manifest.mac"
_FILES: Final = _PREFIX + "files/"
_MAX_MANIFEST: Final = 64 << 20
_MAX_MAC: Final = 64 << 10
_DATABASE: Final = "hsmkms.db"
_AUDIT: Final = "audit.db"
_PINS: Final = ("user.pin", "so.pin")

log = structlog.get_logger(__name__)


class BackupError(ClientError):
    """A backup cannot be made, or a file cannot be restored; the message says why."""


@dataclasses.dataclass(frozen=True)
class BackupResult:
    """What :func:`backup_data_directory` wrote."""

    path: Path
    digest: str
    """SHA-256 (hex) of the manifest: keep it elsewhere, give it to ``restore --expect-digest``."""
    manifest: Mapping[str, Any]
    skipped: tuple[str, ...]
    """Token object files left out (being created during the copy)."""
    paused: float
    """Seconds during which writers waited: the write locks were held."""


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore_data_directory` restored."""

    data_dir: Path
    digest: str
    manifest: Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# The backup key
# --------------------------------------------------------------------------------------------


def backup_key(keystore: Keystore, *, create: bool = True) -> KeyMaterialRef | None:
    """The token's backup MAC key (``hsmkms:backup``: HMAC_256 material, sensitive, never
    extractable), found by its label; made on first use when ``create``."""
    label = MaterialName.service_key(BACKUP_KEY_NAME).label(ObjectRole.MAC)
    found = sorted(o.object_id for o in keystore.list_objects() if o.label == label)
    if found:
        return KeyMaterialRef(KeyMaterialSpec.HMAC_256, None, (found[0],), DEFAULT_STORE)
    if not create:
        return None
    return keystore.create(KeyMaterialSpec.HMAC_256, MaterialName.service_key(BACKUP_KEY_NAME))


# --------------------------------------------------------------------------------------------
# Backup
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _token_description(settings: Settings, keystore: Keystore) -> dict[str, Any]:
    info = keystore.info()
    return {
        "kind": "softhsm2-embedded" if settings.is_embedded else "pkcs11",
        "module": info.module,
        "label": info.label,
        "serial": info.serial,
        "manufacturer": info.manufacturer,
        "model": info.model,
        "keyMaterialIncluded": settings.is_embedded,
    }


def _write_archive(out: Path, manifest: bytes, mac: bytes, staging: Path, files: list[str]) -> None:
    """The archive, written beside ``out`` and linked into place (never over a file)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                now = int(time.time())

                def add(name: str, data: IO[bytes], size: int) -> None:
                    member = tarfile.TarInfo(name)
                    member.size, member.mode, member.mtime = size, 0o600, now
                    tar.addfile(member, data)

                add(_MANIFEST, io.BytesIO(manifest), len(manifest))
                add(_MAC, io.BytesIO(mac), len(mac))
                for rel in files:
                    path = staging / rel
                    with path.open("rb") as handle:
                        add(_FILES + rel, handle, path.stat().st_size)
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise BackupError(f"{out} exists: a backup never replaces a file") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def backup_data_directory(settings: Settings, out: Path) -> BackupResult:
    """Write a consistent, sealed backup of the data directory to the new file ``out`` (see the
    module docstring); the running server, if any, goes on serving. Records a
    ``BackupDataDirectory`` event in the trail. Raises :class:`BackupError`."""
    if settings.database_url is not None:
        raise BackupError(
            "the metadata and the audit trail are in the database HSMKMS_DATABASE_URL names: "
            "back it up with its own tools (pg_dump; docs/operations.md); hsmkms backup copies "
            "the embedded default's files"
        )
    require_data_directory(settings)
    out = out.absolute()
    if out.exists():
        raise BackupError(f"{out} exists: a backup never replaces a file")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a directory")
    data_dir = settings.data_dir
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with System.open(settings, audit="direct", prepare=False) as system:
            keystore = system.keystore
            token = _token_description(settings, keystore)
            key = backup_key(keystore)
            assert key is not None
            trail = None
            if database_exists(settings.audit_database_url):
                trail = open_audit_reader(settings)  # for its write lock
            try:
                with system.store.hold_writes():
                    # Every object a committed row names was written before this moment.
                    since = time.time()
                    locked = time.monotonic()
                    with trail.hold_writes() if trail is not None else contextlib.nullcontext():
                        snapshot_database(settings.effective_database_url, staging / _DATABASE)
                        if trail is not None:
                            snapshot_database(settings.audit_database_url, staging / _AUDIT)
                        copied = None
                        if settings.is_embedded:
                            lock = token_write_lock(settings, str(embedded_module_path()))
                            with hold_token_writes(lock):
                                copied = copy_token_files(
                                    settings.token_dir, staging / TOKEN_DIR_NAME, since=since
                                )
                paused = time.monotonic() - locked
            finally:
                if trail is not None:
                    trail.close()
            files = [_DATABASE]
            audit: dict[str, Any] = {"records": 0, "newestSeal": None}
            if trail is not None:
                files.append(_AUDIT)
                snapshot = open_audit_reader(settings.model_copy(update={"data_dir": staging}))
                try:
                    records, newest = snapshot.head()
                finally:
                    snapshot.close()
                seal = f"{newest.seal_seq}:{newest.tag.hex()}" if newest is not None else None
                audit = {"records": records, "newestSeal": seal}
            if copied is not None:
                files.extend(str(Path(TOKEN_DIR_NAME) / f) for f in copied.files)
            extras = [*(_PINS if settings.is_embedded else ()), ROOT_CREDENTIALS_FILE]
            for name in extras:
                source = data_dir / name
                if source.is_file():
                    shutil.copyfile(source, staging / name)
                    (staging / name).chmod(0o600)
                    files.append(name)
            files.sort()
            created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            manifest_doc: dict[str, Any] = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "createdAt": created,
                "hsmkmsVersion": __version__,
                "accountId": settings.account_id,
                "region": settings.region,
                "source": str(data_dir),
                "token": token,
                "auditTrail": audit,
                "backupKey": key.to_str(),
                "files": [
                    {
                        "path": rel,
                        "size": (staging / rel).stat().st_size,
                        "sha256": _sha256_file(staging / rel),
                    }
                    for rel in files
                ],
                "skipped": list(copied.skipped) if copied is not None else [],
            }
            manifest = canonical_json(manifest_doc)
            tag = keystore.mac(key, manifest)
            mac = canonical_json(
                {"algorithm": "HMAC-SHA-256", "key": key.to_str(), "tag": tag.hex()}
            )
            _write_archive(out, manifest, mac, staging, files)
            digest = hashlib.sha256(manifest).hexdigest()
            system.audit(
                operator_event_record(
                    "BackupDataDirectory",
                    identity=local_operator_identity(settings.account_id),
                    account_id=settings.account_id,
                    region=settings.region,
                    details={
                        "backupDigest": digest,
                        "backupCreatedAt": created,
                        "dataDirectory": str(data_dir),
                        "backupNewestSeal": audit["newestSeal"],
                    },
                    user_agent=f"hsmkms-cli/{__version__} (backup)",
                )
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "data_directory_backed_up",
        out=str(out),
        digest=digest,
        files=len(files),
        writes_paused_ms=round(paused * 1000, 1),
    )
    return BackupResult(out, digest, manifest_doc, tuple(manifest_doc["skipped"]), paused)


# --------------------------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------------------------


def _member_path(name: str) -> str:
    """The file path a ``files/`` member stands for, refused unless plain and relative."""
    rel = name[len(_FILES) :]
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(p in ("", ".", "..") for p in rel.split("/")):
        raise BackupError(f"the backup holds a file named {name!r}: refused")
    return rel


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if not member.isfile() or member.size > limit:
        raise BackupError(f"the backup's {member.name} is not a file of at most {limit} bytes")
    handle = tar.extractfile(member)
    assert handle is not None
    return handle.read()


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError:
        raise BackupError("the backup's manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("not an hsmkms backup (its manifest names another format)")
    if manifest.get("version") != FORMAT_VERSION:
        raise BackupError(
            f"backup format version {manifest.get('version')!r}; this hsmkms reads version "
            f"{FORMAT_VERSION}: use the hsmkms that made it, or a newer one"
        )
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("path"), str)
        and isinstance(f.get("size"), int)
        and isinstance(f.get("sha256"), str)
        for f in files
    ):
        raise BackupError("the backup's manifest lists its files wrongly")
    return manifest


def _extract(path: Path, staging: Path) -> tuple[bytes, bytes, dict[str, Any]]:
    """Read the archive at ``path`` into ``staging``: the manifest and its MAC first, then each
    listed file, hashed as it is written. Raises :class:`BackupError` on anything else."""
    try:
        tar = tarfile.open(path, mode="r|gz")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{path} is not an hsmkms backup ({exc})") from None
    with tar:
        try:
            members = iter(tar)
            first = next(members, None)
            if first is None or first.name != _MANIFEST:
                raise BackupError(f"{path} is not an hsmkms backup (no manifest first)")
            manifest_bytes = _read_member(tar, first, _MAX_MANIFEST)
            manifest = _parse_manifest(manifest_bytes)
            second = next(members, None)
            if second is None or second.name != _MAC:
                raise BackupError("the backup has no manifest MAC")
            mac_bytes = _read_member(tar, second, _MAX_MAC)
            expected = {f["path"]: f for f in manifest["files"]}
            seen: set[str] = set()
            for member in members:
                if not member.name.startswith(_FILES):
                    raise BackupError(f"the backup holds {member.name!r}, which it should not")
                rel = _member_path(member.name)
                entry = expected.get(rel)
                if entry is None or rel in seen:
                    raise BackupError(f"the backup holds {rel!r}, which its manifest does not list")
                if not member.isfile() or member.size != entry["size"]:
                    raise BackupError(f"{rel}: not the {entry['size']} bytes the manifest says")
                seen.add(rel)
                target = staging / rel
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                handle = tar.extractfile(member)
                assert handle is not None
                digest = hashlib.sha256()
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != entry["sha256"]:
                    raise BackupError(f"{rel}: its SHA-256 is not the manifest's (damaged)")
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise BackupError(f"{path}: the archive is damaged or cut short ({exc})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise BackupError(
            f"the backup lacks {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ", which its manifest lists: cut short"
        )
    return manifest_bytes, mac_bytes, manifest


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(
            f"{target} exists and is not empty: restore never overwrites (name a new directory)"
        )


def _check_settings(manifest: Mapping[str, Any], settings: Settings) -> None:
    embedded = manifest.get("token", {}).get("kind") == "softhsm2-embedded"
    if settings.database_url is not None:
        raise BackupError(
            "restore writes the embedded default's databases: unset HSMKMS_DATABASE_URL"
        )
    if embedded and not settings.is_embedded:
        raise BackupError(
            "the backup holds an embedded SoftHSM2 token: restore it without HSMKMS_PKCS11_URI "
            "and HSMKMS_MODULE_PATH"
        )
    if not embedded and settings.is_embedded:
        raise BackupError(
            f"the backup's keys are in a hardware token ({manifest.get('token', {}).get('model')}"
            f" serial {manifest.get('token', {}).get('serial')}): configure it "
            "(HSMKMS_PKCS11_URI) to restore"
        )
    for field, value, variable in (
        ("accountId", settings.account_id, "HSMKMS_ACCOUNT_ID"),
        ("region", settings.region, "HSMKMS_REGION"),
    ):
        if manifest.get(field) != value:
            raise ConfigError(
                f"the backup belongs to {field.removesuffix('Id')} {manifest.get(field)}, but "
                f"{variable} is {value}: set it to {manifest.get(field)}"
            )


def _verify_mac(keystore: Keystore, manifest: bytes, mac_bytes: bytes) -> None:
    try:
        mac = json.loads(mac_bytes)
        tag = bytes.fromhex(mac["tag"])
        ref_text = str(mac["key"])
    except (ValueError, KeyError, TypeError):
        raise BackupError("the backup's manifest MAC is malformed") from None
    try:
        ref = checked_mac_key(keystore, ref_text, BACKUP_KEY_NAME)
    except ValueError as exc:
        raise BackupError(f"the manifest MAC cannot be checked: {exc}") from None
    if not keystore.verify_mac(ref, manifest, tag):
        raise BackupError("the manifest's MAC does not verify: the manifest was changed")


@contextlib.contextmanager
def _staging_for(target: Path) -> Iterator[Path]:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restoring-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def restore_data_directory(
    path: Path, settings: Settings, *, expect_digest: str | None = None
) -> RestoreResult:
    """Restore the backup at ``path`` into ``settings.data_dir``, which must not exist or be
    empty. Everything is checked in a staging directory beside it (see the module docstring),
    which becomes the data directory only when every check passed. Records a
    ``RestoreDataDirectory`` event in the restored trail. Raises :class:`BackupError`."""
    target = settings.data_dir
    _check_target(target)
    with _staging_for(target) as staging:
        manifest_bytes, mac_bytes, manifest = _extract(path, staging)
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        if expect_digest is not None and digest != expect_digest.strip().lower():
            raise BackupError(
                f"the backup's manifest has SHA-256 {digest}, not the {expect_digest} expected"
            )
        _check_settings(manifest, settings)
        for name in (_DATABASE, _AUDIT):
            if (staging / name).exists():
                problem = check_database_file(staging / name)
                if problem is not None:
                    raise BackupError(f"{name} in the backup is damaged: {problem}")
        staged = settings.model_copy(update={"data_dir": staging})
        if settings.is_embedded:
            write_conf(staging)
        # Opening runs the migrations of this hsmkms on a backup made by an older one.
        with System.open(staged, audit=None, prepare=False) as system:
            _verify_mac(system.keystore, manifest_bytes, mac_bytes)
            if settings.is_embedded:
                # The copied token may hold the objects of keys whose creation had not
                # committed its row when the database was copied (a CreateKey in flight):
                # no key of this backup uses them. Nothing else can use the staging copy, so
                # no grace. Never on a hardware token: it is the live one, not a copy.
                dropped = system.service.remove_orphans(grace=0)
                if dropped:
                    log.info("restore_dropped_in_flight_objects", count=len(dropped))
        _check_target(target)
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()
        os.rename(staging, target)
    if settings.is_embedded:
        write_conf(target)
    with System.open(settings, audit="direct", prepare=False) as system:
        system.end_copied_sessions()
        system.audit(
            operator_event_record(
                "RestoreDataDirectory",
                identity=local_operator_identity(settings.account_id),
                account_id=settings.account_id,
                region=settings.region,
                details={
                    "backupDigest": digest,
                    "backupCreatedAt": str(manifest.get("createdAt")),
                    "backupSource": str(manifest.get("source")),
                    "backupNewestSeal": manifest.get("auditTrail", {}).get("newestSeal"),
                    "dataDirectory": str(target),
                },
                user_agent=f"hsmkms-cli/{__version__} (restore)",
            )
        )
    log.info("data_directory_restored", data_dir=str(target), digest=digest)
    return RestoreResult(target, digest, manifest)
