"""One Transformer Debugger request, as one GraphQL query, against `interpql serve`.

TDB's activation server answers a prompt with a target and a distractor token by ranking the
top nodes of four groups, scoring tokens and attributing attention between token pairs. Here
that is one operation: the loss (LOGIT_DIFF), top-10 and bottom-10 nodes for ACTIVATION,
WRITE_NORM, DIRECT_EFFECT and ACT_TIMES_GRAD, scored tokens of the ten ACT_TIMES_GRAD nodes,
and the attention pattern and token-pair attribution of every head; one forward and one backward
pass. Served model: the embedded demo by default.
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
GROUPS = ("ACTIVATION", "WRITE_NORM", "DIRECT_EFFECT", "ACT_TIMES_GRAD")


FRAGMENTS = """
fragment Ranked on NodeRanking { top { node { id } value } bottom { node { id } value } tokenSums }
fragment Scored on TokenScore { token { text } value }
"""


def query(model: str, heads: list[str]) -> str:
    ranked = " ".join(f"{g.lower()}: topNodes(group: {g}, k: 10) {{ ...Ranked }}" for g in GROUPS)
    return f"""query($p: String!) {{ model(name: "{model}") {{ infer(input: {{prompt: $p,
      loss: {{kind: LOGIT_DIFF, targetTokens: [" 10"], distractorTokens: [" n"]}}}}) {{
        loss objective tokens {{ text }} topPredictions(k: 10) {{ token {{ text }} probability }}
        {ranked}
        scored: topNodes(group: ACT_TIMES_GRAD, k: 10) {{ top {{ node {{ id scoredTokens(k: 10) {{
          upvotedOutputTokens {{ ...Scored }} downvotedOutputTokens {{ ...Scored }}
          upvotingInputTokens {{ ...Scored }} }} }} }} }}
        activations(nodeIds: {orjson.dumps(heads).decode()}) {{
          attentionPattern tokenPairAttribution }}
    }} }} }}
    {FRAGMENTS}"""


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
    result = {
        "model": info["name"],
        "heads": len(heads),
        "tdb_request": summary(times),
        "target_median_ms": 300,
    }
    save("tdb_request", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", help="default: the embedded demo")
    options = parser.parse_args()
    main(options.repeats, options.model)
