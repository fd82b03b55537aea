"""GraphQL fuzzing with schemathesis: queries and mutations generated from the schema (random
selections, arguments and input objects, nulls where allowed) against the ASGI app over the
small model.

Typed errors are the expected answer to most generated arguments (a layer of -460751900, a
node id of "Hꐙ쭏"), so schemathesis' own checks, which count any error with a `path` as a server
error, are replaced by ours: no 5xx, a JSON object, every error with a documented
`extensions.code` other than INTERNAL_SERVER_ERROR, and no trace of internals. Dictionaries of
real names and ids make a share of the arguments valid, so resolvers run past their checks.
Generation is derandomized: the same cases every run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok
from schemathesis.specs.graphql.schemas import GraphQLSchema
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.load import documented_codes, leaked_internals
from interpql.loaders.auth import ApiKeys
from interpql.loaders.registry import ModelRegistry
from interpql.resolvers.context import Services
from interpql.schema.build import build_schema
from interpql.server import create_app
from interpql.settings import Settings

EXAMPLES_PER_OPERATION = 150
API_KEY = "fuzz-key"
ALLOWED = documented_codes() - {"INTERNAL_SERVER_ERROR"}

# Valid values, drawn for an argument with the given probability instead of a random one.
DICTIONARIES = {
    "models": {"values": ["small"]},
    "nodes": {
        "values": [
            "small/mlp_neuron/1/2",
            "small/attention_head/0/1",
            "small/residual_channel/2/5",
            "small/mlp_neuron/2/79",
        ]
    },
    "prompts": {"values": ["hello world", "def f(x):\n    return x", "a", " the cat sat"]},
    "small_ints": {"values": [0, 1, 2, 3, 5, 10]},
    "words": {"values": ["python", "token", "def"]},
}
BINDINGS = {
    "*.model.name": ("models", 0.8),
    "*.*.model": ("models", 0.5),
    "*.node.id": ("nodes", 0.7),
    "*.*.nodeId": ("nodes", 0.7),
    "*.*.ids[*]": ("nodes", 0.8),
    "*.*.nodeIds[*]": ("nodes", 0.8),
    "*.*.input.prompt": ("prompts", 0.7),
    "*.*.inputs[*].prompt": ("prompts", 0.7),
    "*.*.prompt": ("prompts", 0.7),
    "*.*.text": ("words", 0.5),
}


def config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "dictionaries": DICTIONARIES,
            "parameters": {
                key: {"dictionary": name, "probability": probability}
                for key, (name, probability) in BINDINGS.items()
            },
            "generation": {
                "max-examples": EXAMPLES_PER_OPERATION,
                "deterministic": True,
                # Int arguments: a layer, a k, a token index, more often small than not.
                "dictionaries": {"integer": {"dictionary": "small_ints", "probability": 0.5}},
            },
        }
    )


def operation_labels() -> list[str]:
    schema = build_schema()._schema
    labels = []
    for root in (schema.query_type, schema.mutation_type):
        assert root is not None
        # Federation's fields are for gateways; schemathesis leaves them out too.
        labels += [f"{root.name}.{name}" for name in root.fields if not name.startswith("_")]
    return labels


OPERATIONS = operation_labels()


def without_lifespan(app: ASGIApp) -> ASGIApp:
    """The app, answering lifespan events without running its own: schemathesis ends an app's
    lifespan after each test, and ours would close the session's shared registry."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    return wrapped


@pytest.fixture(scope="module")
def fuzz_schema(registry: ModelRegistry) -> GraphQLSchema:
    # schemathesis calls the app as Starlette's test client does, addressed to "testserver".
    settings = Settings(allowed_hosts=(*Settings().allowed_hosts, "testserver"))
    services = Services(registry, settings, api_keys=ApiKeys([API_KEY]))
    app = without_lifespan(create_app(services))
    return schemathesis.graphql.from_asgi("/graphql", app, config=config())


def test_every_operation_is_fuzzed(fuzz_schema: GraphQLSchema) -> None:
    results = list(fuzz_schema.get_all_operations())
    labels = [result.ok().label for result in results if isinstance(result, Ok)]
    assert len(labels) == len(results), [r for r in results if not isinstance(r, Ok)]
    assert sorted(labels) == sorted(OPERATIONS)


def problems_with(status: int, content: bytes, sent: str) -> tuple[list[str], list[str]]:
    """What is wrong with the answer to `sent`, and its error codes."""
    text = content.decode("utf-8", "replace")
    problems = []
    if status >= 500:
        problems.append(f"HTTP {status}")
    leak = leaked_internals(text, sent)
    if leak is not None:
        problems.append(f"internals in the body ({leak!r})")
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return [*problems, f"not JSON: {text[:200]!r}"], []
    if not isinstance(body, dict):
        return [*problems, f"not a JSON object: {text[:200]!r}"], []
    errors = body.get("errors") or []
    codes = [str((e.get("extensions") or {}).get("code")) for e in errors]
    unexpected = [
        (code, e.get("message"))
        for code, e in zip(codes, errors, strict=True)
        if code not in ALLOWED
    ]
    if unexpected:
        problems.append(f"undocumented or internal error codes: {unexpected}")
    return problems, codes


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzzed_operation(fuzz_schema: GraphQLSchema, label: str) -> None:
    operation = fuzz_schema.find_operation_by_label(label)
    assert operation is not None, label
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(), anonymous=st.booleans())
    def check(case: Any, anonymous: bool) -> None:
        headers = {} if anonymous else {"Authorization": f"Bearer {API_KEY}"}
        response = case.call(headers=headers)
        problems, codes = problems_with(response.status_code, response.content, str(case.body))
        assert not problems, f"{label}: {'; '.join(problems)}\nquery: {case.body}"
        outcomes.update(codes or ["ok"])

    check()
    print(label, dict(outcomes))
    # The dictionaries get some requests past every check (jobs and searches by a typed error
    # of their own at least: there are none to find, and no records to explain; a fuzzed
    # Neuronpedia source, `<layer>-<set>`, hardly ever names a layer and set that exist).
    # An attribution graph needs a transcoder set's exact name, and a kept graph's id.
    typed_only = {
        "Query.job",
        "Query.searchNodes",
        "Query.neuronpediaFeature",
        "Query.attributionGraph",
        "Mutation.startAttributionGraph",
    }
    assert outcomes["ok"] or label in typed_only, dict(outcomes)
