"""From one forward (and backward) pass to numbers per node and position, on the worker thread.

For every node that writes to the residual stream, and each position, Transformer Debugger's
four groups, as its kind computes them (backends/node_kinds.py):

    ACTIVATION      the node's activation (an attention head's: its largest attention
                    probability at the query, its strongest pair)
    WRITE_NORM      the norm of what the node writes into the residual stream
    DIRECT_EFFECT   that write projected on the loss's gradient at the final residual stream
    ACT_TIMES_GRAD  activation x gradient of the loss: a first-order estimate of total effect

Residual channels are treated as writers of their own unit direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from interpql.backends.node_kinds import AttentionHeads, Saved, projected
from interpql.loaders.registry import ModelEntry


@dataclass(frozen=True)
class NodeScores:
    """[position, node] arrays for the nodes of one kind in one layer."""

    activation: np.ndarray
    write_norm: np.ndarray
    direct_effect: np.ndarray | None = None  # only after a backward pass
    act_times_grad: np.ndarray | None = None
    # The node's one number per token (its kind's `per_token_value`): activations on a prompt.
    per_token: np.ndarray | None = None


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
    saved: Saved,
) -> NodeScores:
    """`act`/`grad`: one prompt's saved activation and its gradient, [position, ...];
    `stream_grad`: the gradient where direct effects are read, [position, d_model]; `saved`:
    the kind's extra locations in that layer."""
    directions = write_directions(entry, layer, kind)
    key = ("write_norms", layer, kind)
    if key not in entry.derived:
        entry.derived[key] = directions.norm(dim=-1)
    node_kind = entry.kind(kind)
    values = node_kind.values(
        act,
        directions,
        grad,
        stream_grad,
        saved,
        norms=entry.derived[key],
        write_scale=node_kind.write_scale(entry.require_backend(), layer, saved),
    )
    activation, write_norm = _numpy(values.activation), _numpy(values.write_norm)
    return NodeScores(
        activation=activation,
        write_norm=write_norm,
        direct_effect=None if values.direct_effect is None else _numpy(values.direct_effect),
        act_times_grad=None if values.act_times_grad is None else _numpy(values.act_times_grad),
        per_token={"activation": activation, "write_norm": write_norm}[
            entry.kind(kind).per_token_value
        ],
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


def bias_effects(
    entry: ModelEntry, layer: int, kind: str, stream_grad: torch.Tensor, saved: Saved
) -> dict[str, np.ndarray]:
    """The direct effect, per position, of what the kind's side of `layer` writes besides its
    nodes (output biases, a dictionary's bias and error): [position] each, by name."""
    writes = entry.kind(kind).bias_writes(entry.require_backend(), layer, saved)
    return {
        name: _numpy((write.to(stream_grad.device).float() * stream_grad).sum(-1))
        for name, write in writes.items()
    }


def head_pair_scores(
    entry: ModelEntry,
    layer: int,
    probs: torch.Tensor,
    values: torch.Tensor,
    z_grad: torch.Tensor,
    stream_grad: torch.Tensor,
) -> NodeScores:
    """Transformer Debugger's values of each (query, key, head) element, [query, key, head]:
    the attention probability p; p x |v_k W_O[h]| (v with its bias, without the output
    bias); p x (v_k W_O[h]) . g_q, g the gradient at the stream's read point; and p x (v_k .
    dL/dz_q[h]), the probability times its gradient. probs [query, head, key], values [key,
    head, d_head], z_grad [query, head, d_head], stream_grad [query, d_model]."""
    w_o = write_directions(entry, layer, AttentionHeads.name)  # [head, d_head, d_model]
    p = probs.float().permute(0, 2, 1)  # [query, key, head]
    v = values.float()
    writes = torch.einsum("khd,hdm->khm", v, w_o)  # [key, head, d_model]
    return NodeScores(
        activation=_numpy(p),
        write_norm=_numpy(p * writes.norm(dim=-1)[None]),
        direct_effect=_numpy(
            p * projected(stream_grad.float(), writes.flatten(0, 1)).view(p.shape)
        ),
        act_times_grad=_numpy(p * torch.einsum("khd,qhd->qkh", v, z_grad.float())),
    )
