"""What is known about a node: its top and random examples, statistics and explanations.

Each function answers `Soon[...]`: the value itself when this request has already read the
node's data (a list of nodes reads all of theirs in one batch first: `prefetch`), else an
awaitable of it. graphql-core awaits what is awaitable and takes the rest as it is, so a
1,000-node lookup runs 1,000 × its fields without a coroutine each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from interpql.errors import check_range
from interpql.loaders.node_data import Unread, normalize_activations
from interpql.loaders.sources import Example, ExplanationData, NodeRecordData, Statistics
from interpql.resolvers.context import RequestContext
from interpql.specs import NodeRef

# Plain values the schema reads: the loaders' own, passed through.
__all__ = [
    "EXPLANATION_FIELDS",
    "RECORD_FIELDS",
    "Example",
    "Examples",
    "ExplanationData",
    "Soon",
    "Statistics",
    "best_explanation",
    "explanations",
    "prefetch",
    "random_sample",
    "settled",
    "statistics",
    "then",
    "top_activations",
]

MAX_EXAMPLES = 1000

T = TypeVar("T")
U = TypeVar("U")
Soon: TypeAlias = T | Awaitable[T]


def then(soon: Soon[T], function: Callable[[T], U]) -> Soon[U]:
    """`function` of the value: now if it is here, else once it is."""
    if not isinstance(soon, Awaitable):
        return function(soon)
    return _Then(soon, function)


class _Then(Awaitable[U]):
    """`function` of an awaitable's value, once awaited. Not a coroutine, so that it may be
    dropped unawaited: the short way through a list (schema/execution.py) takes only values
    that are here, and the ordinary way then asks again."""

    __slots__ = ("_function", "_soon")

    def __init__(self, soon: Awaitable[T], function: Callable[[T], U]) -> None:
        self._soon: Awaitable[Any] = soon
        self._function: Callable[[Any], U] = function

    def __await__(self) -> Generator[Any, None, U]:
        value = yield from self._soon.__await__()
        return self._function(value)


@dataclass(frozen=True)
class Examples:
    """The examples of a node a field shows, with where they come from and the node's largest
    top activation (what normalized activations are relative to): one per node, rather than
    a wrapper per example, since lookups show thousands."""

    source: str
    scale: float
    examples: Sequence[Example]

    def normalized(self, activations: Sequence[float]) -> list[int]:
        """An example's activations on 0-10, relative to the node's largest top activation."""
        return normalize_activations(activations, self.scale)


NO_EXAMPLES = Examples("", 0.0, ())


async def settled(soon: Soon[T]) -> T:
    """The value, awaited if it is not here yet."""
    return await soon if isinstance(soon, Awaitable) else soon


# Node fields that read a node's records, and those that read its explanations.
RECORD_FIELDS = frozenset({"topActivations", "randomSample", "statistics", "neuronpedia"})
EXPLANATION_FIELDS = frozenset({"explanations", "bestExplanation", "neuronpedia"})


async def prefetch(
    ctx: RequestContext, nodes: Sequence[NodeRef], records: bool, known: bool
) -> None:
    """Reads the records (and/or explanations) of `nodes` in one batch each, so that their
    fields answer at once. A node whose read failed keeps its error for its own fields."""
    await ctx.node_data.read_all(nodes, records, known)


def _record(ctx: RequestContext, node: NodeRef) -> Soon[NodeRecordData | None]:
    found = ctx.node_data.read_record(node)
    return ctx.node_data.records.load(node) if isinstance(found, Unread) else found


def _shown(record: NodeRecordData | None, which: str, first: int) -> Examples:
    if record is None:
        return NO_EXAMPLES
    scale = record.top_peak
    if scale is None:
        scale = max((e.max_activation for e in record.top), default=0.0)
    examples = record.top if which == "top" else record.random
    return Examples(record.source, scale, examples[:first])


def top_activations(ctx: RequestContext, node: NodeRef, first: int) -> Soon[Examples]:
    check_range("first", first, 0, MAX_EXAMPLES + 1)
    return then(_record(ctx, node), lambda r: _shown(r, "top", first))


def random_sample(ctx: RequestContext, node: NodeRef, first: int) -> Soon[Examples]:
    check_range("first", first, 0, MAX_EXAMPLES + 1)
    return then(_record(ctx, node), lambda r: _shown(r, "random", first))


def statistics(ctx: RequestContext, node: NodeRef) -> Soon[Statistics | None]:
    return then(_record(ctx, node), lambda r: None if r is None else r.statistics)


def explanations(ctx: RequestContext, node: NodeRef) -> Soon[list[ExplanationData]]:
    found = ctx.node_data.read_explanations(node)
    return ctx.node_data.explanations.load(node) if isinstance(found, Unread) else found


def best_explanation(ctx: RequestContext, node: NodeRef) -> Soon[ExplanationData | None]:
    return then(explanations(ctx, node), lambda found: found[0] if found else None)
