"""GraphQL over WebSockets as standard clients speak it, on a real server: text frames that the
`graphql-ws` npm client reads (in node and in chromium), queries over the legacy graphql-ws
protocol, and the CORS origins applied to handshakes."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets.exceptions
import websockets.sync.client
from playwright.sync_api import sync_playwright
from starlette.testclient import TestClient

from interpql.resolvers.context import Services
from interpql.server import create_app
from interpql.settings import Settings
from interpql.specs import NodeRef
from tests.conftest import MODEL_NAME, CountingBackend, small_registry
from tests.processes import serve, serve_process
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_server import ROOT

TYPESCRIPT = ROOT / "clients" / "typescript"
GRAPHQL_WS_BUNDLE = TYPESCRIPT / "node_modules" / "graphql-ws" / "umd" / "graphql-ws.min.js"
MODEL = "tiny"
PROMPT = "import os\n"
TOKENS = 5
GENERATE = """query($m: String!, $p: String!, $n: Int!) { model(name: $m) {
  generate(input: {prompt: $p, maxTokens: $n}) { unsteered { text tokens { id } } } } }"""
KEY = "a-key"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve("--model", "random:tiny", "--name", MODEL) as url:
        yield url


def ws_url(server: str) -> str:
    return server.replace("http://", "ws://") + "/graphql"


def generated_over_http(server: str) -> dict[str, Any]:
    body = httpx.post(
        server + "/graphql",
        json={"query": GENERATE, "variables": {"m": MODEL, "p": PROMPT, "n": TOKENS}},
        timeout=60,
    ).json()
    result: dict[str, Any] = body["data"]["model"]["generate"]["unsteered"]
    return result


def test_messages_are_text_frames(server: str) -> None:
    with websockets.sync.client.connect(
        ws_url(server),
        subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
    ) as ws:
        ws.send(json.dumps({"type": "connection_init"}))
        ack = ws.recv(timeout=10)
        ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "{ __typename }"}})
        )
        answer, complete = ws.recv(timeout=10), ws.recv(timeout=10)
    # websockets hands text frames over as str, binary ones as bytes.
    assert all(isinstance(m, str) for m in (ack, answer, complete)), (ack, answer, complete)
    assert json.loads(answer)["payload"]["data"] == {"__typename": "Query"}


def test_the_graphql_ws_npm_client_streams_a_generation_in_node(
    server: str, tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed: `make test` installs it"
    bin_dir = TYPESCRIPT / "node_modules" / ".bin"
    codegen = subprocess.run(
        [str(bin_dir / "graphql-codegen"), "--config", "codegen.ts"],
        cwd=TYPESCRIPT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert codegen.returncode == 0, codegen.stderr
    build = subprocess.run(
        [str(bin_dir / "tsc"), "--outDir", str(tmp_path / "dist")],
        cwd=TYPESCRIPT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    # Compiled outside the package: node resolves graphql-ws and ws from clients/typescript.
    (tmp_path / "dist" / "package.json").write_text('{"type": "module"}')
    (tmp_path / "node_modules").symlink_to(TYPESCRIPT / "node_modules")
    run = subprocess.run(
        [node, str(tmp_path / "dist" / "subscribe.js"), ws_url(server), MODEL, PROMPT, str(TOKENS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    expected = generated_over_http(server)
    streamed = [e["unsteeredToken"]["id"] for e in events if e["unsteeredToken"] is not None]
    assert streamed == [t["id"] for t in expected["tokens"]]
    assert events[-1]["result"]["unsteered"]["text"] == expected["text"]


SUBSCRIBE_IN_PAGE = """async ([url, model, prompt, tokens]) => {
  const client = graphqlWs.createClient({ url, lazy: true, retryAttempts: 0 });
  const events = [];
  const query = `subscription($m: String!, $p: String!, $n: Int!) {
    generate(model: $m, input: {prompt: $p, maxTokens: $n}) {
      unsteeredToken { id } result { unsteered { text } } } }`;
  for await (const message of client.iterate({ query, variables: { m: model, p: prompt, n: tokens } })) {
    events.push(message);
  }
  await client.dispose();
  return events;
}"""


def test_the_graphql_ws_npm_client_streams_a_generation_in_chromium(server: str) -> None:
    assert CHROMIUM.exists(), "Debian's chromium is needed: `make test` installs it"
    assert GRAPHQL_WS_BUNDLE.exists(), "run `make test` (npm ci in clients/typescript)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.goto(server + "/healthz")  # an origin of the server's own
            page.add_script_tag(path=str(GRAPHQL_WS_BUNDLE))
            events = page.evaluate(SUBSCRIBE_IN_PAGE, [ws_url(server), MODEL, PROMPT, TOKENS])
        finally:
            browser.close()
    assert all("errors" not in e for e in events), events
    expected = generated_over_http(server)
    streamed = [e["data"]["generate"]["unsteeredToken"] for e in events]
    assert [t["id"] for t in streamed if t is not None] == [t["id"] for t in expected["tokens"]]
    assert events[-1]["data"]["generate"]["result"]["unsteered"]["text"] == expected["text"]


# The legacy protocol (subscriptions-transport-ws) ------------------------------------------


def legacy_exchange(server: str, payload: dict[str, Any], key: str | None = None) -> list[Any]:
    """Every message the server sends for one `start`, until `complete` or an error."""
    with websockets.sync.client.connect(
        ws_url(server),
        subprotocols=["graphql-ws"],  # type: ignore[list-item]
    ) as ws:
        init: dict[str, Any] = {"type": "connection_init"}
        if key is not None:
            init["payload"] = {"Authorization": f"Bearer {key}"}
        ws.send(json.dumps(init))
        assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"
        ws.send(json.dumps({"id": "1", "type": "start", "payload": payload}))
        messages = []
        while True:
            message = json.loads(ws.recv(timeout=30))
            if message["type"] == "ka":
                continue
            messages.append(message)
            if message["type"] in ("complete", "error"):
                return messages


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[tuple[str, list[str]]]:
    """A server that needs a key for everything, and what it logs."""
    args = ("--model", "random:tiny", "--name", MODEL, "--require-api-key", "--api-key", KEY)
    with serve_process(*args) as (url, process):
        log: list[str] = []
        assert process.stdout is not None
        stdout = process.stdout

        def drain() -> None:
            for line in stdout:
                log.append(line.decode("utf-8", "replace"))

        threading.Thread(target=drain, daemon=True).start()
        yield url, log


def test_legacy_protocol_answers_queries_and_mutations(server: str) -> None:
    messages = legacy_exchange(server, {"query": "{ models { name nLayers } }"})
    assert [m["type"] for m in messages] == ["data", "complete"]
    assert messages[0]["payload"]["data"] == {"models": [{"name": MODEL, "nLayers": 2}]}
    streamed = legacy_exchange(
        server,
        {
            "query": "subscription($m: String!) { generate(model: $m, input: "
            '{prompt: "x", maxTokens: 2}) { step } }',
            "variables": {"m": MODEL},
        },
    )
    assert [m["type"] for m in streamed] == ["data"] * 3 + ["complete"]


def test_legacy_protocol_refuses_without_a_key_with_a_typed_error(
    keyed_server: tuple[str, list[str]],
) -> None:
    url, log = keyed_server
    for payload in (
        {"query": "{ models { name } }"},
        {"query": 'mutation { explainNode(nodeId: "tiny/mlp_neuron/0/0") { id } }'},
    ):
        [refused, complete] = legacy_exchange(url, payload)
        assert refused["type"] == "data" and complete["type"] == "complete"
        [error] = refused["payload"]["errors"]
        assert error["extensions"]["code"] == "UNAUTHENTICATED"
    [answer, _] = legacy_exchange(url, {"query": "{ models { name } }"}, key=KEY)
    assert answer["payload"]["data"] == {"models": [{"name": MODEL}]}
    text = "".join(log)
    assert "Traceback" not in text and "InvalidOperationTypeError" not in text
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    internal = re.findall(r'code="INTERNAL_SERVER_ERROR"[^\n]* ([0-9.]+)', metrics)
    assert all(float(v) == 0 for v in internal), internal


# Origins -----------------------------------------------------------------------------------


def test_cors_origins_apply_to_websocket_handshakes() -> None:
    with serve(
        "--model", "random:tiny", "--no-model", "--cors-origin-regex", r"https://app\.example"
    ) as url:

        def handshake(origin: str) -> None:
            with websockets.sync.client.connect(
                ws_url(url),
                subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                origin=origin,  # type: ignore[arg-type]
            ) as ws:
                ws.send(json.dumps({"type": "connection_init"}))
                assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"

        handshake("https://app.example")
        for refused in ("https://evil.example", "https://app.example.evil.example"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as error:
                handshake(refused)
            assert error.value.response.status_code == 403
        preflight = httpx.options(
            url + "/graphql",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


# One context per operation ---------------------------------------------------------------

EXPLANATIONS = f'{{ node(id: "{MODEL_NAME}/mlp_neuron/0/3") {{ explanations {{ text }} }} }}'


def exchange(ws: Any, protocol: str, operation_id: str, payload: dict[str, Any]) -> Any:
    """One operation on an open connection: its first result's payload."""
    start = "subscribe" if protocol == "graphql-transport-ws" else "start"
    ws.send_json({"id": operation_id, "type": start, "payload": payload})
    first = ws.receive_json()
    assert first["type"] in ("next", "data"), first
    while ws.receive_json()["type"] != "complete":
        pass
    return first["payload"]


