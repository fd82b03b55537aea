"""Sampling continuations with ablations and steering, and the subscription that streams them."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from interpql.resolvers import generation as generation_resolvers
from interpql.resolvers.generation import Generated, GenerationStep
from interpql.schema.attribution_graph import AttributionGraphEvent, graph_events
from interpql.schema.inputs import AttributionGraphInput, GenerateInput
from interpql.schema.jobs import JobEvent, job_updates
from interpql.schema.types import Info, Token


@strawberry.type(description="Generated text.")
class Continuation:
    text: str = strawberry.field(description="The generated text.")
    tokens: list[Token] = strawberry.field(description="The generated tokens.")
    token_probabilities: list[float] = strawberry.field(
        description="Per generated token, the probability the model gave it at the step it "
        "was chosen (softmax of that step's logits, with this continuation's ablations and "
        "steering, at temperature 1 whatever the sampling temperature)."
    )


@strawberry.type(description="A prompt's continuations, without and with steering.")
class GenerationResult:
    prompt: str = strawberry.field(description="The prompt.")
    unsteered: Continuation = strawberry.field(description="Without steering.")
    steered: Continuation | None = strawberry.field(
        description="With steering; null when no steering was asked for."
    )


@strawberry.type(description="One step of a streamed generation, or its end.")
class GenerationEvent:
    step: int = strawberry.field(description="Step number, from 0; the last event repeats it.")
    unsteered_token: Token | None = strawberry.field(description="The unsteered token.")
    steered_token: Token | None = strawberry.field(description="The steered token.")
    unsteered_probability: float | None = strawberry.field(
        description="The model's probability of the unsteered token (as in "
        "Continuation.tokenProbabilities)."
    )
    steered_probability: float | None = strawberry.field(
        description="The model's probability of the steered token, with the steering."
    )
    result: GenerationResult | None = strawberry.field(
        description="The whole result, on the last event only."
    )


def _continuation(
    info: Info, model: str, ids: list[int], probabilities: list[float]
) -> Continuation:
    tokens = [Token.at(info.context, model, i, t) for i, t in enumerate(ids)]
    return Continuation(
        text="".join(t.text for t in tokens), tokens=tokens, token_probabilities=probabilities
    )


def _result(info: Info, model: str, prompt: str, generated: Generated) -> GenerationResult:
    return GenerationResult(
        prompt=prompt,
        unsteered=_continuation(
            info, model, generated.unsteered, generated.unsteered_probabilities
        ),
        steered=None
        if generated.steered is None
        else _continuation(info, model, generated.steered, generated.steered_probabilities or []),
    )


async def generate(info: Info, model: str, input: GenerateInput) -> GenerationResult:
    spec = generation_resolvers.generation_spec(info.context, model, input)
    generated = await generation_resolvers.run_generation(info.context, spec)
    return _result(info, model, input.prompt, generated)


@strawberry.type(description="Streams: generation token by token, and jobs' progress.")
class Subscription:
    @strawberry.subscription(
        description="A job's events: those already past first, then each as it happens, "
        "until it succeeds or fails."
    )
    async def job_updates(self, info: Info, id: strawberry.ID) -> AsyncGenerator[JobEvent, None]:
        async for event in job_updates(info, id):
            yield event

    @strawberry.subscription(
        description="Compute Model.attributionGraph with its progress: an event per batch of "
        "targets whose edges are done, then one with the graph."
    )
    async def attribution_graph(
        self, info: Info, model: str, input: AttributionGraphInput
    ) -> AsyncGenerator[AttributionGraphEvent, None]:
        async for event in graph_events(info, model, input):
            yield event

    @strawberry.subscription(
        description="Generate as in Model.generate, one event per step, then the result."
    )
    async def generate(
        self, info: Info, model: str, input: GenerateInput
    ) -> AsyncGenerator[GenerationEvent, None]:
        spec = generation_resolvers.generation_spec(info.context, model, input)
        model = spec.model
        last_step = 0
        async for event in generation_resolvers.stream_generation(info.context, spec):
            if isinstance(event, GenerationStep):
                last_step = event.step

                def token(t: int | None, step: int = event.step) -> Token | None:
                    if t is None:
                        return None
                    return Token.at(info.context, model, step, t)

                yield GenerationEvent(
                    step=event.step,
                    unsteered_token=token(event.unsteered),
                    steered_token=token(event.steered),
                    unsteered_probability=event.unsteered_probability,
                    steered_probability=event.steered_probability,
                    result=None,
                )
            else:
                yield GenerationEvent(
                    step=last_step,
                    unsteered_token=None,
                    steered_token=None,
                    unsteered_probability=None,
                    steered_probability=None,
                    result=_result(info, model, input.prompt, event),
                )
