"""What is known about a node, and the interface every source of it implements.

A model has an ordered list of sources, each with a name users see. A source answers a whole
batch of nodes per call (the per-request loaders in `node_data.py` call it once per batch); its
reads are blocking and run on a worker thread. Per node, a source answers a value, None (it
knows nothing of that node), or an exception (that node's data is broken), so one bad file
fails one field, not the query.

    NodeSource
    ├── CompactSource       the demo's compact store (records.npz + explanations.json.gz)
    ├── TdbFolderSource     Transformer Debugger's JSON records / JSONL explanations, blobfile
    └── ExplanationStore    explanations generated later, in SQLite (also written to)
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from interpql.specs import NodeRef


@dataclass(frozen=True)
class Example:
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...] | None  # None where the source keeps only the text
    activations: tuple[float, ...]

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


@dataclass(frozen=True)
class Statistics:
    max: float
    mean: float | None
    variance: float | None
    skewness: float | None
    kurtosis: float | None
    density: float | None
    quantile_boundaries: tuple[float, ...]


@dataclass(frozen=True)
class NodeRecordData:
    source: str
    # Tuples, or sequences that build each example when it is read (CompactSource's: a
    # 1,000-node lookup shows 5 of each node's 15 windows).
    top: Sequence[Example]  # highest first
    random: Sequence[Example]
    statistics: Statistics
    # The largest activation of the top examples, where the source knows it without building
    # them (None: computed from `top`).
    top_peak: float | None = None


@dataclass(frozen=True)
class ExplanationData:
    source: str
    text: str
    score: float | None
    scorer: str
    explainer: str
    created: str | None = None  # ISO 8601, where known


RecordAnswer = NodeRecordData | None | Exception


class NodeSource(abc.ABC):
    name: str

    @abc.abstractmethod
    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        """One answer per node: its record, None, or the exception that reading it raised."""

    @abc.abstractmethod
    def read_explanations(
        self, nodes: Sequence[NodeRef]
    ) -> list[list[ExplanationData] | Exception]:
        """Each node's explanations (best score first), or the exception reading them raised."""

    # Sources that can list what they hold make it searchable (loaders/search.py).

    def list_explanations(self, model: str) -> Iterable[tuple[str, str, float | None]]:
        """(node id, text, score) of every explanation of `model`'s nodes."""
        return ()

    def list_peaks(self, model: str) -> Iterable[tuple[str, str, float]]:
        """(node id, token text, activation) where each of a node's top examples peaks."""
        return ()

    def layer_values(self, model: str, kind: str, layer: int, what: str) -> np.ndarray | None:
        """One value per node of a layer (`what`: "max_activation" or "explanation_score";
        nan where unknown), for sorting; None when this source cannot tell."""
        return None


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
