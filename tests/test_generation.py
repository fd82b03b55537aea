"""Generation and steering, against repeated argmax of the plain-torch reference."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
import torch

from interpql.backends.base import Backend
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.generation import generate as run_generation
from interpql.loaders.registry import ModelEntry
from interpql.resolvers.context import RequestContext
from interpql.schema.build import build_schema
from interpql.settings import Settings
from interpql.specs import Ablation, GenerationSpec, NodeRef, Steering
from tests.conftest import SMALL, CountingBackend, error_codes, graphql
from tests.reference import reference_forward

PROMPT = "The meaning of life is"


def state_of(backend: CountingBackend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


def greedy_reference(
    state: dict[str, torch.Tensor], tokens: list[int], n: int, edit: Any = None
) -> list[int]:
    tokens = list(tokens)
    out = []
    for _ in range(n):
        logits, _ = reference_forward(SMALL, state, tokens, edit=edit)
        token = int(logits[-1].argmax())
        out.append(token)
        tokens.append(token)
    return out


async def generate(client: httpx.AsyncClient, input: str) -> dict[str, Any]:
    body = await graphql(
        client,
        f'{{ model(name: "small") {{ generate(input: {input}) {{ prompt '
        "unsteered { text tokens { id } } steered { text tokens { id } } } } }",
    )
    assert "errors" not in body, body
    return body["data"]["model"]["generate"]  # type: ignore[no-any-return]


async def test_greedy_equals_repeated_argmax(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    result = await generate(client, f'{{prompt: "{PROMPT}", maxTokens: 6}}')
    expected = greedy_reference(state_of(small_backend), gpt2_encoding().encode(PROMPT), 6)
    assert [t["id"] for t in result["unsteered"]["tokens"]] == expected
    assert result["unsteered"]["text"] == gpt2_encoding().decode(expected)
    assert result["steered"] is None


async def test_steering_strength_zero_is_no_steering(client: httpx.AsyncClient) -> None:
    result = await generate(
        client,
        f'{{prompt: "{PROMPT}", maxTokens: 5, temperature: 1.0, seed: 3, '
        'steering: [{nodeId: "small/mlp_neuron/1/5", strength: 0.0}]}',
    )
    assert result["steered"] == result["unsteered"]


async def test_steering_adds_the_unit_write_direction(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    strength = 40.0
    result = await generate(
        client,
        f'{{prompt: "{PROMPT}", maxTokens: 4, '
        f'steering: [{{nodeId: "small/mlp_neuron/2/9", strength: {strength}}}]}}',
    )
    w_out = small_backend.model.xf_layers[2].mlp.out_layer.weight[:, 9].double()
    vector = strength * w_out / w_out.norm()

    def steer(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        return act + vector if (layer, name) == (2, "mlp_out") else act

    state = state_of(small_backend)
    tokens = gpt2_encoding().encode(PROMPT)
    assert [t["id"] for t in result["steered"]["tokens"]] == greedy_reference(
        state, tokens, 4, steer
    )
    assert [t["id"] for t in result["unsteered"]["tokens"]] == greedy_reference(state, tokens, 4)
    assert result["steered"] != result["unsteered"]


async def test_sampling_is_seeded(client: httpx.AsyncClient) -> None:
    runs = [
        await generate(
            client,
            f'{{prompt: "{PROMPT}", maxTokens: 8, temperature: 1.5, topP: 0.9, seed: {seed}}}',
        )
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    "input",
    [
        f'{{prompt: "{PROMPT}", maxTokens: 0}}',
        f'{{prompt: "{PROMPT}", maxTokens: 100}}',  # past the 64-token context
        f'{{prompt: "{PROMPT}", temperature: -1}}',
        f'{{prompt: "{PROMPT}", topP: 0}}',
        f'{{prompt: "{PROMPT}", steering: [{{nodeId: "small/mlp_neuron/2/9", strength: 1, tokenIndices: [99]}}]}}',
        # One position named twice (the last, as 1 and as -1 of a two-token prompt).
        '{prompt: "hello there", steering: [{nodeId: "small/mlp_neuron/2/9", strength: 1, tokenIndices: [1, -1]}]}',
    ],
)
async def test_bad_generation_input(client: httpx.AsyncClient, input: str) -> None:
    body = await graphql(
        client, f'{{ model(name: "small") {{ generate(input: {input}) {{ prompt }} }} }}'
    )
    assert error_codes(body) == ["INVALID_ARGUMENT"]


async def test_a_prompt_that_fills_the_context_says_so(client: httpx.AsyncClient) -> None:
    full = " x" * SMALL.n_ctx  # one token each
    body = await graphql(
        client,
        f'{{ model(name: "small") {{ generate(input: {{prompt: "{full}", maxTokens: 1}}) '
        "{ prompt } } }",
    )
    assert error_codes(body) == ["INVALID_ARGUMENT"]
    assert f"fill the model's context of {SMALL.n_ctx}" in body["errors"][0]["message"]


async def test_subscription_streams_tokens_in_order(
    registry: Any, small_backend: CountingBackend
) -> None:
    schema = build_schema()
    context = RequestContext.create(registry, Settings())
    stream = await schema.subscribe(
        'subscription { generate(model: "small", input: {prompt: "Hello there", maxTokens: 5, '
        'steering: [{nodeId: "small/attention_head/1/1", strength: 3}]}) { step '
        "unsteeredToken { id } steeredToken { id } unsteeredProbability steeredProbability "
        "result { unsteered { tokens { id } } "
        "steered { tokens { id } tokenProbabilities } } } }",
        context_value=context,
    )
    events = [event.data["generate"] async for event in stream]  # type: ignore[union-attr]
    steps = events[:-1]
    assert [e["step"] for e in steps] == [0, 1, 2, 3, 4]
    final = events[-1]["result"]
    assert [e["unsteeredToken"]["id"] for e in steps] == [
        t["id"] for t in final["unsteered"]["tokens"]
    ]
    assert [e["steeredToken"]["id"] for e in steps] == [t["id"] for t in final["steered"]["tokens"]]
    # Each step's probability of its token: the unsteered from the reference's softmax, the
    # steered as the result states it.
    tokens = gpt2_encoding().encode("Hello there")
    state = state_of(small_backend)
    for event in steps:
        logits, _ = reference_forward(SMALL, state, tokens)
        expected = float(logits[-1].softmax(-1)[event["unsteeredToken"]["id"]])
        assert event["unsteeredProbability"] == pytest.approx(expected, rel=1e-4)
        tokens.append(event["unsteeredToken"]["id"])
    assert [e["steeredProbability"] for e in steps] == final["steered"]["tokenProbabilities"]


def generated_both_ways(backend: Backend, spec: GenerationSpec) -> tuple[Any, Any]:
    """The same generation with the backend's key-value cache, and rerunning every step."""
    entry = ModelEntry(spec.model, backend.architecture, backend, backend.name, "cpu", "float32")
    cached = run_generation(entry, spec, threading.Event())
    backend.caches_keys_and_values = False  # this instance only
    try:
        rerun = run_generation(entry, spec, threading.Event())
    finally:
        del backend.caches_keys_and_values
    return cached, rerun


