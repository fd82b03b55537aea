"""Tracing: which activation a backward pass starts from, and where "direct" effects are read.

Without a trace, direct effects are read at the final residual stream. With one, they are read
where the traced node reads the residual stream (attention nodes: resid_pre of their layer; MLP
nodes: resid_mid; residual channels: resid_post), and only writers upstream of that point have
a direct effect at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interpql.backends.base import (
    AttentionTrace,
    ForwardRequest,
    HookPoint,
    Location,
    LossSpec,
    Trace,
)
from interpql.errors import UnavailableError, invalid_argument
from interpql.loaders.analysis import KIND_LOCATION, write_directions
from interpql.loaders.nodes import NodeKind, NodeRef
from interpql.loaders.registry import ModelEntry


@dataclass(frozen=True)
class TraceRequest:
    """Gradients of an upstream node's activation instead of the loss (see backends' Trace).

    Attention heads are traced through Q, K, QK (their score between `token` and
    `key_token`) or V (their write from `key_token` at `token`, projected on `downstream`'s
    read direction, or on the loss's gradient when there is no downstream node).
    """

    upstream: NodeRef
    token: int
    attention: AttentionTrace | None = None
    key_token: int | None = None
    downstream: NodeRef | None = None


_ATTENTION_KINDS = (NodeKind.ATTENTION_HEAD, NodeKind.ATTENTION_AUTOENCODER_LATENT)
_MLP_KINDS = (NodeKind.MLP_NEURON, NodeKind.MLP_AUTOENCODER_LATENT)
# Order of the residual stream's points within a layer.
_ORDER = {Location.RESID_PRE: 0, Location.RESID_MID: 1, Location.RESID_POST: 2}


def read_point(node: NodeRef) -> HookPoint:
    if node.kind in _ATTENTION_KINDS:
        return HookPoint(node.layer, Location.RESID_PRE)
    if node.kind in _MLP_KINDS:
        return HookPoint(node.layer, Location.RESID_MID)
    return HookPoint(node.layer, Location.RESID_POST)


def writes_reach(layer: int, kind: NodeKind, point: HookPoint) -> bool:
    """Whether what nodes of `kind` in `layer` write is part of the residual stream at `point`."""
    if kind is NodeKind.RESIDUAL_CHANNEL:
        return (layer, 2) <= (point.layer, _ORDER[point.location])
    written_at = 1 if kind in _ATTENTION_KINDS else 2  # attention before resid_mid, MLP after
    return (layer, written_at) <= (point.layer, _ORDER[point.location])


def backend_trace(entry: ModelEntry, request: ForwardRequest, trace: TraceRequest) -> Trace:
    node = trace.upstream
    if node.kind is NodeKind.ATTENTION_HEAD:
        if trace.attention is None or trace.key_token is None:
            raise invalid_argument(
                "Tracing an attention head needs attentionTraceType (Q, K, QK or V) and "
                "keyTokenIndex."
            )
        if trace.attention is not AttentionTrace.V:
            return Trace(
                HookPoint(node.layer, Location.ATTN_Q),
                trace.token,
                (node.index,),
                trace.attention,
                trace.key_token,
            )
        direction = _value_direction(entry, request, trace)
        return Trace(
            HookPoint(node.layer, Location.ATTN_V),
            trace.token,
            (node.index,),
            AttentionTrace.V,
            trace.key_token,
            tuple(direction.tolist()),
        )
    if trace.attention is not None:
        raise invalid_argument("attentionTraceType applies to attention heads only.")
    return Trace(HookPoint(node.layer, KIND_LOCATION[node.kind]), trace.token, (node.index,))


def _value_direction(
    entry: ModelEntry, request: ForwardRequest, trace: TraceRequest
) -> torch.Tensor:
    """W_O[h] @ d: d the downstream node's read direction, or the loss's gradient w.r.t. the
    attention output at the query token (one extra backward pass to find it)."""
    node, backend = trace.upstream, entry.require_backend()
    w_o = write_directions(entry, node.layer, NodeKind.ATTENTION_HEAD)[
        node.index
    ]  # [d_head, d_model]
    downstream = trace.downstream
    if downstream is None:
        point = HookPoint(node.layer, Location.ATTN_OUT)
        probe = backend.run(
            ForwardRequest(
                tokens=request.tokens[:1],
                save=frozenset({point}),
                interventions=request.interventions,
                backward=request.backward or LossSpec(),
                save_grads=frozenset({point}),
                autoencoder_error_term=request.autoencoder_error_term,
            )
        )
        direction = probe.gradients[point][0, trace.token].float()
    elif downstream.kind is NodeKind.MLP_NEURON:
        direction = backend.weight(f"blocks.{downstream.layer}.mlp.W_in")[:, downstream.index]
    elif downstream.kind is NodeKind.RESIDUAL_CHANNEL:
        direction = torch.zeros(entry.architecture.d_model, device=backend.device)
        direction[downstream.index] = 1.0
    else:
        raise UnavailableError(
            "A downstream node of a V trace must be an MLP neuron or a residual channel."
        )
    return w_o @ direction.to(w_o.device)
