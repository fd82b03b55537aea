"""What one request's inference cost: the passes it took part in and its run-cache lookups.

Each request's `InferenceLoader` adds to its own `InferenceStats`; the request log and the
metrics read it when the operation ends. A pass shared by several requests (coalescing) counts
for each of them: its time is what each of them waited for.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class InferenceStats:
    passes: int = 0
    # The passes' own time (forward, and backward when asked), as the backend measured it.
    seconds: float = 0.0
    # Rows of each pass, other requests' rows included.
    batch_sizes: list[int] = field(default_factory=list)
    # This request's rows that ran in a pass beside other requests' rows.
    coalesced_rows: int = 0
    # Runs (model and input) looked up in the run cache, each counted once per request.
    run_cache_hits: int = 0
    run_cache_misses: int = 0
    _looked_up: set[Hashable] = field(default_factory=set, repr=False)

    def add_pass(self, seconds: float, batch_size: int, own_rows: int) -> None:
        self.passes += 1
        self.seconds += seconds
        self.batch_sizes.append(batch_size)
        if batch_size > own_rows:
            self.coalesced_rows += own_rows

    def add_cache_lookup(self, run: Hashable, hit: bool) -> None:
        """The first lookup of `run` counts: every field that needs a run looks it up."""
        if run in self._looked_up:
            return
        self._looked_up.add(run)
        if hit:
            self.run_cache_hits += 1
        else:
            self.run_cache_misses += 1
