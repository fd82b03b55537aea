"""Query a running interpql server over HTTP, with nothing but the standard library.

    python examples/query.py [--url http://127.0.0.1:8000/graphql] [--node ID] [--prompt TEXT]

Prints the served models, then one node's activation on each token of the prompt (the node
defaults to the first MLP neuron of the first model).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

MODELS = "{ models { name backend nLayers dModel dMlp nodeKinds { kind dictionary count } } }"
NODE_ON_PROMPT = """
query NodeOnPrompt($id: ID!, $prompt: String!) {
  node(id: $id) {
    id
    kind
    layerIndex
    bestExplanation { text score }
    activations(prompt: $prompt) { tokens { text } values maxValue maxTokenIndex }
  }
}
"""


class GraphQLError(Exception):
    pass


def execute(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs one GraphQL operation; raises GraphQLError with the server's code on an error."""
    request = urllib.request.Request(
        url,
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body: dict[str, Any] = json.load(response)
    if body.get("errors"):
        error = body["errors"][0]
        code = error.get("extensions", {}).get("code", "ERROR")
        raise GraphQLError(f"{code}: {error['message']}")
    data: dict[str, Any] = body["data"]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/graphql")
    parser.add_argument("--node", help="node id, <model>/<kind>/<layer>/<index>")
    parser.add_argument("--prompt", default="def area(r): return 3.14 * r * r")
    args = parser.parse_args(argv)

    try:
        models = execute(args.url, MODELS)["models"]
        for model in models:
            kinds = ", ".join(
                f"{k['count']} {k['dictionary'] or k['kind'].lower()}" for k in model["nodeKinds"]
            )
            print(f"{model['name']} ({model['backend']}, {model['nLayers']} layers): {kinds}")
        node_id = args.node or f"{models[0]['name']}/mlp_neuron/0/0"
        node = execute(args.url, NODE_ON_PROMPT, {"id": node_id, "prompt": args.prompt})["node"]
    except (GraphQLError, urllib.error.URLError) as exc:
        print(f"query.py: {exc}", file=sys.stderr)
        return 1

    explanation = node["bestExplanation"]
    print(f"\n{node['id']} ({node['kind'].lower()}, layer {node['layerIndex']})")
    print(f"explanation: {explanation['text'] if explanation else 'none stored'}")
    activations = node["activations"]
    for token, value in zip(activations["tokens"], activations["values"], strict=True):
        print(f"  {json.dumps(token['text']):<16}{value:+.4f}")
    peak = activations["tokens"][activations["maxTokenIndex"]]["text"]
    print(f"max {activations['maxValue']:+.4f} at {json.dumps(peak)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
