"""Offline explanations from top-activating tokens, and a simulator that reads them back.

The explainer looks at the tokens where a node fires (at least half its maximum over the
examples) and names those tokens or, when that explains more, the tokens just before them.
Tokens are quoted as Python string literals, in four forms:

    the token ' def'
    tokens such as ' import', ' from' (often after '\\n')
    the token after ' self'
    tokens after '.', '('

The simulator reads any explanation's text alone, never the node: it predicts 10 on a token the
explanation quotes (6 on one equal up to case and surrounding spaces), on the token after a quoted
one for the "after" forms, and half as much where a quoted "(often after ...)" context is missing.
A language model's free-text explanation is read the same way, through the strings it quotes.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence

from interpql.backends.explanations.base import ActivationExample
from interpql.backends.explanations.normalize import normalized_activations

FIRING = 5  # a token fires at this normalised activation (of 10) or more: half the maximum
COVERAGE = 0.7  # name tokens until they carry this share of all firing activation
MAX_NAMED = 4
CONTEXT_SHARE = 0.6  # a preceding token this common is worth saying
DIVERSE_SHARE = 0.5  # below this share for the commonest firing token, the tokens are diverse
NEVER_ACTIVE = "no activation on the examples shown"

_CONTEXT = " (often after "
_AFTER_FORMS = ("the token after ", "tokens after ")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")

Firing = tuple[str, str | None, int]  # token, the token before it (None at a window start), level


class BaselineExplainer:
    name = "baseline-top-tokens"

    async def explain(self, examples: Sequence[ActivationExample]) -> list[str]:
        return [explain_from_tokens(examples)]


class BaselineSimulator:
    name = "baseline-token-match"

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        return simulate_from_text(explanation, tokens)


def explain_from_tokens(examples: Sequence[ActivationExample]) -> str:
    firing = _firing(examples)
    if not firing:
        return NEVER_ACTIVE
    total = sum(level for *_, level in firing)
    by_token = _weights((token, level) for token, _, level in firing)
    by_previous = _weights((prev, level) for _, prev, level in firing if prev is not None)
    token_share = max(by_token.values()) / total
    previous_share = max(by_previous.values(), default=0) / total
    # A node that fires on diverse tokens after a fixed one is told by what precedes them.
    if previous_share >= CONTEXT_SHARE and token_share < DIVERSE_SHARE:
        named = _covering(by_previous, total)
        form = "the token after " if len(named) == 1 else "tokens after "
        return form + _quoted_list(named)
    named = _covering(by_token, total)
    text = ("the token " if len(named) == 1 else "tokens such as ") + _quoted_list(named)
    around_named = [(prev, level) for tok, prev, level in firing if tok in named]
    context = _weights((prev, level) for prev, level in around_named if prev is not None)
    if context:
        prev = max(context, key=lambda p: (context[p], p))
        seen = sum(1 for p, _ in around_named if p == prev)
        share = context[prev] / sum(level for _, level in around_named)
        if seen >= 2 and share >= CONTEXT_SHARE:
            text += f"{_CONTEXT}{prev!r})"
    return text


def simulate_from_text(explanation: str, tokens: Sequence[str]) -> list[float]:
    main, _, context = explanation.partition(_CONTEXT)
    named = _Names(_quoted_strings(main))
    contexts = _Names(_quoted_strings(context))
    after = main.startswith(_AFTER_FORMS)
    predicted: list[float] = []
    for i, token in enumerate(tokens):
        previous = tokens[i - 1] if i else None
        if after:
            predicted.append(named.match(previous))
            continue
        value = named.match(token)
        if value and contexts and not contexts.match(previous):
            value /= 2
        predicted.append(value)
    return predicted


class _Names:
    def __init__(self, names: Iterable[str]) -> None:
        self.exact = set(names)
        self.loose = {_loose(n) for n in self.exact} - {""}

    def __bool__(self) -> bool:
        return bool(self.exact)

    def match(self, token: str | None) -> float:
        if token is None:
            return 0.0
        if token in self.exact:
            return 10.0
        return 6.0 if _loose(token) in self.loose else 0.0


def _loose(token: str) -> str:
    return token.strip().lower()


def _firing(examples: Sequence[ActivationExample]) -> list[Firing]:
    firing: list[Firing] = []
    for example, levels in zip(examples, normalized_activations(examples), strict=True):
        for i, level in enumerate(levels):
            if level >= FIRING:
                previous = example.tokens[i - 1] if i else None
                firing.append((example.tokens[i], previous, level))
    return firing


def _weights(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for key, weight in pairs:
        weights[key] = weights.get(key, 0) + weight
    return weights


def _covering(weights: dict[str, int], total: int) -> list[str]:
    """The heaviest keys, until they carry COVERAGE of `total` (at most MAX_NAMED)."""
    named: list[str] = []
    carried = 0
    for key in sorted(weights, key=lambda k: (-weights[k], k)):
        named.append(key)
        carried += weights[key]
        if carried >= COVERAGE * total or len(named) == MAX_NAMED:
            break
    return named


def _quoted_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _quoted_strings(text: str) -> list[str]:
    strings = []
    for match in _QUOTED.finditer(text):
        try:
            value = ast.literal_eval(match.group())
        except (ValueError, SyntaxError):
            continue  # free text whose apostrophes happen to pair up
        if isinstance(value, str):
            strings.append(value)
    return strings
