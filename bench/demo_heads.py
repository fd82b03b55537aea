"""What the demo's attention heads do, by the two scores a researcher checks first.

- Previous-token score: a head's mean attention from each token to the one just before it, on
  the demo's held-out windows (1 for a pure previous-token head).
- Induction score: on sequences of random tokens (from the vocabulary the corpus uses) repeated
  once, a head's mean attention from each token of the second copy to the token after its
  earlier occurrence (1 for a pure induction head), next to what uniform attention would give.
- The next-token loss on the second copy next to the first: a model with induction heads
  predicts the repeat far better.

Not a timing: its figures are the README's table of the demo's heads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

from bench.common import save
from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import build_model
from interpql.demo.artifacts import DEMO_DIR, load_demo_model
from interpql.loaders.sources.compact_format import RecordStore


def main(
    sequences: int = 32, length: int = 50, seed: int = 0, demo: Path = DEMO_DIR
) -> dict[str, Any]:
    """`demo`: a demo folder (the shipped one, or a build's --out)."""
    cfg, state = load_demo_model(demo)
    backend = NativeGPT2Backend(build_model(cfg, state))
    probs = [HookPoint(layer, Location.ATTN_PROBS) for layer in range(cfg.n_layers)]

    # Previous-token scores on held-out text: 16 windows of the context's length.
    tokens = RecordStore.load(demo / "records").tokens.astype(np.int64)
    text = tuple(tuple(tokens[i * cfg.n_ctx : (i + 1) * cfg.n_ctx].tolist()) for i in range(16))
    seen = backend.forward(ForwardRequest(tokens=text, save=frozenset(probs)))
    previous = [
        # [batch, query, head, key]: each query's attention to key query - 1.
        seen.activations[point].diagonal(offset=-1, dim1=1, dim2=3).mean(dim=(0, 2)).tolist()
        for point in probs
    ]

    # Induction scores on random tokens repeated once.
    used = load_file(str(demo / "weights.safetensors"))["vocab.used_ids"].astype(np.int64)
    rng = np.random.default_rng(seed)
    halves = rng.choice(used, size=(sequences, length))
    repeated = tuple(tuple(row.tolist()) * 2 for row in halves)
    run = backend.forward(ForwardRequest(tokens=repeated, save=frozenset(probs)))
    induction = []
    for point in probs:
        attention = run.activations[point]  # [batch, query, head, key]
        # Position length + i holds token i again; the token after its first occurrence is at
        # i + 1: an induction head looks there.
        queries = torch.arange(length, 2 * length)
        picked = attention[:, queries, :, queries - length + 1]  # [query, batch, head]
        induction.append(picked.mean(dim=(0, 1)).tolist())
    uniform = float(np.mean([1 / (q + 1) for q in range(length, 2 * length - 1)]))
    logits = run.logits.double()
    targets = torch.tensor(repeated)[:, 1:]
    losses = -logits[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    first, second = losses[:, : length - 1].mean(), losses[:, length:].mean()
    result = {
        "previous_token_score": previous,  # [layer][head]
        "induction_score": induction,
        "induction_uniform": uniform,
        "demo": str(demo),
        "sequences": sequences,
        "half_length": length,
        "loss_first_copy": float(first),
        "loss_second_copy": float(second),
    }
    save("demo_heads", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument(
        "--demo", type=Path, default=DEMO_DIR, help="a demo folder (default: the shipped demo)"
    )
    options = parser.parse_args()
    main(options.sequences, options.length, demo=options.demo)
