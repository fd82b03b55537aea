"""Explaining nodes and scoring explanations: protocols (`base.py`), OpenAI's 0-10
normalisation, the offline baseline explainer and simulator, the OpenAI-API explainer and
simulators (`api.py`), and correlation scoring."""

from interpql.backends.explanations.api import (
    ApiSettings,
    AutoSimulator,
    JsonSimulator,
    LogprobSimulator,
    OpenAIExplainer,
)
from interpql.backends.explanations.base import (
    ActivationExample,
    Explainer,
    ExplanationError,
    SimulationError,
    Simulator,
)
from interpql.backends.explanations.baseline import BaselineExplainer, BaselineSimulator
from interpql.backends.explanations.normalize import (
    max_activation,
    normalize_activations,
    normalized_activations,
)
from interpql.backends.explanations.scoring import (
    ScoredExplanation,
    ScoredSequence,
    correlation_score,
    score_explanation,
    tdb_scored_explanation,
)

__all__ = [
    "ActivationExample",
    "ApiSettings",
    "AutoSimulator",
    "BaselineExplainer",
    "BaselineSimulator",
    "Explainer",
    "ExplanationError",
    "JsonSimulator",
    "LogprobSimulator",
    "OpenAIExplainer",
    "ScoredExplanation",
    "ScoredSequence",
    "SimulationError",
    "Simulator",
    "correlation_score",
    "max_activation",
    "normalize_activations",
    "normalized_activations",
    "score_explanation",
    "tdb_scored_explanation",
]
