"""Steering: adding a node's unit write direction to the residual stream where the node writes,
in `infer` passes and at every step of a generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interpql.backends.base import Addition, HookPoint
from interpql.backends.node_kinds import AttentionHeads
from interpql.loaders.analysis import write_directions
from interpql.loaders.registry import ModelEntry
from interpql.specs import NodeRef, Steering


def steering_direction(entry: ModelEntry, node: NodeRef) -> torch.Tensor:
    """A unit vector in the residual stream. An attention head writes no fixed direction; its
    steering direction is the one it can write most strongly (W_O's top singular vector)."""
    directions = write_directions(entry, node.layer, node.kind)
    direction: torch.Tensor
    if isinstance(entry.kind(node.kind), AttentionHeads):
        direction = torch.linalg.svd(directions[node.index], full_matrices=False).Vh[0]
    else:
        direction = directions[node.index]
    unit: torch.Tensor = direction / direction.norm().clamp(min=1e-12)
    return unit


def steering_additions(
    entry: ModelEntry, steering: Sequence[Steering], row: int | None
) -> list[Addition]:
    """The additions of `steering` to batch row `row` (None: every row), at the point each
    node writes to."""
    additions = []
    for steer in steering:
        vector = tuple((steer.strength * steering_direction(entry, steer.node)).tolist())
        point = HookPoint(steer.node.layer, entry.kind(steer.node.kind).side.writes)
        for position in steer.positions if steer.positions is not None else (None,):
            additions.append(Addition(point=point, vector=vector, position=position, row=row))
    return additions
