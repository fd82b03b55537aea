"""One structured log line per GraphQL operation, on the logger `interpql.requests`.

The line's fields (the record's `fields` attribute; `--log-format json` prints them as one JSON
object) are: operation name and type, HTTP status, duration, the inference the operation
caused (time, passes, batch sizes, coalesced rows, run-cache hits and misses), the number of
errors and their codes, the API key's id (never the key) and the client's address.

Two parts meet here. `RequestObserver`, a schema extension, sees the operation: its name, type,
final errors (it is the outermost extension, so internal errors are already masked) and the
request's inference stats. `ObservedHTTP`, around the /graphql route, sees the HTTP status and
the whole duration, and writes the line for what the extension saw (and for requests rejected
before any operation ran). Operations over a WebSocket have no status: the extension writes
their line itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from graphql import GraphQLError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.exceptions import MissingQueryError
from strawberry.extensions import SchemaExtension
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError

from interpql.errors import InterpqlError, RequestBodyRefused
from interpql.loaders.inference_stats import InferenceStats
from interpql.observability.metrics import Metrics
from interpql.resolvers.context import RequestContext
from interpql.schema.errors import add_codes

log = logging.getLogger("interpql.requests")

# Where ObservedHTTP leaves, in the ASGI scope, a list for the extension to append records to.
SCOPE_KEY = "interpql.operations"


@dataclass
class OperationRecord:
    name: str | None
    type: str | None  # query | mutation | subscription; None when the document did not parse
    error_codes: list[str]
    inference: InferenceStats
    key_id: str | None
    client: str | None
    seconds: float


@dataclass
class RequestTelemetry:
    """Where finished operations are reported: the log, and the metrics when they are on."""

    metrics: Metrics | None = None

    def operation_started(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.inc()

    def operation_ended(self) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.dec()

    def report(
        self, record: OperationRecord, transport: str, status: int | None, seconds: float
    ) -> None:
        stats = record.inference
        fields: dict[str, Any] = {
            "operation": record.name,
            "operation_type": record.type,
            "transport": transport,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "inference_ms": round(stats.seconds * 1000, 3),
            "inference_passes": stats.passes,
            "batch_sizes": stats.batch_sizes,
            "coalesced_rows": stats.coalesced_rows,
            "run_cache_hits": stats.run_cache_hits,
            "run_cache_misses": stats.run_cache_misses,
            "errors": len(record.error_codes),
            "error_codes": record.error_codes,
            "api_key_id": record.key_id,
            "client": record.client,
        }
        log.info(_summary(fields), extra={"fields": fields})
        if self.metrics is not None:
            self.metrics.observe_request(record.type or "none", record.error_codes, seconds, stats)

    def report_refused_stream(
        self, operation_name: str | None, codes: list[str], context: object
    ) -> None:
        """A WebSocket or multipart operation InterpqlSchema.stream refused before it ran (no
        extension saw it): logged and counted like any other."""
        ctx = context if isinstance(context, RequestContext) else None
        request = ctx.request if ctx else None
        record = OperationRecord(
            name=operation_name,
            type=None,
            error_codes=codes,
            inference=InferenceStats(),
            key_id=ctx.key_id if ctx else None,
            client=_client(getattr(request, "scope", None)),
            seconds=0.0,
        )
        self.deliver(record, request)

    def deliver(self, record: OperationRecord, request: object) -> None:
        """To the HTTP request's list, which ObservedHTTP reports with its status once the
        response is out; reported at once over a WebSocket (no status)."""
        records = getattr(request, "scope", {}).get(SCOPE_KEY)
        if isinstance(records, list):
            records.append(record)
        else:
            self.report(record, "websocket", None, record.seconds)

    def report_rejected(self, status: int, client: str | None, seconds: float) -> None:
        """An HTTP request refused before any operation ran (a body that is not JSON, ...)."""
        record = OperationRecord(None, None, [f"HTTP_{status}"], InferenceStats(), None, client, 0)
        self.report(record, "http", status, seconds)


def _summary(fields: dict[str, Any]) -> str:
    """The line as text: `query Name 200 12.3ms inference=4.1ms passes=1 ...`."""
    head = (
        f"{fields['operation_type'] or '-'} {fields['operation'] or '-'} {fields['status'] or '-'}"
    )
    return (
        f"{head} {fields['duration_ms']}ms inference={fields['inference_ms']}ms"
        f" passes={fields['inference_passes']} batches={fields['batch_sizes']}"
        f" errors={','.join(fields['error_codes']) or 0} key={fields['api_key_id'] or '-'}"
        f" client={fields['client'] or '-'}"
    )


class RequestObserver(SchemaExtension):
    def __init__(self, telemetry: RequestTelemetry) -> None:
        self.telemetry = telemetry
        self._streamed_codes: list[str] | None = None

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        self.telemetry.operation_started()
        failure: Exception | None = None
        try:
            yield
        except Exception as exc:
            # Raised past every extension (a parse error from the parser cache, an unknown
            # operation name, ...): strawberry makes the answer after this hook has ended.
            failure = exc
            raise
        finally:
            self.telemetry.operation_ended()
            self._finish(time.perf_counter() - started, failure)

    def on_stream_result(self, result: Any) -> Iterator[None]:
        yield
        # After the inner extensions: errors are masked by now.
        self._streamed_codes = (self._streamed_codes or []) + _codes(result)

    def _finish(self, seconds: float, failure: Exception | None) -> None:
        context = self._context()
        request = context.request if context else None
        if self._streamed_codes is not None:
            codes = self._streamed_codes
        elif failure is not None:
            codes = [_failure_code(failure)]
        else:
            codes = _codes(self.execution_context.result)
        record = OperationRecord(
            name=self.execution_context.operation_name,
            type=self._operation_type(),
            error_codes=codes,
            # Each operation's own, a WebSocket's too (InterpqlSchema.stream).
            inference=context.inference.stats if context else InferenceStats(),
            key_id=context.key_id if context else None,
            client=_client(getattr(request, "scope", None)),
            seconds=seconds,
        )
        self.telemetry.deliver(record, request)

    def _context(self) -> RequestContext | None:
        context = self.execution_context.context
        return context if isinstance(context, RequestContext) else None

    def _operation_type(self) -> str | None:
        try:
            return self.execution_context.operation_type.value
        except RuntimeError:  # no document: it did not parse
            return None


def _codes(result: object) -> list[str]:
    """The codes of a result's errors (strawberry's or graphql-core's result alike)."""
    errors: list[GraphQLError] = getattr(result, "errors", None) or []
    return [str((error.extensions or {}).get("code", "UNKNOWN")) for error in errors]


