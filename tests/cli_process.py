"""``python -m hsmkms.cli.main ARGS`` for the tests, without paying the interpreter's imports
each time.

Each command line run is still its own process: its own arguments, environment, working
directory, standard streams, exit code and PKCS#11 login. What the tests skip is importing
the third-party libraries again (SQLAlchemy, pydantic, structlog, cryptography: about 0.8 s
of the 1.1-1.3 s a command takes on the CI machine, several hundred times per run). A helper
process (this file run as a script, one per test process) imports them once, then for each
command forks a monitor, which forks the command's process and reports its pid and its exit
status. The command's process imports ``hsmkms`` itself, afresh, as ``-m`` does: an import
problem of hsmkms's own still shows.

:func:`run` takes what the tests pass to :func:`subprocess.run`. Anything it does not
reproduce (another program, other ``PYTHON*`` variables than the helper started with, other
options) runs as a real subprocess, and so does everything with ``HSMKMS_TEST_CLI_FORK=0``.
Tests that need a pipe, a signal or a terminal use :class:`subprocess.Popen` themselves.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, overload

CLI_MODULE = "hsmkms.cli.main"
_PRELOAD = (
    # Third-party only, and none that reads the environment when imported (prometheus_client
    # reads PROMETHEUS_MULTIPROC_DIR then, so it is left to the command).
    "sqlalchemy",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "pydantic",
    "pydantic_settings",
    "structlog",
    "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "cryptography.x509",
    "pkcs11",
)
_LENGTH = struct.Struct("!I")
_STATUS = struct.Struct("!qq")  # (kind, value): kind 0 = pid, 1 = exit code


# -- the helper process ------------------------------------------------------------------------


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """The command's process: its streams, environment, directory and arguments, then the
    module run as ``-m`` runs it, then the interpreter's own exit steps. Never returns."""
    import io
    import runpy

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, mode: str, errors: str) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        buffered: Any = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        tty = raw.isatty()
        return io.TextIOWrapper(
            buffered, encoding="utf-8", errors=errors,
            line_buffering=(fd == 2 or tty) and mode == "w", write_through=unbuffered,
        )  # fmt: skip

    sys.stdin = stream(0, "r", "strict")
    sys.stdout = stream(1, "w", "strict")
    sys.stderr = stream(2, "w", "backslashreplace")
    for name in ("stdin", "stdout", "stderr"):  # what the interpreter started with
        setattr(sys, f"__{name}__", getattr(sys, name))
    sys.argv = [request["argv0"], *request["args"]]
    sys.path.insert(0, request["cwd"])  # as -m puts the working directory first
    code: int = 0
    try:
        runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does at exit: wait for its threads, run atexit, flush the streams.
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for out in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            out.flush()
    os._exit(code & 0xFF)


