"""Shared fixtures: small random GPT-2 models, their registry, and clients of the app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.backends.gpt2 import GPT2Config, NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.bootstrap import ServeOptions, build_services
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.server import create_app
from interpql.settings import Settings

# Deliberately uneven widths, so that transposed or mixed-up axes cannot go unnoticed.
SMALL = GPT2Config(n_layers=3, d_model=48, n_heads=3, d_head=16, d_mlp=80, n_ctx=64)
MODEL_NAME = "small"


class CountingBackend(NativeGPT2Backend):
    """The native backend, counting forward passes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[Any] = []

    def forward(self, request: Any) -> Any:
        self.calls.append(request)
        return super().forward(request)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())


@pytest.fixture(scope="session")
def small_backend() -> CountingBackend:
    return CountingBackend(random_model(SMALL, seed=1))


def small_entry(backend: NativeGPT2Backend) -> ModelEntry:
    """A SMALL backend served as "small" on the CPU, as the in-process tests serve it."""
    return ModelEntry(MODEL_NAME, SMALL.architecture, backend, backend.name, "cpu", "float32")


def small_registry(backend: NativeGPT2Backend) -> ModelRegistry:
    registry = ModelRegistry()
    registry.add(small_entry(backend))
    return registry


@pytest.fixture(scope="session")
def registry(small_backend: CountingBackend) -> Iterator[ModelRegistry]:
    registry = small_registry(small_backend)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
async def demo() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the server `make serve` runs: the embedded demo, with its data."""
    services = build_services(ServeOptions(explanation_store=":memory:"))
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client
    services.registry.close()


@pytest.fixture(scope="session")
async def client(registry: ModelRegistry) -> AsyncIterator[httpx.AsyncClient]:
    # No run cache: tests count forward passes.
    transport = httpx.ASGITransport(app=create_app(registry, Settings(cached_runs=0)))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


RECORDS_SEQ_LEN = 24


@pytest.fixture(scope="session")
def records_dir(tmp_path_factory: pytest.TempPathFactory, small_backend: CountingBackend) -> Path:
    """A compact store (records and baseline explanations) of the small model's MLP neurons,
    computed on random tokens."""
    from interpql.demo.explanations import explain_and_score_all
    from interpql.demo.records import compute_records

    generator = np.random.default_rng(0)
    tokens = generator.integers(0, 2000, size=40 * RECORDS_SEQ_LEN).astype(np.uint16)
    points = frozenset(HookPoint(layer, Location.MLP_POST) for layer in range(SMALL.n_layers))

    def activations(batch: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        result = small_backend.forward(
            ForwardRequest(tokens=tuple(tuple(row) for row in batch.tolist()), save=points)
        )
        return {("mlp_neuron", p.layer): result.activations[p] for p in points}

    store = compute_records(
        tokens, activations, seq_len=RECORDS_SEQ_LEN, window=8, top_k=5, n_random=3, batch_size=8
    )
    folder = tmp_path_factory.mktemp("store")
    store.save(folder / "records")
    explain_and_score_all(store, str).save(folder / "explanations")
    return folder


async def graphql(
    client: httpx.AsyncClient, query: str, variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await client.post("/graphql", json={"query": query, "variables": variables or {}})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def serve_entries(*entries: ModelEntry, query: str) -> dict[str, Any]:
    """One query to an app of its own serving these entries (then closed)."""
    registry = ModelRegistry()
    for entry in entries:
        registry.add(entry)
    try:
        transport = httpx.ASGITransport(app=create_app(registry))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await graphql(client, query)
    finally:
        registry.close()


def error_codes(body: dict[str, Any]) -> list[str]:
    return [error["extensions"]["code"] for error in body.get("errors", [])]
