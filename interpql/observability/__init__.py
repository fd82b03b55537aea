"""What an operator sees of a running server: a structured log line per GraphQL operation
(request_log), Prometheus metrics at /metrics (metrics), OpenTelemetry traces with --otel
(tracing) and CUDA memory snapshots with --cuda-memory-debugging (memory_snapshots).
`app.Observability` is what `create_app` wires of them. Nothing is imported here, so that the
command line can read `log_format` without loading the server."""
