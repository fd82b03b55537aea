"""Slow clients: a request whose headers, or whose body, do not arrive in time is answered 408
and its connection closed, on a real server; whole requests and WebSockets are untouched."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import websockets.sync.client

from tests.processes import serve

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    limits = ("--header-timeout", str(TIMEOUT_S), "--body-timeout", str(TIMEOUT_S))
    with serve("--model", "random:tiny", "--no-model", *limits) as url:
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


def test_a_body_that_stops_arriving_is_answered_408_and_closed(server: str) -> None:
    with open_socket(server) as sock:
        sock.sendall(
            b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"query": "{ mod'
        )
        answer, seconds = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in answer
    assert TIMEOUT_S * 0.8 < seconds < TIMEOUT_S * 4


def test_a_websocket_outlives_both_deadlines(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    with websockets.sync.client.connect(
        f"ws://127.0.0.1:{port}/graphql",
        subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
    ) as ws:
        ws.send(orjson.dumps({"type": "connection_init"}).decode())
        assert orjson.loads(ws.recv(timeout=10))["type"] == "connection_ack"
        time.sleep(TIMEOUT_S * 2.5)
        ws.send(orjson.dumps({"id": "1", "type": "subscribe", "payload": QUERY}).decode())
        answer = orjson.loads(ws.recv(timeout=10))
    assert answer["type"] == "next" and answer["payload"]["data"]["models"]


QUERY = {"query": "{ models { name } }"}


def test_kept_alive_connections_and_slow_handlers_still_work(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(TIMEOUT_S * 1.2)  # idle between requests: keep-alive's own timeout
    assert httpx.post(server + "/graphql", json=QUERY).json()["data"]["models"]
