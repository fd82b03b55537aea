"""Only requests addressed to this server's own names are served (HTTP and WebSocket).

A page on another site can resolve its own domain to 127.0.0.1 (DNS rebinding) and then read,
as same-origin, whatever a server on the developer's machine answers. The browser still sends
that domain in the Host header, so refusing unknown hosts (400, code HOST_NOT_ALLOWED) closes
the hole. The allowed names are the bind address and the loopback names by default
(`interpql serve --allowed-host` adds more; `*` allows any).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from interpql.errors import shown
from interpql.settings import LOOPBACK_NAMES

_WILDCARD_BINDS = ("0.0.0.0", "::", "")


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """The names a server bound to `bind_host` answers to by default: the loopback names and
    the bind address; on a wildcard bind, this machine's name and addresses too."""
    names = [*LOOPBACK_NAMES]
    if bind_host in _WILDCARD_BINDS:
        hostname = socket.gethostname()
        names += [hostname, socket.getfqdn()]
        with contextlib.suppress(OSError):
            names += [str(info[4][0]) for info in socket.getaddrinfo(hostname, None)]
    else:
        names.append(bind_host.strip("[]"))
    return tuple(dict.fromkeys(name.lower() for name in names if name))


def host_name(header: str) -> str:
    """The name in a Host header, without its port (IPv6 literals without brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() else header


class AllowedHosts:
    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower().strip("[]") for h in hosts)
        self.allow_any = "*" in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(header) in self.hosts:
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, send, header)

    async def _refuse(self, scope: Scope, send: Send, header: str) -> None:
        message = (
            f"This server does not answer to the host {shown(header, 64)}; start it with "
            f"--allowed-host NAME to serve that name."
        )
        error = {"message": message, "extensions": {"code": "HOST_NOT_ALLOWED"}}
        body = orjson.dumps({"data": None, "errors": [error]})
        prefix = ""
        if scope["type"] == "websocket":
            if "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": 1008})
                return
            # The handshake is refused with an HTTP response (ASGI's denial response).
            prefix = "websocket."
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": f"{prefix}http.response.start", "status": 400, "headers": headers})
        await send({"type": f"{prefix}http.response.body", "body": body})
