"""What every operation passes before it runs: an API key when the server requires one, the
estimated cost limit (interpql.schema.cost) and the per-client rate limits.

A refused query or mutation gets its typed error as the whole result (nothing runs), with the
HTTP status a client library expects (401, 429); a refused subscription gets it as its first and
only event. Every result carries `extensions.cost`, so clients can see what they spend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from graphql import (
    ExecutionResult,
    FragmentDefinitionNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
)
from strawberry.extensions import SchemaExtension

from interpql.errors import InterpqlError, QueryTooComplexError, UnauthenticatedError
from interpql.resolvers.models import generation_caches, prompt_token_counter
from interpql.schema.cost import estimate_cost
from interpql.schema.operations import SEVERAL_UNNAMED


class OperationLimits(SchemaExtension):
    def __init__(self) -> None:
        self.cost: int | None = None

    async def on_execute(self) -> AsyncIterator[None]:
        context = self.execution_context
        ctx: Any = context.context
        services = getattr(ctx, "services", None)
        try:
            # What the client named, not strawberry's guess (the first operation).
            named = getattr(context, "_provided_operation_name", context.operation_name)
            operation = _operation(context.graphql_document, named)
        except InterpqlError as refused:
            _refuse(context, ctx, refused)
            operation = None
        if services is not None and operation is not None:
            streamed = operation.operation is OperationType.SUBSCRIPTION and _streams(ctx)
            try:
                if operation.operation is OperationType.SUBSCRIPTION and not streamed:
                    raise InterpqlError(
                        "Subscriptions need a WebSocket (graphql-transport-ws or graphql-ws) "
                        "or an HTTP request that accepts multipart/mixed.",
                        code="BAD_REQUEST",
                    )
                await self._check(ctx, operation)
            except InterpqlError as refused:
                if streamed:
                    raise  # strawberry turns it into the subscription's error event
                _refuse(context, ctx, refused)
        yield

    async def _check(self, ctx: Any, operation: OperationDefinitionNode) -> None:
        settings = ctx.services.settings
        if settings.require_api_key and ctx.key_id is None:
            raise UnauthenticatedError(
                "This server needs an API key for every operation: send "
                "'Authorization: Bearer <key>'."
            )
        _check_list_lengths(self.execution_context.variables, settings.max_nodes_per_request)
        document = self.execution_context.graphql_document
        assert document is not None
        fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        variables = dict(self.execution_context.variables or {})
        self.cost = estimate_cost(
            self.execution_context.schema._schema,
            operation,
            fragments,
            variables,
            prompt_token_counter(ctx),
            generation_caches(ctx),
        )
        if 0 < settings.max_query_cost < self.cost:
            raise QueryTooComplexError(
                f"This operation's estimated cost is {self.cost}, over the limit of "
                f"{settings.max_query_cost}: ask for fewer items, or shorter or fewer prompts.",
                code="QUERY_TOO_COMPLEX",
                cost=self.cost,
                maxCost=settings.max_query_cost,
            )
        limiter = ctx.services.rate_limiter
        if limiter:
            wait_s = await limiter.charge(ctx.client_id, self.cost)
            if wait_s is not None:
                raise InterpqlError(
                    f"Rate limit reached for this client; retry in {wait_s:.1f} s.",
                    code="RATE_LIMITED",
                    retryAfterSeconds=round(wait_s, 1),
                )

    def get_results(self) -> dict[str, Any]:
        return {} if self.cost is None else {"cost": self.cost}


def _operation(document: Any, name: str | None) -> OperationDefinitionNode | None:
    if document is None:
        return None
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None and len(operations) > 1:
        # The spec's rule, which execution here would otherwise skip by running the first.
        raise InterpqlError(SEVERAL_UNNAMED, code="BAD_REQUEST")
    for operation in operations:
        if name is None or (operation.name is not None and operation.name.value == name):
            return operation
    return None


def _refuse(context: Any, ctx: Any, refused: InterpqlError) -> None:
    """Makes `refused` the whole result: strawberry then executes nothing."""
    _set_status(ctx, refused)
    error = GraphQLError(refused.message, original_error=refused, extensions=refused.extensions)
    context.result = ExecutionResult(data=None, errors=[error])


def _streams(ctx: Any) -> bool:
    """Whether this subscription arrived over a transport that can stream it."""
    request = getattr(ctx, "request", None)
    headers = getattr(request, "headers", None)
    if request is None or headers is None or getattr(request, "scope", {}).get("type") != "http":
        return True  # a WebSocket, or called without HTTP (tests, the schema directly)
    return "multipart/mixed" in headers.get("accept", "")


def _check_list_lengths(variables: Any, most: int) -> None:
    """Refuses an over-long list anywhere in the variables before they are coerced: 100k
    inputs would cost seconds to convert before a resolver could refuse them."""
    stack = [variables]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            if len(value) > most:
                raise InterpqlError(
                    f"A list of {len(value)} items in the variables; at most {most}.",
                    code="INVALID_ARGUMENT",
                )
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())


def _set_status(ctx: Any, refused: InterpqlError) -> None:
    response = getattr(ctx, "response", None)
    status = {"UNAUTHENTICATED": 401, "RATE_LIMITED": 429, "BAD_REQUEST": 400}.get(refused.code)
    if response is None or status is None or not hasattr(response, "status_code"):
        return
    response.status_code = status
    retry = refused.extensions.get("retryAfterSeconds")
    if retry is not None and hasattr(response, "headers"):
        response.headers["Retry-After"] = str(max(1, round(retry)))
