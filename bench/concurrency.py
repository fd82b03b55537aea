"""Throughput of 16 concurrent clients with distinct prompts, with and without coalescing.

Two `interpql serve` processes on the same model, one with the default coalescing window and one
with `--coalesce-ms 0`, driven alternately by the same 16 client threads (each sends its own
prompt) for a fixed number of rounds; throughput is requests per second over the whole run.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from bench.common import save, server

QUERY = """query($p: String!, $m: String!) { model(name: $m) { infer(input: {prompt: $p}) {
  loss topPredictions(k: 5) { token { text } } } } }"""


def throughput(url: str, model: str, clients: int, rounds: int) -> float:
    prompts = [f"def function_{i}(x):\n    return x * {i} + " for i in range(clients)]

    def client_loop(prompt: str) -> None:
        with httpx.Client(timeout=120) as client:
            for _ in range(rounds):
                body = client.post(
                    url + "/graphql",
                    json={"query": QUERY, "variables": {"p": prompt, "m": model}},
                ).json()
                assert "errors" not in body, body

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client_loop, prompts))
    return clients * rounds / (time.perf_counter() - started)


def main(clients: int = 16, rounds: int = 10, model: str | None = None) -> dict[str, Any]:
    # Clients repeat their prompts: without the run cache every request computes.
    args = (("--model", model) if model else ()) + ("--cached-runs", "0")
    with server(*args) as coalescing, server(*args, "--coalesce-ms", "0") as plain:
        name = httpx.post(coalescing + "/graphql", json={"query": "{ models { name } }"}).json()[
            "data"
        ]["models"][0]["name"]
        throughput(coalescing, name, clients, 2)  # warm-up
        throughput(plain, name, clients, 2)
        with_rps, without_rps = [], []
        for _ in range(3):
            with_rps.append(throughput(coalescing, name, clients, rounds))
            without_rps.append(throughput(plain, name, clients, rounds))
    result = {
        "model": name,
        "clients": clients,
        "requests_per_run": clients * rounds,
        "with_coalescing_rps": with_rps,
        "without_coalescing_rps": without_rps,
        "ratio_of_medians": sorted(with_rps)[1] / sorted(without_rps)[1],
        "target_ratio": 2.0,
    }
    save("concurrency", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model")
    options = parser.parse_args()
    main(options.clients, options.rounds, options.model)
