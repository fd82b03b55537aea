"""Every error a client sees carries `extensions.code`; internal errors are masked.

Client errors are `interpql.errors.InterpqlError`s (graphql-core copies their `extensions`).
Errors graphql itself raises (syntax, validation, limits, variable coercion) get a code here.
Anything else is replaced by a masked INTERNAL_SERVER_ERROR and logged with its traceback.
"""

from __future__ import annotations

import logging

from graphql import GraphQLError, GraphQLSyntaxError
from strawberry.extensions import MaskErrors

from interpql.errors import InterpqlError

log = logging.getLogger("interpql.errors")


def _is_client_error(error: GraphQLError) -> bool:
    original = error.original_error
    return original is None or isinstance(original, (InterpqlError, GraphQLError))


class MaskInternalErrors(MaskErrors):
    def __init__(self) -> None:
        super().__init__(
            should_mask_error=self._should_mask, error_message="Internal server error."
        )

    @staticmethod
    def _should_mask(error: GraphQLError) -> bool:
        if _is_client_error(error):
            return False
        # The only place the original is still at hand: log it before it is masked.
        log.error("internal error at %s", error.path, exc_info=error.original_error)
        return True

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
        return masked


def _code_for(error: GraphQLError) -> str:
    message = error.message
    if error.path is not None:
        # Raised by graphql itself while completing a result (a value its type cannot carry,
        # a null where none may be): our fault, whatever the request was.
        return "INTERNAL_SERVER_ERROR"
    if isinstance(error, GraphQLSyntaxError):
        if "tokens" in message:
            return "QUERY_TOO_COMPLEX"
        return "GRAPHQL_PARSE_FAILED"
    if message.startswith("Variable") and (
        "invalid value" in message or "required type" in message
    ):
        return "BAD_USER_INPUT"
    if "exceeds maximum operation depth" in message or "aliases found" in message:
        return "QUERY_TOO_COMPLEX"
    if "introspection" in message and "disabled" in message:
        return "INTROSPECTION_DISABLED"
    return "GRAPHQL_VALIDATION_FAILED"


def add_codes(errors: list[GraphQLError]) -> None:
    """Gives every error that lacks one a code; client errors are not logged as failures."""
    for error in errors:
        extensions = dict(error.extensions or {})
        if "code" not in extensions:
            extensions["code"] = _code_for(error)
            if extensions["code"] == "INTERNAL_SERVER_ERROR":
                log.error("internal error at %s: %s", error.path, error.message)
            else:
                log.debug("client error %s: %s", extensions["code"], error.message)
        error.extensions = extensions
