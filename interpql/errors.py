"""Errors a client can act on, each with a stable code.

Every layer (backends, loaders, resolvers) raises these; the GraphQL layer turns them into
errors whose ``extensions.code`` is the code below. Anything else is an internal error and is
masked before it reaches a client.

    InterpqlError                     (base; never raised directly)
    ├── NotFoundError
    │   ├── MODEL_NOT_FOUND          no model of that name is served
    │   ├── INVALID_NODE             a node id that does not parse or names no node
    │   └── GRAPH_NOT_FOUND          no attribution graph of that id is kept on this server
    ├── InvalidInputError
    │   ├── INVALID_ARGUMENT         a number out of its range, an empty list, ...
    │   ├── EMPTY_PROMPT             a prompt that tokenizes to nothing
    │   ├── INVALID_TOKEN            a target/distractor that is not exactly one token
    │   └── PROMPT_TOO_LONG          more tokens than the model's context window
    ├── UnavailableError
    │   ├── MODEL_NOT_LOADED         the server runs with --no-model: metadata only
    │   ├── NODE_DATA_UNREADABLE     a source's file for this node is broken (this node only)
    │   ├── UNSUPPORTED              the backend cannot compute what was asked
    │   ├── BACKEND_UNAVAILABLE      a remote (Ray Serve) model did not answer; retry later
    │   ├── RESOURCE_EXHAUSTED       the pass ran out of memory (this request only)
    │   ├── INFERENCE_TIMEOUT        the request's passes did not finish within the time limit
    │   └── SHARED_STATE_UNAVAILABLE the job store or the shared rate limits (Redis, or the jobs'
    │                                SQLite file) cannot be reached
    ├── QueryTooComplexError
    │   ├── QUERY_TOO_COMPLEX        depth, alias, token or estimated cost limits were exceeded
    │   ├── REQUEST_TOO_LARGE        the HTTP body or WebSocket message is over the size limit
    │   └── INTROSPECTION_DISABLED   the server runs with introspection switched off
    ├── UnauthenticatedError
    │   └── UNAUTHENTICATED          no valid API key (Authorization: Bearer ...) was given
    └── (others)
        ├── RATE_LIMITED             too many requests (or jobs at once) for this API key
        ├── QUOTA_EXCEEDED           this API key has spent its tokens
        ├── NO_RECORDS               a node with no records cannot be explained or scored
        ├── JOB_NOT_FOUND            no job with that id for this API key
        ├── HOST_NOT_ALLOWED         the request's Host is not a name this server answers to
        └── ORIGIN_NOT_ALLOWED       another site's page sent it (browser_policy.py), HTTP 403

Codes graphql itself produces are mapped too: GRAPHQL_PARSE_FAILED, GRAPHQL_VALIDATION_FAILED,
BAD_USER_INPUT (a variable of the wrong type); a request that is not a GraphQL request at all
(not JSON, not UTF-8, no query, a subscription over plain HTTP) gets BAD_REQUEST (HTTP 400);
masked internal errors carry INTERNAL_SERVER_ERROR.

The HTTP routes beside /graphql carry codes too: NOT_FOUND (404) and METHOD_NOT_ALLOWED (405);
/graphs/{id}.json GRAPH_NOT_FOUND and UNAUTHENTICATED; the CUDA memory snapshot route (its own
{"error": {code, message}}) CUDA_MEMORY_DEBUGGING_OFF and NO_API_KEYS.
"""

from __future__ import annotations

from typing import Any, ClassVar


class InterpqlError(Exception):
    default_code: ClassVar[str] = "INTERNAL_SERVER_ERROR"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        # graphql-core copies `extensions` of the original error into the response.
        self.extensions: dict[str, Any] = {"code": self.code, **details}


class NotFoundError(InterpqlError):
    default_code = "NOT_FOUND"


class InvalidInputError(InterpqlError):
    default_code = "INVALID_ARGUMENT"


class UnavailableError(InterpqlError):
    default_code = "UNSUPPORTED"


class QueryTooComplexError(InterpqlError):
    default_code = "QUERY_TOO_COMPLEX"


class UnauthenticatedError(InterpqlError):
    default_code = "UNAUTHENTICATED"


class RequestBodyRefused(Exception):
    """Raised into the app, from its reads of an HTTP body, by the transport's body limits
    (body_limit.py): not a GraphQL error, the transport answers `status` itself. The request
    log catches it to record that status rather than a failure."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def resource_exhausted(why: str) -> UnavailableError:
    return UnavailableError(
        f"Out of memory while running this request ({why}); try fewer or shorter prompts.",
        code="RESOURCE_EXHAUSTED",
    )


def inference_timeout(limit_s: float) -> UnavailableError:
    return UnavailableError(
        f"The request's forward passes did not finish within {limit_s:g} s.",
        code="INFERENCE_TIMEOUT",
    )


def shown(text: str, most: int = 100) -> str:
    """A client's text as quoted in a message: at most `most` characters of it, since an
    error must not echo a megabyte back."""
    return repr(text) if len(text) <= most else repr(text[:most]) + f"... ({len(text)} chars)"


def model_not_found(name: str) -> NotFoundError:
    return NotFoundError(f"No model named {shown(name)} is served.", code="MODEL_NOT_FOUND")


def invalid_node(node_id: str, why: str) -> NotFoundError:
    return NotFoundError(f"Invalid node id {shown(node_id)}: {why}", code="INVALID_NODE")


def invalid_argument(message: str) -> InvalidInputError:
    return InvalidInputError(message, code="INVALID_ARGUMENT")


def check_position(name: str, index: int, n_tokens: int) -> int:
    """A token index into `n_tokens` tokens, counted from the end when negative (-1 the last
    token), as a position from 0; INVALID_ARGUMENT outside [-n_tokens, n_tokens)."""
    if not -n_tokens <= index < n_tokens:
        raise invalid_argument(
            f"{name} must be in [{-n_tokens}, {n_tokens}) (negative counts from the end: -1 is "
            f"the last token), got {index}."
        )
    return index % n_tokens


def check_range(name: str, value: int, low: int, high: int) -> int:
    """Returns `value` when low <= value < high, else raises INVALID_ARGUMENT."""
    if not low <= value < high:
        raise invalid_argument(f"{name} must be in [{low}, {high}), got {value}.")
    return value
