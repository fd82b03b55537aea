"""Concurrent requests share forward passes, and get exactly what they would alone."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from interpql.backends.gpt2.loading import random_model
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.registry import ModelRegistry
from interpql.resolvers.context import Services
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import SMALL, CountingBackend, graphql, small_registry

QUERY = """query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) {
  loss topPredictions(k: 3) { token { id } probability }
  layerActivations(layer: 1, kind: MLP_NEURON) { values } } } }"""
PROMPTS = [f"request number {i} says {'hello ' * (i % 3)}" for i in range(8)]


def app_for(backend: CountingBackend, window_ms: float) -> tuple[Any, ModelRegistry]:
    registry = small_registry(backend)
    settings = Settings(coalesce_window_ms=window_ms, cached_runs=0)
    return create_app(Services(registry, settings)), registry


async def answers(backend: CountingBackend, window_ms: float, concurrent: bool) -> list[Any]:
    app, registry = app_for(backend, window_ms)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        if concurrent:
            bodies = await asyncio.gather(*(graphql(client, QUERY, {"p": p}) for p in PROMPTS))
        else:
            bodies = [await graphql(client, QUERY, {"p": p}) for p in PROMPTS]
    registry.close()
    return bodies


async def test_concurrent_requests_share_passes_and_answer_the_same(
    small_backend: CountingBackend,
) -> None:
    small_backend.calls.clear()
    sequential = await answers(small_backend, 0.0, concurrent=False)
    assert len(small_backend.calls) == len(PROMPTS)
    small_backend.calls.clear()
    coalesced = await answers(small_backend, 50.0, concurrent=True)
    assert len(small_backend.calls) < len(PROMPTS)
    assert max(len(call.tokens) for call in small_backend.calls) > 1
    for alone, together in zip(sequential, coalesced, strict=True):
        a, b = alone["data"]["model"]["infer"], together["data"]["model"]["infer"]
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert [p["token"]["id"] for p in a["topPredictions"]] == [
            p["token"]["id"] for p in b["topPredictions"]
        ]
        for row_a, row_b in zip(
            a["layerActivations"]["values"], b["layerActivations"]["values"], strict=True
        ):
            assert max(abs(x - y) for x, y in zip(row_a, row_b, strict=True)) < 1e-5


async def test_prompts_of_very_different_lengths_are_not_padded_together(
    small_backend: CountingBackend,
) -> None:
    app, registry = app_for(small_backend, 50.0)
    transport = httpx.ASGITransport(app=app)
    small_backend.calls.clear()
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        await asyncio.gather(
            graphql(client, QUERY, {"p": "short"}),
            graphql(client, QUERY, {"p": "tiny"}),
            graphql(client, QUERY, {"p": "a much longer prompt " * 8}),
        )
    registry.close()
    assert sorted(len(call.tokens) for call in small_backend.calls) == [1, 2]


async def test_identical_inputs_are_served_from_the_run_cache(
    small_backend: CountingBackend,
) -> None:
    registry = small_registry(small_backend)
    app = create_app(Services(registry, Settings(coalesce_window_ms=0)))
    small_backend.calls.clear()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        first = await graphql(client, QUERY, {"p": "cached prompt"})
        again = await graphql(client, QUERY, {"p": "cached prompt"})
        ablated = await graphql(
            client,
            'query { model(name: "small") { infer(input: {prompt: "cached prompt", '
            'ablations: [{nodeId: "small/mlp_neuron/0/1"}]}) { loss } } }',
        )
    registry.close()
    assert first == again and "errors" not in ablated
    assert len(small_backend.calls) == 2  # the identical input ran once; the ablated one ran


async def test_a_result_from_the_cache_reports_no_pass_of_its_own(
    small_backend: CountingBackend,
) -> None:
    """An input answered from an earlier request's cached result ran in no pass of this
    request: batchSize 0, fromCache, and its neighbour's batch is its own (this reported the
    earlier request's pass: [1, 4] for a batch of two)."""
    registry = small_registry(small_backend)
    app = create_app(Services(registry, Settings(coalesce_window_ms=0)))
    fields = "loss batchSize fromCache inferenceTimeMs"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        earlier = await graphql(
            client,
            'query { model(name: "small") { inferBatch(inputs: [{prompt: "one"}, {prompt: "two"}, '
            f'{{prompt: "three"}}, {{prompt: "four"}}]) {{ {fields} }} }} }}',
        )
        small_backend.calls.clear()
        now = await graphql(
            client,
            'query { model(name: "small") { inferBatch(inputs: [{prompt: "one"}, '
            f'{{prompt: "five"}}]) {{ {fields} }} }} }}',
        )
    registry.close()
    first, fresh = now["data"]["model"]["inferBatch"]
    assert [r["batchSize"] for r in earlier["data"]["model"]["inferBatch"]] == [4, 4, 4, 4]
    assert (first["batchSize"], first["fromCache"], first["inferenceTimeMs"]) == (0, True, 0.0)
    assert (fresh["batchSize"], fresh["fromCache"]) == (1, False) and fresh["inferenceTimeMs"] > 0
    assert first["loss"] == earlier["data"]["model"]["inferBatch"][0]["loss"]
    assert [len(c.tokens) for c in small_backend.calls] == [1]  # only "five" ran


