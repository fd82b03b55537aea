"""What is known about a node: its top and random examples, statistics and explanations."""

from __future__ import annotations

from dataclasses import dataclass

from interpql.errors import check_range
from interpql.loaders.node_data import normalize_activations
from interpql.loaders.sources import Example, ExplanationData, NodeRecordData, Statistics
from interpql.resolvers.context import RequestContext
from interpql.specs import NodeRef

# Plain values the schema reads: the loaders' own, passed through.
__all__ = [
    "ExampleView",
    "ExplanationData",
    "Statistics",
    "best_explanation",
    "explanations",
    "random_sample",
    "statistics",
    "top_activations",
]

MAX_EXAMPLES = 1000


@dataclass(frozen=True)
class ExampleView:
    source: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...] | None
    activations: tuple[float, ...]
    normalized: list[int]  # 0-10, relative to the node's largest top activation
    max_activation: float


async def _record(ctx: RequestContext, node: NodeRef) -> NodeRecordData | None:
    return await ctx.node_data.records.load(node)


def _views(record: NodeRecordData, examples: tuple[Example, ...], first: int) -> list[ExampleView]:
    check_range("first", first, 0, MAX_EXAMPLES + 1)
    scale = max((max(e.activations, default=0.0) for e in record.top), default=0.0)
    return [
        ExampleView(
            source=record.source,
            tokens=e.tokens,
            token_ids=e.token_ids,
            activations=e.activations,
            normalized=normalize_activations(e.activations, scale),
            max_activation=max(e.activations, default=0.0),
        )
        for e in examples[:first]
    ]


async def top_activations(ctx: RequestContext, node: NodeRef, first: int) -> list[ExampleView]:
    record = await _record(ctx, node)
    return [] if record is None else _views(record, record.top, first)


async def random_sample(ctx: RequestContext, node: NodeRef, first: int) -> list[ExampleView]:
    record = await _record(ctx, node)
    return [] if record is None else _views(record, record.random, first)


async def statistics(ctx: RequestContext, node: NodeRef) -> Statistics | None:
    record = await _record(ctx, node)
    return None if record is None else record.statistics


async def explanations(ctx: RequestContext, node: NodeRef) -> list[ExplanationData]:
    return await ctx.node_data.explanations.load(node)


async def best_explanation(ctx: RequestContext, node: NodeRef) -> ExplanationData | None:
    found = await explanations(ctx, node)
    return found[0] if found else None
