"""Finding nodes: full-text search over explanations, search by peak token, similar nodes and
layers sorted by what is known about their nodes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from interpql.errors import UnavailableError, check_range, invalid_argument
from interpql.loaders.registry import ModelEntry
from interpql.loaders.search import Scope
from interpql.loaders.similarity import similar_nodes as similar
from interpql.resolvers.context import RequestContext
from interpql.specs import NodeRef, parse_node_id

__all__ = ["Found", "Scope", "ordered_indices", "search", "similar_nodes"]

MAX_PAGE = 1000


@dataclass(frozen=True)
class Found:
    node: NodeRef
    score: float
    text: str | None
    activation: float | None


def offset_of(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 12:
        raise invalid_argument(f"Invalid cursor {cursor!r}.")
    return int(cursor) + 1


def search(
    ctx: RequestContext,
    scope: Scope,
    text: str | None,
    token: str | None,
    first: int,
    after: str | None,
) -> tuple[list[Found], int, int]:
    """A page of hits, the total count, and the offset the page starts at."""
    check_range("first", first, 0, MAX_PAGE + 1)
    if (text is None) == (token is None):
        raise invalid_argument("Search by exactly one of text and token.")
    if scope.model is not None:
        entry = ctx.registry.get(scope.model)
        if scope.kind is not None:
            entry.check_kind(scope.kind)
        if scope.layer is not None:
            entry.check_layer(scope.layer)
    else:
        if scope.kind is not None and not any(scope.kind in e.table for e in ctx.registry.all()):
            raise invalid_argument(f"No served model has node kind {scope.kind!r}.")
        if scope.layer is not None:
            check_range("layer", scope.layer, 0, 10**6)
    if (text is not None and len(text) > 1000) or (token is not None and len(token) > 256):
        raise invalid_argument("The search text is too long.")
    start = offset_of(after)
    index = ctx.registry.search
    if text is not None:
        hits, total = index.by_text(scope, text, first, start)
    else:
        hits, total = index.by_token(scope, token or "", first, start)
    found = [Found(parse_node_id(h.node_id), h.rank, h.text, h.activation) for h in hits]
    return found, total, start


async def similar_nodes(
    ctx: RequestContext, node: NodeRef, first: int
) -> list[tuple[NodeRef, float]]:
    check_range("first", first, 0, MAX_PAGE + 1)
    entry = ctx.registry.get(node.model)
    entry.require_writes_reach_stream("similarNodes")
    if not entry.kind(node.kind).has_write_direction:
        raise UnavailableError(f"Nodes of kind {node.kind} have no write direction to compare.")
    entry.require_backend()
    return await ctx.services.model_runner.compute(
        entry, "similar_nodes", lambda stop: similar(entry, node, first)
    )


def ordered_indices(entry: ModelEntry, layer: int, kind: str, order: str) -> np.ndarray:
    """The layer's node indices in the asked order (highest first; unknown values last)."""
    count = entry.node_count(kind, layer)
    if order == "index":
        return np.arange(count)
    for source in entry.sources:
        values = source.layer_values(entry.name, kind, layer, order)
        if values is not None:
            keyed = np.where(np.isnan(values), -math.inf, values)
            return np.argsort(-keyed, kind="stable")
    raise UnavailableError(f"No source of {entry.name!r} knows the {order} of these nodes.")
