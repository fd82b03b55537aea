"""Observability: a structured log line per operation, Prometheus metrics, OpenTelemetry traces
and CUDA memory snapshots (their CUDA side with torch's functions replaced: no GPU here)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch
import websockets.sync.client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from interpql.backends import cuda_memory
from interpql.bootstrap import ServeOptions, build_services
from interpql.loaders.auth import ApiKeys
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.registry import ModelRegistry
from interpql.observability.log_format import JsonFormatter
from interpql.observability.tracing import otlp_tracer_provider
from interpql.resolvers.context import Services
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import MODEL_NAME
from tests.processes import free_port, serve_process

KEY = "observability-secret-key"
KEY_ID = "key-" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
INFER = """query Infer($p: String!) { model(name: "small") {
  infer(input: {prompt: $p}) { loss inferenceTimeMs } } }"""
INFER_BATCH = """query Batch { model(name: "small") {
  inferBatch(inputs: [{prompt: "one two"}, {prompt: "three four five"}]) { loss } } }"""


def services_for(registry: ModelRegistry, **settings: Any) -> Services:
    return Services(registry, Settings(**settings), NodeDataCache(), api_keys=ApiKeys([KEY]))


@pytest.fixture
async def app_client(registry: ModelRegistry) -> AsyncIterator[httpx.AsyncClient]:
    """A fresh app (its own metrics) with run caching off."""
    app = create_app(services_for(registry, cached_runs=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client


def request_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "interpql.requests"]


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The structured fields of each request's line."""
    return [record.fields for record in request_records(caplog)]  # type: ignore[attr-defined]


