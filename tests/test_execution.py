"""The short way through attribute-only objects (schema/execution.py) answers exactly as
strawberry and graphql-core do on their own: the same data and the same errors, for aliases,
fragments, directives, __typename, enums, custom scalars, a null where none may be and values a
scalar refuses."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import pytest
import strawberry

from interpql.schema.execution import LeafObjectsExecution, read_plain_fields_directly
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
        query=Query, scalar_overrides=SCALARS, execution_context_class=LeafObjectsExecution
    )
    read_plain_fields_directly(ours)
    return plain, ours


def answer(schema: strawberry.Schema, query: str, variables: dict[str, Any]) -> Any:
    result = schema.execute_sync(query, variable_values=variables)
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
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("skip", [True, False])
def test_answers_and_errors_are_those_of_the_ordinary_way(query: str, skip: bool) -> None:
    plain, ours = schemas()
    expected = answer(plain, query, {"s": skip})
    assert answer(ours, query, {"s": skip}) == expected
    if "items" in query and ("score" in query or "label" in query):
        assert expected[1], "the case meant to fail did not"


def test_the_short_way_is_taken() -> None:
    _, ours = schemas()
    seen: list[Any] = []

    class Counting(LeafObjectsExecution):
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
