"""Native vs TransformerLens backend: the same `infer` query on the same weights.

A random GPT-2-shaped model (4 layers, d_model 256) saved as a Hugging Face folder, served twice
by `interpql serve`: once by the native backend, once by the TransformerLens backend. The query
asks for the loss and one layer's MLP activations on a 64-token prompt. The bare `run` of each
backend is timed too, in this process, to tell the bridge's cost from the server's. The two
backends are timed alternately in one run so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

import httpx
import orjson

from bench.common import save, server, summary, timed
from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.backends.gpt2 import GPT2Config, NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model, save_hf_folder
from interpql.backends.transformerlens import TransformerLensBackend

CONFIG = GPT2Config(n_layers=4, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=128)
QUERY = """query($p: String!) { model(name: "bench") { infer(input: {prompt: $p}) {
  loss layerActivations(layer: 2, kind: MLP_NEURON) { shape values } } } }"""


def main(repeats: int = 30) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="interpql-bench-") as folder:
        model = random_model(CONFIG, seed=0)
        save_hf_folder(folder, CONFIG, {k: v.detach() for k, v in model.state_dict().items()})
        backends = {
            "native": NativeGPT2Backend.load(folder),
            "transformerlens": TransformerLensBackend.load(folder),
        }
        tokenizer = backends["native"].tokenizer
        tokens = tuple(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64])
        prompt = tokenizer.decode(list(tokens))
        assert tokenizer.encode(prompt) == list(tokens)
        request = ForwardRequest(
            tokens=(tokens,), save=frozenset({HookPoint(2, Location.MLP_POST)})
        )
        args = ("--model", folder, "--name", "bench", "--cached-runs", "0")
        times: dict[str, list[float]] = {
            f"{kind}_{name}": [] for kind in ("graphql", "run") for name in backends
        }
        with (
            server(*args, "--backend", "native-gpt2") as native_url,
            server(*args, "--backend", "transformerlens") as lens_url,
            httpx.Client(timeout=60) as client,
        ):
            urls = {"native": native_url, "transformerlens": lens_url}

            def query(backend: str) -> None:
                response = client.post(
                    urls[backend] + "/graphql", json={"query": QUERY, "variables": {"p": prompt}}
                )
                infer = orjson.loads(response.content)["data"]["model"]["infer"]
                assert infer["layerActivations"]["shape"] == [64, CONFIG.d_mlp]

            for _ in range(3):  # warm-up: first calls pay for allocation and caches
                for name in backends:
                    query(name)
            for _ in range(repeats):
                for name in backends:
                    times[f"graphql_{name}"].append(timed(partial(query, name)))
        # The bare runs only once the servers are gone: their idle worker threads keep
        # spinning for a while after each request, which would slow whatever runs here.
        for _ in range(3):
            for backend in backends.values():
                backend.forward(request)
        for _ in range(repeats):
            for name, backend in backends.items():
                times[f"run_{name}"].append(timed(partial(backend.run, request)))

    result: dict[str, object] = {
        "model": "random GPT-2, 4 layers, d_model 256, d_mlp 1024; 64-token prompt",
        **{key: summary(seconds) for key, seconds in times.items()},
    }
    for kind in ("graphql", "run"):
        native = summary(times[f"{kind}_native"])["median_ms"]
        lens = summary(times[f"{kind}_transformerlens"])["median_ms"]
        result[f"{kind}_ratio_transformerlens_to_native"] = lens / native
    save("backends", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    main(parser.parse_args().repeats)
