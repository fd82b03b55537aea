"""Slow clients: a request whose headers do not arrive in time is answered 408 and its
connection closed, on a real server; whole requests are untouched."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.processes import serve

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve("--model", "random:tiny", "--no-model", "--header-timeout", str(TIMEOUT_S)) as url:
        yield url


def open_socket(server: str) -> socket.socket:
    port = int(server.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S * 10)


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    return answer, time.monotonic() - started


def test_half_sent_headers_are_answered_408_and_closed(server: str) -> None:
    with open_socket(server) as sock:
        sock.sendall(b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        answer, seconds = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert TIMEOUT_S * 0.8 < seconds < TIMEOUT_S * 4


def test_headers_a_byte_at_a_time_do_not_hold_the_connection(server: str) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
    with open_socket(server) as sock:
        started = time.monotonic()
        for byte in request:  # 0.05 s a byte: 10 s in all, far past the limit
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:  # the server has answered: stop sending
                break
        answer, _ = read_until_closed(sock)
        assert time.monotonic() - started < TIMEOUT_S * 4
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_silent_connection_is_closed(server: str) -> None:
    with open_socket(server) as sock:
        answer, seconds = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and seconds < TIMEOUT_S * 4


def test_kept_alive_connections_and_slow_handlers_still_work(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(TIMEOUT_S * 1.2)  # idle between requests: keep-alive's own timeout
    query = {"query": "{ models { name } }"}
    assert httpx.post(server + "/graphql", json=query).json()["data"]["models"]
