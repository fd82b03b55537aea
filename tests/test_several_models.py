"""Several models in one server: repeated --model (each with its own flags) and a deployment
file, each model with its own dictionaries, answering in one query."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from interpql.backends.dictionaries.saelens import saelens_config, write_saelens
from interpql.bootstrap import ServeOptions, build_services, served_models
from interpql.cli import split_models
from interpql.deployment_file import read_deployment
from interpql.file_errors import FileProblem
from tests.processes import serve
from tests.test_dictionaries import random_tensors

TINY_WIDTH = 64  # random:tiny's d_model


def residual_sae(folder: Path, layer: int = 1) -> Path:
    config = saelens_config("topk", TINY_WIDTH, 32, f"blocks.{layer}.hook_resid_post", k=4)
    write_saelens(folder, config, random_tensors("topk", TINY_WIDTH, TINY_WIDTH, 32, seed=3))
    return folder


def test_each_model_takes_the_flags_after_its_model() -> None:
    argv = [
        "serve", "--port", "9", "--name", "demo", "--model", "tiny-stdlib", "--host", "::1",
        "--model", "random:tiny", "--name", "tiny", "--dictionary", "res=/x", "--no-model",
        "--log-format=json", "--model=random:gpt2-small", "--backend", "transformerlens",
    ]  # fmt: skip
    first, more = split_models(argv[1:])
    assert first == [
        "--port", "9", "--name", "demo", "--model", "tiny-stdlib", "--host", "::1",
        "--log-format=json",
    ]  # fmt: skip
    assert more == [
        ["--model", "random:tiny", "--name", "tiny", "--dictionary", "res=/x", "--no-model"],
        ["--model=random:gpt2-small", "--backend", "transformerlens"],
    ]


def test_two_models_answer_one_query(tmp_path: Path) -> None:
    """The demo and a random model with a dictionary of its own, from one command line: both
    listed, a node of each (and the dictionary's latents on the second) in one request."""
    sae = residual_sae(tmp_path / "res")
    args = ("--explanation-store", str(tmp_path / "store.sqlite"), "--model", "tiny-stdlib",
            "--model", "random:tiny", "--name", "tiny", "--dictionary", f"res={sae}")  # fmt: skip
    with serve(*args, startup_s=120) as url:
        query = """{ models { name nLayers dictionaries { name layer } }
            demo: node(id: "tiny-stdlib/mlp_neuron/1/7") { id model { name } }
            tiny: node(id: "tiny/res/1/5") { id kind dictionary model { name } }
            other: model(name: "tiny") { infer(input: {prompt: "Hello world"}) {
              layerActivations(layer: 1, kind: DICTIONARY_LATENT, dictionary: "res") { shape }
            } } }"""
        body = httpx.post(url + "/graphql", json={"query": query}, timeout=60).json()
    assert "errors" not in body, body
    data = body["data"]
    assert [(m["name"], m["nLayers"]) for m in data["models"]] == [("tiny-stdlib", 4), ("tiny", 2)]
    assert data["models"][0]["dictionaries"] and data["models"][1]["dictionaries"] == [
        {"name": "res", "layer": 1}
    ]
    assert data["demo"]["model"]["name"] == "tiny-stdlib"
    assert data["tiny"] == {
        "id": "tiny/res/1/5",
        "kind": "DICTIONARY_LATENT",
        "dictionary": "res",
        "model": {"name": "tiny"},
    }
    assert data["other"]["infer"]["layerActivations"]["shape"] == [2, 32]


async def test_a_deployment_file_lists_models_dictionaries_and_sources(tmp_path: Path) -> None:
    sae = residual_sae(tmp_path / "res", layer=0)
    deployment = tmp_path / "deploy.toml"
    deployment.write_text(
        f"""
[[model]]
model = "random:tiny"
name = "a"
dictionaries = {{ res = "{sae}" }}

[[model]]
model = "random:tiny"
name = "b"
no_model = true
"""
    )
    options = ServeOptions(deployment=str(deployment), explanation_store=":memory:")
    assert [o.name for o in served_models(options)] == ["a", "b"]
    services = build_services(options)
    try:
        registry = services.registry
        assert [entry.name for entry in registry.all()] == ["a", "b"]
        a, b = registry.all()
        assert "res" in a.table and a.node_count("res", 0) == 32
        assert b.backend is None
        assert a.executor is not b.executor  # a runner each
    finally:
        services.registry.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[model]]\nmodle = 'random:tiny'\n", "unknown keys ['modle']"),
        ("name = 'x'\n", "expected one or more [[model]] tables"),
        ("[[model]]\ndictionaries = { res = 3 }\n", "dictionary 'res' must be a path"),
        ("[[model]\n", "cannot be read as a deployment file"),
        (
            "[[model]]\nname = 'a'\n[[model]]\nname = 'b'\n[[model]]\nname = 'a'\n",
            "[[model]] number 3: the name 'a' is taken by [[model]] number 1",
        ),
    ],
)
def test_a_bad_deployment_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    with pytest.raises(FileProblem, match=str(path)) as raised:
        read_deployment(str(path))
    assert message in str(raised.value)


def test_a_deployment_file_with_model_flags_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deploy.toml"
    path.write_text("[[model]]\n")
    with pytest.raises(ValueError, match="give --backend in the file"):
        served_models(ServeOptions(deployment=str(path), backend="transformerlens"))


def test_the_readme_deployment_file_reads(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [block] = re.findall(r"```toml\n(.*?)```", readme, re.S)
    path = tmp_path / "deploy.toml"
    path.write_text(block)
    demo, small = read_deployment(str(path))
    assert demo["dictionaries"] == [] and "model" not in demo
    assert small["dictionaries"] == ["res=/data/res", "tc=/data/tc"]
    assert small["sources"] == ["name=tdb,kind=mlp_neuron,records=/data/tdb/records"]
    assert small["neuronpedia_sources"] == ["np=/data/neuronpedia-features"]