@pytest.mark.parametrize("protocol", ["graphql-transport-ws", "graphql-ws"])
def test_each_operation_on_a_connection_reads_afresh(
    small_backend: CountingBackend, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection lives for hours: what one operation loaded is neither served stale to the
    next (an explanation added in between shows) nor counted in its inference figures."""
    registry = small_registry(small_backend)
    # Starlette's test client calls itself 'testserver' on WebSockets.
    services = Services(registry, Settings(cached_runs=0, allowed_hosts=("testserver",)))
    store = services.explaining.store if services.explaining else None
    assert store is not None
    infer = f'{{ model(name: "{MODEL_NAME}") {{ infer(input: {{prompt: "a b"}}) {{ loss }} }} }}'
    caplog.set_level(logging.INFO, logger="interpql.requests")
    try:
        with (
            TestClient(create_app(services)) as http,
            http.websocket_connect("/graphql", subprotocols=[protocol]) as ws,
        ):
            ws.send_json({"type": "connection_init"})
            assert ws.receive_json()["type"] == "connection_ack"
            before = exchange(ws, protocol, "1", {"query": EXPLANATIONS})
            assert before["data"]["node"]["explanations"] == []
            store.add(NodeRef(MODEL_NAME, "mlp_neuron", 0, 3), "commas in lists", 0.5, "s", "e")
            after = exchange(ws, protocol, "2", {"query": EXPLANATIONS})
            assert after["data"]["node"]["explanations"] == [{"text": "commas in lists"}]
            passes_before = len(small_backend.calls)
            losses = [exchange(ws, protocol, str(i), {"query": infer}) for i in (3, 4)]
            assert losses[0] == losses[1]
            # Each ran its own pass (no run cache here): nothing was kept between them.
            assert len(small_backend.calls) == passes_before + 2
    finally:
        registry.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "interpql.requests"]
    assert sum(" passes=1 " in line for line in lines) == 2, lines
