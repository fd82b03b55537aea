"""A graph's JSON in Redis reads back as the same graph, every field and dtype; anything else
written under a graph's key is refused, not half-read. (Two replicas sharing graphs through a
real redis-server: test_replicas.py.)"""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from pathlib import Path

import numpy as np
import orjson
import pytest

from interpql.loaders.attribution_graph import GraphData, GraphNode, NodeType, Pruning, Sizes
from interpql.loaders.graph_store import GraphStore, SqliteGraphs, decode_graph, encode_graph
from interpql.specs import GraphSpec, NodeRef


def small_graph(seed: int = 0) -> GraphData:
    """Every kind of node, every optional field both set and not, awkward floats."""
    rng = random.Random(seed)
    spec = GraphSpec(
        model="m",
        dictionary="transcoder",
        prompt="x = 1\n",
        tokens=(50256, 87, 796, 352, 198),
        max_feature_nodes=None if seed else 7,
        node_threshold=0.8 - seed / 10,
    )
    nodes = [
        GraphNode("E_87_1", NodeType.EMBEDDING, None, 1, 87, 0.5, 0.9,
                  ref=NodeRef("m", "token_embedding", 0, 87)),
        GraphNode("1_12_3", NodeType.FEATURE, 1, 3, 352, rng.random(), 0.4,
                  activation=1 / 3, ref=NodeRef("m", "transcoder", 1, 12)),
        GraphNode("err_0_2", NodeType.ERROR, 0, 2, 796, 1e-300, 0.95, activation=2.5e-8),
        GraphNode("L_198_4", NodeType.LOGIT, None, 4, 198, 0.0, 1.0,
                  probability=0.7, logit=-0.1 + seed),
    ]  # fmt: skip
    return GraphData(
        id=f"{seed:024d}",
        spec=spec,
        n_layers=2,
        nodes=nodes,
        sources=np.array([0, 1, 2], dtype=np.int64),
        targets=np.array([1, 3, 3], dtype=np.int64),
        weights=np.array([0.1, -2 / 7, rng.random()]),
        unpruned=Sizes(5, 4, 10, 5, 3, 40),
        pruning=Pruning(0.8, 0.98, 0.01, 0.002, 0.81, 0.985),
        replacement_score=0.75,
        completeness_score=0.9,
        pruned_replacement_score=0.6,
        pruned_completeness_score=0.85,
        elapsed_s=1.25,
    )


def assert_same(found: GraphData, expected: GraphData) -> None:
    for field in dataclasses.fields(GraphData):
        got, want = getattr(found, field.name), getattr(expected, field.name)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want), field.name
        else:
            assert got == want and type(got) is type(want), field.name


@pytest.mark.parametrize("seed", [0, 1])
def test_a_graph_reads_back_exactly(seed: int) -> None:
    graph = small_graph(seed)
    found = decode_graph(encode_graph(graph))
    assert_same(found, graph)
    assert found.nodes[0].type is NodeType.EMBEDDING and found.pruned == graph.pruned


@pytest.mark.parametrize(
    "change",
    [
        lambda g: g.pop("spec"),
        lambda g: g.update(sources=[[0, 1]]),
        lambda g: g.update(weights="x"),
        lambda g: g["nodes"][0].update(type="vertex"),
        lambda g: g["nodes"][0].update(extra=1),
        lambda g: g.update(unpruned=None),
    ],
)
def test_anything_else_is_refused(change: object) -> None:
    fields = orjson.loads(encode_graph(small_graph()))
    change(fields)  # type: ignore[operator]
    with pytest.raises((KeyError, TypeError, ValueError)):
        decode_graph(orjson.dumps(fields))


async def test_a_sqlite_file_shares_the_most_recent_graphs(tmp_path: Path) -> None:
    path = tmp_path / "graphs.sqlite"
    writer = GraphStore(shared=SqliteGraphs(path, keep=2))
    reader = GraphStore(shared=SqliteGraphs(path, keep=2))  # another process's, say
    graphs = [dataclasses.replace(small_graph(), id=f"{i:024x}") for i in range(3)]
    for graph in graphs:
        await writer.put(graph)
    assert await reader.get(graphs[0].id) is None  # the oldest of three, two kept
    for graph in graphs[1:]:
        found = await reader.get(graph.id)
        assert found is not None
        assert_same(found, graph)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE graphs SET json = ? WHERE id = ?", (b"{}", graphs[2].id))
    assert await GraphStore(shared=SqliteGraphs(path)).get(graphs[2].id) is None  # unreadable
    path.unlink()  # the file gone: what this process wrote is still answered
    assert await writer.get(graphs[2].id) is graphs[2]
    await writer.put(graphs[0])
    assert await writer.get(graphs[0].id) is graphs[0]
