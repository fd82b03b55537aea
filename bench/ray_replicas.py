"""Throughput through one GraphQL server with the model in one or two Ray Serve replicas.

One Ray head, three applications of the same model side by side (only one is driven at a
time): one replica with 1 CPU, one replica with 2 CPUs, two replicas with 1 CPU each (Ray sets a
replica's torch threads to its CPUs; the head offers 5 logical CPUs so that all three fit, on a
machine of 2 cores). One `interpql serve --ray` per application, and an in-process server for
comparison; 16 client threads with distinct prompts drive each in turn, three alternating runs.
Throughput is requests per second (medians reported); rows per pass come from the replicas'
counters.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from contextlib import ExitStack
from typing import Any

import httpx

from bench.common import save, server
from bench.concurrency import throughput
from tests.processes import ray_head

# name -> (replicas, CPUs per replica)
LAYOUTS = {"1x1cpu": (1, 1), "1x2cpu": (1, 2), "2x1cpu": (2, 1)}


def deploy(address: str, model: str, app: str, replicas: int, cpus: int) -> None:
    command = [sys.executable, "-m", "interpql.cli", "deploy", "--ray", address, "--app", app]
    command += ["--model", model, "--replicas", str(replicas), "--num-cpus", str(cpus)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    print(done.stdout.strip().splitlines()[0], flush=True)


def rows_per_pass(address: str, app: str) -> float:
    from interpql.backends.ray_serve.client import connect

    stats = connect(address, app).stats()
    return sum(s.rows for s in stats) / max(1, sum(s.passes for s in stats))


def main(
    clients: int = 16, rounds: int = 5, runs: int = 3, model: str = "random:gpt2-small"
) -> dict[str, Any]:
    # Clients repeat their prompts: without the run cache every request computes.
    no_cache = ("--cached-runs", "0")
    with ExitStack() as stack:
        logical = sum(replicas * cpus for replicas, cpus in LAYOUTS.values())
        address = stack.enter_context(ray_head(num_cpus=logical))
        urls = {}
        for app, (replicas, cpus) in LAYOUTS.items():
            deploy(address, model, app, replicas, cpus)
            urls[app] = stack.enter_context(server("--ray", address, "--app", app, *no_cache))
        urls["in-process"] = stack.enter_context(server("--model", model, *no_cache))
        name = httpx.post(urls["in-process"] + "/graphql", json={"query": "{ models { name } }"})
        model_name = name.json()["data"]["models"][0]["name"]
        for url in urls.values():
            throughput(url, model_name, clients, 2)  # warm-up: weights fetched, threads up
        rps: dict[str, list[float]] = {layout: [] for layout in urls}
        for _ in range(runs):
            for layout, url in urls.items():
                rps[layout].append(throughput(url, model_name, clients, rounds))
                print(layout, f"{rps[layout][-1]:.2f} req/s", flush=True)
        passes = {app: rows_per_pass(address, app) for app in LAYOUTS}
    medians = {layout: statistics.median(values) for layout, values in rps.items()}
    result = {
        "model": model_name,
        "clients": clients,
        "requests_per_run": clients * rounds,
        "rps": rps,
        "median_rps": medians,
        "rows_per_pass": passes,
        "two_replicas_over_one_2cpu": medians["2x1cpu"] / medians["1x2cpu"],
        "two_replicas_over_one_1cpu": medians["2x1cpu"] / medians["1x1cpu"],
    }
    save("ray_replicas", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="random:gpt2-small")
    options = parser.parse_args()
    main(options.clients, options.rounds, options.runs, options.model)
