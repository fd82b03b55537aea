"""Coalescing: concurrent requests for the same model share forward passes.

Each request's DataLoader hands its batch to the server-wide `InferenceRunner`. When a model is
idle, the runner waits `window_s` for other requests; while it is busy, requests simply gather,
and all that gathered run together as soon as it is free (so batches grow with the load). Batches
with the same request-wide switches (error term, loss, trace) merge while their prompts are of
similar length (padding wasted is bounded by `max_length_ratio`) and up to `max_rows` prompts;
a batch the runner is given is never split (InferenceLoader gives a long inferBatch in parts,
so that other requests run between them). With `window_s` 0 every batch runs as it comes.

A request waits at most `timeout_s` (INFERENCE_TIMEOUT); one that gave up is dropped from the
queue before its pass runs. When a merged pass runs out of memory, each request in it runs again
alone, so only the one too large for memory fails (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from interpql.errors import InterpqlError, inference_timeout
from interpql.loaders.out_of_memory import out_of_memory_as_error
from interpql.loaders.registry import ModelEntry

# A per-request batch: opaque keys that each carry `.spec` (an InferenceSpec); results come back
# by the spec's pass_key.
RunBatch = Callable[[ModelEntry, list[Any]], dict[Any, Any]]
# Told of all work done with a model: (model, work, rows, seconds on the model's worker); work is
# "pass" for batched inference passes, else what `compute` was asked to do.
PassObserver = Callable[[str, str, int, float], None]
T = TypeVar("T")
# Work for `compute`: runs on the model's worker; long work stops early when the event is set.
Work = Callable[[threading.Event], T]


@dataclass
class _Waiting:
    entry: ModelEntry
    keys: list[Any]
    future: asyncio.Future[dict[Any, Any]]


class InferenceRunner:
    def __init__(
        self,
        run_batch: RunBatch,
        window_s: float = 0.002,
        max_rows: int = 32,
        max_length_ratio: float = 2.0,
        timeout_s: float | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.max_length_ratio = max_length_ratio
        # model -> request-wide switches -> requests waiting
        self._waiting: dict[str, dict[Hashable, list[_Waiting]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self._draining: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.pass_observers: list[PassObserver] = []

    async def submit(
        self,
        entry: ModelEntry,
        switches: Hashable,
        keys: list[Any],
        deadline: float | None = None,
    ) -> dict[Any, Any]:
        """Results by pass key for `keys`; `switches` must be equal for batches to merge.
        `deadline` (the event loop's clock): when the caller's time runs out, if sooner than
        the runner's timeout from now (one request's batch run in several passes shares one)."""
        timeout = self.timeout_s
        if deadline is not None:
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            timeout = left if timeout is None else min(timeout, left)
        try:
            return await asyncio.wait_for(self._run(entry, switches, keys), timeout)
        except TimeoutError:
            raise inference_timeout(self.timeout_s or 0) from None

    async def _run(self, entry: ModelEntry, switches: Hashable, keys: list[Any]) -> dict[Any, Any]:
        if self.window_s <= 0:
            return await self._execute(entry, keys)
        future: asyncio.Future[dict[Any, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[entry.name][switches].append(_Waiting(entry, keys, future))
        if entry.name not in self._draining:
            self._draining.add(entry.name)
            task = asyncio.ensure_future(self._drain(entry.name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self, model: str) -> None:
        """Runs what gathers for one model until nothing waits."""
        try:
            await asyncio.sleep(self.window_s)
            while self._waiting.get(model):
                groups = self._waiting.pop(model)
                for waiting in groups.values():
                    await self._run_group(waiting)
        finally:
            self._draining.discard(model)

    async def _run_group(self, waiting: list[_Waiting]) -> None:
        entry = waiting[0].entry
        for chunk in self._chunks(waiting):
            await self._run_chunk(entry, chunk)

    async def _run_chunk(self, entry: ModelEntry, chunk: list[_Waiting]) -> None:
        chunk = [w for w in chunk if not w.future.done()]  # timed out while queued
        if not chunk:
            return
        try:
            results = await self._execute(entry, [key for w in chunk for key in w.keys])
        except InterpqlError as exc:
            if exc.code == "RESOURCE_EXHAUSTED" and len(chunk) > 1:
                for w in chunk:
                    await self._run_chunk(entry, [w])
                return
            _fail(chunk, exc)
            return
        except Exception as exc:
            _fail(chunk, exc)
            return
        for w in chunk:
            if not w.future.done():
                w.future.set_result(
                    {key.spec.pass_key(): results[key.spec.pass_key()] for key in w.keys}
                )

    async def _execute(self, entry: ModelEntry, keys: list[Any]) -> dict[Any, Any]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        results = await loop.run_in_executor(entry.executor, self._run_batch, entry, keys)
        for observe in self.pass_observers:
            observe(entry.name, "pass", len(results), time.perf_counter() - started)
        return results

    async def compute(self, entry: ModelEntry, work: str, fn: Work[T], bounded: bool = True) -> T:
        """Every other computation with the model (generation, similar nodes, scored tokens):
        on the model's worker thread, in turn with its passes, under the same timeout (unless
        not `bounded`: a job's work, which no request waits for) and out-of-memory handling.
        `fn` gets an event that is set when the caller stops waiting (timeout, cancellation):
        work of many steps checks it between steps."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def guarded() -> tuple[T, float]:
            started = time.perf_counter()
            with out_of_memory_as_error(work):
                return fn(stop), time.perf_counter() - started

        try:
            result, seconds = await asyncio.wait_for(
                loop.run_in_executor(entry.executor, guarded), self.timeout_s if bounded else None
            )
        except TimeoutError:
            raise inference_timeout(self.timeout_s or 0) from None
        finally:
            stop.set()
        for observe in self.pass_observers:
            observe(entry.name, work, 1, seconds)
        return result

    def _chunks(self, waiting: Sequence[_Waiting]) -> list[list[_Waiting]]:
        """Requests grouped so that each group's prompts are of similar length."""

        def lengths(w: _Waiting) -> list[int]:
            return [len(key.spec.tokens) for key in w.keys]

        chunks: list[list[_Waiting]] = []
        shortest = rows = 0
        for w in sorted(waiting, key=lambda w: max(lengths(w))):
            longest = max(lengths(w))
            fits = chunks and rows + len(w.keys) <= self.max_rows
            if fits and longest <= self.max_length_ratio * shortest:
                chunks[-1].append(w)
                rows += len(w.keys)
                shortest = min(shortest, *lengths(w))
            else:
                chunks.append([w])
                rows, shortest = len(w.keys), min(lengths(w))
        return chunks


def _fail(chunk: list[_Waiting], exc: Exception) -> None:
    for w in chunk:
        if not w.future.done():
            w.future.set_exception(exc)
