"""What is known about a node: its top and random examples, statistics and explanations.

Each function answers `Soon[...]`: the value itself when this request has already read the
node's data (a list of nodes reads all of theirs in one batch first: `prefetch`), else an
awaitable of it. graphql-core awaits what is awaitable and takes the rest as it is, so a
1,000-node lookup runs 1,000 × its fields without a coroutine each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeAlias, TypeVar

from interpql.errors import check_range
from interpql.loaders.node_data import Unread, normalize_activations
from interpql.loaders.sources import Example, ExplanationData, NodeRecordData, Statistics
from interpql.resolvers.context import RequestContext
from interpql.specs import NodeRef

# Plain values the schema reads: the loaders' own, passed through.
__all__ = [
    "EXPLANATION_FIELDS",
    "RECORD_FIELDS",
    "ExampleView",
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

    async def later() -> U:
        return function(await soon)

    return later()


@dataclass(frozen=True)
class ExampleView:
    source: str
    example: Example
    scale: float  # the node's largest top activation

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.example.tokens

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        return self.example.token_ids

    @property
    def activations(self) -> tuple[float, ...]:
        return self.example.activations

    # Computed only where a field asks: most clients ask for the activations alone.
    @cached_property
    def normalized(self) -> list[int]:
        """0-10, relative to the node's largest top activation."""
        return normalize_activations(self.example.activations, self.scale)

    @cached_property
    def max_activation(self) -> float:
        return max(self.example.activations, default=0.0)


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


def _views(record: NodeRecordData, examples: Sequence[Example], first: int) -> list[ExampleView]:
    scale = record.top_peak
    if scale is None:
        scale = max((max(e.activations, default=0.0) for e in record.top), default=0.0)
    return [ExampleView(record.source, e, scale) for e in examples[:first]]


def top_activations(ctx: RequestContext, node: NodeRef, first: int) -> Soon[list[ExampleView]]:
    check_range("first", first, 0, MAX_EXAMPLES + 1)
    return then(_record(ctx, node), lambda r: [] if r is None else _views(r, r.top, first))


def random_sample(ctx: RequestContext, node: NodeRef, first: int) -> Soon[list[ExampleView]]:
    check_range("first", first, 0, MAX_EXAMPLES + 1)
    return then(_record(ctx, node), lambda r: [] if r is None else _views(r, r.random, first))


def statistics(ctx: RequestContext, node: NodeRef) -> Soon[Statistics | None]:
    return then(_record(ctx, node), lambda r: None if r is None else r.statistics)


def explanations(ctx: RequestContext, node: NodeRef) -> Soon[list[ExplanationData]]:
    found = ctx.node_data.read_explanations(node)
    return ctx.node_data.explanations.load(node) if isinstance(found, Unread) else found


def best_explanation(ctx: RequestContext, node: NodeRef) -> Soon[ExplanationData | None]:
    return then(explanations(ctx, node), lambda found: found[0] if found else None)
