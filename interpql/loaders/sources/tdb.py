"""Transformer Debugger's formats, from a local folder or any blobfile URL (az://, gs://).

Records: `<records>/<layer>/<index>.json`, a NeuronRecord. Explanations:
`<explanations>/<layer>/<index>.jsonl`, lines of `{neuron_id, scored_explanations: [...]}`.
One folder holds one node kind. Paths are built from integers under the configured roots only,
so no id can reach outside them. Remote stores answer one small file at a time slowly: a batch
is read concurrently, at most `max_concurrency` files at once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import blobfile as bf

from interpql.errors import UnavailableError
from interpql.loaders.sources.base import (
    Example,
    ExplanationData,
    NodeRecordData,
    NodeSource,
    RecordAnswer,
    Statistics,
    finite,
)
from interpql.specs import NodeRef

log = logging.getLogger(__name__)
T = TypeVar("T")


class BrokenRecordError(UnavailableError):
    default_code = "NODE_DATA_UNREADABLE"


class TdbFolderSource(NodeSource):
    cacheable = True  # every read is a file, often remote

    def __init__(
        self,
        name: str,
        kind: str,
        records: str | None = None,
        explanations: str | None = None,
        max_concurrency: int = 16,
    ) -> None:
        self.name = name
        self.kind = kind
        self._records = records.rstrip("/") if records else None
        self._explanations = explanations.rstrip("/") if explanations else None
        self._max_concurrency = max_concurrency

    def _path(self, root: str, node: NodeRef, suffix: str) -> str:
        path = bf.join(root, str(int(node.layer)), f"{int(node.index)}{suffix}")
        if not path.startswith(root + "/"):
            raise BrokenRecordError(f"{path} is outside the configured folder.")
        return path

    def _read_all(
        self, nodes: Sequence[NodeRef], read: Callable[[NodeRef], T], empty: T
    ) -> list[T | Exception]:
        def guarded(node: NodeRef) -> T | Exception:
            if node.kind != self.kind:
                return empty
            try:
                return read(node)
            except FileNotFoundError:
                return empty
            except Exception as exc:  # one broken file fails its node only
                log.warning("source %s: cannot read %s: %r", self.name, node.id, exc)
                return BrokenRecordError(f"The {self.name} data of {node.id} is unreadable.")

        with ThreadPoolExecutor(max_workers=self._max_concurrency) as pool:
            return list(pool.map(guarded, nodes))

    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        root = self._records
        if root is None:
            return [None for _ in nodes]
        return self._read_all(nodes, lambda n: self._record(root, n), None)

    def _record(self, root: str, node: NodeRef) -> NodeRecordData:
        raw = json.loads(bf.read_bytes(self._path(root, node, ".json")))
        top = tuple(_example(r) for r in raw.get("most_positive_activation_records") or [])
        random = tuple(_example(r) for r in raw.get("random_sample") or [])
        peak = max((max(e.activations, default=-math.inf) for e in top), default=math.nan)
        return NodeRecordData(
            source=self.name,
            top=top,
            random=random,
            statistics=Statistics(
                max=peak,
                mean=finite(raw.get("mean")),
                variance=finite(raw.get("variance")),
                skewness=finite(raw.get("skewness")),
                kurtosis=finite(raw.get("kurtosis")),
                density=None,
                quantile_boundaries=tuple(
                    float(b) for b in raw.get("quantile_boundaries") or [] if b is not None
                ),
            ),
        )

    def read_explanations(
        self, nodes: Sequence[NodeRef]
    ) -> list[list[ExplanationData] | Exception]:
        root = self._explanations
        if root is None:
            return [[] for _ in nodes]
        return self._read_all(nodes, lambda n: self._explained(root, n), [])

    def _explained(self, root: str, node: NodeRef) -> list[ExplanationData]:
        found = []
        text = bf.read_bytes(self._path(root, node, ".jsonl")).decode()
        for line in text.splitlines():
            if not line.strip():
                continue
            for scored in json.loads(line).get("scored_explanations") or []:
                simulation = scored.get("scored_simulation") or {}
                found.append(
                    ExplanationData(
                        source=self.name,
                        text=str(scored["explanation"]),
                        score=finite(simulation.get("ev_correlation_score")),
                        scorer="simulation (Transformer Debugger)",
                        explainer="",
                    )
                )
        return sorted(found, key=lambda e: -e.score if e.score is not None else math.inf)


def _example(raw: dict[str, Any]) -> Example:
    tokens = tuple(str(t) for t in raw["tokens"])
    activations = [float(a) for a in raw["activations"]]
    n = len(tokens)
    if len(activations) == n * (n + 1) // 2 and len(activations) != n:
        # An attention head's record: a flattened lower triangle, query i has i + 1 keys.
        # Per token, we show the strongest of its values.
        rows, start = [], 0
        for i in range(n):
            rows.append(max(activations[start : start + i + 1]))
            start += i + 1
        activations = rows
    if len(activations) != n:
        raise BrokenRecordError(f"{n} tokens but {len(activations)} activations")
    return Example(tokens, None, tuple(activations))
