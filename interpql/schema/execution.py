"""How operations execute: graphql-core's executor, with a short way through objects whose
selected fields are all plain attributes or resolvers marked `direct`.

A 1,000-node lookup completes 1,000 nodes of three fields and ~6,000 objects (examples,
explanations) of two leaf fields each; graphql-core and strawberry spend several calls per field
on them (resolve info, argument coercion, strawberry's resolver wrapper, completion, error
handling), most of the lookup's time. An object whose selection is only

- leaf fields read by `attribute` (strawberry's fields without a resolver, and `__typename`),
- fields whose resolver is marked `direct`, answering a leaf, an object or a list of objects
  that can be completed the same way,

with no arguments but a direct resolver's, no directive left on a field and no @defer, is
completed here in one pass: the same values, coerced by the same scalar types, each direct
resolver called with its arguments coerced once per operation. Where anything is unusual (a null
in a non-null field, a value the scalar refuses, a resolver that raises or whose answer is not
ready) the object goes the ordinary way, which reports the error as graphql-core would. With a
schema extension that wraps resolvers (tracing), only attribute fields take the short way, so
every resolver a trace would show still runs through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import strawberry
from graphql import (
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLResolveInfo,
    Undefined,
    is_leaf_type,
    is_scalar_type,
)
from graphql.execution.values import get_argument_values
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.types import Info

# Marks the resolver `attribute` builds, with the attribute it reads.
ATTRIBUTE = "_interpql_attribute"
# Marks a schema resolver that may be called directly (`direct`), and, on graphql-core's
# resolver of its field, how to call it (a _DirectResolver).
DIRECT = "_interpql_direct"

F = TypeVar("F", bound=Callable[..., Any])


def direct(resolver: F) -> F:
    """Marks a resolver that the short way may call itself, without strawberry's per-call
    wrapper: it is synchronous, takes only scalar arguments, reads nothing of its `info` but
    `info.context` (one Info serves every object of a list), and answers its value or an
    awaitable of it (then the object goes the ordinary way). Put it under @strawberry.field."""
    setattr(resolver, DIRECT, True)
    return resolver


def attribute(python_name: str) -> Callable[..., Any]:
    """graphql-core's resolver for a field that is the source's attribute `python_name`."""

    def read(source: Any, _info: Any) -> Any:
        return getattr(source, python_name)

    setattr(read, ATTRIBUTE, python_name)
    read._is_default = True  # type: ignore[attr-defined]  # strawberry's mark: traced as no work
    return read


class _DirectResolver(NamedTuple):
    function: Callable[..., Any]
    field: Any  # the StrawberryField, for the Info
    info_name: str | None  # the resolver's info parameter, if it takes one
    python_names: dict[str, str]  # GraphQL argument name -> the resolver's parameter


def read_plain_fields_directly(schema: strawberry.Schema) -> None:
    """A field without a resolver is an attribute of its object: strawberry reads it through
    three calls (its wrapper, `get_result`, the config's default resolver, which is getattr);
    with `attribute` graphql-core calls getattr itself. Resolvers marked `direct` are noted on
    their fields, for the short way (ShortWayExecution) to call."""
    for name, concrete in schema.schema_converter.type_map.items():
        definition = getattr(concrete, "definition", None)
        graphql_type: Any = schema._schema.type_map.get(name)
        if definition is None or not hasattr(graphql_type, "fields") or definition.is_input:
            continue
        for field in definition.fields:
            graphql_name = schema.config.name_converter.get_graphql_name(field)
            if graphql_name not in graphql_type.fields:
                continue
            graphql_field = graphql_type.fields[graphql_name]
            if field.is_basic_field:
                graphql_field.resolve = attribute(field.python_name)
            elif field.base_resolver is not None and getattr(
                field.base_resolver.wrapped_func, DIRECT, False
            ):
                setattr(graphql_field.resolve, DIRECT, _direct_resolver(name, field, graphql_field))


def _direct_resolver(type_name: str, field: Any, graphql_field: Any) -> _DirectResolver:
    resolver = field.base_resolver
    where = f"{type_name}.{field.python_name}"
    if resolver.is_async or field.extensions or field.permission_classes:
        raise TypeError(f"{where} is marked direct but is async or has extensions")
    if resolver.self_parameter is None or resolver.root_parameter or resolver.parent_parameter:
        raise TypeError(f"{where} is marked direct but does not take its object as self")
    for name, argument in graphql_field.args.items():
        named = (
            argument.type.of_type if isinstance(argument.type, GraphQLNonNull) else argument.type
        )
        if not is_scalar_type(named):  # not enums, whose values strawberry converts
            raise TypeError(f"{where} is marked direct but its argument {name} is not a scalar")
    info = resolver.info_parameter
    return _DirectResolver(
        resolver.wrapped_func,
        field,
        None if info is None else info.name,
        {
            argument.graphql_name or argument.python_name: argument.python_name
            for argument in field.arguments
        },
    )


class _NotShort(Exception):
    """This object's answer must come the ordinary way."""


# How a planned field's value becomes its answer: the answer, or _NotShort raised.
Completer = Callable[[Any], Any]


class _Field(NamedTuple):
    key: str  # the response key (the alias, else the field's name)
    read: Callable[[Any], Any]  # the source -> the field's value
    complete: Completer


class ShortWayExecution(StrawberryGraphQLCoreExecutionContext):
    """strawberry's execution context, completing plannable objects in one pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plans: dict[tuple[GraphQLObjectType, int], tuple[Any, list[_Field] | None]] = {}
        # Resolver-wrapping extensions (tracing) must see every resolver call.
        self._direct_allowed = not (self.middleware_manager and self.middleware_manager.middlewares)

    def complete_object_value(
        self,
        return_type: GraphQLObjectType,
        field_details_list: Any,
        info: GraphQLResolveInfo[Any],
        path: Any,
        result: Any,
        position_context: Any,
    ) -> Any:
        plan = self._plan(return_type, field_details_list, info)
        if plan is not None:
            try:
                return _complete(plan, result)
            except _NotShort:
                pass
        return super().complete_object_value(
            return_type, field_details_list, info, path, result, position_context
        )

    def _plan(
        self, return_type: GraphQLObjectType, field_details_list: Any, info: GraphQLResolveInfo[Any]
    ) -> list[_Field] | None:
        key = (return_type, id(field_details_list))
        found = self._plans.get(key)
        if found is None:
            # The list is kept with its plan, so that its id is not reused while this runs.
            plan = (
                None
                if return_type.is_type_of
                else self._new_plan(return_type, field_details_list, info)
            )
            found = (field_details_list, plan)
            self._plans[key] = found
        return found[1]

    def _new_plan(
        self, return_type: GraphQLObjectType, field_details_list: Any, info: GraphQLResolveInfo[Any]
    ) -> list[_Field] | None:
        grouped, new_defer_usages, _ = self.collect_subfields(return_type, field_details_list)
        if new_defer_usages:
            return None
        plan = []
        for key, details in grouped.items():
            node = details[0].node
            if any(d.defer_usage is not None or _unusual_directives(d.node) for d in details):
                return None
            name = node.name.value
            if name == "__typename":
                type_name = return_type.name
                plan.append(_Field(key, _constant(type_name), str))
                continue
            field = return_type.fields.get(name)
            if field is None:
                return None
            python_name = getattr(field.resolve, ATTRIBUTE, None)
            resolver: _DirectResolver | None = getattr(field.resolve, DIRECT, None)
            if python_name is not None and not node.arguments:
                read = _getter(python_name)
            elif resolver is not None and self._direct_allowed:
                try:
                    read = self._caller(resolver, field, details, return_type, info)
                except Exception:  # arguments it refuses: the ordinary way reports them
                    return None
            else:
                return None
            complete = self._completer(field.type, details, info)
            if complete is None:
                return None
            plan.append(_Field(key, read, complete))
        return plan

    def _caller(
        self,
        resolver: _DirectResolver,
        field: Any,
        details: Any,
        parent_type: GraphQLObjectType,
        info: GraphQLResolveInfo[Any],
    ) -> Callable[[Any], Any]:
        """The resolver, called with its arguments coerced now, once. Its Info's path is the
        list's (or the first object's field), not each object's: direct resolvers read only
        `info.context`."""
        first = details[0]
        values = get_argument_values(
            field,
            first.node,
            self.variable_values,
            first.fragment_variable_values,
            self.hide_suggestions,
        )
        kwargs = {resolver.python_names[name]: value for name, value in values.items()}
        if resolver.info_name is not None:
            nodes = [d.node for d in details]
            raw = self.build_resolve_info(field, nodes, parent_type, info.path)
            kwargs[resolver.info_name] = Info(_raw_info=raw, _field=resolver.field)
        function = resolver.function

        def call(source: Any) -> Any:
            try:
                value = function(source, **kwargs)
            except Exception as error:
                raise _NotShort from error
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()  # the ordinary way asks again
                raise _NotShort
            return value

        return call

    def _completer(
        self, graphql_type: Any, details: Any, info: GraphQLResolveInfo[Any]
    ) -> Completer | None:
        """How a value of `graphql_type` is completed, or None where the short way cannot."""
        if isinstance(graphql_type, GraphQLNonNull):
            inner = self._completer(graphql_type.of_type, details, info)
            return None if inner is None else _non_null(inner)
        if isinstance(graphql_type, GraphQLList):
            item = self._completer(graphql_type.of_type, details, info)
            return None if item is None else _nullable(_list_of(item))
        if is_leaf_type(graphql_type):
            return _nullable(_coerced(graphql_type.coerce_output_value))
        if isinstance(graphql_type, GraphQLObjectType):
            plan = self._plan(graphql_type, details, info)
            return None if plan is None else _nullable(lambda value: _complete(plan, value))
        return None  # interfaces and unions: the ordinary way resolves the type


def _complete(plan: list[_Field], source: Any) -> dict[str, Any]:
    """The object's answer; _NotShort where the ordinary way must report something."""
    answer: dict[str, Any] = {}
    for field in plan:
        try:
            value = field.read(source)
        except _NotShort:
            raise
        except Exception as error:
            raise _NotShort from error
        answer[field.key] = field.complete(value)
    return answer


def _unusual_directives(node: Any) -> bool:
    """Directives other than @skip and @include (which collecting the fields has applied)."""
    return any(d.name.value not in ("skip", "include") for d in node.directives or ())


def _constant(value: str) -> Callable[[Any], str]:
    return lambda _source: value


def _getter(python_name: str) -> Callable[[Any], Any]:
    return lambda source: getattr(source, python_name)


def _nullable(complete: Completer) -> Completer:
    return lambda value: None if value is None else complete(value)


def _non_null(complete: Completer) -> Completer:
    def completed(value: Any) -> Any:
        if value is None:
            raise _NotShort
        return complete(value)

    return completed


def _list_of(item: Completer) -> Completer:
    def completed(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _NotShort
        return [item(v) for v in value]

    return completed


def _coerced(coerce: Callable[[Any], Any]) -> Completer:
    def completed(value: Any) -> Any:
        try:
            coerced = coerce(value)
        except Exception as error:
            raise _NotShort from error
        if coerced is None or coerced is Undefined:
            raise _NotShort
        return coerced

    return completed
