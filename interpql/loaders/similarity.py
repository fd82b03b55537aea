"""Nodes that write alike: cosine similarity of write directions (output weights, decoder
columns; attention heads: their whole W_O), across every layer for nodes of the same kind."""

from __future__ import annotations

import torch

from interpql.loaders.analysis import write_directions
from interpql.loaders.registry import ModelEntry
from interpql.specs import NodeRef


def _unit_directions(entry: ModelEntry, kind: str) -> tuple[torch.Tensor, list[NodeRef]]:
    key = ("unit_directions", kind)
    if key not in entry.derived:
        blocks: list[torch.Tensor] = []
        owners: list[NodeRef] = []
        for layer in range(entry.architecture.n_layers):
            count = entry.node_count(kind, layer)
            if count == 0:
                continue
            directions = write_directions(entry, layer, kind).reshape(count, -1)
            blocks.append(directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12))
            owners.extend(NodeRef(entry.name, kind, layer, i) for i in range(count))
        entry.derived[key] = (torch.cat(blocks), owners)
    found: tuple[torch.Tensor, list[NodeRef]] = entry.derived[key]
    return found


def similar_nodes(entry: ModelEntry, node: NodeRef, first: int) -> list[tuple[NodeRef, float]]:
    units, owners = _unit_directions(entry, node.kind)
    position = owners.index(node)
    cosines = units @ units[position]
    cosines[position] = -torch.inf  # not itself
    best = torch.topk(cosines, min(first, len(owners) - 1))
    return [
        (owners[i], float(c))
        for i, c in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    ]
