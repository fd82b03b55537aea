"""The real thing: `interpql serve` in its own process, on a loopback port."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import websockets.sync.client

from tests.processes import serve, serve_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve() as url:
        yield url


def test_default_model_answers(server: str) -> None:
    response = httpx.post(server + "/graphql", json={"query": "{ models { name nLayers } }"})
    assert response.status_code == 200
    [model] = response.json()["data"]["models"]
    assert model["nLayers"] > 0
    infer = httpx.post(
        server + "/graphql",
        json={
            "query": 'query($m: String!) { model(name: $m) { infer(input: {prompt: "def f():"}) '
            "{ loss tokens { text } } } }",
            "variables": {"m": model["name"]},
        },
    ).json()
    assert [t["text"] for t in infer["data"]["model"]["infer"]["tokens"]] == ["def", " f", "():"]


def test_graphiql_on_get(server: str) -> None:
    response = httpx.get(server + "/graphql", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert "graphiql" in response.text.lower()


def test_cors_allows_localhost_only(server: str) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            server + "/graphql",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )

    local = preflight("http://localhost:5173")
    assert local.headers.get("access-control-allow-origin") == "http://localhost:5173"
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_query_over_websocket(server: str) -> None:
    ws_url = server.replace("http://", "ws://") + "/graphql"
    with websockets.sync.client.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:
        ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"
        ws.send(
            json.dumps(
                {"id": "1", "type": "subscribe", "payload": {"query": "{ models { name } }"}}
            )
        )
        message = json.loads(ws.recv(timeout=10))
        assert message["type"] == "next" and message["payload"]["data"]["models"]
        assert json.loads(ws.recv(timeout=10))["type"] == "complete"


def test_no_model_serves_metadata_only() -> None:
    with serve("--model", "random:gpt2-small", "--no-model") as url:
        body = httpx.post(
            url + "/graphql",
            json={
                "query": "{ models { name loaded nLayers dMlp } "
                'model(name: "random-gpt2-small") { infer(input: {prompt: "hi"}) { loss } } }'
            },
        ).json()
    assert body["data"] is None or body["data"].get("model") is None
    assert body["errors"][0]["extensions"]["code"] == "MODEL_NOT_LOADED"


def test_a_foreign_pages_request_is_refused_before_it_runs(server: str) -> None:
    """Seen from outside with curl on a running server: GET /graphql?query=... with another
    site's Origin ran the forward pass (CORS only hid the answer), and no answer carried
    security headers."""
    query = {"query": "{ models { name } }"}
    foreign = httpx.get(
        server + "/graphql", params=query, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    assert foreign.json()["errors"][0]["extensions"]["code"] == "ORIGIN_NOT_ALLOWED"
    tag = httpx.get(server + "/graphql", params=query, headers={"Sec-Fetch-Site": "cross-site"})
    assert tag.status_code == 403
    local = httpx.get(
        server + "/graphql", params=query, headers={"Origin": "http://localhost:3000"}
    )
    assert local.status_code == 200 and local.json()["data"]["models"]
    page = httpx.get(server + "/viewer")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_unknown_routes_answer_json_codes(server: str) -> None:
    """Seen on a running server: plain-text 404 and 405 where the README promised codes."""
    missing = httpx.get(server + "/nonexistent")
    assert (missing.status_code, missing.json()["errors"][0]["extensions"]["code"]) == (
        404,
        "NOT_FOUND",
    )
    wrong = httpx.request("PATCH", server + "/graphql")
    assert (wrong.status_code, wrong.json()["errors"][0]["extensions"]["code"]) == (
        405,
        "METHOD_NOT_ALLOWED",
    )


def test_unknown_model_fails_at_start_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "interpql.cli", "serve", "--model", "/nonexistent/folder"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr


def test_exported_schema_is_current() -> None:
    exported = subprocess.run(
        [sys.executable, "-m", "interpql.cli", "export-schema"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert exported == (ROOT / "schema.graphql").read_text()


def test_generation_streams_over_websocket(server: str) -> None:
    models = httpx.post(server + "/graphql", json={"query": "{ models { name } }"}).json()
    name = models["data"]["models"][0]["name"]
    ws_url = server.replace("http://", "ws://") + "/graphql"
    query = (
        'subscription($m: String!) { generate(model: $m, input: {prompt: "def", maxTokens: 3}) '
        "{ step unsteeredToken { id } result { unsteered { tokens { id } } } } }"
    )
    with websockets.sync.client.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:
        ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"
        ws.send(
            json.dumps(
                {
                    "id": "g",
                    "type": "subscribe",
                    "payload": {"query": query, "variables": {"m": name}},
                }
            )
        )
        events = []
        while True:
            message = json.loads(ws.recv(timeout=30))
            if message["type"] == "complete":
                break
            assert message["type"] == "next", message
            events.append(message["payload"]["data"]["generate"])
    assert [e["step"] for e in events[:-1]] == [0, 1, 2]
    streamed = [e["unsteeredToken"]["id"] for e in events[:-1]]
    assert streamed == [t["id"] for t in events[-1]["result"]["unsteered"]["tokens"]]


def test_several_worker_processes_serve_one_port() -> None:
    with serve_process("--model", "random:tiny", "--name", "m", "--workers", "2") as (url, process):
        # uvicorn's supervisor and two workers, each with its own copy of the model.
        deadline = time.monotonic() + 60
        while len(psutil.Process(process.pid).children()) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        query = 'query($p: String!) { model(name: "m") { infer(input: {prompt: $p}) { loss } } }'
        for i in range(6):
            with httpx.Client() as client:  # a new connection each time
                body = client.post(
                    url + "/graphql", json={"query": query, "variables": {"p": f"prompt {i} here"}}
                ).json()
            assert body["data"]["model"]["infer"]["loss"] > 0
        process.terminate()
        assert process.wait(timeout=30) == 0
        logged = process.stdout.read().decode() if process.stdout else ""
    # Nothing is shared between the workers without Redis, and the server says so.
    assert "--workers 2 without --redis: each worker counts its own rate limits;" in logged


def test_a_redis_that_does_not_answer_is_warned_of_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server runs (Redis may come later), but says so before a client finds out."""
    from interpql.bootstrap import ServeOptions, build_services
    from tests.processes import free_port

    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.WARNING, logger="interpql.bootstrap")
    options = ServeOptions(model="random:tiny", no_model=True, redis=url)
    build_services(options).registry.close()
    [warning] = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert warning.startswith(f"--redis {url} does not answer")
    assert "SHARED_STATE_UNAVAILABLE until it does" in warning
