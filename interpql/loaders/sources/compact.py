"""The demo's compact store: records and explanations held in memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from interpql.loaders.sources.base import (
    Example,
    ExplanationData,
    NodeRecordData,
    NodeSource,
    RecordAnswer,
    Statistics,
    finite,
)
from interpql.loaders.sources.compact_format import ExplanationTable, NodeRecord, RecordStore
from interpql.specs import NodeRef


class CompactSource(NodeSource):
    """Records and explanations held in memory from the demo's compact files."""

    def __init__(
        self,
        name: str,
        records: RecordStore,
        explanations: ExplanationTable | None,
        decode: Callable[[int], str],
    ):
        self.name = name
        self.records = records
        self.explanations = explanations
        self._decode = decode

    @classmethod
    def open(cls, name: str, folder: Path, decode: Callable[[int], str]) -> CompactSource:
        explanations_dir = folder / "explanations"
        table = ExplanationTable.load(explanations_dir) if explanations_dir.exists() else None
        return cls(name, RecordStore.load(folder / "records"), table, decode)

    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        return [self._record(node) for node in nodes]

    def _record(self, node: NodeRef) -> NodeRecordData | None:
        kind = node.kind
        if not 0 <= node.index < self.records.count(kind, node.layer):
            return None
        record = self.records.node_record(kind, node.layer, node.index)
        return NodeRecordData(
            source=self.name,
            top=self._examples(record, "top"),
            random=self._examples(record, "random"),
            statistics=Statistics(
                max=record.stats.max,
                mean=record.stats.mean,
                variance=record.stats.variance,
                skewness=finite(record.stats.skewness),
                kurtosis=finite(record.stats.kurtosis),
                density=record.stats.density,
                quantile_boundaries=record.quantile_boundaries,
            ),
        )

    def read_explanations(
        self, nodes: Sequence[NodeRef]
    ) -> list[list[ExplanationData] | Exception]:
        table = self.explanations
        if table is None:
            return [[] for _ in nodes]
        return [
            [
                ExplanationData(
                    self.name, row.text, finite(row.score), row.simulator, row.explainer
                )
                for row in table.for_node(node.kind, node.layer, node.index)
            ]
            for node in nodes
        ]

    def _examples(self, record: NodeRecord, which: str) -> tuple[Example, ...]:
        chosen = record.top if which == "top" else record.random
        # Offsets of -1 mark slots the corpus could not fill (a node active in few sequences).
        return tuple(
            Example(tuple(self._decode(t) for t in e.token_ids), e.token_ids, e.activations)
            for e in chosen
            if e.offset >= 0
        )

    def list_explanations(self, model: str) -> Iterable[tuple[str, str, float | None]]:
        if self.explanations is None:
            return
        for row in self.explanations.rows:
            node = NodeRef(model, row.kind, row.layer, row.index)
            yield node.id, row.text, finite(row.score)

    def list_peaks(self, model: str) -> Iterable[tuple[str, str, float]]:
        window = self.records.layout.window
        for group in self.records.groups():
            arrays = self.records.arrays(group.kind, group.layer)
            offsets = arrays["top_offsets"][:, 0]  # each node's best example
            acts = arrays["top_acts"][:, 0].astype(np.float32)  # [node, window]
            peaks = acts.argmax(axis=1)
            for index in np.flatnonzero(offsets >= 0):
                position = int(offsets[index]) + int(peaks[index])
                if position >= len(self.records.tokens) or peaks[index] >= window:
                    continue
                node = NodeRef(model, group.kind, group.layer, int(index))
                token = self._decode(int(self.records.tokens[position]))
                yield node.id, token, float(acts[index, peaks[index]])

    def layer_values(self, model: str, kind: str, layer: int, what: str) -> np.ndarray | None:
        count = self.records.count(kind, layer)
        if count == 0:
            return None
        if what == "max_activation":
            return self.records.arrays(kind, layer)["max"].astype(np.float64)
        scores = np.full(count, np.nan)
        if self.explanations is not None:
            for index in range(count):
                found = self.explanations.for_node(kind, layer, index)
                if found and math.isfinite(found[0].score):
                    scores[index] = found[0].score
        return scores