def _monitor(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """Between the helper and the command: forks it, reports its pid and its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the helper ignores it; waitpid needs it
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(_STATUS.pack(0, pid))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):
        conn.sendall(_STATUS.pack(1, code))
    os._exit(0)


def _serve(path: str) -> None:
    """The helper's loop: one monitor per request; ends with the test process."""
    import importlib

    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(None)
            try:
                (size,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
                body, fds, _flags, _addr = socket.recv_fds(conn, size, 3)
                body += _recv_exact(conn, size - len(body))
            except (EOFError, OSError):
                continue
            if len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                continue
            if os.fork() == 0:
                listener.close()
                _monitor(conn, json.loads(body), fds)
            for fd in fds:
                os.close(fd)


# -- the test process's side -------------------------------------------------------------------

_lock = threading.Lock()
_helper: tuple[subprocess.Popen[str], str, dict[str, str]] | None = None


def _python_env(env: Mapping[str, str]) -> dict[str, str]:
    """What the interpreter reads when it starts (the helper's were read once)."""
    return {k: v for k, v in env.items() if k.startswith("PYTHON") and k != "PYTHONUNBUFFERED"}


def _start_helper() -> tuple[subprocess.Popen[str], str, dict[str, str]]:
    global _helper
    with _lock:
        if _helper is not None and _helper[0].poll() is None:
            return _helper
        folder = tempfile.mkdtemp(prefix="hsmkms-cli-")
        path = os.path.join(folder, "fork.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HSMKMS_", "AWS_"))}
        process = subprocess.Popen(
            [sys.executable, __file__, path],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("the command line helper did not start")
        atexit.register(_stop_helper, process, folder)
        _helper = (process, path, _python_env(env))
        return _helper


def _stop_helper(process: subprocess.Popen[str], folder: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


def forks(argv: Sequence[str], env: Mapping[str, str] | None, options: dict[str, Any]) -> bool:
    """Whether :func:`run` forks this command from the helper (else: a real subprocess)."""
    if os.environ.get("HSMKMS_TEST_CLI_FORK", "1") == "0" or any(
        value is not None for value in options.values()
    ):
        return False
    if list(argv[:3]) != [sys.executable, "-m", CLI_MODULE]:
        return False
    started = _start_helper()
    return _python_env(env if env is not None else os.environ) == started[2]


@overload
def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = ...,
    cwd: str | os.PathLike[str] | None = ...,
    input: bytes | str | None = ...,
    capture_output: bool = ...,
    text: Literal[True],
    timeout: float | None = ...,
    check: bool = ...,
    **options: Any,
) -> subprocess.CompletedProcess[str]: ...
@overload
def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = ...,
    cwd: str | os.PathLike[str] | None = ...,
    input: bytes | str | None = ...,
    capture_output: bool = ...,
    text: Literal[False] = ...,
    timeout: float | None = ...,
    check: bool = ...,
    **options: Any,
) -> subprocess.CompletedProcess[bytes]: ...
def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | str | None = None,
    capture_output: bool = False,
    text: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **options: Any,
) -> subprocess.CompletedProcess[Any]:
    """:func:`subprocess.run` of ``[sys.executable, "-m", "hsmkms.cli.main", ...]``, forked
    from the helper (see the module's text); anything else as a real subprocess."""
    if not forks(argv, env, options):
        return subprocess.run(
            list(argv), env=env, cwd=cwd, input=input, capture_output=capture_output,
            text=text, timeout=timeout, check=check, **options,
        )  # fmt: skip
    # Every option left is None (the default): nothing to reproduce.
    _, path, _ = _start_helper()
    data = input.encode() if isinstance(input, str) else input
    with contextlib.ExitStack() as stack:
        files: list[IO[bytes]] = []
        if data is not None:
            stdin = stack.enter_context(tempfile.TemporaryFile())
            stdin.write(data)
            stdin.seek(0)
            fds = [stdin.fileno()]
        else:
            fds = [0]
        if capture_output:
            files = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
            fds += [f.fileno() for f in files]
        else:
            fds += [1, 2]
        request = {
            "args": list(argv[3:]),
            "argv0": _module_path(),
            "env": dict(env if env is not None else os.environ),
            "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
            "umask": _umask(),
        }
        code = _ask(path, request, fds, argv, timeout)
        out: Any = None
        err: Any = None
        if capture_output:
            out, err = (_read(f, text) for f in files)
    result = subprocess.CompletedProcess(list(argv), code, out, err)
    if check:
        result.check_returncode()
    return result


def _ask(
    path: str, request: dict[str, Any], fds: list[int], argv: Sequence[str], timeout: float | None
) -> int:
    body = json.dumps(request).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        conn.sendall(_LENGTH.pack(len(body)))
        socket.send_fds(conn, [body], fds)
        deadline = None if timeout is None else time.monotonic() + timeout
        pid = None
        while True:
            if deadline is not None:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                kind, value = _STATUS.unpack(_recv_exact(conn, _STATUS.size))
            except TimeoutError:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(list(argv), timeout or 0.0) from None
            if kind == 0:
                pid = value
            else:
                return int(value)


def _read(file: IO[bytes], text: bool) -> bytes | str:
    file.seek(0)
    data = file.read()
    if not text:
        return data
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def _module_path() -> str:
    """``sys.argv[0]`` under ``-m``: the module's file."""
    import importlib.util

    spec = importlib.util.find_spec(CLI_MODULE)
    assert spec is not None
    assert spec.origin is not None
    return spec.origin


if __name__ == "__main__":
    # The helper: this file as a script. Not tests/ on its path: the command's must be the
    # interpreter's own (a test module named like a library would shadow it).
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
    _serve(sys.argv[1])
