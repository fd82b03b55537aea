"""Inference for one GraphQL request: every field that needs the same run shares one pass.

A run is a `Variant`: a prompt's tokens, the ablations applied to it and whether autoencoders
keep their error term. Fields ask `InferenceLoader.load(model, variant, needs)`. Calls made in
the same tick of the event loop (sibling fields, list items) are gathered by a strawberry
DataLoader into one batched backend call (one row per variant), whose saved locations are the
union of what the calls need. A later call whose needs are already covered is answered from the
request's memo without running again. The backend runs on its model's worker thread, never on
the event loop. Results leave this module as numpy arrays: nothing above loaders/ sees torch.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from strawberry.dataloader import DataLoader

from interpql.backends.base import (
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Intervention,
    Location,
)
from interpql.loaders.nodes import NodeKind, NodeRef
from interpql.loaders.registry import LATENT_LOCATIONS, ModelEntry, ModelRegistry

# Which saved location a node kind's per-token activation is read from.
KIND_LOCATION = {
    NodeKind.MLP_NEURON: Location.MLP_POST,
    NodeKind.ATTENTION_HEAD: Location.ATTN_Z,  # reduced to the norm of each head's write
    NodeKind.RESIDUAL_CHANNEL: Location.RESID_POST,
    **LATENT_LOCATIONS,
}


@dataclass(frozen=True)
class Ablation:
    """Set a node's activation to `value` at one token (None: every token).

    For an attention head, the head's output vector (its z) is set, so 0 removes its write.
    """

    node: NodeRef
    value: float
    token: int | None = None


@dataclass(frozen=True)
class Variant:
    tokens: tuple[int, ...]
    ablations: tuple[Ablation, ...] = ()
    autoencoder_error_term: bool = True


@dataclass(frozen=True)
class ActivationNeeds:
    layer_kinds: frozenset[tuple[int, NodeKind]] = frozenset()
    pattern_layers: frozenset[int] = frozenset()

    def __or__(self, other: ActivationNeeds) -> ActivationNeeds:
        return ActivationNeeds(
            self.layer_kinds | other.layer_kinds, self.pattern_layers | other.pattern_layers
        )

    def covered_by(self, other: ActivationNeeds) -> bool:
        return self.layer_kinds <= other.layer_kinds and self.pattern_layers <= other.pattern_layers

    def hook_points(self) -> frozenset[HookPoint]:
        points = {HookPoint(layer, KIND_LOCATION[kind]) for layer, kind in self.layer_kinds}
        points.update(HookPoint(layer, Location.ATTN_PROBS) for layer in self.pattern_layers)
        return frozenset(points)


@dataclass(frozen=True)
class _Key:
    model: str
    variant: Variant
    needs: ActivationNeeds


@dataclass
class PromptRun:
    """What one forward pass computed for one variant, as numpy arrays."""

    variant: Variant
    needs: ActivationNeeds
    next_token_loss: float | None
    last_logits: np.ndarray  # [vocab] at the last token
    layer_activations: dict[tuple[int, NodeKind], np.ndarray] = field(default_factory=dict)
    patterns: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    elapsed_s: float = 0.0
    memory_before_bytes: int = 0
    memory_after_bytes: int = 0
    batch_size: int = 1


class InferenceLoader:
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._loader = DataLoader[_Key, PromptRun](load_fn=self._load_batch, cache=False)
        self._memo: dict[tuple[str, Variant], PromptRun] = {}

    async def load(self, model: str, variant: Variant, needs: ActivationNeeds) -> PromptRun:
        done = self._memo.get((model, variant))
        if done is not None and needs.covered_by(done.needs):
            return done
        return await self._loader.load(_Key(model, variant, needs))

    async def _load_batch(self, keys: Sequence[_Key]) -> list[PromptRun]:
        # One backend call per model and error-term setting (a request-wide switch).
        groups: dict[tuple[str, bool], list[_Key]] = defaultdict(list)
        for key in keys:
            groups[(key.model, key.variant.autoencoder_error_term)].append(key)
        results: dict[_Key, PromptRun] = {}
        loop = asyncio.get_running_loop()
        for (name, _), group in groups.items():
            entry = self._registry.get(name)
            runs = await loop.run_in_executor(entry.executor, _run_batch, entry, group)
            for key in group:
                results[key] = runs[key.variant]
                self._memo[(name, key.variant)] = runs[key.variant]
        return [results[key] for key in keys]


def _intervention(ablation: Ablation, row: int) -> Intervention:
    node = ablation.node
    location = KIND_LOCATION[node.kind]
    return Intervention(
        HookPoint(node.layer, location), ablation.value, ablation.token, (node.index,), row
    )


def _run_batch(entry: ModelEntry, keys: list[_Key]) -> dict[Variant, PromptRun]:
    """Runs on the model's worker thread: one backend call for every variant in `keys`."""
    backend = entry.require_backend()
    needs_by_variant: dict[Variant, ActivationNeeds] = {}
    for key in keys:
        needs_by_variant[key.variant] = (
            needs_by_variant.get(key.variant, ActivationNeeds()) | key.needs
        )
    variants = list(needs_by_variant)
    union = ActivationNeeds()
    for needs in needs_by_variant.values():
        union = union | needs
    interventions = tuple(
        _intervention(ablation, row)
        for row, variant in enumerate(variants)
        for ablation in variant.ablations
    )
    result = backend.run(
        ForwardRequest(
            tokens=tuple(v.tokens for v in variants),
            save=union.hook_points(),
            interventions=interventions,
            autoencoder_error_term=variants[0].autoencoder_error_term,
        )
    )
    head_writes = {
        layer: backend.weight(f"blocks.{layer}.attn.W_O")
        for layer, kind in union.layer_kinds
        if kind is NodeKind.ATTENTION_HEAD
    }
    return {
        variant: _prompt_run(result, row, variant, union, head_writes, len(variants))
        for row, variant in enumerate(variants)
    }


def _prompt_run(
    result: ForwardResult,
    row: int,
    variant: Variant,
    needs: ActivationNeeds,
    head_writes: dict[int, torch.Tensor],
    batch_size: int,
) -> PromptRun:
    n_tok = result.lengths[row]
    loss = float(result.next_token_loss[row])
    layer_acts = {}
    for layer, kind in needs.layer_kinds:
        act = result.activations[HookPoint(layer, KIND_LOCATION[kind])][row, :n_tok].float()
        if kind is NodeKind.ATTENTION_HEAD:
            # [token, head, d_head] x [head, d_head, d_model] -> norm of each head's write
            act = torch.einsum("thd,hdm->thm", act, head_writes[layer]).norm(dim=-1)
        layer_acts[(layer, kind)] = act.cpu().numpy()
    patterns = {
        layer: result.activations[HookPoint(layer, Location.ATTN_PROBS)][row, :n_tok, :, :n_tok]
        .float()
        .cpu()
        .numpy()
        for layer in needs.pattern_layers
    }
    return PromptRun(
        variant=variant,
        needs=needs,
        next_token_loss=None if np.isnan(loss) else loss,
        last_logits=result.logits[row, n_tok - 1].float().cpu().numpy(),
        layer_activations=layer_acts,
        patterns=patterns,
        elapsed_s=result.elapsed_s,
        memory_before_bytes=result.memory_before_bytes,
        memory_after_bytes=result.memory_after_bytes,
        batch_size=batch_size,
    )
