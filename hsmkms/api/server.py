"""Running the API: initialize and check the data directory, bind, and supervise N uvicorn
workers.

The parent process initializes (token, database, root identity) and checks what the workers
will open — the module, the token, the PIN, a self-test, the databases — so that a wrong PIN or
a missing module is one line and a non-zero exit before anything else is printed. It binds the
listening sockets (one per worker on the one port, so that the kernel spreads connections over
the workers: :func:`_bind_all`), then starts the workers with the *spawn* method (uvicorn's
supervisor): each is a fresh interpreter that opens PKCS#11 itself. "serving" is printed once
every worker has finished its start-up (each answers the supervisor's readiness ping). The
parent never serves;
it restarts a worker that dies — logging, at the default level, which worker died and why (its
exit status or signal, or that it stopped answering) — and, on SIGTERM or SIGINT, asks every
worker to finish its in-flight requests and stop. A replacement that cannot start is retried,
waiting longer each time (up to :data:`MAX_RESTART_DELAY` seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hsmkms.api.metrics import MULTIPROC_ENV
from hsmkms.config import ConfigError, Settings

if TYPE_CHECKING:
    from hsmkms.keystore.base import TokenInfo
    from hsmkms.system import InitReport

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ServeOptions",
    "death_reason",
    "default_workers",
    "serve",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# In-flight KMS requests take milliseconds; the bound matters for idle TLS keep-alive
# connections, whose close waits for the client's close_notify.
GRACEFUL_SHUTDOWN_SECONDS = 5
# How long a worker may take to start (load PKCS#11, log in, probe the token, open the
# databases and the audit trail) before the server gives up.
STARTUP_SECONDS = 120.0
MAX_RESTART_DELAY = 30.0
"""The longest wait before another try at starting a replacement worker that failed to."""

log = structlog.get_logger(__name__)


def death_reason(exitcode: int | None, *, hung: bool = False, timeout: float = 0.0) -> str:
    """Why a worker process ended, in words (``killed by signal SIGBUS``)."""
    if hung:
        return f"stopped answering the supervisor for {timeout:g} s (killed with SIGKILL)"
    if exitcode is None:
        return "ended for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        else:
            name = f"signal {name}"
        return f"killed by {name}"
    if exitcode == 3:
        return "failed to start (exit status 3; its reason is logged above)"
    return f"exited with status {exitcode}"


def default_workers() -> int:
    """One worker per CPU this process may run on (PKCS#11 is serialized per process)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The options of ``hsmkms serve``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    task_interval: float = 60.0
    log_level: str = "warning"
    log_format: str | None = None
    console: bool = False


def _check_tls(options: ServeOptions) -> None:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError(
            "--tls-cert and --tls-key (HSMKMS_TLS_CERT, HSMKMS_TLS_KEY) must be given together"
        )
    for path in (options.tls_cert, options.tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"TLS file {path} is not readable")


def _prepare_metrics_dir(data_dir: Path) -> Path:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = data_dir / "prometheus"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket (bound here, in the parent, and inherited by a worker)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _bind_all(host: str, port: int, workers: int) -> list[socket.socket]:
    """One listening socket per worker, all on one port (``SO_REUSEPORT``, where the system
    has it): the kernel spreads new connections over them by their addresses. With one shared
    socket, the worker that wakes first accepts every connection waiting — a client that opens
    16 connections at once got all 16 on one worker in about half of the tries, leaving the
    other idle.
    The sockets are made by this process, so only its user can join the port (Linux admits
    only sockets of the same user to a ``SO_REUSEPORT`` group)."""
    if workers == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [_bind(host, port)]
    # First without SO_REUSEPORT: the port must be free — another server of this user (a
    # second `hsmkms serve` on another data directory) must not silently share it.
    probe = _bind(host, port)
    bound = probe.getsockname()[1]  # port 0: the port the probe got
    probe.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(workers):
            sockets.append(_bind(host, bound, reuse_port=True))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def serve(settings: Settings, options: ServeOptions) -> int:
    """Initialize, check, bind and serve until SIGTERM/SIGINT. Returns the exit code."""
    if options.workers < 1:
        raise ConfigError("--workers must be at least 1")
    _check_tls(options)

    from hsmkms.system import check_data_directory, initialize

    report = initialize(settings)
    token = check_data_directory(settings)
    # Before anything imports prometheus-client in a worker (and, to be safe, here).
    _prepare_metrics_dir(settings.data_dir)
    sockets = _bind_all(options.host, options.port, options.workers)
    try:
        return _run(settings, options, sockets, report, token)
    finally:
        for sock in sockets:
            sock.close()


def _supervisor(config: Any, sockets: list[socket.socket], on_ready: Any) -> Any:
    """uvicorn's worker supervisor, which also waits, after starting the workers, until each
    has finished its start-up — uvicorn's own readiness ping (``Process.is_ready``: the worker's
    server has started) — and then calls ``on_ready``. A worker that exits first, or a start-up
    longer than :data:`STARTUP_SECONDS`, stops the server; ``failed`` says why. Afterwards it
    says why a worker died (:func:`death_reason`) and keeps retrying replacements that fail to
    start."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    class Supervisor(Multiprocess):
        failed: str | None = None

        def sockets_of(self, idx: int) -> list[socket.socket]:
            """Worker ``idx``'s socket when each has its own (_bind_all), else the shared one."""
            if len(self.sockets) == self.processes_num:
                return [self.sockets[idx]]
            return list(self.sockets)

        def init_processes(self) -> None:
            for idx in range(self.processes_num):
                process = Process(self.config, self.sockets_of(idx))
                process.start()
                self.processes.append(process)
            self.restart_at: dict[int, float] = {}
            self.restart_delay: dict[int, float] = {}
            deadline = time.monotonic() + STARTUP_SECONDS
            for process in self.processes:
                while not self.should_exit.is_set():
                    self.handle_signals()
                    if not process.process.is_alive():
                        process.join()
                        code = process.exitcode
                        # A worker that could not start has said why in one line already.
                        self.failed = (
                            ""
                            if code == STARTUP_FAILURE
                            else f"a worker {death_reason(code)} before it was ready"
                        )
                        self.should_exit.set()
                        return
                    if process.is_ready(timeout=0.5):
                        break
                    if time.monotonic() > deadline:
                        self.failed = f"a worker was not ready after {STARTUP_SECONDS:g} s"
                        self.should_exit.set()
                        return
            if not self.should_exit.is_set():
                on_ready()

        def keep_subprocess_alive(self) -> None:
            if self.should_exit.is_set():
                return
            timeout = self.config.timeout_worker_healthcheck
            for idx, process in enumerate(self.processes):
                when = self.restart_at.get(idx)
                if when is not None:
                    if time.monotonic() >= when:
                        del self.restart_at[idx]
                        self._replace(idx)
                    continue
                if process.is_alive(timeout=timeout):
                    continue
                hung = process.process.is_alive()
                process.kill()
                process.join()
                code = process.exitcode
                reason = death_reason(code, hung=hung, timeout=timeout)
                if self.should_exit.is_set():
                    return
                if code == STARTUP_FAILURE:
                    delay = min(2 * self.restart_delay.get(idx, 0.5), MAX_RESTART_DELAY)
                    self.restart_delay[idx] = delay
                    self.restart_at[idx] = time.monotonic() + delay
                    log.error("worker_died", pid=process.pid, reason=reason, retry_in=delay)
                    continue
                self.restart_delay.pop(idx, None)
                log.error("worker_died", pid=process.pid, reason=reason)
                self._replace(idx)

        def _replace(self, idx: int) -> None:
            process = Process(self.config, self.sockets_of(idx))
            process.start()
            self.processes[idx] = process

    return Supervisor(config, sockets=sockets)


def _run(
    settings: Settings,
    options: ServeOptions,
    sockets: list[socket.socket],
    report: InitReport,
    token: TokenInfo,
) -> int:
    import uvicorn

    from hsmkms.api.app import create_app

    os.environ["HSMKMS_DATA_DIR"] = str(settings.data_dir)
    config = uvicorn.Config(
        functools.partial(
            create_app,
            settings.data_dir,
            options.task_interval,
            options.log_level,
            console=options.console,
            log_format=options.log_format,
        ),
        factory=True,
        host=options.host,
        port=options.port,
        workers=options.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        # The access log is hsmkms's own (one line per request from the app, with the
        # operation, status, latency and principal: hsmkms.api.app), not uvicorn's.
        access_log=False,
        # uvicorn's own records go to the root logger, which hsmkms.log set up in this process
        # and in each worker (create_app): the same format, level and secret redaction.
        log_config=None,
        # aws:SourceIp, aws:SecureTransport and the audit trail's sourceIPAddress come from
        # the connection itself: forwarding headers are client-controlled, never trusted.
        proxy_headers=False,
        log_level=options.log_level,
        ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
        ssl_keyfile=str(options.tls_key) if options.tls_key else None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        server_header=False,
    )
    port = sockets[0].getsockname()[1]
    scheme = "https" if options.tls_cert else "http"
    host = f"[{options.host}]" if ":" in options.host else options.host

    def ready() -> None:
        print(f"hsmkms: serving the KMS API on {scheme}://{host}:{port}", flush=True)
        if options.console:
            print(f"hsmkms: read-only console on {scheme}://{host}:{port}/console/", flush=True)
        print(
            f"hsmkms: data directory {report.data_dir}; {options.workers} worker(s); "
            f"region {settings.region}; account {settings.account_id}; token {token.label!r} "
            f"serial {token.serial} ({token.manufacturer} {token.model})",
            flush=True,
        )
        if report.root_environment_retired is not None:
            print(
                f"hsmkms: HSMKMS_ROOT_ACCESS_KEY_ID names a root key retired on "
                f"{report.root_environment_retired}: ignored (the root's access key is "
                f"{report.root_access_key_id}; remove the HSMKMS_ROOT_* variables)",
                flush=True,
            )
        elif report.root_credentials_file is not None:
            print(f"hsmkms: root credentials in {report.root_credentials_file}", flush=True)
        else:
            print(
                f"hsmkms: root access key {report.root_access_key_id} (from "
                "HSMKMS_ROOT_ACCESS_KEY_ID)",
                flush=True,
            )

    supervisor = _supervisor(config, sockets, ready)
    supervisor.run()
    if supervisor.failed is not None:
        if supervisor.failed:
            print(f"hsmkms serve: {supervisor.failed}", file=sys.stderr)
        return 1
    return 0
