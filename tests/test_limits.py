"""Limits and access: the estimated cost of an operation, per-client rate limits, the body size
limit, API keys for every operation, introspection switched off, the inference timeout and
running out of memory. Each refusal is a typed error and the app goes on serving."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import torch

from interpql.backends.base import ForwardRequest, ForwardResult
from interpql.backends.gpt2.backend import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.auth import ApiKeys
from interpql.loaders.rate_limits import RateLimiter
from interpql.loaders.registry import ModelRegistry
from interpql.resolvers.context import Services
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import (
    SMALL,
    CountingBackend,
    error_codes,
    small_registry,
)

KEY = "s3cret-key"
INFER = 'query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) { loss } } }'


@asynccontextmanager
async def app_client(
    registry: ModelRegistry, keys: tuple[str, ...] = (), **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    services = Services(registry, Settings(**settings), api_keys=ApiKeys(keys))
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


async def post(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    key: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    body: dict[str, Any] = response.json()
    return response.status_code, body


# --- the estimated cost -------------------------------------------------------------------------


def tokens(text: str) -> int:
    """The prompt's length in GPT-2 tokens (the small model's tokenizer), as the pass runs it."""
    return len(gpt2_encoding().encode(text))


async def test_cost_counts_fields_items_and_prompt_tokens(registry: ModelRegistry) -> None:
    async with app_client(registry) as client:
        # model 1 + infer 1 + loss 1, and the prompt's tokens.
        _, body = await post(client, INFER, {"p": "abcd" * 10})
        assert body["extensions"]["cost"] == 3 + tokens("abcd" * 10)
        # Text that tokenizes densely is counted as it tokenizes, not by its length: 48 bytes
        # of Chinese are 30 GPT-2 tokens (a bytes / 4 estimate said 13).
        chinese = "注意力机制是变换器的核心部件之一"
        assert len(chinese.encode()) == 48 and tokens(chinese) == 30
        _, body = await post(client, INFER, {"p": chinese})
        assert body["extensions"]["cost"] == 3 + tokens(chinese)
        # A backward pass (ranking by act x grad) costs 3 passes' worth of tokens.
        _, body = await post(
            client,
            '{ model(name: "small") { infer(input: {prompt: "abcdabcd"}) '
            "{ topNodes(group: ACT_TIMES_GRAD, k: 4) { top { value } } } } }",
        )
        # model, infer, topNodes, top (its k = 4 items) x value; the prompt's tokens x3.
        assert body["extensions"]["cost"] == 1 + 1 + 1 + (1 + 4 * 1) + 3 * tokens("abcdabcd")
        # Lists multiply their children by their size argument or list argument.
        ids = [f"small/mlp_neuron/0/{i}" for i in range(5)]
        _, body = await post(
            client,
            "query($ids: [ID!]!) { nodes(ids: $ids) { id scoredTokens(k: 3) { "
            "upvotedOutputTokens { value } } } }",
            {"ids": ids},
        )
        # nodes, 5 x (id, scoredTokens, upvotedOutputTokens (its k = 3 items) x value).
        assert body["extensions"]["cost"] == 1 + 5 * (1 + 1 + (1 + 3 * 1))
        # Each input of a batch counts its own tokens; fragments count where they are spread.
        _, body = await post(
            client,
            'query($inputs: [InferenceInput!]!) { model(name: "small") { '
            "inferBatch(inputs: $inputs) { ...L } } } fragment L on InferenceResult { loss }",
            {"inputs": [{"prompt": "a" * 8}, {"prompt": "b" * 20}]},
        )
        assert body["extensions"]["cost"] == 1 + 1 + tokens("a" * 8) + tokens("b" * 20) + 2


async def test_generation_costs_the_tokens_its_passes_run(
    registry: ModelRegistry, small_backend: CountingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate of a generation is what its passes run: with the native backend's key-value
    cache, the prompt once and then one token a step (counted here at the backend)."""
    run: list[int] = []
    forward_cached = small_backend.forward_cached

    def counted(request: Any, cache: Any) -> Any:
        run.append(sum(len(row) for row in request.tokens))
        return forward_cached(request, cache)

    monkeypatch.setattr(small_backend, "forward_cached", counted)
    prompt, steps = "abcd efgh", 6
    query = (
        f'{{ model(name: "small") {{ generate(input: {{prompt: "{prompt}", maxTokens: {steps}, '
        "temperature: 0}) { unsteered { text } } } }"
    )
    async with app_client(registry) as client:
        _, body = await post(client, query)
    assert "errors" not in body and len(run) == steps
    assert run[0] == tokens(prompt) and set(run[1:]) == {1}
    # model, generate and the tokens its passes ran, unsteered, text.
    assert body["extensions"]["cost"] == 1 + 1 + sum(run) + 1 + 1


