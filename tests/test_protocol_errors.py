"""A client's mistake gets a typed error on every transport: plain HTTP POST, multipart HTTP,
graphql-transport-ws and graphql-ws. Never an internal error, a dropped connection, a bare
`complete` or silence, never a traceback in the server's log; and a connection that answered a
mistake still runs the next operation."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from graphql import build_schema, parse, validate
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from strawberry.extensions.query_depth_limiter import create_validator as strawberry_depth_rule

from interpql.resolvers.context import Services
from interpql.schema.build import depth_limit
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import MODEL_NAME, CountingBackend, small_registry

GENERATE = f'generate(model: "{MODEL_NAME}", input: {{prompt: "a b", maxTokens: 1}}) {{ step }}'
SUBSCRIPTION = f"subscription A {{ {GENERATE} }}"
TWO_SUBSCRIPTIONS = f"{SUBSCRIPTION} subscription C {{ {GENERATE} }}"
MULTIPART = {"Accept": "multipart/mixed;subscriptionSpec=1.0"}
# A WebSocket answer that takes longer never comes (the test client's receive would wait on).
ANSWER_WITHIN_S = 10

# (what the client sends as the operation, the code, the message) for the mistakes every
# transport must answer alike.
OPERATION_MISTAKES = [
    pytest.param(
        {"query": "subscription {"},
        "GRAPHQL_PARSE_FAILED",
        "Syntax Error: Expected Name, found <EOF>.",
        id="syntax error",
    ),
    pytest.param(
        {"query": SUBSCRIPTION, "operationName": "B"},
        "BAD_REQUEST",
        'Unknown operation named "B".',
        id="unknown operation name",
    ),
    pytest.param(
        {"query": TWO_SUBSCRIPTIONS},
        "BAD_REQUEST",
        "The document has several operations: name the one to run in operationName.",
        id="several operations and no name",
    ),
    pytest.param(
        {"query": "{ ...X }"},
        "GRAPHQL_VALIDATION_FAILED",
        "Unknown fragment 'X'.",
        id="unknown fragment",
    ),
]

# Payloads no HTTP body could carry past strawberry's view, as WebSocket messages.
PAYLOAD_MISTAKES = [
    pytest.param(
        {"query": 5},
        "The GraphQL operation's `query` must be a string or null, if provided.",
        id="query not a string",
    ),
    pytest.param(
        {"query": "{ __typename }", "variables": [1]},
        "The GraphQL operation's `variables` must be an object or null, if provided.",
        id="variables not an object",
    ),
    pytest.param(
        {"query": "{ __typename }", "operationName": 5},
        "The GraphQL operation's `operationName` must be a string or null, if provided.",
        id="operationName not a string",
    ),
    pytest.param(
        None, "The message's payload must be an object that holds the query.", id="payload null"
    ),
]


@pytest.fixture(scope="module")
def http(small_backend: CountingBackend) -> Iterator[TestClient]:
    registry = small_registry(small_backend)
    # Starlette's test client calls itself 'testserver' on WebSockets.
    services = Services(registry, Settings(cached_runs=0, allowed_hosts=("testserver",)))
    try:
        with TestClient(create_app(services)) as client:
            yield client
    finally:
        registry.close()


@pytest.fixture(autouse=True)
def quiet_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A client's mistake leaves no error in the server's log (an operation's task that
    failed unseen is reported when it is collected, hence the collection)."""
    caplog.set_level(logging.WARNING)
    yield
    gc.collect()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def error_of(errors: list[dict[str, Any]]) -> tuple[str, str]:
    [error] = errors
    return error["extensions"]["code"], error["message"]


