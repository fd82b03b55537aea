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
from interpql.file_errors import FileProblem, reading

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
        checked: bool = False,
    ) -> None:
        self.layout = layout
        self.tokens = tokens  # [n_tokens] uint16
        self._groups: dict[GroupKey, Mapping[str, np.ndarray]] = dict(groups)
        # Whether every group passed group_problem already (load checks them; a store built
        # in memory is checked by its reader).
        self.checked = checked

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
        """The store in `directory`; FileProblem naming the file (and its array or key) that
        does not fit: every array's presence, dtype and shape against the header, and every
        window offset inside the corpus, are checked here (a few milliseconds for the demo)."""
        root = Path(directory)
        header_path, arrays_path = root / "header.json", root / "records.npz"
        with reading(header_path, "a node-records header (JSON)"):
            header = json.loads(header_path.read_text())
        layout, groups_of = _read_header(header_path, header)
        # Opened here, not by np.load: it leaves the file open when the zip does not parse.
        with (
            reading(arrays_path, "node-record arrays (.npz)"),
            arrays_path.open("rb") as file,
            np.load(file) as npz,
        ):
            arrays = {name: npz[name] for name in npz.files}
        tokens = arrays.get("tokens")
        if tokens is None or tokens.dtype.kind not in "iu" or tokens.ndim != 1:
            raise FileProblem(arrays_path, "array tokens: expected a 1-d array of token ids")
        if header.get("n_tokens", len(tokens)) != len(tokens):
            raise FileProblem(
                arrays_path,
                f"holds {len(tokens)} tokens; {header_path.name} says {header['n_tokens']}",
            )
        groups: dict[GroupKey, dict[str, np.ndarray]] = {}
        for group in groups_of:
            prefix = f"{group.kind}.{group.layer}."
            found = {
                name.removeprefix(prefix): value
                for name, value in arrays.items()
                if name.startswith(prefix)
            }
            problem = group_problem(found, group.n_nodes, layout.window, len(tokens))
            if problem is not None:
                raise FileProblem(arrays_path, f"array {prefix}{problem}")
            groups[(group.kind, group.layer)] = found
        return cls(layout, tokens, groups, checked=True)


def _read_header(path: Path, header: Any) -> tuple[RecordLayout, list[NodeGroup]]:
    if not isinstance(header, dict):
        raise FileProblem(path, "expected a JSON object")
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise FileProblem(path, f"holds no node records of format {FORMAT} v{FORMAT_VERSION}")
    for key in ("layout", "groups"):
        if key not in header:
            raise FileProblem(path, f"has no {key!r}")
    layout = header["layout"]
    if not isinstance(layout, dict) or set(layout) != set(RecordLayout.__dataclass_fields__):
        fields = ", ".join(RecordLayout.__dataclass_fields__)
        raise FileProblem(path, f"'layout' must be an object of {fields}")
    if not all(_is_count(v) for v in layout.values()) or layout["window"] < 1:
        raise FileProblem(path, "'layout' must hold whole numbers >= 0 (a window >= 1)")
    groups = header["groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, dict)
        and isinstance(g.get("kind"), str)
        and _is_count(g.get("layer"))
        and _is_count(g.get("n_nodes"))
        for g in groups
    ):
        raise FileProblem(path, "'groups' must be a list of {kind, layer, n_nodes}")
    return RecordLayout(**layout), [NodeGroup(g["kind"], g["layer"], g["n_nodes"]) for g in groups]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Each group array's element kind and shape: "n" a node, "w" a window's tokens, letters the
