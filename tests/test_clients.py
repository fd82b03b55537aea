"""The clients in the repository, run against a real server: examples/query.py, and the TypeScript
client in clients/typescript (types generated from schema.graphql by graphql-codegen)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_server import ROOT, serve

TYPESCRIPT = ROOT / "clients" / "typescript"


@pytest.fixture(scope="module")
def graphql_url() -> Iterator[str]:
    with serve() as url:
        yield url + "/graphql"


@pytest.fixture(scope="module")
def model(graphql_url: str) -> dict[str, Any]:
    """The default model, whichever it is."""
    query = "{ models { name backend nLayers nodeKinds { kind count } } }"
    [model] = httpx.post(graphql_url, json={"query": query}, timeout=30).json()["data"]["models"]
    return dict(model)


def run(command: list[str], cwd: Path = ROOT) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_python_example_queries_a_server(graphql_url: str, model: dict[str, Any]) -> None:
    output = run(
        [sys.executable, "examples/query.py", "--url", graphql_url, "--prompt", "def f(x):"]
    )
    lines = output.splitlines()
    neurons = next(k["count"] for k in model["nodeKinds"] if k["kind"] == "MLP_NEURON")
    assert lines[0].startswith(
        f"{model['name']} ({model['backend']}, {model['nLayers']} layers): "
        f"1 token_embedding, {neurons} mlp_neuron"
    )
    assert f"{model['name']}/mlp_neuron/0/0 (mlp_neuron, layer 0)" in output
    tokens = [json.loads(line.rsplit(maxsplit=1)[0]) for line in lines if line.startswith("  ")]
    assert tokens == ["def", " f", "(", "x", "):"]


def test_python_example_reports_errors(graphql_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "examples/query.py", "--url", graphql_url, "--node", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1 and "INVALID_NODE" in result.stderr


def test_typescript_client_generates_type_checks_and_runs(
    graphql_url: str, model: dict[str, Any], tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed: `make test` installs what this test uses"
    bin_dir = TYPESCRIPT / "node_modules" / ".bin"
    assert (bin_dir / "graphql-codegen").exists(), "run `make test` (npm ci in clients/typescript)"
    shutil.rmtree(TYPESCRIPT / "src" / "gql", ignore_errors=True)
    run([str(bin_dir / "graphql-codegen"), "--config", "codegen.ts"], cwd=TYPESCRIPT)
    assert "NodeOnPromptQuery" in (TYPESCRIPT / "src" / "gql" / "graphql.ts").read_text()
    # Type-checks everything, src/checks.ts's expected errors included, and compiles.
    run([str(bin_dir / "tsc"), "--outDir", str(tmp_path)], cwd=TYPESCRIPT)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    node_id = f"{model['name']}/mlp_neuron/1/7"
    output = run([node, str(tmp_path / "example.js"), graphql_url, node_id, "def f(x):"])
    assert output.startswith(f"{node_id}: MLP_NEURON in layer 1 of {model['name']}\n")
    best = httpx.post(
        graphql_url,
        json={"query": f'{{ node(id: "{node_id}") {{ bestExplanation {{ text }} }} }}'},
    ).json()["data"]["node"]["bestExplanation"]
    assert f"explanation: {best['text'] if best else 'none stored'}\n" in output
    assert '"(" ' in output and "max " in output
