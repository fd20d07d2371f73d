"""The control-plane client over a real socket whose first connection is dropped mid-request (a reset, as a busy
server or a closed keep-alive connection gives): reads and keyed writes are sent again and succeed; a write
without a key is not (it may have been applied); a refused connection fails at once, naming the service."""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from peftray.errors import PeftrayError
from peftray.service.client import ServiceClient


class _ResetOnce:
    """A loopback HTTP server: the first `resets` connections are read, then reset (RST); later ones get 200."""

    def __init__(self, resets: int = 1):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.resets, self.requests = resets, []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                self.requests.append(data.split(b"\r\n", 1)[0].decode())
                if self.resets > 0:
                    self.resets -= 1
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    continue  # closing with linger 0 sends a reset
                body = json.dumps({"ok": True}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    srv = _ResetOnce()
    yield srv
    srv.close()


def test_a_read_is_sent_again_after_a_reset(server):
    with ServiceClient(f"http://127.0.0.1:{server.port}", "t", timeout=10) as client:
        assert client.request("GET", "/v1/jobs") == {"ok": True}
    assert server.requests == ["GET /v1/jobs HTTP/1.1"] * 2


def test_a_keyed_write_is_sent_again_an_unkeyed_one_is_not(server):
    with ServiceClient(f"http://127.0.0.1:{server.port}", "t", timeout=10) as client:
        with pytest.raises(PeftrayError, match="cannot reach the control plane"):
            client.request("POST", "/v1/jobs", json={"a": 1})
        assert server.requests == ["POST /v1/jobs HTTP/1.1"]
        server.resets = 1
        got = client.request("POST", "/v1/jobs", json={"a": 1}, headers={"Idempotency-Key": "k1"})
    assert got == {"ok": True}
    assert server.requests == ["POST /v1/jobs HTTP/1.1"] * 3


def test_a_refused_connection_fails_at_once(monkeypatch):
    from peftray.service import client as client_module

    waits = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on the port now
    with ServiceClient(f"http://127.0.0.1:{port}", "t", timeout=10) as client:
        with pytest.raises(PeftrayError, match=f"127.0.0.1:{port}"):
            client.request("GET", "/v1/jobs")
    assert waits == []  # not retried: nothing is listening
