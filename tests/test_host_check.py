"""Requests addressed to names the server does not answer to (DNS rebinding) are refused, over
HTTP and WebSocket, on a real server."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import websockets.exceptions
import websockets.sync.client

from interpql.host_check import default_allowed_hosts, host_name
from tests.processes import serve

QUERY = {"query": "{ models { name } }"}


def test_host_names_are_read_without_their_port() -> None:
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("evil.example:80") == "evil.example"
    assert host_name("") == ""


def test_default_names_are_the_bind_address_and_loopback() -> None:
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert default_allowed_hosts("10.1.2.3")[-1] == "10.1.2.3"
    assert "evil.example" not in default_allowed_hosts("0.0.0.0")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve("--model", "random:tiny", "--allowed-host", "interp.example") as url:
        yield url


def test_other_hosts_get_400_over_http(server: str) -> None:
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        response = httpx.post(server + "/graphql", json=QUERY, headers={"Host": host})
        assert response.status_code == 400, host
        [error] = response.json()["errors"]
        assert error["extensions"]["code"] == "HOST_NOT_ALLOWED"
        assert "--allowed-host" in error["message"]
    for path in ("/healthz", "/viewer", "/graphql"):
        assert httpx.get(server + path, headers={"Host": "evil.example"}).status_code == 400
    for host in ("localhost", "127.0.0.1:1234", "interp.example"):
        response = httpx.post(server + "/graphql", json=QUERY, headers={"Host": host})
        assert response.status_code == 200, host
        assert response.json()["data"]["models"] == [{"name": "random-tiny"}]


def connect_as(server: str, host: str) -> websockets.sync.client.ClientConnection:
    """A WebSocket to the server whose handshake names `host` (as a rebound DNS name would)."""
    port = int(server.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return websockets.sync.client.connect(
        f"ws://{host}:{port}/graphql",
        sock=sock,
        subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
    )


def test_other_hosts_get_400_on_the_websocket_handshake(server: str) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        connect_as(server, "evil.example")
    assert refused.value.response.status_code == 400
    assert b"HOST_NOT_ALLOWED" in refused.value.response.body
    with connect_as(server, "interp.example") as ws:
        ws.send('{"type": "connection_init"}')
        assert "connection_ack" in str(ws.recv(timeout=10))
