"""With introspection off, the schema leaks by no other door: federation's `_service { sdl }` is
refused, and errors stop suggesting names. Checked on a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.processes import serve

MISSPELT = [
    "{ modls { name } }",
    '{ model(name: "x") { nLayer } }',
    '{ model(name: "x") { layer(index: 0) { nodes(kind: MLP_NEURONS) { totalCount } } } }',
]
ENUM_VARIABLE = (
    "query($k: NodeKind!) { models { layer(index: 0) { nodes(kind: $k) { totalCount } } } }"
)


def post(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = httpx.post(url + "/graphql", json={"query": query, "variables": variables or {}})
    body: dict[str, Any] = response.json()
    return body


def codes(body: dict[str, Any]) -> list[str]:
    return [e["extensions"]["code"] for e in body.get("errors", [])]


@pytest.fixture(scope="module")
def closed() -> Iterator[str]:
    with serve("--model", "random:tiny", "--no-model", "--no-introspection") as url:
        yield url


@pytest.fixture(scope="module")
def open_server() -> Iterator[str]:
    with serve("--model", "random:tiny", "--no-model") as url:
        yield url


def test_service_sdl_is_refused_with_introspection(closed: str) -> None:
    for query in (
        "{ _service { sdl } }",
        "{ __schema { types { name } } }",
        "{ a: _service { sdl } }",
    ):
        body = post(closed, query)
        assert body.get("data") is None and "INTROSPECTION_DISABLED" in codes(body), body
        assert "type Query" not in json.dumps(body)
    assert post(closed, "{ models { name } }")["data"] == {"models": [{"name": "random-tiny"}]}


def test_errors_suggest_nothing_with_introspection_off(closed: str, open_server: str) -> None:
    for query in MISSPELT:
        hidden, shown = post(closed, query), post(open_server, query)
        assert codes(hidden) == codes(shown) == ["GRAPHQL_VALIDATION_FAILED"], (hidden, shown)
        assert "Did you mean" in shown["errors"][0]["message"]
        assert "Did you mean" not in hidden["errors"][0]["message"]
        assert hidden["errors"][0]["message"] == shown["errors"][0]["message"].split(" Did you")[0]
    hidden = post(closed, ENUM_VARIABLE, {"k": "MLP_NEURONS"})
    shown = post(open_server, ENUM_VARIABLE, {"k": "MLP_NEURONS"})
    assert codes(hidden) == codes(shown) == ["BAD_USER_INPUT"]
    assert "MLP_NEURON'" in shown["errors"][0]["message"]
    assert "MLP_NEURON'" not in hidden["errors"][0]["message"]


def test_service_sdl_is_served_with_introspection_on(open_server: str) -> None:
    sdl = post(open_server, "{ _service { sdl } }")["data"]["_service"]["sdl"]
    assert "type Query" in sdl
