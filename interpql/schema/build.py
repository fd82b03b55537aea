"""The (Apollo Federation v2) Schema, with the extensions that cut across every field: limits,
caches, errors."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from typing import Any

import strawberry
from graphql import (
    SKIP,
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    VisitorAction,
)
from strawberry.extensions import (
    AddValidationRules,
    DisableIntrospection,
    MaxTokensLimiter,
    ParserCache,
    SchemaExtension,
    ValidationCache,
)
from strawberry.extensions.max_aliases import create_validator as aliases_validator
from strawberry.federation.schema import FederationAny
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import StreamResult
from strawberry.types import ExecutionContext, Info
from strawberry.types.execution import ExecutionResult, PreExecutionError
from strawberry.types.graphql import OperationType

from interpql.errors import check_range, invalid_argument
from interpql.resolvers.context import RequestContext
from interpql.schema.errors import MaskInternalErrors, add_codes
from interpql.schema.execution import ShortWayExecution, read_plain_fields_directly
from interpql.schema.generation import Subscription
from interpql.schema.inference import InferenceResult
from interpql.schema.jobs import Mutation
from interpql.schema.limits import OperationLimits
from interpql.schema.operations import operation_refusal
from interpql.schema.query import Query
from interpql.schema.scalars import SCALARS
from interpql.settings import Settings


class NoFederationSdl(ValidationRule):
    """With introspection off, federation's `_service { sdl }` is refused too: it is the whole
    schema by another name. (A gateway then composes from the exported schema.graphql.)"""

    def enter_field(self, node: FieldNode, *_args: Any) -> None:
        parent = self.context.get_parent_type()
        if node.name.value == "_service" and parent is self.context.schema.query_type:
            self.report_error(
                GraphQLError(
                    "The schema is not served here: introspection is disabled, and so is _service.",
                    node,
                    extensions={"code": "INTROSPECTION_DISABLED"},
                )
            )


def depth_limit(max_depth: int) -> type[ValidationRule]:
    """A rule refusing an operation whose fields nest more than `max_depth` deep (fields with a
    selection set, introspection's aside), with strawberry's QueryDepthLimiter's message.

    Strawberry's own rule crashes on a spread of an unknown fragment and on an empty selection
    set (which graphql-core allows), before graphql-core's rules can say what is wrong; this
    one counts what is there and leaves the rest to them. A fragment's depth is counted once,
    however often it is spread."""

    class DepthLimit(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            self.fragment_depths: dict[str, int] = {}

        def enter_operation_definition(
            self, node: OperationDefinitionNode, *_args: Any
        ) -> VisitorAction:
            if self.depth(node.selection_set) > max_depth:
                name = node.name.value if node.name else "anonymous"
                self.report_error(
                    GraphQLError(f"'{name}' exceeds maximum operation depth of {max_depth}", node)
                )
            return SKIP

        def depth(self, selection_set: SelectionSetNode) -> int:
            deepest = 0
            for selection in selection_set.selections:
                if isinstance(selection, FragmentSpreadNode):
                    deepest = max(deepest, self.fragment_depth(selection.name.value))
                elif isinstance(selection, FieldNode):
                    if selection.selection_set and not selection.name.value.startswith("__"):
                        deepest = max(deepest, 1 + self.depth(selection.selection_set))
                elif isinstance(selection, InlineFragmentNode):
                    deepest = max(deepest, self.depth(selection.selection_set))
            return deepest

        def fragment_depth(self, name: str) -> int:
            if name not in self.fragment_depths:
                # 0 while it is counted: a cycle back to it adds nothing (NoFragmentCycles
                # refuses the document); so does an unknown fragment (KnownFragmentNames).
                self.fragment_depths[name] = 0
                fragment = self.context.get_fragment(name)
                if fragment is not None:
                    self.fragment_depths[name] = self.depth(fragment.selection_set)
            return self.fragment_depths[name]

    return DepthLimit


DEFAULT_OPERATION_TYPES = frozenset(OperationType)
PARSE_CACHE_SIZE = 256
# The parser cache's own function (one LRU for each size, shared by its instances): what
# operation_refusal parses, strawberry then finds parsed.
_parse = ParserCache(maxsize=PARSE_CACHE_SIZE).cached_parse_document

# graphql-core's validation and coercion messages end with "Did you mean ...?", naming fields,
# types and enum values: the schema, piece by piece, to a client that guesses.
_SUGGESTION = re.compile(r" Did you mean .*\?$", re.DOTALL)


class InterpqlSchema(strawberry.federation.Schema):
    # Set by build_schema: how many representations one _entities call may carry.
    max_representations: int = Settings().max_nodes_per_request
    # Set by build_schema: with introspection off, errors name nothing the client did not.
    hide_suggestions: bool = False
    # Set by build_schema: the most tokens a document may have (MaxTokensLimiter's limit).
    max_query_tokens: int = Settings().max_query_tokens
    # Set by build_schema: told of each operation `stream` refuses (name, codes, context),
    # which no extension sees: the request log and metrics.
    refusal_observer: Callable[[str | None, list[str], Any], None] | None = None

    # The annotations are strawberry's own: it builds the _entities field from them.
    def entities_resolver(
        self, info: Info, representations: list[FederationAny]
    ) -> list[FederationAny]:
        # strawberry's resolver assumes well-formed representations (a dict with a known
        # entity's __typename) and crashes otherwise; a gateway never sends such, a client may.
        check_range(
            "number of representations", len(representations), 0, self.max_representations + 1
        )
        for index, representation in enumerate(representations):
            type_name = (
                representation.get("__typename") if isinstance(representation, dict) else None
            )
            if type_name not in ENTITY_TYPES:
                raise invalid_argument(
                    f"representations[{index}] must be an object whose __typename is one of "
                    f"{', '.join(sorted(ENTITY_TYPES))}."
                )
        return super().entities_resolver(info, representations)

    async def stream(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        operation_extensions: dict[str, Any] | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
    ) -> StreamResult:
        """Every WebSocket operation, and every multipart HTTP one, runs through here. One
        that cannot run (operation_refusal) gets its error as its one result. On a connection's
        context, an operation runs with a context of its own, released once its last result is
        out."""
        refusal = operation_refusal(
            query,
            operation_name,
            DEFAULT_OPERATION_TYPES
            if allowed_operation_types is None
            else frozenset(allowed_operation_types),
            lambda text: _parse(text, max_tokens=self.max_query_tokens),
        )
        if refusal is not None:
            self.process_errors([refusal])
            if self.refusal_observer is not None:
                code = str((refusal.extensions or {}).get("code"))
                self.refusal_observer(operation_name, [code], context_value)
            return _only(PreExecutionError(data=None, errors=[refusal]))
        own: RequestContext | None = None
        if isinstance(context_value, RequestContext) and context_value.per_connection:
            own = context_value.for_operation()
        results = await super().stream(
            query,
            variable_values,
            context_value if own is None else own,
            root_value,
            operation_name,
            operation_extensions,
            allowed_operation_types,
        )
        return results if own is None else _released_at_end(results, own)

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Replaces strawberry's default, which logs every client mistake with a traceback.
        add_codes(errors)
        if self.hide_suggestions:
            for error in errors:
                error.message = _SUGGESTION.sub("", error.message)


async def _only(result: ExecutionResult) -> AsyncGenerator[ExecutionResult, None]:
    yield result


async def _released_at_end(results: StreamResult, ctx: RequestContext) -> StreamResult:
    try:
        async for result in results:
            yield result
    finally:
        await results.aclose()
        ctx.release()


# The types other subgraphs reference by key (those with resolve_reference).
ENTITY_TYPES = frozenset({"Model", "Node"})

# What strawberry's federation fields and types are, for GraphiQL's docs (it leaves them bare).
FEDERATION_DESCRIPTIONS = {
    "_Any": "Apollo Federation: an entity representation, {__typename, ...key fields}.",
    "_Entity": "Apollo Federation: the types other subgraphs can reference by key.",
    "_Service": "Apollo Federation: what a gateway needs to compose this subgraph.",
    "_Service.sdl": "This subgraph's schema, with its federation directives.",
    "Query._service": "Apollo Federation: this subgraph's schema, for gateways.",
    "Query._entities": "Apollo Federation: the entities (Model by name, Node by id) a gateway "
    "asks for by representation, in order; null for one that does not resolve.",
    "Query._entities.representations": "Entity representations: __typename and the key fields.",
    "_FieldSet": "Apollo Federation: a selection of fields, e.g. an entity's key.",
    "link__Import": "Apollo Federation: a name that @link imports from a spec.",
    "link__Purpose": "Apollo Federation: why a schema links a spec (SECURITY or EXECUTION).",
}


def build_schema(
    settings: Settings | None = None,
    observers: Sequence[Callable[[], SchemaExtension]] = (),
    refusal_observer: Callable[[str | None, list[str], Any], None] | None = None,
) -> strawberry.Schema:
    """`observers`: extensions that log, measure or trace operations (interpql.observability);
    outermost, so that they see each operation's final result. `refusal_observer`: told of
    the streamed operations refused before any extension runs."""
    settings = settings or Settings()
    # Factories: strawberry builds fresh extension instances for each request. The depth and
    # alias rules are classes made once here: strawberry's own limiter extensions make new
    # ones per request, and the validation cache, whose key holds the rules, then never hits
    # (and keeps 256 requests' classes alive).
    limits = (
        depth_limit(settings.max_query_depth),
        aliases_validator(settings.max_aliases),
    )
    extensions: list[Any] = [
        *observers,
        MaskInternalErrors,
        lambda: MaxTokensLimiter(max_token_count=settings.max_query_tokens),
        lambda: AddValidationRules(list(limits)),
        lambda: ParserCache(maxsize=PARSE_CACHE_SIZE),
        lambda: ValidationCache(maxsize=256),
        OperationLimits,
    ]
    if not settings.introspection:
        extensions += [DisableIntrospection, lambda: AddValidationRules([NoFederationSdl])]
    schema = InterpqlSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[InferenceResult],
        config=StrawberryConfig(auto_camel_case=True, scalar_map=SCALARS),
        extensions=extensions,
        # Pinned, so that the @link in schema.graphql moves only when we choose.
        federation_version="2.11",
        execution_context_class=ShortWayExecution,
    )
    schema.max_representations = settings.max_nodes_per_request
    schema.hide_suggestions = not settings.introspection
    schema.max_query_tokens = settings.max_query_tokens
    schema.refusal_observer = refusal_observer
    _describe(schema._schema, FEDERATION_DESCRIPTIONS)
    read_plain_fields_directly(schema)
    return schema


def _describe(schema: GraphQLSchema, descriptions: dict[str, str]) -> None:
    for path, description in descriptions.items():
        type_name, *rest = path.split(".")
        target: Any = schema.get_type(type_name)
        for name in rest:
            target = (target.fields if hasattr(target, "fields") else target.args)[name]
        target.description = description
