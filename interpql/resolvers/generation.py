"""Continuations of a prompt, with ablations and steering; whole, or streamed token by token."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

from interpql.errors import check_range, invalid_argument
from interpql.loaders.generation import Generated, GenerationStep, generate
from interpql.resolvers.context import RequestContext
from interpql.resolvers.inference import ablations, steering
from interpql.resolvers.inputs import GenerateArgs
from interpql.resolvers.models import encode_prompt
from interpql.specs import GenerationSpec

__all__ = [
    "MAX_NEW_TOKENS",
    "Generated",
    "GenerationStep",
    "generation_spec",
    "run_generation",
    "stream_generation",
]

MAX_NEW_TOKENS = 256


def generation_spec(ctx: RequestContext, model_name: str, args: GenerateArgs) -> GenerationSpec:
    entry = ctx.registry.get(model_name)
    entry.require_backend()
    tokens = encode_prompt(ctx, entry, args.prompt)
    room = entry.architecture.n_ctx - len(tokens)
    if room < 1:
        raise invalid_argument(
            f"The prompt's {len(tokens)} tokens fill the model's context of "
            f"{entry.architecture.n_ctx}: there is no room to generate; shorten the prompt."
        )
    check_range("maxTokens", args.max_tokens, 1, min(MAX_NEW_TOKENS, room) + 1)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise invalid_argument("temperature must be a finite number >= 0.")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise invalid_argument("topP must be in (0, 1].")
    check_range("seed", args.seed, 0, 2**63)
    final_length = len(tokens) + args.max_tokens
    steered = steering(
        ctx,
        entry,
        args.steering,
        lambda index: _steered_position(index, len(tokens), final_length),
    )
    return GenerationSpec(
        model=entry.name,
        prompt=args.prompt,
        tokens=tokens,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        ablations=ablations(ctx, entry, args.ablations, len(tokens)),
        steering=steered,
    )


async def run_generation(ctx: RequestContext, spec: GenerationSpec) -> Generated:
    entry = ctx.registry.get(spec.model)
    generated = await ctx.services.model_runner.compute(
        entry, "generation", lambda stop: generate(entry, spec, stop)
    )
    _count_passes(ctx, spec.model, generated)
    return generated


def _count_passes(ctx: RequestContext, model: str, generated: Generated) -> None:
    """Each step was a pass of this request: in its inference figures (log line, metrics)."""
    for seconds, rows in generated.passes:
        ctx.inference.stats.add_pass(seconds, rows, rows)
        for observe in ctx.services.model_runner.pass_observers:
            observe(model, "pass", rows, seconds)


async def stream_generation(
    ctx: RequestContext, spec: GenerationSpec
) -> AsyncIterator[GenerationStep | Generated]:
    """Each step as the worker thread produces it, then the whole result."""
    loop = asyncio.get_running_loop()
    entry = ctx.registry.get(spec.model)
    steps: asyncio.Queue[GenerationStep] = asyncio.Queue()

    def put(step: GenerationStep) -> None:
        loop.call_soon_threadsafe(steps.put_nowait, step)

    work = asyncio.ensure_future(
        ctx.services.model_runner.compute(
            entry, "generation", lambda stop: generate(entry, spec, stop, put)
        )
    )
    try:
        while not work.done() or not steps.empty():
            next_step = asyncio.ensure_future(steps.get())
            await asyncio.wait({next_step, work}, return_when=asyncio.FIRST_COMPLETED)
            if next_step.done():
                yield next_step.result()
            else:
                next_step.cancel()
        generated = work.result()  # the whole result, or the error that stopped it
        _count_passes(ctx, spec.model, generated)
        yield generated
    finally:
        work.cancel()


def _steered_position(index: int, n_prompt: int, final_length: int) -> int:
    """A steering position: from 0 up to the last generated token, or counted back from the
    prompt's end when negative (-1 its last token)."""
    if not -n_prompt <= index < final_length:
        raise invalid_argument(
            f"steering tokenIndices must be in [{-n_prompt}, {final_length}) (negative counts "
            f"back from the prompt's end: -1 is its last token), got {index}."
        )
    return index % n_prompt if index < 0 else index
