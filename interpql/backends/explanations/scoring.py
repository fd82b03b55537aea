"""Scoring an explanation: how well its simulation correlates with the node's true activations."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from interpql.backends.explanations.base import ActivationExample, SimulationError, Simulator


def correlation_score(
    true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]
) -> float:
    """Pearson correlation (`np.corrcoef`) over all activations pooled across the sequences.

    Pooling, not averaging per sequence, is OpenAI's `ev_correlation_score`. Where either side is
    constant the correlation is undefined (numpy answers nan); we score it 0: a simulation that
    predicts the same everywhere, or a node that never varies on the held-out text, explains
    nothing measurable.
    """
    if len(true) != len(simulated) or any(
        len(t) != len(s) for t, s in zip(true, simulated, strict=True)
    ):
        raise ValueError("true and simulated activations differ in shape")
    t = np.concatenate([np.asarray(seq, dtype=np.float64) for seq in true] or [np.zeros(0)])
    s = np.concatenate([np.asarray(seq, dtype=np.float64) for seq in simulated] or [np.zeros(0)])
    if len(t) < 2 or np.ptp(t) == 0 or np.ptp(s) == 0:
        return 0.0
    score = float(np.corrcoef(t, s)[0, 1])
    return score if math.isfinite(score) else 0.0


def calibrated_rsquared(
    true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]
) -> float:
    """Calibration: a simulator's scale is arbitrary, so its predictions are mapped onto the
    true activations by least squares (true ~ a * simulated + b), fitted on the even-numbered
    sequences; the score is the share of the odd-numbered sequences' variance that the
    calibrated predictions explain (R^2, out of sample; can be negative). With fewer than two
    sequences, or constant data on either half, it is 0.
    """
    if len(true) < 2:
        return 0.0
    fit_t, fit_s = _pooled(true[0::2]), _pooled(simulated[0::2])
    test_t, test_s = _pooled(true[1::2]), _pooled(simulated[1::2])
    if len(fit_t) < 2 or np.ptp(fit_s) == 0 or len(test_t) < 2 or np.ptp(test_t) == 0:
        return 0.0
    slope, intercept = np.polyfit(fit_s, fit_t, 1)
    residual = test_t - (slope * test_s + intercept)
    total = test_t - test_t.mean()
    return float(1.0 - (residual @ residual) / (total @ total))


def _pooled(sequences: Sequence[Sequence[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.float64) for s in sequences] or [np.zeros(0)])


@dataclass(frozen=True)
class ScoredSequence:
    tokens: list[str]
    true_activations: list[float]
    simulated_activations: list[float]


@dataclass(frozen=True)
class ScoredExplanation:
    explanation: str
    score: float
    simulator: str
    sequences: tuple[ScoredSequence, ...]
    rsquared: float = 0.0  # `calibrated_rsquared`

    def to_tdb_json(self) -> dict[str, Any]:
        """Transformer Debugger's ScoredExplanation, with each sequence's simulation."""
        scored = tdb_scored_explanation(
            self.explanation,
            self.score,
            [
                {
                    "dataclass_name": "ScoredSequenceSimulation",
                    "sequence_simulation": {
                        "dataclass_name": "SequenceSimulation",
                        "tokens": seq.tokens,
                        "expected_activations": seq.simulated_activations,
                        "activation_scale": "simulated_normalized_activations",
                        "distribution_values": [[v] for v in seq.simulated_activations],
                        "distribution_probabilities": [[1.0] for _ in seq.simulated_activations],
                        "uncalibrated_simulation": None,
                    },
                    "true_activations": seq.true_activations,
                    "ev_correlation_score": correlation_score(
                        [seq.true_activations], [seq.simulated_activations]
                    ),
                    "rsquared_score": None,
                    "absolute_dev_explained_score": None,
                }
                for seq in self.sequences
            ],
        )
        scored["scored_simulation"]["rsquared_score"] = self.rsquared
        return scored


def tdb_scored_explanation(
    explanation: str, score: float, sequences: list[dict[str, Any]]
) -> dict[str, Any]:
    """Transformer Debugger's ScoredExplanation JSON (a nan score is written as null)."""
    return {
        "dataclass_name": "ScoredExplanation",
        "explanation": explanation,
        "scored_simulation": {
            "dataclass_name": "ScoredSimulation",
            "scored_sequence_simulations": sequences,
            "ev_correlation_score": None if math.isnan(score) else score,
            "rsquared_score": None,
            "absolute_dev_explained_score": None,
        },
    }


async def score_explanation(
    simulator: Simulator, explanation: str, held_out: Sequence[ActivationExample]
) -> ScoredExplanation:
    """Simulates every held-out example (concurrently) and correlates with the truth.

    `held_out` should mix top-activating and random examples that the explainer never saw.
    """
    # A task group: when one simulation fails, the others are cancelled rather than left
    # sending requests (and spending tokens) for a score that will not be.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(simulator.simulate(explanation, example.tokens))
                for example in held_out
            ]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    simulated = [task.result() for task in tasks]
    for example, prediction in zip(held_out, simulated, strict=True):
        if len(prediction) != len(example.tokens):
            raise SimulationError(
                f"{simulator.name} predicted {len(prediction)} values for "
                f"{len(example.tokens)} tokens"
            )
    score = correlation_score([e.activations for e in held_out], simulated)
    sequences = tuple(
        ScoredSequence(e.tokens, e.activations, list(p))
        for e, p in zip(held_out, simulated, strict=True)
    )
    rsquared = calibrated_rsquared([e.activations for e in held_out], simulated)
    return ScoredExplanation(explanation, score, simulator.name, sequences, rsquared)
