"""A cache of node data read from slow (remote) sources: in memory by default, or Redis.

Values are stored as JSON, never pickled, so a shared Redis cannot inject objects. The cache is
an optimisation only: when it fails (Redis gone, a timeout), reads go to the source, a warning
is logged (once per outage), and answers stay the same.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlparse

import orjson
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.base import BaseCache
from aiocache.serializers import NullSerializer

log = logging.getLogger(__name__)


class OutageLog:
    """One warning when a shared store starts failing, one when it answers again: a store
    that is down for an hour logs two lines, not one per request."""

    def __init__(self, store: str, meanwhile: str, back: str) -> None:
        self.store, self.meanwhile, self.back = store, meanwhile, back
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            log.warning("%s failed (%r); %s", self.store, exc, self.meanwhile)
        self.failing = True

    def answered(self) -> None:
        if self.failing:
            log.warning("%s %s", self.store, self.back)
        self.failing = False


class BoundedMemoryCache(SimpleMemoryCache):  # type: ignore[misc]
    """aiocache's memory cache, holding at most `max_entries` (the oldest written go first)."""

    def __init__(self, max_entries: int, **kwargs: Any) -> None:
        super().__init__(serializer=NullSerializer(), **kwargs)
        self.max_entries = max_entries

    async def _set(
        self, key: str, value: Any, ttl: Any = None, _cas_token: Any = None, _conn: Any = None
    ) -> Any:
        self._cache.pop(key, None)  # re-inserted last: eviction order follows writes
        result = await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        while len(self._cache) > self.max_entries:
            await self._delete(next(iter(self._cache)))
        return result


class NodeDataCache:
    def __init__(
        self,
        url: str | None = None,
        ttl_s: float = 3600.0,
        max_entries: int = 100_000,
        timeout_s: float = 1.0,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._backend: BaseCache = _backend(url, max_entries)
        self._outage = OutageLog(f"node-data cache {url}", "answering uncached", "is back")
        # Keys looked up and found or not since start-up, for the metrics.
        self.hits = 0
        self.misses = 0

    async def get_many(self, keys: list[str]) -> list[Any | None]:
        if not keys:
            return []
        try:
            raw = await asyncio.wait_for(self._backend.multi_get(keys), self.timeout_s)
        except Exception as exc:
            self._outage.failed(exc)
            self.misses += len(keys)
            return [None] * len(keys)
        self._outage.answered()
        found = sum(value is not None for value in raw)
        self.hits += found
        self.misses += len(keys) - found
        return [None if value is None else orjson.loads(value) for value in raw]

    async def set_many(self, pairs: list[tuple[str, Any]]) -> None:
        if not pairs:
            return
        encoded = [(key, orjson.dumps(value)) for key, value in pairs]
        try:
            await asyncio.wait_for(self._backend.multi_set(encoded, ttl=self.ttl_s), self.timeout_s)
        except Exception as exc:
            self._outage.failed(exc)
            return
        self._outage.answered()

    async def close(self) -> None:
        client = getattr(self._backend, "client", None)
        if client is not None:
            # aiocache's close() calls redis-py's deprecated close(); aclose() is the same.
            await client.aclose()
        else:
            await self._backend.close()


def _backend(url: str | None, max_entries: int) -> BaseCache:
    if url is None or url == "memory":
        return BoundedMemoryCache(max_entries)
    parsed = urlparse(url)
    if parsed.scheme != "redis":
        raise ValueError(f"cache must be 'memory' or redis://host:port[/db], not {url!r}")
    db = int(parsed.path.lstrip("/") or 0)
    return RedisCache(
        serializer=NullSerializer(),
        endpoint=parsed.hostname or "127.0.0.1",
        port=parsed.port or 6379,
        db=db,
        namespace="interpql",
        create_connection_timeout=1.0,
    )
