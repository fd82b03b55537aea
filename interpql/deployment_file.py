"""The deployment file (`interpql serve --deployment FILE.toml`): the models one server serves,
each with its dictionaries and node-data sources.

    [[model]]                      # the embedded demo (no `model` key)
    name = "tiny-stdlib"

    [[model]]
    model = "random:gpt2-small"    # what --model takes
    name = "small"
    backend = "transformerlens"    # and device, dtype, no_model, mlp_autoencoder, ...
    dictionaries = { res = "/data/res-jb", tc = { path = "/data/tc", scaling_factor = 1.0 } }
    sources = [{ name = "tdb", kind = "mlp_neuron", records = "az://..." }]
    neuronpedia = { np = "/data/neuronpedia-features" }   # --neuronpedia-source

Each table becomes the per-model flags of `serve` (MODEL_FIELDS); anything else in the file is
refused naming the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from interpql.file_errors import FileProblem, reading

_STRINGS = ("model", "name", "backend", "device", "dtype", "mlp_autoencoder", "attn_autoencoder")
_KEYS = frozenset({*_STRINGS, "no_model", "dictionaries", "sources", "neuronpedia"})
_SOURCE_KEYS = ("name", "kind", "records", "explanations")


def read_deployment(path: str) -> list[dict[str, Any]]:
    """Each model's fields, as ServeOptions names them."""
    with reading(path, "a deployment file (TOML)"):
        data = tomllib.loads(Path(path).read_text())
    unknown = set(data) - {"model"}
    models = data.get("model")
    if unknown or not isinstance(models, list) or not models:
        raise FileProblem(path, "expected one or more [[model]] tables and nothing else")
    read = [_model(path, i, table) for i, table in enumerate(models)]
    first_named: dict[str, int] = {}
    for i, fields in enumerate(read):
        # Found here, not after both models have loaded (names left out are the models'
        # defaults, known only once loaded; the registry refuses a clash of those).
        name = fields.get("name")
        if name:
            if name in first_named:
                raise FileProblem(
                    path,
                    f"[[model]] number {i + 1}: the name {name!r} is taken by [[model]] number "
                    f"{first_named[name] + 1}",
                )
            first_named[name] = i
    return read


def _model(path: str, i: int, table: Any) -> dict[str, Any]:
    where = f"[[model]] number {i + 1}"
    if not isinstance(table, dict):
        raise FileProblem(path, f"{where} is not a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise FileProblem(
            path, f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(_KEYS))})"
        )
    fields: dict[str, Any] = {}
    for key in _STRINGS:
        if key in table:
            if not isinstance(table[key], str):
                raise FileProblem(path, f"{where}: {key} must be a string")
            fields[key] = table[key]
    if "no_model" in table:
        if not isinstance(table["no_model"], bool):
            raise FileProblem(path, f"{where}: no_model must be true or false")
        fields["no_model"] = table["no_model"]
    fields["dictionaries"] = _dictionaries(path, where, table.get("dictionaries", {}))
    fields["sources"] = _sources(path, where, table.get("sources", []))
    neuronpedia = table.get("neuronpedia", {})
    if not isinstance(neuronpedia, dict) or not all(
        isinstance(v, str) for v in neuronpedia.values()
    ):
        raise FileProblem(path, f"{where}: neuronpedia must be a table of name = folder")
    fields["neuronpedia_sources"] = [f"{name}={folder}" for name, folder in neuronpedia.items()]
    return fields


def _dictionaries(path: str, where: str, given: Any) -> list[str]:
    """{name: path | {path, scaling_factor}} -> --dictionary values."""
    if not isinstance(given, dict):
        raise FileProblem(path, f"{where}: dictionaries must be a table of name = path")
    specs = []
    for name, value in given.items():
        if isinstance(value, str):
            specs.append(f"{name}={value}")
            continue
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("path"), str)
            or set(value) - {"path", "scaling_factor"}
            or not isinstance(value.get("scaling_factor", 1.0), int | float)
        ):
            raise FileProblem(
                path, f"{where}: dictionary {name!r} must be a path or {{ path, scaling_factor }}"
            )
        factor = value.get("scaling_factor")
        specs.append(
            f"{name}={value['path']}" + ("" if factor is None else f",scaling_factor={factor}")
        )
    return specs


def _sources(path: str, where: str, given: Any) -> list[str]:
    """[{name, kind, records, explanations}] -> --source values."""
    if not isinstance(given, list) or not all(isinstance(s, dict) for s in given):
        raise FileProblem(path, f"{where}: sources must be a list of tables")
    specs = []
    for source in given:
        if set(source) - set(_SOURCE_KEYS) or not all(isinstance(v, str) for v in source.values()):
            raise FileProblem(
                path, f"{where}: a source has string keys {', '.join(_SOURCE_KEYS)} only"
            )
        specs.append(",".join(f"{key}={source[key]}" for key in _SOURCE_KEYS if key in source))
    return specs
