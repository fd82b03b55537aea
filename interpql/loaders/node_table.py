"""Transformer Debugger's node table of one pass: elements ranked per kind, in four groups.

An element is what Transformer Debugger ranks: (token, node) for the embedding, MLP neurons and
dictionary latents, (query token, key token, head) for attention heads. For each group, in its
order (WRITE_NORM, ACT_TIMES_GRAD, DIRECT_EFFECT, ACTIVATION), and each kind of the table (the
embedding, the MLP kind, the attention kind), the table takes the k highest and the k lowest
elements of that kind over every layer and token: kinds are never ranked against each other.
Its rows are the union of those lists in that order (a group's highest, then its lowest, each
sorted highest first, duplicates dropped), each row with its value in all four groups.

The values are the element-level ones of Transformer Debugger: a head pair's ACTIVATION is its
attention probability p, its WRITE_NORM |p v_k W_O|, its DIRECT_EFFECT p (v_k W_O) . g_q and its
ACT_TIMES_GRAD p dL/dp; a neuron's WRITE_NORM is signed (post x |W_out row|). Where it differs:
masked (future) key positions are not elements (their probability is 0 by construction, and
Transformer Debugger's lowest ACTIVATION and WRITE_NORM pairs are such zeros, picked by chance),
and ties are broken by element order (layer, token, index) where torch.topk leaves it open.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from interpql.backends.base import HookPoint, Location
from interpql.backends.node_kinds import AttentionHeads, MlpNeurons, TokenEmbeddings
from interpql.loaders.analysis import NodeScores
from interpql.loaders.pass_results import LayerKind, Needs, RowResult
from interpql.loaders.registry import ModelEntry

# Transformer Debugger's order of the groups, which orders the rows.
GROUPS = ("write_norm", "act_times_grad", "direct_effect", "activation")


@dataclass(frozen=True)
class Element:
    layer: int
    kind: str
    position: int  # a head pair's query token
    index: int
    key_position: int | None = None  # a head pair's key token


@dataclass(frozen=True)
class TableRow:
    element: Element
    values: dict[str, float]  # by group


@dataclass(frozen=True)
class TokenSums:
    """ACT_TIMES_GRAD per token, summed over every layer: Transformer Debugger's token display
    (always of neurons and heads, whichever kinds the table ranks)."""

    embedding: list[float]
    mlp: list[float]  # over every MLP neuron at the token
    attention_from: list[float]  # over every head and key, at the token as query
    attention_to: list[float]  # over every head and query, at the token as key


@dataclass(frozen=True)
class NodeTable:
    rows: list[TableRow]
    token_sums: TokenSums


def table_needs(entry: ModelEntry, layer_kinds: Iterable[LayerKind]) -> Needs:
    """What the table of `layer_kinds` (see resolvers/analysis) needs of the pass: every
    group's values of its kinds, head pairs and neurons in every layer for the token display,
    and what the rows' scored and attended-to tokens read (resolvers/node_table.py)."""
    layers = range(entry.architecture.n_layers)
    ranked = set(layer_kinds)
    neurons = {(layer, MlpNeurons.name) for layer in layers}
    per_node = {lk for lk in ranked if lk[1] != AttentionHeads.name}
    mlp_layers = {
        layer for layer, kind in ranked if entry.kind(kind).side.reads is Location.RESID_MID
    }
    attention_dictionaries = {
        layer
        for layer, kind in ranked
        if kind != AttentionHeads.name and entry.kind(kind).side.writes is Location.ATTN_OUT
    }
    return Needs(
        gradient_layer_kinds=frozenset(per_node | neurons),
        stream_gradient=True,
        pair_layers=frozenset(layers),
        pattern_layers=frozenset(attention_dictionaries),
        norm_scales=frozenset(HookPoint(layer, Location.RESID_MID) for layer in mlp_layers),
    )


@dataclass(frozen=True)
class _Block:
    """One (layer, kind)'s elements, flattened: each group's values, and where each is (a
    flat index's element: (position, node) of [position, node], or a head pair's (query, key,
    head) of [causal pair, head], the pairs `queries[i], keys[i]`)."""

    layer: int
    kind: str
    values: dict[str, torch.Tensor]  # group -> [element]
    width: int  # nodes (heads) per position (pair)
    queries: np.ndarray | None = None
    keys: np.ndarray | None = None

    def element(self, i: int) -> Element:
        outer, index = divmod(i, self.width)
        if self.queries is None or self.keys is None:
            return Element(self.layer, self.kind, outer, index)
        query, key = int(self.queries[outer]), int(self.keys[outer])
        return Element(self.layer, self.kind, query, index, key)


def _node_block(layer: int, kind: str, scores: NodeScores, signed_write_norm: bool) -> _Block:
    values = {group: torch.from_numpy(getattr(scores, group)).flatten() for group in GROUPS}
    if signed_write_norm:  # Transformer Debugger's neuron write norm: post x |W_out row|
        values["write_norm"] = values["write_norm"] * torch.sign(values["activation"])
    return _Block(layer, kind, values, scores.activation.shape[1])


def _pair_block(layer: int, scores: NodeScores) -> _Block:
    n_tok, _, n_heads = scores.activation.shape  # [query, key, head]
    queries, keys = np.tril_indices(n_tok)  # causal pairs only: key <= query
    values = {
        group: torch.from_numpy(getattr(scores, group)[queries, keys]).flatten() for group in GROUPS
    }
    return _Block(layer, AttentionHeads.name, values, n_heads, queries, keys)


