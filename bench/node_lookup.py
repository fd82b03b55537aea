"""What is known about 1,000 nodes in one query: each node's top-5 records and best
explanation, from the embedded demo's store, over HTTP against `interpql serve`."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import httpx
import orjson

from bench.common import save, server, summary

QUERY = """query($ids: [ID!]!) { nodes(ids: $ids) { id
  topActivations(first: 5) { tokens activations }
  bestExplanation { text score } } }"""


def main(repeats: int = 30, count: int = 1000, compare: str | None = None) -> dict[str, Any]:
    """Times the lookup on a fresh server: its first (cold) request, then `repeats` more.
    With `compare`, a server from that checkout answers alternately with this one, the
    answers checked equal."""
    with contextlib.ExitStack() as stack, httpx.Client(timeout=120) as client:
        urls = {"this": stack.enter_context(server())}
        if compare is not None:
            urls["compared"] = stack.enter_context(server(checkout=compare))
        model = client.post(
            urls["this"] + "/graphql", json={"query": "{ models { name nLayers dMlp } }"}
        ).json()["data"]["models"][0]
        per_layer = count // model["nLayers"]
        ids = [
            f"{model['name']}/mlp_neuron/{layer}/{index}"
            for layer in range(model["nLayers"])
            for index in range(min(per_layer, model["dMlp"]))
        ][:count]
        body = {"query": QUERY, "variables": {"ids": ids}}
        times: dict[str, list[float]] = {name: [] for name in urls}
        answers: dict[str, Any] = {}
        for _ in range(repeats + 1):
            for name, url in urls.items():
                took, answers[name] = timed_post(client, url, body)
                times[name].append(took)
        assert len(answers["this"]["data"]["nodes"]) == len(ids)
        assert all(answer == answers["this"] for answer in answers.values())
    result = {
        "model": model["name"],
        "nodes": len(ids),
        **{
            name: {"first_ms": found[0] * 1000, "lookup": summary(found[1:])}
            for name, found in times.items()
        },
        "compared_checkout": compare,
        "target_median_ms": 150,
    }
    save("node_lookup", result)
    return result


def timed_post(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    answer = orjson.loads(client.post(url + "/graphql", json=body).content)
    took = time.perf_counter() - started
    assert "errors" not in answer, answer["errors"]
    return took, answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--compare", metavar="CHECKOUT", help="a source tree to run side by side (e.g. a worktree)"
    )
    options = parser.parse_args()
    main(options.repeats, compare=options.compare)
