"""Load on a real ``hsmkms serve`` for fault tests: client threads on keep-alive connections
(renewed every few requests, so every worker gets some),
each request signed afresh, remembering the request id and status of every answer received
(an answer is what a client saw; a connection that broke before the answer is not one)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from server import RunningServer

from hsmkms.sigv4 import SignedRequest, sign

Body = Callable[[int], Mapping[str, Any]]
RECONNECT_EVERY = 20
NOT_JSON = "(not a JSON body)"
"""The error of an answer whose body is not JSON: never an AWS answer."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answered request."""

    request_id: str
    status: int
    target: str
    worker: str
    error: str | None  # the __type of an error answer
    message: str | None
    body: Any


@dataclasses.dataclass
class Load:
    """``threads`` clients sending the operations of ``mix`` in turn until :meth:`stop`."""

    server: RunningServer
    mix: Sequence[tuple[str, Body]]
    threads: int = 4
    answers: list[Answer] = dataclasses.field(default_factory=list)
    broken: int = 0  # requests whose connection broke before an answer
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = dataclasses.field(default_factory=list)

    def start(self) -> Load:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._workers:
            thread.join(60)
        return list(self.answers)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def _run(self, n: int) -> None:
        conn = self.server.connection()
        i = 0
        while not self._stop.is_set():
            target, body = self.mix[(n + i) % len(self.mix)]
            i += 1
            try:
                answer = send(self.server, conn, target, body(i))
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.broken += 1
                conn.close()
                conn = self.server.connection()
                continue
            with self._lock:
                self.answers.append(answer)
            if i % RECONNECT_EVERY == 0:
                # A new connection now and then: the kernel hands each accept to one worker,
                # and keep-alive connections alone can all land on the same one.
                conn.close()
                conn = self.server.connection()
        conn.close()


def send(
    server: RunningServer,
    conn: http.client.HTTPConnection,
    target: str,
    body: Mapping[str, Any],
) -> Answer:
    """One signed request on ``conn``; its answer."""
    data = json.dumps(body).encode()
    headers = [
        ("Host", server.host),
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", f"TrentService.{target}"),
    ]
    signed = sign(
        SignedRequest("POST", "/", "", headers, data),
        server.root,
        region=server.region,
        when=datetime.now(UTC),
    )
    conn.request("POST", "/", body=data, headers=dict(signed.headers))
    response = conn.getresponse()
    raw = response.read()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:  # not an AWS answer (uvicorn's bare 500 for an unhandled exception)
        parsed = {"__type": NOT_JSON, "message": raw[:200].decode("utf-8", "replace")}
    error = parsed.get("__type") if response.status != 200 else None
    return Answer(
        request_id=response.getheader("x-amzn-RequestId") or "",
        status=response.status,
        target=target,
        worker=response.getheader("x-hsmkms-worker") or "",
        error=error,
        message=parsed.get("message") if error else None,
        body=parsed,
    )
