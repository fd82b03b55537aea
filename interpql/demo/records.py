"""Node records: every node's top-activating windows, random windows and statistics.

`compute_records` streams once over held-out tokens cut into sequences of `seq_len`, calling the
caller's `activations_fn` once per batch. It returns a `RecordStore` holding, per node:

* top examples: the `top_k` sequences with the highest activation, one window each, with the
  node's activation at every token; a window shows `window - 1 - window // 8` tokens before the
  peak where the sequence allows, since what precedes a token is what can explain it;
* a random sample: `n_random` windows drawn uniformly from the non-overlapping windows that tile
  each sequence, with a per-node random key, so nodes get independent samples (each group of
  nodes, a kind in a layer, draws its keys from a generator seeded by the group);
* a random sample by quantile: the same windows bucketed by their peak activation, with
  `n_per_quantile` drawn per bucket. Bucket boundaries are the node's quantiles of window peaks at
  `quantile_probs(n_quantiles)` (Transformer Debugger's 0.5/0.9/0.99/0.999 for five buckets),
  estimated from the first (random) sequences of the stream, the pilot; buckets are then filled
  from the windows after the pilot only, so each is a uniform sample of its bucket;
* exact moments over all tokens (mean, population variance, skewness, excess kurtosis; merged
  batch by batch with Pébay's formulas, in float64), the maximum and the density (share > 0).

What a node's per-token activation is, as the caller passes it:
  mlp_neuron                     the post-GELU activation
  attention_head                 the norm of what the head writes to the residual stream at
                                 that token, `head_write_norms(attn_z, W_O)`; TDB's own head
                                 records hold per-token-pair values, ours do not
  *_autoencoder_latent           the latent's value

The per-batch bookkeeping lives in `record_stream.py`.

On disk it is the compact store of loaders/sources/compact_format.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from interpql.demo.record_stream import GroupAccumulator
from interpql.loaders.sources.compact_format import (
    GroupKey,
    RecordLayout,
    RecordStore,
    quantile_probs,
)

ActivationsFn = Callable[[torch.Tensor], Mapping[tuple[str, int], torch.Tensor]]


# --- Computing records -------------------------------------------------------------------------


def compute_records(
    tokens: np.ndarray,
    activations_fn: ActivationsFn,
    *,
    seq_len: int,
    window: int = 24,
    top_k: int = 10,
    n_random: int = 5,
    n_quantiles: int = 5,
    n_per_quantile: int = 1,
    pilot_sequences: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> RecordStore:
    """Streams over `tokens` (a flat array of ids) once and keeps every node's record.

    Args:
        tokens: held-out corpus tokens; cut into `len(tokens) // seq_len` sequences, the tail
            dropped.
        activations_fn: from a [batch, seq_len] LongTensor, one forward pass' activations per
            (kind, layer), each [batch, seq_len, n_nodes] (see the module docstring).
        window: tokens per example window; at most `seq_len`.
        n_quantiles: buckets of `random_sample_by_quantile`; 0 or 1 for none.
        pilot_sequences: at most this many (and at most half the) sequences estimate the
            quantile boundaries; buckets are sampled from the rest.
    """
    if not 0 < window <= seq_len:
        raise ValueError(f"window must be in 1..seq_len ({seq_len}), not {window}")
    n_seq = len(tokens) // seq_len
    if n_seq == 0:
        raise ValueError(f"{len(tokens)} tokens make no sequence of {seq_len}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise ValueError("token ids must fit in uint16, as GPT-2's do")
    corpus = np.ascontiguousarray(tokens[: n_seq * seq_len], dtype=np.uint16)
    n_pilot = 0 if n_quantiles < 2 else min(pilot_sequences, n_seq // 2)
    # Batches are whole, so the pilot (bucket boundaries) ends on a batch boundary.
    n_pilot = -(-n_pilot // batch_size) * batch_size
    if n_pilot == 0:
        n_quantiles = 0  # too little data to set bucket boundaries
    layout = RecordLayout(
        seq_len, window, top_k, n_random, n_quantiles, n_per_quantile, seed, n_pilot
    )
    generator = torch.Generator().manual_seed(seed)
    # A random sequence order makes the pilot a random sample of the corpus.
    order = torch.randperm(n_seq, generator=generator).numpy()
    seqs = corpus.reshape(n_seq, seq_len)
    accumulators: dict[GroupKey, GroupAccumulator] = {}
    # Each group draws its sample keys from its own generator: adding a kind of node to a
    # build changes no other kind's samples.
    generators: dict[GroupKey, torch.Generator] = {}
    with torch.inference_mode():
        for start in _progress(range(0, n_seq, batch_size), progress):
            seq_ids = torch.from_numpy(order[start : start + batch_size].astype(np.int64))
            batch = torch.from_numpy(seqs[seq_ids.numpy()].astype(np.int64))
            for key, acts in activations_fn(batch).items():
                if key not in accumulators:
                    accumulators[key] = GroupAccumulator(
                        acts.shape[-1],
                        window=window,
                        before_peak=layout.before_peak,
                        top_k=top_k,
                        n_random=n_random,
                        quantile_probs=quantile_probs(n_quantiles),
                        n_per_quantile=n_per_quantile,
                    )
                    group_seed = zlib.crc32(f"{seed}/{key[0]}/{key[1]}".encode())
                    generators[key] = torch.Generator().manual_seed(group_seed)
                accumulators[key].add(
                    acts.float(), seq_ids, generators[key], in_pilot=start < n_pilot
                )
    groups = {key: acc.finish() for key, acc in sorted(accumulators.items(), key=_group_order)}
    return RecordStore(layout, corpus, groups)


def head_write_norms(attn_z: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """[batch, token, head, d_head] z and [head, d_head, d_model] W_O -> [batch, token, head]:
    the norm of each head's write to the residual stream (the output bias belongs to no head)."""
    writes = torch.einsum("bthd,hdm->bthm", attn_z, w_o)
    norms: torch.Tensor = torch.linalg.vector_norm(writes, dim=-1)
    return norms


def _group_order(item: tuple[GroupKey, object]) -> tuple[int, int, str]:
    (kind, layer), _ = item
    known = ["mlp_neuron", "attention_head", "mlp_autoencoder_latent"]
    rank = known.index(kind) if kind in known else len(known)
    return layer, rank, kind


def _progress(batches: range, enabled: bool) -> Iterator[int]:
    if not enabled:
        return iter(batches)
    from tqdm import tqdm

    return iter(tqdm(batches, desc="node records", unit="batch"))
