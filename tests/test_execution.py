"""The short way through objects of attributes and direct resolvers (schema/execution.py)
answers exactly as strawberry and graphql-core do on their own: the same data and the same
errors, for aliases, fragments, directives, __typename, enums, custom scalars, a null where none
may be, values a scalar refuses, arguments from variables and defaults, nested objects, and
resolvers that raise or answer later."""

from __future__ import annotations

import asyncio
import math
from enum import Enum
from typing import Any

import pytest
import strawberry
from strawberry.extensions import SchemaExtension
from strawberry.types import Info

from interpql.schema.execution import ShortWayExecution, direct, read_plain_fields_directly
from interpql.schema.scalars import SCALARS, FloatArray


@strawberry.enum
class Colour(Enum):
    RED = "red"
    BLUE = "blue"


@strawberry.type
class Item:
    name: str
    score: float | None
    colour: Colour
    values: FloatArray
    label: str  # None in one item: a null where none may be

    @strawberry.field
    def shout(self) -> str:  # a resolver of its own: the ordinary way
        return self.name.upper()

    @strawberry.field
    @direct
    def repeated(self, info: Info, times: int = 2, sep: str = "") -> str:
        if times < 0:
            raise ValueError("times must be at least 0")
        return sep.join([self.name] * times) + info.context["suffix"]

    @strawberry.field
    @direct
    def parts(self, first: int = 10) -> list[Part]:
        return [Part(text=c, weight=float(i)) for i, c in enumerate(self.label or "-")][:first]

    @strawberry.field
    @direct
    def best(self) -> Part | None:
        return None if self.score is None else Part(text=self.name, weight=self.score)

    @strawberry.field
    @direct
    def must(self) -> Part:  # null for an item without a label: the item's list fails
        return Part(text=self.label, weight=0.0) if self.label else None  # type: ignore[return-value]

    @strawberry.field
    @direct
    def later(self) -> str:  # an awaitable in the async runs: the ordinary way awaits it
        if ASYNC_LATER:
            return _ready(self.name)  # type: ignore[return-value]
        return self.name


@strawberry.type
class Part:
    text: str
    weight: float


ASYNC_LATER = False


class _ready:
    """An awaitable that may be dropped, like resolvers/node_data.py's."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __await__(self) -> Any:
        yield from asyncio.sleep(0).__await__()
        return self.value


ITEMS = [
    Item(name="a", score=0.5, colour=Colour.RED, values=FloatArray([1.0, 2.5]), label="x"),
    Item(name="b", score=None, colour=Colour.BLUE, values=FloatArray([]), label="y"),
    Item(name="c", score=math.nan, colour=Colour.RED, values=FloatArray([3.0]), label="z"),
    Item(name="d", score=1.0, colour=Colour.BLUE, values=FloatArray([0.0]), label=None),  # type: ignore[arg-type]
]


@strawberry.type
class Query:
    @strawberry.field
    def items(self, first: int = 10) -> list[Item]:
        return ITEMS[:first]

    @strawberry.field
    def good(self) -> list[Item]:
        return ITEMS[:2]


def schemas() -> tuple[strawberry.Schema, strawberry.Schema]:
    plain = strawberry.Schema(query=Query, scalar_overrides=SCALARS)
    ours = strawberry.Schema(
        query=Query, scalar_overrides=SCALARS, execution_context_class=ShortWayExecution
    )
    read_plain_fields_directly(ours)
    return plain, ours


CONTEXT = {"suffix": "!"}


def answer(schema: strawberry.Schema, query: str, variables: dict[str, Any]) -> Any:
    result = schema.execute_sync(query, variable_values=variables, context_value=CONTEXT)
    errors = sorted((e.message, tuple(e.path or ())) for e in result.errors or [])
    return result.data, errors


QUERIES = [
    "{ good { name score colour values label } }",
    "{ good { n: name name2: name __typename t: __typename } }",
    "{ good { ...F } } fragment F on Item { name colour }",
    "{ good { ... on Item { name score } label } }",
    "query($s: Boolean!) { good { name score @skip(if: $s) label @include(if: $s) } }",
    "{ good { name shout } }",  # one field with a resolver: the ordinary way for that object
    "{ items { name score } }",  # NaN: Float refuses it
    "{ items { name label } }",  # a null in a non-null field: the item's list fails
    "{ items(first: 3) { colour values } }",
    '{ good { repeated r3: repeated(times: 3, sep: "-") } }',
    "query($t: Int!) { items { name repeated(times: $t) } }",  # -1: a resolver that raises
    "{ items { parts(first: 2) { text weight } best { text weight __typename } } }",
    "{ items { name must { text } } }",
    "{ items(first: 3) { best { weight } } }",  # NaN inside a nested object
    "{ good { parts { text } shout } }",
    "{ good { later name } }",
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("skip", [True, False])
def test_answers_and_errors_are_those_of_the_ordinary_way(query: str, skip: bool) -> None:
    plain, ours = schemas()
    variables = {"s": skip, "t": -1 if skip else 2}
    expected = answer(plain, query, variables)
    assert answer(ours, query, variables) == expected
    if "items" in query and ("score" in query or "label" in query or "must" in query):
        assert expected[1], "the case meant to fail did not"


@pytest.mark.parametrize("query", QUERIES)
def test_answers_later_are_those_of_the_ordinary_way(
    query: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.ASYNC_LATER", True)
    plain, ours = schemas()

    async def run(schema: strawberry.Schema) -> Any:
        result = await schema.execute(
            query, variable_values={"s": False, "t": 2}, context_value=CONTEXT
        )
        return result.data, sorted((e.message, tuple(e.path or ())) for e in result.errors or [])

    assert asyncio.run(run(ours)) == asyncio.run(run(plain))


def test_the_short_way_is_taken() -> None:
    _, ours = schemas()
    seen: list[Any] = []

    class Counting(ShortWayExecution):
        def _plan(self, *args: Any) -> Any:
            plan = super()._plan(*args)
            seen.append(plan is not None)
            return plan

    ours.execution_context_class = Counting
    ours.execute_sync("{ good { name score } }")
    assert seen == [True, True]
    seen.clear()
    ours.execute_sync("{ good { name shout } }")
    assert seen == [False, False]
    seen.clear()
    ours.execute_sync("{ good { repeated(times: 1) parts { text } } }", context_value=CONTEXT)
    assert all(seen) and len(seen) >= 2


def test_resolver_wrapping_extensions_see_every_direct_resolver() -> None:
    calls: list[str] = []

    class Tracing(SchemaExtension):
        def resolve(self, _next: Any, root: Any, info: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(info.field_name)
            return _next(root, info, *args, **kwargs)

    schema = strawberry.Schema(
        query=Query,
        scalar_overrides=SCALARS,
        execution_context_class=ShortWayExecution,
        extensions=[Tracing],
    )
    read_plain_fields_directly(schema)
    result = schema.execute_sync("{ good { name repeated } }", context_value=CONTEXT)
    assert result.data == {
        "good": [{"name": "a", "repeated": "aa!"}, {"name": "b", "repeated": "bb!"}]
    }
    assert calls.count("repeated") == 2


@strawberry.type
class Bad:
    @strawberry.field
    @direct
    async def slow(self) -> str:
        return ""


@strawberry.type
class BadQuery:
    bad: Bad


def test_a_direct_resolver_must_be_plain() -> None:
    schema = strawberry.Schema(query=BadQuery, execution_context_class=ShortWayExecution)
    with pytest.raises(TypeError, match=r"Bad\.slow is marked direct"):
        read_plain_fields_directly(schema)
