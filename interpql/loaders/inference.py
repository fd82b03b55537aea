"""Inference for one GraphQL request: every field that needs the same pass shares it.

Fields ask `InferenceLoader.load(spec, needs)` for an `InferenceSpec` and what they need of it
(`Needs`). Calls made in the same tick of the event loop (sibling fields, list items) are
gathered by a strawberry DataLoader into one batched backend call, one row per distinct input
(`InferenceSpec.pass_key`), whose saved locations are the union of what the calls need. A later
call whose needs are already covered is answered from the request's memo, or from the server's
`ResultCache` of earlier requests, without running again. The backend runs on its model's
worker thread (through the model's runner), never on the event loop. Results leave this module
as numpy arrays: nothing above loaders/ sees torch.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from strawberry.dataloader import DataLoader

from interpql.backends.base import ForwardRequest, ForwardResult, HookPoint, Location
from interpql.backends.losses import spec_loss
from interpql.loaders import tracing
from interpql.loaders.analysis import NodeScores, node_scores, token_pair_attribution
from interpql.loaders.cache import BoundedMemoryCache
from interpql.loaders.coalescing import InferenceRunner
from interpql.loaders.inference_stats import InferenceStats
from interpql.loaders.out_of_memory import out_of_memory_as_error
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.specs import InferenceSpec

LayerKind = tuple[int, str]  # (layer, kind name)


@dataclass(frozen=True)
class Needs:
    """What fields need of a pass. Gradients are asked for only by fields that need them, and
    only then does the pass include a backward pass."""

    layer_kinds: frozenset[LayerKind] = frozenset()
    pattern_layers: frozenset[int] = frozenset()
    gradient_layer_kinds: frozenset[LayerKind] = frozenset()
    stream_gradient: bool = False  # the loss's gradient where direct effects are read

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.layer_kinds | other.layer_kinds,
            self.pattern_layers | other.pattern_layers,
            self.gradient_layer_kinds | other.gradient_layer_kinds,
            self.stream_gradient or other.stream_gradient,
        )

    def covered_by(self, other: Needs) -> bool:
        return (self | other) == other

    @property
    def backward(self) -> bool:
        return bool(self.gradient_layer_kinds) or self.stream_gradient

    def all_layer_kinds(self) -> frozenset[LayerKind]:
        return self.layer_kinds | self.gradient_layer_kinds

    def hook_points(self, entry: ModelEntry) -> frozenset[HookPoint]:
        points = {entry.kind(kind).point(layer) for layer, kind in self.all_layer_kinds()}
        for layer in self.pattern_layers:
            points |= {HookPoint(layer, Location.ATTN_PROBS), HookPoint(layer, Location.ATTN_V)}
        return frozenset(points)

    def gradient_points(self, entry: ModelEntry, stream_point: HookPoint) -> frozenset[HookPoint]:
        """`stream_point`: where direct effects are read (the final residual stream, or where a
        traced node reads it)."""
        points = {entry.kind(kind).point(layer) for layer, kind in self.gradient_layer_kinds}
        if self.stream_gradient:
            points.add(stream_point)
        return frozenset(points)


@dataclass(frozen=True)
class _Key:
    spec: InferenceSpec
    needs: Needs


@dataclass
class RowResult:
    """What one pass computed for one input (one row of the batch), as numpy arrays."""

    spec: InferenceSpec
    needs: Needs
    next_token_loss: float | None
    last_logits: np.ndarray  # [vocab] at the last position
    scores: dict[LayerKind, NodeScores] = field(default_factory=dict)
    patterns: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    pair_attributions: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    objective: float = 0.0  # the input's loss, whether or not a backward pass ran
    elapsed_s: float = 0.0
    memory_before_bytes: int = 0
    memory_after_bytes: int = 0
    batch_size: int = 1  # rows of the pass that computed it
    from_cache: bool = False  # answered from an earlier request's pass: none ran for it now

    def activations(self, layer: int, kind: str) -> np.ndarray:
        """[position, node]."""
        return self.scores[(layer, kind)].activation


def default_runner(window_s: float = 0.002, timeout_s: float | None = None) -> InferenceRunner:
    return InferenceRunner(run_batch, window_s=window_s, timeout_s=timeout_s)


class ResultCache:
    """Results of earlier requests, shared by all requests: an identical input (its
    `pass_key`: model, tokens, ablations, loss, trace, error-term switch) is answered without
    running again when the earlier pass computed what is asked now."""

    def __init__(self, max_results: int = 64) -> None:
        self._cache = BoundedMemoryCache(max_results)

    @staticmethod
    def key(spec: InferenceSpec) -> str:
        return hashlib.sha256(repr(spec.pass_key()).encode()).hexdigest()

    async def get(self, spec: InferenceSpec) -> RowResult | None:
        found: RowResult | None = await self._cache.get(self.key(spec))
        return found

    async def put(self, result: RowResult) -> None:
        await self._cache.set(self.key(result.spec), result)


class InferenceLoader:
    def __init__(
        self,
        registry: ModelRegistry,
        runner: InferenceRunner | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self._registry = registry
        self._runner = runner or default_runner(0.0)
        self._cache = cache
        self._loader = DataLoader[_Key, RowResult](load_fn=self._load_batch, cache=False)
        self._memo: dict[Hashable, RowResult] = {}
        # This request's passes and result-cache lookups, for its log line and the metrics.
        self.stats = InferenceStats()

    async def load(self, spec: InferenceSpec, needs: Needs) -> RowResult:
        key = spec.pass_key()
        done = self._memo.get(key)
        if done is None and self._cache is not None:
            cached = await self._cache.get(spec)
            hit = cached is not None and needs.covered_by(cached.needs)
            self.stats.add_cache_lookup(key, hit)
            if cached is not None and hit:
                # No pass ran for it in this request: its pass figures say so.
                done = replace(
                    cached,
                    spec=spec,
                    from_cache=True,
                    batch_size=0,
                    elapsed_s=0.0,
                    memory_before_bytes=0,
                    memory_after_bytes=0,
                )
                self._memo[key] = done
        if done is not None and needs.covered_by(done.needs):
            return done
        result = await self._loader.load(_Key(spec, needs))
        if self._cache is not None:
            await self._cache.put(result)
        return result

    async def _load_batch(self, keys: Sequence[_Key]) -> list[RowResult]:
        # One backend call per model, error-term setting, loss and trace: request-wide switches.
        groups: dict[tuple[Any, ...], list[_Key]] = defaultdict(list)
        for key in keys:
            s = key.spec
            groups[(s.model, s.keep_error_term, s.loss, s.trace)].append(key)
        results: dict[_Key, RowResult] = {}
        for (name, *switches), group in groups.items():
            entry = self._registry.get(name)
            rows = await self._runner.submit(entry, tuple(switches), group)
            first = rows[group[0].spec.pass_key()]  # every row of a group comes from one pass
            self.stats.add_pass(
                first.elapsed_s, first.batch_size, len({k.spec.pass_key() for k in group})
            )
            for key in group:
                found = rows[key.spec.pass_key()]
                results[key] = replace(found, spec=key.spec)
                self._memo[key.spec.pass_key()] = results[key]
        return [results[key] for key in keys]


def run_batch(entry: ModelEntry, keys: list[_Key]) -> dict[Hashable, RowResult]:
    """Runs on the model's worker thread: one backend call for every distinct input in `keys`,
    results by `pass_key`."""
    with out_of_memory_as_error(f"a batch of {len({key.spec.pass_key() for key in keys})} prompts"):
        return _run_rows(entry, keys)


def _run_rows(entry: ModelEntry, keys: list[_Key]) -> dict[Hashable, RowResult]:
    backend = entry.require_backend()
    needs_by_row: dict[Hashable, Needs] = {}
    specs: dict[Hashable, InferenceSpec] = {}
    for key in keys:
        pass_key = key.spec.pass_key()
        needs_by_row[pass_key] = needs_by_row.get(pass_key, Needs()) | key.needs
        specs.setdefault(pass_key, key.spec)
    rows = list(specs.values())
    union = Needs()
    for needs in needs_by_row.values():
        union = union | needs
    interventions = tuple(
        entry.kind(a.node.kind).ablation(a.node.layer, a.node.index, a.value, a.position, row)
        for row, spec in enumerate(rows)
        for a in spec.ablations
    )
    first = rows[0]
    save = union.hook_points(entry)
    if Location.ATTN_V not in backend.locations:
        # Values only serve token-pair attribution, which such models (grouped-query
        # attention) go without; their heads' activations and patterns still answer.
        save = frozenset(p for p in save if p.location is not Location.ATTN_V)
    request = ForwardRequest(
        tokens=tuple(spec.tokens for spec in rows),
        save=save,
        interventions=interventions,
        backward=first.loss if union.backward else None,
        autoencoder_error_term=first.keep_error_term,
    )
    stream_point = HookPoint(entry.architecture.n_layers - 1, Location.RESID_POST)
    if first.trace is not None and union.backward:
        stream_point = tracing.read_point(entry, first.trace.upstream)
        request = replace(request, trace=tracing.backend_trace(entry, request, first.trace))
    result = backend.forward(
        replace(request, save_grads=union.gradient_points(entry, stream_point))
    )
    batch_size = result.pass_rows or len(rows)
    return {
        spec.pass_key(): _row_result(entry, result, row, spec, union, stream_point, batch_size)
        for row, spec in enumerate(rows)
    }


def _row_result(
    entry: ModelEntry,
    result: ForwardResult,
    row: int,
    spec: InferenceSpec,
    needs: Needs,
    stream_point: HookPoint,
    batch_size: int,
) -> RowResult:
    n_tok = result.lengths[row]
    stream_grad = None
    if needs.stream_gradient:
        stream_grad = result.gradients[stream_point][row, :n_tok].float()
    scores = {}
    for layer, kind in needs.all_layer_kinds():
        point = entry.kind(kind).point(layer)
        grad = result.gradients.get(point)
        reaches = tracing.writes_reach(entry, layer, kind, stream_point)
        scores[(layer, kind)] = node_scores(
            entry,
            layer,
            kind,
            result.activations[point][row, :n_tok],
            None if grad is None else grad[row, :n_tok],
            stream_grad if reaches else None if stream_grad is None else stream_grad * 0,
        )
    patterns, pairs = {}, {}
    for layer in needs.pattern_layers:
        probs = result.activations[HookPoint(layer, Location.ATTN_PROBS)][row, :n_tok, :, :n_tok]
        patterns[layer] = probs.float().cpu().numpy()
        values = result.activations.get(HookPoint(layer, Location.ATTN_V))
        if values is not None:
            pairs[layer] = token_pair_attribution(entry, layer, probs, values[row, :n_tok])
    loss = float(result.next_token_loss[row])
    return RowResult(
        spec=spec,
        needs=needs,
        next_token_loss=None if np.isnan(loss) else loss,
        last_logits=result.logits[row, n_tok - 1].float().cpu().numpy(),
        scores=scores,
        patterns=patterns,
        pair_attributions=pairs,
        objective=_objective(result, row, spec),
        elapsed_s=result.elapsed_s,
        memory_before_bytes=result.memory_before_bytes,
        memory_after_bytes=result.memory_after_bytes,
        batch_size=batch_size,
    )


def _objective(result: ForwardResult, row: int, spec: InferenceSpec) -> float:
    if result.backward_loss is not None:
        return float(result.backward_loss[row])
    tokens = torch.tensor([spec.tokens], device=result.logits.device)
    lengths = torch.tensor([len(spec.tokens)], device=result.logits.device)
    logits = result.logits[row : row + 1, : len(spec.tokens)]
    return float(spec_loss(spec.loss, logits, tokens, lengths)[0])
