"""How long a small request waits while another client's long inferBatch runs, with the batch
in passes of --max-pass-tokens (default 4096) and in one pass (--max-pass-tokens 0).

Two `interpql serve` processes of the demo, without the run cache. On each, one client sends
long batches (64 prompts of about 200 tokens, ranked by act x grad: a forward and a backward
pass over ~13,000 tokens) back to back, while another sends a one-token-prompt `infer` every
50 ms and times it. Reported: the small requests' latencies (median, p90, max) and the long
batches' own durations, on each server.
"""

from __future__ import annotations

import argparse
import inspect
import json
import threading
import time
from typing import Any

import httpx

from bench.common import save, server, summary
from interpql.backends.tokenizer import gpt2_encoding

BATCH = """query($i: [InferenceInput!]!) { model(name: "tiny-stdlib") { inferBatch(inputs: $i) {
  topNodes(group: ACT_TIMES_GRAD, k: 5) { top { value } } } } }"""
SMALL = """query($p: String!) { model(name: "tiny-stdlib") { infer(input: {prompt: $p}) {
  topPredictions(k: 3) { probability } } } }"""


def long_prompts(count: int, tokens: int) -> list[str]:
    encoding = gpt2_encoding()
    source = encoding.encode(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
    return [encoding.decode(source[i * 37 : i * 37 + tokens]) for i in range(count)]


def measure(url: str, batches: int, prompts: list[str]) -> dict[str, Any]:
    batch_seconds: list[float] = []
    small_seconds: list[float] = []
    done = threading.Event()

    def long_client() -> None:
        with httpx.Client(timeout=600) as client:
            for _ in range(batches):
                started = time.perf_counter()
                inputs = [{"prompt": p} for p in prompts]
                body = client.post(
                    url + "/graphql", json={"query": BATCH, "variables": {"i": inputs}}
                ).json()
                assert "errors" not in body, body["errors"]
                batch_seconds.append(time.perf_counter() - started)
        done.set()

    def small_client() -> None:
        with httpx.Client(timeout=600) as client:
            n = 0
            while not done.is_set():
                n += 1
                started = time.perf_counter()
                # A new prompt each time: no answer comes from the run cache.
                body = client.post(
                    url + "/graphql", json={"query": SMALL, "variables": {"p": f" {n}"}}
                ).json()
                assert "errors" not in body, body["errors"]
                small_seconds.append(time.perf_counter() - started)
                time.sleep(0.05)

    threads = [threading.Thread(target=long_client), threading.Thread(target=small_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "small_request": {**summary(small_seconds), "max_ms": max(small_seconds) * 1000},
        "long_batch": summary(batch_seconds),
    }


def main(
    batches: int = 3, count: int = 64, tokens: int = 200, limits: tuple[int, ...] = (4096, 0)
) -> dict[str, Any]:
    """`limits`: the --max-pass-tokens of each server (0: one pass), the default's first."""
    prompts = long_prompts(count, tokens)
    results = {}
    for limit in limits:
        with server("--cached-runs", "0", "--max-pass-tokens", str(limit)) as url:
            measure(url, 1, prompts[:8])  # warm-up
            results[f"max_pass_tokens_{limit}"] = measure(url, batches, prompts)
    first, one_pass = results[f"max_pass_tokens_{limits[0]}"], results.get("max_pass_tokens_0")
    result = {
        "batch": {"prompts": count, "tokens_each": tokens, "batches": batches},
        **results,
    }
    if one_pass is not None:
        result["small_median_ratio_one_pass_to_first"] = (
            one_pass["small_request"]["median_ms"] / first["small_request"]["median_ms"]
        )
    save("fairness", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--limits", default="4096,0", help="--max-pass-tokens of each server")
    args = parser.parse_args()
    main(args.batches, args.prompts, args.tokens, tuple(map(int, args.limits.split(","))))
