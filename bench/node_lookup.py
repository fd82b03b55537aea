"""What is known about 1,000 nodes in one query: each node's top-5 records and best
explanation, from the embedded demo's store, over HTTP against `interpql serve`."""

from __future__ import annotations

import argparse
from typing import Any

import httpx

from bench.common import post_repeatedly, save, server, summary

QUERY = """query($ids: [ID!]!) { nodes(ids: $ids) { id
  topActivations(first: 5) { tokens activations }
  bestExplanation { text score } } }"""


def main(repeats: int = 30, count: int = 1000) -> dict[str, Any]:
    with server() as url, httpx.Client(timeout=120) as client:
        model = client.post(
            url + "/graphql", json={"query": "{ models { name nLayers dMlp } }"}
        ).json()["data"]["models"][0]
        per_layer = count // model["nLayers"]
        ids = [
            f"{model['name']}/mlp_neuron/{layer}/{index}"
            for layer in range(model["nLayers"])
            for index in range(min(per_layer, model["dMlp"]))
        ][:count]
        body = {"query": QUERY, "variables": {"ids": ids}}
        times, answer = post_repeatedly(client, url, body, repeats)
        assert len(answer["data"]["nodes"]) == len(ids)
    result = {
        "model": model["name"],
        "nodes": len(ids),
        "lookup": summary(times),
        "target_median_ms": 150,
    }
    save("node_lookup", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    options = parser.parse_args()
    main(options.repeats)
