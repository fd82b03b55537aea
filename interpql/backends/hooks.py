"""What every backend does at a hook point: intervene, save, keep gradients.

A backend creates one `HookSession` per `ForwardRequest` and passes every activation through
`process`. Backends differ only in where they call it from (our own forward code, or
TransformerLens hook functions).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from interpql.backends.base import ForwardRequest, HookPoint, Intervention


class HookSession:
    def __init__(self, request: ForwardRequest) -> None:
        self._save = request.save | request.save_grads
        self._keep_grads = request.save_grads if request.backward is not None else frozenset()
        self._interventions: dict[HookPoint, list[Intervention]] = defaultdict(list)
        for intervention in request.interventions:
            self._interventions[intervention.point].append(intervention)
        self.activations: dict[HookPoint, torch.Tensor] = {}

    def wants(self, point: HookPoint) -> bool:
        """True when `process` would do anything at this point (backends may skip it if not)."""
        return point in self._save or point in self._interventions

    def process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        """Takes a token-major activation [batch, token, ...]; returns the one to use downstream."""
        interventions = self._interventions.get(point)
        if interventions:
            # A copy, never an in-place write: autograd may still need the original.
            act = act.clone()
            for iv in interventions:
                prompt = slice(None) if iv.prompt is None else iv.prompt
                token = slice(None) if iv.token is None else iv.token
                act[(prompt, token, *iv.index)] = iv.value
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
