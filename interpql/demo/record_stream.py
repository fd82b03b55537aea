"""What `compute_records` keeps about one (kind, layer) group while it streams over batches.

Nothing here holds all activations: per node it keeps the k best windows by some key (the
sequence peak for top examples, a random key for samples), merged batch by batch with a top-k
over the running and the new candidates, and exact running moments.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_FLOAT16_MAX = float(np.finfo(np.float16).max)


class BestWindows:
    """Per node, the k highest-keyed windows so far: keys, offsets [k, node], acts [k, W, node]."""

    def __init__(self, k: int, window: int, n_nodes: int) -> None:
        self.keys = torch.full((k, n_nodes), -math.inf)
        self.offsets = torch.full((k, n_nodes), -1, dtype=torch.int64)
        self.acts = torch.zeros(k, window, n_nodes)

    def merge(self, keys: torch.Tensor, offsets: torch.Tensor, acts: torch.Tensor) -> None:
        """Candidates: keys and offsets [c, node], acts [c, W, node]; -inf keys never win."""
        self.keys, best = torch.cat([self.keys, keys]).topk(len(self.keys), dim=0)
        self.offsets = torch.cat([self.offsets, offsets]).gather(0, best)
        self.acts = torch.cat([self.acts, acts]).gather(0, _per_token(best, acts.shape[1]))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets [node, k] int32 (-1 where no window qualified) and acts [node, k, W] f16."""
        offsets = torch.where(self.keys.isneginf(), -1, self.offsets)
        # float16 overflows to inf above 65504; a clipped peak still reads as the peak.
        acts = self.acts.permute(2, 0, 1).clamp(-_FLOAT16_MAX, _FLOAT16_MAX)
        return offsets.T.numpy().astype(np.int32), acts.numpy().astype(np.float16)


def _per_token(index_kn: torch.Tensor, window: int) -> torch.Tensor:
    """A [k, node] index of windows, repeated along the token axis: [k, W, node]."""
    return index_kn[:, None, :].expand(-1, window, -1)


