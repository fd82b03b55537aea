"""The compact store of node data that `interpql build-demo` writes and the demo serves from:
records (every node's top and random windows, statistics) and baseline explanations.

Records, a folder: `header.json` (layout and groups) and `records.npz` (compressed): the corpus
tokens once as uint16, and per group `<kind>.<layer>.<field>` node-major arrays. A window is the
int32 offset where it starts in the token array (-1: none) plus float16 activations.

Explanations: `explanations.json.gz`, columns of one row per explanation (kind, layer, index,
text, score, explainer, simulator; a nan score is written as null), names stored once.

How records are computed is the demo's (demo/records.py); reading them is here, where the
serving path can use it without the demo's code.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from interpql.backends.explanations.scoring import tdb_scored_explanation

GroupKey = tuple[str, int]  # (node kind, layer)

FORMAT = "interpql-node-records"
FORMAT_VERSION = 1
EXPLANATIONS_FILE = "explanations.json.gz"
EXPLANATIONS_FORMAT = "interpql-explanations"
EXPLANATIONS_FORMAT_VERSION = 1
STATISTICS = ("max", "mean", "variance", "skewness", "kurtosis", "density")


def quantile_probs(n_quantiles: int) -> tuple[float, ...]:
    """Bucket boundaries as probabilities: (0.5, 0.9, 0.99, 0.999) for 5 buckets, as TDB."""
    if n_quantiles < 2:
        return ()
    return (0.5, *(1 - 10.0**-i for i in range(1, n_quantiles - 1)))


@dataclass(frozen=True)
class StoredWindow:
    offset: int  # where the window starts in the store's token array
    token_ids: tuple[int, ...]
    activations: tuple[float, ...]


@dataclass(frozen=True)
class StoredStats:
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
    top: tuple[StoredWindow, ...]  # highest peak first
    random: tuple[StoredWindow, ...]
    by_quantile: tuple[tuple[StoredWindow, ...], ...]  # one tuple per bucket, lowest bucket first
    quantile_boundaries: tuple[float, ...]
    stats: StoredStats


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


# --- Records -------------------------------------------------------------------------------------


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
            stats=StoredStats(**{name: float(a[name][index]) for name in STATISTICS}),
        )

    def _examples(self, offsets: np.ndarray, acts: np.ndarray) -> tuple[StoredWindow, ...]:
        window = self.layout.window
        return tuple(
            StoredWindow(o, tuple(self.tokens[o : o + window].tolist()), tuple(x))
            for o, x in zip(offsets.tolist(), acts.tolist(), strict=True)
            if o >= 0
        )

    def to_tdb_json(
        self, kind: str, layer: int, index: int, decode_token: Callable[[int], str] | None = None
    ) -> dict[str, Any]:
        """The node's record as Transformer Debugger's NeuronRecord JSON (keys in its order)."""
        decode = decode_token or _gpt2_token_string
        record = self.node_record(kind, layer, index)

        def activation_record(example: StoredWindow) -> dict[str, Any]:
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


@dataclass(frozen=True)
class ExplanationRow:
    kind: str
    layer: int
    index: int
    text: str
    score: float  # correlation of the simulation with the truth; nan where never scored
    explainer: str
    simulator: str


class ExplanationTable:
    def __init__(self, rows: Sequence[ExplanationRow]) -> None:
        self.rows = tuple(rows)
        self._by_node: dict[tuple[str, int, int], list[ExplanationRow]] = {}
        for row in self.rows:
            self._by_node.setdefault((row.kind, row.layer, row.index), []).append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def for_node(self, kind: str, layer: int, index: int) -> list[ExplanationRow]:
        """The node's explanations, best score first."""
        rows = self._by_node.get((kind, layer, index), [])
        return sorted(rows, key=lambda r: -r.score if not math.isnan(r.score) else math.inf)

    def to_tdb_json(self, kind: str, layer: int, index: int) -> dict[str, Any]:
        """Transformer Debugger's NeuronSimulationResults: one line of its explanations JSONL."""
        return {
            "dataclass_name": "NeuronSimulationResults",
            "neuron_id": tdb_neuron_id(layer, index),
            "scored_explanations": [
                tdb_scored_explanation(row.text, row.score, [])
                for row in self.for_node(kind, layer, index)
            ],
        }

    def save(self, directory: str | Path) -> None:
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        names = {col: sorted({getattr(r, col) for r in self.rows}) for col in _NAMED_COLUMNS}
        table: dict[str, Any] = {
            "format": EXPLANATIONS_FORMAT,
            "version": EXPLANATIONS_FORMAT_VERSION,
            "names": names,
        }
        for col in _NAMED_COLUMNS:
            code = {name: i for i, name in enumerate(names[col])}
            table[col] = [code[getattr(r, col)] for r in self.rows]
        table |= {
            "layer": [r.layer for r in self.rows],
            "index": [r.index for r in self.rows],
            "text": [r.text for r in self.rows],
            "score": [None if math.isnan(r.score) else r.score for r in self.rows],
        }
        data = json.dumps(table, separators=(",", ":"), allow_nan=False).encode()
        # mtime=0: the same table gives the same bytes, so rebuilding the demo changes no file.
        (root / EXPLANATIONS_FILE).write_bytes(gzip.compress(data, mtime=0))

    @classmethod
    def load(cls, directory: str | Path) -> ExplanationTable:
        table = json.loads(gzip.decompress((Path(directory) / EXPLANATIONS_FILE).read_bytes()))
        if (
            table.get("format") != EXPLANATIONS_FORMAT
            or table.get("version") != EXPLANATIONS_FORMAT_VERSION
        ):
            raise ValueError(f"{directory} holds no explanations of format {EXPLANATIONS_FORMAT}")
        named = {col: [table["names"][col][c] for c in table[col]] for col in _NAMED_COLUMNS}
        scores = [math.nan if s is None else float(s) for s in table["score"]]
        rows = [
            ExplanationRow(kind, layer, index, text, score, explainer, simulator)
            for kind, layer, index, text, score, explainer, simulator in zip(
                named["kind"],
                table["layer"],
                table["index"],
                table["text"],
                scores,
                named["explainer"],
                named["simulator"],
                strict=True,
            )
        ]
        return cls(rows)


_NAMED_COLUMNS = ("kind", "explainer", "simulator")
