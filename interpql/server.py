"""The Starlette app: GraphQL over HTTP and WebSocket on /graphql (GraphiQL on GET), /healthz,
and the node viewer on /viewer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.subscriptions import (
    GRAPHQL_TRANSPORT_WS_PROTOCOL,
    GRAPHQL_WS_PROTOCOL,
    MULTIPART_SUBSCRIPTION_PROTOCOL,
)

from interpql import web
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.registry import ModelRegistry
from interpql.resolvers.context import RequestContext, Services
from interpql.schema.build import build_schema
from interpql.settings import Settings


class GraphQLApp(GraphQL[RequestContext, None]):
    def __init__(self, services: Services) -> None:
        super().__init__(
            build_schema(services.settings),
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

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> RequestContext:
        return RequestContext.create(self.services, request=request, response=response)

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)

    @property
    def graphql_ide_html(self) -> str:
        # Looked up on every GET, so assets installed while the server runs are picked up.
        return web.graphiql_page() if web.graphiql_assets_installed() else super().graphql_ide_html


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
    graphql = GraphQLApp(services)

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": [e.name for e in registry.all()]})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await services.jobs.shutdown()
        if services.explaining is not None:
            await services.explaining.close()
        registry.close()

    return Starlette(
        routes=[
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
            Route("/healthz", healthz),
            *web.routes(),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origin_regex=settings.cors_origin_regex,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
            )
        ],
        lifespan=lifespan,
    )
