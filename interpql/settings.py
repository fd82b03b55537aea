"""Server settings: limits and policies, set from the command line or by tests. Each field
that is a flag of `interpql serve` declares it here, once (options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from interpql.options import groups, option

# The names a server always answers to (host_check.py).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Settings:
    max_query_depth: int = option(12, group=groups.LIMITS, help="depth of one GraphQL document")
    max_aliases: int = option(50, group=groups.LIMITS, help="aliases in one GraphQL document")
    max_query_tokens: int = option(
        5000, group=groups.LIMITS, help="lexical tokens of one GraphQL document"
    )
    max_top_k: int = 1000
    max_nodes_per_request: int = 10_000
    max_batch: int = option(64, group=groups.LIMITS, help="inputs of one inferBatch")
    max_pass_tokens: int = option(
        4096,
        group=groups.LIMITS,
        help="prompt tokens of one request's inputs that share a pass: a longer inferBatch "
        "runs in several passes, and other requests' passes run between them (0: one pass)",
    )
    coalesce_window_ms: float | None = option(
        None,
        flag="--coalesce-ms",
        help="how long concurrent requests wait to share a forward pass (0: never; default "
        "2, with --ray 0: the deployment batches)",
    )
    cached_runs: int = option(
        32, help="results kept to answer identical inputs again without a forward pass (0: none)"
    )
    # Before tokenizing: no GPT-2 token is longer than this many characters of text.
    max_chars_per_token: int = 128
    cors_origin_regex: str = option(
        r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?",
        group=groups.ACCESS,
        help="origins allowed by CORS and WebSocket handshakes (default: localhost on any port)",
    )
    allowed_hosts: tuple[str, ...] = option(
        LOOPBACK_NAMES,
        flag="--allowed-host",
        metavar="NAME",
        group=groups.ACCESS,
        help="a Host header name to answer to, besides the bind address and the loopback "
        "names (with --host 0.0.0.0: this machine's names and addresses too); repeatable; '*' "
        "answers any (requests to other names get 400: a guard against DNS rebinding)",
    )
    max_query_cost: int = option(
        250_000,
        group=groups.LIMITS,
        help="estimated cost of one operation: fields, plus prompt tokens x passes",
    )
    rate_limit_requests_per_minute: int = option(
        0,
        flag="--rate-limit-requests",
        group=groups.LIMITS,
        help="operations per minute per API key (or client address without one)",
    )
    rate_limit_cost_per_minute: int = option(
        0,
        flag="--rate-limit-cost",
        group=groups.LIMITS,
        help="estimated cost per minute per API key (or client address)",
    )
    header_timeout_s: float = option(
        10.0,
        flag="--header-timeout",
        group=groups.LIMITS,
        help="seconds a request's headers may take to arrive (0: unbounded)",
    )
    body_timeout_s: float = option(
        30.0,
        flag="--body-timeout",
        group=groups.LIMITS,
        help="seconds a request's body may take to arrive after its headers (0: unbounded)",
    )
    max_graph_tokens: int = option(
        128, group=groups.LIMITS, help="prompt tokens of one attribution graph"
    )
    graph_memory_mb: int = option(
        2048,
        group=groups.LIMITS,
        help="MiB an attribution graph's adjacency matrix may take (larger: RESOURCE_EXHAUSTED)",
    )
    max_graph_edges: int = option(
        200_000,
        group=groups.LIMITS,
        help="edges an attribution graph may keep after pruning (more: RESOURCE_EXHAUSTED)",
    )
    # Targets per batched backward pass of an attribution graph.
    graph_batch_size: int = 32
    max_body_bytes: int = option(
        2_000_000, group=groups.LIMITS, help="bytes of one HTTP body or WebSocket message"
    )
    inference_timeout_s: float = option(
        60.0,
        flag="--inference-timeout",
        group=groups.LIMITS,
        help="seconds a request may wait for its model work (forward passes, generation)",
    )
    require_api_key: bool = option(
        False,
        group=groups.ACCESS,
        help="every operation needs a key, not only mutations (WebSockets: in connection_init's "
        "payload as {'Authorization': 'Bearer <key>'} or the upgrade's header)",
    )
    introspection: bool = option(
        True,
        group=groups.ACCESS,
        help="--no-introspection refuses introspection queries and federation's _service { sdl "
        "}, and leaves schema suggestions ('Did you mean ...?') out of errors; GraphiQL's docs "
        "need introspection, and a federation gateway then composes from schema.graphql (the "
        "SDL `interpql export-schema` prints) instead of asking this server",
    )
    shutdown_grace_s: float = option(
        30.0,
        flag="--shutdown-grace",
        group=groups.LIMITS,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    metrics: bool = option(True, group=groups.OBSERVE, help="Prometheus metrics at GET /metrics")
    cuda_memory_debugging: bool = option(
        False,
        group=groups.OBSERVE,
        help="record CUDA allocations from start-up; POST /debug/cuda-memory-snapshot (with an "
        "API key) writes a snapshot for https://pytorch.org/memory_viz (needs --device cuda)",
    )
    cuda_memory_max_entries: int = option(
        100_000, group=groups.OBSERVE, help="allocation events the history keeps"
    )
    cuda_memory_snapshot_dir: str = option(
        ".interpql/memory-snapshots", group=groups.OBSERVE, help="where snapshots are written"
    )

    @property
    def coalesce_window_s(self) -> float:
        return (2.0 if self.coalesce_window_ms is None else self.coalesce_window_ms) / 1000
