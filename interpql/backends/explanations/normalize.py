"""OpenAI's 0-10 scale: activations relative to the node's maximum over its top examples."""

from __future__ import annotations

import math
from collections.abc import Sequence

from interpql.backends.explanations.base import ActivationExample

MAX_NORMALIZED = 10


def max_activation(examples: Sequence[ActivationExample]) -> float:
    return max((max(e.activations, default=0.0) for e in examples), default=0.0)


def normalize_activations(activations: Sequence[float], max_value: float) -> list[int]:
    """floor(10 * a / max), negatives as 0; all zeros when the maximum is not positive."""
    if max_value <= 0:
        return [0] * len(activations)
    return [
        min(MAX_NORMALIZED, math.floor(MAX_NORMALIZED * max(a, 0.0) / max_value))
        for a in activations
    ]


def normalized_activations(examples: Sequence[ActivationExample]) -> list[list[int]]:
    """Every example on the 0-10 scale of the largest activation among them all."""
    top = max_activation(examples)
    return [normalize_activations(e.activations, top) for e in examples]
