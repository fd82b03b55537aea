"""Sampling continuations, with ablations and steering, on the model's worker thread.

The unsteered and the steered continuation are two rows of one batch, sampled with generators
seeded alike, so that steering with strength 0 reproduces the unsteered text exactly. Where the
backend keeps a key-value cache, the first step runs the prompt and every later step the one
new token of each row (ablations and steering apply at every step, at the positions they name);
elsewhere every step reruns the whole sequence. Each step is one pass, counted in the request's
inference figures.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from interpql.backends.base import Addition, ForwardRequest, LogitPositions
from interpql.backends.tokenizer import END_OF_TEXT_ID
from interpql.loaders.registry import ModelEntry
from interpql.loaders.steering import steering_additions
from interpql.specs import GenerationSpec


@dataclass(frozen=True)
class GenerationStep:
    step: int
    unsteered: int | None  # None once that row has ended
    steered: int | None
    # The model's probability of each chosen token (softmax of the logits, temperature 1).
    unsteered_probability: float | None = None
    steered_probability: float | None = None


@dataclass(frozen=True)
class Generated:
    unsteered: list[int]
    steered: list[int] | None
    # Per generated token, the model's probability of it where it was chosen (temperature 1).
    unsteered_probabilities: list[float] = field(default_factory=list)
    steered_probabilities: list[float] | None = None
    # Each step's pass: its time on the model and its rows (the request's inference figures).
    passes: list[tuple[float, int]] = field(default_factory=list)


def generate(
    entry: ModelEntry,
    spec: GenerationSpec,
    stop: threading.Event,
    on_step: Callable[[GenerationStep], None] | None = None,
) -> Generated:
    """Runs on the model's worker (through the runner's `compute`); stops between steps once
    `stop` is set."""
    backend = entry.require_backend()
    rows = 2 if spec.steering else 1
    sequences = [list(spec.tokens) for _ in range(rows)]
    done = [False] * rows
    generators = [torch.Generator().manual_seed(spec.seed) for _ in range(rows)]
    interventions = tuple(
        entry.kind(a.node.kind).ablation(a.node.layer, a.node.index, a.value, a.position, row)
        for row in range(rows)
        for a in spec.ablations
    )
    additions = tuple(steering_additions(entry, spec.steering, row=1))
    cached = backend.caches_keys_and_values
    cache: object | None = None
    new = [list(spec.tokens) for _ in range(rows)]  # what the next pass runs, per row
    passes: list[tuple[float, int]] = []
    probabilities: list[list[float]] = [[] for _ in range(rows)]
    for step in range(spec.max_tokens):
        if stop.is_set():  # nobody waits for the rest
            break
        request = ForwardRequest(
            tokens=tuple(tuple(t) for t in (new if cached else sequences)),
            interventions=interventions,
            # Steering may name positions the continuation has not reached yet.
            additions=additions if cached else _reached(additions, sequences),
            logits=LogitPositions.LAST,
        )
        if cached:
            result, cache = backend.forward_cached(request, cache)
        else:
            result = backend.forward(request)
        passes.append((result.elapsed_s, rows))
        chosen: list[int | None] = []
        chosen_probabilities: list[float | None] = []
        for row in range(rows):
            if done[row]:
                chosen.append(None)
                chosen_probabilities.append(None)
                continue
            logits = result.last_logits(row)
            token = _sample(logits, spec.temperature, spec.top_p, generators[row])
            sequences[row].append(token)
            probability = float(torch.softmax(logits.double(), dim=-1)[token])
            probabilities[row].append(probability)
            chosen_probabilities.append(probability)
            done[row] = token == END_OF_TEXT_ID
            chosen.append(token)
        # A row that has ended is fed on (its output unread), so that the rows stay as long
        # as each other in the cache.
        new = [[END_OF_TEXT_ID if token is None else token] for token in chosen]
        if on_step is not None:
            steered = rows == 2
            on_step(
                GenerationStep(
                    step,
                    chosen[0],
                    chosen[1] if steered else None,
                    chosen_probabilities[0],
                    chosen_probabilities[1] if steered else None,
                )
            )
        if all(done):
            break
    prompt_length = len(spec.tokens)
    continuations = [s[prompt_length:] for s in sequences]
    return Generated(
        continuations[0],
        continuations[1] if rows == 2 else None,
        probabilities[0],
        probabilities[1] if rows == 2 else None,
        passes,
    )


def _reached(additions: tuple[Addition, ...], sequences: list[list[int]]) -> tuple[Addition, ...]:
    """The additions at positions each one's row already has."""
    return tuple(
        add
        for add in additions
        if add.position is None or add.position < len(sequences[add.row or 0])
    )


def _sample(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    logits = logits.float().cpu()
    scaled = logits / temperature if temperature > 0 else logits
    # A temperature so small that the logits overflow when scaled is greedy sampling.
    if temperature <= 0 or bool((scaled.isnan() | scaled.isposinf()).any()):
        return int(logits.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the likeliest token
        # (a top_p below float32's resolution compares as 0).
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=rng))
