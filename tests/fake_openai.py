"""Our own stand-in for an OpenAI-compatible server: a real HTTP server on a loopback port that
speaks the chat-completions (and legacy completions) protocol, answering from a script.

Each request is recorded; its answer comes from the next scripted step for that endpoint, or
from the default responder when the script is empty. A step is a function of the request body
returning (status, body, delay): seconds, or a threading.Event the answer waits for.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Step = Callable[[dict[str, Any]], tuple[int, dict[str, Any], float | threading.Event]]


def chat_answer(*contents: str, tokens: int = 20) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
            for i, content in enumerate(contents)
        ],
        "usage": {"prompt_tokens": tokens - 5, "completion_tokens": 5, "total_tokens": tokens},
    }


def reply(*contents: str) -> Step:
    return lambda body: (200, chat_answer(*contents), 0.0)


def status(code: int) -> Step:
    return lambda body: (code, {"error": {"message": f"scripted {code}", "type": "test"}}, 0.0)


def slow(seconds: float) -> Step:
    return lambda body: (200, chat_answer("too late"), seconds)


class FakeOpenAI:
    def __init__(self, default_chat: Step | None = None) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.script: dict[str, deque[Step]] = {"chat": deque(), "completions": deque()}
        self.default: dict[str, Step | None] = {"chat": default_chat, "completions": None}
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
            ]
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "fake OpenAI server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def then(self, endpoint: str, *steps: Step) -> None:
        self.script[endpoint].extend(steps)

    def calls(self, endpoint: str) -> list[dict[str, Any]]:
        return [body for name, body in self.requests if name == endpoint]

    async def _answer(self, endpoint: str, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        self.requests.append((endpoint, body))
        step = self.script[endpoint].popleft() if self.script[endpoint] else self.default[endpoint]
        assert step is not None, f"nothing scripted for {endpoint}"
        code, payload, delay = step(body)
        if isinstance(delay, threading.Event):
            await asyncio.to_thread(delay.wait, 60)
        elif delay:
            await asyncio.sleep(delay)
        return JSONResponse(payload, status_code=code, headers={"retry-after-ms": "10"})

    async def _chat(self, request: Request) -> JSONResponse:
        return await self._answer("chat", request)

    async def _completions(self, request: Request) -> JSONResponse:
        return await self._answer("completions", request)
