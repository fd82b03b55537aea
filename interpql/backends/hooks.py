"""What every backend does at a hook point: intervene, save, keep gradients.

A backend creates one `HookSession` per `ForwardRequest` and passes every activation through
`process`. Backends differ only in where they call it from (our own forward code, or
TransformerLens hook functions).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from interpql.backends.base import (
    Addition,
    AttachedAutoencoder,
    ForwardRequest,
    HookPoint,
    Intervention,
    Location,
    Trace,
)
from interpql.specs import AttentionTrace


class HookSession:
    def __init__(
        self,
        request: ForwardRequest,
        autoencoders: Mapping[HookPoint, AttachedAutoencoder] | None = None,
    ) -> None:
        self._save = request.save | request.save_grads
        backward = request.backward is not None or request.trace is not None
        self._keep_grads = request.save_grads if backward else frozenset()
        self._interventions: dict[HookPoint, list[Intervention]] = defaultdict(list)
        for intervention in request.interventions:
            self._interventions[intervention.point].append(intervention)
        self._additions: dict[HookPoint, list[Addition]] = defaultdict(list)
        for addition in request.additions:
            self._additions[addition.point].append(addition)
        self._error_term = request.autoencoder_error_term
        self._frozen_norms = request.frozen_norm_inputs
        self._trace = request.trace
        self._trace_points = _trace_points(request.trace)
        self._trace_value: torch.Tensor | None = None
        self._queries: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        # Only autoencoders whose latents someone asked about are spliced in.
        self._splices = {
            attached.input_point: attached
            for point, attached in (autoencoders or {}).items()
            if self._touches(point)
        }
        self.activations: dict[HookPoint, torch.Tensor] = {}

    def _touches(self, point: HookPoint) -> bool:
        return (
            point in self._save
            or point in self._interventions
            or point in self._additions
            or point in self._trace_points
        )

    def freezes_norm(self, reads: HookPoint) -> bool:
        """Whether the LayerNorm reading the stream at `reads` holds its scale (see
        ForwardRequest.frozen_norm_inputs)."""
        return reads in self._frozen_norms

    def wants(self, point: HookPoint) -> bool:
        """True when `process` would do anything at this point (backends may skip it if not)."""
        return self._touches(point) or point in self._splices or point in self._trace_points

    def process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        """Takes a token-major activation [row, position, ...]; returns the one to use
        downstream."""
        act = self._apply(point, act)
        attached = self._splices.get(point)
        return act if attached is None else self._splice(attached, act)

    def traced_value(self) -> torch.Tensor:
        if self._trace_value is None:
            raise RuntimeError("the forward pass never reached the traced location")
        return self._trace_value

    def _follow_trace(self, point: HookPoint, act: torch.Tensor) -> None:
        trace = self._trace
        assert trace is not None
        head = trace.index[0] if trace.index else 0
        if trace.attention is None:
            index: tuple[slice | int, ...] = (slice(None), trace.position, *trace.index)
            self._trace_value = act[index].sum()
        elif point.location is Location.ATTN_Q:
            self._queries = act
        elif point.location is Location.ATTN_K:
            q = self._queries[:, trace.position, head]  # type: ignore[index]
            k = act[:, trace.key_position, head]
            if trace.attention is AttentionTrace.Q:
                k = k.detach()
            elif trace.attention is AttentionTrace.K:
                q = q.detach()
            if trace.attention is not AttentionTrace.V:
                self._trace_value = (q * k).sum() / q.shape[-1] ** 0.5
        elif point.location is Location.ATTN_V:
            # Each row's own direction: rows differ in what they ablate, so in their gradient.
            directions = torch.tensor(
                trace.value_directions or (), dtype=act.dtype, device=act.device
            )  # [row, d_head]
            self._values = (act[:, trace.key_position, head] * directions).sum(-1)  # [row]
        elif point.location is Location.ATTN_PROBS and self._values is not None:
            prob = act[:, trace.position, head, trace.key_position].detach()
            self._trace_value = (prob * self._values).sum()

    def _splice(self, attached: AttachedAutoencoder, x: torch.Tensor) -> torch.Tensor:
        ae = attached.autoencoder
        clean = ae.encode(x.float())
        # A distinct autograd node: its gradient is the loss's gradient w.r.t. the latents with
        # the error term held fixed, while x itself keeps its true (identity) gradient.
        latents = self._apply(attached.latents_point, clean.clone())
        if not self._error_term:
            return ae.decode(latents).to(x.dtype)
        # x + (decode(latents) - decode(clean)) is exactly x while the latents are untouched.
        return x + (ae.decode(latents) - ae.decode(clean)).to(x.dtype)

    def _apply(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        interventions = self._interventions.get(point)
        if interventions:
            # A copy, never an in-place write: autograd may still need the original.
            act = act.clone()
            for iv in interventions:
                row = slice(None) if iv.row is None else iv.row
                position = slice(None) if iv.position is None else iv.position
                act[(row, position, *iv.index)] = iv.value
        additions = self._additions.get(point)
        if additions:
            act = act.clone()
            for add in additions:
                row = slice(None) if add.row is None else add.row
                position = slice(None) if add.position is None else add.position
                vector = torch.tensor(add.vector, dtype=act.dtype, device=act.device)
                act[row, position] += vector
        if point in self._save:
            if point in self._keep_grads and act.requires_grad:
                act.retain_grad()
            self.activations[point] = act
        if point in self._trace_points:
            self._follow_trace(point, act)
        return act

    def gradients(self) -> dict[HookPoint, torch.Tensor]:
        grads = {}
        for point in self._keep_grads:
            act = self.activations.get(point)
            if act is not None:
                grads[point] = act.grad if act.grad is not None else torch.zeros_like(act)
        return grads


def _trace_points(trace: Trace | None) -> frozenset[HookPoint]:
    if trace is None:
        return frozenset()
    if trace.attention is None:
        return frozenset({trace.point})
    layer = trace.point.layer
    if trace.attention is AttentionTrace.V:
        locations = (Location.ATTN_V, Location.ATTN_PROBS)
    else:
        locations = (Location.ATTN_Q, Location.ATTN_K)
    return frozenset(HookPoint(layer, location) for location in locations)
