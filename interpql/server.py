"""The Starlette app: GraphQL over HTTP and WebSocket on /graphql (GraphiQL on GET), /healthz,
the node viewer on /viewer, /metrics and the memory-snapshot endpoint (observability/), with
the body-size limit in front of everything."""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from cross_web import HTTPException
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.http.streaming import HTTPStreamTransport, MultipartSubscriptionTransport
from strawberry.subscriptions import (
    GRAPHQL_TRANSPORT_WS_PROTOCOL,
    GRAPHQL_WS_PROTOCOL,
    MULTIPART_SUBSCRIPTION_PROTOCOL,
)
from strawberry.types.graphql import OperationType

from interpql import web
from interpql.body_limit import BodySizeLimit
from interpql.browser_policy import (
    LOOSE_PAGE_POLICY,
    SecurityHeaders,
    cross_origin_refusal,
    from_this_server,
    page_policy,
)
from interpql.errors import InterpqlError
from interpql.host_check import AllowedHosts
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.registry import ModelRegistry
from interpql.observability.app import Observability
from interpql.resolvers import attribution_graph as graph_resolvers
from interpql.resolvers.context import RequestContext, Services
from interpql.schema.build import build_schema
from interpql.settings import Settings
from interpql.websocket_protocols import (
    LegacyProtocolHandler,
    TextFrameAdapter,
    TransportProtocolHandler,
)

# Container objects allocated between young collections (Python's default: 700).
YOUNG_COLLECTION_THRESHOLD = 50_000


class MultipartAnyOperation(MultipartSubscriptionTransport):
    """Multipart HTTP for every operation the request's method allows, not subscriptions alone:
    a query or mutation sent with the subscription Accept header runs, its result the stream's
    one part. (Strawberry refuses it, with an error we would mask as internal; a client that
    sends every operation with that header, as a fetcher built on meros may, would get one for
    each of its queries.)"""

    def allowed_operation_types(
        self, allowed_operation_types: set[OperationType]
    ) -> set[OperationType]:
        return allowed_operation_types


class GraphQLApp(GraphQL[RequestContext, None]):
    websocket_adapter_class = TextFrameAdapter  # type: ignore[assignment]
    graphql_transport_ws_handler_class = TransportProtocolHandler
    graphql_ws_handler_class = LegacyProtocolHandler
    stream_transport_classes_by_protocol: Mapping[str, type[HTTPStreamTransport]] = {
        **GraphQL.stream_transport_classes_by_protocol,
        MULTIPART_SUBSCRIPTION_PROTOCOL: MultipartAnyOperation,
    }

    def __init__(self, services: Services, observability: Observability | None = None) -> None:
        super().__init__(
            build_schema(
                services.settings,
                observability.schema_extensions() if observability else (),
                observability.telemetry.report_refused_stream if observability else None,
            ),
            graphql_ide="graphiql",
            # graphql-transport-ws and graphql-ws on /graphql's WebSocket, and subscriptions
            # over plain HTTP as multipart responses.
            subscription_protocols=(
                GRAPHQL_TRANSPORT_WS_PROTOCOL,
                GRAPHQL_WS_PROTOCOL,
                MULTIPART_SUBSCRIPTION_PROTOCOL,
            ),
        )
        self.services = services
        self._allowed_origin = re.compile(services.settings.cors_origin_regex)

    def is_websocket_origin_allowed(self, request: WebSocket, origin: str) -> bool:
        # Browsers apply no CORS to WebSockets: the origins CORS allows on HTTP are checked
        # here, and the page's own (the explorer's steering on a server not on localhost).
        return self._allowed_origin.fullmatch(origin) is not None or from_this_server(
            origin, request.headers.get("host", "")
        )

    async def render_graphql_ide(self, request: Request) -> Response:
        page = self.graphql_ide_html
        # The local page's inline script by its hash; the CDN page loads from elsewhere.
        policy = page_policy(page) if web.graphiql_assets_installed() else LOOSE_PAGE_POLICY
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> RequestContext:
        ctx = RequestContext.create(self.services, request=request, response=response)
        if isinstance(request, Request):
            request.state.interpql_context = ctx  # released once the answer is sent
        else:
            ctx.per_connection = True  # each operation gets its own (InterpqlSchema.stream)
        return ctx

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)

    def decode_json(self, data: str | bytes) -> object:
        # orjson refuses invalid UTF-8, nesting past 1024 levels and integers past 64 bits
        # with its JSONDecodeError (a json.JSONDecodeError), which strawberry answers as 400.
        return orjson.loads(data)

    def parse_json(self, data: str | bytes) -> Any:
        parsed = super().parse_json(data)
        if not isinstance(parsed, dict):
            raise HTTPException(400, "The request body must be a JSON object.")
        return parsed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        refusal = cross_origin_refusal(scope, self._allowed_origin)
        if refusal is not None:
            await graphql_error_response(403, refusal, code="ORIGIN_NOT_ALLOWED")(
                scope, receive, send
            )
            return
        request = Request(scope=scope, receive=receive)
        try:
            response = await self.run(request)
        except HTTPException as refused:
            # strawberry answers these in plain text; clients expect GraphQL's JSON errors.
            response = graphql_error_response(refused.status_code, refused.reason)
        except UnicodeDecodeError:
            response = graphql_error_response(400, "The request is not valid UTF-8.")
        try:
            await response(scope, receive, send)  # a stream (@defer, SSE) still reads it
        finally:
            ctx = getattr(request.state, "interpql_context", None)
            if ctx is not None:
                ctx.release()

    @property
    def graphql_ide_html(self) -> str:
        # Looked up on every GET, so assets installed while the server runs are picked up.
        return web.graphiql_page() if web.graphiql_assets_installed() else super().graphql_ide_html


