"""GraphQL over WebSockets, as standard clients expect it.

Three corrections to strawberry's defaults:

* Messages go out as text frames. Our JSON encoder answers bytes (fast for HTTP bodies), and
  strawberry sends bytes as binary frames, which the `graphql-ws` npm client (and browsers'
  `JSON.parse(event.data)` on a Blob) cannot read.
* The legacy `graphql-ws` protocol (subscriptions-transport-ws) carries queries and mutations
  too; strawberry's handler runs every operation as a subscription and crashes on the others.
  Here every operation runs through `schema.stream`, as on graphql-transport-ws.
* A client's mistake gets an answer that names it, on both protocols. An operation that
  cannot run (a syntax error, an unknown operation name, a payload whose query is not a
  string) gets an `error` message with its code, as plain HTTP would answer it, and the
  connection stays open; strawberry closes the connection for some, and for others crashes
  the handler or the operation's task, so that the client sees only `complete`, a dropped
  connection or nothing at all. A message that cannot be answered by id (not a JSON object, an
  id that is not a string, for graphql-ws a frame that is not JSON) is refused as each protocol
  says: graphql-transport-ws closes with 4400 and the reason, graphql-ws answers
  `connection_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from graphql import GraphQLError
from starlette.websockets import WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import NonJsonMessageReceived, WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    Message,
    SubscribeMessage,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import (
    CompleteMessage,
    ConnectionErrorMessage,
    ErrorMessage,
    OperationMessage,
    StartMessage,
)
from strawberry.types.execution import PreExecutionError

from interpql.schema.operations import bad_request

log = logging.getLogger("interpql.errors")

# What each field of an operation's payload may be: what strawberry's view requires of an HTTP
# request body (and says in the same words), `query` and `operationName` alike.
PAYLOAD_FIELDS = (
    ("query", str, "a string"),
    ("operationName", str, "a string"),
    ("variables", dict, "an object"),
    ("extensions", dict, "an object"),
)


def payload_refusal(payload: object) -> GraphQLError | None:
    """What is wrong with a subscribe (or start) message's payload, as a BAD_REQUEST; None
    when the operation may go on to `schema.stream`, which checks the query itself."""
    if not isinstance(payload, dict):
        return bad_request("The message's payload must be an object that holds the query.")
    for key, kind, described in PAYLOAD_FIELDS:
        if not isinstance(payload.get(key), (kind, type(None))):
            return bad_request(
                f"The GraphQL operation's `{key}` must be {described} or null, if provided."
            )
    return None


# What TextFrameAdapter hands the graphql-ws handler for a text frame that is not JSON.
NOT_JSON = object()


class TextFrameAdapter(ASGIWebSocketAdapter):
    async def iter_json(
        self, *, ignore_parsing_errors: bool = False
    ) -> AsyncGenerator[object, None]:
        """As strawberry reads frames, except where it would skip a frame that is not JSON
        (graphql-ws asks that): NOT_JSON, which the handler answers, in its place."""
        while True:
            try:
                async for message in super().iter_json():
                    yield message
                return
            except NonJsonMessageReceived:
                if not ignore_parsing_errors:
                    raise
                yield NOT_JSON

    async def send_json(self, message: Mapping[str, object]) -> None:
        encoded = self.view.encode_json(message)
        text = encoded.decode() if isinstance(encoded, bytes) else encoded
        try:
            await self.ws.send_text(text)
        except WebSocketDisconnect as exc:
            raise WebSocketDisconnected from exc


class TransportProtocolHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    async def handle_message(self, message: Message) -> None:
        if not isinstance(message, dict):
            await self.handle_invalid_message("A message must be a JSON object.")
        elif message.get("type") in ("subscribe", "complete") and not isinstance(
            message.get("id"), str
        ):
            await self.handle_invalid_message(f"A {message['type']} message's id must be a string.")
        else:
            await super().handle_message(message)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        refusal = payload_refusal(message.get("payload"))
        # Unacknowledged connections and ids in use are strawberry's to refuse, as it does.
        if refusal is None or not self.connection_acknowledged or message["id"] in self.operations:
            await super().handle_subscribe(message)
            return
        await self.send_message(
            {"id": message["id"], "type": "error", "payload": [refusal.formatted]}
        )

    @staticmethod
    def _get_pre_execution_close_reason(error: GraphQLError) -> str | None:
        # Strawberry closes the connection (4400) on a syntax error or an unknown operation
        # name: here they end the operation alone, with an `error` message, as any other
        # error before execution does.
        return None


class LegacyProtocolHandler(BaseGraphQLWSHandler[Any, Any]):
    async def handle_message(self, message: OperationMessage) -> None:
        if message is NOT_JSON:
            await self.send_connection_error("A message must be JSON.")
        elif not isinstance(message, dict):
            await self.send_connection_error("A message must be a JSON object.")
        elif message.get("type") in ("start", "stop") and not isinstance(message.get("id"), str):
            await self.send_connection_error(f"A {message['type']} message's id must be a string.")
        elif message.get("type") not in (
            "connection_init",
            "connection_terminate",
            "start",
            "stop",
        ):
            await self.send_connection_error(f"Unknown message type: {message.get('type')!r}.")
        else:
            await super().handle_message(message)

    async def send_connection_error(self, reason: str) -> None:
        # subscriptions-transport-ws's own server answers a message it cannot read so, and
        # keeps the connection open.
        error = bad_request(reason).formatted
        await self.send_message(
            ConnectionErrorMessage(type="connection_error", payload=dict(error))
        )

    async def handle_start(self, message: StartMessage) -> None:
        refusal = payload_refusal(message.get("payload"))
        # An unacknowledged connection is strawberry's to refuse (it closes, 4401).
        if refusal is None or not self.connection_acknowledged:
            await super().handle_start(message)
            return
        await self.send_message(
            ErrorMessage(type="error", id=message["id"], payload=refusal.formatted)
        )

    async def handle_async_results(
        self,
        operation_id: str,
        query: str,
        operation_name: str | None,
        variables: dict[str, object] | None,
    ) -> None:
        try:
            results = await self.schema.stream(
                query,
                variable_values=variables,
                context_value=self.context,
                root_value=self.root_value,
                operation_name=operation_name,
            )
            self.subscriptions[operation_id] = results  # type: ignore[assignment]
            first = True
            async for result in results:
                if first and isinstance(result, PreExecutionError):
                    assert result.errors
                    await self.send_message(
                        ErrorMessage(
                            type="error", id=operation_id, payload=result.errors[0].formatted
                        )
                    )
                    return
                first = False
                await self.send_data_message(result, operation_id)  # type: ignore[arg-type]
            await self.send_message(CompleteMessage(type="complete", id=operation_id))
        except asyncio.CancelledError:
            # Stopped by the client (or the connection closing): say it is complete.
            with contextlib.suppress(WebSocketDisconnected):
                await self.send_message(CompleteMessage(type="complete", id=operation_id))
        except WebSocketDisconnected:
            pass
        except Exception:
            # A fault of ours, not the client's (schema.stream answers those): logged, and
            # answered, so that the client does not wait for ever.
            log.exception("operation %s over graphql-ws failed", operation_id)
            with contextlib.suppress(WebSocketDisconnected):
                await self.send_message(
                    ErrorMessage(
                        type="error",
                        id=operation_id,
                        payload={
                            "message": "Internal server error.",
                            "extensions": {"code": "INTERNAL_SERVER_ERROR"},
                        },
                    )
                )
        finally:
            self.subscriptions.pop(operation_id, None)
            self.tasks.pop(operation_id, None)
