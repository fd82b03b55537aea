"""Explainer and simulators that call an OpenAI-compatible server through the `openai` client.

The client retries 429s, 5xx answers, timeouts and dropped connections itself, with exponential
backoff (`ApiSettings.max_retries`); what still fails surfaces as an `openai.APIError` for the
job to report. Every call reports the tokens it used to `on_usage`, which is how per-key budgets
are kept.

Two simulators, as in OpenAI's method:
* `JsonSimulator` (logprob-free): asks for one integer 0-10 per token in the completion, as JSON,
  and validates it; a malformed answer is asked again, `attempts` times in all, then fails.
* `LogprobSimulator` (one pass): writes every token with an "unknown" activation into a prompt
  and reads, from the prompt's own logprobs, the expected value of the digit the model would put
  there. It needs a server that echoes prompt logprobs (legacy completions); current chat
  models do not, so `AutoSimulator` tries it once and falls back to JSON for good.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client library is imported when a client is made: start-up stays fast
    import openai

from interpql.backends.explanations.base import (
    ActivationExample,
    ExplanationError,
    SimulationError,
)
from interpql.backends.explanations.normalize import normalized_activations

UsageCallback = Callable[[int], None]


@dataclass(frozen=True)
class ApiSettings:
    base_url: str | None
    api_key: str
    explainer_model: str = "gpt-4o-mini"
    simulator_model: str = "gpt-4o-mini"
    temperature: float = 1.0
    max_tokens: int = 256
    timeout_s: float = 60.0
    max_retries: int = 3
    simulator: str = "auto"  # auto | json | logprobs

    def client(self) -> openai.AsyncOpenAI:
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )


_EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing "
    "in a short document. Look at the parts of the document the neuron activates for and "
    "summarize in a single short phrase what the neuron is looking for. Don't list examples "
    "of words. The activation format is token<tab>activation; activations go from 0 to 10, and "
    "most are 0."
)


def format_examples(examples: Sequence[ActivationExample]) -> str:
    """Examples as OpenAI's method shows them: token<tab>activation, on its 0-10 scale."""
    scaled = normalized_activations(examples)
    blocks = []
    for number, (example, values) in enumerate(zip(examples, scaled, strict=True), start=1):
        lines = "\n".join(f"{t}\t{v}" for t, v in zip(example.tokens, values, strict=True))
        blocks.append(f"Example {number}:\n<start>\n{lines}\n<end>")
    return "\n\n".join(blocks)


def _count(usage: Any, on_usage: UsageCallback | None) -> None:
    if on_usage is not None and usage is not None:
        on_usage(int(getattr(usage, "total_tokens", 0) or 0))


class _ApiCaller:
    """What every caller of the API holds: its settings, a client and where usage goes."""

    def __init__(
        self,
        settings: ApiSettings,
        on_usage: UsageCallback | None,
        client: openai.AsyncOpenAI | None,
    ) -> None:
        self._settings = settings
        self._on_usage = on_usage
        self._client = client or settings.client()


class OpenAIExplainer(_ApiCaller):
    def __init__(
        self,
        settings: ApiSettings,
        n_explanations: int = 1,
        on_usage: UsageCallback | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        super().__init__(settings, on_usage, client)
        self.name = settings.explainer_model
        self._n = n_explanations

    def prompt(self, examples: Sequence[ActivationExample]) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": _EXPLAIN_SYSTEM},
            {
                "role": "user",
                "content": format_examples(examples)
                + "\n\nExplanation of the neuron's behavior: the main thing this neuron does is "
                "find",
            },
        ]

    async def explain(self, examples: Sequence[ActivationExample]) -> list[str]:
        response = await self._client.chat.completions.create(
            model=self._settings.explainer_model,
            messages=self.prompt(examples),  # type: ignore[arg-type]
            temperature=self._settings.temperature,
            max_tokens=self._settings.max_tokens,
            n=self._n,
        )
        _count(response.usage, self._on_usage)
        found = []
        for choice in response.choices:
            text = (choice.message.content or "").strip().strip('"').rstrip(".").strip()
            if text and "\n" not in text and len(text) <= 500:
                found.append(text)
        if not found:
            raise ExplanationError("the explainer answered no usable explanation")
        return found


_SIMULATE_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing "
    "in a short document. Given an explanation of what a neuron looks for, predict how "
    "strongly it activates on each token of a text, as an integer from 0 (not at all) to 10 "
    '(most strongly); most are 0. Answer only JSON: {"activations": [one integer per token, '
    "in order]}."
)


