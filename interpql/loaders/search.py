"""Finding nodes: by the text of their explanations (SQLite FTS5, ranked by BM25) and by the
token their top examples peak on.

One index per server, in memory, filled at start-up from every source that can list its
contents (the compact store, the explanation store) and kept current as explanations are
added. Remote folders cannot be listed, so their nodes are found by id only.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from interpql.loaders.sources.base import NodeSource

_SCHEMA = """
CREATE VIRTUAL TABLE explanations USING fts5(
    text, node_id UNINDEXED, model UNINDEXED, score UNINDEXED, tokenize = 'porter unicode61'
);
CREATE TABLE peaks (token TEXT NOT NULL, node_id TEXT NOT NULL, model TEXT NOT NULL,
                    activation REAL NOT NULL);
CREATE INDEX peaks_by_token ON peaks (token, model);
"""


@dataclass(frozen=True)
class Hit:
    node_id: str
    rank: float  # higher is better
    text: str | None  # the matching explanation, for text searches


class SearchIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.executescript(_SCHEMA)

    def add_explanations(self, rows: Iterable[tuple[str, str, str, float | None]]) -> None:
        """Rows of (model, node id, text, score)."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO explanations (model, node_id, text, score) VALUES (?, ?, ?, ?)",
                rows,
            )

    def add_peaks(self, rows: Iterable[tuple[str, str, str, float]]) -> None:
        """Rows of (model, node id, peak token text, activation there)."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO peaks (model, node_id, token, activation) VALUES (?, ?, ?, ?)",
                rows,
            )

    def by_text(
        self, model: str | None, text: str, first: int, offset: int
    ) -> tuple[list[Hit], int]:
        query = _fts_query(text)
        if not query:
            return [], 0
        where = "explanations MATCH ?" + (" AND model = ?" if model else "")
        args: tuple[object, ...] = (query, model) if model else (query,)
        with self._lock:
            rows = self._db.execute(
                "SELECT node_id, bm25(explanations), text FROM explanations "
                f"WHERE {where} ORDER BY bm25(explanations), node_id",
                args,
            ).fetchall()
        # A node explained several times is found once, by its best-ranked explanation.
        best: dict[str, Hit] = {}
        for node_id, rank, text in rows:  # best-ranked first
            best.setdefault(node_id, Hit(node_id, -rank, text))
        hits = list(best.values())
        return hits[offset : offset + first], len(hits)

    def by_token(
        self, model: str | None, token: str, first: int, offset: int
    ) -> tuple[list[Hit], int]:
        where = "token = ?" + (" AND model = ?" if model else "")
        args: tuple[object, ...] = (token, model) if model else (token,)
        with self._lock:
            rows = self._db.execute(
                f"SELECT node_id, max(activation) FROM peaks WHERE {where} "
                "GROUP BY node_id ORDER BY max(activation) DESC, node_id",
                args,
            ).fetchall()
        hits = [Hit(node_id, activation, None) for node_id, activation in rows]
        return hits[offset : offset + first], len(hits)


def index_model(index: SearchIndex, model: str, sources: Iterable[NodeSource]) -> None:
    for source in sources:
        index.add_explanations(
            (model, node_id, text, score)
            for node_id, text, score in source.list_explanations(model)
        )
        index.add_peaks(
            (model, node_id, token, act) for node_id, token, act in source.list_peaks(model)
        )


def _fts_query(text: str) -> str:
    """Every word as a quoted FTS5 string, so no user text is read as query syntax."""
    words = [w.replace('"', '""') for w in text.split() if w.strip()]
    return " ".join(f'"{w}"' for w in words[:32])
