"""Explanations and scores for every node of a record store, kept in one compact table.

Each node is explained from its top examples of even rank (0, 2, 4, ...) and scored on the ones
it did not see: the top examples of odd rank and its random sample, mixed as in OpenAI's method.

On disk it is the compact table of loaders/sources/compact_format.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from interpql.backends.explanations import (
    ActivationExample,
    BaselineExplainer,
    BaselineSimulator,
    Explainer,
    Simulator,
    score_explanation,
)
from interpql.loaders.sources.compact_format import (
    ExplanationRow,
    ExplanationTable,
    RecordStore,
    StoredWindow,
)


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

    def examples(chosen: Sequence[StoredWindow]) -> list[ActivationExample]:
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
