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
)


class HookSession:
    def __init__(
        self,
        request: ForwardRequest,
        autoencoders: Mapping[HookPoint, AttachedAutoencoder] | None = None,
    ) -> None:
        self._save = request.save | request.save_grads
        self._keep_grads = request.save_grads if request.backward is not None else frozenset()
        self._interventions: dict[HookPoint, list[Intervention]] = defaultdict(list)
        for intervention in request.interventions:
            self._interventions[intervention.point].append(intervention)
        self._additions: dict[HookPoint, list[Addition]] = defaultdict(list)
        for addition in request.additions:
            self._additions[addition.point].append(addition)
        self._error_term = request.autoencoder_error_term
        # Only autoencoders whose latents someone asked about are spliced in.
        self._splices = {
            attached.input_point: attached
            for point, attached in (autoencoders or {}).items()
            if self._touches(point)
        }
        self.activations: dict[HookPoint, torch.Tensor] = {}

    def _touches(self, point: HookPoint) -> bool:
        return point in self._save or point in self._interventions or point in self._additions

    def wants(self, point: HookPoint) -> bool:
        """True when `process` would do anything at this point (backends may skip it if not)."""
        return self._touches(point) or point in self._splices

    def process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        """Takes a token-major activation [batch, token, ...]; returns the one to use downstream."""
        act = self._apply(point, act)
        attached = self._splices.get(point)
        return act if attached is None else self._splice(attached, act)

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
                prompt = slice(None) if iv.prompt is None else iv.prompt
                token = slice(None) if iv.token is None else iv.token
                act[(prompt, token, *iv.index)] = iv.value
        additions = self._additions.get(point)
        if additions:
            act = act.clone()
            for add in additions:
                prompt = slice(None) if add.prompt is None else add.prompt
                token = slice(None) if add.token is None else add.token
                vector = torch.tensor(add.vector, dtype=act.dtype, device=act.device)
                act[prompt, token] += vector
        if point in self._save:
            if point in self._keep_grads and act.requires_grad:
                act.retain_grad()
            self.activations[point] = act
        return act

    def gradients(self) -> dict[HookPoint, torch.Tensor]:
        grads = {}
        for point in self._keep_grads:
            act = self.activations.get(point)
            if act is not None:
                grads[point] = act.grad if act.grad is not None else torch.zeros_like(act)
        return grads
