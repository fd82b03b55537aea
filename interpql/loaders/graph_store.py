"""Where computed attribution graphs are kept, by id: this process's memory, and with --redis
also Redis, so that every replica (every --workers process, every server sharing the Redis)
answers a graph's URL, `Query.attributionGraph(id)`, `Job.graph` and its interventions, whichever
of them computed it.

Graphs go to Redis as JSON (never pickled: a shared Redis cannot inject objects), under a key
that carries the format's version. Redis is a second copy only: when it fails or holds something
unreadable, the graph is looked up in memory alone, a warning is logged once per outage, and the
graph is computed again when asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError

from interpql.loaders.attribution_graph import GraphData, GraphNode, NodeType, Pruning, Sizes
from interpql.loaders.cache import BoundedMemoryCache, OutageLog
from interpql.loaders.jobs.redis_store import redis_client
from interpql.specs import GraphSpec, NodeRef

log = logging.getLogger(__name__)

_GRAPH_ID = re.compile(r"[0-9a-f]{24}")  # graph_id's form
FORMAT = "v1"  # bump when GraphData changes shape: older entries are then never read
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


class GraphStore:
    def __init__(
        self,
        max_graphs: int = 16,
        redis_url: str | None = None,
        ttl_s: float = 24 * 3600.0,
        timeout_s: float = 2.0,
        prefix: str = "interpql:graphs:",
    ) -> None:
        self._memory = BoundedMemoryCache(max_graphs)
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.prefix = prefix + FORMAT + ":"
        # Raw bytes: a graph's JSON is decoded here, not by the client.
        self._client = (
            None
            if redis_url is None
            else redis_client(redis_url, timeout_s, timeout_s, decode_responses=False)
        )
        self._outage = OutageLog(
            f"attribution graphs in {redis_url}", "kept in this process only", "are shared again"
        )

    async def get(self, id: str) -> GraphData | None:
        if _GRAPH_ID.fullmatch(id) is None:
            return None  # no graph has such an id: nothing to look up, in Redis least of all
        found: GraphData | None = await self._memory.get(id)
        if found is not None or self._client is None:
            return found
        try:
            raw = await asyncio.wait_for(self._client.get(self.prefix + id), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return None
        self._outage.answered()
        if raw is None:
            return None
        try:
            found = decode_graph(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("attribution graph %s in Redis is unreadable (%r): ignored", id, exc)
            return None
        await self._memory.set(id, found)
        return found

    async def put(self, graph: GraphData) -> None:
        await self._memory.set(graph.id, graph)
        if self._client is None:
            return
        try:
            await asyncio.wait_for(
                self._client.set(self.prefix + graph.id, encode_graph(graph), ex=int(self.ttl_s)),
                self.timeout_s,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            return
        self._outage.answered()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
