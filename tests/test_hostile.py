"""A hand-written corpus of hostile requests: query bombs, huge and deeply nested inputs, values
GraphQL cannot carry, broken bodies and encodings, and requests the protocol does not allow.

Each must get, in time, a JSON answer whose errors carry a documented `extensions.code` (never
INTERNAL_SERVER_ERROR: that is a crash behind the mask), or a normal answer where one is right;
never a 5xx, and never a trace of internals. The whole corpus runs in-process over the small
model; a subset runs against a real `interpql serve` of the demo, which must stay up.

Decided here: NaN and Infinity are not GraphQL Floats (the spec's Float is finite), so they fail
coercion as any ill-typed value does (GRAPHQL_VALIDATION_FAILED as literals, BAD_USER_INPUT as
variables); a finite value too large for an ablation or steering is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
import pytest

from bench.load import documented_codes, leaked_internals
from interpql.loaders.registry import ModelRegistry
from interpql.server import create_app
from interpql.settings import Settings
from tests.processes import serve_process

ALLOWED = documented_codes() - {"INTERNAL_SERVER_ERROR"}
OK = "OK"  # among a case's expected outcomes: a normal answer is right too
ANY_CODE = frozenset(ALLOWED)
DEADLINE_S = 20.0
MB = 1_000_000
LIMITS = Settings()

INFER = 'query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) { loss } } }'
ABLATE = (
    'query($v: Float!) { model(name: "small") { infer(input: {prompt: "hello there", '
    'ablations: [{nodeId: "small/mlp_neuron/0/1", value: $v}]}) { loss objective '
    "topNodes(group: ACT_TIMES_GRAD) { top { value } } } } }"
)
NODES = "query($ids: [ID!]!) { nodes(ids: $ids) { id } }"
BATCH = 'query($i: [InferenceInput!]!) { model(name: "small") { inferBatch(inputs: $i) { loss } } }'
ENTITIES = "query($r: [_Any!]!) { _entities(representations: $r) { __typename } }"


@dataclass(frozen=True)
class Case:
    id: str
    expect: frozenset[str]
    body: bytes = b""
    content_type: str | None = "application/json"
    method: str = "POST"
    query_string: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def post(id: str, expect: set[str] | frozenset[str], payload: object) -> Case:
    return Case(id, frozenset(expect), orjson.dumps(payload))


def query(id: str, expect: set[str] | frozenset[str], text: str, **variables: Any) -> Case:
    return post(id, expect, {"query": text, "variables": variables})


def raw(id: str, expect: set[str] | frozenset[str], body: bytes, content_type: str | None) -> Case:
    return Case(id, frozenset(expect), body, content_type)


def _nested(open_: str, inner: str, close: str, depth: int) -> str:
    return open_ * depth + inner + close * depth


FRAGMENT_FAN_OUT = (
    "query { models { ...F0 } } "
    + " ".join(
        f"fragment F{i} on Model {{ layers {{ model {{ ...F{i + 1} }} }} "
        f"a{i}: layers {{ model {{ ...F{i + 1} }} }} }}"
        for i in range(10)
    )
    + " fragment F10 on Model { name }"
)

CASES = [
    # Query shape.
    query(
        "depth bomb",
        {"QUERY_TOO_COMPLEX"},
        "{ models { " + _nested("layers { model { ", "name", " } }", 40) + " } }",
    ),
    query(
        "alias bomb (thousands)",
        {"QUERY_TOO_COMPLEX"},
        "{ " + " ".join(f"a{i}: models {{ name }}" for i in range(5000)) + " }",
    ),
    query(
        "alias bomb under the token limit",
        {"QUERY_TOO_COMPLEX"},
        "{ " + " ".join(f"a{i}: __typename" for i in range(1500)) + " }",
    ),
    query(
        "fragment cycle",
        {"GRAPHQL_VALIDATION_FAILED"},
        "query { models { ...A } } fragment A on Model { name ...B } "
        "fragment B on Model { nLayers ...A }",
    ),
    query(
        "fragment spreading itself",
        {"GRAPHQL_VALIDATION_FAILED"},
        "query { models { ...A } } fragment A on Model { name ...A }",
    ),
    query("fragment fan-out", {"QUERY_TOO_COMPLEX"}, FRAGMENT_FAN_OUT),
    query(
        "selection sets nested past the parser's limit",
        {"GRAPHQL_PARSE_FAILED", "QUERY_TOO_COMPLEX"},
        "{ models " + _nested("{ layers ", "{ index }", " }", 1200) + " }",
    ),
    query(
        "list literal nested past the parser's limit",
        {"GRAPHQL_PARSE_FAILED", "QUERY_TOO_COMPLEX"},
        "{ nodes(ids: " + _nested("[", '"x"', "]", 2400) + ") { id } }",
    ),
    query(
        "introspection of introspection",
        {OK, "QUERY_TOO_COMPLEX", "GRAPHQL_VALIDATION_FAILED"},
        "{ __schema { types { fields { type { "
        + _nested("ofType { ", "name", " }", 30)
        + " } } } } }",
    ),
    query(
        "introspection fan-out (fields of types of fields ...)",
        {"QUERY_TOO_COMPLEX", "GRAPHQL_VALIDATION_FAILED"},
        "{ __schema { types { " + _nested("fields { type { ", "name", " } }", 8) + " } } }",
    ),
    query(
        "introspection aliases",
        {OK, "QUERY_TOO_COMPLEX"},
        "{ "
        + " ".join(f"s{i}: __schema {{ types {{ name fields {{ name }} }} }}" for i in range(60))
        + " }",
    ),
    query(
        "a thousand operations",
        {"QUERY_TOO_COMPLEX", "GRAPHQL_VALIDATION_FAILED"},
        " ".join(f"query Q{i} {{ models {{ name }} }}" for i in range(1000)),
    ),
    query(
        "directive repeated thousands of times",
        {"QUERY_TOO_COMPLEX", "GRAPHQL_VALIDATION_FAILED"},
        "{ models" + " @include(if: true)" * 3000 + " { name } }",
    ),
    # Huge lists.
    query(
        "100k ids to nodes",
        {"INVALID_ARGUMENT", "QUERY_TOO_COMPLEX", "REQUEST_TOO_LARGE"},
        NODES,
        ids=["small/mlp_neuron/0/1"] * 100_000,
    ),
    query(
        "one id over the nodes limit",
        {"INVALID_ARGUMENT", "QUERY_TOO_COMPLEX"},
        NODES,
        ids=["small/mlp_neuron/0/1"] * (LIMITS.max_nodes_per_request + 1),
    ),
    query(
        "100k prompts to inferBatch",
        {"INVALID_ARGUMENT", "QUERY_TOO_COMPLEX", "REQUEST_TOO_LARGE"},
        BATCH,
        i=[{"prompt": "hi"}] * 100_000,
    ),
    query(
        "100k representations to _entities",
        {"INVALID_ARGUMENT", "QUERY_TOO_COMPLEX", "REQUEST_TOO_LARGE"},
        ENTITIES,
        r=[{"__typename": "Node", "id": "small/mlp_neuron/0/1"}] * 100_000,
    ),
    raw(
        "lists nested 500 deep in variables",
        {"BAD_USER_INPUT"},
        orjson.dumps({"query": NODES})[:-1]
        + b', "variables": {"ids": '
        + b"[" * 500
        + b"]" * 500
        + b"}}",
        "application/json",
    ),
    raw(
        "lists nested 100k deep in the JSON body",
        ANY_CODE,
        b'{"query": "query($ids: [ID!]!) { nodes(ids: $ids) { id } }", "variables": {"ids": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}}",
        "application/json",
    ),
    raw(
        "objects nested 100k deep in the JSON body",
        ANY_CODE,
        b'{"query": "{ models { name } }", "variables": {"v": '
        + b'{"a": ' * 100_000
        + b"1"
        + b"}" * 100_000
        + b"}}",
        "application/json",
    ),
    # Numbers GraphQL cannot carry, and numbers too large to use.
    query(
        "NaN literal",
        {"GRAPHQL_VALIDATION_FAILED"},
        ABLATE.replace("query($v: Float!) ", "").replace("$v", "NaN"),
    ),
    raw(
        "NaN in JSON variables",
        # Not JSON (RFC 8259) or past what it can carry: refused as a bad request.
        {"BAD_REQUEST"},
        orjson.dumps({"query": ABLATE})[:-1] + b', "variables": {"v": NaN}}',
        "application/json",
    ),
    raw(
        "Infinity in JSON variables",
        # Not JSON (RFC 8259) or past what it can carry: refused as a bad request.
        {"BAD_REQUEST"},
        orjson.dumps({"query": ABLATE})[:-1] + b', "variables": {"v": -Infinity}}',
        "application/json",
    ),
    raw(
        "1e400 in JSON variables",
        # Not JSON (RFC 8259) or past what it can carry: refused as a bad request.
        {"BAD_REQUEST"},
        orjson.dumps({"query": ABLATE})[:-1] + b', "variables": {"v": 1e400}}',
        "application/json",
    ),
    query(
        "1e400 literal",
        {"INVALID_ARGUMENT"},
        ABLATE.replace("query($v: Float!) ", "").replace("$v", "1e400"),
    ),
    query("ablation value beyond float32", {"INVALID_ARGUMENT"}, ABLATE, v=1.7e308),
    query("ablation value that overflows the pass", {"INVALID_ARGUMENT"}, ABLATE, v=1e30),
    query(
        "steering strength beyond float32",
        {"INVALID_ARGUMENT"},
        'query($s: Float!) { model(name: "small") { generate(input: {prompt: "hi", maxTokens: 2, '
        'steering: [{nodeId: "small/mlp_neuron/0/1", strength: $s}]}) { steered { text } } } }',
        s=1e308,
    ),
    query(
        "temperature and topP at the edges of float",
        {OK},
        '{ model(name: "small") { a: generate(input: {prompt: "hi", maxTokens: 2, '
        "temperature: 1e-308, topP: 1e-308}) { unsteered { text } } "
        'b: generate(input: {prompt: "hi", maxTokens: 2, temperature: 1e308}) '
        "{ unsteered { text } } } }",
    ),
    raw(
        "an integer of 5000 digits in JSON",
        # Not JSON (RFC 8259) or past what it can carry: refused as a bad request.
        {"BAD_REQUEST"},
        b'{"query": "query($i: Int!) { model(name: \\"small\\") { layer(index: $i) { index } } }",'
        b' "variables": {"i": 1' + b"0" * 5000 + b"}}",
        "application/json",
    ),
    query(
        "Int literal beyond 32 bits",
        {"GRAPHQL_VALIDATION_FAILED"},
        '{ model(name: "small") { layer(index: 99999999999999999999) { index } } }',
    ),
    query(
        "Int bounds as arguments",
        {"INVALID_ARGUMENT"},
        '{ model(name: "small") { infer(input: {prompt: "hi"}) { '
        "topNodes(group: ACTIVATION, k: 2147483647, tokenIndex: -2147483648) { tokenSums } } } }",
    ),
    # Megabyte strings.
    query("1 MB prompt", {"PROMPT_TOO_LONG"}, INFER, p="x" * MB),
    query("1 MB of spaces as a prompt", {"PROMPT_TOO_LONG"}, INFER, p=" " * MB),
    query(
        "1 MB node id",
        {"INVALID_NODE"},
        "query($i: ID!) { node(id: $i) { id } }",
        i="small/mlp_neuron/0/" + "9" * MB,
    ),
    query(
        "1 MB text to tokenize",
        {"PROMPT_TOO_LONG"},
        'query($t: String!) { model(name: "small") { tokenize(text: $t) { id } } }',
        t="ab " * (MB // 3),
    ),
    query(
        "1 MB search text",
        {"INVALID_ARGUMENT"},
        "query($t: String!) { searchNodes(text: $t) { totalCount } }",
        t="word " * (MB // 5),
    ),
    query("unknown fragment", {"GRAPHQL_VALIDATION_FAILED"}, "{ ...Missing }"),
    query(
        "objective of a one-token prompt",
        {OK},
        '{ model(name: "small") { infer(input: {prompt: "x"}) { loss objective } } }',
    ),
    query(
        "NUL inside search text",
        {OK},
        "query($t: String!) { searchNodes(text: $t) { totalCount } }",
        t="import\0def",
    ),
    query("1 MB of whitespace in the query", {OK}, "{ models { name } }" + " " * MB),
    query("1 MB comment in the query", {OK}, "{ models { name } }\n#" + "x" * MB),
    query(
        "1 MB string literal in the query",
        {"MODEL_NOT_FOUND", "INVALID_ARGUMENT"},
        '{ model(name: "' + "x" * MB + '") { name } }',
    ),
    query(
        "3 MB prompt",
        {"REQUEST_TOO_LARGE", "PROMPT_TOO_LONG"},
        INFER,
        p="x" * (3 * MB),
    ),
    # Encodings.
    raw(
        "invalid UTF-8 in the body",
        ANY_CODE,
        b'{"query": "{ models { name } }\xff\xfe"}',
        "application/json",
    ),
    raw(
        "invalid UTF-8 in a prompt",
        ANY_CODE,
        b'{"query": "query($p: String!) { model(name: \\"small\\") { infer(input: {prompt: $p})'
        b' { loss } } }", "variables": {"p": "ab\xc3\x28\xff"}}',
        "application/json",
    ),
    raw(
        "a lone surrogate in a prompt",
        # An unpaired surrogate has no UTF-8 form: refused as a bad request.
        {"BAD_REQUEST"},
        b'{"query": "query($p: String!) { model(name: \\"small\\") { infer(input: {prompt: $p})'
        b' { loss tokens { text } } } }", "variables": {"p": "ab\\ud800cd"}}',
        "application/json",
    ),
    query("NUL characters in a prompt", {OK}, INFER, p="a\x00b\x00"),
    raw(
        "UTF-16 body",
        {OK, *ANY_CODE},
        '{"query": "{ models { name } }"}'.encode("utf-16"),
        "application/json",
    ),
    # Wrong types.
    query(
        "string for an Int variable",
        {"BAD_USER_INPUT"},
        'query($i: Int!) { model(name: "small") { layer(index: $i) { index } } }',
        i="x",
    ),
    query(
        "object for an Int variable",
        {"BAD_USER_INPUT"},
        'query($i: Int!) { model(name: "small") { layer(index: $i) { index } } }',
        i={"a": [1]},
    ),
    query("booleans and nulls as ids", {"BAD_USER_INPUT"}, NODES, ids=[True, None, 1.5]),
    query("null for a required variable", {"BAD_USER_INPUT"}, INFER, p=None),
    query(
        "string literal for an Int argument",
        {"GRAPHQL_VALIDATION_FAILED"},
        '{ model(name: "small") { layer(index: "0") { index } } }',
    ),
    query(
        "unknown enum value",
        {"GRAPHQL_VALIDATION_FAILED"},
        '{ model(name: "small") { node(layer: 0, kind: NEURONS, index: 0) { id } } }',
    ),
    query(
        "malformed _entities representations",
        {"BAD_USER_INPUT", "INVALID_ARGUMENT", "GRAPHQL_VALIDATION_FAILED"},
        ENTITIES,
        r=[{"__typename": "Nope"}, {}, "x", 1, {"__typename": "Layer", "index": 0}],
    ),
    query(
        "entity representations with keys of the wrong type",
        {"INVALID_ARGUMENT", "INVALID_NODE", "MODEL_NOT_FOUND"},
        ENTITIES,
        r=[{"__typename": "Model", "name": {"a": 1}}, {"__typename": "Node", "id": [5]}],
    ),
    # Bodies that are not a GraphQL request.
    raw("not JSON", ANY_CODE, b"this is not json", "application/json"),
    raw("empty body", ANY_CODE, b"", "application/json"),
    raw("JSON null", ANY_CODE, b"null", "application/json"),
    raw("JSON string", ANY_CODE, b'"{ models { name } }"', "application/json"),
    raw("JSON number", ANY_CODE, b"42", "application/json"),
    post("batched array (batching is off)", ANY_CODE, [{"query": "{ models { name } }"}] * 2),
    post("no query", ANY_CODE, {"variables": {}}),
    post("query that is not a string", ANY_CODE, {"query": 123}),
    post("variables that are a list", ANY_CODE, {"query": INFER, "variables": [1, 2]}),
    post(
        "extensions that are a list", ANY_CODE, {"query": "{ models { name } }", "extensions": [1]}
    ),
    post(
        "unknown operationName",
        ANY_CODE,
        {
            "query": "query A { models { name } } query B { models { nLayers } }",
            "operationName": "C",
        },
    ),
    post(
        "operationName that is not a string",
        ANY_CODE,
        {"query": "query A { models { name } }", "operationName": 5},
    ),
    post(
        "subscription over plain POST",
        ANY_CODE,
        {
            "query": 'subscription { generate(model: "small", input: {prompt: "hi", maxTokens: 2}) '
            "{ step } }"
        },
    ),
    # Content types.
    raw("text/plain", ANY_CODE, b'{"query": "{ models { name } }"}', "text/plain"),
    raw("no content type", ANY_CODE, b'{"query": "{ models { name } }"}', None),
    raw("XML", ANY_CODE, b"<query>{ models { name } }</query>", "application/xml"),
    raw(
        "form-urlencoded",
        ANY_CODE,
        b"query=%7B+models+%7B+name+%7D+%7D",
        "application/x-www-form-urlencoded",
    ),
    raw(
        "multipart garbage", ANY_CODE, b"--xx\r\nfoo\r\n--xx--", "multipart/form-data; boundary=xx"
    ),
    raw("multipart without a boundary", ANY_CODE, b"garbage", "multipart/form-data"),
    raw("application/graphql", {OK, *ANY_CODE}, b"{ models { name } }", "application/graphql"),
    # Requests from elsewhere.
    Case(
        "a foreign Host header (DNS rebinding)",
        frozenset({"HOST_NOT_ALLOWED"}),
        orjson.dumps({"query": "{ models { name } }"}),
        headers={"Host": "evil.example"},
    ),
    Case(
        "a loopback address inside a foreign name",
        frozenset({"HOST_NOT_ALLOWED"}),
        orjson.dumps({"query": "{ models { name } }"}),
        headers={"Host": "127.0.0.1.evil.example:8000"},
    ),
    query(
        "a job id that is another key's or nobody's",
        {"JOB_NOT_FOUND"},
        "query($i: ID!) { job(id: $i) { status result { text } } }",
        i="job-" + "0" * 32,
    ),
    query(
        "a prompt of dense text (costed as it tokenizes)",
        {"PROMPT_TOO_LONG"},
        INFER,
        p="注意力机制" * 40,
    ),
    query(
        "a misspelt field (its error names no schema)",
        {"GRAPHQL_VALIDATION_FAILED"},
        '{ model(name: "small") { nLayer } }',
    ),
    # GET.
    Case(
        "GET with a 60 kB query string",
        frozenset({OK, "QUERY_TOO_COMPLEX"}),
        method="GET",
        # "+" for each space: the whole URL must stay under the client's 64 kB.
        query_string="query=" + "+" * 60_000 + quote("{ models { name } }"),
    ),
    Case(
        "GET with a mutation",
        ANY_CODE,
        method="GET",
        query_string="query=" + quote('mutation { explainNode(nodeId: "x") { id } }'),
    ),
    Case(
        "GET with variables that are not JSON",
        ANY_CODE,
        method="GET",
        query_string="query=" + quote("{ models { name } }") + "&variables=%7Bbad",
    ),
]
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"


def problems_with(case: Case, status: int, content: bytes, elapsed_s: float) -> list[str]:
    """What is wrong with this answer to `case` (nothing: an empty list)."""
    found = []
    text = content.decode("utf-8", "replace")
    if elapsed_s > DEADLINE_S:
        found.append(f"answered after {elapsed_s:.1f} s (deadline {DEADLINE_S:g} s)")
    if status >= 500:
        found.append(f"HTTP {status}")
    leak = leaked_internals(text, case.body.decode("utf-8", "replace") + case.query_string)
    if leak is not None:
        found.append(f"internals in the body ({leak!r})")
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return [*found, f"HTTP {status} with a body that is not JSON: {text[:160]!r}"]
    if not isinstance(body, dict):
        return [*found, f"HTTP {status} with JSON that is not an object: {text[:160]!r}"]
    errors = body.get("errors") or []
    codes = [(e.get("extensions") or {}).get("code") if isinstance(e, dict) else e for e in errors]
    if not errors:
        if OK not in case.expect:
            found.append(
                f"HTTP {status}, answered without an error; expected {sorted(case.expect)}"
            )
        elif status != 200:
            found.append(f"HTTP {status} for an answer")
        return found
    unexpected = [c for c in codes if c not in case.expect or c not in ALLOWED]
    if unexpected:
        wanted = "a documented code" if case.expect >= ALLOWED else sorted(case.expect - {OK})
        found.append(
            f"HTTP {status}, codes {unexpected} (of {codes}); expected {wanted}: "
            f"{errors[0].get('message', '')[:160]!r}"
        )
    return found


# In-process: the whole corpus.


@pytest.fixture(scope="module")
async def app_client(registry: ModelRegistry) -> AsyncIterator[httpx.AsyncClient]:
    # A 500 from the app comes back as a response, to be reported like any other answer.
    transport = httpx.ASGITransport(
        app=create_app(registry, Settings()), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", timeout=DEADLINE_S * 2
    ) as client:
        yield client


async def send(client: httpx.AsyncClient, case: Case) -> tuple[httpx.Response, float]:
    headers = dict(case.headers)
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    request = client.build_request(
        case.method,
        "/graphql" + (f"?{case.query_string}" if case.query_string else ""),
        content=case.body if case.method == "POST" else None,
        headers=headers,
    )
    if case.content_type is None:
        request.headers.pop("content-type", None)
    started = time.perf_counter()
    response = await asyncio.wait_for(client.send(request), DEADLINE_S * 2)
    return response, time.perf_counter() - started


def normal_answer_problems(status: int, content: bytes) -> list[str]:
    try:
        if status == 200 and orjson.loads(content)["data"]["models"]:
            return []
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return [f"a normal query afterwards got HTTP {status}: {content[:160]!r}"]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_hostile_request_in_process(app_client: httpx.AsyncClient, case: Case) -> None:
    response, elapsed = await send(app_client, case)
    problems = problems_with(case, response.status_code, response.content, elapsed)
    after = await app_client.post("/graphql", json={"query": "{ models { name } }"})
    problems += normal_answer_problems(after.status_code, after.content)
    assert not problems, f"{case.id}: " + "; ".join(problems)


async def test_valid_entity_representations_still_resolve(app_client: httpx.AsyncClient) -> None:
    representations = [
        {"__typename": "Model", "name": "small"},
        {"__typename": "Node", "id": "small/attention_head/1/2"},
    ]
    response = await app_client.post(
        "/graphql",
        json={
            "query": "query($r: [_Any!]!) { _entities(representations: $r) { "
            "... on Model { name nLayers } ... on Node { id layerIndex index } } }",
            "variables": {"r": representations},
        },
    )
    body = response.json()
    assert "errors" not in body, body
    assert body["data"]["_entities"] == [
        {"name": "small", "nLayers": 3},
        {"id": "small/attention_head/1/2", "layerIndex": 1, "index": 2},
    ]


# A real server: a subset, plus what only a socket can send. The process must outlive each.

REAL_SERVER_CASES = [
    # Found by an outside audit on a real server (INTERNAL_SERVER_ERROR, a KeyError's repr,
    # a whole answer lost to NaN).
    "NUL inside search text",
    "unknown fragment",
    "objective of a one-token prompt",
    "depth bomb",
    "alias bomb (thousands)",
    "fragment cycle",
    "introspection fan-out (fields of types of fields ...)",
    "100k ids to nodes",
    "100k prompts to inferBatch",
    "lists nested 100k deep in the JSON body",
    "NaN in JSON variables",
    "an integer of 5000 digits in JSON",
    "3 MB prompt",
    "invalid UTF-8 in the body",
    "JSON null",
    "not JSON",
    "batched array (batching is off)",
    "subscription over plain POST",
    "multipart garbage",
    "a foreign Host header (DNS rebinding)",
    "a job id that is another key's or nobody's",
]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: list[bytes]


@pytest.fixture(scope="module")
def real_server() -> Iterator[RunningServer]:
    with serve_process() as (url, process):
        log: list[bytes] = []
        # Drained as it comes, so that a chatty server never blocks on a full pipe.
        assert process.stdout is not None
        stdout = process.stdout
        reader = threading.Thread(target=lambda: log.extend(iter(stdout.readline, b"")))
        reader.start()
        yield RunningServer(url, process, log)
    reader.join(timeout=30)


def demo_case(case: Case, model: str) -> Case:
    """The case with the demo's name for the small model's (ids, queries)."""
    return Case(
        case.id,
        case.expect,
        case.body.replace(b'\\"small\\"', f'\\"{model}\\"'.encode()).replace(
            b"small/", f"{model}/".encode()
        ),
        case.content_type,
        case.method,
        case.query_string,
        case.headers,
    )


def alive_problems(server: RunningServer) -> list[str]:
    if server.process.poll() is not None:
        log = b"".join(server.log[-40:]).decode("utf-8", "replace")
        return [f"the server exited with {server.process.returncode}:\n{log}"]
    health = httpx.get(server.url + "/healthz", timeout=DEADLINE_S)
    if health.status_code != 200:
        return [f"/healthz answered {health.status_code}"]
    answer = httpx.post(
        server.url + "/graphql", json={"query": "{ models { name } }"}, timeout=DEADLINE_S
    )
    return normal_answer_problems(answer.status_code, answer.content)


def demo_model(server: RunningServer) -> str:
    body = httpx.post(server.url + "/graphql", json={"query": "{ models { name } }"}).json()
    name: str = body["data"]["models"][0]["name"]
    return name


@pytest.mark.parametrize("case_id", REAL_SERVER_CASES)
def test_hostile_request_to_a_real_server(real_server: RunningServer, case_id: str) -> None:
    case = demo_case(BY_ID[case_id], demo_model(real_server))
    headers = dict(case.headers)
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    started = time.perf_counter()
    response = httpx.post(
        real_server.url + "/graphql", content=case.body, headers=headers, timeout=DEADLINE_S * 2
    )
    elapsed = time.perf_counter() - started
    problems = problems_with(case, response.status_code, response.content, elapsed)
    problems += alive_problems(real_server)
    assert not problems, f"{case.id}: " + "; ".join(problems)


def test_an_unknown_fragment_is_named_by_a_real_server(real_server: RunningServer) -> None:
    """Its code was right already; its message was the KeyError's repr, "'Missing'"."""
    body = httpx.post(
        real_server.url + "/graphql", json={"query": "{ ...Missing }"}, timeout=DEADLINE_S
    ).json()
    assert [e["message"] for e in body["errors"]] == ["Unknown fragment 'Missing'."]
    assert [e["extensions"]["code"] for e in body["errors"]] == ["GRAPHQL_VALIDATION_FAILED"]


