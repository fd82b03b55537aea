"""Load test: N concurrent clients (default 64) for D seconds (default 60) of mixed queries
against a real `interpql serve` (the embedded demo by default) on loopback.

Each client is one `httpx.AsyncClient` with one keep-alive connection, sending the next request
as soon as the previous one is answered. The mix covers metadata, stored node data (one node and
twenty at a time), search, tokenizing, inference (activations, predictions, top nodes with and
without a backward pass), batched inference, and a share of invalid requests that must come
back as typed errors. A warm-up of the same mix runs first (caches fill, every code path is
taken once), for at least --warmup seconds and on until the server's heap stops growing; the
server's heap and RSS are read after it and at the end.

Unexpected: a transport error or timeout, a 5xx, a body that is not a GraphQL JSON object, an
error on a valid request, an error code other than the one an invalid request must get, or
text that leaks internals (a traceback, a source path). The exit status is 1 when there is any
unexpected answer, or when Python's heap grew by more than 10% after warm-up (the RSS, which
swings with the batches in flight, by more than 35%).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import psutil

import interpql.errors
from bench.common import save, server

# Generous: a request this slow on loopback is stuck, not busy.
REQUEST_TIMEOUT_S = 60.0
# A leak is judged on Python's heap (interpql_python_allocated_blocks, read from /metrics
# while the server is idle), which swings by a few percent: what a leak of Python objects
# changes. The RSS is checked for gross native leaks only: under this mix it swings by 10-25%
# between 7-second windows with the batches in flight and what the C allocator keeps of them.
MAX_HEAP_GROWTH = 0.10
MAX_RSS_GROWTH = 0.35
UNEXPECTED_SAMPLES = 20
# The warm-up reads every node the mix can ask for (the node-data caches fill), then goes on,
# round by round, until a round grew Python's heap by at most SETTLED_GROWTH: other bounded
# caches fill over many requests, which a machine busy with other work takes longer to send.
WARMUP_ROUND_S = 5.0
SETTLED_GROWTH = 0.02


def documented_codes() -> frozenset[str]:
    """Every `extensions.code` a client may see: those listed at the top of interpql/errors.py
    (its tree of codes, and the codes graphql's own errors are mapped to)."""
    doc = interpql.errors.__doc__ or ""
    tree = re.findall(r"── ([A-Z][A-Z_]+)\s", doc)
    mapped = re.findall(r"\b[A-Z]+(?:_[A-Z]+)+\b", doc.partition("Codes graphql")[2])
    return frozenset(tree) | frozenset(mapped)


# A traceback's marks. Plain paths are left alone: AutoencoderInfo.source is one, by design.
LEAK_PATTERNS = ("Traceback", "site-packages", 'File "', '.py", line')


def leaked_internals(text: str, sent: str = "") -> str | None:
    """The first sign of internals (a traceback, a source path) in a response, or None; signs
    that are in what was `sent` are an echo of it (e.g. in an error message), not a leak."""
    return next((p for p in LEAK_PATTERNS if p in text and p not in sent), None)


@dataclass(frozen=True)
class Demo:
    """What the mix needs to know about the served model."""

    name: str
    n_layers: int
    n_heads: int
    d_mlp: int
    search_words: tuple[str, ...]


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to build it, and which error codes it must get (none: it must
    succeed)."""

    name: str
    weight: int
    build: Callable[[Demo, random.Random], dict[str, Any]]
    expect: frozenset[str] = frozenset()


PROMPT_STARTS = (
    "def {name}(x):\n    return x +",
    "import os\nfor {name} in range(",
    "class {name}:\n    def __init__(self):\n        self.",
    "The {name} module provides",
    "if {name} is None:\n    raise ValueError(",
    "# {name}: read the file and",
)


def _prompt(rng: random.Random) -> str:
    # Mostly new prompts, so most inference requests run the model rather than hit the cache.
    name = f"item_{rng.randrange(1_000_000)}"
    return rng.choice(PROMPT_STARTS).format(name=name)


def _node_id(demo: Demo, rng: random.Random, kind: str = "mlp_neuron") -> str:
    count = demo.n_heads if kind == "attention_head" else demo.d_mlp
    return f"{demo.name}/{kind}/{rng.randrange(demo.n_layers)}/{rng.randrange(count)}"


def _metadata(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "{ models { name nLayers dModel nCtx nodeKinds { kind count } "
        "autoencoders { kind layer nLatents } layers { index nodeKinds { kind count } } } }"
    }


def _node(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($id: ID!) { node(id: $id) { id kind layerIndex index "
        "topActivations(first: 5) { tokens activations maxActivation } "
        "statistics { max mean density } bestExplanation { text score } } }",
        "variables": {"id": _node_id(demo, rng)},
    }


def _nodes(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($ids: [ID!]!) { nodes(ids: $ids) { id "
        "topActivations(first: 2) { tokens activations } bestExplanation { text score } } }",
        "variables": {"ids": [_node_id(demo, rng) for _ in range(20)]},
    }


def _search(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($t: String!) { searchNodes(text: $t, first: 10) { totalCount "
        "edges { score matchedExplanation node { id } } } }",
        "variables": {"t": rng.choice(demo.search_words)},
    }


def _tokenize(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($m: String!, $t: String!) { model(name: $m) { tokenize(text: $t) "
        "{ index id text } } }",
        "variables": {"m": demo.name, "t": _prompt(rng)},
    }


def _infer(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($m: String!, $p: String!, $ids: [ID!]!) { model(name: $m) { "
        "infer(input: {prompt: $p}) { loss tokens { text } topPredictions(k: 5) { token { text } "
        "probability } activations(nodeIds: $ids) { values maxValue } "
        "topNodes(group: ACTIVATION, k: 10) { top { node { id } value } } } } }",
        "variables": {
            "m": demo.name,
            "p": _prompt(rng),
            "ids": [_node_id(demo, rng), _node_id(demo, rng, "attention_head")],
        },
    }


def _attribution(demo: Demo, rng: random.Random) -> dict[str, Any]:
    # A backward pass too, and an ablation.
    return {
        "query": "query($m: String!, $p: String!, $n: ID!) { model(name: $m) { "
        "infer(input: {prompt: $p, ablations: [{nodeId: $n, value: 0}]}) { objective "
        "topNodes(group: ACT_TIMES_GRAD, k: 10) { top { node { id } value } tokenSums } } } }",
        "variables": {"m": demo.name, "p": _prompt(rng), "n": _node_id(demo, rng)},
    }


def _infer_batch(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($m: String!, $inputs: [InferenceInput!]!) { model(name: $m) { "
        "inferBatch(inputs: $inputs) { loss batchSize topPredictions(k: 3) { token { id } } } } }",
        "variables": {"m": demo.name, "inputs": [{"prompt": _prompt(rng)} for _ in range(4)]},
    }


def _unknown_node(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($id: ID!) { node(id: $id) { id } }",
        "variables": {"id": f"{demo.name}/mlp_neuron/{demo.n_layers + rng.randrange(9)}/0"},
    }


def _empty_prompt(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": 'query($m: String!) { model(name: $m) { infer(input: {prompt: ""}) { loss } } }',
        "variables": {"m": demo.name},
    }


def _syntax_error(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {"query": "{ models { name " * rng.randint(1, 3)}


def _wrong_type(demo: Demo, rng: random.Random) -> dict[str, Any]:
    return {
        "query": "query($m: String!, $i: Int!) { model(name: $m) { layer(index: $i) { index } } }",
        "variables": {"m": demo.name, "i": "not a number"},
    }


def _depth_bomb(demo: Demo, rng: random.Random) -> dict[str, Any]:
    depth = 20 + rng.randrange(20)
    return {"query": "{ models { " + "layers { model { " * depth + "name" + " } }" * depth + " } }"}


KINDS = (
    Kind("metadata", 8, _metadata),
    Kind("node", 14, _node),
    Kind("nodes", 8, _nodes),
    Kind("search", 10, _search),
    Kind("tokenize", 6, _tokenize),
    Kind("infer", 18, _infer),
    Kind("attribution", 8, _attribution),
    Kind("infer_batch", 6, _infer_batch),
    Kind("unknown_node", 4, _unknown_node, frozenset({"INVALID_NODE"})),
    Kind("empty_prompt", 4, _empty_prompt, frozenset({"EMPTY_PROMPT"})),
    Kind("syntax_error", 4, _syntax_error, frozenset({"GRAPHQL_PARSE_FAILED"})),
    Kind("wrong_type", 3, _wrong_type, frozenset({"BAD_USER_INPUT"})),
    Kind("depth_bomb", 3, _depth_bomb, frozenset({"QUERY_TOO_COMPLEX"})),
)


def unexpected_in(kind: Kind, status: int, content: bytes) -> str | None:
    """Why this answer to a request of `kind` is unexpected, or None when it is as it must be."""
    text = content.decode("utf-8", "replace")
    leak = leaked_internals(text)
    if leak is not None:
        return f"{kind.name}: {status}, response shows internals ({leak!r})"
    if status >= 500:
        return f"{kind.name}: HTTP {status}: {text[:200]}"
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return f"{kind.name}: HTTP {status}, not JSON: {text[:200]}"
    if not isinstance(body, dict):
        return f"{kind.name}: HTTP {status}, not a JSON object: {text[:200]}"
    errors = body.get("errors") or []
    codes = [(e.get("extensions") or {}).get("code") for e in errors if isinstance(e, dict)]
    if not kind.expect:
        if status != 200 or errors or body.get("data") is None:
            return f"{kind.name}: HTTP {status}, errors {codes}: {text[:200]}"
        return None
    if not codes or any(code not in kind.expect for code in codes):
        return f"{kind.name}: HTTP {status}, codes {codes}, expected {sorted(kind.expect)}"
    return None


@dataclass
class Tally:
    """What the clients saw, per kind; filled from the one event loop the clients run on."""

    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    unexpected: int = 0
    unexpected_samples: list[str] = field(default_factory=list)

    def record(self, kind: str, seconds: float, problem: str | None) -> None:
        self.latencies_s.setdefault(kind, []).append(seconds)
        if problem is not None:
            self.unexpected += 1
            if len(self.unexpected_samples) < UNEXPECTED_SAMPLES:
                self.unexpected_samples.append(problem)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies_s.values())


async def _client(
    url: str,
    demo: Demo,
    rng: random.Random,
    deadline: float,
    tally: Tally,
    pick: Callable[[random.Random], Kind],
) -> None:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(
        base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, headers=headers
    ) as client:
        while time.monotonic() < deadline:
            kind = pick(rng)
            content = orjson.dumps(kind.build(demo, rng))
            started = time.perf_counter()
            try:
                response = await client.post("/graphql", content=content)
                problem = unexpected_in(kind, response.status_code, response.content)
            except httpx.HTTPError as error:
                problem = f"{kind.name}: transport error {type(error).__name__}: {error}"
            tally.record(kind.name, time.perf_counter() - started, problem)


async def drive(url: str, demo: Demo, clients: int, seconds: float, seed: int = 0) -> Tally:
    """`clients` concurrent clients sending the mix for `seconds`; requests under way at the
    end are waited for and counted."""
    tally = Tally()
    weights = [k.weight for k in KINDS]

    def pick(rng: random.Random) -> Kind:
        return rng.choices(KINDS, weights)[0]

    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(
            _client(url, demo, random.Random(seed * 100_003 + i), deadline, tally, pick)
            for i in range(clients)
        )
    )
    return tally


def describe_demo(url: str) -> Demo:
    """The first served model, and words its explanations use (for search)."""
    body = httpx.post(
        url + "/graphql",
        json={"query": "{ models { name nLayers nHeads dMlp } }"},
        timeout=REQUEST_TIMEOUT_S,
    ).json()
    model = body["data"]["models"][0]
    return Demo(
        name=model["name"],
        n_layers=model["nLayers"],
        n_heads=model["nHeads"],
        d_mlp=model["dMlp"],
        search_words=("python", "token", "def", "import", "string", "number", "return", "list"),
    )


def server_pid(url: str) -> int:
    """The `interpql serve` child of this process that listens on `url`'s port."""
    port = str(urlsplit(url).port)
    for child in psutil.Process().children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "serve" in command and port in command:
            return int(child.pid)
    raise RuntimeError(f"no server process of ours listens on {url}")


class RssSampler:
    """A process's RSS every `interval_s`, sampled in a thread while the block runs."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (seconds since the block began, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval_s):
            self.samples.append((time.monotonic() - started, self.process.memory_info().rss))

    def median_between(self, start_s: float, end_s: float) -> int:
        window = [rss for at, rss in self.samples if start_s <= at < end_s]
        return int(statistics.median(window)) if window else self.process.memory_info().rss

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)

    def at(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    return {
        "n": len(ms),
        "mean_ms": round(statistics.fmean(ms), 1),
        "p50_ms": round(at(0.50), 1),
        "p90_ms": round(at(0.90), 1),
        "p99_ms": round(at(0.99), 1),
        "max_ms": round(ms[-1], 1),
    }


@dataclass(frozen=True)
class LoadReport:
    clients: int
    seconds: float
    warmup_s: float  # the warm-up's length: at least the asked-for, until the RSS settled
    requests: int
    rps: float
    unexpected: int
    unexpected_samples: list[str]
    warmup_unexpected: int
    latency: dict[str, dict[str, float]]
    # The server's RSS under load swings by ±10% with the batches in flight (and with what
    # the allocator keeps of them): start and end are medians over the run's first and last
    # third.
    rss_start_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    rss_idle_after_warmup_mb: float
    rss_idle_at_end_mb: float
    rss_growth: float
    # Python's heap in allocated blocks, idle after warm-up and after the run.
    heap_after_warmup: int
    heap_at_end: int
    heap_growth: float

    @property
    def passed(self) -> bool:
        no_errors = self.unexpected == 0 and self.warmup_unexpected == 0
        no_growth = self.heap_growth <= MAX_HEAP_GROWTH and self.rss_growth <= MAX_RSS_GROWTH
        return no_errors and no_growth


def python_heap(url: str) -> int:
    """The server's Python heap in allocated blocks, from its /metrics."""
    text = httpx.get(url + "/metrics", timeout=REQUEST_TIMEOUT_S).text
    found = re.search(r"^interpql_python_allocated_blocks (\S+)$", text, re.M)
    if found is None:
        raise RuntimeError(f"{url}/metrics has no interpql_python_allocated_blocks")
    return int(float(found.group(1)))


def read_every_node(url: str, demo: Demo) -> None:
    """Every node the mix asks for, with what it asks of them: the bounded caches of node data
    fill now, not over the thousands of requests that random picks would take."""
    query = (
        "query($ids: [ID!]!) { nodes(ids: $ids) { id topActivations(first: 5) { tokens "
        "activations maxActivation } statistics { max mean density } bestExplanation "
        "{ text score } } }"
    )
    ids = [
        f"{demo.name}/{kind}/{layer}/{index}"
        for kind, count in (("mlp_neuron", demo.d_mlp), ("attention_head", demo.n_heads))
        for layer in range(demo.n_layers)
        for index in range(count)
    ]
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for start in range(0, len(ids), 256):
            variables = {"ids": ids[start : start + 256]}
            body = client.post("/graphql", json={"query": query, "variables": variables}).json()
            if "errors" in body:
                raise RuntimeError(f"reading every node failed: {body['errors'][0]}")


def warm_up(url: str, demo: Demo, clients: int, min_s: float, max_s: float) -> tuple[Tally, float]:
    """Every node read once, then the mix for at least `min_s` and on until a round grew the
    server's heap by at most SETTLED_GROWTH (or `max_s`: a real leak never settles, and the
    measured run that follows shows it). Returns what the clients saw and how long it ran."""
    read_every_node(url, demo)
    warmup = Tally()
    heap_before, ran_s, seed = python_heap(url), 0.0, 1
    while True:
        round_tally = asyncio.run(drive(url, demo, clients, WARMUP_ROUND_S, seed=seed))
        for kind, latencies in round_tally.latencies_s.items():
            warmup.latencies_s.setdefault(kind, []).extend(latencies)
        warmup.unexpected += round_tally.unexpected
        room = UNEXPECTED_SAMPLES - len(warmup.unexpected_samples)
        warmup.unexpected_samples.extend(round_tally.unexpected_samples[:room])
        heap = python_heap(url)
        ran_s += WARMUP_ROUND_S
        seed += 1
        settled = heap <= heap_before * (1 + SETTLED_GROWTH)
        if ran_s >= max_s or (ran_s >= min_s and settled):
            return warmup, ran_s
        heap_before = heap


def measure(
    url: str, pid: int, clients: int, seconds: float, warmup_s: float, max_warmup_s: float = 60
) -> LoadReport:
    """Warm-up (at least `warmup_s`, until the heap settles), then the measured run with the
    RSS of `pid` sampled throughout."""
    demo = describe_demo(url)
    process = psutil.Process(pid)
    warmup, warmup_s = warm_up(url, demo, clients, warmup_s, max(warmup_s, max_warmup_s))
    idle_after_warmup = process.memory_info().rss
    heap_after_warmup = python_heap(url)
    with RssSampler(pid) as sampler:
        started = time.perf_counter()
        tally = asyncio.run(drive(url, demo, clients, seconds, seed=2))
        elapsed = time.perf_counter() - started
    idle_at_end = process.memory_info().rss
    heap_at_end = python_heap(url)
    rss_start = sampler.median_between(0, seconds / 3)
    rss_end = sampler.median_between(seconds * 2 / 3, seconds)
    peak = max([rss for _, rss in sampler.samples] + [idle_at_end])
    everything = [s for values in tally.latencies_s.values() for s in values]
    latency = {kind: percentiles(v) for kind, v in sorted(tally.latencies_s.items())}
    latency["all"] = percentiles(everything)

    def mb(rss: int) -> float:
        return round(rss / 2**20, 1)

    return LoadReport(
        clients=clients,
        seconds=seconds,
        warmup_s=warmup_s,
        requests=tally.requests,
        rps=round(tally.requests / elapsed, 1),
        unexpected=tally.unexpected,
        unexpected_samples=warmup.unexpected_samples + tally.unexpected_samples,
        warmup_unexpected=warmup.unexpected,
        latency=latency,
        rss_start_mb=mb(rss_start),
        rss_end_mb=mb(rss_end),
        rss_peak_mb=mb(peak),
        rss_idle_after_warmup_mb=mb(idle_after_warmup),
        rss_idle_at_end_mb=mb(idle_at_end),
        rss_growth=round(rss_end / rss_start - 1, 4),
        heap_after_warmup=heap_after_warmup,
        heap_at_end=heap_at_end,
        heap_growth=round(heap_at_end / heap_after_warmup - 1, 4),
    )


def print_report(report: LoadReport) -> None:
    print(
        f"{report.clients} clients, {report.seconds:g} s after {report.warmup_s:g} s warm-up: "
        f"{report.requests} requests, {report.rps} req/s, {report.unexpected} unexpected "
        f"({report.warmup_unexpected} in warm-up)"
    )
    print(f"{'kind':<14}{'n':>7}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind, row in report.latency.items():
        print(
            f"{kind:<14}{row['n']:>7}{row['p50_ms']:>10}{row['p90_ms']:>10}"
            f"{row['p99_ms']:>10}{row['max_ms']:>10}"
        )
    print(
        f"server RSS (medians of the first and last third): {report.rss_start_mb} -> "
        f"{report.rss_end_mb} MB ({report.rss_growth:+.1%}; limit +{MAX_RSS_GROWTH:.0%}); "
        f"peak {report.rss_peak_mb} MB; idle {report.rss_idle_after_warmup_mb} MB after "
        f"warm-up, {report.rss_idle_at_end_mb} MB at the end"
    )
    print(
        f"server's Python heap, idle: {report.heap_after_warmup:,} blocks after warm-up, "
        f"{report.heap_at_end:,} at the end ({report.heap_growth:+.1%}; "
        f"limit +{MAX_HEAP_GROWTH:.0%})"
    )
    for sample in report.unexpected_samples:
        print("unexpected:", sample)


def main(
    clients: int = 64, seconds: float = 60, warmup_s: float = 10, serve_args: tuple[str, ...] = ()
) -> LoadReport:
    with server(*serve_args) as url:
        report = measure(url, server_pid(url), clients, seconds, warmup_s)
    print_report(report)
    save("load", {"serve_args": list(serve_args), **asdict(report), "passed": report.passed})
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--warmup", type=float, default=10, help="least seconds of warm-up (on until RSS settles)"
    )
    parser.add_argument(
        "serve_args", nargs="*", help="passed to `interpql serve` (after --), e.g. --model ..."
    )
    options = parser.parse_args()
    result = main(options.clients, options.seconds, options.warmup, tuple(options.serve_args))
    sys.exit(0 if result.passed else 1)
