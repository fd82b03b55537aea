"""What `create_app` wires for observability: schema extensions, the /graphql wrapper, routes."""

from __future__ import annotations

from collections.abc import Callable

from starlette.routing import BaseRoute
from starlette.types import ASGIApp
from strawberry.extensions import SchemaExtension

from interpql.observability.memory_snapshots import snapshot_route
from interpql.observability.metrics import Metrics
from interpql.observability.request_log import ObservedHTTP, RequestObserver, RequestTelemetry
from interpql.observability.tracing import tracing_extension
from interpql.resolvers.context import Services


class Observability:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.metrics = Metrics(services) if services.settings.metrics else None
        self.telemetry = RequestTelemetry(self.metrics)

    def schema_extensions(self) -> list[Callable[[], SchemaExtension]]:
        """Outermost first: they see each operation's final result, errors masked."""
        extensions: list[Callable[[], SchemaExtension]] = [lambda: RequestObserver(self.telemetry)]
        if self.services.tracer_provider is not None:
            extensions.append(tracing_extension(self.services.tracer_provider))
        return extensions

    def observe_http(self, app: ASGIApp) -> ASGIApp:
        return ObservedHTTP(app, self.telemetry)

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [snapshot_route(self.services)]
        if self.metrics is not None:
            routes.append(self.metrics.route())
        return routes

    def close(self) -> None:
        """Sends the spans still buffered."""
        if self.services.tracer_provider is not None:
            self.services.tracer_provider.shutdown()
