"""The worked example of backends/base.py (tests/toy_backend.py) is a full backend: served
through GraphQL, it passes the same analyses as the native one, against the same independent
float64 reference (tests/test_analysis.py's checks run here again, on the toy)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import torch

from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.backends.gpt2.loading import random_model
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import MODEL_NAME, SMALL
from tests.reference import reference_forward
from tests.test_analysis import (  # noqa: F401 (collected again, on the toy's fixtures)
    TOKENS,
    test_ablation_matches_reference,
    test_act_times_grad_estimates_real_ablations,
    test_act_times_grad_matches_autograd,
    test_attention_traces,
    test_backward_only_when_needed,
    test_batched_equals_separate,
    test_direct_effect_and_write_norm_by_hand,
    test_hide_early_layers_when_ablating,
    test_objective_is_the_logit_difference,
    test_scored_tokens_are_matrix_products,
    test_token_pair_attribution_by_hand,
    test_trace_from_a_neuron_matches_autograd,
)
from tests.toy_backend import ToyBackend


class CountingToy(ToyBackend):
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)


@pytest.fixture(scope="module")
def small_backend() -> CountingToy:
    state = {k: v.detach() for k, v in random_model(SMALL, seed=1).state_dict().items()}
    return CountingToy(SMALL.architecture, state)


@pytest.fixture(scope="module")
def registry(small_backend: CountingToy) -> Iterator[ModelRegistry]:
    registry = ModelRegistry()
    entry = ModelEntry(
        MODEL_NAME, SMALL.architecture, small_backend, small_backend.name, "cpu", "float32"
    )
    registry.add(entry)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
async def client(registry: ModelRegistry) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(registry, Settings(cached_runs=0)))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


def test_every_location_matches_the_reference(small_backend: CountingToy) -> None:
    """Its hook points hold what the equations say, checked where the reference can edit."""
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        seen[(layer, name)] = act.detach()
        return act

    logits, mlp_posts = reference_forward(SMALL, small_backend.state, TOKENS, edit=keep)
    points = {
        HookPoint(layer, location)
        for layer in range(SMALL.n_layers)
        for location in (Location.ATTN_OUT, Location.MLP_POST, Location.MLP_OUT)
    }
    result = small_backend.forward(ForwardRequest(tokens=(tuple(TOKENS),), save=frozenset(points)))
    torch.testing.assert_close(result.logits[0].double(), logits, atol=1e-4, rtol=1e-4)
    for layer in range(SMALL.n_layers):
        for location, name in ((Location.ATTN_OUT, "attn_out"), (Location.MLP_OUT, "mlp_out")):
            got = result.activations[HookPoint(layer, location)][0].double()
            torch.testing.assert_close(got, seen[(layer, name)], atol=1e-5, rtol=1e-4)
        got = result.activations[HookPoint(layer, Location.MLP_POST)][0].double()
        torch.testing.assert_close(got, mlp_posts[layer], atol=1e-5, rtol=1e-4)
