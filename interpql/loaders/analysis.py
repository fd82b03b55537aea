"""From one forward (and backward) pass to numbers per node and position, on the worker thread.

For every node that writes to the residual stream, and each position, Transformer Debugger's
four groups, as its kind computes them (backends/node_kinds.py):

    ACTIVATION      the node's activation (an attention head's: the norm of its write)
    WRITE_NORM      the norm of what the node writes into the residual stream
    DIRECT_EFFECT   that write projected on the loss's gradient at the final residual stream
    ACT_TIMES_GRAD  activation x gradient of the loss: a first-order estimate of total effect

Residual channels are treated as writers of their own unit direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from interpql.backends.node_kinds import AttentionHeads
from interpql.loaders.registry import ModelEntry


@dataclass(frozen=True)
class NodeScores:
    """[position, node] arrays for the nodes of one kind in one layer."""

    activation: np.ndarray
    write_norm: np.ndarray
    direct_effect: np.ndarray | None = None  # only after a backward pass
    act_times_grad: np.ndarray | None = None


def write_directions(entry: ModelEntry, layer: int, kind: str) -> torch.Tensor:
    """What one unit of each node's activation adds to the residual stream (see the kind's
    `directions`). Computed once per model, layer and kind."""
    key = ("write_directions", layer, kind)
    if key not in entry.derived:
        entry.derived[key] = entry.kind(kind).directions(entry.require_backend(), layer)
    directions: torch.Tensor = entry.derived[key]
    return directions


def node_scores(
    entry: ModelEntry,
    layer: int,
    kind: str,
    act: torch.Tensor,
    grad: torch.Tensor | None,
    stream_grad: torch.Tensor | None,
) -> NodeScores:
    """`act`/`grad`: one prompt's saved activation and its gradient, [position, ...];
    `stream_grad`: the gradient where direct effects are read, [position, d_model]."""
    values = entry.kind(kind).values(act, write_directions(entry, layer, kind), grad, stream_grad)
    return NodeScores(
        activation=_numpy(values.activation),
        write_norm=_numpy(values.write_norm),
        direct_effect=None if values.direct_effect is None else _numpy(values.direct_effect),
        act_times_grad=None if values.act_times_grad is None else _numpy(values.act_times_grad),
    )


def token_pair_attribution(
    entry: ModelEntry, layer: int, probs: torch.Tensor, values: torch.Tensor
) -> np.ndarray:
    """How much of each head's write at a query position came from each key position:
    probability(q, k) x norm(v_k W_O); probs [query, head, key], values [key, head, d_head]
    -> [query, head, key]."""
    w_o = write_directions(entry, layer, AttentionHeads.name)
    value_writes = torch.einsum("khd,hdm->khm", values.float(), w_o).norm(dim=-1)  # [key, head]
    return _numpy(probs.float() * value_writes.T[None, :, :])


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
