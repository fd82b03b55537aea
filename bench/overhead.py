"""GraphQL overhead: `infer` with one layer's MLP activations over HTTP vs the bare forward.

A GPT-2-small-shaped random model, a 64-token prompt, on this machine's CPU. The server runs in
its own process; the bare backend runs here on identical weights (same seed). The two are timed
alternately in one run so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import httpx
import orjson

from bench.common import save, server, summary, timed
from interpql.backends.base import ForwardRequest, HookPoint, Location, LogitPositions
from interpql.backends.gpt2 import NativeGPT2Backend

QUERY = """query($p: String!) { model(name: "random-gpt2-small") { infer(input: {prompt: $p}) {
  layerActivations(layer: 5, kind: MLP_NEURON) { shape values } } } }"""


def main(repeats: int = 30) -> dict[str, object]:
    backend = NativeGPT2Backend.load("random:gpt2-small")
    tokens = tuple(
        backend.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64]
    )
    prompt = backend.tokenizer.decode(list(tokens))
    assert backend.tokenizer.encode(prompt) == list(tokens)
    request = ForwardRequest(tokens=(tokens,), save=frozenset({HookPoint(5, Location.MLP_POST)}))
    # What the server now runs for this query: no field reads a logit, so none is unembedded.
    no_logits = replace(request, logits=LogitPositions.NONE)

    with (
        server("--model", "random:gpt2-small", "--cached-runs", "0") as url,
        httpx.Client(timeout=60) as client,
    ):

        def over_http() -> None:
            response = client.post(
                url + "/graphql", json={"query": QUERY, "variables": {"p": prompt}}
            )
            body = orjson.loads(response.content)
            assert body["data"]["model"]["infer"]["layerActivations"]["shape"] == [64, 3072]

        for _ in range(3):  # warm-up: first calls pay for allocation and caches
            over_http()
            backend.forward(request)
            backend.forward(no_logits)
        bare, same, http = [], [], []
        for _ in range(repeats):
            bare.append(timed(lambda: backend.forward(request)))
            same.append(timed(lambda: backend.forward(no_logits)))
            http.append(timed(over_http))

    result: dict[str, object] = {
        "bare_forward": summary(bare),
        "bare_forward_without_logits": summary(same),
        "graphql_http": summary(http),
    }
    http_ms = summary(http)["median_ms"]
    # Against the bare forward as issue 2 defined it (every position unembedded), and against
    # the same work as the server's (no logits): the second is the transport and GraphQL alone.
    result["ratio_of_medians"] = http_ms / summary(bare)["median_ms"]
    result["ratio_to_same_work"] = http_ms / summary(same)["median_ms"]
    result["target_ratio"] = 1.15
    save("overhead", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    main(parser.parse_args().repeats)