BATCH = """query($i: [InferenceInput!]!) { model(name: "small") { inferBatch(inputs: $i) {
  loss batchSize layerActivations(layer: 1, kind: MLP_NEURON) { values } } } }"""
EIGHT_TOKENS = [f"prompt {i} is eight tokens long here" for i in range(6)]


async def batch_answers(
    backend: CountingBackend, max_pass_tokens: int, prompts: list[str]
) -> list[Any]:
    registry = small_registry(backend)
    settings = Settings(coalesce_window_ms=0, cached_runs=0, max_pass_tokens=max_pass_tokens)
    app = create_app(Services(registry, settings))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        body = await graphql(client, BATCH, {"i": [{"prompt": p} for p in prompts]})
    registry.close()
    assert "errors" not in body, body
    return body["data"]["model"]["inferBatch"]  # type: ignore[no-any-return]


async def test_a_long_batch_runs_in_parts_that_answer_as_one_pass(
    small_backend: CountingBackend,
) -> None:
    """Under max_pass_tokens 20, six 8-token prompts run as three passes of two rows; every
    row is what one pass of all six gives."""
    assert {len(gpt2_encoding().encode(p)) for p in EIGHT_TOKENS} == {8}
    small_backend.calls.clear()
    whole = await batch_answers(small_backend, 0, EIGHT_TOKENS)
    assert [len(call.tokens) for call in small_backend.calls] == [6]
    small_backend.calls.clear()
    parts = await batch_answers(small_backend, 20, EIGHT_TOKENS)
    assert [len(call.tokens) for call in small_backend.calls] == [2, 2, 2]
    assert [row["batchSize"] for row in parts] == [2] * 6
    for one, part in zip(whole, parts, strict=True):
        assert part["loss"] == pytest.approx(one["loss"], abs=1e-5)
        np.testing.assert_allclose(
            part["layerActivations"]["values"], one["layerActivations"]["values"], atol=1e-5
        )


class SlowBackend(CountingBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()

    def forward(self, request: Any) -> Any:
        self.started.set()
        time.sleep(0.2)
        return super().forward(request)


async def test_another_request_runs_between_the_parts_of_a_long_batch() -> None:
    backend = SlowBackend(random_model(SMALL, seed=1))
    registry = small_registry(backend)
    settings = Settings(coalesce_window_ms=0, cached_runs=0, max_pass_tokens=20)
    app = create_app(Services(registry, settings))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:

        async def small() -> Any:
            while not backend.started.is_set():  # until the long batch's first part runs
                await asyncio.sleep(0.01)
            return await graphql(client, QUERY, {"p": "just this"})

        long, alone = await asyncio.gather(
            graphql(client, BATCH, {"i": [{"prompt": p} for p in EIGHT_TOKENS]}), small()
        )
    registry.close()
    assert "errors" not in long and "errors" not in alone
    rows = [len(call.tokens) for call in backend.calls]
    # The small request's one-row pass ran second: after the first part, before the others.
    assert rows == [2, 1, 2, 2]