def receive_json(ws: Any) -> Any:
    """The next message on `ws`, or the test's failure when none comes."""
    answers: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def receive() -> None:
        try:
            answers.put((True, ws.receive_json()))
        except BaseException as error:  # a close (WebSocketDisconnect) included
            answers.put((False, error))

    threading.Thread(target=receive, daemon=True).start()
    try:
        received, answer = answers.get(timeout=ANSWER_WITHIN_S)
    except queue.Empty:
        pytest.fail(f"no answer within {ANSWER_WITHIN_S} s")
    if not received:
        raise answer
    return answer


# Plain HTTP POST, what the others answer as -------------------------------------------------


@pytest.mark.parametrize(("operation", "code", "message"), OPERATION_MISTAKES)
def test_plain_http_post_answers(
    http: TestClient, operation: dict[str, Any], code: str, message: str
) -> None:
    body = http.post("/graphql", json=operation).json()
    assert error_of(body["errors"]) == (code, message)


def test_an_unknown_fragment_is_located(http: TestClient) -> None:
    [error] = http.post("/graphql", json={"query": "{ ...X }"}).json()["errors"]
    assert error["locations"] == [{"line": 1, "column": 6}]  # at the fragment's name


# The depth rule --------------------------------------------------------------------------

SDL = "type Query { a: A, b: Int } type A { a: A, b: Int }"
WELL_FORMED = [
    "{ b }",
    "{ a { b } }",
    "{ a { a { b } } }",
    "{ a { a { a { b } } } }",
    "{ a { ...F } } fragment F on A { a { b } }",
    "{ a { ...F ...F } } fragment F on A { a { ...G } } fragment G on A { a { b } }",
    "{ a { ... on A { a { a { b } } } } }",
    "query Q { a { b } } query R { a { a { a { a { b } } } } }",
    "{ __schema { types { fields { type { name } } } } }",
]


@pytest.mark.parametrize("document", WELL_FORMED)
def test_the_depth_rule_agrees_with_strawberrys_on_well_formed_documents(document: str) -> None:
    schema = build_schema(SDL)
    for most in (0, 1, 2, 3):
        ours = validate(schema, parse(document), [depth_limit(most)])
        theirs = validate(schema, parse(document), [strawberry_depth_rule(most, None)])
        # Strawberry's says it once for each path too deep, ours once.
        assert {e.message for e in ours} == {e.message for e in theirs}, (document, most)


@pytest.mark.parametrize(
    "document",
    [
        "{ ...X }",
        "{ a { ...F } } fragment F on A { ...G }",
        "{ a { ...F } } fragment F on A { a { ...F } }",
        "{ }",
        "{ a { } }",
        "{ a { ... on A { } } }",
    ],
)
def test_the_depth_rule_leaves_broken_documents_to_graphql_cores_rules(document: str) -> None:
    assert validate(build_schema(SDL), parse(document), [depth_limit(5)]) == []


def test_a_fragment_spread_many_times_is_counted_once() -> None:
    # 2**60 paths through the spreads: counting each would never end.
    chain = " ".join(f"fragment F{i} on A {{ ...F{i + 1} ...F{i + 1} }}" for i in range(60))
    document = f"{{ a {{ ...F0 }} }} {chain} fragment F60 on A {{ a {{ a {{ b }} }} }}"
    [error] = validate(build_schema(SDL), parse(document), [depth_limit(2)])
    assert error.message == "'anonymous' exceeds maximum operation depth of 2"


# Multipart HTTP --------------------------------------------------------------------------


def multipart_payloads(http: TestClient, operation: dict[str, Any]) -> list[dict[str, Any]]:
    """The payloads of a multipart answer to `operation`, heartbeats aside; the stream must
    end with its closing boundary."""
    response = http.post("/graphql", json=operation, headers=MULTIPART)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("multipart/mixed")
    assert response.text.endswith("--graphql--\r\n"), response.text
    # Each part: its headers, a blank line, its JSON (a heartbeat's is {}).
    parts = [p.split("\r\n\r\n", 1) for p in response.text.split("--graphql")]
    bodies = [json.loads(part[1]) for part in parts if len(part) == 2]
    return [body["payload"] for body in bodies if body]


