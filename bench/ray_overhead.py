"""What the Ray Serve deployment adds to one request: a single client's `infer` (the top
predictions of a 64-token prompt) through `interpql serve --ray` against an in-process server,
alternately, on a GPT-2-small-shaped random model (one replica with 2 CPUs); and the bytes of
the result that crosses from the replica to the server (pickled), for this request."""

from __future__ import annotations

import argparse
import pickle
import statistics
from contextlib import ExitStack
from typing import Any

import httpx

from bench.common import save, server, summary, timed
from bench.ray_replicas import deploy
from interpql.backends.base import ForwardRequest, LogitPositions
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.ray_serve import merging
from tests.processes import ray_head

QUERY = """query($p: String!, $m: String!) { model(name: $m) { infer(input: {prompt: $p}) {
  topPredictions(k: 5) { token { text } probability } } } }"""


def crossing_bytes() -> dict[str, int]:
    """The pickled result a replica sends back for this request, with every position's logits
    (what it sent before) and with the last position's alone (what the request needs)."""
    backend = NativeGPT2Backend.load("random:gpt2-small")
    tokens = tuple(backend.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8))
    sizes = {}
    for name, positions in (("every_position", LogitPositions.ALL), ("last", LogitPositions.LAST)):
        request = ForwardRequest(tokens=(tokens[:64],), logits=positions)
        [part] = merging.split(backend.forward(merging.merge([request])), [request])
        sizes[name] = len(pickle.dumps(part))
    return sizes


def main(repeats: int = 30, model: str = "random:gpt2-small") -> dict[str, Any]:
    prompt = "The quick brown fox jumps over the lazy dog. " * 7
    with ExitStack() as stack:
        address = stack.enter_context(ray_head(num_cpus=2))
        deploy(address, model, "overhead", 1, 2)
        # No run cache on either: every request computes.
        remote = stack.enter_context(
            server("--ray", address, "--app", "overhead", "--cached-runs", "0")
        )
        local = stack.enter_context(server("--model", model, "--cached-runs", "0"))
        client = stack.enter_context(httpx.Client(timeout=120))
        name = client.post(local + "/graphql", json={"query": "{ models { name } }"})
        variables = {"p": prompt, "m": name.json()["data"]["models"][0]["name"]}
        body = {"query": QUERY, "variables": variables}

        def ask(url: str) -> None:
            answer = client.post(url + "/graphql", json=body).json()
            assert "errors" not in answer, answer

        for _ in range(3):
            ask(remote)
            ask(local)
        times: dict[str, list[float]] = {"ray": [], "in_process": []}
        for _ in range(repeats):
            times["ray"].append(timed(lambda: ask(remote)))
            times["in_process"].append(timed(lambda: ask(local)))
    result = {
        "ray": summary(times["ray"]),
        "in_process": summary(times["in_process"]),
        "remote_over_local": statistics.median(times["ray"])
        / statistics.median(times["in_process"]),
        "result_bytes": crossing_bytes(),
    }
    save("ray_overhead", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    options = parser.parse_args()
    main(options.repeats)
