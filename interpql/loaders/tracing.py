"""Tracing: which activation a backward pass starts from, and where "direct" effects are read.

Without a trace, direct effects are read at the final residual stream. With one, they are read
where the traced node reads the residual stream (its kind's side: attention nodes at resid_pre
of their layer, MLP nodes at resid_mid, residual channels at resid_post), and only writers
upstream of that point have a direct effect at all.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from interpql.backends.base import ForwardRequest, HookPoint, Location, Trace
from interpql.backends.node_kinds import AttentionHeads, Side
from interpql.errors import UnavailableError
from interpql.loaders.analysis import write_directions
from interpql.loaders.registry import ModelEntry
from interpql.specs import AttentionTrace, LossSpec, NodeRef, TraceSpec


def read_point(entry: ModelEntry, node: NodeRef) -> HookPoint:
    return entry.kind(node.kind).reads_at(node.layer)


def writes_reach(entry: ModelEntry, layer: int, kind: str, point: HookPoint) -> bool:
    """Whether what nodes of `kind` in `layer` write is part of the residual stream at `point`."""
    return entry.kind(kind).reaches(layer, point)


def reads_through_a_norm(entry: ModelEntry, node: NodeRef) -> bool:
    """Whether the node reads the stream through a LayerNorm (attention and MLP nodes do;
    residual channels are the stream)."""
    return entry.kind(node.kind).side in (Side.ATTENTION, Side.MLP)


def reads_after(entry: ModelEntry, upstream: NodeRef, downstream: NodeRef) -> bool:
    """Whether `downstream` reads the residual stream after `upstream` has written to it."""
    reads = entry.kind(downstream.kind).reads_at(downstream.layer)
    return entry.kind(upstream.kind).reaches(upstream.layer, reads)


def backend_trace(entry: ModelEntry, request: ForwardRequest, trace: TraceSpec) -> Trace:
    """The backend's trace for `trace` over the rows of `request` (a V trace without a
    downstream node projects each row on its own loss gradient, found by a probe pass)."""
    node = trace.upstream
    kind = entry.kind(node.kind)
    if not kind.attends or trace.attention is None:
        return kind.trace(node.layer, node.index, trace.position)
    assert trace.key_position is not None  # the resolvers require it for heads
    directions = None
    if trace.attention is AttentionTrace.V:
        directions = tuple(tuple(d.tolist()) for d in _value_directions(entry, request, trace))
    assert isinstance(kind, AttentionHeads)
    return kind.trace_attention(
        node.layer, node.index, trace.position, trace.attention, trace.key_position, directions
    )


def _value_directions(entry: ModelEntry, request: ForwardRequest, trace: TraceSpec) -> torch.Tensor:
    """[row, d_head]: W_O[h] @ d, d the downstream node's read direction, or each row's loss
    gradient with respect to the attention output at the query position (one probe pass over
    every row, each with its own interventions)."""
    node, backend = trace.upstream, entry.require_backend()
    w_o = write_directions(entry, node.layer, node.kind)[node.index]  # [d_head, d_model]
    rows = len(request.tokens)
    downstream = trace.downstream
    if downstream is None:
        point = HookPoint(node.layer, Location.ATTN_OUT)
        probe = backend.forward(
            replace(
                request,
                save=frozenset({point}),
                save_grads=frozenset({point}),
                backward=request.backward or LossSpec(),
                trace=None,
            )
        )
        gradients = probe.gradients[point][:, trace.position].float()  # [row, d_model]
        return gradients.to(w_o.device) @ w_o.T
    direction = entry.kind(downstream.kind).read_direction(
        backend, downstream.layer, downstream.index
    )
    if direction is None:
        raise UnavailableError(
            "A downstream node of a V trace must be an MLP neuron or a residual channel, and "
            "a neuron of a gated MLP (act(x . gate) * (x . up)) reads no one direction."
        )
    return (w_o @ direction.to(w_o.device)).expand(rows, -1)