@pytest.mark.parametrize(("operation", "code", "message"), OPERATION_MISTAKES)
def test_multipart_http_answers_as_plain_post(
    http: TestClient, operation: dict[str, Any], code: str, message: str
) -> None:
    [payload] = multipart_payloads(http, operation)
    assert payload["data"] is None
    assert error_of(payload["errors"]) == (code, message)


def test_multipart_http_answers_a_query_as_its_one_part(http: TestClient) -> None:
    [payload] = multipart_payloads(http, {"query": "{ models { name } }"})
    assert payload["data"] == {"models": [{"name": MODEL_NAME}]}
    assert "errors" not in payload


def test_multipart_http_streams_a_subscription(http: TestClient) -> None:
    payloads = multipart_payloads(http, {"query": SUBSCRIPTION})
    assert [p["data"]["generate"]["step"] for p in payloads] == [0, 0]


# graphql-transport-ws ----------------------------------------------------------------------


@contextlib.contextmanager
def transport_ws(http: TestClient) -> Iterator[Any]:
    """An acknowledged graphql-transport-ws connection."""
    with http.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json({"type": "connection_init"})
        assert receive_json(ws)["type"] == "connection_ack"
        yield ws


def subscribe(ws: Any, operation_id: str, payload: Any) -> list[dict[str, Any]]:
    """Every message for one operation, until its `complete` or `error`."""
    ws.send_json({"id": operation_id, "type": "subscribe", "payload": payload})
    messages = []
    while True:
        message = receive_json(ws)
        assert message["id"] == operation_id, message
        messages.append(message)
        if message["type"] in ("complete", "error"):
            return messages


def assert_transport_ws_still_runs(ws: Any) -> None:
    [answer, complete] = subscribe(ws, "good", {"query": "{ __typename }"})
    assert answer["type"] == "next" and answer["payload"]["data"] == {"__typename": "Query"}
    assert complete["type"] == "complete"


@pytest.mark.parametrize(("operation", "code", "message"), OPERATION_MISTAKES)
def test_graphql_transport_ws_answers_an_error_and_stays_open(
    http: TestClient, operation: dict[str, Any], code: str, message: str
) -> None:
    with transport_ws(http) as ws:
        [error] = subscribe(ws, "1", operation)
        assert error["type"] == "error"
        assert error_of(error["payload"]) == (code, message)
        assert_transport_ws_still_runs(ws)


@pytest.mark.parametrize(("payload", "message"), PAYLOAD_MISTAKES)
def test_graphql_transport_ws_refuses_a_payload_as_bad_request(
    http: TestClient, payload: Any, message: str
) -> None:
    with transport_ws(http) as ws:
        [error] = subscribe(ws, "1", payload)
        assert error["type"] == "error"
        assert error_of(error["payload"]) == ("BAD_REQUEST", message)
        assert_transport_ws_still_runs(ws)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            {"id": 5, "type": "subscribe", "payload": {"query": "{ __typename }"}},
            "A subscribe message's id must be a string.",
        ),
        ({"type": "subscribe", "payload": {"query": "{ __typename }"}}, None),
        ({"id": 5, "type": "complete"}, "A complete message's id must be a string."),
        ([1, 2], "A message must be a JSON object."),
    ],
    ids=["numeric id", "no id", "numeric id to complete", "not an object"],
)
def test_graphql_transport_ws_closes_on_a_message_it_cannot_answer(
    http: TestClient, message: Any, reason: str | None
) -> None:
    with transport_ws(http) as ws:
        ws.send_json(message)
        with pytest.raises(WebSocketDisconnect) as closed:
            receive_json(ws)
        assert closed.value.code == 4400
        assert closed.value.reason == (reason or "A subscribe message's id must be a string.")


# graphql-ws (subscriptions-transport-ws) ---------------------------------------------------


