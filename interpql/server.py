"""The Starlette app: GraphQL over HTTP and WebSocket on /graphql (GraphiQL on GET), /healthz."""

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

from interpql.loaders.cache import NodeDataCache
from interpql.loaders.registry import ModelRegistry
from interpql.resolvers.context import RequestContext
from interpql.schema.build import build_schema
from interpql.settings import Settings


class GraphQLApp(GraphQL[RequestContext, None]):
    def __init__(
        self, registry: ModelRegistry, settings: Settings, cache: NodeDataCache | None
    ) -> None:
        super().__init__(build_schema(settings), graphql_ide="graphiql")
        self.registry = registry
        self.settings = settings
        self.cache = cache

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> RequestContext:
        return RequestContext.create(self.registry, self.settings, request, response, self.cache)

    def encode_json(self, data: object) -> bytes:
        return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)


def create_app(
    registry: ModelRegistry,
    settings: Settings | None = None,
    cache: NodeDataCache | None = None,
) -> Starlette:
    settings = settings or Settings()
    graphql = GraphQLApp(registry, settings, cache or NodeDataCache())

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": [e.name for e in registry.all()]})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        registry.close()

    return Starlette(
        routes=[
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
            Route("/healthz", healthz),
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
