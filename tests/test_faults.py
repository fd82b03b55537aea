"""Faults, against real `interpql serve` processes: a forward pass that runs out of memory,
SIGTERM while requests are in flight, and API keys required over WebSockets. (A broken record
file failing only its node is in test_node_sources.py; Redis dying, in test_node_sources.py;
the explainer API failing, in test_explaining.py; jobs across SIGTERM, in test_jobs.py.)"""

from __future__ import annotations

import json
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import websockets.sync.client

from interpql.backends.gpt2.loading import random_model, save_tdb_folder
from interpql.backends.gpt2.model import GPT2Config
from tests.processes import serve, serve_process

INFER = 'query($p: String!) { model(name: "m") { infer(input: {prompt: $p}) { loss } } }'
BATCH = (
    'query($inputs: [InferenceInput!]!) { model(name: "m") { inferBatch(inputs: $inputs) '
    "{ loss } } }"
)


def limit_address_space() -> None:
    # 6 GiB of address space: the server and a small model fit, a 13 GB logits tensor does
    # not, so the CPU allocator fails the way it does when memory runs out, without putting
    # the machine at risk.
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def post(url: str, query: str, variables: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(
        url + "/graphql", json={"query": query, "variables": variables}, timeout=120, **kwargs
    )


def test_out_of_memory_fails_the_request_and_the_server_keeps_serving(tmp_path: Path) -> None:
    # A narrow one-layer model with GPT-2's 1024-token context and 50,257-token vocabulary: its
    # pass is quick, but the logits alone of 64 full-length prompts are 64 x 1024 x 50257 x 4
    # bytes = 13 GB.
    config = GPT2Config(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=1024)
    save_tdb_folder(tmp_path, config, random_model(config, seed=0).state_dict())
    args = ("--model", str(tmp_path), "--name", "m", "--max-body-bytes", "4000000")
    with serve_process(*args, preexec_fn=limit_address_space) as (url, process):
        # Distinct prompts: identical inputs would share one row.
        prompts = [f" {i}" + " the" * 1020 for i in range(64)]
        answer = post(url, BATCH, {"inputs": [{"prompt": p} for p in prompts]})
        assert answer.status_code == 200
        errors = answer.json()["errors"]
        assert {e["extensions"]["code"] for e in errors} == {"RESOURCE_EXHAUSTED"}
        assert "Traceback" not in answer.text
        # The same server answers the next request, computed in full.
        again = post(url, INFER, {"p": "The cat sat on the mat"})
        assert again.status_code == 200 and again.json()["data"]["model"]["infer"]["loss"] > 0
        assert process.poll() is None


def test_sigterm_lets_in_flight_requests_finish() -> None:
    # A long coalescing window keeps a request in flight for 3 s.
    args = ("--model", "random:tiny", "--name", "m", "--coalesce-ms", "3000")
    with serve_process(*args) as (url, process):
        answers: list[httpx.Response] = []
        sent = threading.Thread(
            target=lambda: answers.append(post(url, INFER, {"p": "in flight at SIGTERM"}))
        )
        sent.start()
        time.sleep(1.0)  # the request has arrived and waits in the window
        process.send_signal(signal.SIGTERM)
        sent.join(timeout=60)
        assert answers and answers[0].status_code == 200
        assert answers[0].json()["data"]["model"]["infer"]["loss"] > 0
        assert process.wait(timeout=30) == 0
        # Once stopped, nothing more is accepted.
        try:
            httpx.get(url + "/healthz", timeout=2)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.TransportError:
            pass


def test_api_key_for_every_operation_over_http_and_websocket() -> None:
    args = ("--model", "random:tiny", "--name", "m", "--api-key", "k1", "--require-api-key")
    with serve(*args) as url:
        refused = post(url, INFER, {"p": "no key"})
        assert refused.status_code == 401
        assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        allowed = post(url, INFER, {"p": "a key"}, headers={"Authorization": "Bearer k1"})
        assert allowed.status_code == 200 and allowed.json()["data"]["model"]["infer"]["loss"] > 0

        ws_url = url.replace("http://", "ws://") + "/graphql"
        query = {"query": '{ model(name: "m") { nLayers } }'}
        for payload, expected in (({}, "UNAUTHENTICATED"), ({"Authorization": "Bearer k1"}, None)):
            with websockets.sync.client.connect(
                ws_url, subprotocols=["graphql-transport-ws"]
            ) as ws:
                ws.send(json.dumps({"type": "connection_init", "payload": payload}))
                assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"
                ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": query}))
                message = json.loads(ws.recv(timeout=10))
                if expected is None:
                    assert message["type"] == "next"
                    assert message["payload"]["data"]["model"]["nLayers"] == 2
                else:
                    codes = [e["extensions"]["code"] for e in message["payload"]["errors"]]
                    assert codes == [expected]


def test_require_api_key_without_keys_fails_at_start() -> None:
    try:
        with serve("--model", "random:tiny", "--require-api-key", startup_s=30):
            raise AssertionError("started without any key")
    except AssertionError as exc:
        assert "--require-api-key needs at least one" in str(exc)
