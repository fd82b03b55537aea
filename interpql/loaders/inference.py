"""Inference for one GraphQL request: every field that needs the same pass shares it.

Fields ask `InferenceLoader.load(spec, needs)` for an `InferenceSpec` and what they need of it
(`Needs`). Calls made in the same tick of the event loop (sibling fields, list items) are
gathered by a strawberry DataLoader into one batched backend call, one row per distinct input
(`InferenceSpec.pass_key`), whose saved locations are the union of what the calls need. A later
call whose needs are already covered is answered from the request's memo, or from the server's
`ResultCache` of earlier requests, without running again. The backend runs on its model's
worker thread (through the model's runner), never on the event loop. Results leave as numpy
arrays (loaders/pass_results.py): nothing above loaders/ sees torch.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from strawberry.dataloader import DataLoader

from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.loaders import tracing
from interpql.loaders.cache import BoundedMemoryCache
from interpql.loaders.coalescing import InferenceRunner
from interpql.loaders.inference_stats import InferenceStats
from interpql.loaders.out_of_memory import out_of_memory_as_error
from interpql.loaders.pass_results import (
    LayerKind,
    LogitPositions,
    Needs,
    RowResult,
    objective_needs,
    row_result,
)
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.loaders.steering import steering_additions
from interpql.specs import InferenceSpec, LayerNormScale

__all__ = [
    "InferenceLoader",
    "LayerKind",
    "LogitPositions",
    "Needs",
    "ResultCache",
    "RowResult",
    "default_runner",
    "objective_needs",
]


@dataclass(frozen=True)
class _Key:
    spec: InferenceSpec
    needs: Needs


def default_runner(window_s: float = 0.002, timeout_s: float | None = None) -> InferenceRunner:
    return InferenceRunner(run_batch, window_s=window_s, timeout_s=timeout_s)


class ResultCache:
    """Results of earlier requests, shared by all requests: an identical input (its
    `pass_key`: model, tokens, ablations, steering, loss, trace, error-term switch, LayerNorm
    convention) is answered without running again when the earlier pass computed what is
    asked now."""

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
        max_pass_tokens: int = 0,
    ) -> None:
        self._registry = registry
        self._runner = runner or default_runner(0.0)
        self._cache = cache
        # Prompt tokens of one part of this request's batch (0: one pass, however long).
        self.max_pass_tokens = max_pass_tokens
        self._loader = self._new_loader()
        self._memo: dict[Hashable, RowResult] = {}
        # This request's passes and result-cache lookups, for its log line and the metrics.
        self.stats = InferenceStats()

    def _new_loader(self) -> DataLoader[_Key, RowResult]:
        return DataLoader[_Key, RowResult](load_fn=self._load_batch, cache=False)

    def release(self) -> None:
        """Forgets this request's passes, once its answer is sent (RequestContext.release);
        a fresh DataLoader, since the last one keeps its last batch."""
        self._memo.clear()
        self._loader = self._new_loader()

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
        # One backend call per model, error-term setting (and without it, the dictionaries
        # spliced in), loss, trace and LayerNorm convention: request-wide switches.
        groups: dict[tuple[Any, ...], list[_Key]] = defaultdict(list)
        for key in keys:
            s = key.spec
            shared = (s.keep_error_term, s.spliced_kinds, s.loss, s.trace, s.layer_norm_scale)
            groups[(s.model, *shared)].append(key)
        results: dict[_Key, RowResult] = {}
        timeout = self._runner.timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        for (name, *switches), group in groups.items():
            entry = self._registry.get(name)
            for part in _parts(group, self.max_pass_tokens):
                # Submitted one after another: whatever other requests queued meanwhile runs
                # between the parts, rather than waiting for all of them.
                rows = await self._runner.submit(entry, tuple(switches), part, deadline)
                first = rows[part[0].spec.pass_key()]  # every row of a part shares one pass
                self.stats.add_pass(
                    first.elapsed_s, first.batch_size, len({k.spec.pass_key() for k in part})
                )
                for key in part:
                    found = rows[key.spec.pass_key()]
                    results[key] = replace(found, spec=key.spec)
                    self._memo[key.spec.pass_key()] = results[key]
        return [results[key] for key in keys]


def _parts(keys: list[_Key], max_tokens: int) -> list[list[_Key]]:
    """`keys` in parts of at most `max_tokens` prompt tokens (one input longer than that is a
    part of its own), in order; every key of one input in the same part."""
    by_input: dict[Hashable, list[_Key]] = defaultdict(list)
    for key in keys:
        by_input[key.spec.pass_key()].append(key)
    parts: list[list[_Key]] = []
    tokens = 0
    for same_input in by_input.values():
        n = len(same_input[0].spec.tokens)
        if not parts or (max_tokens > 0 and tokens + n > max_tokens):
            parts.append([])
            tokens = 0
        parts[-1].extend(same_input)
        tokens += n
    return parts


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
    additions = tuple(
        addition
        for row, spec in enumerate(rows)
        for addition in steering_additions(entry, spec.steering, row)
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
        additions=additions,
        backward=first.loss if union.backward else None,
        autoencoder_error_term=first.keep_error_term,
        logits=union.logit_positions,
    )
    stream_point = HookPoint(entry.architecture.n_layers - 1, Location.RESID_POST)
    if first.layer_norm_scale is LayerNormScale.FROZEN:
        request = replace(request, frozen_norm_inputs=frozenset({stream_point}))
    if first.trace is not None and union.backward:
        stream_point = tracing.read_point(entry, first.trace.upstream)
        if first.layer_norm_scale is LayerNormScale.FROZEN and tracing.reads_through_a_norm(
            entry, first.trace.upstream
        ):
            # The traced node's own LayerNorm holds its scale too (Transformer Debugger's
            # traces reconstitute the node's input with that scale detached).
            request = replace(
                request, frozen_norm_inputs=request.frozen_norm_inputs | {stream_point}
            )
        request = replace(request, trace=tracing.backend_trace(entry, request, first.trace))
    result = backend.forward(
        replace(request, save_grads=union.gradient_points(entry, stream_point))
    )
    batch_size = result.pass_rows or len(rows)
    return {
        spec.pass_key(): row_result(entry, result, row, spec, union, stream_point, batch_size)
        for row, spec in enumerate(rows)
    }
