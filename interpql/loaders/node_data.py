"""Per-request loaders of node records and explanations: one batched read per source.

Every `Node.topActivations`, `statistics`, `explanations`... field of one operation asks these
loaders; the DataLoader gathers the nodes asked for in the same tick, and each of the model's
sources is read once for the whole batch, on a worker thread. Sources that are slow to read
(`cacheable`) go through the shared cache first.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from strawberry.dataloader import DataLoader

from interpql.backends.explanations.normalize import normalize_activations
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.registry import ModelRegistry
from interpql.loaders.sources import (
    Example,
    ExplanationData,
    NodeRecordData,
    NodeSource,
    Statistics,
)
from interpql.specs import NodeRef

__all__ = ["UNREAD", "NodeDataLoaders", "Unread", "normalize_activations"]

K = TypeVar("K")
V = TypeVar("V")


class Unread:
    """What `NodeDataLoaders.read_*` answer for a node this request has not read (yet)."""


UNREAD = Unread()


def _settled(loader: DataLoader[K, V], key: K) -> V | Unread:
    """The loader's answer for `key` if this request already has it, without awaiting."""
    future = loader.cache_map.get(key)
    if future is None or not future.done() or future.cancelled() or future.exception():
        return UNREAD  # a failed read is raised again by awaiting it, in its own field
    return future.result()


RecordResult = NodeRecordData | None | Exception
ExplanationsResult = list[ExplanationData] | Exception
_BatchLoad = Callable[[Sequence[NodeRef]], Awaitable[Sequence[Any]]]