def _take_best(keys_cn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [min(k, c), node] of each node's k highest keys among c candidates."""
    return keys_cn.topk(min(k, len(keys_cn)), dim=0).indices


class GroupAccumulator:
    """Everything kept about one group's nodes; `add` each batch, then `finish`."""

    def __init__(
        self,
        n_nodes: int,
        *,
        window: int,
        before_peak: int,
        top_k: int,
        n_random: int,
        quantile_probs: tuple[float, ...],
        n_per_quantile: int,
    ) -> None:
        self.window, self.before_peak = window, before_peak
        self.moments = RunningMoments(n_nodes)
        self.max = torch.full((n_nodes,), -math.inf)
        self.n_positive = torch.zeros(n_nodes, dtype=torch.int64)
        self.top = BestWindows(top_k, window, n_nodes)
        self.random = BestWindows(n_random, window, n_nodes)
        self.probs = quantile_probs
        n_buckets = len(quantile_probs) + 1 if quantile_probs else 0
        self.buckets = [BestWindows(n_per_quantile, window, n_nodes) for _ in range(n_buckets)]
        self.pilot_peaks: list[torch.Tensor] = []  # [tile, node] per pilot batch
        self.boundaries = torch.zeros(len(quantile_probs), n_nodes)  # [boundary, node]

    def add(
        self, acts: torch.Tensor, seq_ids: torch.Tensor, gen: torch.Generator, in_pilot: bool
    ) -> None:
        """`acts` [batch, token, node] of the sequences `seq_ids` [batch] of the corpus."""
        batch, seq_len, n_nodes = acts.shape
        self.moments.add(acts)
        self.max = torch.maximum(self.max, acts.amax(dim=(0, 1)))
        # sign().clamp() counts positives several times faster than a boolean sum.
        self.n_positive += _sum_tokens(acts.sign().clamp_(min=0)).long()
        self._add_top(acts, seq_ids)
        # Tiles: the non-overlapping windows of each sequence, which random samples draw from.
        w = self.window
        n_tiles = seq_len // w
        tiles = acts[:, : n_tiles * w].reshape(batch * n_tiles, w, n_nodes)
        tile_offsets = (seq_ids[:, None] * seq_len + torch.arange(n_tiles) * w).reshape(-1, 1)
        tile_offsets = tile_offsets.expand(-1, n_nodes)
        keys = -torch.rand(len(tiles), n_nodes, generator=gen)
        _merge_sample(self.random, keys, tiles, tile_offsets)
        if not self.buckets:
            return
        peaks = tiles.amax(dim=1)  # [tile, node]
        if in_pilot:
            self.pilot_peaks.append(peaks)
            return
        if self.pilot_peaks:
            self._set_boundaries()
        bucket = (peaks[:, None, :] > self.boundaries[None]).sum(dim=1)  # [tile, node]
        # One key per tile serves every bucket: the buckets are disjoint.
        keys = -torch.rand(len(tiles), n_nodes, generator=gen)
        for q, best in enumerate(self.buckets):
            _merge_sample(best, torch.where(bucket == q, keys, -math.inf), tiles, tile_offsets)

    def _add_top(self, acts: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """One candidate per sequence (its peak), so top examples never repeat a sequence."""
        _, seq_len, n_nodes = acts.shape
        w = self.window
        seq_max, peak = acts.max(dim=1)  # [batch, node]
        chosen = _take_best(seq_max, len(self.top.keys))  # [k, node]: sequences of the batch
        start = (peak.gather(0, chosen) - self.before_peak).clamp(0, seq_len - w)
        rows = chosen * seq_len + start  # [k, node]: the window's first row of `flat`
        positions = rows[:, None, :] + torch.arange(w)[None, :, None]  # [k, W, node]
        flat = acts.reshape(-1, n_nodes)
        windows = flat.gather(0, positions.reshape(-1, n_nodes)).reshape(len(chosen), w, n_nodes)
        self.top.merge(seq_max.gather(0, chosen), seq_ids[chosen] * seq_len + start, windows)

    def _set_boundaries(self) -> None:
        """Bucket boundaries: the pilot's quantiles of tile peaks, per node (numpy, linear)."""
        peaks = torch.cat(self.pilot_peaks).numpy()
        self.boundaries = torch.from_numpy(np.quantile(peaks, self.probs, axis=0)).float()
        self.pilot_peaks = []

    def finish(self) -> dict[str, np.ndarray]:
        """The group's node-major arrays, as `RecordStore` keeps them."""
        if self.pilot_peaks:
            self._set_boundaries()
        out: dict[str, np.ndarray] = {}
        out["top_offsets"], out["top_acts"] = self.top.arrays()
        out["random_offsets"], out["random_acts"] = self.random.arrays()
        n_nodes, n_buckets = len(self.max), len(self.buckets)
        n_per = len(self.buckets[0].keys) if self.buckets else 0
        out["quantile_offsets"] = np.full((n_nodes, n_buckets, n_per), -1, np.int32)
        out["quantile_acts"] = np.zeros((n_nodes, n_buckets, n_per, self.window), np.float16)
        for q, best in enumerate(self.buckets):
            out["quantile_offsets"][:, q], out["quantile_acts"][:, q] = best.arrays()
        out["quantile_boundaries"] = self.boundaries.T.numpy().astype(np.float32)
        stats = self.moments.stats() | {
            "max": self.max,
            "density": self.n_positive / self.moments.count,
        }
        return out | {name: value.numpy().astype(np.float32) for name, value in stats.items()}


def _merge_sample(
    best: BestWindows, keys: torch.Tensor, tiles: torch.Tensor, tile_offsets: torch.Tensor
) -> None:
    chosen = _take_best(keys, len(best.keys))
    windows = tiles.gather(0, _per_token(chosen, tiles.shape[1]))
    best.merge(keys.gather(0, chosen), tile_offsets.gather(0, chosen), windows)


def _sum_tokens(x: torch.Tensor) -> torch.Tensor:
    """[batch, token, node] -> [node] float64: float32 sums per sequence, float64 across them
    (a float64 copy of the whole batch would cost ten times more)."""
    return x.sum(dim=1).sum(dim=0, dtype=torch.float64)


class RunningMoments:
    """Exact running central moments per node, merged batch by batch (Pébay, 2008)."""

    def __init__(self, n_nodes: int) -> None:
        self.count = 0
        self.mean = torch.zeros(n_nodes, dtype=torch.float64)
        self.m2 = torch.zeros(n_nodes, dtype=torch.float64)
        self.m3 = torch.zeros(n_nodes, dtype=torch.float64)
        self.m4 = torch.zeros(n_nodes, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """`x` [batch, token, node]: its moments about its own mean, merged into the total."""
        nb = x.shape[0] * x.shape[1]
        mean_b = _sum_tokens(x) / nb
        d = x - mean_b.float()
        d2 = d * d
        m2b, m3b, m4b = _sum_tokens(d2), _sum_tokens(d2 * d), _sum_tokens(d2 * d2)
        na, n = self.count, self.count + nb
        delta = mean_b - self.mean
        self.m4 = (
            self.m4
            + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
            + 4 * delta * (na * m3b - nb * self.m3) / n
        )
        self.m3 = (
            self.m3
            + m3b
            + delta**3 * na * nb * (na - nb) / n**2
            + 3 * delta * (na * m2b - nb * self.m2) / n
        )
        self.m2 = self.m2 + m2b + delta**2 * na * nb / n
        self.mean = self.mean + delta * nb / n
        self.count = n

    def stats(self) -> dict[str, torch.Tensor]:
        """Mean, population variance, skewness and excess kurtosis; nan moments if constant."""
        n = self.count
        variance = self.m2 / n
        constant = variance <= 0
        safe = torch.where(constant, 1.0, variance)
        skewness = torch.where(constant, math.nan, self.m3 / n / safe**1.5)
        kurtosis = torch.where(constant, math.nan, self.m4 / n / safe**2 - 3)
        return {"mean": self.mean, "variance": variance, "skewness": skewness, "kurtosis": kurtosis}
