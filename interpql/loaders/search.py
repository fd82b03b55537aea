"""Finding nodes: by the words of their explanations (SQLite FTS5, ranked by BM25) and by the
token their top examples peak on (ranked by the share of their top examples that peak there, a
score in [0, 1] that compares across kinds, whatever their activations' scales), optionally
within one model, node kind and layer.

One index per server, in memory, filled at start-up from every source that can list its
contents (the compact store, the explanation store) and kept current as explanations are
added. Remote folders cannot be listed, so their nodes are found by id only.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from interpql.loaders.sources.base import NodeSource

_SCHEMA = """
CREATE VIRTUAL TABLE explanations USING fts5(
    text, node_id UNINDEXED, model UNINDEXED, kind UNINDEXED, layer UNINDEXED, score UNINDEXED,
    tokenize = 'porter unicode61'
);
CREATE TABLE peaks (token TEXT NOT NULL, node_id TEXT NOT NULL, model TEXT NOT NULL,
                    kind TEXT NOT NULL, layer INTEGER NOT NULL, activation REAL NOT NULL);
CREATE INDEX peaks_by_token ON peaks (token, model);
CREATE INDEX peaks_by_node ON peaks (node_id);
"""


@dataclass(frozen=True)
class Hit:
    node_id: str
    rank: float  # higher is better
    text: str | None  # the matching explanation, for text searches
    activation: float | None = None  # token searches: the highest activation on the token


@dataclass(frozen=True)
class Scope:
    """Which nodes a search looks at (None: any)."""

    model: str | None = None
    kind: str | None = None
    layer: int | None = None

    def where(self, table: str = "") -> tuple[str, tuple[object, ...]]:
        """SQL conditions (each after an AND) and their arguments."""
        prefix = f"{table}." if table else ""
        conditions, args = [], []
        for column, value in (("model", self.model), ("kind", self.kind), ("layer", self.layer)):
            if value is not None:
                conditions.append(f" AND {prefix}{column} = ?")
                args.append(value)
        return "".join(conditions), tuple(args)


def _kind_and_layer(node_id: str) -> tuple[str, int]:
    _, kind, layer, _ = node_id.rsplit("/", 3)
    return kind, int(layer)


class SearchIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._pending_peaks: list[Callable[[], Iterable[tuple[str, str, str, float]]]] = []

    def add_explanations(self, rows: Iterable[tuple[str, str, str, float | None]]) -> None:
        """Rows of (model, node id, text, score)."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO explanations (model, node_id, kind, layer, text, score) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((m, n, *_kind_and_layer(n), t, sc) for m, n, t, sc in rows),
            )

    def add_peaks_later(self, rows: Callable[[], Iterable[tuple[str, str, str, float]]]) -> None:
        """Rows for add_peaks, read at the first token search: a large store's top examples
        (the demo's 112,800) would take half a second of every start-up."""
        with self._lock:
            self._pending_peaks.append(rows)

    def add_peaks(self, rows: Iterable[tuple[str, str, str, float]]) -> None:
        """Rows of (model, node id, peak token text, activation there), one per top example."""
        with self._lock:
            self._insert_peaks(rows)

    def _insert_peaks(self, rows: Iterable[tuple[str, str, str, float]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT INTO peaks (model, node_id, kind, layer, token, activation) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((m, n, *_kind_and_layer(n), t, a) for m, n, t, a in rows),
            )

    def by_text(self, scope: Scope, text: str, first: int, offset: int) -> tuple[list[Hit], int]:
        query = _fts_query(text)
        if not query:
            return [], 0
        conditions, args = scope.where()
        with self._lock:
            rows = self._db.execute(
                "SELECT node_id, bm25(explanations), text FROM explanations "
                f"WHERE explanations MATCH ?{conditions} ORDER BY bm25(explanations), node_id",
                (query, *args),
            ).fetchall()
        # A node explained several times is found once, by its best-ranked explanation.
        best: dict[str, Hit] = {}
        for node_id, rank, text in rows:  # best-ranked first
            best.setdefault(node_id, Hit(node_id, -rank, text))
        hits = list(best.values())
        return hits[offset : offset + first], len(hits)

    def by_token(self, scope: Scope, token: str, first: int, offset: int) -> tuple[list[Hit], int]:
        """Nodes ranked by the share of their top examples that peak on `token`, then by their
        highest activation there relative to their highest anywhere."""
        conditions, args = scope.where("p")
        with self._lock:
            while self._pending_peaks:
                self._insert_peaks(self._pending_peaks.pop(0)())
            rows = self._db.execute(
                "SELECT p.node_id, count(*), max(p.activation), "
                "(SELECT count(*) FROM peaks q WHERE q.node_id = p.node_id), "
                "(SELECT max(q.activation) FROM peaks q WHERE q.node_id = p.node_id) "
                f"FROM peaks p WHERE p.token = ?{conditions} GROUP BY p.node_id",
                (token, *args),
            ).fetchall()
        scored = []
        for node_id, on_token, activation, examples, peak in rows:
            relative = activation / peak if peak > 0 else 0.0
            scored.append((-on_token / examples, -relative, node_id, activation))
        scored.sort()
        hits = [Hit(node_id, -share, None, act) for share, _, node_id, act in scored]
        return hits[offset : offset + first], len(hits)


def index_model(index: SearchIndex, model: str, sources: Iterable[NodeSource]) -> None:
    for source in sources:
        index.add_explanations(
            (model, node_id, text, score)
            for node_id, text, score in source.list_explanations(model)
        )
        index.add_peaks_later(functools.partial(_peak_rows, source, model))


def _peak_rows(source: NodeSource, model: str) -> Iterable[tuple[str, str, str, float]]:
    return ((model, node_id, token, act) for node_id, token, act in source.list_peaks(model))


def _fts_query(text: str) -> str:
    """Every word as a quoted FTS5 string, so no user text is read as query syntax. NUL
    separates words too: inside a quoted string SQLite would take it for the string's end."""
    words = [w.replace('"', '""') for w in text.replace("\0", " ").split() if w.strip()]
    return " ".join(f'"{w}"' for w in words[:32])
