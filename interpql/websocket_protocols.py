"""GraphQL over WebSockets, as standard clients expect it.

Two corrections to strawberry's defaults:

* Messages go out as text frames. Our JSON encoder answers bytes (fast for HTTP bodies), and
  strawberry sends bytes as binary frames, which the `graphql-ws` npm client (and browsers'
  `JSON.parse(event.data)` on a Blob) cannot read.
* The legacy `graphql-ws` protocol (subscriptions-transport-ws) carries queries and mutations
  too; strawberry's handler runs every operation as a subscription and crashes on the others.
  Here every operation runs through `schema.stream`, as on graphql-transport-ws.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.subscriptions.protocols.graphql_ws.types import CompleteMessage, ErrorMessage
from strawberry.types.execution import PreExecutionError


class TextFrameAdapter(ASGIWebSocketAdapter):
    async def send_json(self, message: Mapping[str, object]) -> None:
        encoded = self.view.encode_json(message)
        text = encoded.decode() if isinstance(encoded, bytes) else encoded
        try:
            await self.ws.send_text(text)
        except WebSocketDisconnect as exc:
            raise WebSocketDisconnected from exc


class LegacyProtocolHandler(BaseGraphQLWSHandler[Any, Any]):
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
        finally:
            self.subscriptions.pop(operation_id, None)
            self.tasks.pop(operation_id, None)
