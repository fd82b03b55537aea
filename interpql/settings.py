"""Server settings: limits and policies, set from the command line or by tests."""

from __future__ import annotations

from dataclasses import dataclass

from interpql.host_check import LOOPBACK_NAMES


@dataclass(frozen=True)
class Settings:
    max_query_depth: int = 12
    max_aliases: int = 50
    max_query_tokens: int = 5000
    max_top_k: int = 1000
    max_nodes_per_request: int = 10_000
    max_batch: int = 64
    # How long concurrent requests wait for each other to share a forward pass.
    coalesce_window_ms: float = 2.0
    # Runs kept for identical inputs (0: none).
    cached_runs: int = 32
    # Before tokenizing: no GPT-2 token is longer than this many characters of text.
    max_chars_per_token: int = 128
    cors_origin_regex: str = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
    # Host header names requests may be addressed to ("*": any); see host_check.py.
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    # The estimated work of one operation (interpql.schema.cost): fields, and inference tokens
    # weighted by the passes they need. 0: unlimited.
    max_query_cost: int = 250_000
    # Per API key (or per client address without one), over a sliding minute. 0: unlimited.
    rate_limit_requests_per_minute: int = 0
    rate_limit_cost_per_minute: int = 0
    # Seconds a request's headers may take to arrive (0: unbounded); see http_protocol.py.
    header_timeout_s: float = 10.0
    # Bytes of one HTTP body or WebSocket message.
    max_body_bytes: int = 2_000_000
    # How long one request may wait for its forward passes (queueing included).
    inference_timeout_s: float = 60.0
    # Every operation needs an API key, not only mutations.
    require_api_key: bool = False
    introspection: bool = True
    # On SIGTERM: how long in-flight requests may take to finish before the server exits.
    shutdown_grace_s: float = 30.0
    # Prometheus metrics at GET /metrics.
    metrics: bool = True
    # POST /debug/cuda-memory-snapshot writes snapshots here (allocations are recorded from
    # start-up: `interpql serve --cuda-memory-debugging`).
    cuda_memory_debugging: bool = False
    cuda_memory_max_entries: int = 100_000  # allocation events the history keeps
    cuda_memory_snapshot_dir: str = ".interpql/memory-snapshots"
