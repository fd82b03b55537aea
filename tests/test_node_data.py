"""Records and explanations of nodes over GraphQL, from a compact store built in the test."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import interpql.loaders.sources.compact as compact_module
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.registry import ModelRegistry
from interpql.loaders.sources import CompactSource, NodeRecordData
from interpql.loaders.sources.compact_format import RecordStore
from interpql.server import create_app
from interpql.specs import NodeRef
from tests.conftest import CountingBackend, error_codes, graphql, small_entry

SEQ_LEN = 24


def token_text(token: int) -> str:
    return gpt2_encoding().decode_single_token_bytes(token).decode("utf-8", errors="replace")


class CountingSource(CompactSource):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reads: list[tuple[str, int]] = []

    def read_records(self, nodes):  # type: ignore[no-untyped-def]
        self.reads.append(("records", len(nodes)))
        return super().read_records(nodes)

    def read_explanations(self, nodes):  # type: ignore[no-untyped-def]
        self.reads.append(("explanations", len(nodes)))
        return super().read_explanations(nodes)


@pytest.fixture(scope="module")
def source(records_dir: Path) -> CountingSource:
    opened = CompactSource.open("test-dataset", records_dir, token_text)
    return CountingSource(opened.name, opened.records, opened.explanations, token_text)


@pytest.fixture
async def client(
    small_backend: CountingBackend, source: CountingSource
) -> AsyncIterator[httpx.AsyncClient]:
    registry = ModelRegistry()
    entry = small_entry(small_backend)
    entry.sources.append(source)
    registry.add(entry)
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client
    registry.close()


async def test_node_records_round_trip(client: httpx.AsyncClient, records_dir: Path) -> None:
    body = await graphql(
        client,
        """{ node(id: "small/mlp_neuron/1/7") {
            topActivations(first: 3) { tokens tokenIds activations normalizedActivations
                                       maxActivation source }
            randomSample { tokenIds activations }
            statistics { max mean variance skewness kurtosis density quantileBoundaries }
            explanations { text score scorer explainerModel source }
            bestExplanation { text } } }""",
    )
    assert "errors" not in body, body
    node = body["data"]["node"]
    record = RecordStore.load(records_dir / "records").node_record("mlp_neuron", 1, 7)
    top = node["topActivations"]
    assert [t["tokenIds"] for t in top] == [list(e.token_ids) for e in record.top[:3]]
    assert [t["tokens"] for t in top] == [
        [token_text(i) for i in e.token_ids] for e in record.top[:3]
    ]
    scale = max(max(e.activations) for e in record.top)
    for shown, example in zip(top, record.top, strict=False):
        assert shown["activations"] == pytest.approx(example.activations)
        assert shown["normalizedActivations"] == [
            min(10, math.floor(10 * max(a, 0.0) / scale)) for a in example.activations
        ]
        assert shown["source"] == "test-dataset"
    assert top[0]["maxActivation"] == pytest.approx(record.stats.max, rel=1e-3)
    assert len(node["randomSample"]) == 3
    stats = node["statistics"]
    assert stats["mean"] == pytest.approx(record.stats.mean)
    assert stats["variance"] == pytest.approx(record.stats.variance)
    assert stats["quantileBoundaries"] == pytest.approx(list(record.quantile_boundaries))
    assert (
        node["explanations"] and node["bestExplanation"]["text"] == node["explanations"][0]["text"]
    )
    scores = [e["score"] for e in node["explanations"] if e["score"] is not None]
    assert scores == sorted(scores, reverse=True)


async def test_many_nodes_cost_one_read_per_source_and_field(
    client: httpx.AsyncClient, source: CountingSource
) -> None:
    ids = [f"small/mlp_neuron/{layer}/{i}" for layer in range(3) for i in range(80)]
    source.reads.clear()
    body = await graphql(
        client,
        "query($ids: [ID!]!) { nodes(ids: $ids) { id topActivations(first: 5) { activations } "
        "statistics { max } bestExplanation { text score } } }",
        {"ids": ids},
    )
    assert "errors" not in body
    assert len(body["data"]["nodes"]) == 240
    assert sorted(source.reads) == [("explanations", 240), ("records", 240)]


async def test_unknown_nodes_have_no_records(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client,
        '{ node(id: "small/attention_head/0/1") { topActivations { tokens } statistics { max } '
        "bestExplanation { text } } }",
    )
    assert body["data"]["node"] == {
        "topActivations": [],
        "statistics": None,
        "bestExplanation": None,
    }


async def test_search_by_explanation_text(
    client: httpx.AsyncClient, source: CountingSource
) -> None:
    table = source.explanations
    assert table is not None
    target = table.rows[5]
    word = max(target.text.split(), key=len).strip("'\"(),")
    body = await graphql(
        client,
        'query($t: String!) { searchNodes(text: $t, model: "small", first: 500) { totalCount '
        "edges { cursor node { id } score matchedExplanation } pageInfo { hasNextPage } } }",
        {"t": word},
    )
    found = body["data"]["searchNodes"]
    ids = [e["node"]["id"] for e in found["edges"]]
    assert f"small/{target.kind}/{target.layer}/{target.index}" in ids
    assert found["totalCount"] == len(ids) and not found["pageInfo"]["hasNextPage"]
    assert all(word.lower() in e["matchedExplanation"].lower() for e in found["edges"])
    scores = [e["score"] for e in found["edges"]]
    assert scores == sorted(scores, reverse=True)
    # Paging: two at a time gives the same order.
    page = await graphql(
        client,
        "query($t: String!, $a: String) { searchNodes(text: $t, first: 2, after: $a) "
        "{ edges { node { id } } pageInfo { endCursor hasNextPage } } }",
        {"t": word, "a": "1"},
    )
    assert [e["node"]["id"] for e in page["data"]["searchNodes"]["edges"]] == ids[2:4]


async def test_search_by_peak_token(client: httpx.AsyncClient, source: CountingSource) -> None:
    record = source.records.node_record("mlp_neuron", 2, 9)
    best = record.top[0]
    peak = int(np.argmax(best.activations))
    token = token_text(best.token_ids[peak])
    body = await graphql(
        client,
        "query($t: String!) { searchNodes(token: $t, first: 1000) { edges { node { id } score } } }",
        {"t": token},
    )
    edges = body["data"]["searchNodes"]["edges"]
    assert "small/mlp_neuron/2/9" in [e["node"]["id"] for e in edges]
    scores = [e["score"] for e in edges]
    assert scores == sorted(scores, reverse=True)


async def test_similar_nodes_are_cosines_of_output_weights(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    body = await graphql(
        client,
        '{ node(id: "small/mlp_neuron/1/4") { similarNodes(first: 3) { node { id } cosine } } }',
    )
    found = body["data"]["node"]["similarNodes"]
    directions = torch.cat(
        [small_backend.model.xf_layers[layer].mlp.out_layer.weight.T for layer in range(3)]
    )  # [3 * d_mlp, d_model]
    units = directions / directions.norm(dim=-1, keepdim=True)
    cosines = units @ units[80 + 4]
    cosines[80 + 4] = -2
    best = torch.topk(cosines, 3)
    assert [n["node"]["id"] for n in found] == [
        f"small/mlp_neuron/{i // 80}/{i % 80}" for i in best.indices.tolist()
    ]
    np.testing.assert_allclose([n["cosine"] for n in found], best.values, atol=1e-5)


async def test_layer_nodes_sorted_by_max_activation(
    client: httpx.AsyncClient, source: CountingSource
) -> None:
    body = await graphql(
        client,
        '{ model(name: "small") { layer(index: 1) { nodes(kind: MLP_NEURON, first: 5, orderBy: MAX_ACTIVATION) '
        "{ edges { cursor node { index statistics { max } } } pageInfo { endCursor } } } } }",
    )
    edges = body["data"]["model"]["layer"]["nodes"]["edges"]
    maxima = source.records.arrays("mlp_neuron", 1)["max"]
    assert [e["node"]["index"] for e in edges] == list(np.argsort(-maxima, kind="stable")[:5])
    assert [e["cursor"] for e in edges] == ["0", "1", "2", "3", "4"]
    by_score = await graphql(
        client,
        '{ model(name: "small") { layer(index: 0) { nodes(kind: MLP_NEURON, first: 3, orderBy: EXPLANATION_SCORE) '
        "{ edges { node { bestExplanation { score } } } } } } }",
    )
    scores = [
        e["node"]["bestExplanation"]["score"]
        for e in by_score["data"]["model"]["layer"]["nodes"]["edges"]
    ]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "query",
    [
        '{ searchNodes(text: "a", token: "b") { totalCount } }',
        "{ searchNodes { totalCount } }",
        '{ searchNodes(text: "a", after: "x") { totalCount } }',
        '{ searchNodes(text: "a", first: -1) { totalCount } }',
    ],
)
async def test_bad_searches(client: httpx.AsyncClient, query: str) -> None:
    assert error_codes(await graphql(client, query)) == ["INVALID_ARGUMENT"]


async def test_search_text_is_not_query_syntax(client: httpx.AsyncClient) -> None:
    body = await graphql(client, '{ searchNodes(text: "NEAR( OR * \\" AND") { totalCount } }')
    assert "errors" not in body


def test_built_records_are_kept_within_a_bound(
    source: CountingSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record read again is the one built before (with the examples read of it), as long as
    the bound allows; past it the oldest go, and a record built again equals the first."""
    monkeypatch.setattr(compact_module, "MAX_BUILT_RECORDS", 3)
    source = CountingSource(source.name, source.records, source.explanations, token_text)
    nodes = [NodeRef("small", "mlp_neuron", 2, i) for i in range(5)]
    first = source.read_records(nodes)
    again = source.read_records(nodes[3:])
    assert again[0] is first[3] and again[1] is first[4]
    assert len(source._built) == 3  # 0, 1 built and let go
    rebuilt = source.read_records(nodes[:1])[0]
    assert rebuilt is not first[0]
    assert isinstance(rebuilt, NodeRecordData) and isinstance(first[0], NodeRecordData)
    assert tuple(rebuilt.top) == tuple(first[0].top)
    assert rebuilt.statistics == first[0].statistics
    # The store's own arrays, read directly: the first top example's activations.
    arrays = source.records.arrays("mlp_neuron", 2)
    assert list(rebuilt.top[0].activations) == pytest.approx(arrays["top_acts"][0, 0].tolist())
