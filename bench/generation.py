"""Generation with the key-value cache vs rerunning the whole sequence every step.

`loaders.generation.generate` on the native backend (GPT-2-small shape, random weights) and on
the TransformerLens backend (the same weights as a Hugging Face folder), greedy, 64 new tokens
after a 32-token prompt, with one steering direction (two rows: unsteered and steered); the two
paths alternate, and each run's tokens must be equal.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from typing import Any

from bench.common import save
from interpql.backends.base import Backend
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import save_hf_folder
from interpql.backends.gpt2.model import PRESETS
from interpql.backends.transformerlens import TransformerLensBackend
from interpql.loaders.generation import generate
from interpql.loaders.registry import ModelEntry
from interpql.specs import GenerationSpec, NodeRef, Steering


def tokens_per_second(backend: Backend, spec: GenerationSpec, cached: bool) -> tuple[float, Any]:
    backend.caches_keys_and_values = cached  # this instance only
    entry = ModelEntry("bench", backend.architecture, backend, backend.name, "cpu", "float32")
    started = time.perf_counter()
    done = generate(entry, spec, threading.Event())
    seconds = time.perf_counter() - started
    del backend.caches_keys_and_values
    return 2 * spec.max_tokens / seconds, (done.unsteered, done.steered)


def main(repeats: int = 3, new_tokens: int = 64) -> dict[str, Any]:
    native = NativeGPT2Backend.load("random:gpt2-small")
    with tempfile.TemporaryDirectory() as folder:
        save_hf_folder(folder, PRESETS["gpt2-small"], native.model.state_dict())
        lens = TransformerLensBackend.load(folder)
        prompt = tuple(native.tokenizer.encode("def fibonacci(n):\n    return " * 4)[:32])
        spec = GenerationSpec(
            model="bench",
            prompt="",
            tokens=prompt,
            max_tokens=new_tokens,
            steering=(Steering(node=NodeRef("bench", "mlp_neuron", 6, 100), strength=10.0),),
        )
        result: dict[str, Any] = {"prompt_tokens": len(prompt), "new_tokens_per_row": new_tokens}
        for name, backend in (("native", native), ("transformerlens", lens)):
            rates: dict[bool, list[float]] = {True: [], False: []}
            tokens_per_path: dict[bool, Any] = {}
            tokens_per_second(backend, spec, True)  # warm-up
            for _ in range(repeats):
                for cached in (True, False):
                    rate, tokens = tokens_per_second(backend, spec, cached)
                    rates[cached].append(rate)
                    tokens_per_path[cached] = tokens
            assert tokens_per_path[True] == tokens_per_path[False], "the paths disagree"
            cached_rate = sorted(rates[True])[repeats // 2]
            rerun_rate = sorted(rates[False])[repeats // 2]
            result[name] = {
                "cached_tokens_per_s": rates[True],
                "rerun_tokens_per_s": rates[False],
                "speedup_of_medians": cached_rate / rerun_rate,
                "same_tokens": True,
            }
    save("generation", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    options = parser.parse_args()
    main(options.repeats, options.new_tokens)
