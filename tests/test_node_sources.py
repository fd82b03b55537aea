"""Transformer Debugger-format folders, the cache (memory and a real Redis) and the explanation
store, read through GraphQL."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from interpql.loaders.cache import NodeDataCache
from interpql.loaders.registry import ModelRegistry
from interpql.loaders.sources import ExplanationStore, TdbFolderSource
from interpql.server import create_app
from interpql.specs import NodeRef
from tests import processes
from tests.conftest import SMALL, CountingBackend, error_codes, graphql, small_entry


def neuron_record(layer: int, index: int) -> dict[str, Any]:
    def record(tokens: list[str], activations: list[float]) -> dict[str, Any]:
        return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": activations}

    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": index},
        "random_sample": [record(["a", " b"], [0.0, 0.25])],
        "random_sample_by_quantile": [[record(["c"], [0.5])]],
        "quantile_boundaries": [0.0, 0.5, 1.25, 2.5],
        "mean": 0.125 + index,
        "variance": 0.5,
        "skewness": 1.5,
        "kurtosis": 3.25,
        "most_positive_activation_records": [
            record([" def", " f", "(x"], [3.5 + index, 0.0, 1.0]),
            record(["import", " os"], [2.75, -0.5]),
        ],
    }


def explanation_line(layer: int, index: int, text: str, score: float) -> str:
    return json.dumps(
        {
            "neuron_id": {
                "dataclass_name": "NeuronId",
                "layer_index": layer,
                "neuron_index": index,
            },
            "scored_explanations": [
                {
                    "dataclass_name": "ScoredExplanation",
                    "explanation": text,
                    "scored_simulation": {
                        "dataclass_name": "ScoredSimulation",
                        "scored_sequence_simulations": [],
                        "ev_correlation_score": score,
                    },
                }
            ],
        }
    )


@pytest.fixture(scope="module")
def tdb_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tdb")
    for layer in range(SMALL.n_layers):
        (root / "records" / str(layer)).mkdir(parents=True)
        (root / "explanations" / str(layer)).mkdir(parents=True)
        for index in range(SMALL.d_mlp):
            (root / "records" / str(layer) / f"{index}.json").write_text(
                json.dumps(neuron_record(layer, index))
            )
            (root / "explanations" / str(layer) / f"{index}.jsonl").write_text(
                explanation_line(layer, index, f"neuron {layer}/{index}", index / 100) + "\n"
            )
    (root / "records" / "1" / "5.json").write_text("{ broken")
    (root / "heads" / "0").mkdir(parents=True)
    head = {
        **neuron_record(0, 2),
        "most_positive_activation_records": [
            {"tokens": ["x", "y", "z"], "activations": [0.5, 0.25, 0.75, 0.0, 0.5, 1.0]}
        ],
    }
    (root / "heads" / "0" / "2.json").write_text(json.dumps(head))
    return root


class CountingTdbSource(TdbFolderSource):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, int]] = []

    def read_records(self, nodes):  # type: ignore[no-untyped-def]
        self.reads.append(("records", len(nodes)))
        return super().read_records(nodes)

    def read_explanations(self, nodes):  # type: ignore[no-untyped-def]
        self.reads.append(("explanations", len(nodes)))
        return super().read_explanations(nodes)


def make_client(
    backend: CountingBackend, sources: list[Any], cache: NodeDataCache | None
) -> tuple[httpx.AsyncClient, ModelRegistry]:
    registry = ModelRegistry()
    entry = small_entry(backend)
    entry.sources.extend(sources)
    registry.add(entry)
    transport = httpx.ASGITransport(app=create_app(registry, cache=cache))
    return httpx.AsyncClient(transport=transport, base_url="http://localhost"), registry


@pytest.fixture
async def tdb_client(
    small_backend: CountingBackend, tdb_folders: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, CountingTdbSource]]:
    neurons = CountingTdbSource(
        "public-style",
        "mlp_neuron",
        str(tdb_folders / "records"),
        str(tdb_folders / "explanations"),
    )
    heads = TdbFolderSource("heads", "attention_head", str(tdb_folders / "heads"))
    client, registry = make_client(small_backend, [neurons, heads], NodeDataCache())
    async with client:
        yield client, neurons
    registry.close()


QUERY = """query($id: ID!) { node(id: $id) {
  topActivations { tokens tokenIds activations normalizedActivations source }
  randomSample { tokens activations }
  statistics { max mean variance skewness kurtosis quantileBoundaries }
  explanations { text score scorer source } } }"""


async def test_tdb_values_round_trip(tdb_client: tuple[httpx.AsyncClient, Any]) -> None:
    client, _ = tdb_client
    body = await graphql(client, QUERY, {"id": "small/mlp_neuron/2/7"})
    node = body["data"]["node"]
    expected = neuron_record(2, 7)
    top = expected["most_positive_activation_records"]
    assert [t["tokens"] for t in node["topActivations"]] == [r["tokens"] for r in top]
    assert [t["activations"] for t in node["topActivations"]] == [r["activations"] for r in top]
    assert node["topActivations"][0]["tokenIds"] is None
    assert node["topActivations"][0]["normalizedActivations"] == [10, 0, 0]  # floor(10 * 1 / 10.5)
    assert node["randomSample"] == [{"tokens": ["a", " b"], "activations": [0.0, 0.25]}]
    assert node["statistics"] == {
        "max": 10.5,
        "mean": 7.125,
        "variance": 0.5,
        "skewness": 1.5,
        "kurtosis": 3.25,
        "quantileBoundaries": [0.0, 0.5, 1.25, 2.5],
    }
    assert node["explanations"] == [
        {
            "text": "neuron 2/7",
            "score": 0.07,
            "scorer": "simulation (Transformer Debugger)",
            "source": "public-style",
        }
    ]


async def test_head_records_fold_the_lower_triangle(
    tdb_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, _ = tdb_client
    body = await graphql(client, QUERY, {"id": "small/attention_head/0/2"})
    # Query token i has i + 1 values: [0.5], [0.25, 0.75], [0.0, 0.5, 1.0] -> their maxima.
    assert body["data"]["node"]["topActivations"][0]["activations"] == [0.5, 0.75, 1.0]


async def test_a_broken_file_fails_its_node_only(tdb_client: tuple[httpx.AsyncClient, Any]) -> None:
    client, _ = tdb_client
    body = await graphql(
        client,
        '{ a: node(id: "small/mlp_neuron/1/5") { statistics { max } } '
        'b: node(id: "small/mlp_neuron/1/6") { statistics { max } } }',
    )
    assert error_codes(body) == ["NODE_DATA_UNREADABLE"]
    assert body["data"]["a"] == {"statistics": None}
    assert body["data"]["b"] == {"statistics": {"max": 9.5}}
    assert "broken" not in json.dumps(body)


async def test_many_nodes_one_read_per_field_kind(
    tdb_client: tuple[httpx.AsyncClient, Any],
) -> None:
    client, source = tdb_client
    ids = [f"small/mlp_neuron/{layer}/{i}" for layer in (0, 2) for i in range(80)] * 4
    ids = list(dict.fromkeys(ids)) + [f"small/mlp_neuron/1/{i}" for i in range(6, 80)]
    source.reads.clear()
    body = await graphql(
        client,
        "query($ids: [ID!]!) { nodes(ids: $ids) { topActivations(first: 5) { activations } "
        "bestExplanation { text } } }",
        {"ids": ids},
    )
    assert "errors" not in body and len(body["data"]["nodes"]) == len(ids)
    assert sorted(kind for kind, _ in source.reads) == ["explanations", "records"]
    # Asked again: the cache answers, the folder is not read.
    source.reads.clear()
    again = await graphql(
        client,
        "query($ids: [ID!]!) { nodes(ids: $ids) { topActivations(first: 5) { activations } "
        "bestExplanation { text } } }",
        {"ids": ids},
    )
    assert again == body and source.reads == []


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with processes.redis_server(tmp_path) as running:
        yield running


async def test_redis_cache_same_answers_and_survives_redis_dying(
    small_backend: CountingBackend,
    tdb_folders: Path,
    redis_server: tuple[str, subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, process = redis_server
    source = CountingTdbSource(
        "public-style",
        "mlp_neuron",
        str(tdb_folders / "records"),
        str(tdb_folders / "explanations"),
    )
    uncached_client, uncached_registry = make_client(small_backend, [source], None)
    cache = NodeDataCache(url, ttl_s=60)
    client, registry = make_client(small_backend, [source], cache)
    variables = {"id": "small/mlp_neuron/0/3"}
    async with uncached_client, client:
        uncached = await graphql(uncached_client, QUERY, variables)
        first = await graphql(client, QUERY, variables)
        source.reads.clear()
        second = await graphql(client, QUERY, variables)
        assert uncached == first == second and source.reads == []
        process.kill()
        process.wait(timeout=10)
        with caplog.at_level(logging.WARNING, logger="interpql.loaders.cache"):
            after = await graphql(client, QUERY, variables)
        assert after == uncached
        assert any("answering uncached" in r.message for r in caplog.records)
    await cache.close()
    registry.close()
    uncached_registry.close()


async def test_explanation_store(tmp_path: Path, small_backend: CountingBackend) -> None:
    path = tmp_path / "store" / "explanations.sqlite"
    store = ExplanationStore(path)
    node = NodeRef("small", "mlp_neuron", 1, 4)
    store.add(node, "closing brackets", 0.5, "sim", "gpt-x", request_key="k1", provenance={"n": 3})
    store.add(node, "brackets", None, "sim", "gpt-x")
    store.close()
    reopened = ExplanationStore(path)
    assert [e.provenance for e in reopened.find_request("k1")] == [{"n": 3}]
    assert reopened.find_request("nope") == []
    client, registry = make_client(small_backend, [reopened], None)
    async with client:
        body = await graphql(
            client,
            '{ node(id: "small/mlp_neuron/1/4") { explanations { text score explainerModel source created } '
            "bestExplanation { text } } }",
        )
    node_data = body["data"]["node"]
    assert [e["text"] for e in node_data["explanations"]] == ["closing brackets", "brackets"]
    assert (
        node_data["explanations"][0]["source"] == "generated"
        and node_data["explanations"][0]["created"]
    )
    assert node_data["bestExplanation"]["text"] == "closing brackets"
    registry.close()
    reopened.close()
