"""The explanation store: explanations generated after deployment, in one SQLite file.

Every write is one transaction (SQLite's journal makes it atomic: a crash mid-write leaves the
file as it was), rows are only ever added, and nothing is overwritten. `request_key` lets an
identical explain/score request be answered from the store instead of paying again.
"""

from __future__ import annotations

import datetime
import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interpql.file_errors import FileProblem, immediate_transaction, open_sqlite, reading
from interpql.loaders.sources.base import ExplanationData, NodeSource, RecordAnswer
from interpql.specs import NodeRef, parse_node_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS explanations (
    id INTEGER PRIMARY KEY,
    node_id TEXT NOT NULL,
    text TEXT NOT NULL,
    score REAL,
    scorer TEXT NOT NULL,
    explainer TEXT NOT NULL,
    request_key TEXT,
    provenance TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS explanations_by_node ON explanations (node_id);
CREATE INDEX IF NOT EXISTS explanations_by_request ON explanations (request_key);
"""


@dataclass(frozen=True)
class StoredExplanation:
    id: int
    node: NodeRef
    data: ExplanationData
    request_key: str | None
    provenance: dict[str, Any]


class ExplanationStore(NodeSource):
    def __init__(self, path: str | Path = ":memory:", name: str = "generated") -> None:
        self.name = name
        self.path = str(path)
        self._lock = threading.Lock()
        if self.path == ":memory:":
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        else:
            self._db = open_sqlite(self.path, "the explanation store")
        with self._lock, reading(self.path, "the explanation store"):
            foreign = sorted(
                name
                for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                if name != "explanations" and not name.startswith("sqlite_")
            )
            if foreign:
                # Another program's database: tables of ours written into it are not ours to add.
                raise FileProblem(
                    self.path,
                    f"holds tables that are not an explanation store's ({', '.join(foreign[:5])}): "
                    "give --explanation-store a file of its own",
                )
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def add(
        self,
        node: NodeRef,
        text: str,
        score: float | None,
        scorer: str,
        explainer: str,
        request_key: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> StoredExplanation:
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        score = score if score is not None and math.isfinite(score) else None
        with self._lock, immediate_transaction(self._db):
            cursor = self._db.execute(
                "INSERT INTO explanations (node_id, text, score, scorer, explainer, "
                "request_key, provenance, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    node.id,
                    text,
                    score,
                    scorer,
                    explainer,
                    request_key,
                    json.dumps(provenance or {}, sort_keys=True),
                    created,
                ),
            )
        row_id = cursor.lastrowid
        assert row_id is not None
        data = ExplanationData(self.name, text, score, scorer, explainer, created)
        return StoredExplanation(row_id, node, data, request_key, provenance or {})

    def find_request(self, request_key: str) -> list[StoredExplanation]:
        """What an earlier identical request stored, in the order it stored it."""
        return self._select("WHERE request_key = ? ORDER BY id", (request_key,))

    def all(self) -> list[StoredExplanation]:
        return self._select("ORDER BY id", ())

    def _select(self, where: str, args: tuple[Any, ...]) -> list[StoredExplanation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, node_id, text, score, scorer, explainer, request_key, provenance, "
                f"created FROM explanations {where}",
                args,
            ).fetchall()
        return [
            StoredExplanation(
                id=row[0],
                node=parse_node_id(row[1]),
                data=ExplanationData(self.name, row[2], row[3], row[4], row[5], row[8]),
                request_key=row[6],
                provenance=json.loads(row[7]),
            )
            for row in rows
        ]

    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        return [None for _ in nodes]

    def read_explanations(
        self, nodes: Sequence[NodeRef]
    ) -> list[list[ExplanationData] | Exception]:
        ids = [node.id for node in nodes]
        found: dict[str, list[ExplanationData]] = {node_id: [] for node_id in ids}
        marks = ",".join("?" * len(ids))
        for stored in self._select(f"WHERE node_id IN ({marks})", tuple(ids)) if ids else []:
            found[stored.node.id].append(stored.data)
        return [found[node_id] for node_id in ids]

    def list_explanations(self, model: str) -> Iterable[tuple[str, str, float | None]]:
        prefix = model.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
        for stored in self._select("WHERE node_id LIKE ? ESCAPE '\\' ORDER BY id", (prefix,)):
            yield stored.node.id, stored.data.text, stored.data.score

    def close(self) -> None:
        with self._lock:
            self._db.close()
