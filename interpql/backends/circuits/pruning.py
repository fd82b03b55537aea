"""Influence, pruning and the graph's scores, by circuit tracing's definitions.

With the adjacency's absolute values normalised so each target's incoming edges sum to 1 (Â),
and w the logit nodes' probabilities, a node's *influence* is its total share of the logits
through every path: the sum over k >= 1 of (w Â^k) at the node. The graph is layered (edges
only go up), so the series ends after at most layers + 2 terms.

Pruning keeps the nodes of highest influence that together hold `node_threshold` of all
nodes' influence (tokens and logits always kept), then among the edges between them the ones
of highest edge influence (Â'[target, source] times the target's influence plus its logit
weight, on the node-pruned graph) holding `edge_threshold` of it, then drops latents and
errors left with no kept edge out, and latents with no kept edge in, until nothing changes.

The *replacement score* is the embeddings' share of the influence that embeddings and errors
hold together; the *completeness score* the influence-weighted share of nodes' inputs that does
not come from error nodes.

Matrices here are [target row, source column] with rows for the latents then the logits and
columns for the latents, errors and embeddings (attribution.py); each node's index in the
whole graph is [latents, errors, embeddings, logits].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ROWS_PER_BLOCK = 4096


def _normalized(block: torch.Tensor) -> torch.Tensor:
    absolute = block.abs()
    return absolute / absolute.sum(-1, keepdim=True).clamp(min=1e-30)


def column_influence(
    matrix: torch.Tensor, row_nodes: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """Each column node's influence [columns]: `matrix` [rows, columns] raw edges, its first
    len(row_nodes) rows the targets at those columns (latents), the rest logits whose weights
    are `row_weights`' tail. Streams row blocks: no normalised copy of the matrix is held."""
    n_rows, n_columns = matrix.shape
    weights = row_weights.to(torch.float64)
    total = torch.zeros(n_columns, dtype=torch.float64)
    for _ in range(n_rows + 2):
        if not bool(weights.any()):
            break
        reached = torch.zeros(n_columns, dtype=torch.float64)
        for start in range(0, n_rows, _ROWS_PER_BLOCK):
            part = weights[start : start + _ROWS_PER_BLOCK]
            if bool(part.any()):
                block = _normalized(matrix[start : start + _ROWS_PER_BLOCK].to(torch.float64))
                reached += part @ block
        total += reached
        weights = torch.zeros(n_rows, dtype=torch.float64)
        weights[: len(row_nodes)] = reached[row_nodes]
    return total