# group's own sizes (top, random, quantile buckets, windows per bucket, boundaries).
_GROUP_ARRAYS = {
    "top_offsets": ("offset", "nt"),
    "top_acts": ("value", "ntw"),
    "random_offsets": ("offset", "nr"),
    "random_acts": ("value", "nrw"),
    "quantile_offsets": ("offset", "nqp"),
    "quantile_acts": ("value", "nqpw"),
    "quantile_boundaries": ("value", "nb"),
    **{name: ("value", "n") for name in STATISTICS},
}
# numpy's dtype kinds of each element, and their name in a message.
_ELEMENTS = {"offset": ("iu", "integers"), "value": ("f", "floats")}
# nan where the moment is undefined (a constant node); served as unknown.
_MAY_BE_NAN = frozenset({"skewness", "kurtosis"})


def group_problem(
    arrays: Mapping[str, np.ndarray], n_nodes: int, window: int, n_tokens: int
) -> str | None:
    """What is wrong with one group's arrays (`<array>: why`), or None. Offsets are -1 (no
    window) or where a window starts in the corpus; served values are finite."""
    sizes = {"n": n_nodes, "w": window}
    for name, (element, axes) in _GROUP_ARRAYS.items():
        array = arrays.get(name)
        if array is None:
            return f"{name}: missing"
        dtype_kinds, described = _ELEMENTS[element]
        if array.dtype.kind not in dtype_kinds:
            return f"{name}: holds {array.dtype}, expected {described}"
        if array.ndim != len(axes):
            return f"{name}: has {array.ndim} dimensions, expected {len(axes)}"
        for axis, size in zip(axes, array.shape, strict=True):
            expected = sizes.setdefault(axis, size)
            if size != expected:
                return (
                    f"{name}: shape {array.shape} does not fit the group's other arrays "
                    f"({n_nodes} nodes, windows of {window} tokens)"
                )
        if element == "offset" and array.size and (array.min() < -1 or array.max() >= n_tokens):
            return f"{name}: an offset outside the corpus's {n_tokens} tokens"
        if element == "value" and name not in _MAY_BE_NAN and not np.isfinite(array).all():
            return f"{name}: holds a value that is not finite"
    return None


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
        """The table in `directory`; FileProblem naming the file (and its column) that does
        not fit."""
        path = Path(directory) / EXPLANATIONS_FILE
        with reading(path, "interpql explanations (gzipped JSON)"):
            table = json.loads(gzip.decompress(path.read_bytes()))
        if (
            not isinstance(table, dict)
            or table.get("format") != EXPLANATIONS_FORMAT
            or table.get("version") != EXPLANATIONS_FORMAT_VERSION
        ):
            raise FileProblem(path, f"holds no explanations of format {EXPLANATIONS_FORMAT}")
        problem = _explanation_table_problem(table)
        if problem is not None:
            raise FileProblem(path, problem)
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


def _explanation_table_problem(table: dict[str, Any]) -> str | None:
    """What is wrong with a table's columns (`key: why`), or None."""
    names = table.get("names")
    if not isinstance(names, dict):
        return "'names': missing, or not an object"
    columns = (*_NAMED_COLUMNS, "layer", "index", "text", "score")
    for col in columns:
        if not isinstance(table.get(col), list):
            return f"{col!r}: missing, or not a list"
    lengths = {len(table[col]) for col in columns}
    if len(lengths) > 1:
        return "the columns are not all of one length"
    for col in _NAMED_COLUMNS:
        known = names.get(col)
        if not isinstance(known, list) or not all(isinstance(n, str) for n in known):
            return f"'names.{col}': missing, or not a list of strings"
        if not all(_is_count(c) and c < len(known) for c in table[col]):
            return f"{col!r}: a code outside names.{col}"
    for col in ("layer", "index"):
        if not all(_is_count(v) for v in table[col]):
            return f"{col!r}: holds a value that is not a whole number >= 0"
    if not all(isinstance(t, str) for t in table["text"]):
        return "'text': holds a value that is not a string"
    if not all(
        s is None or (isinstance(s, int | float) and not isinstance(s, bool))
        for s in table["score"]
    ):
        return "'score': holds a value that is not a number or null"
    return None


_NAMED_COLUMNS = ("kind", "explainer", "simulator")
