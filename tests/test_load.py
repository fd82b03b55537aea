"""The load test's short form (bench/load.py): concurrent clients against a real `interpql serve`
of the demo model, through the same code as `make bench`."""

from __future__ import annotations

from bench.common import server
from bench.load import MAX_HEAP_GROWTH, MAX_RSS_GROWTH, measure, print_report, server_pid

CLIENTS = 24
SECONDS = 20.0
# At least this long, and on until the server's heap settles (bench.load.warm_up). The RSS
# alone made a flaky judge: after a fixed 20 s warm-up it grew 10-25% in some runs (most often
# in the whole suite, when other tests' servers shared the 2 cores) while tracemalloc showed
# Python's heap +3% over 50 s more of the mix, all of it in bounded caches.
WARMUP_S = 15.0


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
    assert report.heap_growth <= MAX_HEAP_GROWTH, (
        f"server's Python heap grew {report.heap_growth:.1%} after warm-up "
        f"({report.heap_after_warmup:,} -> {report.heap_at_end:,} blocks)"
    )
    assert report.rss_growth <= MAX_RSS_GROWTH, (
        f"server RSS grew {report.rss_growth:.1%} after warm-up "
        f"({report.rss_start_mb} -> {report.rss_end_mb} MB)"
    )
