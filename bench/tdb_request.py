"""The fullest Transformer Debugger request, as one GraphQL query, against `interpql serve`.

What TDB's activation server answers for a prompt with a target and a distractor token, and
more: the loss (LOGIT_DIFF), the prompt's tokens, top-10 predictions, the node table (top and
bottom 10 of four groups, as columns) with every row's scored and attended-to tokens and the
token display's sums, and every head's attention pattern and token-pair attribution, as packed
float16 lower triangles (the rest is 0 by the causal mask); one forward and one backward pass.
Served model: the embedded demo by default.
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx
import orjson

from bench.common import post_repeatedly, save, server, summary

PROMPT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nprint(fibonacci(10))\nfor i in range("
)


TOKENS = "{ ids values }"
PACKED = "{ shape base64 }"


def query(model: str, heads: list[str]) -> str:
    return f"""query($p: String!) {{ model(name: "{model}") {{ infer(input: {{prompt: $p,
      loss: {{kind: LOGIT_DIFF, targetTokens: [" 10"], distractorTokens: [" n"]}}}}) {{
        loss objective tokens {{ text }} topPredictions(k: 10) {{ token {{ text }} probability }}
        nodeTable(k: 10) {{
          columns {{ nodeIds tokenIndex keyTokenIndex activation writeNorm directEffect
            actTimesGrad upvotedOutputTokens {TOKENS} downvotedOutputTokens {TOKENS}
            upvotingInputTokens {TOKENS} attendedToTokens {{ tokenIndex values }} }}
          tokenSums {{ embedding mlp attentionFrom attentionTo }} }}
        activations(nodeIds: {orjson.dumps(heads).decode()}) {{
          packedAttentionPattern {PACKED} packedTokenPairAttribution {PACKED} }}
    }} }} }}"""


def main(repeats: int = 30, model: str | None = None) -> dict[str, Any]:
    # Every request computes: no run cache.
    args = (("--model", model) if model else ()) + ("--cached-runs", "0")
    with server(*args) as url, httpx.Client(timeout=120) as client:
        info = client.post(
            url + "/graphql", json={"query": "{ models { name nLayers nHeads } }"}
        ).json()["data"]["models"][0]
        heads = [
            f"{info['name']}/attention_head/{layer}/{head}"
            for layer in range(info["nLayers"])
            for head in range(info["nHeads"])
        ]
        body = {"query": query(info["name"], heads), "variables": {"p": PROMPT}}
        times, _ = post_repeatedly(client, url, body, repeats)
        size = len(client.post(url + "/graphql", json=body).content)
    result = {
        "model": info["name"],
        "heads": len(heads),
        "tdb_request": summary(times),
        "response_bytes": size,
        "target_median_ms": 300 if model is None else 2850,
    }
    save("tdb_request" if model is None else f"tdb_request-{info['name']}", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", help="default: the embedded demo")
    options = parser.parse_args()
    main(options.repeats, options.model)
