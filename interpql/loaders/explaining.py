"""Explaining and scoring nodes: the work behind the explainNode and scoreExplanation jobs.

A node is explained from some of its top records (ranks 0, 2, 4, ...) and every explanation is
scored on the held-out rest: the other top records mixed with random ones, as in OpenAI's method.
Results go to the explanation store with their provenance; an identical request (same node,
method, models and numbers) is answered from the store instead of paying again. A failure stores
nothing, so nothing already stored is lost or overwritten.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from interpql.backends.explanations.api import (
    ApiSettings,
    AutoSimulator,
    JsonSimulator,
    LogprobSimulator,
    OpenAIExplainer,
)
from interpql.backends.explanations.base import ActivationExample, Explainer, Simulator
from interpql.backends.explanations.baseline import BaselineExplainer, BaselineSimulator
from interpql.backends.explanations.scoring import score_explanation
from interpql.errors import InterpqlError, UnavailableError
from interpql.loaders.jobs import Job, JobManager, Progress
from interpql.loaders.registry import ModelEntry
from interpql.loaders.search import SearchIndex
from interpql.loaders.sources import Example, ExplanationStore, NodeRecordData, StoredExplanation
from interpql.specs import NodeRef

if TYPE_CHECKING:
    import openai


@dataclass(frozen=True)
class ExplainOptions:
    method: str = "auto"  # auto (api when configured, else baseline) | api | baseline
    examples: int = 10  # top records shown to the explainer
    explanations: int = 1  # candidates asked for; each is scored and stored
    held_out_random: int = 5  # random records mixed into the scoring set


@dataclass(frozen=True)
class ScoreOptions:
    method: str = "auto"
    held_out_random: int = 5


class ExplanationService:
    def __init__(
        self,
        store: ExplanationStore,
        search: SearchIndex,
        jobs: JobManager,
        api: ApiSettings | None = None,
    ) -> None:
        self.store = store
        self.search = search
        self.jobs = jobs
        self.api = api
        # One client (one connection pool) for every job, closed with the server.
        self._client: openai.AsyncOpenAI | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _method(self, method: str) -> str:
        if method == "auto":
            return "api" if self.api is not None else "baseline"
        if method == "api" and self.api is None:
            raise UnavailableError(
                "No explainer API is configured (--openai-base-url / OPENAI_API_KEY)."
            )
        return method

    def _models(self, method: str, key_id: str, n: int) -> tuple[Explainer, Simulator]:
        if method == "baseline":
            return BaselineExplainer(), BaselineSimulator()
        api = self.api
        assert api is not None
        if self._client is None:
            self._client = api.client()
        client = self._client

        def spend(tokens: int) -> None:
            self.jobs.spend(key_id, tokens)

        simulator: Simulator
        if api.simulator == "json":
            simulator = JsonSimulator(api, on_usage=spend, client=client)
        elif api.simulator == "logprobs":
            simulator = LogprobSimulator(api, on_usage=spend, client=client)
        else:
            simulator = AutoSimulator(api, on_usage=spend, client=client)
        return OpenAIExplainer(api, n, spend, client), simulator

    def _key(self, op: str, node: NodeRef, method: str, options: object, text: str = "") -> str:
        described = {"op": op, "node": node.id, "method": method, "options": asdict(options)}  # type: ignore[call-overload]
        if method == "api" and self.api is not None:
            described |= {
                "explainer": self.api.explainer_model,
                "simulator": self.api.simulator_model,
                "temperature": self.api.temperature,
                "simulation": self.api.simulator,
            }
        described["text"] = text
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    async def submit_explain(
        self, entry: ModelEntry, node: NodeRef, options: ExplainOptions, key_id: str
    ) -> Job:
        method = self._method(options.method)

        async def work(job: Job, progress: Progress) -> list[StoredExplanation]:
            request_key = self._key("explain", node, method, options)
            if earlier := self.store.find_request(request_key):
                job.from_store = True
                return earlier
            record = await _record(entry, node)
            shown, held_out = split_examples(record, options.examples, options.held_out_random)
            explainer, simulator = self._models(method, key_id, options.explanations)
            progress(0.1, f"explaining from {len(shown)} examples with {explainer.name}")
            texts = distinct(await explainer.explain(shown))
            scored = []
            for i, text in enumerate(texts):
                progress(0.2 + 0.7 * i / len(texts), f"scoring explanation {i + 1}/{len(texts)}")
                scored.append(await score_explanation(simulator, text, held_out))
            progress(0.95, "storing")
            provenance = {"examples": len(shown), "held_out": len(held_out), "method": method}
            return [
                self._store(
                    node,
                    s.explanation,
                    s.score,
                    s.simulator,
                    explainer.name,
                    request_key,
                    provenance | {"calibrated_rsquared": s.rsquared},
                )
                for s in scored
            ]

        return await self.jobs.submit("explain", node.id, key_id, work)

    async def submit_score(
        self, entry: ModelEntry, node: NodeRef, text: str, options: ScoreOptions, key_id: str
    ) -> Job:
        method = self._method(options.method)

        async def work(job: Job, progress: Progress) -> list[StoredExplanation]:
            request_key = self._key("score", node, method, options, text)
            if earlier := self.store.find_request(request_key):
                job.from_store = True
                return earlier
            record = await _record(entry, node)
            _, held_out = split_examples(record, 0, options.held_out_random)
            _, simulator = self._models(method, key_id, 1)
            progress(0.1, f"simulating {len(held_out)} examples with {simulator.name}")
            scored = await score_explanation(simulator, text, held_out)
            provenance = {
                "held_out": len(held_out),
                "method": method,
                "calibrated_rsquared": scored.rsquared,
            }
            return [
                self._store(
                    node, text, scored.score, scored.simulator, "user", request_key, provenance
                )
            ]

        return await self.jobs.submit("score", node.id, key_id, work)

    def _store(
        self,
        node: NodeRef,
        text: str,
        score: float,
        scorer: str,
        explainer: str,
        request_key: str,
        provenance: dict[str, Any],
    ) -> StoredExplanation:
        stored = self.store.add(node, text, score, scorer, explainer, request_key, provenance)
        self.search.add_explanations([(node.model, node.id, text, stored.data.score)])
        return stored


async def _record(entry: ModelEntry, node: NodeRef) -> NodeRecordData:
    for source in entry.sources:
        [answer] = await asyncio.to_thread(source.read_records, [node])
        if isinstance(answer, Exception):
            raise answer
        if answer is not None and answer.top:
            return answer
    raise InterpqlError(f"{node.id} has no dataset records to explain from.", code="NO_RECORDS")


def distinct(texts: Sequence[str]) -> list[str]:
    """The explanations in order, each scored and stored once: candidates that differ only in
    case or spacing are the same explanation."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        key = " ".join(text.casefold().split())
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


def split_examples(
    record: NodeRecordData, shown: int, random: int
) -> tuple[list[ActivationExample], list[ActivationExample]]:
    """Top records at even ranks are shown (up to `shown`); odd ranks, and `random` random
    records, are held out for scoring. With `shown` 0, every top record is held out."""

    def examples(items: Sequence[Example]) -> list[ActivationExample]:
        return [ActivationExample(list(e.tokens), list(e.activations)) for e in items]

    if shown == 0:
        return [], examples(record.top) + examples(record.random[:random])
    return (
        examples(record.top[0::2][:shown]),
        examples(record.top[1::2]) + examples(record.random[:random]),
    )