async def post(client: httpx.AsyncClient, query: str, **variables: Any) -> dict[str, Any]:
    response = await client.post(
        "/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# Structured request logs


async def test_an_infer_query_logs_its_inference(
    app_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interpql.requests")
    body = await post(app_client, INFER, p="def f(x): return x")
    [line] = request_lines(caplog)
    assert line["operation"] == "Infer" and line["operation_type"] == "query"
    assert line["transport"] == "http" and line["status"] == 200
    assert line["inference_passes"] == 1 and line["batch_sizes"] == [1]
    # The same pass the answer reports, measured by the backend.
    answered_ms = body["data"]["model"]["infer"]["inferenceTimeMs"]
    assert line["inference_ms"] == pytest.approx(answered_ms, abs=1e-3)
    assert 0 < line["inference_ms"] <= line["duration_ms"]
    assert line["errors"] == 0 and line["error_codes"] == []
    assert line["api_key_id"] == KEY_ID and line["client"] == "127.0.0.1"
    assert line["coalesced_rows"] == 0

    [record] = request_records(caplog)
    json_line = JsonFormatter().format(record)
    assert json.loads(json_line) | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "interpql.requests",
        "message": record.getMessage(),
        **line,
    }
    assert KEY not in json_line and KEY not in caplog.text


async def test_a_metadata_query_and_errors(
    app_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interpql.requests")
    await post(app_client, "query Meta { models { name } }")
    await post(app_client, '{ model(name: "nope") { name } }')
    await post(app_client, "{ noSuchField alsoMissing }")
    await post(app_client, "{ models { ")
    rejected = await app_client.post(
        "/graphql", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert rejected.status_code == 400
    meta, missing, invalid, unparsable, not_json = request_lines(caplog)
    assert meta["operation"] == "Meta" and meta["inference_passes"] == 0
    assert meta["inference_ms"] == 0 and meta["batch_sizes"] == [] and meta["errors"] == 0
    assert missing["operation"] is None and missing["operation_type"] == "query"
    assert missing["error_codes"] == ["MODEL_NOT_FOUND"]
    assert missing["errors"] == 1 and missing["status"] == 200
    assert invalid["error_codes"] == ["GRAPHQL_VALIDATION_FAILED"] * 2 and invalid["errors"] == 2
    assert unparsable["operation_type"] is None
    assert unparsable["error_codes"] == ["GRAPHQL_PARSE_FAILED"]
    assert not_json["status"] == 400 and not_json["error_codes"] == ["HTTP_400"]
    assert not_json["api_key_id"] is None


async def test_a_batch_logs_its_rows(
    app_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="interpql.requests")
    await post(app_client, INFER_BATCH)
    [line] = request_lines(caplog)
    assert line["inference_passes"] == 1 and line["batch_sizes"] == [2]
    assert line["coalesced_rows"] == 0  # its own two rows, with nobody else's


async def test_masked_internal_errors_are_logged_with_their_public_code(
    app_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = ModelRegistry.get

    def get(self: ModelRegistry, name: str) -> Any:
        if name == "boom":
            raise RuntimeError("a secret detail")
        return original(self, name)

    monkeypatch.setattr(ModelRegistry, "get", get)
    caplog.set_level(logging.INFO, logger="interpql.requests")
    body = await post(app_client, '{ model(name: "boom") { name } }')
    assert body["errors"][0]["extensions"]["code"] == "INTERNAL_SERVER_ERROR"
    [line] = request_lines(caplog)
    assert line["error_codes"] == ["INTERNAL_SERVER_ERROR"]


# Metrics


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_what_was_sent(registry: ModelRegistry) -> None:
    services = services_for(registry, cached_runs=8)
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for _ in range(3):
            await post(client, "{ models { name } }")
        await post(client, '{ model(name: "nope") { name } }')
        await post(client, INFER, p="metrics count this")
        await post(client, INFER, p="metrics count this")  # from the run cache
        await post(client, INFER_BATCH)
        await post(client, 'mutation { explainNode(nodeId: "small/mlp_neuron/0/1") { id } }')
        # The node-data cache, as slow sources use it: one key found, one not.
        assert services.cache is not None
        await services.cache.set_many([("records:s:a", {"x": 1})])
        await services.cache.get_many(["records:s:a", "records:s:b"])
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = scrape(response.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("interpql_graphql_requests_total", operation_type="query", outcome="ok") == 6
    assert (
        value("interpql_graphql_requests_total", operation_type="query", outcome="MODEL_NOT_FOUND")
        == 1
    )
    assert value("interpql_graphql_errors_total", code="MODEL_NOT_FOUND") == 1
    assert value("interpql_graphql_request_duration_seconds_count", operation_type="query") == 7
    assert value("interpql_graphql_requests_in_flight") == 0
    # Two passes ran: one prompt, then a batch of two; the repeated prompt hit the run cache.
    assert value("interpql_inference_pass_duration_seconds_count", model=MODEL_NAME) == 2
    assert value("interpql_inference_batch_size_count", model=MODEL_NAME) == 2
    assert value("interpql_inference_batch_size_sum", model=MODEL_NAME) == 3
    assert value("interpql_inference_batch_size_bucket", model=MODEL_NAME, le="1.0") == 1
    assert value("interpql_run_cache_lookups_total", result="hit") == 1
    # Missed: the first prompt and both prompts of the batch.
    assert value("interpql_run_cache_lookups_total", result="miss") == 3
    assert value("interpql_inference_coalesced_rows_total") == 0
    assert value("interpql_node_data_cache_lookups_total", result="hit") == 1
    assert value("interpql_node_data_cache_lookups_total", result="miss") == 1
    # The mutation started a job; it is in exactly one status.
    assert value("interpql_graphql_requests_total", operation_type="mutation", outcome="ok") == 1
    jobs = {
        status: value("interpql_jobs", status=status)
        for status in ("queued", "running", "succeeded", "failed")
    }
    assert sum(jobs.values()) == 1
    assert value("process_resident_memory_bytes") > 10_000_000
    # The app runs in this process: its heap is the one Python reports here.
    assert value("interpql_python_allocated_blocks") == pytest.approx(
        sys.getallocatedblocks(), rel=0.05
    )
    await services.jobs.shutdown()


async def test_coalesced_requests_are_counted(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # A long window: both requests join the first pass, whoever arrives first.
    services = services_for(registry, cached_runs=0, coalesce_window_ms=500)
    caplog.set_level(logging.INFO, logger="interpql.requests")
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        await asyncio.gather(post(client, INFER, p="first prompt"), post(client, INFER, p="second"))
        samples = scrape((await client.get("/metrics")).text)
    lines = request_lines(caplog)
    assert [line["batch_sizes"] for line in lines] == [[2], [2]]
    assert [line["coalesced_rows"] for line in lines] == [1, 1]
    assert samples[("interpql_inference_coalesced_rows_total", ())] == 2
    assert samples[("interpql_inference_batch_size_sum", (("model", MODEL_NAME),))] == 2


async def test_each_app_counts_alone_and_metrics_can_be_off(registry: ModelRegistry) -> None:
    first, second = (create_app(services_for(registry)) for _ in range(2))
    off = create_app(services_for(registry, metrics=False))
    for app, queries in ((first, 2), (second, 1)):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for _ in range(queries):
                await post(client, "{ models { name } }")
            samples = scrape((await client.get("/metrics")).text)
        key = (("operation_type", "query"), ("outcome", "ok"))
        assert samples[("interpql_graphql_requests_total", key)] == queries
    transport = httpx.ASGITransport(app=off)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        await post(client, "{ models { name } }")
        assert (await client.get("/metrics")).status_code == 404


# OpenTelemetry


async def test_spans_are_named_after_the_operation_and_resolvers(registry: ModelRegistry) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    services = Services(registry, Settings(cached_runs=0), tracer_provider=provider)
    transport = httpx.ASGITransport(app=create_app(services))
    query = 'query Traced { models { name } model(name: "small") { infer(input: {prompt: "traced prompt"}) { loss } } }'
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        body = await post(client, query)
    assert body["data"]["model"]["infer"]["loss"] > 0
    spans = {span.name: span for span in exporter.get_finished_spans()}
    operation = spans["GraphQL Query: Traced"]
    for name in ("models", "model", "infer"):
        resolver = spans[f"GraphQL Resolving: {name}"]
        assert resolver.parent is not None
        assert resolver.parent.span_id == operation.context.span_id
    assert (spans["GraphQL Resolving: infer"].attributes or {})["graphql.path"] == "model.infer"
    assert {"GraphQL Parsing", "GraphQL Validation"} <= set(spans)


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def otlp_collector() -> Iterator[str]:
    """A stand-in OTLP/HTTP collector on a free port; what it receives is in _Collector."""
    _Collector.received = []
    server = http.server.HTTPServer(("127.0.0.1", free_port()), _Collector)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


async def test_spans_reach_an_otlp_collector(registry: ModelRegistry, otlp_collector: str) -> None:
    provider = otlp_tracer_provider(otlp_collector)
    services = Services(registry, Settings(), tracer_provider=provider)
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        await post(client, "query Exported { models { name } }")
    provider.shutdown()  # what the app's shutdown does: flush the batch
    [(path, body)] = _Collector.received
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert attributes["service.name"] == "interpql"
    names = {span.name for scope in resource_spans.scope_spans for span in scope.spans}
    assert {"GraphQL Query: Exported", "GraphQL Resolving: models"} <= names


def test_the_otlp_variable_turns_tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    options = ServeOptions(model="random:tiny", no_model=True, explanation_store=":memory:")
    assert build_services(options).tracer_provider is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = build_services(options).tracer_provider
    assert isinstance(provider, TracerProvider)
    provider.shutdown()


# CUDA memory snapshots


def test_cuda_memory_debugging_refuses_to_start_without_cuda() -> None:
    assert not torch.cuda.is_available()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "interpql.cli",
            "serve",
            "--port",
            str(free_port()),
            "--model",
            "random:tiny",
            "--cuda-memory-debugging",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot start: --cuda-memory-debugging needs a CUDA device" in done.stderr
    assert "Traceback" not in done.stderr


def test_recording_starts_on_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda **kwargs: calls.append(kwargs)
    )
    with pytest.raises(ValueError, match="--device cuda"):
        cuda_memory.start_recording("cpu", 1000)
    cuda_memory.start_recording("cuda:0", 1000)
    assert calls == [{"enabled": "all", "max_entries": 1000}]


async def snapshot(app: Any, authorization: str | None = None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return await client.post("/debug/cuda-memory-snapshot", headers=headers)


async def test_the_snapshot_endpoint_is_off_without_the_flag(registry: ModelRegistry) -> None:
    response = await snapshot(create_app(services_for(registry)), f"Bearer {KEY}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "CUDA_MEMORY_DEBUGGING_OFF"
    assert "--cuda-memory-debugging" in response.json()["error"]["message"]


async def test_snapshots_need_a_key_and_are_written(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pickled = b"\x80\x04a CUDA allocator snapshot"

    def dump(filename: str) -> None:
        Path(filename).write_bytes(pickled)

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    folder = tmp_path / "snapshots"
    settings = Settings(cuda_memory_debugging=True, cuda_memory_snapshot_dir=str(folder))
    keyless = create_app(Services(registry, settings))
    response = await snapshot(keyless, f"Bearer {KEY}")
    assert response.status_code == 403 and response.json()["error"]["code"] == "NO_API_KEYS"

    app = create_app(Services(registry, settings, api_keys=ApiKeys([KEY])))
    for authorization in (None, "Bearer wrong-key", KEY):
        response = await snapshot(app, authorization)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"] == "Bearer"
    assert not folder.exists()

    first, second = [(await snapshot(app, f"Bearer {KEY}")).json() for _ in range(2)]
    assert first["path"] != second["path"]
    for answer in (first, second):
        path = Path(answer["path"])
        assert path.parent == folder.resolve() and path.suffix == ".pickle"
        assert path.name.startswith("cuda-memory-")
        assert answer["bytes"] == len(pickled) and path.read_bytes() == pickled


# The real server: JSON logs on its output, and WebSocket operations


def test_json_logs_of_a_running_server() -> None:
    args = ("--model", "random:tiny", "--log-format", "json", "--api-key", KEY)
    with serve_process(*args) as (url, process):
        [model] = httpx.get(url + "/healthz").json()["models"]
        headers = {"Authorization": f"Bearer {KEY}"}
        query = 'query Served($m: String!) { model(name: $m) { infer(input: {prompt: "a b c"}) { inferenceTimeMs } } }'
        body = httpx.post(
            url + "/graphql", json={"query": query, "variables": {"m": model}}, headers=headers
        ).json()
        ws_url = url.replace("http://", "ws://") + "/graphql"
        with websockets.sync.client.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:
            ws.send(json.dumps({"type": "connection_init"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "connection_ack"
            payload = {"query": "query OverWs { models { name } }"}
            ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
            assert json.loads(ws.recv(timeout=10))["type"] == "next"
            assert json.loads(ws.recv(timeout=10))["type"] == "complete"
            # Refused before it runs (no extension sees it): logged all the same.
            broken = {"query": "subscription {", "operationName": "Broken"}
            ws.send(json.dumps({"id": "2", "type": "subscribe", "payload": broken}))
            assert json.loads(ws.recv(timeout=10))["type"] == "error"
        assert httpx.get(url + "/metrics").status_code == 200
        process.terminate()
        process.wait(timeout=30)
        assert process.stdout is not None
        output = process.stdout.read().decode()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == len(output.splitlines()), output  # every line is JSON
    served = [line for line in lines if line.get("operation") == "Served"]
    over_ws = [line for line in lines if line.get("operation") == "OverWs"]
    assert len(served) == 1 and served[0]["logger"] == "interpql.requests"
    assert served[0]["status"] == 200 and served[0]["api_key_id"] == KEY_ID
    answered_ms = body["data"]["model"]["infer"]["inferenceTimeMs"]
    assert served[0]["inference_ms"] == pytest.approx(answered_ms, abs=1e-3)
    assert served[0]["inference_passes"] == 1 and served[0]["errors"] == 0
    assert len(over_ws) == 1 and over_ws[0]["transport"] == "websocket"
    assert over_ws[0]["status"] is None and over_ws[0]["errors"] == 0
    [broken] = [line for line in lines if line.get("operation") == "Broken"]
    assert broken["transport"] == "websocket"
    assert broken["error_codes"] == ["GRAPHQL_PARSE_FAILED"]
    assert any(line["logger"] == "uvicorn.access" for line in lines)
    assert KEY not in output
