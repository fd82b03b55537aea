"""Per-client limits over a sliding minute: requests, and the estimated cost they carry.

A client is an API key id, or the client's address when it sends none. Each client keeps the
(time, cost) of what it spent in the last minute; a request that would go over either limit is
refused with how long until enough of the window has passed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0


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

    def charge(self, client: str, cost: int) -> float | None:
        """Records the request and returns None, or refuses it: seconds until it would fit."""
        if not self:
            return None
        now = self._clock()
        spent = self._spent.setdefault(client, deque())
        while spent and spent[0][0] <= now - WINDOW_S:
            spent.popleft()
        over_requests = 0 < self.requests_per_minute <= len(spent)
        total = sum(c for _, c in spent)
        over_cost = 0 < self.cost_per_minute < total + cost
        if over_requests or over_cost:
            return self._wait(spent, now, cost, over_requests)
        spent.append((now, cost))
        self._forget_idle(now)
        return None

    def _wait(
        self, spent: deque[tuple[float, int]], now: float, cost: int, over_requests: bool
    ) -> float:
        if cost > self.cost_per_minute > 0:
            return WINDOW_S  # never fits; the caller must send less per request
        total = sum(c for _, c in spent)
        for index, (at, c) in enumerate(spent):
            total -= c
            fits_cost = self.cost_per_minute == 0 or total + cost <= self.cost_per_minute
            fits_requests = not over_requests or len(spent) - index - 1 < self.requests_per_minute
            if fits_cost and fits_requests:
                return max(0.0, at + WINDOW_S - now)
        return WINDOW_S

    def _forget_idle(self, now: float) -> None:
        # Clients with nothing in the window are dropped, so addresses do not pile up.
        if len(self._spent) > 10_000:
            idle = [c for c, s in self._spent.items() if not s or s[-1][0] <= now - WINDOW_S]
            for client in idle:
                del self._spent[client]