class JsonSimulator(_ApiCaller):
    def __init__(
        self,
        settings: ApiSettings,
        attempts: int = 3,
        on_usage: UsageCallback | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        super().__init__(settings, on_usage, client)
        self.name = f"{settings.simulator_model} (json)"
        self._attempts = attempts

    def prompt(self, explanation: str, tokens: Sequence[str]) -> list[dict[str, str]]:
        listed = "\n".join(f"{i}\t{t}" for i, t in enumerate(tokens))
        return [
            {"role": "system", "content": _SIMULATE_SYSTEM},
            {
                "role": "user",
                "content": f"Explanation: the neuron looks for {explanation}.\n\n"
                f"Tokens ({len(tokens)}, as index<tab>token):\n{listed}",
            },
        ]

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        problems = []
        for _ in range(self._attempts):
            response = await self._client.chat.completions.create(
                model=self._settings.simulator_model,
                messages=self.prompt(explanation, tokens),  # type: ignore[arg-type]
                temperature=0.0,
                max_tokens=max(64, 4 * len(tokens) + 32),
            )
            _count(response.usage, self._on_usage)
            answer = response.choices[0].message.content or ""
            try:
                return parse_activations(answer, len(tokens))
            except SimulationError as exc:
                problems.append(str(exc))
        raise SimulationError(
            f"{self.name} gave no valid simulation in {self._attempts} attempts: {problems[-1]}"
        )


def parse_activations(answer: str, n_tokens: int) -> list[float]:
    """The completion's activations, checked: JSON, one number 0-10 per token."""
    match = re.search(r"\{.*\}", answer, re.DOTALL)
    try:
        values = json.loads(match.group(0) if match else answer)["activations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SimulationError(f"not JSON with an activations list: {answer[:80]!r}") from exc
    if not isinstance(values, list) or len(values) != n_tokens:
        count = len(values) if isinstance(values, list) else "no"
        raise SimulationError(f"{count} activations for {n_tokens} tokens")
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SimulationError(f"activation {value!r} is not a number")
        if not (math.isfinite(value) and 0 <= value <= 10):
            raise SimulationError(f"activation {value!r} is outside 0-10")
        checked.append(float(value))
    return checked


_DIGITS = [str(d) for d in range(11)]
_PLACEHOLDER = "unknown"


class LogprobSimulator(_ApiCaller):
    def __init__(
        self,
        settings: ApiSettings,
        on_usage: UsageCallback | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        super().__init__(settings, on_usage, client)
        self.name = f"{settings.simulator_model} (logprobs)"

    def prompt(self, explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
        """The prompt, and the character offset of each token's placeholder in it."""
        head = (
            f"{_SIMULATE_SYSTEM.split(' Answer only')[0]}\n\nNeuron: looks for {explanation}.\n"
            "Activations:\n<start>\n"
        )
        parts, offsets, length = [head], [], len(head)
        for token in tokens:
            line = f"{token}\t"
            offsets.append(length + len(line))
            line += f"{_PLACEHOLDER}\n"
            parts.append(line)
            length += len(line)
        parts.append("<end>\n")
        return "".join(parts), offsets

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        prompt, placeholders = self.prompt(explanation, tokens)
        response = await self._client.completions.create(
            model=self._settings.simulator_model,
            prompt=prompt,
            max_tokens=0,
            echo=True,
            logprobs=15,
        )
        _count(response.usage, self._on_usage)
        logprobs = response.choices[0].logprobs
        if (
            logprobs is None
            or not logprobs.top_logprobs
            or not logprobs.tokens
            or not logprobs.text_offset
        ):
            raise SimulationError("the server returned no prompt logprobs with text offsets")
        starts = logprobs.text_offset
        expected = []
        # The placeholders are found by where we wrote them, never by their text: a record's
        # own token may read "unknown" too.
        for offset in placeholders:
            at = bisect.bisect_right(starts, offset) - 1
            top = logprobs.top_logprobs[at] if 0 <= at < len(logprobs.top_logprobs) else None
            token = logprobs.tokens[at] if 0 <= at < len(logprobs.tokens) else ""
            if not top or _PLACEHOLDER not in token:
                raise SimulationError(
                    f"no placeholder token at character {offset} of the prompt's logprobs"
                )
            weights = {d: math.exp(lp) for d, lp in top.items() if d.strip() in _DIGITS}
            total = sum(weights.values())
            expected.append(
                sum(int(d.strip()) * w for d, w in weights.items()) / total if total else 0.0
            )
        return expected


class AutoSimulator:
    """The logprob simulator where the server supports it, else the JSON one.

    Decided once, by the first simulation (concurrent ones wait for it), and then kept: every
    prediction of a score comes from one simulator, never some from each."""

    def __init__(
        self,
        settings: ApiSettings,
        on_usage: UsageCallback | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        client = client or settings.client()
        self._logprobs = LogprobSimulator(settings, on_usage, client)
        self._json = JsonSimulator(settings, on_usage=on_usage, client=client)
        self._use_logprobs: bool | None = None
        self._deciding = asyncio.Lock()
        self.name = self._json.name

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        if self._use_logprobs is None:
            async with self._deciding:
                if self._use_logprobs is None:
                    try:
                        values = await self._logprobs.simulate(explanation, tokens)
                    except (SimulationError, _api_status_error()):
                        self._use_logprobs = False
                    else:
                        self._use_logprobs = True
                        self.name = self._logprobs.name
                        return values
        if self._use_logprobs:
            return await self._logprobs.simulate(explanation, tokens)
        return await self._json.simulate(explanation, tokens)


def _api_status_error() -> type[Exception]:
    import openai

    return openai.APIStatusError
