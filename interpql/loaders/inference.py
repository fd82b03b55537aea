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

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from strawberry.dataloader import DataLoader

from interpql.backends.base import (
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Intervention,
    Location,
    LossSpec,
)
from interpql.backends.losses import spec_loss
from interpql.loaders import tracing
from interpql.loaders.analysis import KIND_LOCATION, NodeScores, node_scores, token_pair_attribution
from interpql.loaders.cache import BoundedMemoryCache
from interpql.loaders.coalescing import InferenceRunner
from interpql.loaders.inference_stats import InferenceStats
from interpql.loaders.nodes import NodeKind, NodeRef
from interpql.loaders.out_of_memory import out_of_memory_as_error
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.loaders.tracing import TraceRequest


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
    """One run: a prompt, what to change while it runs, and what a backward pass differentiates."""

    tokens: tuple[int, ...]
    ablations: tuple[Ablation, ...] = ()
    autoencoder_error_term: bool = True
    loss: LossSpec = field(default_factory=LossSpec)
    trace: TraceRequest | None = None


LayerKind = tuple[int, NodeKind]


@dataclass(frozen=True)
class ActivationNeeds:
    """What fields need from a run. Gradients are asked for only by fields that need them,
    and only then does the run include a backward pass."""

    layer_kinds: frozenset[LayerKind] = frozenset()
    pattern_layers: frozenset[int] = frozenset()
    gradient_layer_kinds: frozenset[LayerKind] = frozenset()
    final_gradient: bool = False  # the loss's gradient at the final residual stream

    def __or__(self, other: ActivationNeeds) -> ActivationNeeds:
        return ActivationNeeds(
            self.layer_kinds | other.layer_kinds,
            self.pattern_layers | other.pattern_layers,
            self.gradient_layer_kinds | other.gradient_layer_kinds,
            self.final_gradient or other.final_gradient,
        )

    def covered_by(self, other: ActivationNeeds) -> bool:
        return (self | other) == other

    @property
    def backward(self) -> bool:
        return bool(self.gradient_layer_kinds) or self.final_gradient

    def all_layer_kinds(self) -> frozenset[LayerKind]:
        return self.layer_kinds | self.gradient_layer_kinds

    def hook_points(self) -> frozenset[HookPoint]:
        points = {HookPoint(layer, KIND_LOCATION[kind]) for layer, kind in self.all_layer_kinds()}
        for layer in self.pattern_layers:
            points |= {HookPoint(layer, Location.ATTN_PROBS), HookPoint(layer, Location.ATTN_V)}
        return frozenset(points)

    def gradient_points(self, direct_point: HookPoint) -> frozenset[HookPoint]:
        """`direct_point`: where direct effects are read (the final residual stream, or where a
        traced node reads it)."""
        points = {
            HookPoint(layer, KIND_LOCATION[kind]) for layer, kind in self.gradient_layer_kinds
        }
        if self.final_gradient:
            points.add(direct_point)
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
    scores: dict[LayerKind, NodeScores] = field(default_factory=dict)
    patterns: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    pair_attributions: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    objective: float = 0.0  # the variant's loss, whether or not a backward pass ran

    def activations(self, layer: int, kind: NodeKind) -> np.ndarray:
        """[token, node]."""
        return self.scores[(layer, kind)].activation

    elapsed_s: float = 0.0
    memory_before_bytes: int = 0
    memory_after_bytes: int = 0
    batch_size: int = 1


def default_runner(window_s: float = 0.002, timeout_s: float | None = None) -> InferenceRunner:
    return InferenceRunner(_run_batch, window_s=window_s, timeout_s=timeout_s)


class RunCache:
    """Runs of earlier requests, shared by all requests: an identical input (model, prompt,
    ablations, loss, trace, autoencoder switch: `Variant`, a frozen value, is the key) is
    answered without running again when the earlier run computed what is asked now."""

    def __init__(self, max_runs: int = 64) -> None:
        self._cache = BoundedMemoryCache(max_runs)

    @staticmethod
    def key(model: str, variant: Variant) -> str:
        return hashlib.sha256(repr((model, variant)).encode()).hexdigest()

    async def get(self, model: str, variant: Variant) -> PromptRun | None:
        found: PromptRun | None = await self._cache.get(self.key(model, variant))
        return found

    async def put(self, model: str, run: PromptRun) -> None:
        await self._cache.set(self.key(model, run.variant), run)


