"""Explanations and scores for every node of a record store, kept in one compact table.

Each node is explained from its top examples of even rank (0, 2, 4, ...) and scored on the ones
it did not see: the top examples of odd rank and its random sample, mixed as in OpenAI's method.

On disk: `explanations.json.gz`, columns of one row per explanation (kind, layer, index, text,
score, explainer, simulator; a nan score is written as null), names stored once.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from interpql.backends.explanations import (
    ActivationExample,
    BaselineExplainer,
    BaselineSimulator,
    Explainer,
    Simulator,
    score_explanation,
    tdb_scored_explanation,
)
from interpql.demo.records import Example, RecordStore, tdb_neuron_id

FILE_NAME = "explanations.json.gz"
FORMAT = "interpql-explanations"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExplanationRow:
    kind: str
    layer: int
    index: int
    text: str
    score: float  # correlation of the simulation with the truth; nan where never scored
    explainer: str
    simulator: str


class ExplanationTable:
    def __init__(self, rows: Sequence[ExplanationRow]) -> None:
        self.rows = tuple(rows)
        self._by_node: dict[tuple[str, int, int], list[ExplanationRow]] = {}
        for row in self.rows:
            self._by_node.setdefault((row.kind, row.layer, row.index), []).append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def for_node(self, kind: str, layer: int, index: int) -> list[ExplanationRow]:
        """The node's explanations, best score first."""
        rows = self._by_node.get((kind, layer, index), [])
        return sorted(rows, key=lambda r: -r.score if not math.isnan(r.score) else math.inf)

    def to_tdb_json(self, kind: str, layer: int, index: int) -> dict[str, Any]:
        """Transformer Debugger's NeuronSimulationResults: one line of its explanations JSONL."""
        return {
            "dataclass_name": "NeuronSimulationResults",
            "neuron_id": tdb_neuron_id(layer, index),
            "scored_explanations": [
                tdb_scored_explanation(row.text, row.score, [])
                for row in self.for_node(kind, layer, index)
            ],
        }

    def save(self, directory: str | Path) -> None:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        names = {col: sorted({getattr(r, col) for r in self.rows}) for col in _NAMED_COLUMNS}
        table: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "names": names}
        for col in _NAMED_COLUMNS:
            code = {name: i for i, name in enumerate(names[col])}
            table[col] = [code[getattr(r, col)] for r in self.rows]
        table |= {
            "layer": [r.layer for r in self.rows],
            "index": [r.index for r in self.rows],
            "text": [r.text for r in self.rows],
            "score": [None if math.isnan(r.score) else r.score for r in self.rows],
        }
        data = json.dumps(table, separators=(",", ":"), allow_nan=False).encode()
        # mtime=0: the same table gives the same bytes, so rebuilding the demo changes no file.
        (root / FILE_NAME).write_bytes(gzip.compress(data, mtime=0))

    @classmethod
    def load(cls, directory: str | Path) -> ExplanationTable:
        table = json.loads(gzip.decompress((Path(directory) / FILE_NAME).read_bytes()))
        if table.get("format") != FORMAT or table.get("version") != FORMAT_VERSION:
            raise ValueError(f"{directory} holds no explanations of format {FORMAT}")
        named = {col: [table["names"][col][c] for c in table[col]] for col in _NAMED_COLUMNS}
        scores = [math.nan if s is None else float(s) for s in table["score"]]
        rows = [
            ExplanationRow(kind, layer, index, text, score, explainer, simulator)
            for kind, layer, index, text, score, explainer, simulator in zip(
                named["kind"],
                table["layer"],
                table["index"],
                table["text"],
                scores,
                named["explainer"],
                named["simulator"],
                strict=True,
            )
        ]
        return cls(rows)


_NAMED_COLUMNS = ("kind", "explainer", "simulator")


def explain_and_score_all(
    store: RecordStore,
    decode_token: Callable[[int], str],
    *,
    explainer: Explainer | None = None,
    simulator: Simulator | None = None,
    progress: bool = False,
) -> ExplanationTable:
    """Explains and scores every node of `store` (by default offline, with the baselines).

    Runs its own event loop: call it from synchronous code (a build step), not from a server.
    """
    return asyncio.run(
        _explain_and_score_all(
            store,
            decode_token,
            explainer or BaselineExplainer(),
            simulator or BaselineSimulator(),
            progress,
        )
    )


async def _explain_and_score_all(
    store: RecordStore,
    decode_token: Callable[[int], str],
    explainer: Explainer,
    simulator: Simulator,
    progress: bool,
) -> ExplanationTable:
    # Decoding each distinct token once is much faster than once per occurrence.
    strings = {int(t): decode_token(int(t)) for t in np.unique(store.tokens)}

    def examples(chosen: Sequence[Example]) -> list[ActivationExample]:
        return [
            ActivationExample([strings[t] for t in e.token_ids], list(e.activations))
            for e in chosen
        ]

    rows = []
    for kind, layer, index in _progress(_nodes(store), progress, _count(store)):
        record = store.node_record(kind, layer, index)
        texts = await explainer.explain(examples(record.top[0::2]))
        held_out = examples(record.top[1::2] + record.random)
        scored = await score_explanation(simulator, texts[0], held_out)
        rows.append(
            ExplanationRow(
                kind, layer, index, texts[0], scored.score, explainer.name, simulator.name
            )
        )
    return ExplanationTable(rows)


def _nodes(store: RecordStore) -> Iterator[tuple[str, int, int]]:
    for group in store.groups():
        for index in range(group.n_nodes):
            yield group.kind, group.layer, index


def _count(store: RecordStore) -> int:
    return sum(group.n_nodes for group in store.groups())


def _progress(
    nodes: Iterator[tuple[str, int, int]], enabled: bool, total: int
) -> Iterator[tuple[str, int, int]]:
    if not enabled:
        return nodes
    from tqdm import tqdm

    return iter(tqdm(nodes, total=total, desc="explanations", unit="node"))