def _extremes(values: torch.Tensor, k: int, largest: bool) -> list[torch.Tensor]:
    """For each row of `values` [group, element], the indices of its k largest (or smallest)
    values, in that order, ties by index (NaN never). One batched topk of k + 1 decides a row
    unless its k-th value is tied beyond the k-th place."""
    k = min(k, values.shape[1])
    if k == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(values.shape[0])]
    found_values, found = _top(values, min(k + 1, values.shape[1]), largest)
    out = []
    for row in range(values.shape[0]):
        top = found_values[row]
        if (top.numel() > k and bool(top[k - 1] == top[k])) or bool(torch.isnan(top).any()):
            out.append(_extremes_with_ties(values[row], k, largest))
            continue
        chosen, chosen_values = found[row, :k].numpy(), top[:k].numpy()
        order = np.lexsort((chosen, -chosen_values if largest else chosen_values))
        out.append(torch.from_numpy(chosen[order]))
    return out


def _top(values: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk along the last axis of [row, element], faster for long rows: the top k of
    each of 64 slices of a row (one batched, threaded call), then of those; a row's top k is
    among its slices' top k."""
    rows, n = values.shape
    slices = math.gcd(n, 64)
    if n < 1 << 16 or slices < 64 or n // slices < k:
        found = torch.topk(values, k, dim=1, largest=largest)
        return found.values, found.indices
    width = n // slices
    per_slice = torch.topk(values.view(rows, slices, width), k, dim=2, largest=largest)
    offsets = torch.arange(slices)[None, :, None] * width
    candidates = (per_slice.indices + offsets).view(rows, -1)
    overall = torch.topk(per_slice.values.view(rows, -1), k, dim=1, largest=largest)
    return overall.values, candidates.gather(1, overall.indices)


def _extremes_with_ties(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """`_extremes` of one row the long way: every element beyond the k-th value, then the
    first of those equal to it."""
    values = torch.nan_to_num(values, nan=float("-inf") if largest else float("inf"))
    edge = _top(values[None], k, largest)[0][0, -1]
    beyond = (values > edge) if largest else (values < edge)
    chosen = beyond.nonzero().flatten()
    tied = (values == edge).nonzero().flatten()[: k - chosen.numel()]
    chosen = torch.cat([chosen, tied]).sort().values
    order = torch.sort(values[chosen], descending=largest, stable=True).indices
    return chosen[order]


def build_node_table(
    entry: ModelEntry, done: RowResult, layer_kinds: list[LayerKind], k: int
) -> NodeTable:
    """`layer_kinds`: what the table ranks (head kinds by pair)."""
    by_kind: dict[str, list[_Block]] = {}
    for layer, kind in layer_kinds:
        if kind == AttentionHeads.name:
            block = _pair_block(layer, done.pairs[layer])
        else:
            signed = entry.kind(kind).signed_table_write_norm
            block = _node_block(layer, kind, done.scores[(layer, kind)], signed)
        by_kind.setdefault(kind, []).append(block)
    # picked[(group, largest)]: (value, block, index in block) of every kind's extremes.
    picked: dict[tuple[str, bool], list[tuple[float, _Block, int]]] = {
        (group, largest): [] for group in GROUPS for largest in (True, False)
    }
    for blocks in by_kind.values():
        stacked = torch.stack([torch.cat([b.values[g] for b in blocks]) for g in GROUPS])
        starts = np.cumsum([0] + [b.values[GROUPS[0]].numel() for b in blocks])
        for largest in (True, False):
            for g, indices in enumerate(_extremes(stacked, k, largest)):
                for i in indices.tolist():
                    b = int(np.searchsorted(starts, i, side="right")) - 1
                    entry_ = (float(stacked[g, i]), blocks[b], i - int(starts[b]))
                    picked[(GROUPS[g], largest)].append(entry_)
    rows: dict[Element, TableRow] = {}
    for group in GROUPS:
        for largest in (True, False):
            # Every list is shown highest first, the lowest as well (Transformer Debugger's).
            for _, block, i in sorted(picked[(group, largest)], key=lambda p: -p[0]):
                element = block.element(i)
                if element not in rows:
                    values = {g: float(block.values[g][i]) for g in GROUPS}
                    rows[element] = TableRow(element, values)
    return NodeTable(list(rows.values()), token_sums(done))


def token_sums(done: RowResult) -> TokenSums:
    n_tok = len(done.spec.tokens)
    embedding = np.zeros(n_tok)
    mlp = np.zeros(n_tok)
    pairs = np.zeros((n_tok, n_tok))
    for (_, kind), scores in done.scores.items():
        if scores.act_times_grad is None:
            continue
        if kind == MlpNeurons.name:
            mlp += scores.act_times_grad.sum(axis=1)
        elif kind == TokenEmbeddings.name:
            embedding += scores.act_times_grad[:, 0]
    for scores in done.pairs.values():
        assert scores.act_times_grad is not None
        pairs += scores.act_times_grad.sum(axis=2)  # [query, key]
    return TokenSums(
        embedding=embedding.tolist(),
        mlp=mlp.tolist(),
        attention_from=pairs.sum(axis=1).tolist(),
        attention_to=pairs.sum(axis=0).tolist(),
    )