def raw_http(url: str, request: bytes) -> tuple[int, bytes]:
    """Sends bytes as they are (no client library checks them); the status and body."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=DEADLINE_S) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_megabyte_get_request_line(real_server: RunningServer) -> None:
    # Too long for any client library; the HTTP server may refuse it before the app sees it
    # (a 4xx of its own), or the app answers it.
    target = "/graphql?query=" + quote(" " * MB + "{ models { name } }")
    status, body = raw_http(
        real_server.url,
        f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status < 500 and leaked_internals(body.decode("utf-8", "replace")) is None
    if status == 200:
        assert orjson.loads(body)["data"]["models"]
    assert not alive_problems(real_server)


def test_a_body_shorter_than_its_content_length(real_server: RunningServer) -> None:
    # The client gives up half-way: the server must drop the request, not the process.
    parts = urlsplit(real_server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=DEADLINE_S) as sock:
        sock.sendall(
            b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"query": "{ mod'
        )
    assert not alive_problems(real_server)


def test_a_64_kb_header(real_server: RunningServer) -> None:
    payload = b'{"query": "{ models { name } }"}'
    status, body = raw_http(
        real_server.url,
        b"POST /graphql HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + b"k" * 65_536 + b"\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload),
    )
    assert status < 500 and leaked_internals(body.decode("utf-8", "replace")) is None
    assert not alive_problems(real_server)
