"""A limit on the bytes of one HTTP request body, before anything parses it.

A declared Content-Length over the limit is refused at the app's first read, before a byte is
received; a body sent in chunks (or with a wrong length) is counted as it arrives and refused
when it passes the limit, before the app has answered. Either way the app's read raises
RequestBodyRefused, so the request log records a 413, not a failure. The refusal is a
GraphQL-shaped JSON error (413, code REQUEST_TOO_LARGE), so clients handle it like any other
error. WebSocket messages are limited by uvicorn's ws_max_size.
"""

from __future__ import annotations

import contextlib

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from interpql.errors import RequestBodyRefused


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        declared_too_large = (
            declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        )
        received = 0
        started = too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            if declared_too_large:
                too_large = True
                raise RequestBodyRefused(413)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise RequestBodyRefused(413)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # what the app answers to the interrupted read (a 500) is replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(RequestBodyRefused):
            await self.app(scope, counting_receive, tracking_send)
        if too_large and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps(
            {
                "data": None,
                "errors": [
                    {
                        "message": f"The request body is over the limit of {self.max_bytes} bytes.",
                        "extensions": {"code": "REQUEST_TOO_LARGE", "maxBytes": self.max_bytes},
                    }
                ],
            }
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
