"""OpenTelemetry tracing (`interpql serve --otel`): a span per operation, with spans for its
parsing, validation and each field that has a resolver of its own, exported over OTLP/HTTP.

strawberry's synchronous extension is used: its resolver spans time the synchronous part of a
resolver (for an async resolver, until its coroutine is created), while the asynchronous
extension, which awaits every resolver inside its span, costs far more on large queries. The
operation span covers the whole operation either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from strawberry.extensions import SchemaExtension

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
MISSING = (
    "--otel needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http "
    "(pip install 'interpql[otel]')"
)


def otlp_tracer_provider(endpoint: str | None = None) -> Any:
    """An SDK TracerProvider that exports spans in batches over OTLP/HTTP to `endpoint` (a
    collector's base URL, e.g. http://collector:4318), else to what the standard variables
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT say, else to
    http://localhost:4318. The service is named $OTEL_SERVICE_NAME, else `interpql`."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ImportError(f"{MISSING}: {exc}") from exc
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "interpql")})
    provider = TracerProvider(resource=resource)
    traces_url = None if endpoint is None else endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))
    return provider


def tracing_extension(tracer_provider: Any) -> Callable[[], SchemaExtension]:
    """A factory of strawberry's sync OpenTelemetry extension, tracing to `tracer_provider`."""
    from strawberry.extensions.tracing import OpenTelemetryExtensionSync

    def extension() -> SchemaExtension:
        return OpenTelemetryExtensionSync(tracer_provider=tracer_provider)

    return extension