def threshold_of(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score among the highest scores that together hold `fraction` of the sum."""
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum()
    if float(total) <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / total
    at = min(int((cumulative < fraction).sum()), len(ordered) - 1)
    return float(ordered[at])


@dataclass
class Layout:
    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def n_sources(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens

    @property
    def n_nodes(self) -> int:
        return self.n_sources + self.n_logits

    def row_nodes(self) -> torch.Tensor:
        """Each matrix row's node index."""
        return torch.cat(
            [torch.arange(self.n_features), torch.arange(self.n_logits) + self.n_sources]
        )


@dataclass
class Pruned:
    influence: torch.Tensor  # [nodes]: on the whole graph (0 for logits)
    node_mask: torch.Tensor  # [nodes] bool
    edges: torch.Tensor  # [n, 2] long (source node, target node)
    weights: torch.Tensor  # [n]: the raw edge weights
    node_score_threshold: float
    edge_score_threshold: float
    node_influence_kept: float  # share of all nodes' influence held by the kept nodes
    edge_influence_kept: float  # share of the node-pruned graph's edge influence kept


def node_influence(
    matrix: torch.Tensor, layout: Layout, logit_weights: torch.Tensor
) -> torch.Tensor:
    """[nodes] influence of every node on the logits (0 for the logits themselves)."""
    weights = torch.cat([torch.zeros(layout.n_features), logit_weights.double()])
    columns = column_influence(matrix, torch.arange(layout.n_features), weights)
    return torch.cat([columns, torch.zeros(layout.n_logits, dtype=torch.float64)])


def prune(
    matrix: torch.Tensor,
    layout: Layout,
    logit_weights: torch.Tensor,
    node_threshold: float,
    edge_threshold: float,
) -> Pruned:
    influence = node_influence(matrix, layout, logit_weights)
    node_cut = threshold_of(influence, node_threshold)
    node_mask = influence >= node_cut
    node_mask[layout.n_features + layout.n_errors :] = True  # embeddings and logits
    total = float(influence.sum())
    node_kept = float(influence[node_mask].sum()) / total if total > 0 else 1.0
    # The node-pruned graph, as a submatrix of kept rows and columns.
    row_nodes = layout.row_nodes()
    kept_rows = node_mask[row_nodes].nonzero(as_tuple=True)[0]
    kept_columns = node_mask[: layout.n_sources].nonzero(as_tuple=True)[0]
    sub = matrix[kept_rows][:, kept_columns].double()
    sub_rows = row_nodes[kept_rows]
    # Row nodes among the kept columns, for the influence on the node-pruned graph.
    column_of = torch.full((layout.n_nodes,), -1, dtype=torch.long)
    column_of[kept_columns] = torch.arange(len(kept_columns))
    n_feature_rows = int((sub_rows < layout.n_features).sum())
    weights = torch.zeros(len(kept_rows), dtype=torch.float64)
    weights[n_feature_rows:] = logit_weights.double()
    sub_influence = column_influence(sub, column_of[sub_rows[:n_feature_rows]], weights)
    row_influence = (
        torch.cat(
            [
                sub_influence[column_of[sub_rows[:n_feature_rows]]],
                torch.zeros(len(kept_rows) - n_feature_rows, dtype=torch.float64),
            ]
        )
        + weights
    )
    scores = _normalized(sub) * row_influence[:, None]
    edge_cut = threshold_of(scores, edge_threshold)
    edge_mask = (scores >= edge_cut) & (sub != 0)
    score_total = float(scores.sum())
    edge_kept = float(scores[edge_mask].sum()) / score_total if score_total > 0 else 1.0
    node_mask, edge_mask = _connected(node_mask, edge_mask, sub_rows, kept_columns, layout)
    rows, columns = edge_mask.nonzero(as_tuple=True)
    edges = torch.stack([kept_columns[columns], sub_rows[rows]], dim=1)
    return Pruned(
        influence=influence,
        node_mask=node_mask,
        edges=edges,
        weights=sub[rows, columns].float(),
        node_score_threshold=node_cut,
        edge_score_threshold=edge_cut,
        node_influence_kept=node_kept,
        edge_influence_kept=edge_kept,
    )


def _connected(
    node_mask: torch.Tensor,
    edge_mask: torch.Tensor,
    sub_rows: torch.Tensor,
    kept_columns: torch.Tensor,
    layout: Layout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops latents and errors with no kept edge out and latents with no kept edge in (and
    their edges), until nothing changes."""
    node_mask = node_mask.clone()
    inner = layout.n_features + layout.n_errors
    while True:
        edge_mask = edge_mask & node_mask[sub_rows][:, None] & node_mask[kept_columns][None, :]
        has_out = torch.zeros_like(node_mask)
        has_out[kept_columns[edge_mask.any(0)]] = True
        has_in = torch.zeros_like(node_mask)
        has_in[sub_rows[edge_mask.any(1)]] = True
        updated = node_mask.clone()
        updated[:inner] &= has_out[:inner]
        updated[: layout.n_features] &= has_in[: layout.n_features]
        if torch.equal(updated, node_mask):
            return node_mask, edge_mask
        node_mask = updated


def scores(
    matrix: torch.Tensor, layout: Layout, logit_weights: torch.Tensor, influence: torch.Tensor
) -> tuple[float, float]:
    """(replacement score, completeness score) of the graph `matrix`."""
    errors = slice(layout.n_features, layout.n_features + layout.n_errors)
    tokens = slice(layout.n_features + layout.n_errors, layout.n_sources)
    token_influence = float(influence[tokens].sum())
    error_influence = float(influence[errors].sum())
    both = token_influence + error_influence
    replacement = token_influence / both if both > 0 else 1.0
    # Every node counts, weighted by its influence plus its logit weight; nodes with no inputs
    # (errors, embeddings) have no error share.
    weights = influence.clone()
    weights[layout.n_sources :] += logit_weights.double()
    error_share = torch.zeros(layout.n_nodes, dtype=torch.float64)
    row_nodes = layout.row_nodes()
    for start in range(0, matrix.shape[0], _ROWS_PER_BLOCK):
        block = _normalized(matrix[start : start + _ROWS_PER_BLOCK].double())
        error_share[row_nodes[start : start + _ROWS_PER_BLOCK]] = block[:, errors].sum(-1)
    total = float(weights.sum())
    completeness = float(((1 - error_share) * weights).sum()) / total if total > 0 else 1.0
    return replacement, completeness
