"""Large payloads: every MLP activation of every layer of a GPT-2-small-shaped model for a
64-token prompt (12 x 64 x 3072 floats), as plain JSON lists vs packed base64 float32, end to
end: request, server encoding, transfer and the client's decoding into arrays."""

from __future__ import annotations

import argparse
import base64
from typing import Any

import httpx
import numpy as np
import orjson

from bench.common import save, server, summary, timed

LAYERS = 12


def query(packed: bool) -> str:
    field = "packed { shape base64 }" if packed else "shape values"
    layers = " ".join(
        f"l{i}: layerActivations(layer: {i}, kind: MLP_NEURON) {{ {field} }}" for i in range(LAYERS)
    )
    return f"""query($p: String!) {{ model(name: "random-gpt2-small") {{
      infer(input: {{prompt: $p}}) {{ {layers} }} }} }}"""


def main(repeats: int = 15) -> dict[str, Any]:
    prompt = "The quick brown fox jumps over the lazy dog. " * 7
    with server("--model", "random:gpt2-small") as url, httpx.Client(timeout=120) as client:

        def fetch(packed: bool) -> None:
            body = {"query": query(packed), "variables": {"p": prompt}}
            infer = orjson.loads(client.post(url + "/graphql", json=body).content)["data"]
            layers = infer["model"]["infer"]
            for i in range(LAYERS):
                if packed:
                    raw = base64.b64decode(layers[f"l{i}"]["packed"]["base64"])
                    array = np.frombuffer(raw, dtype="<f4").reshape(
                        layers[f"l{i}"]["packed"]["shape"]
                    )
                else:
                    array = np.asarray(layers[f"l{i}"]["values"], dtype=np.float32)
                assert array.shape[1] == 3072

        for _ in range(2):
            fetch(True)
            fetch(False)
        lists, packed = [], []
        for _ in range(repeats):
            lists.append(timed(lambda: fetch(False)))
            packed.append(timed(lambda: fetch(True)))
    result = {"lists": summary(lists), "packed": summary(packed)}
    result["speedup_of_medians"] = result["lists"]["median_ms"] / result["packed"]["median_ms"]
    result["target_speedup"] = 5.0
    save("payload", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    main(parser.parse_args().repeats)