async def test_over_the_cost_limit_nothing_runs(
    registry: ModelRegistry, small_backend: CountingBackend
) -> None:
    aliases = " ".join(
        f'a{i}: infer(input: {{prompt: "{"word " * 40}"}}) {{ loss }}' for i in range(20)
    )
    query = f'{{ model(name: "small") {{ {aliases} }} }}'
    async with app_client(registry, max_query_cost=500) as client:
        before = len(small_backend.calls)
        status, body = await post(client, query)
        assert status == 200 and body["data"] is None
        assert error_codes(body) == ["QUERY_TOO_COMPLEX"]
        error = body["errors"][0]["extensions"]
        # 20 prompts of 40 words, model and 20 x (infer, loss).
        assert error["cost"] == 20 * tokens("word " * 40) + 1 + 20 * 2
        assert error["maxCost"] == 500
        assert len(small_backend.calls) == before
        # Long prompts count no more than the longest context window: past it they are
        # refused for their length, not their cost.
        _, body = await post(client, INFER, {"p": "y" * 100_000})
        assert body["extensions"]["cost"] == 3 + SMALL.n_ctx
        assert error_codes(body) == ["PROMPT_TOO_LONG"]


# --- rate limits ---------------------------------------------------------------------------------


def test_rate_limiter_sliding_minute() -> None:
    now = [0.0]
    limiter = RateLimiter(requests_per_minute=3, cost_per_minute=100, clock=lambda: now[0])
    assert [limiter.charge_now("a", 10) for _ in range(3)] == [None, None, None]
    now[0] = 20.0
    assert limiter.charge_now("a", 10) == pytest.approx(40.0)  # the first leaves the window at 60
    assert limiter.charge_now("b", 10) is None  # clients are counted apart
    now[0] = 60.0
    assert limiter.charge_now("a", 10) is None
    # Cost: 80 spent at t=60 plus 30 is over 100; it fits once t=60's request has left.
    assert limiter.charge_now("b", 80) is None
    now[0] = 61.0
    assert limiter.charge_now("b", 30) == pytest.approx(59.0)
    assert limiter.charge_now("c", 101) == 60.0  # more than a minute's budget never fits
    assert not RateLimiter()


