"""The check a streamed operation passes before it runs: its query parses, names one operation,
and that operation's type is one the transport carries.

Strawberry's view answers these mistakes on a plain HTTP POST itself (HTTP 400, BAD_REQUEST).
The streaming transports (graphql-transport-ws, graphql-ws, multipart HTTP) go through
`Schema.stream` instead, which lets a syntax error escape its stream, masks an unknown
operation as an internal error and runs the first of several unnamed subscriptions.
`InterpqlSchema.stream` asks `operation_refusal` first, so that every transport refuses them
as plain HTTP POST does, with the same codes and messages.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from graphql import DocumentNode, GraphQLError, GraphQLSyntaxError, OperationDefinitionNode
from strawberry.schema.exceptions import CannotGetOperationTypeError
from strawberry.types.graphql import OperationType

_PLURALS = {
    OperationType.QUERY: "queries",
    OperationType.MUTATION: "mutations",
    OperationType.SUBSCRIPTION: "subscriptions",
}


SEVERAL_UNNAMED = "The document has several operations: name the one to run in operationName."


def bad_request(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "BAD_REQUEST"})


def operation_refusal(
    query: str | None,
    operation_name: str | None,
    allowed: Collection[OperationType],
    parse: Callable[[str], DocumentNode],
) -> GraphQLError | None:
    """The error the operation is refused with, or None when it may run: the query's syntax
    error (coded by `add_codes`, as every graphql-core error is), or a BAD_REQUEST when there
    is no query, no operation of that name, several operations and no name, or an operation of
    a type that is not `allowed`."""
    if not query:
        return bad_request("No GraphQL query found in the request")
    try:
        document = parse(query)
    except GraphQLSyntaxError as error:
        return error
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if operation_name is None and len(operations) > 1:
        # The spec's rule; graphql-core's subscribe would run the first.
        return bad_request(SEVERAL_UNNAMED)
    chosen = next(
        (
            operation
            for operation in operations
            if operation_name is None
            or (operation.name is not None and operation.name.value == operation_name)
        ),
        None,
    )
    if chosen is None:
        # Strawberry's own wording, which plain HTTP answers with.
        return bad_request(CannotGetOperationTypeError(operation_name).as_http_error_reason())
    operation_type = OperationType(chosen.operation.value)
    if operation_type not in allowed:
        return bad_request(f"{_PLURALS[operation_type]} are not allowed in this request.")
    return None
