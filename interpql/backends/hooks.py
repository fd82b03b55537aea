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
    AttachedDictionary,
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
        dictionaries: Mapping[HookPoint, AttachedDictionary] | None = None,
        position_offset: int | None = None,
    ) -> None:
        """`position_offset`: where a pass runs some positions of a longer sequence (generation
        with a key-value cache), the absolute position of the first; interventions and
        additions name absolute positions, and apply where they fall among these."""
        self._offset = position_offset
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
        # Only dictionaries whose latents someone asked about are spliced in: at their input
        # (SAEs, and transcoders' latents), and for transcoders at their output too.
        self._reads: dict[HookPoint, list[AttachedDictionary]] = defaultdict(list)
        self._writes: dict[HookPoint, list[AttachedDictionary]] = defaultdict(list)
        for point, attached in sorted((dictionaries or {}).items()):
            if self._touches(point):
                self._reads[attached.input_point].append(attached)
                if attached.is_transcoder:
                    self._writes[attached.output_point].append(attached)
        # A transcoder's latents between its input and its output: (input, clean, edited).
        self._pending: dict[HookPoint, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.activations: dict[HookPoint, torch.Tensor] = {}

    def _touches(self, point: HookPoint) -> bool:
        return (
            point in self._save
            or point in self._interventions
            or point in self._additions
            or point in self._trace_points
        )

    @property
    def frozen_norms(self) -> frozenset[HookPoint]:
        return self._frozen_norms

    def freezes_norm(self, reads: HookPoint) -> bool:
        """Whether the LayerNorm reading the stream at `reads` holds its scale (see
        ForwardRequest.frozen_norm_inputs)."""
        return reads in self._frozen_norms

    def wants(self, point: HookPoint) -> bool:
        """True when `process` would do anything at this point (backends may skip it if not)."""
        return (
            self._touches(point)
            or point in self._reads
            or point in self._writes
            or point in self._trace_points
        )

    def process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        """Takes a token-major activation [row, position, ...]; returns the one to use
        downstream."""
        act = self._apply(point, act)
        for attached in self._reads.get(point, ()):
            act = self._read(attached, act)
        for attached in self._writes.get(point, ()):
            act = self._write(attached, act)
        return act

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

    def _read(self, attached: AttachedDictionary, x: torch.Tensor) -> torch.Tensor:
        """At a dictionary's input: its latents (saved, edited, traced like any activation).
        An SAE's output takes the input's place here; a transcoder's waits for its output."""
        shape = x.shape
        flat = x.float().reshape(*shape[:2], -1)  # attn_z: [.., head, d_head], head-major
        clean = attached.dictionary.encode(flat)
        # A distinct autograd node: its gradient is the loss's gradient w.r.t. the latents with
        # the error term held fixed, while x itself keeps its true (identity) gradient.
        latents = self._apply(attached.latents_point, clean.clone())
        if attached.is_transcoder:
            self._pending[attached.latents_point] = (flat, clean, latents)
            return x
        return self._replaced(attached, x, flat, clean, latents).reshape(shape)

    def _write(self, attached: AttachedDictionary, out: torch.Tensor) -> torch.Tensor:
        """At a transcoder's output (the MLP's): what its latents decode to, error kept."""
        flat, clean, latents = self._pending.pop(attached.latents_point)
        return self._replaced(attached, out, flat, clean, latents)

    def _replaced(
        self,
        attached: AttachedDictionary,
        target: torch.Tensor,
        inputs: torch.Tensor,
        clean: torch.Tensor,
        latents: torch.Tensor,
    ) -> torch.Tensor:
        """`target` as the dictionary rebuilds it: with the error term, target + decode(latents)
        - decode(clean), which is exactly `target` while the latents are untouched (then, unless
        their own gradient is asked for, nothing is computed); without it, decode(latents)."""
        dictionary = attached.dictionary
        if not self._error_term:
            return dictionary.decode(latents, inputs).to(target.dtype).reshape(target.shape)
        point = attached.latents_point
        edited = point in self._interventions or point in self._additions
        if not edited and point not in self._keep_grads:
            return target
        change = dictionary.decoded_change(latents - clean, inputs).to(target.dtype)
        return target + change.reshape(target.shape)

    def _apply(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        interventions = self._interventions.get(point)
        if interventions:
            # A copy, never an in-place write: autograd may still need the original.
            act = act.clone()
            for iv in interventions:
                row = slice(None) if iv.row is None else iv.row
                position = self._position(iv.position, act)
                if position is not None:
                    act[(row, position, *iv.index)] = iv.value
        additions = self._additions.get(point)
        if additions:
            act = act.clone()
            for add in additions:
                row = slice(None) if add.row is None else add.row
                position = self._position(add.position, act)
                if position is not None:
                    vector = torch.tensor(add.vector, dtype=act.dtype, device=act.device)
                    act[row, position] += vector
        if point in self._save:
            if point in self._keep_grads and act.requires_grad:
                act.retain_grad()
            self.activations[point] = act
        if point in self._trace_points:
            self._follow_trace(point, act)
        return act

    def _position(self, position: int | None, act: torch.Tensor) -> int | slice | None:
        """Where an absolute position (None: every one) falls in `act`'s positions; None when
        it is not among them."""
        if position is None:
            return slice(None)
        if self._offset is None:
            return position
        local = position - self._offset
        return local if 0 <= local < act.shape[1] else None

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
