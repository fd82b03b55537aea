"""Node-data files that are broken: a compact store (records.npz, header.json,
explanations.json.gz) or a folder of Neuronpedia features broken at start-up stops it with one
line naming the file and what is wrong; data found broken when read fails only the nodes that
read it, with NODE_DATA_UNREADABLE; no served value is NaN or Infinity."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from interpql.bootstrap import ServeOptions, build_services
from interpql.file_errors import FileProblem
from interpql.loaders.sources import CompactSource
from interpql.loaders.sources.compact_format import RecordStore
from interpql.loaders.sources.neuronpedia import NeuronpediaFolderSource
from interpql.server import create_app
from tests.conftest import error_codes, graphql
from tests.test_cli import assert_refused, start_up

DEMO_DIR = Path(__file__).parents[1] / "interpql" / "data" / "tiny-stdlib"
DEMO = "tiny-stdlib"
NODE = f"{DEMO}/mlp_neuron/1/0"
NPZ, HEADER = "records/records.npz", "records/header.json"
EXPLANATIONS = "explanations/explanations.json.gz"
FIELDS = "topActivations { tokens activations } statistics { max } explanations { text }"


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A copy of the demo's model folder with its node data (never the shipped files)."""
    folder = tmp_path / DEMO
    folder.mkdir()
    for name in ("config.json", "weights.safetensors"):
        shutil.copy(DEMO_DIR / name, folder / name)
    for name in ("records", "explanations"):
        shutil.copytree(DEMO_DIR / name, folder / name)
    return folder


def refusal(options: ServeOptions) -> str:
    """The one line `interpql serve` prints for a start-up that fails (cli._serve)."""
    with pytest.raises(FileProblem) as refused:
        build_services(options)
    line = str(refused.value)
    assert "\n" not in line
    return line


def rewrite_arrays(npz: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(npz) as stored:
        arrays = {name: stored[name] for name in stored.files}
    change(arrays)
    np.savez_compressed(npz, **arrays)  # type: ignore[arg-type]


def rewrite_header(header: Path, change: Callable[[dict[str, Any]], None]) -> None:
    content = json.loads(header.read_text())
    change(content)
    header.write_text(json.dumps(content))


def _set(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[name] = value(arrays[name])

    return change


def _offset_out_of_range(offsets: np.ndarray) -> np.ndarray:
    offsets = offsets.copy()
    offsets[0, 0] = 10**9
    return offsets


def _nan_max(values: np.ndarray) -> np.ndarray:
    values = values.copy()
    values[0] = np.nan
    return values


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_set("mlp_neuron.1.top_acts", lambda a: a.astype(str)), "mlp_neuron.1.top_acts"),
        (lambda arrays: arrays.pop("mlp_neuron.1.top_offsets"), "mlp_neuron.1.top_offsets"),
        (_set("mlp_neuron.1.top_offsets", _offset_out_of_range), "mlp_neuron.1.top_offsets"),
        (_set("mlp_neuron.1.mean", lambda a: a[:-1]), "mlp_neuron.1.mean"),
        (_set("mlp_neuron.1.max", _nan_max), "mlp_neuron.1.max"),
        (_set("tokens", lambda a: a.astype(np.float32)), "tokens"),
    ],
    ids=["strings", "missing", "offset-out-of-range", "short-mean", "nan-max", "float-tokens"],
)
def test_a_broken_records_array_is_named(
    model_folder: Path, change: Callable[[dict[str, np.ndarray]], None], named: str
) -> None:
    npz = model_folder / "records" / "records.npz"
    rewrite_arrays(npz, change)
    line = refusal(ServeOptions(model=str(model_folder), explanation_store=":memory:"))
    assert str(npz) in line and named in line, line


@pytest.mark.parametrize(
    ("damaged", "damage", "named", "said"),
    [
        (NPZ, lambda f: f.write_bytes(f.read_bytes()[:1000]), NPZ, ".npz"),
        (NPZ, lambda f: f.write_bytes(b""), NPZ, ".npz"),
        (HEADER, lambda f: rewrite_header(f, lambda h: h.pop("groups")), HEADER, "groups"),
        (HEADER, lambda f: f.write_text("not json"), HEADER, "JSON"),
        (
            HEADER,
            lambda f: rewrite_header(f, lambda h: h["groups"][0].update(n_nodes=99999)),
            NPZ,
            "mlp_neuron.0.",
        ),
        (EXPLANATIONS, lambda f: f.write_bytes(b"8\xc8garbage"), EXPLANATIONS, "gzip"),
        (
            EXPLANATIONS,
            lambda f: f.write_bytes(gzip.compress(b'{"format": "interpql-explanations"}')),
            EXPLANATIONS,
            "format",
        ),
    ],
    ids=["truncated-npz", "empty-npz", "no-groups", "header-not-json", "n-nodes", "gz", "table"],
)
def test_a_broken_store_file_is_named(
    model_folder: Path, damaged: str, damage: Callable[[Path], Any], named: str, said: str
) -> None:
    damage(model_folder / damaged)
    line = refusal(ServeOptions(model=str(model_folder), explanation_store=":memory:"))
    assert str(model_folder / named) in line and said in line, line


def test_a_broken_store_stops_the_server_in_one_line(model_folder: Path) -> None:
    npz = model_folder / "records" / "records.npz"
    npz.write_bytes(b"")
    assert_refused(start_up("--model", str(model_folder)), npz)


