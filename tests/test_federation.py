"""Apollo Federation v2: interpql as a subgraph, directly and composed through a real gateway.

The gateway is Apollo's (`@apollo/gateway` + `@apollo/server` from npm, installed into
tests/federation/node_modules by `make test`); the second subgraph is tests/federation/notes.py.
Everything listens on loopback ports and is stopped by the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from interpql.schema.build import build_schema
from tests.processes import free_port, serve

FEDERATION = Path(__file__).parent / "federation"
# Notes on nodes of the default model, whatever its name: "{model}" is filled in.
NOTES = {
    "{model}/mlp_neuron/1/7": ["fires on Python keywords", "dead on prose"],
    "{model}/attention_head/0/2": ["previous-token head?"],
}
PROMPT = "def f(x):"
GRAPHQL_SCALARS = {"String", "Int", "Float", "Boolean", "ID"}
ENTITIES = """query($r: [_Any!]!) { _entities(representations: $r) {
  __typename ... on Model { name nLayers } ... on Node { id kind layerIndex index } } }"""


def post(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = httpx.post(url, json={"query": query, "variables": variables or {}}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@contextmanager
def running(command: list[str], ready: Callable[[], bool], timeout: float = 60) -> Iterator[None]:
    """Runs `command` until the block ends, once `ready()` holds (within `timeout` seconds)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _probe(ready):
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"{command[:2]} exited with {process.returncode}:\n{output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{command[:2]} not ready in {timeout} s")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def _probe(ready: Callable[[], bool]) -> bool:
    try:
        return ready()
    except httpx.TransportError:
        return False


def answers(url: str) -> Callable[[], bool]:
    return lambda: httpx.post(url, json={"query": "{ __typename }"}, timeout=2).status_code == 200


@dataclass(frozen=True)
class Interpql:
    url: str
    model: dict[str, Any]  # the default model: name, nLayers, dModel

    def notes(self) -> dict[str, list[str]]:
        return {key.format(model=self.model["name"]): notes for key, notes in NOTES.items()}


@pytest.fixture(scope="module")
def interpql() -> Iterator[Interpql]:
    with serve() as url:
        [model] = post(url + "/graphql", "{ models { name nLayers dModel } }")["data"]["models"]
        yield Interpql(url + "/graphql", model)


@pytest.fixture(scope="module")
def gateway(interpql: Interpql) -> Iterator[str]:
    node = shutil.which("node")
    assert node is not None, "node is needed: `make test` installs what this test uses"
    assert (FEDERATION / "node_modules" / "@apollo" / "gateway").is_dir(), "run `make test`"
    notes_url = f"http://127.0.0.1:{free_port()}/graphql"
    notes_command = [
        sys.executable,
        str(FEDERATION / "notes.py"),
        notes_url.split(":")[2].split("/")[0],
        interpql.model["name"],
        json.dumps(interpql.notes()),
    ]
    gateway_url = f"http://127.0.0.1:{free_port()}/"
    gateway_command = [
        node,
        str(FEDERATION / "gateway.mjs"),
        gateway_url.split(":")[2].rstrip("/"),
        f"interpql={interpql.url}",
        f"notes={notes_url}",
    ]
    with running(notes_command, answers(notes_url)), running(gateway_command, answers(gateway_url)):
        yield gateway_url


def test_service_sdl_declares_the_entities(interpql: Interpql) -> None:
    sdl = post(interpql.url, "{ _service { sdl } }")["data"]["_service"]["sdl"]
    assert "specs.apollo.dev/federation/v2" in sdl
    assert 'type Model @key(fields: "name")' in sdl
    assert 'type Node @key(fields: "id")' in sdl


def test_every_type_and_field_is_described() -> None:
    # GraphiQL's docs show these descriptions; federation's own types included.
    schema = build_schema()._schema
    bare = []
    for name, type_ in schema.type_map.items():
        if name.startswith("__") or name in GRAPHQL_SCALARS:
            continue
        if not type_.description:
            bare.append(name)
        for field_name, field in getattr(type_, "fields", {}).items():
            if not field.description:
                bare.append(f"{name}.{field_name}")
    assert bare == []


def test_entities_resolve_models_and_nodes(interpql: Interpql) -> None:
    name = interpql.model["name"]
    body = post(
        interpql.url,
        ENTITIES,
        {
            "r": [
                {"__typename": "Model", "name": name},
                {"__typename": "Node", "id": f"{name}/attention_head/1/3"},
                {"__typename": "Node", "id": f"{name}/mlp_neuron/999/0"},
                {"__typename": "Model", "name": "no-such-model"},
            ]
        },
    )
    model, node, bad_node, bad_model = body["data"]["_entities"]
    assert model == {"__typename": "Model", "name": name, "nLayers": interpql.model["nLayers"]}
    assert node == {
        "__typename": "Node",
        "id": f"{name}/attention_head/1/3",
        "kind": "ATTENTION_HEAD",
        "layerIndex": 1,
        "index": 3,
    }
    assert bad_node is None and bad_model is None
    codes = {tuple(e["path"]): e["extensions"]["code"] for e in body["errors"]}
    assert codes == {("_entities", 2): "INVALID_NODE", ("_entities", 3): "MODEL_NOT_FOUND"}


def test_gateway_query_crosses_both_subgraphs(interpql: Interpql, gateway: str) -> None:
    name = interpql.model["name"]
    neuron = f"{name}/mlp_neuron/1/7"
    body = post(
        gateway,
        """query($id: ID!, $prompt: String!) {
          featuredModel { name nLayers dModel }
          notedNodes { id notes kind layerIndex index model { name } }
          node(id: $id) { kind notes activations(prompt: $prompt) { tokens { text } values } }
        }""",
        {"id": neuron, "prompt": PROMPT},
    )
    assert "errors" not in body, body
    data = body["data"]
    # notes -> interpql: a Model reference that interpql resolves.
    assert data["featuredModel"] == interpql.model
    # notes -> interpql: Node references, extended with interpql's fields.
    assert data["notedNodes"] == [
        {
            "id": neuron,
            "notes": ["fires on Python keywords", "dead on prose"],
            "kind": "MLP_NEURON",
            "layerIndex": 1,
            "index": 7,
            "model": {"name": name},
        },
        {
            "id": f"{name}/attention_head/0/2",
            "notes": ["previous-token head?"],
            "kind": "ATTENTION_HEAD",
            "layerIndex": 0,
            "index": 2,
            "model": {"name": name},
        },
    ]
    # interpql -> notes: interpql's node with the other subgraph's field, and live inference
    # that agrees with interpql's own answer.
    node = data["node"]
    assert node["kind"] == "MLP_NEURON" and node["notes"] == interpql.notes()[neuron]
    direct = post(
        interpql.url,
        "query($id: ID!, $prompt: String!) { node(id: $id) { activations(prompt: $prompt) "
        "{ tokens { text } values } } }",
        {"id": neuron, "prompt": PROMPT},
    )["data"]["node"]
    assert node["activations"] == direct["activations"]
    assert [t["text"] for t in node["activations"]["tokens"]] == ["def", " f", "(", "x", "):"]


def test_gateway_passes_interpql_error_codes_on(interpql: Interpql, gateway: str) -> None:
    body = post(gateway, f'{{ node(id: "{interpql.model["name"]}/mlp_neuron/999/0") {{ notes }} }}')
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "INVALID_NODE"
