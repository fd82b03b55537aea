"""Continuations of a prompt, with ablations and steering; whole, or streamed token by token."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from interpql.errors import check_range, invalid_argument
from interpql.loaders.generation import (
    Generated,
    GenerationSpec,
    GenerationStep,
    Steering,
    generate,
)
from interpql.loaders.registry import ModelEntry
from interpql.resolvers.context import RequestContext
from interpql.resolvers.inference import MAX_INTERVENTION_MAGNITUDE, AblationRequest, prepare

MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class SteeringRequest:
    node_id: str
    strength: float
    tokens: list[int] | None


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    ablations: list[AblationRequest]
    steering: list[SteeringRequest]


def prepare_generation(
    ctx: RequestContext, entry: ModelEntry, request: GenerationRequest
) -> GenerationSpec:
    prompt = prepare(ctx, entry, request.prompt, request.ablations)
    room = entry.architecture.n_ctx - len(prompt.tokens)
    check_range("maxTokens", request.max_tokens, 1, min(MAX_NEW_TOKENS, room) + 1)
    if not (math.isfinite(request.temperature) and request.temperature >= 0):
        raise invalid_argument("temperature must be a finite number >= 0.")
    if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        raise invalid_argument("topP must be in (0, 1].")
    check_range("seed", request.seed, 0, 2**63)
    steering = []
    for steer in request.steering:
        # prepare() already checks ablation nodes; steering nodes get the same treatment.
        node = prepare(ctx, entry, request.prompt, [AblationRequest(steer.node_id, 0.0, None)])
        if not abs(steer.strength) <= MAX_INTERVENTION_MAGNITUDE:  # nan too
            raise invalid_argument(
                f"Steering strength must be a number within ±{MAX_INTERVENTION_MAGNITUDE:g}, "
                f"got {steer.strength}."
            )
        final_length = len(prompt.tokens) + request.max_tokens
        for token in steer.tokens or []:
            check_range("steering tokenIndices", token, 0, final_length)
        tokens = None if steer.tokens is None else tuple(steer.tokens)
        steering.append(Steering(node.variant.ablations[0].node, steer.strength, tokens))
    return GenerationSpec(
        tokens=prompt.tokens,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        ablations=prompt.variant.ablations,
        steering=tuple(steering),
    )


async def run_generation(entry: ModelEntry, spec: GenerationSpec) -> Generated:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(entry.executor, generate, entry, spec, None)


async def stream_generation(
    entry: ModelEntry, spec: GenerationSpec
) -> AsyncIterator[GenerationStep | Generated]:
    """Each step as the worker thread produces it, then the whole result."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerationStep | Generated | Exception] = asyncio.Queue()

    def put(event: GenerationStep | Generated | Exception) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def work() -> None:
        try:
            put(generate(entry, spec, put))
        except Exception as exc:  # handed to the subscriber, who reports it
            put(exc)

    loop.run_in_executor(entry.executor, work)
    while True:
        event = await events.get()
        if isinstance(event, Exception):
            raise event
        yield event
        if isinstance(event, Generated):
            return
