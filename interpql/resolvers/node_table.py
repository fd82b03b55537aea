"""Transformer Debugger's node table of an input (loaders/node_table.py) with its rows' tokens,
and the direct-effect terms that, with the nodes' direct effects, add up to the loss."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from interpql.errors import check_position, check_range
from interpql.loaders.inference import Needs, RowResult
from interpql.loaders.node_table import NodeTable, TableRow, build_node_table, table_needs
from interpql.loaders.table_tokens import RowTokens, excluded_tokens, row_tokens
from interpql.resolvers.analysis import ranked_layer_kinds
from interpql.resolvers.context import RequestContext
from interpql.resolvers.inference import result
from interpql.specs import InferenceSpec

__all__ = [
    "DirectEffectTerm",
    "RowTokens",
    "TableView",
    "direct_effect_terms",
    "node_table",
]


@dataclass
class TableView:
    """A table, and its rows' tokens computed for every row at once when the first row asks."""

    ctx: RequestContext
    spec: InferenceSpec
    done: RowResult
    table: NodeTable
    tokens_per_list: int
    exclude_rare_tokens: bool
    _tokens: asyncio.Task[list[RowTokens]] | None = field(default=None, repr=False)

    async def tokens(self, row: int) -> RowTokens:
        return (await self.all_tokens())[row]

    async def all_tokens(self) -> list[RowTokens]:
        if self._tokens is None:
            self._tokens = asyncio.ensure_future(self._all_tokens())
        return await self._tokens

    async def _all_tokens(self) -> list[RowTokens]:
        entry = self.ctx.registry.get(self.spec.model)
        excluded = excluded_tokens(entry, self.exclude_rare_tokens)
        rows: list[TableRow] = self.table.rows
        return await self.ctx.services.model_runner.compute(
            entry,
            "node_table_tokens",
            lambda stop: row_tokens(entry, self.done, rows, self.tokens_per_list, excluded),
        )


async def node_table(
    ctx: RequestContext, spec: InferenceSpec, k: int, tokens_per_list: int, exclude_rare: bool
) -> TableView:
    check_range("k", k, 0, ctx.settings.max_top_k + 1)
    check_range("scoredTokens", tokens_per_list, 0, ctx.settings.max_top_k + 1)
    entry = ctx.registry.get(spec.model)
    entry.require_writes_reach_stream("nodeTable")
    layer_kinds = ranked_layer_kinds(ctx, spec)
    done = await result(ctx, spec, table_needs(entry, layer_kinds))
    table = await asyncio.to_thread(build_node_table, entry, done, layer_kinds, k)
    return TableView(ctx, spec, done, table, tokens_per_list, exclude_rare)


@dataclass(frozen=True)
class DirectEffectTerm:
    name: str
    layer: int | None  # None: the final LayerNorm's
    value: float
    residual: bool = False  # the residual dictionary's: part of its decomposition of the stream


async def direct_effect_terms(
    ctx: RequestContext, spec: InferenceSpec, position: int | None
) -> list[DirectEffectTerm]:
    """What writes to the residual stream besides the input's ranked kinds, in every layer
    (early layers too, whatever hideEarlyLayersWhenAblating says), as direct effects."""
    ctx.registry.get(spec.model).require_writes_reach_stream("directEffectTerms")
    if position is not None:
        position = check_position("tokenIndex", position, len(spec.tokens))
    layer_kinds = ranked_layer_kinds(ctx, spec, hide_early_layers=False)
    needs = Needs(layer_kinds=frozenset(layer_kinds), stream_gradient=True, final_norm_bias=True)
    done = await result(ctx, spec, needs)

    def at(values: np.ndarray) -> float:  # [position]
        return float(values[position] if position is not None else values.sum())

    terms = [
        DirectEffectTerm(name, layer, at(values), residual=kind in spec.residual_kinds)
        for (layer, kind) in sorted(set(layer_kinds) & set(done.bias_effects))
        for name, values in done.bias_effects[(layer, kind)].items()
    ]
    if done.final_norm_bias_effect is not None:
        terms.append(
            DirectEffectTerm("final LayerNorm bias", None, at(done.final_norm_bias_effect))
        )
    return terms
