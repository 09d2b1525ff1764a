"""Running the API: initialize the data directory, bind, and supervise N uvicorn workers.

The parent process initializes (token, database, root identity), binds the listening socket,
then starts the workers with the *spawn* method (uvicorn's supervisor): each is a fresh
interpreter that opens PKCS#11 itself. The parent never serves; it restarts a worker that
dies — logging, at the default level, which worker died and why (its exit status or signal,
or that it stopped answering) — and, on SIGTERM or SIGINT, asks every worker to finish its
in-flight requests and stop. A worker of the first generation that cannot start stops the
server (a configuration error fails the same way every time); a replacement that cannot
start is retried, waiting longer each time (up to :data:`MAX_RESTART_DELAY` seconds).
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


def _supervisor(config: Any, sockets: list[socket.socket]) -> Any:
    """uvicorn's :class:`~uvicorn.supervisors.Multiprocess` that says why a worker died and
    keeps retrying replacements that fail to start (see the module docstring)."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import Multiprocess, Process

    class Supervisor(Multiprocess):
        def init_processes(self) -> None:
            super().init_processes()
            self.first_generation = {id(p) for p in self.processes}
            self.restart_at: dict[int, float] = {}
            self.restart_delay: dict[int, float] = {}

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
                if code == STARTUP_FAILURE and id(process) in self.first_generation:
                    log.error("worker_failed_to_start", pid=process.pid, reason=reason)
                    self.should_exit.set()
                    return
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
            process = Process(self.config, self.sockets)
            process.start()
            self.processes[idx] = process

    return Supervisor(config, sockets)


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
    console: bool = False


def _check_tls(options: ServeOptions) -> None:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key must be given together")
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


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, in the parent, and inherited by every worker)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, options: ServeOptions) -> int:
    """Initialize, bind and serve until SIGTERM/SIGINT. Returns the exit code."""
    if options.workers < 1:
        raise ConfigError("--workers must be at least 1")
    _check_tls(options)
    # Before anything imports prometheus-client in a worker (and, to be safe, here).
    _prepare_metrics_dir(settings.data_dir)

    from hsmkms.system import initialize

    sock = _bind(options.host, options.port)
    try:
        return _run(settings, options, sock, initialize(settings))
    finally:
        sock.close()


def _run(settings: Settings, options: ServeOptions, sock: socket.socket, report: InitReport) -> int:
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from hsmkms.api.app import create_app

    os.environ["HSMKMS_DATA_DIR"] = str(settings.data_dir)
    config = uvicorn.Config(
        functools.partial(
            create_app,
            settings.data_dir,
            options.task_interval,
            options.log_level,
            console=options.console,
        ),
        factory=True,
        host=options.host,
        port=options.port,
        workers=options.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        # uvicorn's own records go to the root logger, which hsmkms.log set up (JSON lines
        # through the secret redaction) in this process and in each worker (create_app).
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
    port = sock.getsockname()[1]
    scheme = "https" if options.tls_cert else "http"
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"hsmkms: serving the KMS API on {scheme}://{host}:{port}", flush=True)
    if options.console:
        print(f"hsmkms: read-only console on {scheme}://{host}:{port}/console/", flush=True)
    print(
        f"hsmkms: data directory {report.data_dir}; {options.workers} worker(s); "
        f"region {settings.region}; account {settings.account_id}",
        flush=True,
    )
    if report.root_credentials_file is not None:
        print(f"hsmkms: root credentials in {report.root_credentials_file}", flush=True)
    else:
        print(
            f"hsmkms: root access key {report.root_access_key_id} (from HSMKMS_ROOT_ACCESS_KEY_ID)",
            flush=True,
        )
    supervisor = _supervisor(config, [sock])
    supervisor.run()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        print("hsmkms serve: a worker failed to start (see above)", file=sys.stderr)
        return 1
    return 0
