"""Offline explanations from top-activating tokens, and a simulator that reads them back.

The explainer looks at the tokens where a node fires (at least half its maximum over the
examples) and names those tokens or, when that explains more, the tokens just before them.
Tokens are quoted as Python string literals, in four forms:

    the token ' def'
    tokens such as ' import', ' from' (often after '\\n')
    the token after ' self'
    tokens after '.', '('

To tell apart nodes that fire on the same tokens, clauses follow where the examples show them:
where on its line the token fires (first on its line, first on an indented line, mid-line), a
token before it where it does not fire though the named token is there ("not after"), and the
text its strongest activation ends ("strongest at the end of"):

    the token ' def' (often after ' '); first on an indented line; not after '#'; strongest at
    the end of '\n    def'

The simulator reads any explanation's text alone, never the node: it predicts 10 on a token the
explanation quotes (6 on one equal up to case and surrounding spaces), on the token after a quoted
one for the "after" forms, half as much where a quoted "(often after ...)" context is missing or
the token is elsewhere on its line than the line clause says, and 0 after a "not after" token.
A language model's free-text explanation is read the same way, through the strings it quotes.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence

from interpql.backends.explanations.base import ActivationExample
from interpql.backends.explanations.normalize import normalized_activations

FIRING = 5  # a token fires at this normalised activation (of 10) or more: half the maximum
QUIET = 1  # at this normalised activation or less, a token is one the node does not fire on
COVERAGE = 0.7  # name tokens until they carry this share of all firing activation
MAX_NAMED = 4
CONTEXT_SHARE = 0.6  # a preceding token this common is worth saying
DIVERSE_SHARE = 0.5  # below this share for the commonest firing token, the tokens are diverse
NEVER_ACTIVE = "no activation on the examples shown"

_CONTEXT = " (often after "
_NOT_AFTER = "; not after "
_STRONGEST = "; strongest at the end of "
# Where on its line a token is (see _line_position), as the line clause says it.
_LINE_CLAUSES = {
    "first": "; first on its line",
    "indented": "; first on an indented line",
    "mid": "; mid-line",
}
_CLAUSE_MARKERS = re.compile(
    "|".join(re.escape(m) for m in (_NOT_AFTER, _STRONGEST, *_LINE_CLAUSES.values()))
)
# The strongest activation's token and those before it, quoted: up to SNIPPET_WORDS tokens
# that are not whitespace, and SNIPPET_TOKENS tokens in all.
SNIPPET_WORDS = 3
SNIPPET_TOKENS = 16
_AFTER_FORMS = ("the token after ", "tokens after ")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")

# token, the token before it (None at a window start), level, where on its line (None: unknown)
Firing = tuple[str, str | None, int, str | None]


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
    total = sum(f[2] for f in firing)
    by_token = _weights((token, level) for token, _, level, _ in firing)
    by_previous = _weights((prev, level) for _, prev, level, _ in firing if prev is not None)
    token_share = max(by_token.values()) / total
    previous_share = max(by_previous.values(), default=0) / total
    # A node that fires on diverse tokens after a fixed one is told by what precedes them.
    if previous_share >= CONTEXT_SHARE and token_share < DIVERSE_SHARE:
        named = _covering(by_previous, total)
        form = "the token after " if len(named) == 1 else "tokens after "
        text = form + _quoted_list(named)
        chosen = [f for f in firing if f[1] in named]
        return text + _line_clause(chosen) + _strongest(examples)
    named = _covering(by_token, total)
    text = ("the token " if len(named) == 1 else "tokens such as ") + _quoted_list(named)
    chosen = [f for f in firing if f[0] in named]
    context = _weights((prev, level) for _, prev, level, _ in chosen if prev is not None)
    if context:
        prev = max(context, key=lambda p: (context[p], p))
        seen = sum(1 for f in chosen if f[1] == prev)
        share = context[prev] / sum(f[2] for f in chosen)
        if seen >= 2 and share >= CONTEXT_SHARE:
            text += f"{_CONTEXT}{prev!r})"
    return text + _line_clause(chosen) + _not_after(examples, named, chosen) + _strongest(examples)


def _line_clause(chosen: Sequence[Firing]) -> str:
    """Where on its line the node fires, when most of its firing weight agrees."""
    known = _weights((line, level) for *_, level, line in chosen if line is not None)
    weight = sum(f[2] for f in chosen)
    if not known or sum(known.values()) < weight / 2:
        return ""
    line = max(known, key=lambda k: (known[k], k))
    return _LINE_CLAUSES[line] if known[line] >= CONTEXT_SHARE * weight else ""


def _not_after(
    examples: Sequence[ActivationExample], named: Sequence[str], chosen: Sequence[Firing]
) -> str:
    """A token that often comes before a named token where the node stays quiet, and seldom
    where it fires."""
    quiet: dict[str, int] = {}
    for example, levels in zip(examples, normalized_activations(examples), strict=True):
        for i in range(1, len(levels)):
            if levels[i] <= QUIET and example.tokens[i] in named:
                quiet[example.tokens[i - 1]] = quiet.get(example.tokens[i - 1], 0) + 1
    fired = _weights((prev, level) for _, prev, level, _ in chosen if prev is not None)
    weight = sum(f[2] for f in chosen)
    candidates = [p for p, n in quiet.items() if n >= 2 and fired.get(p, 0) <= 0.1 * weight]
    if not candidates:
        return ""
    return f"{_NOT_AFTER}{max(candidates, key=lambda p: (quiet[p], p))!r}"


def _strongest(examples: Sequence[ActivationExample]) -> str:
    """The text ending at the strongest activation of all the examples."""
    best = max(
        (
            (value, -e, -i)
            for e, ex in enumerate(examples)
            for i, value in enumerate(ex.activations)
        ),
        default=None,
    )
    if best is None:
        return ""
    example, i = examples[-best[1]], -best[2]
    start, words = i + 1, 0
    # Back far enough to hold SNIPPET_WORDS tokens of text: indentation alone tells nothing.
    while start > max(0, i + 1 - SNIPPET_TOKENS) and words < SNIPPET_WORDS:
        start -= 1
        words += bool(example.tokens[start].strip())
    snippet = "".join(example.tokens[start : i + 1])
    return f"{_STRONGEST}{snippet!r}"


def simulate_from_text(explanation: str, tokens: Sequence[str]) -> list[float]:
    head, clauses = _split_clauses(explanation)
    main, _, context = head.partition(_CONTEXT)
    named = _Names(_quoted_strings(main))
    contexts = _Names(_quoted_strings(context))
    blocked = _Names(_quoted_strings(clauses.get(_NOT_AFTER, "")))
    lines = [line for line, clause in _LINE_CLAUSES.items() if clause in clauses]
    after = main.startswith(_AFTER_FORMS)
    predicted: list[float] = []
    for i, token in enumerate(tokens):
        previous = tokens[i - 1] if i else None
        if after:
            value = named.match(previous)
        else:
            value = named.match(token)
            if value and contexts and not contexts.match(previous):
                value /= 2
            if value and blocked.match(previous):
                value = 0.0
        if value and lines and _line_position(tokens, i) not in (lines[0], None):
            value /= 2
        predicted.append(value)
    return predicted


def _split_clauses(explanation: str) -> tuple[str, dict[str, str]]:
    """The explanation before its first clause, and each clause's text by its marker. Markers
    inside quoted strings are the strings' own."""
    quoted = [m.span() for m in _QUOTED.finditer(explanation)]

    def outside(at: int) -> bool:
        return not any(start < at < end for start, end in quoted)

    starts = [
        (found.start(), found.group())
        for found in _CLAUSE_MARKERS.finditer(explanation)
        if outside(found.start())
    ]
    if not starts:
        return explanation, {}
    clauses: dict[str, str] = {}
    for (at, marker), (end, _) in zip(starts, [*starts[1:], (len(explanation), "")], strict=True):
        clauses.setdefault(marker, explanation[at + len(marker) : end])
    return explanation[: starts[0][0]], clauses


def _line_position(tokens: Sequence[str], i: int) -> str | None:
    """Where token i is on its line: "first" (nothing before it on its line), "indented"
    (only whitespace before it), "mid" (other text before it); None when the tokens start
    before its line does."""
    indented = bool(tokens[i][:1].isspace() and "\n" not in tokens[i])
    for j in range(i - 1, -1, -1):
        before = tokens[j]
        if "\n" in before:
            rest = before.rsplit("\n", 1)[1]
            if rest.strip():
                return "mid"
            return "indented" if indented or rest else "first"
        if before.strip():
            return "mid"
        indented = True
    return None


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
                line = _line_position(example.tokens, i)
                firing.append((example.tokens[i], previous, level, line))
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
