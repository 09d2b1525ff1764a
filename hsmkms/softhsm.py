"""The embedded SoftHSM2 token: a config file, a token directory and random PINs in a data dir.

Mirrors ``softhsm/init-token.sh`` (which exists for users' own CI without Python). Layout::

    <data_dir>/softhsm2.conf   tokendir = <data_dir>/tokens; hsmkms always exports SOFTHSM2_CONF
    <data_dir>/tokens/         token files (0700)
    <data_dir>/user.pin        random user PIN (0600)
    <data_dir>/so.pin          random SO PIN (0600)

:func:`ensure_token` is idempotent and safe when several processes call it at once (a lock file).

**A data directory can be moved or copied.** SoftHSM2 needs ``directories.tokendir`` to be
absolute: a relative one is resolved against the working directory of whichever process loads
the module (measured with 2.6.1: from another directory it shows an empty slot), so it cannot
follow the data directory. Instead :func:`relocate_conf` — run by every opening of the
embedded default — rewrites the line when it names another directory while this data
directory's own ``tokens/`` holds a token: a copy then uses its own token instead of silently
writing to the original's, and a moved directory keeps working. It is the only absolute path
a data directory stores (the token files and the databases hold none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from hsmkms.errors import KMSInternalException
from hsmkms.keystore.token_lock import token_write_lock

DEFAULT_LABEL = "hsmkms"
CONF_NAME = "softhsm2.conf"
TOKEN_DIR_NAME = "tokens"  # noqa: S105 (a directory name)
TOKEN_WRITE_LOCK = ".token-writes.lock"  # noqa: S105 (a file name)
# SoftHSM2's configuration when SOFTHSM2_CONF is unset (Debian's package; ./configure default).
DEFAULT_CONF = "/etc/softhsm/softhsm2.conf"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
# How long to wait for SoftHSM2 to read every token in the token directory (seconds).
CONSISTENT_VIEW_TIMEOUT = 30.0
CONF_TEMPLATE = """\
# SoftHSM2 configuration for one hsmkms data directory (written by hsmkms).
directories.tokendir = {token_dir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


# SoftHSM2's own syntax (SimpleConfigLoader): "name = value", "#" starts a comment line.
_TOKENDIR_LINE = re.compile(r"^(\s*directories\.tokendir\s*=\s*)(.*?)\s*$", re.MULTILINE)

log = structlog.get_logger(__name__)


class SoftHSMSetupError(KMSInternalException):
    """The embedded SoftHSM2 token could not be set up; the message names the cause."""


@dataclasses.dataclass(frozen=True)
class ConfState:
    """Where a data directory's ``softhsm2.conf`` points (:func:`conf_state`)."""

    conf: Path
    configured: str | None
    """The ``directories.tokendir`` value, or None when the file has no such line."""
    expected: Path
    """The data directory's own token directory."""
    own_tokens: bool
    """Whether the data directory's own token directory holds a token."""

    @property
    def outside(self) -> bool:
        """The config points somewhere other than the data directory's own token directory."""
        return self.configured is None or Path(self.configured) != self.expected


def find_module() -> str:
    """Path of the SoftHSM2 PKCS#11 module; the first candidate when none exists."""
    for candidate in MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return MODULE_CANDIDATES[0]


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    with open(data_dir / ".init.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)


def _token_exists(conf: Path, token_dir: Path, label: str) -> bool:
    """Whether a token labelled ``label`` exists. SoftHSM2 leaves out a token whose files it
    cannot read at that moment, which happens while another process writes the token: then
    fewer tokens are shown than ``token_dir`` holds, and the answer waits for a consistent
    view (initializing a second token with the same label would break every later opening)."""
    deadline = time.monotonic() + CONSISTENT_VIEW_TIMEOUT
    while True:
        labels = _initialized_labels(_softhsm2_util(conf, "--show-slots").stdout)
        if label in labels:
            return True
        on_disk = sum(1 for d in token_dir.iterdir() if (d / "token.object").is_file())
        if len(labels) >= on_disk:
            return False
        if time.monotonic() >= deadline:
            raise SoftHSMSetupError(
                f"{token_dir} holds {on_disk} token(s) but SoftHSM2 could read only "
                f"{len(labels)}: check the token files"
            )
        time.sleep(0.1)


def _initialized_labels(show_slots: str) -> list[str]:
    """The labels of the initialized tokens in ``softhsm2-util --show-slots`` output."""
    labels: list[str] = []
    initialized = False
    for line in show_slots.splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        if key.strip() == "Initialized":
            initialized = value.strip() == "yes"
        elif key.strip() == "Label" and initialized:
            labels.append(value.strip())
            initialized = False
    return labels


def _softhsm2_util(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHSMSetupError("softhsm2-util not found: install the softhsm2 package")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    proc = subprocess.run(
        [util, *args], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SoftHSMSetupError(
            f"softhsm2-util {args[0]} failed: {detail[-1] if detail else proc.returncode}"
        )
    return proc


def _holds_a_token(token_dir: Path) -> bool:
    try:
        return any((d / "token.object").is_file() for d in token_dir.iterdir())
    except OSError:
        return False


def conf_state(data_dir: Path) -> ConfState | None:
    """Where ``<data_dir>/softhsm2.conf`` points, or None when there is no such file."""
    data_dir = data_dir.absolute()
    conf = data_dir / CONF_NAME
    try:
        text = conf.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SoftHSMSetupError(
            f"cannot read SoftHSM2 configuration {conf}: {exc.strerror}"
        ) from None
    found = _TOKENDIR_LINE.search(text)
    token_dir = data_dir / TOKEN_DIR_NAME
    return ConfState(conf, found.group(2) if found else None, token_dir, _holds_a_token(token_dir))


def _replace_file(path: Path, content: str) -> None:
    """Write ``path`` atomically (a process loading it sees the old or the new file), 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _relocate(state: ConfState) -> str | None:
    """Point ``state.conf`` at the data directory's own token directory when it names another
    one and the data directory holds its own token; returns the tokendir it replaced. A config
    naming another directory while ``tokens/`` here holds no token is left alone (someone may
    have pointed it at a token kept elsewhere on purpose; ``hsmkms doctor`` reports it)."""
    if not state.outside or not state.own_tokens:
        return None
    text = state.conf.read_text()
    line = f"directories.tokendir = {state.expected}"
    if state.configured is None:
        text = text.rstrip("\n") + f"\n{line}\n"
    else:
        text = _TOKENDIR_LINE.sub(lambda m: m.group(1) + str(state.expected), text, count=1)
    _replace_file(state.conf, text)
    log.warning(
        "softhsm2_conf_relocated",
        conf=str(state.conf),
        # (not "token_dir": a field named like a token would be redacted by hsmkms.log)
        was=state.configured,
        now=str(state.expected),
    )
    return state.configured or ""


def relocate_conf(data_dir: Path) -> str | None:
    """Make ``<data_dir>/softhsm2.conf`` point at ``<data_dir>/tokens`` when the data directory
    was moved or copied (see the module docstring). Returns the token directory the config named
    before when it rewrote it, else None. Cheap when nothing is to do (one small read); the
    rewrite happens under the data directory's init lock, atomically."""
    data_dir = data_dir.absolute()
    state = conf_state(data_dir)
    if state is None or not state.outside or not state.own_tokens:
        return None
    with _locked(data_dir):
        state = conf_state(data_dir)
        return None if state is None else _relocate(state)


def ensure_token(data_dir: Path, label: str = DEFAULT_LABEL) -> Path:
    """Create the data directory, config, PIN files and token when missing. Returns the
    path of ``softhsm2.conf``. Does nothing (but check) when the token already exists."""
    data_dir = data_dir.absolute()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_dir = data_dir / TOKEN_DIR_NAME
    conf = data_dir / CONF_NAME
    with _locked(data_dir):
        token_dir.mkdir(mode=0o700, exist_ok=True)
        if not conf.exists():
            _write_private(conf, CONF_TEMPLATE.format(token_dir=token_dir))
        if not conf.is_file() or not os.access(conf, os.R_OK):
            raise SoftHSMSetupError(f"cannot read SoftHSM2 configuration {conf}")
        state = conf_state(data_dir)
        external = state is not None and state.outside and _relocate(state) is None
        if external:
            # Pointed elsewhere on purpose (see _relocate): use that token, never make one there.
            assert state is not None
            if _token_exists(conf, Path(state.configured or token_dir), label):
                return conf
            raise SoftHSMSetupError(
                f"{conf} names the token directory {state.configured or '(none)'}, not "
                f"{token_dir}, and holds no token labelled {label!r} there: point it at "
                f"{token_dir} or remove it"
            )
        if _token_exists(conf, token_dir, label):
            if not (data_dir / "user.pin").exists():
                raise SoftHSMSetupError(
                    f"token {label!r} exists but {data_dir / 'user.pin'} is missing"
                )
            return conf
        for name in ("user.pin", "so.pin"):
            if not (data_dir / name).exists():
                _write_private(data_dir / name, secrets.token_hex(16))
        user_pin = (data_dir / "user.pin").read_text().strip()
        so_pin = (data_dir / "so.pin").read_text().strip()
        # softhsm2-util takes PINs only as arguments or from a terminal; the window is this call.
        _softhsm2_util(
            conf, "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", user_pin
        )
    return conf


# --------------------------------------------------------------------------------------------
# Copying the token files while SoftHSM2 may be writing them (hsmkms backup)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenCopy:
    """What :func:`copy_token_files` copied (paths relative to the target) and left out."""

    files: tuple[Path, ...]
    skipped: tuple[str, ...]
    """Object files left out: written after ``since`` or while being copied (objects being
    created or changed), or destroyed while being read."""


def _read_locked(path: Path) -> tuple[bytes, os.stat_result] | None:
    """``path``'s bytes and status, read under a POSIX read lock on the whole file — the lock
    SoftHSM2 2.6 itself reads under, which its writers' write lock excludes (``File::lock``:
    ``fcntl`` ``F_SETLKW`` with ``F_RDLCK``/``F_WRLCK``; ``ObjectFile::store`` truncates and
    rewrites an object file while holding ``F_WRLCK``). None when the file is gone, or was
    removed while it was read (a destroyed object)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            opened = os.fstat(fd)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    try:
        now = path.stat()
    except FileNotFoundError:
        return None
    if (now.st_ino, now.st_dev) != (opened.st_ino, opened.st_dev):
        return None
    return b"".join(chunks), opened


def _read_settled(path: Path) -> bytes:
    """A token's own file (``token.object``, ``generation``), read until two reads in a row
    agree (``token.object`` also not empty): SoftHSM2 rewrites them in place, and a copy taken
    while another process logged in once held an empty ``token.object`` (a token SoftHSM2 then
    does not list). OSError when the file does not settle within about two seconds."""
    last: bytes | None = None
    for _ in range(400):
        read = _read_locked(path)
        data = None if read is None else read[0]
        if data is not None and data == last and (data or path.name != "token.object"):
            return data
        last = data
        time.sleep(0.005)
    raise OSError(f"{path} kept changing while it was copied")


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def copy_token_files(token_dir: Path, target: Path, *, since: float) -> TokenCopy:
    """Copy SoftHSM2's token directories in ``token_dir`` into the new directory ``target``
    while other processes may be creating, using and destroying objects: every object whose
    file was last written before ``since`` (a ``time.time()``) and did not change during the
    copy, whole.

    Each file is read under a read lock (:func:`_read_locked`), so no copy holds half of one
    write. But SoftHSM2 2.6 writes an object in many steps — the object file is rewritten for
    each attribute it sets while creating it (measured: 20 and more whole-file rewrites per
    AES key, each a consistent file) — so a file read while an object is being created is a
    whole file of an unfinished object. hsmkms processes create and destroy objects only
    while holding the token's write lock shared, so the caller holds it exclusively
    (:func:`hold_token_writes`) and no hsmkms process is inside a creation. Against other
    writers (``softhsm2-util``, ``pkcs11-tool``) two rules remain: an object file written at
    or after ``since`` is left out, and so is one whose bytes differ when read again after the
    copy. An object hsmkms has recorded is never rewritten (its attributes are not
    modifiable) and its last write precedes the database commit that records it, so with
    ``since`` taken after the database's write lock, before its snapshot, every object the
    snapshot names is copied.

    ``token.object`` and ``generation`` are copied once two reads agree
    (:func:`_read_settled`). Lock files (``*.lock``) are always empty and are made anew, one
    per copied object and one per token: SoftHSM2 refuses to destroy an object whose lock file
    is missing."""
    target.mkdir(mode=0o700)
    files: list[Path] = []
    skipped: list[str] = []
    copied: dict[Path, bytes] = {}
    since_ns = int(since * 1e9)
    for token in sorted(p for p in token_dir.iterdir() if p.is_dir()):
        out = target / token.name
        out.mkdir(mode=0o700)
        for path in sorted(token.iterdir()):
            if path.suffix == ".lock" or not path.is_file():
                continue
            is_object = path.suffix == ".object" and path.name != "token.object"
            if not is_object:
                _write_new(out / path.name, _read_settled(path))
                continue
            read = _read_locked(path)
            if read is None or read[1].st_mtime_ns >= since_ns:
                skipped.append(f"{token.name}/{path.name}")
                continue
            _write_new(out / path.name, read[0])
            if is_object:
                copied[path] = read[0]
    for path, data in copied.items():
        again = _read_locked(path)
        if again is None or again[0] != data:
            (target / path.parent.name / path.name).unlink()
            skipped.append(f"{path.parent.name}/{path.name}")
    for token in sorted(p for p in target.iterdir()):
        for path in sorted(token.iterdir()):
            files.append(Path(token.name) / path.name)
            if path.suffix == ".object":
                _write_new(token / f"{path.stem}.lock", b"")
                files.append(Path(token.name) / f"{path.stem}.lock")
    return TokenCopy(tuple(sorted(files)), tuple(sorted(skipped)))


def is_softhsm2(module_path: str) -> bool:
    """Whether the PKCS#11 module at ``module_path`` is SoftHSM2's (by its file name)."""
    return os.path.basename(os.path.realpath(module_path)).startswith("libsofthsm2")


def conf_token_dir(conf: Path) -> Path | None:
    """The ``directories.tokendir`` a SoftHSM2 configuration file names, or None when the file
    cannot be read or names none."""
    try:
        found = _TOKENDIR_LINE.search(conf.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    return Path(found.group(2)) if found and found.group(2) else None


def token_dir_write_lock(conf: Path) -> Path | None:
    """The token write lock of every token in the token directory ``conf`` names
    (``<tokendir>/.token-writes.lock``), or None when ``conf`` names none. Every process on
    that directory finds the same file, whatever its data directory: the races it guards
    against are between processes on one token directory (:mod:`hsmkms.keystore.token_lock`).
    SoftHSM2 takes only the directories in its token directory for tokens and leaves a file
    there alone (every embedded token of the test suite has its lock file there)."""
    token_dir = conf_token_dir(conf)
    return None if token_dir is None else token_dir / TOKEN_WRITE_LOCK


def hold_token_writes(lock: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the token write lock ``lock`` exclusively (:mod:`hsmkms.keystore.token_lock`;
    :func:`hsmkms.config.token_write_lock`): every hsmkms process holds it shared while it
    creates or destroys token objects, and exclusively while it logs in, lists objects or
    changes an anchor, so while this is held no object is half written by hsmkms. Waits for
    the creations in flight."""
    return token_write_lock(lock).exclusive()


def write_conf(data_dir: Path) -> Path:
    """Write ``<data_dir>/softhsm2.conf`` (replacing any), pointing at ``<data_dir>/tokens``."""
    data_dir = data_dir.absolute()
    conf = data_dir / CONF_NAME
    _replace_file(conf, CONF_TEMPLATE.format(token_dir=data_dir / TOKEN_DIR_NAME))
    return conf