async def test_records_found_broken_when_read_fail_those_nodes_only() -> None:
    """A store whose arrays break after start-up (here: replaced in memory): its nodes answer
    NODE_DATA_UNREADABLE, other layers' nodes and the explanations still answer."""
    services = build_services(ServeOptions(explanation_store=":memory:"))
    entry = services.registry.get(DEMO)
    shipped = next(s for s in entry.sources if isinstance(s, CompactSource))
    groups = {key: dict(shipped.records.arrays(*key)) for key in shipped.records._groups}
    groups[("mlp_neuron", 1)]["top_offsets"] = _offset_out_of_range(
        groups[("mlp_neuron", 1)]["top_offsets"]
    )
    groups[("mlp_neuron", 2)]["max"] = groups[("mlp_neuron", 2)]["max"].astype(str)
    broken = RecordStore(shipped.records.layout, shipped.records.tokens, groups)
    entry.sources[entry.sources.index(shipped)] = CompactSource(
        shipped.name, broken, shipped.explanations, entry.token_text
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(services)), base_url="http://localhost"
    ) as client:
        for node in (NODE, f"{DEMO}/mlp_neuron/2/3"):
            body = await graphql(client, f'{{ node(id: "{node}") {{ {FIELDS} }} }}')
            assert set(error_codes(body)) == {"NODE_DATA_UNREADABLE"}, body
        body = await graphql(client, f'{{ node(id: "{DEMO}/mlp_neuron/0/0") {{ {FIELDS} }} }}')
        assert "errors" not in body, body
    services.registry.close()


# --- Neuronpedia ---------------------------------------------------------------------------


def feature(**changes: Any) -> dict[str, Any]:
    good: dict[str, Any] = {
        "modelId": DEMO,
        "source": "1-mlp_neuron",
        "index": "0",
        "density": 0.5,
        "explanations": [{"description": "loops", "score": 0.5}],
        "activations": [{"tokens": [" a", " b"], "values": [0.5, 1.0]}],
    }
    return good | changes


BROKEN_FEATURES = {
    "string-values": feature(activations=[{"tokens": [" a"], "values": ["1.0"]}]),
    "null-values": feature(activations=[{"tokens": [" a"], "values": [None]}]),
    "activations-object": feature(activations={"tokens": [" a"], "values": [1.0]}),
    "activation-string": feature(activations=["a"]),
    "tokens-number": feature(activations=[{"tokens": 3, "values": [1.0]}]),
    "nan-values": feature(activations=[{"tokens": [" a"], "values": [float("nan")]}]),
    "infinite-values": feature(activations=[{"tokens": [" a"], "values": [float("inf")]}]),
    "explanations-string": feature(explanations="hello"),
    "explanations-null-item": feature(explanations=[None]),
    "negative-index": feature(index=-1),
}


@pytest.mark.parametrize("broken", BROKEN_FEATURES.values(), ids=BROKEN_FEATURES.keys())
def test_a_malformed_feature_file_is_refused_naming_it(tmp_path: Path, broken: Any) -> None:
    path = tmp_path / "feature.json"
    path.write_text(json.dumps(broken))  # NaN and Infinity as Python's json writes them
    with pytest.raises(FileProblem) as refused:
        NeuronpediaFolderSource("np", str(tmp_path))
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("source", "index"),
    [("1-no-such-set", 0), ("99-mlp_neuron", 0), ("1-mlp_neuron", 10**9)],
    ids=["unknown-set", "layer-99", "index-too-large"],
)
def test_a_feature_of_a_node_the_model_lacks_is_refused(
    tmp_path: Path, source: str, index: int
) -> None:
    """At start-up, as `serve --neuronpedia-source` builds it (searches found ids that no
    query could read)."""
    path = tmp_path / "feature.json"
    path.write_text(json.dumps(feature(source=source, index=index)))
    options = ServeOptions(explanation_store=":memory:", neuronpedia_sources=[f"np={tmp_path}"])
    with pytest.raises(FileProblem, match="no such node") as refused:
        build_services(options).registry.close()
    assert str(path) in str(refused.value)


def test_a_missing_or_wrong_folder_names_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    with pytest.raises(FileProblem, match="no such folder") as refused:
        NeuronpediaFolderSource("np", str(missing))
    assert f"{missing}: no such folder (--neuronpedia-source np=)" == str(refused.value)
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    with pytest.raises(FileProblem, match="is not a folder"):
        NeuronpediaFolderSource("np", str(a_file))
    assert_refused(start_up("--neuronpedia-source", f"np={missing}"), missing)


async def test_good_features_serve_finite_values(tmp_path: Path) -> None:
    (tmp_path / "feature.json").write_text(json.dumps(feature(density=float("nan"))))
    services = build_services(
        ServeOptions(explanation_store=":memory:", neuronpedia_sources=[f"np={tmp_path}"])
    )
    entry = services.registry.get(DEMO)
    entry.sources[:] = [s for s in entry.sources if s.name == "np"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(services)), base_url="http://localhost"
    ) as client:
        body = await graphql(
            client, f'{{ node(id: "{NODE}") {{ {FIELDS} statistics {{ density }} }} }}'
        )
    services.registry.close()
    assert "errors" not in body, body
    node = body["data"]["node"]
    assert node["topActivations"] == [{"tokens": [" a", " b"], "activations": [0.5, 1.0]}]
    assert node["statistics"] == {"max": 1.0, "density": None}