def graphql_error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    code = code or {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(status, "BAD_REQUEST")
    errors = [{"message": message, "extensions": {"code": code}}]
    return JSONResponse({"data": None, "errors": errors}, status_code=status)


class InterpqlApp(Starlette):
    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(*args, **kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        # Outermost, outside Starlette's error middleware: an unknown host, then an oversized
        # body, are refused with their own answers before anything (the 500 handler too) sees
        # them.
        limited = BodySizeLimit(super().build_middleware_stack(), self.settings.max_body_bytes)
        return SecurityHeaders(AllowedHosts(limited, self.settings.allowed_hosts))


def create_app(
    services: Services | ModelRegistry,
    settings: Settings | None = None,
    cache: NodeDataCache | None = None,
) -> Starlette:
    """The app for `services`, or for a bare registry (with `settings` and `cache`)."""
    if isinstance(services, ModelRegistry):
        services = Services(services, settings or Settings(), cache or NodeDataCache())
    settings = services.settings
    registry = services.registry
    observability = Observability(services)
    graphql = GraphQLApp(services, observability)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": [e.name for e in registry.all()]})

    async def explore(_: Request) -> HTMLResponse:
        models = registry.all()
        return HTMLResponse(web.explore_page(models[0].name if models else ""))

    async def graph_json(request: Request) -> JSONResponse:
        """An attribution graph's JSON by id (Neuronpedia's viewer and circuit-tracer read it);
        behind the same key as every operation when keys are required."""
        if (
            settings.require_api_key
            and services.api_keys.identify(request.headers.get("authorization")) is None
        ):
            return graphql_error_response(
                401, "This graph needs an API key.", code="UNAUTHENTICATED"
            )
        ctx = RequestContext.create(services, request=request)
        try:
            graph = await graph_resolvers.graph_by_id(ctx, request.path_params["id"])
        except InterpqlError as missing:  # GRAPH_NOT_FOUND, worded as the GraphQL field's
            return graphql_error_response(404, missing.message, code=missing.code)
        return JSONResponse(await graph_resolvers.neuronpedia_json(ctx, graph))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # Fails the jobs a killed server left unfinished in a shared store, and takes a lease.
        await services.jobs.start()
        # What start-up built (weights, tables, the demo's records) lives as long as the
        # server: kept out of the collector's scans, so that a full collection, which a
        # 1,000-node answer's allocations trigger, takes milliseconds rather than ~150 ms.
        gc.freeze()
        # A 1,000-node answer allocates ~100,000 container objects, nearly all alive until it
        # is written: at Python's default of 700 young objects between collections, the
        # collector scans them over and over and finds next to no garbage (~20 ms of a first
        # read). What a request loaded does not wait for the collector (RequestContext.release),
        # so collecting less often holds no more memory: the load test's server stays ~0.8 GB.
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 10, 10)
        yield
        await services.jobs.shutdown()
        if services.explaining is not None:
            await services.explaining.close()
        if services.cache is not None:
            await services.cache.close()
        if services.rate_limiter is not None:
            await services.rate_limiter.close()
        await services.graphs.close()
        registry.close()
        observability.close()

    return InterpqlApp(
        settings=settings,
        routes=[
            Route("/graphql", observability.observe_http(graphql), methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
            Route("/healthz", healthz),
            Route("/graphs/{id:str}.json", graph_json),
            Route("/explore", explore),
            *web.routes(),
            *observability.routes(),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origin_regex=settings.cors_origin_regex,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
            )
        ],
        # Routes that do not exist, or a method a route does not take: the same JSON errors,
        # with codes, as the rest of the API (Starlette answers these in plain text).
        exception_handlers={
            404: _route_error,
            405: _route_error,
        },
        lifespan=lifespan,
    )


async def _route_error(_: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    message = {404: "No such route.", 405: "This route does not take that method."}[status]
    response = graphql_error_response(status, message)
    response.headers.update(getattr(exc, "headers", None) or {})  # 405's Allow
    return response
