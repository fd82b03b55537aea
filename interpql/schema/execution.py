"""How operations execute: graphql-core's executor, with a short way through objects whose
selected fields are all plain attributes.

A 1,000-node lookup completes ~7,000 objects (examples, explanations) of two leaf fields each;
graphql-core spends several calls per field on them (resolve, complete, coerce, error
handling), most of the lookup's time. An object whose selection is only leaf fields read by
`attribute` (strawberry's fields without a resolver, and `__typename`), with no arguments and no
@defer, is completed here in one loop: the same values, coerced by the same scalar types. Where
anything is unusual (a null in a non-null field, a value the scalar refuses) the object goes the
ordinary way, which reports the error as graphql-core would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import strawberry
from graphql import (
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLResolveInfo,
    Undefined,
    is_leaf_type,
)
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

# Marks the resolver `attribute` builds, with the attribute it reads.
ATTRIBUTE = "_interpql_attribute"


def attribute(python_name: str) -> Callable[..., Any]:
    """graphql-core's resolver for a field that is the source's attribute `python_name`."""

    def read(source: Any, _info: Any) -> Any:
        return getattr(source, python_name)

    setattr(read, ATTRIBUTE, python_name)
    read._is_default = True  # type: ignore[attr-defined]  # strawberry's mark: traced as no work
    return read


def read_plain_fields_directly(schema: strawberry.Schema) -> None:
    """A field without a resolver is an attribute of its object: strawberry reads it through
    three calls (its wrapper, `get_result`, the config's default resolver, which is getattr);
    with `attribute` graphql-core calls getattr itself, and objects of such leaves alone are
    completed in one loop (LeafObjectsExecution)."""
    for name, concrete in schema.schema_converter.type_map.items():
        definition = getattr(concrete, "definition", None)
        graphql_type: Any = schema._schema.type_map.get(name)
        if definition is None or not hasattr(graphql_type, "fields") or definition.is_input:
            continue
        for field in definition.fields:
            graphql_name = schema.config.name_converter.get_graphql_name(field)
            if field.is_basic_field and graphql_name in graphql_type.fields:
                graphql_type.fields[graphql_name].resolve = attribute(field.python_name)


class _Leaf(NamedTuple):
    key: str  # the response key (the alias, else the field's name)
    attribute: str | None  # None: __typename
    coerce: Callable[[Any], Any]
    non_null: bool


class LeafObjectsExecution(StrawberryGraphQLCoreExecutionContext):
    """strawberry's execution context, completing attribute-only objects in one loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[tuple[GraphQLObjectType, int], tuple[Any, list[_Leaf] | None]] = {}

    def complete_object_value(
        self,
        return_type: GraphQLObjectType,
        field_details_list: Any,
        info: GraphQLResolveInfo[Any],
        path: Any,
        result: Any,
        position_context: Any,
    ) -> Any:
        plan = self._plan(return_type, field_details_list)
        if plan is not None and not return_type.is_type_of:
            completed = _complete(plan, return_type.name, result)
            if completed is not None:
                return completed
        return super().complete_object_value(
            return_type, field_details_list, info, path, result, position_context
        )

    def _plan(self, return_type: GraphQLObjectType, field_details_list: Any) -> list[_Leaf] | None:
        key = (return_type, id(field_details_list))
        found = self._plans.get(key)
        if found is None:
            # The list is kept with its plan, so that its id is not reused while this runs.
            found = (field_details_list, _leaf_plan(self, return_type, field_details_list))
            self._plans[key] = found
        return found[1]


def _leaf_plan(
    executor: StrawberryGraphQLCoreExecutionContext,
    return_type: GraphQLObjectType,
    field_details_list: Any,
) -> list[_Leaf] | None:
    grouped, new_defer_usages, _ = executor.collect_subfields(return_type, field_details_list)
    if new_defer_usages:
        return None
    plan = []
    for key, details in grouped.items():
        node = details[0].node
        if any(d.defer_usage is not None or d.node.arguments for d in details):
            return None
        name = node.name.value
        if name == "__typename":
            plan.append(_Leaf(key, None, str, True))
            continue
        field = return_type.fields.get(name)
        python_name = getattr(field.resolve, ATTRIBUTE, None) if field is not None else None
        if field is None or python_name is None:
            return None
        non_null = isinstance(field.type, GraphQLNonNull)
        leaf = field.type.of_type if non_null else field.type
        if not is_leaf_type(leaf):
            return None
        plan.append(_Leaf(key, python_name, leaf.coerce_output_value, non_null))
    return plan


def _complete(plan: list[_Leaf], type_name: str, source: Any) -> dict[str, Any] | None:
    """The object's answer, or None where the ordinary way must report something."""
    answer: dict[str, Any] = {}
    for leaf in plan:
        if leaf.attribute is None:
            answer[leaf.key] = type_name
            continue
        try:
            value = getattr(source, leaf.attribute)
            if value is None:
                if leaf.non_null:
                    return None
                answer[leaf.key] = None
                continue
            coerced = leaf.coerce(value)
        except Exception:
            return None
        if coerced is None or coerced is Undefined:
            return None
        answer[leaf.key] = coerced
    return answer