@contextlib.contextmanager
def legacy_ws(http: TestClient) -> Iterator[Any]:
    """An acknowledged graphql-ws connection."""
    with http.websocket_connect("/graphql", subprotocols=["graphql-ws"]) as ws:
        ws.send_json({"type": "connection_init"})
        assert receive_json(ws)["type"] == "connection_ack"
        yield ws


def start(ws: Any, message: dict[str, Any]) -> list[dict[str, Any]]:
    """Every message for one `start`, until its `complete` or `error`."""
    ws.send_json({"type": "start", **message})
    messages = []
    while True:
        answer = receive_json(ws)
        messages.append(answer)
        if answer["type"] in ("complete", "error"):
            return messages


def assert_legacy_ws_still_runs(ws: Any) -> None:
    [data, complete] = start(ws, {"id": "good", "payload": {"query": "{ __typename }"}})
    assert data == {
        "type": "data",
        "id": "good",
        "payload": {"data": {"__typename": "Query"}, "extensions": {"cost": 1}},
    }
    assert complete == {"type": "complete", "id": "good"}


@pytest.mark.parametrize(("operation", "code", "message"), OPERATION_MISTAKES)
def test_graphql_ws_answers_an_error_and_stays_open(
    http: TestClient, operation: dict[str, Any], code: str, message: str
) -> None:
    with legacy_ws(http) as ws:
        [error] = start(ws, {"id": "1", "payload": operation})
        assert error["type"] == "error" and error["id"] == "1"
        assert error_of([error["payload"]]) == (code, message)
        assert_legacy_ws_still_runs(ws)


@pytest.mark.parametrize(("payload", "message"), PAYLOAD_MISTAKES)
def test_graphql_ws_refuses_a_payload_as_bad_request(
    http: TestClient, payload: Any, message: str
) -> None:
    with legacy_ws(http) as ws:
        [error] = start(ws, {"id": "1", "payload": payload})
        assert error["type"] == "error" and error["id"] == "1"
        assert error_of([error["payload"]]) == ("BAD_REQUEST", message)
        assert_legacy_ws_still_runs(ws)


def test_graphql_ws_refuses_a_start_without_a_payload(http: TestClient) -> None:
    with legacy_ws(http) as ws:
        ws.send_json({"id": "1", "type": "start"})
        error = receive_json(ws)
        assert error["type"] == "error" and error["id"] == "1"
        assert error_of([error["payload"]]) == (
            "BAD_REQUEST",
            "The message's payload must be an object that holds the query.",
        )
        assert_legacy_ws_still_runs(ws)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ([1, 2], "A message must be a JSON object."),
        ({"id": 5, "type": "start", "payload": {"query": "{ a }"}}, None),
        ({"type": "stop"}, "A stop message's id must be a string."),
        ({"id": "1", "type": "subscribe"}, "Unknown message type: 'subscribe'."),
    ],
    ids=["not an object", "numeric id", "stop without an id", "unknown type"],
)
def test_graphql_ws_answers_a_message_it_cannot_read_with_a_connection_error(
    http: TestClient, message: Any, reason: str | None
) -> None:
    with legacy_ws(http) as ws:
        ws.send_json(message)
        answer = receive_json(ws)
        assert answer["type"] == "connection_error"
        assert error_of([answer["payload"]]) == (
            "BAD_REQUEST",
            reason or "A start message's id must be a string.",
        )
        assert_legacy_ws_still_runs(ws)


def test_graphql_ws_answers_a_frame_that_is_not_json(http: TestClient) -> None:
    """strawberry skips it silently; the client would wait for an answer that never comes."""
    with legacy_ws(http) as ws:
        ws.send_text("{not json")
        answer = receive_json(ws)
        assert answer["type"] == "connection_error"
        assert error_of([answer["payload"]]) == ("BAD_REQUEST", "A message must be JSON.")
        assert_legacy_ws_still_runs(ws)
