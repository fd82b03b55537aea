"""The load test's short form (bench/load.py): concurrent clients against a real `interpql serve`
of the demo model, through the same code as `make bench`."""

from __future__ import annotations

from bench.common import server
from bench.load import MAX_RSS_GROWTH, measure, print_report, server_pid

CLIENTS = 24
SECONDS = 20.0
# Long enough for the allocator to reach the mix's high-water mark on 2 cores: after 10 s the
# server's RSS was still rising in some runs (750 MB idle after warm-up, 910 MB at the end of
# the run, then flat), which read as growth though nothing leaked.
WARMUP_S = 20.0


def test_mixed_load_has_no_unexpected_answers_and_no_memory_growth() -> None:
    # bench.common.server sends the server's access log to /dev/null: through a pipe nobody
    # reads, thousands of requests would fill it and stall the server.
    with server() as url:
        report = measure(url, server_pid(url), CLIENTS, SECONDS, WARMUP_S)
    print_report(report)
    assert report.unexpected == 0 and report.warmup_unexpected == 0, report.unexpected_samples
    # Every kind of the mix ran, the invalid ones included.
    assert {"infer", "infer_batch", "node", "search", "depth_bomb"} <= report.latency.keys()
    assert report.requests >= 100, f"only {report.requests} requests in {SECONDS} s"
    assert report.rss_growth <= MAX_RSS_GROWTH, (
        f"server RSS grew {report.rss_growth:.1%} after warm-up "
        f"({report.rss_start_mb} -> {report.rss_end_mb} MB)"
    )