def edited_spec(model: str, tokens: list[int], max_tokens: int) -> GenerationSpec:
    """Greedy, with an ablation inside the prompt, steering everywhere and steering at one
    position the continuation reaches only later."""
    return GenerationSpec(
        model=model,
        prompt="",
        tokens=tuple(tokens),
        max_tokens=max_tokens,
        ablations=(Ablation(node=NodeRef(model, "mlp_neuron", 0, 7), value=0.0, position=2),),
        steering=(
            Steering(node=NodeRef(model, "mlp_neuron", 1, 5), strength=3.0),
            Steering(
                node=NodeRef(model, "mlp_neuron", 2, 9),
                strength=25.0,
                positions=(len(tokens) + 3,),
            ),
        ),
    )


def test_cached_generation_equals_rerunning_every_step(small_backend: CountingBackend) -> None:
    tokens = gpt2_encoding().encode(PROMPT)
    spec = edited_spec("small", tokens, 24)
    cached, rerun = generated_both_ways(small_backend, spec)
    assert cached.unsteered == rerun.unsteered and cached.steered == rerun.steered
    assert len(cached.unsteered) == 24 and cached.steered != cached.unsteered
    # The one-position steering acted once it was reached: against the reference, stepwise.
    w_out = small_backend.model.xf_layers[2].mlp.out_layer.weight[:, 9].double()
    w_mid = small_backend.model.xf_layers[1].mlp.out_layer.weight[:, 5].double()
    late, everywhere = 25.0 * w_out / w_out.norm(), 3.0 * w_mid / w_mid.norm()
    position = len(tokens) + 3

    def edit(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if (layer, name) == (0, "mlp_post"):
            act = act.clone()
            act[2, 7] = 0.0
        if (layer, name) == (1, "mlp_out"):
            act = act + everywhere
        if (layer, name) == (2, "mlp_out") and act.shape[0] > position:
            act = act.clone()
            act[position] += late
        return act

    assert cached.steered == greedy_reference(state_of(small_backend), tokens, 24, edit)
    # One pass a step: the prompt, then a token per row.
    assert [rows for _, rows in cached.passes] == [2] * 24