class InferenceLoader:
    def __init__(
        self,
        registry: ModelRegistry,
        runner: InferenceRunner | None = None,
        cache: RunCache | None = None,
    ) -> None:
        self._registry = registry
        self._runner = runner or default_runner(0.0)
        self._cache = cache
        self._loader = DataLoader[_Key, PromptRun](load_fn=self._load_batch, cache=False)
        self._memo: dict[tuple[str, Variant], PromptRun] = {}
        # This request's passes and run-cache lookups, for its log line and the metrics.
        self.stats = InferenceStats()

    async def load(self, model: str, variant: Variant, needs: ActivationNeeds) -> PromptRun:
        done = self._memo.get((model, variant))
        if done is None and self._cache is not None:
            done = await self._cache.get(model, variant)
            hit = done is not None and needs.covered_by(done.needs)
            self.stats.add_cache_lookup((model, variant), hit)
        if done is not None and needs.covered_by(done.needs):
            return done
        run = await self._loader.load(_Key(model, variant, needs))
        if self._cache is not None:
            await self._cache.put(model, run)
        return run

    async def _load_batch(self, keys: Sequence[_Key]) -> list[PromptRun]:
        # One backend call per model, error-term setting, loss and trace: request-wide switches.
        groups: dict[tuple[str, bool, LossSpec, TraceRequest | None], list[_Key]]
        groups = defaultdict(list)
        for key in keys:
            v = key.variant
            groups[(key.model, v.autoencoder_error_term, v.loss, v.trace)].append(key)
        results: dict[_Key, PromptRun] = {}
        for (name, *switches), group in groups.items():
            entry = self._registry.get(name)
            runs = await self._runner.run(entry, tuple(switches), group)
            first = runs[group[0].variant]  # every run of a group comes from one pass
            self.stats.add_pass(first.elapsed_s, first.batch_size, len({k.variant for k in group}))
            for key in group:
                results[key] = runs[key.variant]
                self._memo[(name, key.variant)] = runs[key.variant]
        return [results[key] for key in keys]


def intervention_for(ablation: Ablation, row: int) -> Intervention:
    node = ablation.node
    location = KIND_LOCATION[node.kind]
    return Intervention(
        HookPoint(node.layer, location), ablation.value, ablation.token, (node.index,), row
    )


def _run_batch(entry: ModelEntry, keys: list[_Key]) -> dict[Variant, PromptRun]:
    """Runs on the model's worker thread: one backend call for every variant in `keys`."""
    with out_of_memory_as_error(f"a batch of {len({key.variant for key in keys})} prompts"):
        return _run_variants(entry, keys)


def _run_variants(entry: ModelEntry, keys: list[_Key]) -> dict[Variant, PromptRun]:
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
        intervention_for(ablation, row)
        for row, variant in enumerate(variants)
        for ablation in variant.ablations
    )
    first = variants[0]
    save = union.hook_points()
    if Location.ATTN_V not in backend.locations:
        # Values only serve token-pair attribution, which such models (grouped-query
        # attention) go without; their heads' activations and patterns still answer.
        save = frozenset(p for p in save if p.location is not Location.ATTN_V)
    request = ForwardRequest(
        tokens=tuple(v.tokens for v in variants),
        save=save,
        interventions=interventions,
        backward=first.loss if union.backward else None,
        autoencoder_error_term=first.autoencoder_error_term,
    )
    direct_point = HookPoint(entry.architecture.n_layers - 1, Location.RESID_POST)
    if first.trace is not None and union.backward:
        direct_point = tracing.read_point(first.trace.upstream)
        request = replace(request, trace=tracing.backend_trace(entry, request, first.trace))
    result = backend.run(replace(request, save_grads=union.gradient_points(direct_point)))
    return {
        variant: _prompt_run(
            entry, result, row, variant, union, direct_point, result.pass_rows or len(variants)
        )
        for row, variant in enumerate(variants)
    }


def _prompt_run(
    entry: ModelEntry,
    result: ForwardResult,
    row: int,
    variant: Variant,
    needs: ActivationNeeds,
    direct_point: HookPoint,
    batch_size: int,
) -> PromptRun:
    n_tok = result.lengths[row]
    final_grad = None
    if needs.final_gradient:
        final_grad = result.gradients[direct_point][row, :n_tok].float()
    scores = {}
    for layer, kind in needs.all_layer_kinds():
        point = HookPoint(layer, KIND_LOCATION[kind])
        grad = result.gradients.get(point)
        reaches = tracing.writes_reach(layer, kind, direct_point)
        scores[(layer, kind)] = node_scores(
            entry,
            layer,
            kind,
            result.activations[point][row, :n_tok],
            None if grad is None else grad[row, :n_tok],
            final_grad if reaches else None if final_grad is None else final_grad * 0,
        )
    patterns, pairs = {}, {}
    for layer in needs.pattern_layers:
        probs = result.activations[HookPoint(layer, Location.ATTN_PROBS)][row, :n_tok, :, :n_tok]
        patterns[layer] = probs.float().cpu().numpy()
        values = result.activations.get(HookPoint(layer, Location.ATTN_V))
        if values is not None:
            pairs[layer] = token_pair_attribution(entry, layer, probs, values[row, :n_tok])
    loss = float(result.next_token_loss[row])
    return PromptRun(
        variant=variant,
        needs=needs,
        next_token_loss=None if np.isnan(loss) else loss,
        last_logits=result.logits[row, n_tok - 1].float().cpu().numpy(),
        scores=scores,
        patterns=patterns,
        pair_attributions=pairs,
        objective=_objective(result, row, variant),
        elapsed_s=result.elapsed_s,
        memory_before_bytes=result.memory_before_bytes,
        memory_after_bytes=result.memory_after_bytes,
        batch_size=batch_size,
    )


def _objective(result: ForwardResult, row: int, variant: Variant) -> float:
    if result.backward_loss is not None:
        return float(result.backward_loss[row])
    tokens = torch.tensor([variant.tokens], device=result.logits.device)
    lengths = torch.tensor([len(variant.tokens)], device=result.logits.device)
    logits = result.logits[row : row + 1, : len(variant.tokens)]
    return float(spec_loss(variant.loss, logits, tokens, lengths)[0])