async def test_rate_limited_requests_get_429_per_key(registry: ModelRegistry) -> None:
    query = '{ model(name: "small") { nLayers } }'
    async with app_client(registry, keys=(KEY, "other"), rate_limit_requests_per_minute=2) as c:
        assert [(await post(c, query, key=KEY))[0] for _ in range(2)] == [200, 200]
        response = await c.post(
            "/graphql", json={"query": query}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert error_codes(response.json()) == ["RATE_LIMITED"]
        assert response.json()["errors"][0]["extensions"]["retryAfterSeconds"] > 0
        # Another key, and clients without a key (counted by address), have their own minute.
        status, body = await post(c, query, key="other")
        assert status == 200 and body["data"]["model"]["nLayers"] == SMALL.n_layers
        assert (await post(c, query))[0] == 200


# --- the body size limit --------------------------------------------------------------------------


async def test_oversized_bodies_are_refused_with_413(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interpql.requests")
    async with app_client(registry, max_body_bytes=10_000) as client:
        response = await client.post(
            "/graphql", json={"query": INFER, "variables": {"p": "x" * 20_000}}
        )
        assert response.status_code == 413
        assert error_codes(response.json()) == ["REQUEST_TOO_LARGE"]

        # Without a Content-Length (chunked), the body is counted as it arrives.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(30):
                yield b" " * 1000

        response = await client.post(
            "/graphql", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert error_codes(response.json()) == ["REQUEST_TOO_LARGE"]
        status, body = await post(client, INFER, {"p": "still serving"})
        assert status == 200 and body["data"]["model"]["infer"]["loss"] > 0
    # Both refusals are logged as what the client got (the chunked one was logged a 500).
    lines = [r.fields for r in caplog.records if r.name == "interpql.requests"]  # type: ignore[attr-defined]
    assert [(line["status"], line["error_codes"]) for line in lines] == [
        (413, ["HTTP_413"]),
        (413, ["HTTP_413"]),
        (200, []),
    ]


async def test_a_client_gone_before_its_body_is_logged_499_not_a_failure(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = create_app(registry, Settings())
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b'{"que', "more_body": True}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/graphql", "raw_path": b"/graphql",
        "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
    }  # fmt: skip
    await app(scope, receive, send)
    assert sent == []  # no one to answer
    [line] = [r.fields for r in caplog.records if r.name == "interpql.requests"]  # type: ignore[attr-defined]
    assert line["status"] == 499 and line["error_codes"] == ["HTTP_499"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- API keys for every operation, introspection --------------------------------------------------


async def test_require_api_key_for_queries(registry: ModelRegistry) -> None:
    query = '{ model(name: "small") { nLayers } }'
    async with app_client(registry, keys=(KEY,), require_api_key=True) as client:
        status, body = await post(client, query)
        assert status == 401 and error_codes(body) == ["UNAUTHENTICATED"]
        assert body["data"] is None
        status, body = await post(client, query, key="wrong")
        assert status == 401 and error_codes(body) == ["UNAUTHENTICATED"]
        status, body = await post(client, query, key=KEY)
        assert status == 200 and body["data"]["model"]["nLayers"] == SMALL.n_layers


async def test_introspection_can_be_switched_off(registry: ModelRegistry) -> None:
    async with app_client(registry, introspection=False) as client:
        _, body = await post(client, "{ __schema { types { name } } }")
        assert set(error_codes(body)) == {"INTROSPECTION_DISABLED"}
        _, body = await post(client, '{ __type(name: "Model") { name } }')
        assert set(error_codes(body)) == {"INTROSPECTION_DISABLED"}
        # Federation's _service is the schema by another name: refused too (a gateway then
        # composes from schema.graphql).
        _, body = await post(client, "{ _service { sdl } }")
        assert set(error_codes(body)) == {"INTROSPECTION_DISABLED"}
    async with app_client(registry) as client:
        _, body = await post(client, "{ __schema { queryType { name } } }")
        assert body["data"]["__schema"]["queryType"]["name"] == "Query"


# --- inference timeout and out of memory ----------------------------------------------------------


class BlockingBackend(NativeGPT2Backend):
    """Holds every pass until released, counting the passes that ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.passes: list[int] = []

    def forward(self, request: ForwardRequest) -> ForwardResult:
        self.release.wait(timeout=30)
        self.passes.append(len(request.tokens))
        return super().forward(request)


class OutOfMemoryBackend(NativeGPT2Backend):
    """Runs out of (CUDA) memory on any pass of more than two prompts."""

    def forward(self, request: ForwardRequest) -> ForwardResult:
        if len(request.tokens) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(request)


async def test_inference_timeout_and_dropping_what_gave_up() -> None:
    backend = BlockingBackend(random_model(SMALL, seed=1))
    registry = small_registry(backend)
    async with app_client(registry, inference_timeout_s=0.3, coalesce_window_ms=1.0) as client:
        first, second = await asyncio.gather(
            post(client, INFER, {"p": "the first prompt"}),
            post(client, INFER, {"p": "queued behind it"}),
        )
        for status, body in (first, second):
            assert status == 200 and error_codes(body) == ["INFERENCE_TIMEOUT"]
        backend.release.set()
        status, body = await post(client, INFER, {"p": "after the timeout"})
        assert status == 200 and body["data"]["model"]["infer"]["loss"] > 0
        # The pass that had started finished on its thread; the request queued behind it had
        # given up, so it never ran: two passes, not three.
        assert len(backend.passes) == 2
    registry.close()


async def test_out_of_memory_fails_only_the_request_too_large() -> None:
    backend = OutOfMemoryBackend(random_model(SMALL, seed=1))
    registry = small_registry(backend)
    batch = (
        'query($inputs: [InferenceInput!]!) { model(name: "small") '
        "{ inferBatch(inputs: $inputs) { loss } } }"
    )
    async with app_client(registry, coalesce_window_ms=50) as client:
        # Three prompts in one request do not fit; two single prompts gathered with them in
        # one pass are run again on their own and answer.
        big, small_a, small_b = await asyncio.gather(
            post(client, batch, {"inputs": [{"prompt": f"prompt {i}"} for i in range(3)]}),
            post(client, INFER, {"p": "a small one"}),
            post(client, INFER, {"p": "another small one"}),
        )
        assert big[0] == 200 and set(error_codes(big[1])) == {"RESOURCE_EXHAUSTED"}
        assert "Out of memory" in big[1]["errors"][0]["message"]
        for status, body in (small_a, small_b):
            assert status == 200 and "errors" not in body
            assert body["data"]["model"]["infer"]["loss"] > 0
    registry.close()


async def test_several_operations_need_an_operation_name(registry: ModelRegistry) -> None:
    document = "query A { models { name } } query B { models { nLayers } }"
    async with app_client(registry) as client:
        response = await client.post("/graphql", json={"query": document})
        assert response.status_code == 400 and error_codes(response.json()) == ["BAD_REQUEST"]
        response = await client.post("/graphql", json={"query": document, "operationName": "B"})
        assert response.json()["data"]["models"] == [{"nLayers": SMALL.n_layers}]
