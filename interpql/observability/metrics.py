"""Prometheus metrics, served at GET /metrics in the text exposition format.

Every app owns its own `CollectorRegistry` (never prometheus_client's global one), so several
apps in one process (tests) count separately. Requests and passes are counted as they end;
what services already hold (jobs, the node-data cache, the process) is read at each scrape.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from interpql.loaders.inference_stats import InferenceStats
from interpql.resolvers.context import Services

# prometheus_client's own variable: set before it is imported, values go to files there.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry()
        registry: CollectorRegistry | None = self.registry
        if multiprocess_dir() is not None:
            # --workers: each worker writes its values to files there (prometheus_client chose
            # them when it was imported), and a scrape, whichever worker answers it, adds up
            # every worker's files. The metrics themselves are then registered nowhere.
            MultiProcessCollector(self.registry, path=multiprocess_dir())  # type: ignore[no-untyped-call]
            registry = None
        self.requests = Counter(
            "interpql_graphql_requests",
            "GraphQL operations by type and outcome: ok, or the code of the first error.",
            ["operation_type", "outcome"],
            registry=registry,
        )
        self.errors = Counter(
            "interpql_graphql_errors",
            "Errors in GraphQL responses, by code.",
            ["code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "interpql_graphql_request_duration_seconds",
            "How long GraphQL operations took, from request to response.",
            ["operation_type"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "interpql_graphql_requests_in_flight",
            "GraphQL operations running now (subscriptions while they stream).",
            registry=registry,
            multiprocess_mode="livesum",  # over the workers that are alive
        )
        self.pass_seconds = Histogram(
            "interpql_inference_pass_duration_seconds",
            "Time on the model's worker per batched pass (forward, and backward when asked).",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.pass_rows = Histogram(
            "interpql_inference_batch_size",
            "Prompts (rows) per pass.",
            ["model"],
            buckets=ROWS_BUCKETS,
            registry=registry,
        )
        self.work_seconds = Histogram(
            "interpql_model_work_duration_seconds",
            "Time on the model's worker per piece of work: batched passes (work=pass; "
            "generation's steps are passes too), and whole generations, similar nodes and "
            "scored tokens.",
            ["model", "work"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.coalesced_rows = Counter(
            "interpql_inference_coalesced_rows",
            "Prompts that ran in one pass with other requests' prompts.",
            registry=registry,
        )
        self.run_cache = Counter(
            "interpql_run_cache_lookups",
            "Lookups of earlier requests' runs (--cached-runs): hit or miss.",
            ["result"],
            registry=registry,
        )
        if registry is not None:
            # process_resident_memory_bytes, CPU, open files: one process's, so not with
            # --workers (prometheus_client's multiprocess mode has none).
            ProcessCollector(registry=registry)
        self.registry.register(_ServicesCollector(services))
        if services.runner is not None:
            services.runner.pass_observers.append(self.observe_pass)

    def observe_pass(self, model: str, work: str, rows: int, seconds: float) -> None:
        self.work_seconds.labels(model, work).observe(seconds)
        if work == "pass":
            self.pass_seconds.labels(model).observe(seconds)
            self.pass_rows.labels(model).observe(rows)

    def observe_request(
        self, operation_type: str, error_codes: list[str], seconds: float, stats: InferenceStats
    ) -> None:
        outcome = error_codes[0] if error_codes else "ok"
        self.requests.labels(operation_type, outcome).inc()
        for code in error_codes:
            self.errors.labels(code).inc()
        self.request_seconds.labels(operation_type).observe(seconds)
        self.coalesced_rows.inc(stats.coalesced_rows)
        self.run_cache.labels("hit").inc(stats.run_cache_hits)
        self.run_cache.labels("miss").inc(stats.run_cache_misses)

    def route(self) -> Route:
        async def metrics(_: Request) -> Response:
            files = multiprocess_dir()
            if files is not None:
                forget_dead_workers(files)
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return Route("/metrics", metrics, methods=["GET"])


def multiprocess_dir() -> str | None:
    """Where workers' metric files go (cli.py sets it for --workers), or None."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def forget_dead_workers(path: str) -> None:
    """Drops the live gauges (requests in flight) of worker processes that have died.
    prometheus_client keeps a file of them per process, and one killed mid-request would count
    its requests in flight for ever; its counters and histograms stay, since what they
    counted happened."""
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


class _ServicesCollector(Collector):
    """What the services hold, read at each scrape."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "interpql_jobs", "Explaining and scoring jobs by status.", labels=["status"]
        )
        for status, count in self._services.jobs.counts().items():
            jobs.add_metric([status.value], count)
        yield jobs
        cache = self._services.cache
        if cache is not None:
            lookups = CounterMetricFamily(
                "interpql_node_data_cache_lookups",
                "Node data (records, explanations) of slow sources looked up in the cache.",
                labels=["result"],
            )
            lookups.add_metric(["hit"], cache.hits)
            lookups.add_metric(["miss"], cache.misses)
            yield lookups
        # Python's own heap, apart from what the C allocator keeps of freed memory (which
        # swings the RSS by ±10% under load): a leak of Python objects shows here first.
        blocks = GaugeMetricFamily(
            "interpql_python_allocated_blocks",
            "Memory blocks Python's allocator holds now, in the process that answers the scrape "
            "(sys.getallocatedblocks).",
        )
        blocks.add_metric([], sys.getallocatedblocks())
        yield blocks
