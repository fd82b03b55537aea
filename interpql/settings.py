"""Server settings: limits and policies, set from the command line or by tests."""

from __future__ import annotations

from dataclasses import dataclass


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
