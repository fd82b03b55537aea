"""uvicorn's HTTP protocol with bounds on how long a request's headers, then its body, may take
to arrive.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and
sends nothing, sends headers a byte at a time, or declares a body and then stops sending it:
each such connection is held until the client goes (slowloris). Here every request's headers
must be complete within `header_timeout_s` of the connection opening (or of the request's first
byte on a kept-alive connection), and its body within `body_timeout_s` of its headers;
otherwise the server answers 408 and closes (the app, waiting on the body, sees the client
disconnect). Responses are not limited here (the inference timeout covers the work behind
them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from interpql.settings import Settings


def _timeout_response(what: str, seconds: float) -> bytes:
    body = f"The request's {what} did not arrive within {seconds:g} s.".encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(
        self,
        *args: Any,
        header_timeout_s: float = Settings().header_timeout_s,
        body_timeout_s: float = Settings().body_timeout_s,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_headers_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a kept-alive connection's next request
            self._start_headers_deadline()

    def on_headers_complete(self) -> None:
        self._stop_deadline()
        super().on_headers_complete()
        # An upgrade hands this transport to a WebSocket: no deadline of ours may outlive that.
        if not self.parser.should_upgrade():
            self._start_deadline(
                self.body_timeout_s, lambda: self._late("body", self.body_timeout_s)
            )

    def on_message_complete(self) -> None:
        self._stop_deadline()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_headers_deadline(self) -> None:
        self._start_deadline(
            self.header_timeout_s, lambda: self._late("headers", self.header_timeout_s)
        )

    def _start_deadline(self, seconds: float, late: Callable[[], None]) -> None:
        if seconds > 0:
            self._deadline = self.loop.call_later(seconds, late)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self, what: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # An app that answered before reading the whole body has had its say: no 408 after it.
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_timeout_response(what, seconds))
        self.transport.close()
