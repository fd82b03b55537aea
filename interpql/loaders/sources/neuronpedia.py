"""Neuronpedia's feature JSON, from a folder (local or blobfile) of files downloaded from it.

Each `*.json` file holds one feature (`{modelId, source, index, density, explanations,
activations, ...}` as its API answers), a list of them, or an upload batch (`{modelId, source,
features: [...]}`, explanations as `{text, methodName, modelName}`). A feature's `source` is
`<layer>-<set>` (`8-res-jb`): the node `<model>/<set>/<layer>/<index>` of the model the source
serves. Every file is read and checked once, at start-up, into the values served: one that does
not parse, holds a value that is not a finite number where one is served, or names a node the
model lacks (`check_nodes`) is refused naming it. Activations keep their token strings only
(Neuronpedia stores no ids).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import blobfile as bf

from interpql.backends import remote
from interpql.file_errors import FileProblem, reading
from interpql.loaders.sources.base import (
    Example,
    ExplanationData,
    NodeRecordData,
    NodeSource,
    RecordAnswer,
    Statistics,
    finite,
)
from interpql.specs import NodeRef

FeatureKey = tuple[str, int, int]  # (kind, layer, index)


def parse_source_name(source: str) -> tuple[int, str]:
    """`8-res-jb` -> (8, "res-jb"); ValueError if it does not start with a layer."""
    layer, sep, name = source.partition("-")
    if not sep or not name or not (layer.isascii() and layer.isdigit()):
        raise ValueError(f"source {source!r} is not <layer>-<dictionary> (as in 8-res-jb)")
    return int(layer), name


def source_name(node: NodeRef) -> str:
    return f"{node.layer}-{node.kind}"


@dataclass(frozen=True)
class _Feature:
    """One feature as it is served, built at start-up (nothing is parsed per request)."""

    path: str  # the file it came from, to name when the model lacks its node
    examples: tuple[Example, ...]  # highest peak first
    explanations: tuple[ExplanationData, ...]  # best score first
    density: float | None


class NeuronpediaFolderSource(NodeSource):
    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = folder.rstrip("/")
        self._features: dict[FeatureKey, _Feature] = {}
        paths = [f"{self.folder}/{n}" for n in self._file_names() if n.endswith(".json")]
        if not paths:
            raise FileProblem(folder, "holds no .json files of Neuronpedia features")
        for path, data in zip(paths, remote.read_files(paths, "Neuronpedia features"), strict=True):
            with reading(path, "Neuronpedia feature JSON"):
                for number, raw in enumerate(_features(json.loads(data))):
                    try:
                        key, feature = _parsed(name, path, raw)
                    except ValueError as exc:
                        raise FileProblem(path, f"feature {number}: {exc}") from None
                    self._features[key] = feature

    def _file_names(self) -> list[str]:
        # blobfile words a missing local folder as Windows does ("The system cannot find the
        # path specified"); say which option and path instead.
        where = f"--neuronpedia-source {self.name}="
        try:
            return sorted(
                remote.call(lambda: bf.listdir(self.folder), "a Neuronpedia folder", self.folder)
            )
        except FileNotFoundError:
            raise FileProblem(self.folder, f"no such folder ({where})") from None
        except NotADirectoryError:
            raise FileProblem(self.folder, f"is not a folder ({where})") from None

    def check_nodes(self, node_count: Callable[[str, int], int], n_layers: int) -> None:
        """FileProblem naming the file of a feature whose node the model lacks (an unknown
        set, layer or index): searches would find ids that no query can read. `node_count`
        is the model entry's (nodes of a kind in a layer, 0 where there are none)."""
        for (kind, layer, index), feature in self._features.items():
            count = node_count(kind, layer) if layer < n_layers else 0
            if not index < count:
                raise FileProblem(
                    feature.path,
                    f"feature {layer}-{kind} {index}: the model has no such node ({count} "
                    f"nodes of {kind!r} in layer {layer} of {n_layers})",
                )

    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        answers: list[RecordAnswer] = []
        for node in nodes:
            feature = self._features.get((node.kind, node.layer, node.index))
            if feature is None or not feature.examples:
                answers.append(None)
                continue
            answers.append(
                NodeRecordData(
                    source=self.name,
                    top=feature.examples,
                    random=(),
                    statistics=Statistics(
                        max=max(e.max_activation for e in feature.examples),
                        mean=None,
                        variance=None,
                        skewness=None,
                        kurtosis=None,
                        density=feature.density,
                        quantile_boundaries=(),
                    ),
                )
            )
        return answers

    def read_explanations(
        self, nodes: Sequence[NodeRef]
    ) -> list[list[ExplanationData] | Exception]:
        out: list[list[ExplanationData] | Exception] = []
        for node in nodes:
            feature = self._features.get((node.kind, node.layer, node.index))
            out.append([] if feature is None else list(feature.explanations))
        return out

    def list_explanations(self, model: str) -> Iterable[tuple[str, str, float | None]]:
        for (kind, layer, index), feature in self._features.items():
            node = NodeRef(model, kind, layer, index)
            for explanation in feature.explanations:
                yield node.id, explanation.text, explanation.score


