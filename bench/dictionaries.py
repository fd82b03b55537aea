"""Dictionaries in the forward pass: a GPT-2-small-shaped random model with three sets of
seeded random SAELens dictionaries on every layer (a TopK SAE at hook_resid_post, a JumpReLU
SAE at hook_attn_out, a skip transcoder from mlp.hook_in to hook_mlp_out; `--latents` each), a
64-token prompt, timed alternately in one run:

  bare          the forward pass with no dictionary attached;
  attached      the three sets attached, none of their latents asked for (nothing is spliced);
  latents       every layer's latents of all three sets saved (each spliced in, error kept);
  no error      the same without the error term (the transcoders replace the MLPs).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import save, summary, timed
from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.backends.dictionaries.saelens import SaeLensDictionary, parse_config, saelens_config
from interpql.backends.gpt2 import NativeGPT2Backend

SETS = {  # name: (architecture, input, output)
    "res": ("topk", Location.RESID_POST, Location.RESID_POST),
    "att": ("jumprelu", Location.ATTN_OUT, Location.ATTN_OUT),
    "tc": ("skip_transcoder", Location.MLP_IN, Location.MLP_OUT),
}


def random_dictionary(architecture: str, d: int, n: int, seed: int) -> SaeLensDictionary:
    g = torch.Generator().manual_seed(seed)
    transcoder = "transcoder" in architecture
    config = saelens_config(
        architecture,
        d,
        n,
        "blocks.0.mlp.hook_in" if transcoder else "blocks.0.hook_resid_post",
        d_out=d if transcoder else None,
        hook_name_out="blocks.0.hook_mlp_out" if transcoder else None,
        k=32 if architecture == "topk" else None,
    )
    tensors = {
        "W_enc": torch.randn(d, n, generator=g) / d**0.5,
        "W_dec": torch.randn(n, d, generator=g) / n**0.5,
        "b_enc": torch.zeros(n),
        "b_dec": torch.zeros(d),
    }
    if "jumprelu" in architecture:
        tensors["threshold"] = torch.full((n,), 0.5)
    if "skip" in architecture:
        tensors["W_skip"] = torch.randn(d, d, generator=g) / d
    return SaeLensDictionary(parse_config(config), tensors)


def main(repeats: int = 20, latents: int = 6144) -> dict[str, object]:
    bare = NativeGPT2Backend.load("random:gpt2-small")
    attached = NativeGPT2Backend.load("random:gpt2-small")
    arch = attached.architecture
    for layer in range(arch.n_layers):
        for i, (name, (architecture, input, output)) in enumerate(SETS.items()):
            dictionary = random_dictionary(architecture, arch.d_model, latents, 10 * layer + i)
            attached.attach_dictionary(name, layer, dictionary, input, output)
    tokens = tuple(bare.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64])
    every = frozenset(
        HookPoint(layer, Location.LATENTS, name) for layer in range(arch.n_layers) for name in SETS
    )
    runs = {
        "bare": (bare, ForwardRequest(tokens=(tokens,))),
        "attached": (attached, ForwardRequest(tokens=(tokens,))),
        "latents": (attached, ForwardRequest(tokens=(tokens,), save=every)),
        "no_error_term": (
            attached,
            ForwardRequest(tokens=(tokens,), save=every, autoencoder_error_term=False),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(3):
            for backend, request in runs.values():
                backend.forward(request)
        for _ in range(repeats):
            for name, (backend, request) in runs.items():
                times[name].append(timed(lambda b=backend, r=request: b.forward(r)))
    result: dict[str, object] = {name: summary(t) for name, t in times.items()}
    base = summary(times["bare"])["median_ms"]
    result["ratios_to_bare"] = {
        name: summary(t)["median_ms"] / base for name, t in times.items() if name != "bare"
    }
    result["setup"] = {"latents_per_dictionary": latents, "sets": list(SETS), "tokens": 64}
    save("dictionaries", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--latents", type=int, default=6144)
    args = parser.parse_args()
    print(main(args.repeats, args.latents))
