"""Where computed attribution graphs are kept, by id: this process's memory, and a shared
copy, so that every replica answers a graph's URL, `Query.attributionGraph(id)`, `Job.graph` and
its interventions, whichever of them computed it: Redis with --redis (every server sharing it),
else a SQLite file beside the explanation store (every --workers process of one server, and
the server after a restart), as the job store does.

Graphs are stored as JSON (never pickled: a shared store cannot inject objects), marked with
the format's and interpql's version, for a day. A graph's id is its request's (model name,
prompt, parameters): a model whose weights change under the same name within the day needs
its stored graphs deleted (the `graphs` table, or Redis's `interpql:graphs:*` keys).

The shared copy is a second copy only: when it fails or holds something unreadable, the graph
is looked up in memory alone, a warning is logged once per outage, and the graph is computed
again when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError

from interpql import __version__
from interpql.file_errors import open_sqlite
from interpql.loaders.attribution_graph import GraphData, GraphNode, NodeType, Pruning, Sizes
from interpql.loaders.cache import BoundedMemoryCache, OutageLog
from interpql.loaders.jobs.redis_store import redis_client
from interpql.specs import GraphSpec, NodeRef

log = logging.getLogger(__name__)

_GRAPH_ID = re.compile(r"[0-9a-f]{24}")  # graph_id's form
# Entries are read only by the interpql that wrote them: a later version may compute graphs
# differently (and bumps nothing else when GraphData changes shape).
FORMAT = f"v1-{__version__}"
_ARRAYS = {"sources": np.int64, "targets": np.int64, "weights": np.float64}


def encode_graph(graph: GraphData) -> bytes:
    return orjson.dumps(dataclasses.asdict(graph), option=orjson.OPT_SERIALIZE_NUMPY)


def decode_graph(raw: bytes | str) -> GraphData:
    """The graph `encode_graph` wrote; KeyError, TypeError or ValueError for anything else."""
    fields: dict[str, Any] = orjson.loads(raw)
    spec = fields.pop("spec")
    spec["tokens"] = tuple(spec["tokens"])
    nodes = []
    for node in fields.pop("nodes"):
        ref = node.pop("ref")
        nodes.append(
            GraphNode(
                **node | {"type": NodeType(node["type"])},
                ref=None if ref is None else NodeRef(**ref),
            )
        )
    arrays = {name: np.asarray(fields.pop(name), dtype=dtype) for name, dtype in _ARRAYS.items()}
    if not all(array.ndim == 1 for array in arrays.values()):
        raise ValueError("a graph's edges are three flat lists")
    return GraphData(
        **fields
        | arrays
        | {
            "spec": GraphSpec(**spec),
            "nodes": nodes,
            "unpruned": Sizes(**fields["unpruned"]),
            "pruning": Pruning(**fields["pruning"]),
        }
    )


class RedisGraphs:
    """The shared copy in Redis, a day each (--redis)."""

    failures = (RedisError, OSError, TimeoutError)

    def __init__(self, url: str, timeout_s: float = 2.0, ttl_s: float = 24 * 3600.0) -> None:
        self.where, self.ttl_s = url, ttl_s
        self.prefix = f"interpql:graphs:{FORMAT}:"
        # Raw bytes: a graph's JSON is decoded by the store, not by the client.
        self._client = redis_client(url, timeout_s, timeout_s, decode_responses=False)

    async def get(self, id: str) -> bytes | str | None:
        found: bytes | str | None = await self._client.get(self.prefix + id)
        return found

    async def put(self, id: str, encoded: bytes) -> None:
        await self._client.set(self.prefix + id, encoded, ex=int(self.ttl_s))

    async def close(self) -> None:
        await self._client.aclose()


class SqliteGraphs:
    """The shared copy in a SQLite file beside the explanation store: every --workers process
    of one server reads it, and a restarted server still answers its graphs. The `keep` most
    recently written stay, for a day each."""

    failures = (sqlite3.Error, OSError)

    def __init__(self, path: str | Path, keep: int = 64, ttl_s: float = 24 * 3600.0) -> None:
        self.where, self.keep, self.ttl_s = str(path), keep, ttl_s
        db = open_sqlite(path, "the attribution graph store")
        with db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS graphs (id TEXT PRIMARY KEY, format TEXT NOT NULL, "
                "written REAL NOT NULL, json BLOB NOT NULL)"
            )
        db.close()
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.where, timeout=5.0, isolation_level=None)

    def _get(self, id: str) -> bytes | None:
        with contextlib.closing(self._connect()) as db:
            row = db.execute(
                "SELECT json FROM graphs WHERE id = ? AND format = ? AND written > ?",
                (id, FORMAT, time.time() - self.ttl_s),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def _put(self, id: str, encoded: bytes) -> None:
        with self._lock, contextlib.closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO graphs VALUES (?, ?, ?, ?)",
                (id, FORMAT, time.time(), encoded),
            )
            db.execute(
                "DELETE FROM graphs WHERE id NOT IN "
                "(SELECT id FROM graphs ORDER BY written DESC LIMIT ?)",
                (self.keep,),
            )
            db.execute("COMMIT")

    async def get(self, id: str) -> bytes | str | None:
        return await asyncio.to_thread(self._get, id)

    async def put(self, id: str, encoded: bytes) -> None:
        await asyncio.to_thread(self._put, id, encoded)

    async def close(self) -> None:
        return None


SharedGraphs = RedisGraphs | SqliteGraphs


def open_graph_store(redis_url: str | None, explanation_store: str) -> GraphStore:
    """Redis when given, else a SQLite file beside the explanation store (memory alone beside
    none), as the job store does."""
    if redis_url is not None:
        return GraphStore(shared=RedisGraphs(redis_url))
    if explanation_store == ":memory:":
        return GraphStore()
    path = Path(explanation_store)
    return GraphStore(shared=SqliteGraphs(path.with_name(path.stem + ".graphs.sqlite")))


class GraphStore:
    def __init__(
        self, max_graphs: int = 16, shared: SharedGraphs | None = None, timeout_s: float = 5.0
    ) -> None:
        self._memory = BoundedMemoryCache(max_graphs)
        self._shared = shared
        self.timeout_s = timeout_s
        where = shared.where if shared is not None else ""
        self._outage = OutageLog(
            f"attribution graphs in {where}", "kept in this process only", "are shared again"
        )

    async def get(self, id: str) -> GraphData | None:
        if _GRAPH_ID.fullmatch(id) is None:
            return None  # no graph has such an id: nothing to look up, in Redis least of all
        found: GraphData | None = await self._memory.get(id)
        if found is not None or self._shared is None:
            return found
        try:
            raw = await asyncio.wait_for(self._shared.get(id), self.timeout_s)
        except (*self._shared.failures, TimeoutError) as exc:
            self._outage.failed(exc)
            return None
        self._outage.answered()
        if raw is None:
            return None
        try:
            found = decode_graph(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning(
                "attribution graph %s in %s is unreadable (%r): ignored",
                id,
                self._shared.where,
                exc,
            )
            return None
        await self._memory.set(id, found)
        return found

    async def put(self, graph: GraphData) -> None:
        await self._memory.set(graph.id, graph)
        if self._shared is None:
            return
        try:
            await asyncio.wait_for(self._shared.put(graph.id, encode_graph(graph)), self.timeout_s)
        except (*self._shared.failures, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.answered()

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()