class NodeDataLoaders:
    def __init__(self, registry: ModelRegistry, cache: NodeDataCache | None = None) -> None:
        self._registry = registry
        self._cache = cache
        self.records, self.explanations = self._new_loaders()
        # What read_all read, by node: answers that are here, with no future each.
        self._records_read: dict[NodeRef, NodeRecordData | None] = {}
        self._explanations_read: dict[NodeRef, list[ExplanationData]] = {}

    async def read_all(self, nodes: Sequence[NodeRef], records: bool, explanations: bool) -> None:
        """Reads the records and/or explanations of `nodes` in one batch per source, and keeps
        each node's answer for the rest of the request: a list of nodes is read without a
        future per node. A node whose read failed gets a failed future in its loader, raised
        in that node's own fields."""
        loop = asyncio.get_running_loop()

        async def read(
            loader: DataLoader[NodeRef, Any], settled: dict[NodeRef, Any], load: _BatchLoad
        ) -> None:
            missing = [
                n
                for n in dict.fromkeys(nodes)
                if n not in settled and loader.cache_map.get(n) is None
            ]
            if not missing:
                return
            for node, answer in zip(missing, await load(missing), strict=True):
                if isinstance(answer, Exception):
                    future = loop.create_future()
                    future.set_exception(answer)
                    future.exception()  # seen: the node's own field raises it when it awaits
                    loader.cache_map.set(node, future)
                else:
                    settled[node] = answer

        await asyncio.gather(
            *([read(self.records, self._records_read, self._load_records)] if records else []),
            *(
                [read(self.explanations, self._explanations_read, self._load_explanations)]
                if explanations
                else []
            ),
        )

    def read_record(self, node: NodeRef) -> NodeRecordData | Unread | None:
        if node in self._records_read:
            return self._records_read[node]
        return _settled(self.records, node)

    def read_explanations(self, node: NodeRef) -> list[ExplanationData] | Unread:
        if node in self._explanations_read:
            return self._explanations_read[node]
        return _settled(self.explanations, node)

    def _new_loaders(
        self,
    ) -> tuple[
        DataLoader[NodeRef, NodeRecordData | None], DataLoader[NodeRef, list[ExplanationData]]
    ]:
        return (
            DataLoader(load_fn=self._load_records),
            DataLoader(load_fn=self._load_explanations),
        )

    def release(self) -> None:
        """Forgets what this request read, once its answer is sent (RequestContext.release);
        fresh DataLoaders, since a DataLoader keeps its last batch."""
        self._records_read.clear()
        self._explanations_read.clear()
        self.records, self.explanations = self._new_loaders()

    def _by_model(self, nodes: Sequence[NodeRef]) -> dict[str, list[NodeRef]]:
        groups: dict[str, list[NodeRef]] = defaultdict(list)
        for node in dict.fromkeys(nodes):
            groups[node.model].append(node)
        return groups

    async def _load_records(self, nodes: Sequence[NodeRef]) -> list[RecordResult]:
        found: dict[NodeRef, RecordResult] = {}
        for model, group in self._by_model(nodes).items():
            for source in self._registry.get(model).sources:
                missing = [node for node in group if found.get(node) is None]
                if not missing:
                    break
                read = await self._read(source, "records", missing, _record_codec)
                found.update((n, answer) for n, answer in zip(missing, read, strict=True) if answer)
        return [found.get(node) for node in nodes]

    async def _load_explanations(self, nodes: Sequence[NodeRef]) -> list[ExplanationsResult]:
        found: dict[NodeRef, ExplanationsResult] = defaultdict(list)
        for model, group in self._by_model(nodes).items():
            for source in self._registry.get(model).sources:
                read = await self._read(source, "explanations", group, _explanations_codec)
                for node, answer in zip(group, read, strict=True):
                    previous = found[node]
                    if isinstance(answer, Exception) or isinstance(previous, Exception):
                        found[node] = answer if isinstance(answer, Exception) else previous
                    else:
                        previous.extend(answer)
        return [_best_first(found[node]) for node in nodes]

    async def _read(
        self, source: NodeSource, what: str, nodes: list[NodeRef], codec: _Codec
    ) -> list[Any]:
        reader: Callable[[list[NodeRef]], list[Any]] = (
            source.read_records if what == "records" else source.read_explanations
        )
        if self._cache is None or not getattr(source, "cacheable", False):
            return await asyncio.to_thread(reader, nodes)
        keys = [f"{what}:{source.name}:{node.id}" for node in nodes]
        cached = await self._cache.get_many(keys)
        answers: list[Any] = [None if c is None else codec.decode(c) for c in cached]
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            read = await asyncio.to_thread(reader, [nodes[i] for i in missing])
            for i, answer in zip(missing, read, strict=True):
                answers[i] = answer
            await self._cache.set_many(
                [
                    (keys[i], codec.encode(answer))
                    for i, answer in zip(missing, read, strict=True)
                    if not isinstance(answer, Exception)
                ]
            )
        return answers


def _best_first(found: ExplanationsResult) -> ExplanationsResult:
    if isinstance(found, Exception):
        return found
    return sorted(found, key=lambda e: -e.score if e.score is not None else float("inf"))


@dataclasses.dataclass(frozen=True)
class _Codec:
    """To and from the JSON a cache holds."""

    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


def _decode_record(raw: dict[str, Any] | None) -> NodeRecordData | None:
    if raw is None or raw.get("absent"):
        return None

    def examples(items: list[dict[str, Any]]) -> tuple[Example, ...]:
        return tuple(
            Example(
                tuple(e["tokens"]),
                None if e["token_ids"] is None else tuple(e["token_ids"]),
                tuple(e["activations"]),
            )
            for e in items
        )

    stats = raw["statistics"]
    stats["quantile_boundaries"] = tuple(stats["quantile_boundaries"])
    return NodeRecordData(
        source=raw["source"],
        top=examples(raw["top"]),
        random=examples(raw["random"]),
        statistics=Statistics(**stats),
    )


# Absent answers are cached too (as a marker), so unknown nodes do not hit the source again.
_record_codec = _Codec(
    encode=lambda r: {"absent": True} if r is None else dataclasses.asdict(r),
    decode=_decode_record,
)
_explanations_codec = _Codec(
    encode=lambda found: [dataclasses.asdict(e) for e in found],
    decode=lambda raw: [ExplanationData(**e) for e in raw],
)
