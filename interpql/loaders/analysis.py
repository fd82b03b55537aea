"""From one forward (and backward) pass to numbers per node and token, on the worker thread.

For every node that writes to the residual stream — MLP neurons, attention heads, autoencoder
latents — and each token, Transformer Debugger's four groups:

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

from interpql.backends.base import AutoencoderInput, Backend, HookPoint, Location
from interpql.loaders.nodes import NodeKind
from interpql.loaders.registry import LATENT_LOCATIONS, ModelEntry

# Which saved location a node kind's per-token activation is read from.
KIND_LOCATION = {
    NodeKind.MLP_NEURON: Location.MLP_POST,
    NodeKind.ATTENTION_HEAD: Location.ATTN_Z,  # reduced to the norm of each head's write
    NodeKind.RESIDUAL_CHANNEL: Location.RESID_POST,
    **LATENT_LOCATIONS,
}


@dataclass(frozen=True)
class NodeScores:
    """[token, node] arrays for the nodes of one kind in one layer."""

    activation: np.ndarray
    write_norm: np.ndarray
    direct_effect: np.ndarray | None = None  # only after a backward pass
    act_times_grad: np.ndarray | None = None


def write_directions(entry: ModelEntry, layer: int, kind: NodeKind) -> torch.Tensor:
    """What one unit of each node's activation adds to the residual stream: [node, d_model]
    (attention heads: W_O, [head, d_head, d_model]). Computed once per model and layer."""
    key = ("write_directions", layer, kind)
    if key not in entry.derived:
        entry.derived[key] = _directions(entry.require_backend(), layer, kind)
    directions: torch.Tensor = entry.derived[key]
    return directions


def _directions(backend: Backend, layer: int, kind: NodeKind) -> torch.Tensor:
    if kind is NodeKind.MLP_NEURON:
        return backend.weight(f"blocks.{layer}.mlp.W_out")
    if kind is NodeKind.ATTENTION_HEAD:
        return backend.weight(f"blocks.{layer}.attn.W_O")
    if kind is NodeKind.RESIDUAL_CHANNEL:
        return torch.eye(backend.architecture.d_model, device=backend.device)
    attached = backend.autoencoders[HookPoint(layer, LATENT_LOCATIONS[kind])]
    ae = attached.autoencoder
    n_latents = ae.n_latents
    # decode(e_j) - decode(0) is latent j's decoder column, in the autoencoder's input space.
    eye = torch.eye(n_latents, device=backend.device)
    decoded = ae.decode(eye) - ae.decode(torch.zeros(1, n_latents, device=backend.device))
    if attached.input is AutoencoderInput.MLP_POST_ACT:
        return decoded.float() @ backend.weight(f"blocks.{layer}.mlp.W_out")
    return decoded.float()


def node_scores(
    entry: ModelEntry,
    layer: int,
    kind: NodeKind,
    act: torch.Tensor,
    grad: torch.Tensor | None,
    final_grad: torch.Tensor | None,
) -> NodeScores:
    """`act`/`grad`: one prompt's saved activation and its gradient, [token, ...];
    `final_grad`: the loss's gradient at the last layer's residual output, [token, d_model]."""
    directions = write_directions(entry, layer, kind)
    act = act.float()
    if kind is NodeKind.ATTENTION_HEAD:
        write = torch.einsum("thd,hdm->thm", act, directions)  # [token, head, d_model]
        activation = write_norm = write.norm(dim=-1)
        direct = None if final_grad is None else torch.einsum("thm,tm->th", write, final_grad)
        times_grad = None if grad is None else (act * grad.float()).sum(-1)
    else:
        activation = act
        write_norm = act.abs() * directions.norm(dim=-1)
        direct = None if final_grad is None else act * (final_grad @ directions.T)
        times_grad = None if grad is None else act * grad.float()
    return NodeScores(
        activation=_numpy(activation),
        write_norm=_numpy(write_norm),
        direct_effect=None if direct is None else _numpy(direct),
        act_times_grad=None if times_grad is None else _numpy(times_grad),
    )


def token_pair_attribution(
    entry: ModelEntry, layer: int, probs: torch.Tensor, values: torch.Tensor
) -> np.ndarray:
    """How much of each head's write at a query token came from each key token:
    probability(q, k) x norm(v_k W_O); probs [query, head, key], values [key, head, d_head]
    -> [query, head, key]."""
    w_o = write_directions(entry, layer, NodeKind.ATTENTION_HEAD)
    value_writes = torch.einsum("khd,hdm->khm", values.float(), w_o).norm(dim=-1)  # [key, head]
    return _numpy(probs.float() * value_writes.T[None, :, :])


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
