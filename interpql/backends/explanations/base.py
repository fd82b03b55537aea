"""Explainers and simulators: the two protocols every implementation follows.

An `Explainer` reads a node's top-activating examples and answers short explanations of what the
node responds to. A `Simulator` reads one explanation and predicts, token by token, how strongly
the node fires on a text; `scoring.score_explanation` correlates those predictions with the node's
true activations on held-out examples (OpenAI's method; see DESIGN.md).

Both are async: the implementations that matter call an OpenAI-compatible server and must not
block the event loop while they wait. An offline implementation (`baseline.py`) simply never
awaits anything; a synchronous caller runs either under `asyncio.run`.

Implementing an Explainer
-------------------------
* `name`: provenance stored with every explanation it writes, e.g. ``"baseline-top-tokens"`` or
  ``"gpt-4o-mini"``.
* `explain(examples)`: `examples` are top-activating windows with raw activations, highest peak
  first. Normalise them with `normalize.normalized_activations` where a prompt wants OpenAI's 0-10
  integers. Return one or more explanations, best first. Raise `ExplanationError` rather than
  return text that is not an explanation.

Implementing a Simulator
------------------------
* `name`: as above, e.g. ``"baseline-token-match"``.
* `simulate(explanation, tokens)`: one predicted activation per token, on any scale (the score is
  a correlation, so the scale does not matter; OpenAI's simulators answer 0-10). It must use
  nothing but the explanation's text and the tokens, or the score is not honest. A malformed
  model answer is the implementation's to retry; when it cannot produce `len(tokens)` numbers it
  raises `SimulationError`, never pads with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ExplanationError(RuntimeError):
    """An explainer could not produce an explanation."""


class SimulationError(RuntimeError):
    """A simulator could not produce one valid prediction per token."""


@dataclass(frozen=True)
class ActivationExample:
    tokens: list[str]
    activations: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.activations)} activations")


class Explainer(Protocol):
    name: str

    async def explain(self, examples: Sequence[ActivationExample]) -> list[str]:
        """Explanations of the node these top-activating examples come from, best first."""
        ...


class Simulator(Protocol):
    name: str

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        """The activation the explanation predicts at each token."""
        ...
