"""uvicorn's HTTP protocol with a bound on how long a request's headers may take to arrive.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and
sends nothing, or sends headers a byte at a time: each such connection is held until the client
goes (slowloris). Here every request's headers must be complete within `header_timeout_s` of
the connection opening (or of the request's first byte on a kept-alive connection); otherwise
the server answers 408 and closes. Bodies and responses are not limited here (the body limit and
the inference timeout cover them).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from interpql.settings import Settings


def _timeout_response(seconds: float) -> bytes:
    body = f"The request's headers did not arrive within {seconds:g} s.".encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(
        self, *args: Any, header_timeout_s: float = Settings().header_timeout_s, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a kept-alive connection's next request
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        if self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout_s))
            self.transport.close()
