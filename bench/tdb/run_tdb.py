"""Run one Transformer Debugger (TDB) request on a local model, with TDB's own code, and time it.

Runs INSIDE the venv made by setup_venv.sh (not the interpql venv). Sends the request TDB's UI
sends when a prompt is entered (a BatchedTdbRequest with one TdbRequestSpec: neurons and
attention heads, top/bottom k, no ablations, no trace) to TDB's InteractiveModel in-process, on
CPU, and writes timings, the whole response and a flattened node table to --out as JSON.

Two timings, each the median of --repeats after one warm-up:
  handler: `await InteractiveModel.handle_batched_tdb_request(request)`, the coroutine that TDB's
           POST /batched_tdb route awaits;
  route:   POST /batched_tdb through TDB's own FastAPI route (define_inference_routes), in-process
           over ASGI (no socket), so it adds request validation and response serialization, which
           is what an HTTP client of TDB's server pays on top of the handler.

example: /tmp/tdbvenv/bin/python run_tdb.py --model-dir /tmp/tdb-demo \
    --prompt $'import os\\nimport sys\\nimport' --target ' re' --distractor ' os' --out out.json
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

# setup_venv.sh primed GPT-2's tokenizer files here; tiktoken would otherwise try to download.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(sys.prefix) / "tiktoken-cache"))

import httpx
import torch
from fastapi import FastAPI
from neuron_explainer.activation_server.inference_routes import define_inference_routes
from neuron_explainer.activation_server.interactive_model import InteractiveModel
from neuron_explainer.activation_server.requests_and_responses import (
    BatchedResponse,
    BatchedTdbRequest,
)
from neuron_explainer.models import Transformer, model_registry
from neuron_explainer.models.model_context import StandardModelContext


class LocalModelContext(StandardModelContext):
    """StandardModelContext for a model folder on local disk.

    StandardModelContext only knows model names from TDB's registry, and its get_or_create_model
    goes through Transformer.load, which turns any non-https path into a URL on OpenAI's blob
    storage. So we register the folder under its own name (which __init__ needs to read
    config.json and weights) and load the transformer with Transformer.from_checkpoint, which
    reads config.json and model_pieces/*.pt from the folder.
    """

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        # An absolute path matters: TDB's _load_piece "caches" pieces under
        # /tmp/neuron-explainer-model-pieces-cache/<path>, and os.path.join with an absolute path
        # yields the path itself, so the folder is read in place (no stale or duplicate copy).
        name = f"local:{model_dir}"
        model_registry._MODEL_SPECS[name] = model_registry.StandardModelSpec(str(model_dir))
        super().__init__(name, device=device)

    def get_or_create_model(self, device=None, simplify=False) -> Transformer:
        if self._cached_transformer is None:
            xf = Transformer.from_checkpoint(self.load_path, device=device or self.device)
            if simplify:
                xf.simplify()
            self._cached_transformer = xf
        return self._cached_transformer


def ui_request(prompt: str, targets: list[str], distractors: list[str], k: int) -> dict:
    """The JSON body TDB's UI posts to /batched_tdb (inferenceDataFetcher.ts, with the defaults of
    urlParams.ts: neurons, attention heads, hideEarlyLayersWhenAblating true, no ablations,
    no node to trace)."""
    return {
        "subRequests": [
            {
                "prompt": prompt,
                "targetTokens": targets,
                "distractorTokens": distractors,
                "componentTypeForMlp": "neuron",
                "componentTypeForAttention": "attention_head",
                "topAndBottomKForNodeTable": k,
                "hideEarlyLayersWhenAblating": True,
                "nodeAblations": [],
            }
        ]
    }


async def timed(fn, repeats: int) -> tuple[object, list[float]]:
    """One warm-up call, then `repeats` timed calls; returns the last result and times in ms."""
    result = await fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = await fn()
        times.append((time.perf_counter() - start) * 1000)
    return result, times


def key(node: dict) -> tuple:
    return (node["nodeType"], node["layerIndex"], tuple(node["tensorIndices"]))


def flatten(response: dict) -> dict:
    """Pull the values a comparison needs out of TDB's response (camelCase JSON form)."""
    sub = response["inferenceSubResponses"][0]
    data = sub["processingResponseDataByName"]
    token_data = sub["inferenceResponse"]["inferenceAndTokenData"]
    top_k = data["topKComponents"]
    upvoted = {
        key(n): t
        for n, t in zip(
            data["upvotedOutputTokens"]["nodeIndices"],
            data["upvotedOutputTokens"]["topTokensList"],
            strict=True,
        )
    }
    pairs = {
        key(n): t
        for n, t in zip(
            data["tokenPairAttribution"]["nodeIndices"],
            data["tokenPairAttribution"]["topTokensAttendedToList"],
            strict=True,
        )
    }
    rows = []
    for i, node in enumerate(top_k["nodeIndices"]):
        rows.append(
            {
                "nodeType": node["nodeType"],
                "layerIndex": node["layerIndex"],
                "tensorIndices": node["tensorIndices"],
                "values": {g: vals[i] for g, vals in top_k["activationsByGroupId"].items()},
                "upvotedOutputTokens": upvoted.get(key(node)),
                "tokenPairAttribution": pairs.get(key(node)),
            }
        )
    sums = data["componentSumsForTokenDisplay"]["intermediateSumActivationsByDstByGroupId"]
    return {
        "loss": token_data["loss"],
        "tokens": token_data["tokensAsStrings"],
        "tokenIds": token_data["tokensAsInts"],
        "nodes": rows,
        # {group id: {derived scalar type: per-token (or per token pair) sums over the layer}}
        "tokenSums": {g: {dst: t["value"] for dst, t in d.items()} for g, d in sums.items()},
    }


def without_times(response: dict) -> dict:
    """The response minus its per-run fields (inferenceTime and memory use), for comparisons."""
    response = json.loads(json.dumps(response))
    for sub in response["inferenceSubResponses"]:
        for field in ("inferenceTime", "memoryUsedBefore", "memoryUsedAfter"):
            sub["inferenceResponse"]["inferenceAndTokenData"].pop(field, None)
    return response


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "all_ms": times}


async def run(args: argparse.Namespace) -> dict:
    device = torch.device("cpu")
    start = time.perf_counter()
    context = LocalModelContext(args.model_dir.resolve(), device)
    model = InteractiveModel.from_standard_model_context(context)
    load_s = time.perf_counter() - start

    body = ui_request(args.prompt, args.target, args.distractor, args.k)
    request = BatchedTdbRequest.parse_obj(body)  # the same validation FastAPI applies

    async def handler():
        return await model.handle_batched_tdb_request(request)

    response, handler_times = await timed(handler, args.repeats)

    app = FastAPI()
    define_inference_routes(app, model, mlp_autoencoder_name=None, attn_autoencoder_name=None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tdb") as client:

        async def route():
            reply = await client.post("/batched_tdb", json=body, timeout=None)
            reply.raise_for_status()
            return reply

        reply, route_times = await timed(route, args.repeats)

    assert isinstance(response, BatchedResponse)
    whole = json.loads(response.json(by_alias=True))  # the handler's response, as JSON
    return {
        "tdb_commit": "87e6db7",
        "model_dir": str(args.model_dir.resolve()),
        "model_config": context.get_model_config_as_dict(),
        "request": body,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "model_load_s": load_s,
        "repeats": args.repeats,
        "timings": {
            "handler": summary(handler_times),
            "route": summary(route_times),
            "route_response_bytes": len(reply.content),
        },
        # True when the HTTP route's JSON equals the handler's response (up to timing fields)
        "route_matches_handler": without_times(reply.json()) == without_times(whole),
        "flat": flatten(whole),
        "response": whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="TDB-format model folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--target", action="append", required=True, help="repeatable")
    parser.add_argument("--distractor", action="append", required=True, help="repeatable")
    parser.add_argument("--k", type=int, default=10, help="top and bottom k for the node table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(2)
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=1))
    t = result["timings"]
    print(
        f"{len(result['flat']['tokens'])} tokens, loss {result['flat']['loss']:.6g}; "
        f"handler median {t['handler']['median_ms']:.1f} ms, "
        f"route median {t['route']['median_ms']:.1f} ms; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
