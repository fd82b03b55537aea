"""What is known about 1,000 nodes in one query: each node's top-5 records and best
explanation, from the embedded demo's store, over HTTP against `interpql serve`: the same
1,000 nodes again and again, and 1,000 nodes read for the first time (sets of MLP neurons and
dictionary latents no request has read before)."""

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
    """Times the lookup on a fresh server: its first (cold) request, then `repeats` more of
    the same nodes, then up to `repeats` lookups of nodes not read before. With `compare`, a
    server from that checkout answers alternately with this one, the answers checked equal."""
    with contextlib.ExitStack() as stack, httpx.Client(timeout=120) as client:
        urls = {"this": stack.enter_context(server())}
        if compare is not None:
            urls["compared"] = stack.enter_context(server(checkout=compare))
        model = client.post(
            urls["this"] + "/graphql",
            json={"query": "{ models { name nLayers dMlp dictionaries { name layer nLatents } } }"},
        ).json()["data"]["models"][0]
        per_layer = count // model["nLayers"]
        ids = [
            f"{model['name']}/mlp_neuron/{layer}/{index}"
            for layer in range(model["nLayers"])
            for index in range(min(per_layer, model["dMlp"]))
        ][:count]
        body = {"query": QUERY, "variables": {"ids": ids}}
        series = ("first", "lookup", "first_read")
        times = {name: {kind: Timings() for kind in series} for name in urls}
        answers: dict[str, Any] = {}
        for repeat in range(repeats + 1):
            for name, url in urls.items():
                answers[name] = timed_post(
                    client, url, body, times[name]["lookup" if repeat else "first"]
                )
        assert len(answers["this"]["data"]["nodes"]) == len(ids)
        assert all(answer == answers["this"] for answer in answers.values())
        for unread in unread_sets(model, set(ids), count)[:repeats]:
            body = {"query": QUERY, "variables": {"ids": unread}}
            for name, url in urls.items():
                answers[name] = timed_post(client, url, body, times[name]["first_read"])
            assert all(answer == answers["this"] for answer in answers.values())
    result = {
        "model": model["name"],
        "nodes": len(ids),
        # received: from sending the request to the whole answer's bytes; parsed: and then
        # orjson.loads of its 2.8 MB in this client (~30 ms).
        **{
            name: {kind: found.summaries() for kind, found in timed.items()}
            for name, timed in times.items()
        },
        "compared_checkout": compare,
        "target_median_ms": 150,
    }
    save("node_lookup", result)
    return result


class Timings:
    def __init__(self) -> None:
        self.received: list[float] = []
        self.parsed: list[float] = []

    def summaries(self) -> dict[str, Any]:
        return {"received": summary(self.received), "parsed": summary(self.parsed)}


def unread_sets(model: dict[str, Any], read: set[str], count: int) -> list[list[str]]:
    """Sets of `count` nodes with records, none in `read`: the MLP neurons left, then each
    dictionary's latents, layer by layer."""
    name = model["name"]
    every = [
        f"{name}/mlp_neuron/{layer}/{index}"
        for layer in range(model["nLayers"])
        for index in range(model["dMlp"])
    ] + [
        f"{name}/{d['name']}/{d['layer']}/{index}"
        for d in model["dictionaries"]
        for index in range(d["nLatents"])
    ]
    left = [node for node in every if node not in read]
    return [left[i : i + count] for i in range(0, len(left) - count + 1, count)]


def timed_post(client: httpx.Client, url: str, body: dict[str, Any], timings: Timings) -> Any:
    started = time.perf_counter()
    response = client.post(url + "/graphql", json=body)
    received = time.perf_counter()
    answer = orjson.loads(response.content)
    timings.received.append(received - started)
    timings.parsed.append(time.perf_counter() - started)
    assert "errors" not in answer, answer["errors"]
    return answer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--compare", metavar="CHECKOUT", help="a source tree to run side by side (e.g. a worktree)"
    )
    options = parser.parse_args()
    main(options.repeats, compare=options.compare)
