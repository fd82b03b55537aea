"""Per-client limits over a sliding minute: requests, and the estimated cost they carry.

A client is an API key id, or the client's address when it sends none. Each client keeps the
(time, cost) of what it spent in the last minute; a request that would go over either limit is
refused with how long until enough of the window has passed.

`RateLimiter` counts in this process's memory; `RedisRateLimiter` (with --redis) counts in
Redis, so that every replica (every --workers process, every server sharing the Redis) charges
the same window: one Lua script checks and records each request, atomically and on Redis's
clock, so the limit is exact however the requests are spread.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from redis.exceptions import RedisError

from interpql.errors import UnavailableError
from interpql.loaders.jobs.redis_store import redis_client

WINDOW_S = 60.0


class Limiter(Protocol):
    requests_per_minute: int
    cost_per_minute: int

    def __bool__(self) -> bool: ...

    async def charge(self, client: str, cost: int) -> float | None:
        """Records the request and returns None, or refuses it: seconds until it would fit."""
        ...

    async def close(self) -> None: ...


def wait_s(
    spent: Sequence[tuple[float, int]],
    now: float,
    cost: int,
    requests_per_minute: int,
    cost_per_minute: int,
) -> float | None:
    """None when a request of `cost` fits beside `spent` (the window's (time, cost), oldest
    first), else the seconds until enough of them have left the window."""
    over_requests = 0 < requests_per_minute <= len(spent)
    total = sum(c for _, c in spent)
    if not (over_requests or 0 < cost_per_minute < total + cost):
        return None
    if cost > cost_per_minute > 0:
        return WINDOW_S  # never fits; the caller must send less per request
    for index, (at, c) in enumerate(spent):
        total -= c
        fits_cost = cost_per_minute == 0 or total + cost <= cost_per_minute
        fits_requests = not over_requests or len(spent) - index - 1 < requests_per_minute
        if fits_cost and fits_requests:
            return max(0.0, at + WINDOW_S - now)
    return WINDOW_S


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: int = 0,
        cost_per_minute: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.cost_per_minute = cost_per_minute
        self._clock = clock
        self._spent: dict[str, deque[tuple[float, int]]] = {}

    def __bool__(self) -> bool:
        return self.requests_per_minute > 0 or self.cost_per_minute > 0

    async def charge(self, client: str, cost: int) -> float | None:
        return self.charge_now(client, cost)

    def charge_now(self, client: str, cost: int) -> float | None:
        """`charge`, without awaiting: memory needs no round trip."""
        if not self:
            return None
        now = self._clock()
        spent = self._spent.setdefault(client, deque())
        while spent and spent[0][0] <= now - WINDOW_S:
            spent.popleft()
        wait = wait_s(spent, now, cost, self.requests_per_minute, self.cost_per_minute)
        if wait is None:
            spent.append((now, cost))
            self._forget_idle(now)
        return wait

    async def close(self) -> None:
        return None

    def _forget_idle(self, now: float) -> None:
        # Clients with nothing in the window are dropped, so addresses do not pile up.
        if len(self._spent) > 10_000:
            idle = [c for c, s in self._spent.items() if not s or s[-1][0] <= now - WINDOW_S]
            for client in idle:
                del self._spent[client]


# KEYS: the client's window (a sorted set: member "cost:unique", score the time in seconds)
# ARGV: window seconds, requests per minute, cost per minute, cost, unique id
# Returns '' when charged, else the seconds to wait (as text: Lua numbers become integers).
_CHARGE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local window = tonumber(ARGV[1])
local max_requests = tonumber(ARGV[2])
local max_cost = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count = #entries / 2
local total = 0
local costs = {}
local times = {}
for i = 1, #entries, 2 do
  local c = tonumber(string.match(entries[i], '^(%d+):'))
  costs[#costs + 1] = c
  times[#times + 1] = tonumber(entries[i + 1])
  total = total + c
end
local over_requests = max_requests > 0 and count >= max_requests
local over_cost = max_cost > 0 and total + cost > max_cost
if not over_requests and not over_cost then
  redis.call('ZADD', KEYS[1], now, cost .. ':' .. ARGV[5])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  return ''
end
if max_cost > 0 and cost > max_cost then return tostring(window) end
for i = 1, count do
  total = total - costs[i]
  local fits_cost = max_cost == 0 or total + cost <= max_cost
  local fits_requests = not over_requests or count - i < max_requests
  if fits_cost and fits_requests then
    return tostring(math.max(0, times[i] + window - now))
  end
end
return tostring(window)
"""


class RedisRateLimiter:
    """The same limits, counted in Redis for every replica at once."""

    def __init__(
        self,
        url: str,
        requests_per_minute: int = 0,
        cost_per_minute: int = 0,
        prefix: str = "interpql:rate:",
        timeout_s: float = 2.0,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.cost_per_minute = cost_per_minute
        self.prefix = prefix
        self._client = redis_client(url, timeout_s, timeout_s)
        self._charge = self._client.register_script(_CHARGE)

    def __bool__(self) -> bool:
        return self.requests_per_minute > 0 or self.cost_per_minute > 0

    async def charge(self, client: str, cost: int) -> float | None:
        if not self:
            return None
        args = (WINDOW_S, self.requests_per_minute, self.cost_per_minute, cost, uuid.uuid4().hex)
        try:
            answer = await self._charge(keys=[self.prefix + client], args=list(args))
        except RedisError as exc:
            # The type only: the text names hosts and ports.
            raise UnavailableError(
                f"The rate limiter's store is unavailable ({type(exc).__name__}); try again "
                "shortly.",
                code="SHARED_STATE_UNAVAILABLE",
            ) from None
        return None if answer == "" else float(answer)

    async def close(self) -> None:
        await self._client.aclose()