def _failure_code(exc: Exception) -> str:
    """The code of the answer strawberry will make of an exception that ended an operation."""
    if isinstance(exc, InterpqlError):
        return exc.code
    if isinstance(exc, GraphQLError):
        add_codes([exc])  # what the answer will carry; the code is set once, so this is it
        return str((exc.extensions or {}).get("code"))
    if isinstance(exc, (MissingQueryError, CannotGetOperationTypeError, InvalidOperationTypeError)):
        return "BAD_REQUEST"  # answered with HTTP 400
    return "INTERNAL_SERVER_ERROR"


def _client(scope: Scope | None) -> str | None:
    client = (scope or {}).get("client")
    return str(client[0]) if client else None


class ObservedHTTP:
    """Around the /graphql HTTP route: the status and duration of each request, and one line
    per operation it ran."""

    def __init__(self, app: ASGIApp, telemetry: RequestTelemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        records: list[OperationRecord] = []
        scope[SCOPE_KEY] = records
        status = 500  # unless a response starts
        started = time.perf_counter()

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except ClientDisconnect:
            status = 499  # nginx's "client closed request": no one is left to answer
        except RequestBodyRefused as refused:
            status = refused.status  # answered by the body limit, around the app
            raise
        finally:
            seconds = time.perf_counter() - started
            for record in records:
                self.telemetry.report(record, "http", status, seconds)
            # The GraphiQL page (a GET without a query) is no operation and no failure.
            if not records and status >= 400:
                self.telemetry.report_rejected(status, _client(scope), seconds)