def _features(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [f for item in data for f in _features(item)]
    if not isinstance(data, dict):
        raise ValueError("expected a feature, a list of features or an upload batch")
    if "features" in data:  # an upload batch: its modelId and source apply to every feature
        if not isinstance(data["features"], list) or not all(
            isinstance(f, dict) for f in data["features"]
        ):
            raise ValueError("an upload batch's features must be a list of objects")
        shared = {k: data[k] for k in ("modelId", "source") if k in data}
        return [shared | f for f in data["features"]]
    if "source" not in data or "index" not in data:
        raise ValueError("a feature needs source and index")
    return [data]


def _parsed(source: str, path: str, raw: dict[str, Any]) -> tuple[FeatureKey, _Feature]:
    """The feature's node and its served values; ValueError saying what does not fit."""
    if not isinstance(raw["source"], str):
        raise ValueError(f"source must be a string, not {raw['source']!r}")
    layer, kind = parse_source_name(raw["source"])
    index = raw["index"]
    # The API writes indices as strings ("12"); an upload batch as numbers.
    if isinstance(index, str) and index.isascii() and index.isdigit():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a whole number >= 0, not {raw['index']!r}")
    feature = _Feature(
        path=path,
        examples=_examples(raw.get("activations")),
        explanations=_explanations(source, raw.get("explanations")),
        density=finite(_optional_number(raw.get("frac_nonzero", raw.get("density")), "density")),
    )
    return (kind, layer, index), feature


def _examples(activations: Any) -> tuple[Example, ...]:
    examples = []
    for number, activation in enumerate(_list(activations, "activations")):
        where = f"activations[{number}]"
        if not isinstance(activation, dict):
            raise ValueError(f"{where} must be an object of tokens and values")
        tokens = _list(activation.get("tokens"), f"{where}.tokens")
        values = _list(activation.get("values"), f"{where}.values")
        if not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{where}.tokens must be strings")
        if not all(_is_finite_number(v) for v in values):
            raise ValueError(f"{where}.values must be finite numbers")
        if len(tokens) != len(values):
            raise ValueError(f"{where} has {len(tokens)} tokens but {len(values)} values")
        if tokens:
            examples.append(Example(tuple(tokens), None, tuple(float(v) for v in values)))
    return tuple(sorted(examples, key=lambda e: -e.max_activation))


def _explanations(source: str, explanations: Any) -> tuple[ExplanationData, ...]:
    found = []
    for number, e in enumerate(_list(explanations, "explanations")):
        where = f"explanations[{number}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be an object")
        text = e.get("description", e.get("text"))
        if not isinstance(text, str):
            raise ValueError(f"{where} has no description (or text) string")
        explainer = e.get("explanationModelName") or e.get("modelName") or ""
        method = e.get("typeName") or e.get("methodName") or ""
        found.append(
            ExplanationData(
                source=source,
                text=text,
                score=finite(_optional_number(e.get("score"), f"{where}.score")),
                scorer=str(method),
                explainer=str(explainer),
            )
        )
    return tuple(sorted(found, key=lambda x: -(x.score if x.score is not None else -math.inf)))


def _list(value: Any, what: str) -> list[Any]:
    """A list field, absent or null read as empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, not {type(value).__name__}")
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _optional_number(value: Any, what: str) -> float | None:
    """A number or null; a non-finite one is kept here and served as unknown (by `finite`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number or null, not {value!r}")
    return float(value)
