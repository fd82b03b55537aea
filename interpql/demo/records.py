"""Node records: every node's top-activating windows, random windows and statistics.

`compute_records` streams once over held-out tokens cut into sequences of `seq_len`, calling the
caller's `activations_fn` once per batch. It returns a `RecordStore` holding, per node:

* top examples: the `top_k` sequences with the highest activation, one window each, with the
  node's activation at every token; a window shows `window - 1 - window // 8` tokens before the
  peak where the sequence allows, since what precedes a token is what can explain it;
* a random sample: `n_random` windows drawn uniformly from the non-overlapping windows that tile
  each sequence, with a per-node random key, so nodes get independent samples;
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

On disk (a folder): `header.json` (layout and groups) and `records.npz` (compressed): the corpus
tokens once as uint16, and per group `<kind>.<layer>.<field>` node-major arrays. An example is the
int32 offset of its window in the token array (-1: none) plus float16 activations.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interpql.demo.record_stream import GroupAccumulator, quantile_probs

ActivationsFn = Callable[[torch.Tensor], Mapping[tuple[str, int], torch.Tensor]]
GroupKey = tuple[str, int]  # (node kind, layer)

FORMAT = "interpql-node-records"
FORMAT_VERSION = 1
_STATS = ("max", "mean", "variance", "skewness", "kurtosis", "density")


@dataclass(frozen=True)
class Example:
    offset: int  # where the window starts in the store's token array
    token_ids: tuple[int, ...]
    activations: tuple[float, ...]


@dataclass(frozen=True)
class NodeStats:
    max: float
    mean: float
    variance: float
    skewness: float  # nan for a constant node
    kurtosis: float  # excess kurtosis (0 for a normal distribution); nan for a constant node
    density: float  # share of tokens where the activation is > 0


@dataclass(frozen=True)
class NodeRecord:
    kind: str
    layer: int
    index: int
    top: tuple[Example, ...]  # highest peak first
    random: tuple[Example, ...]
    by_quantile: tuple[tuple[Example, ...], ...]  # one tuple per bucket, lowest bucket first
    quantile_boundaries: tuple[float, ...]
    stats: NodeStats


@dataclass(frozen=True)
class NodeGroup:
    kind: str
    layer: int
    n_nodes: int


@dataclass(frozen=True)
class RecordLayout:
    seq_len: int
    window: int
    top_k: int
    n_random: int
    n_quantiles: int
    n_per_quantile: int
    seed: int
    pilot_sequences: int  # sequences whose window peaks set the quantile boundaries

    @property
    def before_peak(self) -> int:
        """Tokens shown before the peak when the sequence allows: most of the window."""
        return self.window - 1 - self.window // 8


# --- The store ---------------------------------------------------------------------------------


class RecordStore:
    def __init__(
        self,
        layout: RecordLayout,
        tokens: np.ndarray,
        groups: Mapping[GroupKey, Mapping[str, np.ndarray]],
    ) -> None:
        self.layout = layout
        self.tokens = tokens  # [n_tokens] uint16
        self._groups: dict[GroupKey, Mapping[str, np.ndarray]] = dict(groups)

    def groups(self) -> list[NodeGroup]:
        return [NodeGroup(k, layer, len(a["mean"])) for (k, layer), a in self._groups.items()]

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(kind for kind, _ in self._groups))

    def count(self, kind: str, layer: int) -> int:
        group = self._groups.get((kind, layer))
        return 0 if group is None else len(group["mean"])

    def arrays(self, kind: str, layer: int) -> Mapping[str, np.ndarray]:
        """The group's node-major arrays, for bulk readers (search, explanation building)."""
        return self._groups[(kind, layer)]

    def node_record(self, kind: str, layer: int, index: int) -> NodeRecord:
        a = self._groups[(kind, layer)]
        if not 0 <= index < len(a["mean"]):
            raise IndexError(f"{kind} {layer} has {len(a['mean'])} nodes, not {index + 1}")
        n_buckets = a["quantile_offsets"].shape[1]
        return NodeRecord(
            kind=kind,
            layer=layer,
            index=index,
            top=self._examples(a["top_offsets"][index], a["top_acts"][index]),
            random=self._examples(a["random_offsets"][index], a["random_acts"][index]),
            by_quantile=tuple(
                self._examples(a["quantile_offsets"][index, q], a["quantile_acts"][index, q])
                for q in range(n_buckets)
            ),
            quantile_boundaries=tuple(a["quantile_boundaries"][index].tolist()),
            stats=NodeStats(**{name: float(a[name][index]) for name in _STATS}),
        )

    def _examples(self, offsets: np.ndarray, acts: np.ndarray) -> tuple[Example, ...]:
        window = self.layout.window
        return tuple(
            Example(int(o), tuple(self.tokens[o : o + window].tolist()), tuple(x.tolist()))
            for o, x in zip(offsets, acts, strict=True)
            if o >= 0
        )

    def to_tdb_json(
        self, kind: str, layer: int, index: int, decode_token: Callable[[int], str] | None = None
    ) -> dict[str, Any]:
        """The node's record as Transformer Debugger's NeuronRecord JSON (keys in its order)."""
        decode = decode_token or _gpt2_token_string
        record = self.node_record(kind, layer, index)

        def activation_record(example: Example) -> dict[str, Any]:
            return {
                "dataclass_name": "ActivationRecord",
                "activations": list(example.activations),
                "tokens": [decode(t) for t in example.token_ids],
            }

        stats = record.stats
        return {
            "dataclass_name": "NeuronRecord",
            "neuron_id": {
                "dataclass_name": "NeuronId",
                "neuron_index": index,
                "layer_index": layer,
            },
            "random_sample": [activation_record(e) for e in record.random],
            "random_sample_by_quantile": (
                [[activation_record(e) for e in bucket] for bucket in record.by_quantile]
                if record.by_quantile
                else None
            ),
            "quantile_boundaries": list(record.quantile_boundaries) if record.by_quantile else None,
            "mean": _json_float(stats.mean),
            "variance": _json_float(stats.variance),
            "skewness": _json_float(stats.skewness),
            "kurtosis": _json_float(stats.kurtosis),
            "most_positive_activation_records": [activation_record(e) for e in record.top],
        }

    def save(self, directory: str | Path) -> None:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layout": asdict(self.layout),
            "quantile_probs": list(quantile_probs(self.layout.n_quantiles)),
            "n_tokens": len(self.tokens),
            "groups": [asdict(g) for g in self.groups()],
        }
        (root / "header.json").write_text(json.dumps(header, indent=1))
        arrays = {"tokens": self.tokens}
        for (kind, layer), group in self._groups.items():
            arrays |= {f"{kind}.{layer}.{name}": value for name, value in group.items()}
        np.savez_compressed(root / "records.npz", **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, directory: str | Path) -> RecordStore:
        root = Path(directory)
        header = json.loads((root / "header.json").read_text())
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{root} holds no node records of format {FORMAT} v{FORMAT_VERSION}")
        with np.load(root / "records.npz") as npz:
            arrays = {name: npz[name] for name in npz.files}
        groups: dict[GroupKey, dict[str, np.ndarray]] = {}
        for g in header["groups"]:
            prefix = f"{g['kind']}.{g['layer']}."
            groups[(g["kind"], g["layer"])] = {
                name.removeprefix(prefix): value
                for name, value in arrays.items()
                if name.startswith(prefix)
            }
        return cls(RecordLayout(**header["layout"]), arrays["tokens"], groups)


def tdb_neuron_id(layer: int, index: int) -> dict[str, Any]:
    """Transformer Debugger's NeuronId, which names heads and latents too."""
    return {"dataclass_name": "NeuronId", "neuron_index": index, "layer_index": layer}


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


@functools.cache
def _gpt2_token_string(token: int) -> str:
    from interpql.backends.tokenizer import gpt2_encoding

    return gpt2_encoding().decode([token])


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
                accumulators[key].add(acts.float(), seq_ids, generator, in_pilot=start < n_pilot)
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
