"""Per-request loaders of node records and explanations: one batched read per source.

Every `Node.topActivations`, `statistics`, `explanations`... field of one operation asks these
loaders; the DataLoader gathers the nodes asked for in the same tick, and each of the model's
sources is read once for the whole batch, on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

from strawberry.dataloader import DataLoader

from interpql.loaders.node_sources import ExplanationData, NodeRecordData
from interpql.loaders.nodes import NodeRef
from interpql.loaders.registry import ModelRegistry


class NodeDataLoaders:
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self.records = DataLoader[NodeRef, NodeRecordData | None](load_fn=self._load_records)
        self.explanations = DataLoader[NodeRef, list[ExplanationData]](
            load_fn=self._load_explanations
        )

    def _by_model(self, nodes: Sequence[NodeRef]) -> dict[str, list[NodeRef]]:
        groups: dict[str, list[NodeRef]] = defaultdict(list)
        for node in dict.fromkeys(nodes):
            groups[node.model].append(node)
        return groups

    async def _load_records(self, nodes: Sequence[NodeRef]) -> list[NodeRecordData | None]:
        found: dict[NodeRef, NodeRecordData | None] = {}
        for model, group in self._by_model(nodes).items():
            for source in self._registry.get(model).sources:
                missing = [node for node in group if found.get(node) is None]
                if not missing:
                    break
                read = await asyncio.to_thread(source.read_records, missing)
                found.update((node, data) for node, data in zip(missing, read, strict=True) if data)
        return [found.get(node) for node in nodes]

    async def _load_explanations(self, nodes: Sequence[NodeRef]) -> list[list[ExplanationData]]:
        found: dict[NodeRef, list[ExplanationData]] = defaultdict(list)
        for model, group in self._by_model(nodes).items():
            for source in self._registry.get(model).sources:
                read = await asyncio.to_thread(source.read_explanations, group)
                for node, explanations in zip(group, read, strict=True):
                    found[node].extend(explanations)
        return [_best_first(found[node]) for node in nodes]


def _best_first(explanations: list[ExplanationData]) -> list[ExplanationData]:
    return sorted(explanations, key=lambda e: -e.score if e.score is not None else float("inf"))
