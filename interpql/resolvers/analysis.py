"""Transformer Debugger's analyses of one pass: nodes ranked by a group of values, and the
tokens a node's weights favour."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from interpql.errors import check_position, check_range, invalid_argument
from interpql.loaders.inference import LayerKind, Needs, RowResult
from interpql.loaders.scored_tokens import TokenScores, scored_tokens
from interpql.resolvers.context import RequestContext
from interpql.resolvers.inference import result
from interpql.specs import InferenceSpec, NodeRef


class Group(StrEnum):
    ACTIVATION = "activation"
    WRITE_NORM = "write_norm"
    DIRECT_EFFECT = "direct_effect"
    ACT_TIMES_GRAD = "act_times_grad"


@dataclass(frozen=True)
class RankedNode:
    node: NodeRef
    value: float
    token_values: list[float]  # the group's value at each position, from the same pass


@dataclass(frozen=True)
class Ranking:
    top: list[RankedNode]
    bottom: list[RankedNode]
    # Per position: the group's value summed over every ranked node that writes to the stream.
    token_sums: list[float]


def ranked_layer_kinds(
    ctx: RequestContext, spec: InferenceSpec, hide_early_layers: bool = True
) -> list[LayerKind]:
    """What an analysis of `spec` ranks: the embeddings and the input's attention and MLP kinds,
    in every layer that has them (from the first ablated layer on, with
    hideEarlyLayersWhenAblating, unless `hide_early_layers` is False)."""
    entry = ctx.registry.get(spec.model)
    first_layer = 0
    if hide_early_layers and spec.hide_early_layers_when_ablating and spec.ablations:
        # Layers before the first ablation run as without it: nothing there to see.
        first_layer = min(a.node.layer for a in spec.ablations)
    # The embeddings write before layer 0: they are ranked unless early layers are hidden.
    embeddings = [k.name for k in entry.kinds() if k.embeds] if first_layer == 0 else []
    return [
        (layer, kind)
        for layer in range(first_layer, entry.architecture.n_layers)
        for kind in (*embeddings, spec.attention_kind, spec.mlp_kind, *spec.residual_kinds)
        if entry.node_count(kind, layer) > 0
    ]


def group_needs(group: Group, layer_kinds: list[LayerKind]) -> Needs:
    chosen = frozenset(layer_kinds)
    if group is Group.ACT_TIMES_GRAD:
        return Needs(gradient_layer_kinds=chosen)
    return Needs(layer_kinds=chosen, stream_gradient=group is Group.DIRECT_EFFECT)


def _group_values(done: RowResult, layer_kind: LayerKind, group: Group) -> np.ndarray:
    values = getattr(done.scores[layer_kind], group.value)
    assert values is not None, f"{group} was not computed"
    return values  # type: ignore[no-any-return]


async def top_nodes(
    ctx: RequestContext, spec: InferenceSpec, group: Group, k: int, position: int | None
) -> Ranking:
    check_range("k", k, 0, ctx.settings.max_top_k + 1)
    if position is not None:
        position = check_position("tokenIndex", position, len(spec.tokens))
    if group in (Group.WRITE_NORM, Group.DIRECT_EFFECT):
        ctx.registry.get(spec.model).require_writes_reach_stream(f"topNodes({group.name})")
    layer_kinds = ranked_layer_kinds(ctx, spec)
    if not layer_kinds:
        raise invalid_argument("The model has no nodes of the chosen component types.")
    done = await result(ctx, spec, group_needs(group, layer_kinds))
    blocks = [_group_values(done, lk, group) for lk in layer_kinds]  # each [position, node]
    owners = [
        (lk, i)
        for lk, block in zip(layer_kinds, blocks, strict=True)
        for i in range(block.shape[1])
    ]
    per_position = np.concatenate(blocks, axis=1)  # [position, all nodes]
    values = per_position[position] if position is not None else per_position.sum(axis=0)
    k = min(k, values.shape[0])
    order = np.argsort(-values, kind="stable")

    def ranked(indices: np.ndarray) -> list[RankedNode]:
        out = []
        for i in indices:
            (layer, kind), index = owners[int(i)]
            ref = NodeRef(spec.model, kind, layer, index)
            out.append(RankedNode(ref, float(values[i]), per_position[:, i].tolist()))
        return out

    # A residual dictionary's latents decompose the stream at their hook (everything written
    # before it, again): summed with the writers they would count those writes twice.
    writes = np.array([kind not in spec.residual_kinds for (_, kind), _ in owners], dtype=bool)
    return Ranking(
        top=ranked(order[:k]),
        bottom=ranked(order[::-1][:k]),
        token_sums=per_position[:, writes].sum(axis=1).tolist(),
    )


async def node_scored_tokens(ctx: RequestContext, node: NodeRef, k: int) -> TokenScores:
    check_range("k", k, 1, ctx.settings.max_top_k + 1)
    entry = ctx.registry.get(node.model)
    entry.require_backend()
    return await ctx.services.model_runner.compute(
        entry, "scored_tokens", lambda stop: scored_tokens(entry, node, k)
    )
