"""Neuronpedia's feature JSON, from a folder (local or blobfile) of files downloaded from it.

Each `*.json` file holds one feature (`{modelId, source, index, density, explanations,
activations, ...}` as its API answers), a list of them, or an upload batch (`{modelId, source,
features: [...]}`, explanations as `{text, methodName, modelName}`). A feature's `source` is
`<layer>-<set>` (`8-res-jb`): the node `<model>/<set>/<layer>/<index>` of the model the source
serves. Every file is read once, at start-up; one that does not parse is refused naming it.
Activations keep their token strings only (Neuronpedia stores no ids).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
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


def parse_source_name(source: str) -> tuple[int, str]:
    """`8-res-jb` -> (8, "res-jb"); ValueError if it does not start with a layer."""
    layer, sep, name = source.partition("-")
    if not sep or not name or not (layer.isascii() and layer.isdigit()):
        raise ValueError(f"source {source!r} is not <layer>-<dictionary> (as in 8-res-jb)")
    return int(layer), name


def source_name(node: NodeRef) -> str:
    return f"{node.layer}-{node.kind}"


class NeuronpediaFolderSource(NodeSource):
    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = folder.rstrip("/")
        self._features: dict[tuple[str, int, int], dict[str, Any]] = {}  # (kind, layer, index)
        self._models: set[str] = set()
        names = remote.call(lambda: sorted(bf.listdir(self.folder)), "a Neuronpedia folder", folder)
        paths = [f"{self.folder}/{n}" for n in names if n.endswith(".json")]
        if not paths:
            raise FileProblem(folder, "holds no .json files of Neuronpedia features")
        for path, data in zip(paths, remote.read_files(paths, "Neuronpedia features"), strict=True):
            with reading(path, "Neuronpedia feature JSON"):
                for feature in _features(json.loads(data)):
                    layer, kind = parse_source_name(str(feature["source"]))
                    self._features[(kind, layer, int(feature["index"]))] = feature
                    self._models.add(str(feature.get("modelId", "")))

    def _feature(self, node: NodeRef) -> dict[str, Any] | None:
        return self._features.get((node.kind, node.layer, node.index))

    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        answers: list[RecordAnswer] = []
        for node in nodes:
            feature = self._feature(node)
            examples = _examples(feature) if feature is not None else ()
            if feature is None or not examples:
                answers.append(None)
                continue
            peak = max(max(e.activations, default=0.0) for e in examples)
            answers.append(
                NodeRecordData(
                    source=self.name,
                    top=examples,
                    random=(),
                    statistics=Statistics(
                        max=peak,
                        mean=None,
                        variance=None,
                        skewness=None,
                        kurtosis=None,
                        density=finite(
                            _number(feature.get("frac_nonzero", feature.get("density")))
                        ),
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
            feature = self._feature(node)
            out.append([] if feature is None else _explanations(self.name, feature))
        return out

    def list_explanations(self, model: str) -> Iterable[tuple[str, str, float | None]]:
        for (kind, layer, index), feature in self._features.items():
            node = NodeRef(model, kind, layer, index)
            for explanation in _explanations(self.name, feature):
                yield node.id, explanation.text, explanation.score


def _features(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [f for item in data for f in _features(item)]
    if not isinstance(data, dict):
        raise ValueError("expected a feature, a list of features or an upload batch")
    if "features" in data:  # an upload batch: its modelId and source apply to every feature
        shared = {k: data[k] for k in ("modelId", "source") if k in data}
        return [shared | dict(f) for f in data["features"]]
    if "source" not in data or "index" not in data:
        raise ValueError("a feature needs source and index")
    return [data]


def _examples(feature: dict[str, Any]) -> tuple[Example, ...]:
    examples = []
    for activation in feature.get("activations") or []:
        tokens = tuple(str(t) for t in activation.get("tokens", []))
        values = tuple(float(v) for v in activation.get("values", []))
        if tokens and len(tokens) == len(values):
            examples.append(Example(tokens=tokens, token_ids=None, activations=values))
    return tuple(sorted(examples, key=lambda e: -max(e.activations, default=0.0)))


def _explanations(source: str, feature: dict[str, Any]) -> list[ExplanationData]:
    found = []
    for e in feature.get("explanations") or []:
        text = e.get("description", e.get("text"))
        if not isinstance(text, str):
            continue
        explainer = e.get("explanationModelName") or e.get("modelName") or ""
        method = e.get("typeName") or e.get("methodName") or ""
        found.append(
            ExplanationData(
                source=source,
                text=text,
                score=finite(_number(e.get("score"))),
                scorer=str(method),
                explainer=str(explainer),
            )
        )
    return sorted(found, key=lambda x: -(x.score if x.score is not None else -math.inf))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
