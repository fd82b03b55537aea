"""Where what is known about a node comes from: records and explanations, behind one interface.

A model has an ordered list of sources, each with a name users see. A source answers a whole
batch of nodes per call (the per-request loaders in `node_data.py` call it once per batch);
its reads are blocking and run on a worker thread.

    NodeSource
    └── CompactSource     the demo's compact store: records.npz + explanations.json.gz
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from interpql.demo.explanations import ExplanationTable
from interpql.demo.records import NodeRecord, RecordStore
from interpql.loaders.nodes import NodeRef


@dataclass(frozen=True)
class Example:
    token_ids: tuple[int, ...]
    activations: tuple[float, ...]


@dataclass(frozen=True)
class NodeStatistics:
    max: float
    mean: float
    variance: float
    skewness: float | None
    kurtosis: float | None
    density: float | None
    quantile_boundaries: tuple[float, ...]


@dataclass(frozen=True)
class NodeRecordData:
    source: str
    top: tuple[Example, ...]  # highest first
    random: tuple[Example, ...]
    statistics: NodeStatistics


@dataclass(frozen=True)
class ExplanationData:
    source: str
    text: str
    score: float | None
    scorer: str
    explainer: str


class NodeSource(abc.ABC):
    name: str

    @abc.abstractmethod
    def read_records(self, nodes: Sequence[NodeRef]) -> list[NodeRecordData | None]:
        """One entry per node, None where this source knows nothing of it."""

    @abc.abstractmethod
    def read_explanations(self, nodes: Sequence[NodeRef]) -> list[list[ExplanationData]]:
        """Each node's explanations, best score first."""


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class CompactSource(NodeSource):
    """Records and explanations held in memory from the demo's compact files."""

    def __init__(self, name: str, records: RecordStore, explanations: ExplanationTable | None):
        self.name = name
        self._records = records
        self._explanations = explanations

    @classmethod
    def open(cls, name: str, folder: Path) -> CompactSource:
        explanations_dir = folder / "explanations"
        table = ExplanationTable.load(explanations_dir) if explanations_dir.exists() else None
        return cls(name, RecordStore.load(folder / "records"), table)

    def read_records(self, nodes: Sequence[NodeRef]) -> list[NodeRecordData | None]:
        return [self._record(node) for node in nodes]

    def _record(self, node: NodeRef) -> NodeRecordData | None:
        kind = node.kind.value
        if not 0 <= node.index < self._records.count(kind, node.layer):
            return None
        record = self._records.node_record(kind, node.layer, node.index)
        return NodeRecordData(
            source=self.name,
            top=_examples(record, "top"),
            random=_examples(record, "random"),
            statistics=NodeStatistics(
                max=record.stats.max,
                mean=record.stats.mean,
                variance=record.stats.variance,
                skewness=_finite(record.stats.skewness),
                kurtosis=_finite(record.stats.kurtosis),
                density=record.stats.density,
                quantile_boundaries=record.quantile_boundaries,
            ),
        )

    def read_explanations(self, nodes: Sequence[NodeRef]) -> list[list[ExplanationData]]:
        if self._explanations is None:
            return [[] for _ in nodes]
        return [
            [
                ExplanationData(
                    self.name, row.text, _finite(row.score), row.simulator, row.explainer
                )
                for row in self._explanations.for_node(node.kind.value, node.layer, node.index)
            ]
            for node in nodes
        ]


def _examples(record: NodeRecord, which: str) -> tuple[Example, ...]:
    chosen = record.top if which == "top" else record.random
    # Offsets of -1 mark slots the corpus could not fill (a node active in few sequences).
    return tuple(Example(e.token_ids, e.activations) for e in chosen if e.offset >= 0)
