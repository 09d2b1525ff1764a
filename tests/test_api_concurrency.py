"""The worker's event loop keeps serving while an administrative call is slow: key
administration runs on the worker's admin thread, the cryptographic fast path on the loop
(``docs/http-api.md``, "Execution model"). Behavioural: ordering only, no wall-clock bounds."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

from hsmkms import models as m
from hsmkms.api.app import KmsApp
from hsmkms.audit import AuditRecord, PreparedRecord
from hsmkms.sigv4 import Credential, SignedRequest, sign
from hsmkms.types import Caller

ROOT = Credential(
    "AKIAHSMKMSCONCURRENCY", "secret-of-the-concurrency-test", "arn:aws:iam::111122223333:root"
)
DEADLOCK_GUARD = 60.0  # seconds: only so that a regression fails instead of hanging


class SlowAdminService:
    """PutKeyPolicy waits until the test releases it; Encrypt answers at once."""

    def __init__(self) -> None:
        self.admin_entered = threading.Event()
        self.release_admin = threading.Event()
        self.finished: list[str] = []

    def put_key_policy(self, request: Any, *, caller: Caller) -> m.EmptyResponse:
        self.admin_entered.set()
        assert self.release_admin.wait(DEADLOCK_GUARD)
        self.finished.append("PutKeyPolicy")
        return m.EmptyResponse()

    def encrypt(self, request: Any, *, caller: Caller) -> m.EncryptResponse:
        self.finished.append("Encrypt")
        algorithm = m.EncryptionAlgorithmSpec.SYMMETRIC_DEFAULT
        return m.EncryptResponse(
            CiphertextBlob=b"ciphertext", KeyId=request.KeyId, EncryptionAlgorithm=algorithm
        )


class Backend:
    """Just enough of a worker's runtime for the app (``hsmkms.api.app.Backend``)."""

    region = "us-east-1"
    account_id = "111122223333"
    keystore = None
    xks_credentials: Any = None

    def __init__(self) -> None:
        self.service = SlowAdminService()
        self.committed: list[str] = []

    def lookup(self, access_key_id: str) -> Credential | None:
        return ROOT if access_key_id == ROOT.access_key_id else None

    def first_use(self, signature: str) -> bool:
        return True

    def audit(self, record: AuditRecord | PreparedRecord) -> None:
        raise AssertionError("the request path commits through commit_audit")

    async def commit_audit(self, record: AuditRecord | PreparedRecord, *, retain: bool) -> None:
        assert isinstance(record, PreparedRecord)
        self.committed.append(json.loads(record.body)["eventName"])

    def check_audit(self) -> None:
        pass

    def warm_up(self) -> None:
        pass

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def run_due_tasks(self) -> object:
        return None

    def close(self) -> None:
        pass


Message = MutableMapping[str, Any]


def _scope(target: str, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    data = json.dumps(body).encode()
    headers = [
        ("Host", "127.0.0.1:8080"),
        ("Content-Type", "application/x-amz-json-1.1"),
        ("X-Amz-Target", f"TrentService.{target}"),
    ]
    signed = sign(
        SignedRequest("POST", "/", "", headers, data), ROOT, region="us-east-1",
        when=datetime.now(UTC),
    )  # fmt: skip
    raw = [(n.lower().encode(), v.encode()) for n, v in signed.headers]
    raw.append((b"content-length", str(len(data)).encode()))
    scope = {
        "type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"",
        "headers": raw, "client": ("127.0.0.1", 40000), "scheme": "http",
    }  # fmt: skip
    return scope, data


async def _request(app: KmsApp, target: str, body: dict[str, Any]) -> tuple[int, bytes]:
    scope, data = _scope(target, body)
    received = asyncio.Event()
    answer: list[Message] = []

    async def receive() -> Message:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: Message) -> None:
        answer.append(message)

    await app(scope, receive, send)
    return int(answer[0]["status"]), bytes(answer[1]["body"])


async def _lifespan(app: KmsApp, kind: str) -> None:
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    await inbox.put({"type": f"lifespan.{kind}"})
    send: Callable[[Message], Awaitable[None]] = outbox.put
    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
    message = await asyncio.wait_for(outbox.get(), DEADLOCK_GUARD)
    assert message["type"] == f"lifespan.{kind}.complete", message
    if kind == "shutdown":
        await task
    else:
        task.cancel()


def test_a_slow_admin_call_does_not_hold_up_an_encrypt_on_the_same_worker() -> None:
    """While PutKeyPolicy is stuck (a slow database write, say), an Encrypt sent after it on
    the same worker is answered — and audited — before PutKeyPolicy finishes."""
    backend = Backend()
    service = backend.service
    app = KmsApp(lambda: backend, task_interval=0)
    key_id = "1234abcd-12ab-34cd-56ef-1234567890ab"

    async def scenario() -> None:
        await _lifespan(app, "startup")
        policy = json.dumps({"Version": "2012-10-17", "Statement": []})
        admin = asyncio.create_task(
            _request(app, "PutKeyPolicy", {"KeyId": key_id, "Policy": policy})
        )
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, service.admin_entered.wait, DEADLOCK_GUARD)
        status, body = await asyncio.wait_for(
            _request(app, "Encrypt", {"KeyId": key_id, "Plaintext": "cGxhaW50ZXh0"}),
            DEADLOCK_GUARD,
        )
        assert status == 200, body
        assert not admin.done()
        assert service.finished == ["Encrypt"]
        assert backend.committed == ["Encrypt"]
        service.release_admin.set()
        status, body = await asyncio.wait_for(admin, DEADLOCK_GUARD)
        assert status == 200, body
        await _lifespan(app, "shutdown")

    asyncio.run(scenario())
    assert service.finished == ["Encrypt", "PutKeyPolicy"]
    assert backend.committed == ["Encrypt", "PutKeyPolicy"]
