"""What replicas share: the per-client rate limits, counted in a real redis-server for two
`interpql serve` processes at once, the attribution graphs either of them computed, and the
metrics of `--workers` processes, added up by whichever worker is scraped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from interpql.loaders.graph_store import FORMAT, GraphStore, RedisGraphs
from interpql.loaders.rate_limits import WINDOW_S, RateLimiter, RedisRateLimiter
from tests.processes import redis_server, serve, serve_process
from tests.test_attribution_graph import DEMO, PROMPT
from tests.test_graph_store import assert_same, small_graph
from tests.test_observability import scrape

QUERY = {"query": "{ models { name } }"}


def test_rate_limits_hold_exactly_across_two_servers(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (redis_url, _):
        common = ("--redis", redis_url, "--rate-limit-requests", "12")
        with (
            serve(*common, "--explanation-store", str(tmp_path / "a.sqlite")) as first,
            serve(*common, "--explanation-store", str(tmp_path / "b.sqlite")) as second,
        ):

            def send(i: int) -> httpx.Response:
                # A new connection each: both servers see one client (the loopback address).
                return httpx.post((first, second)[i % 2] + "/graphql", json=QUERY, timeout=30)

            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(send, range(40)))
            by_server = [[a for i, a in enumerate(answers) if i % 2 == s] for s in (0, 1)]
            # Each server alone would let 12 through: together they let 12 through in all.
            assert sum(a.status_code == 200 for a in answers) == 12
            refused = [a for a in answers if a.status_code != 200]
            assert len(refused) == 28
            for answer in refused:
                assert answer.status_code == 429
                assert answer.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
                assert 1 <= int(answer.headers["Retry-After"]) <= WINDOW_S
            # Both servers refused some: the window really is the shared one.
            assert all(any(a.status_code == 429 for a in group) for group in by_server)


async def test_redis_counts_as_memory_does(tmp_path: Path) -> None:
    """The Lua script and the in-memory limiter decide alike, request by request, for a cost
    limit and a request limit together (all within a second, so nothing leaves the window)."""
    costs = [30, 50, 10, 40, 5, 5, 120, 1, 1, 1]
    with redis_server(tmp_path) as (redis_url, _):
        shared = RedisRateLimiter(redis_url, requests_per_minute=6, cost_per_minute=100)
        now = [0.0]
        local = RateLimiter(requests_per_minute=6, cost_per_minute=100, clock=lambda: now[0])
        try:
            for cost in costs:
                expected = local.charge_now("client", cost)
                found = await shared.charge("client", cost)
                assert (found is None) == (expected is None), (cost, expected, found)
                if expected is not None:
                    assert found == pytest.approx(expected, abs=1.0)
            assert await shared.charge("someone else", 100) is None  # clients apart
        finally:
            await shared.close()


def test_a_server_whose_redis_is_gone_refuses_with_a_typed_error(tmp_path: Path) -> None:
    with (
        redis_server(tmp_path) as (redis_url, process),
        serve(
            "--redis",
            redis_url,
            "--rate-limit-requests",
            "100",
            "--explanation-store",
            str(tmp_path / "a.sqlite"),
        ) as url,
    ):
        assert httpx.post(url + "/graphql", json=QUERY).status_code == 200
        process.terminate()
        process.wait()
        answer = httpx.post(url + "/graphql", json=QUERY, timeout=30).json()
        assert answer["errors"][0]["extensions"]["code"] == "SHARED_STATE_UNAVAILABLE"
        assert "127.0.0.1" not in answer["errors"][0]["message"]
        assert httpx.get(url + "/healthz").status_code == 200  # the server lives on


GRAPH_INPUT = f'{{prompt: {json.dumps(PROMPT)}, dictionary: "transcoder"}}'
GRAPH_ANSWER = """{ id computeTimeMs pruned { nodes edges } replacementScore jsonUrl
  edges { source target weight }
  intervene(interventions: [{nodeId: "%s", scale: -2}], k: 5) {
    free { token { id } probability } frozenAttention { token { id } probability } } }"""


def post(url: str, query: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.post(url + "/graphql", json={"query": query}, timeout=120).json()
    assert "errors" not in body, body
    return body["data"]


def test_a_graph_computed_by_one_replica_is_answered_by_the_other(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (redis_url, _):
        common = ("--redis", redis_url)
        with (
            serve(*common, "--explanation-store", str(tmp_path / "a.sqlite")) as first,
            serve(*common, "--explanation-store", str(tmp_path / "b.sqlite")) as second,
        ):
            computed = post(
                first,
                f'{{ model(name: "{DEMO}") {{ attributionGraph(input: {GRAPH_INPUT}) '
                "{ id nodes { id type influence } } } }",
            )["model"]["attributionGraph"]
            feature = max(
                (n for n in computed["nodes"] if n["type"] == "FEATURE"),
                key=lambda n: n["influence"],
            )
            answer = GRAPH_ANSWER % feature["id"]
            by_id = f'{{ attributionGraph(id: "{computed["id"]}") {answer} }}'
            there = post(first, by_id)["attributionGraph"]
            here = post(second, by_id)["attributionGraph"]
            # The same graph, not one computed again: even its compute time is the first's.
            assert here == there and here["id"] == computed["id"]
            assert here["pruned"]["edges"] == len(here["edges"]) > 0
            assert (
                httpx.get(second + here["jsonUrl"]).json()
                == httpx.get(first + there["jsonUrl"]).json()
            )
            # Asked by its input, the other replica answers the kept graph too.
            again = post(
                second,
                f'{{ model(name: "{DEMO}") {{ attributionGraph(input: {GRAPH_INPUT}) {answer} }} }}',
            )["model"]["attributionGraph"]
            assert again == there


def test_without_redis_a_graph_outlives_its_server(tmp_path: Path) -> None:
    """Without --redis graphs are shared through a SQLite file beside the explanation store:
    what every --workers process of one server reads, and a restarted server too."""
    store = ("--explanation-store", str(tmp_path / "explanations.sqlite"))
    query = f'{{ model(name: "{DEMO}") {{ attributionGraph(input: {GRAPH_INPUT}) {{ id }} }} }}'
    with serve(*store) as first:
        computed = post(first, query)["model"]["attributionGraph"]["id"]
        by_id = (
            f'{{ attributionGraph(id: "{computed}") {{ id computeTimeMs pruned {{ edges }} }} }}'
        )
        there = post(first, by_id)["attributionGraph"]
    assert (tmp_path / "explanations.graphs.sqlite").is_file()
    with serve(*store) as second:
        assert post(second, by_id)["attributionGraph"] == there


async def test_graphs_outlive_a_redis_outage_and_ignore_what_they_cannot_read(
    tmp_path: Path,
) -> None:
    graph = small_graph()
    with redis_server(tmp_path) as (redis_url, process):
        store = GraphStore(shared=RedisGraphs(redis_url))
        reader = GraphStore(shared=RedisGraphs(redis_url))
        try:
            await store.put(graph)
            shared = await reader.get(graph.id)
            assert shared is not None
            assert_same(shared, graph)
            raw = redis.Redis.from_url(redis_url)
            broken = "b" * 24
            raw.set(f"interpql:graphs:{FORMAT}:{broken}", b'{"id": "broken", "nodes": 3}')
            assert await reader.get(broken) is None
            # An id no graph can have is not looked up at all.
            raw.set(
                f"interpql:graphs:{FORMAT}:not-an-id",
                raw.get(f"interpql:graphs:{FORMAT}:{graph.id}"),
            )
            assert await reader.get("not-an-id") is None and await reader.get("x" * 10**6) is None
            raw.close()
            process.terminate()
            process.wait()
            # Redis gone: what this process computed is still here, the rest is not found.
            assert await store.get(graph.id) is graph
            other = small_graph(seed=1)
            await store.put(other)
            assert await store.get(other.id) is other
            assert await store.get("f" * 24) is None
        finally:
            await store.close()
            await reader.close()


def test_metrics_of_two_workers_add_up(tmp_path: Path) -> None:
    files = tmp_path / "metrics"
    files.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(files)
    try:
        with serve_process(
            "--workers", "2", "--explanation-store", str(tmp_path / "a.sqlite"), drain_output=True
        ) as (url, _):
            sent = 40
            for _ in range(sent):
                # A connection each, so that the kernel spreads them over both workers.
                with httpx.Client() as client:
                    assert client.post(url + "/graphql", json=QUERY).status_code == 200
            workers = {p.stem.rsplit("_", 1)[-1] for p in files.glob("counter_*.db")}
            assert len(workers) == 2, workers  # both answered some
            for _ in range(4):  # whichever worker answers the scrape counts both
                samples = scrape(httpx.get(url + "/metrics").text)
                key = (
                    "interpql_graphql_requests_total",
                    (("operation_type", "query"), ("outcome", "ok")),
                )
                assert samples[key] == sent
                time.sleep(0.05)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def test_a_dead_workers_requests_in_flight_stop_counting(tmp_path: Path) -> None:
    files = tmp_path / "metrics"
    files.mkdir()
    # A worker that died with a request in flight: its live gauge's file stays behind.
    died = (
        "import os\nfrom prometheus_client import Gauge\n"
        "Gauge('interpql_graphql_requests_in_flight', 'in flight', "
        "multiprocess_mode='livesum').inc()\nos._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", died],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(files)},
        check=True,
    )
    assert len(list(files.glob("gauge_livesum_*.db"))) == 1
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(files)
    try:
        with serve_process(
            "--workers", "2", "--explanation-store", str(tmp_path / "a.sqlite"), drain_output=True
        ) as (url, _):
            assert httpx.post(url + "/graphql", json=QUERY).status_code == 200
            samples = scrape(httpx.get(url + "/metrics").text)
            assert samples[("interpql_graphql_requests_in_flight", ())] == 0
            assert (
                samples[
                    (
                        "interpql_graphql_requests_total",
                        (("operation_type", "query"), ("outcome", "ok")),
                    )
                ]
                == 1
            )
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
