"""Inference for one GraphQL request: every field that needs the same prompt shares one pass.

Fields of an operation ask `InferenceLoader.load(model, tokens, needs)`. Calls made in the same
tick of the event loop (sibling fields, list items) are gathered by a strawberry DataLoader into
one batched backend call, whose saved locations are the union of what the calls need. A later
call whose needs are already covered is answered from the request's memo without running again.
The backend runs on its model's worker thread, never on the event loop. Results leave this module
as numpy arrays: nothing above loaders/ sees torch.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from strawberry.dataloader import DataLoader

from interpql.backends.base import ForwardRequest, ForwardResult, HookPoint, Location
from interpql.errors import UnavailableError
from interpql.loaders.nodes import NodeKind
from interpql.loaders.registry import ModelEntry, ModelRegistry

# Which saved location a node kind's per-token activation is read from.
_KIND_LOCATION = {
    NodeKind.MLP_NEURON: Location.MLP_POST,
    NodeKind.ATTENTION_HEAD: Location.ATTN_Z,  # reduced to the norm of each head's write
    NodeKind.RESIDUAL_CHANNEL: Location.RESID_POST,
}


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
        points = set()
        for layer, kind in self.layer_kinds:
            location = _KIND_LOCATION.get(kind)
            if location is None:
                raise UnavailableError(f"Activations of {kind.value} nodes are not available yet.")
            points.add(HookPoint(layer, location))
        points.update(HookPoint(layer, Location.ATTN_PROBS) for layer in self.pattern_layers)
        return frozenset(points)


@dataclass(frozen=True)
class _Key:
    model: str
    tokens: tuple[int, ...]
    needs: ActivationNeeds


@dataclass
class PromptRun:
    """What one forward pass computed for one prompt, as numpy arrays."""

    tokens: tuple[int, ...]
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
        self._memo: dict[tuple[str, tuple[int, ...]], PromptRun] = {}

    async def load(self, model: str, tokens: tuple[int, ...], needs: ActivationNeeds) -> PromptRun:
        done = self._memo.get((model, tokens))
        if done is not None and needs.covered_by(done.needs):
            return done
        return await self._loader.load(_Key(model, tokens, needs))

    async def _load_batch(self, keys: Sequence[_Key]) -> list[PromptRun]:
        by_model: dict[str, list[_Key]] = defaultdict(list)
        for key in keys:
            by_model[key.model].append(key)
        results: dict[_Key, PromptRun] = {}
        loop = asyncio.get_running_loop()
        for name, model_keys in by_model.items():
            entry = self._registry.get(name)
            runs = await loop.run_in_executor(entry.executor, _run_batch, entry, model_keys)
            for key in model_keys:
                run = runs[key.tokens]
                results[key] = run
                self._memo[(name, key.tokens)] = run
        return [results[key] for key in keys]


def _run_batch(entry: ModelEntry, keys: list[_Key]) -> dict[tuple[int, ...], PromptRun]:
    """Runs on the model's worker thread: one backend call for every prompt in `keys`."""
    backend = entry.require_backend()
    needs_by_prompt: dict[tuple[int, ...], ActivationNeeds] = {}
    for key in keys:
        needs_by_prompt[key.tokens] = needs_by_prompt.get(key.tokens, ActivationNeeds()) | key.needs
    prompts = list(needs_by_prompt)
    union = ActivationNeeds()
    for needs in needs_by_prompt.values():
        union = union | needs
    result = backend.run(ForwardRequest(tokens=tuple(prompts), save=union.hook_points()))
    head_writes = {
        layer: backend.weight(f"blocks.{layer}.attn.W_O")
        for layer, kind in union.layer_kinds
        if kind is NodeKind.ATTENTION_HEAD
    }
    return {
        prompt: _prompt_run(result, row, prompt, union, head_writes, len(prompts))
        for row, prompt in enumerate(prompts)
    }


def _prompt_run(
    result: ForwardResult,
    row: int,
    prompt: tuple[int, ...],
    needs: ActivationNeeds,
    head_writes: dict[int, torch.Tensor],
    batch_size: int,
) -> PromptRun:
    n_tok = result.lengths[row]
    loss = float(result.next_token_loss[row])
    layer_acts = {}
    for layer, kind in needs.layer_kinds:
        act = result.activations[HookPoint(layer, _KIND_LOCATION[kind])][row, :n_tok].float()
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
        tokens=prompt,
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
