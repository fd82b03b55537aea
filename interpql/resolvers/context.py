"""What every resolver receives: the server's long-lived services, and this request's loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interpql.loaders.auth import ApiKeys
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.coalescing import InferenceRunner
from interpql.loaders.explaining import ExplanationService
from interpql.loaders.graph_store import GraphStore
from interpql.loaders.inference import InferenceLoader, ResultCache, default_runner
from interpql.loaders.jobs import JobManager
from interpql.loaders.node_data import NodeDataLoaders
from interpql.loaders.rate_limits import Limiter, RateLimiter
from interpql.loaders.registry import ModelRegistry
from interpql.loaders.search import index_model
from interpql.loaders.sources import ExplanationStore
from interpql.settings import Settings


@dataclass
class Services:
    """Everything that lives as long as the server: shared by all requests."""

    registry: ModelRegistry
    settings: Settings = field(default_factory=Settings)
    cache: NodeDataCache | None = None
    jobs: JobManager = field(default_factory=JobManager)
    explaining: ExplanationService | None = None
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    # Gathers concurrent requests' forward passes (window from settings).
    runner: InferenceRunner | None = None
    # Earlier requests' results, for identical inputs.
    results: ResultCache | None = None
    # Requests and estimated cost per client per minute (limits from settings): in memory,
    # or in Redis for every replica (--redis).
    rate_limiter: Limiter | None = None
    # An OpenTelemetry TracerProvider (--otel): operations and resolvers are traced to it.
    tracer_provider: Any = None
    # Attribution graphs by id (their JSON URL and follow-up queries): computed here, or by
    # any replica sharing its Redis or its graph file (graph_store.py).
    graphs: GraphStore = field(default_factory=GraphStore)

    @property
    def model_runner(self) -> InferenceRunner:
        """Where every computation with a model goes (set in __post_init__)."""
        assert self.runner is not None
        return self.runner

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = default_runner(
                self.settings.coalesce_window_s, self.settings.inference_timeout_s
            )
        if self.rate_limiter is None:
            self.rate_limiter = RateLimiter(
                self.settings.rate_limit_requests_per_minute,
                self.settings.rate_limit_cost_per_minute,
            )
        if self.results is None and self.settings.cached_runs > 0:
            self.results = ResultCache(self.settings.cached_runs)
        if self.explaining is None:
            # A store in memory: explanations generated while the server runs.
            self.explaining = ExplanationService(
                ExplanationStore(), self.registry.search, self.jobs, None
            )
        # Generated explanations are one more source of every model, and searchable.
        store = self.explaining.store
        for entry in self.registry.all():
            if store not in entry.sources:
                entry.sources.append(store)
                index_model(self.registry.search, entry.name, [store])


@dataclass
class RequestContext:
    services: Services
    inference: InferenceLoader
    node_data: NodeDataLoaders
    request: Any = None
    response: Any = None
    # A WebSocket's connection_init payload (browsers cannot set headers on WebSockets, so the
    # key may come here as {"Authorization": "Bearer ..."}); strawberry fills it in.
    connection_params: Any = None
    # A WebSocket's context, which lives as long as its connection: each operation on it runs
    # with a context of its own (for_operation), released when the operation ends.
    per_connection: bool = False

    @property
    def registry(self) -> ModelRegistry:
        return self.services.registry

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def authorization(self) -> str | None:
        """The client's `Authorization` value: the HTTP header, or the WebSocket's."""
        params = self.connection_params
        if isinstance(params, dict):
            for name in ("Authorization", "authorization"):
                if isinstance(params.get(name), str):
                    return str(params[name])
        headers = getattr(self.request, "headers", None)
        return None if headers is None else headers.get("authorization")

    @property
    def key_id(self) -> str | None:
        return self.services.api_keys.identify(self.authorization)

    @property
    def client_id(self) -> str:
        """Who limits are counted for: the API key, else the client's address."""
        key = self.key_id
        if key is not None:
            return key
        client = getattr(self.request, "client", None)
        return f"address-{client.host}" if client is not None else "address-unknown"

    def release(self) -> None:
        """Drops what this request loaded (passes' results, node data) once its answer is
        sent. graphql-core's execution context is a reference cycle that holds this context:
        without it, all of that would wait for the cycle collector."""
        self.inference.release()
        self.node_data.release()

    def for_operation(self) -> RequestContext:
        """A context for one operation on this connection: the same client and key, loaders
        of its own (nothing one operation loaded is served stale to a later one or kept for
        the connection's life, and its inference figures and limits are its own)."""
        ctx = RequestContext.create(self.services, request=self.request, response=self.response)
        ctx.connection_params = self.connection_params
        return ctx

    @classmethod
    def create(
        cls,
        services: Services | ModelRegistry,
        settings: Settings | None = None,
        request: Any = None,
        response: Any = None,
    ) -> RequestContext:
        if isinstance(services, ModelRegistry):
            services = Services(services, settings or Settings())
        return cls(
            services,
            InferenceLoader(
                services.registry,
                services.runner,
                services.results,
                max_pass_tokens=services.settings.max_pass_tokens,
            ),
            NodeDataLoaders(services.registry, services.cache),
            request,
            response,
        )
