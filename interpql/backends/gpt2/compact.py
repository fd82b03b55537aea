"""A compact GPT-2 folder: a model trained on a part of GPT-2's vocabulary, stored small.

    config.json          the model's shape, in Transformer Debugger's config keys
    weights.safetensors  float16: every GPT-2 weight but the two embedding matrices, plus
                         vocab.used_ids [n_used] (int32), vocab.embedding [n_used, d_model]
                         (the input and output embedding of the tokens the corpus used) and
                         vocab.unused_unembed_row [d_model] (the output row of every other
                         token; their input embedding is zero)

Loading rebuilds a normal full-vocabulary float32 GPT-2 state dict. The embedded demo is
stored so (`interpql build-demo` writes it: demo/train_model.py says why).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from interpql.backends.gpt2.loading import (
    StateDict,
    read_json_config,
    tdb_config_from_json,
    tdb_config_to_json,
)
from interpql.backends.gpt2.model import GPT2Config
from interpql.file_errors import FileProblem, reading

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
_EMBEDDINGS = ("tok_embed.weight", "unembed.weight")


def is_compact_folder(root: Path) -> bool:
    return (root / WEIGHTS_FILE).exists()


def save_compact(root: Path, cfg: GPT2Config, state: StateDict, used_ids: torch.Tensor) -> None:
    """Writes the model compactly; refuses a state dict the compact layout cannot hold exactly."""
    tok_embed, unembed = state["tok_embed.weight"], state["unembed.weight"]
    used = torch.zeros(cfg.n_vocab, dtype=torch.bool)
    used[used_ids] = True
    unused_row = unembed[~used][:1] if bool((~used).any()) else torch.zeros(1, cfg.d_model)
    if (
        not torch.equal(tok_embed[used], unembed[used])
        or bool(tok_embed[~used].any())
        or not bool((unembed[~used] == unused_row).all())
    ):
        raise ValueError(
            "the compact layout needs embeddings tied on used tokens, zero input embeddings "
            "and one shared output row for the others"
        )
    tensors = {
        key: value.to(torch.float16).contiguous()
        for key, value in state.items()
        if key not in _EMBEDDINGS
    }
    tensors["vocab.used_ids"] = used.nonzero().squeeze(1).to(torch.int32)
    tensors["vocab.embedding"] = tok_embed[used].to(torch.float16).contiguous()
    tensors["vocab.unused_unembed_row"] = unused_row.reshape(-1).to(torch.float16)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / WEIGHTS_FILE), metadata={"format": "interpql-demo-model-1"})
    (root / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; installed copies must be readable
    (root / CONFIG_FILE).write_text(json.dumps(tdb_config_to_json(cfg), indent=2) + "\n")


def load_compact(root: Path) -> tuple[GPT2Config, StateDict]:
    """The model's config and full-vocabulary float32 state dict."""
    weights = root / WEIGHTS_FILE
    cfg = read_json_config(str(root / CONFIG_FILE), tdb_config_from_json)
    with reading(weights, "a compact GPT-2's weights (safetensors)"):
        tensors = load_file(str(weights))
        used = tensors.pop("vocab.used_ids").long()
        embedding = tensors.pop("vocab.embedding").float()
        unused_row = tensors.pop("vocab.unused_unembed_row").float()
    if len(used) and int(used.max()) >= cfg.n_vocab:
        raise FileProblem(weights, f"vocab.used_ids reaches past the {cfg.n_vocab} tokens")
    tok_embed = torch.zeros(cfg.n_vocab, cfg.d_model)
    tok_embed[used] = embedding
    unembed = unused_row.expand(cfg.n_vocab, -1).clone()
    unembed[used] = embedding
    state = {key: value.float() for key, value in tensors.items()}
    return cfg, state | {"tok_embed.weight": tok_embed, "unembed.weight": unembed}
