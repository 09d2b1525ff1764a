"""The XKS client's connections (hsmkms.service.xks_client), against a small HTTP/1.1 server on
loopback that counts the connections it accepts and answers like a proxy's health route."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from hsmkms.service.xks_client import (
    XksClientSettings,
    XksProxyClient,
    XksProxyLocation,
)

HEALTH = {"xksProxyFleetSize": 1, "ekmFleetDetails": [{"id": "a", "healthStatus": "ACTIVE"}]}


class _Proxy:
    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.close_after_answer = False
        self.status = 200
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def setup(self) -> None:
                super().setup()
                proxy.connections += 1

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                proxy.requests += 1
                data = json.dumps(HEALTH).encode()
                self.send_response(proxy.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if proxy.close_after_answer:
                    # Closed without saying so (no Connection: close): the client learns it
                    # only when it sends the next request on the kept connection.
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    found = _Proxy()
    yield found
    found.server.shutdown()
    found.server.server_close()


def _location(proxy: _Proxy) -> XksProxyLocation:
    return XksProxyLocation(proxy.endpoint, "/p/kms/xks/v1", "A" * 20, "s" * 43)


def test_calls_of_a_thread_share_one_kept_alive_connection(proxy: _Proxy) -> None:
    client = XksProxyClient(XksClientSettings(allow_http=True, timeout=10), region="us-east-1")
    for _ in range(5):
        assert client.call(_location(proxy), "/health", {"requestMetadata": {}}) == HEALTH
    assert proxy.requests == 5
    assert proxy.connections == 1


def test_a_connection_the_proxy_closed_is_replaced_once(proxy: _Proxy) -> None:
    """The proxy closes each connection after its answer without a Connection: close header:
    every next call finds its kept connection dead, and succeeds on a new one."""
    proxy.close_after_answer = True
    client = XksProxyClient(XksClientSettings(allow_http=True, timeout=10), region="us-east-1")
    for _ in range(3):
        assert client.call(_location(proxy), "/health", {"requestMetadata": {}}) == HEALTH
    assert proxy.requests == 3
    assert proxy.connections == 3


def test_threads_do_not_share_connections(proxy: _Proxy) -> None:
    client = XksProxyClient(XksClientSettings(allow_http=True, timeout=10), region="us-east-1")
    results: list[dict[str, Any]] = []

    def work() -> None:
        for _ in range(3):
            results.append(client.call(_location(proxy), "/health", {"requestMetadata": {}}))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [HEALTH] * 9
    assert proxy.connections == 3
