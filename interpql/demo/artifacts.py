"""How the demo's artefacts lie on disk, and how they load.

    tiny-stdlib/
      config.json          the model's shape, in Transformer Debugger's config keys
      weights.safetensors  float16: every GPT-2 weight but the two embedding matrices, plus
                           vocab.used_ids [n_used] (int32), vocab.embedding [n_used, d_model]
                           (the input and output embedding of the tokens the corpus uses) and
                           vocab.unused_unembed_row [d_model] (the output row of every other
                           token; their input embedding is zero). See train_model.py for why.
      autoencoders/{mlp_post_act,resid_delta_attn}/{layer}.pt
                           float16 state dicts in the openai/sparse_autoencoder format
      metrics.json         corpus sizes, held-out losses, autoencoder quality, timings

Loading rebuilds a normal full-vocabulary float32 GPT-2 state dict. Other formats are derived on
demand: `export_hf_folder` and `export_tdb_folder`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.gpt2.loading import (
    StateDict,
    read_json_config,
    save_hf_folder,
    save_tdb_folder,
    tdb_config_from_json,
    tdb_config_to_json,
)
from interpql.backends.gpt2.model import GPT2Config
from interpql.file_errors import reading

DEMO_NAME = "tiny-stdlib"
DEMO_DIR = Path(__file__).with_name(DEMO_NAME)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.json"
AUTOENCODER_DIR = "autoencoders"
_EMBEDDINGS = ("tok_embed.weight", "unembed.weight")


class DemoArtifactsError(RuntimeError):
    pass


def save_demo_model(root: Path, cfg: GPT2Config, state: StateDict, used_ids: torch.Tensor) -> None:
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


def load_demo_model(root: Path = DEMO_DIR) -> tuple[GPT2Config, StateDict]:
    """The demo model's config and full-vocabulary float32 state dict."""
    weights = root / WEIGHTS_FILE
    if not weights.exists():
        raise DemoArtifactsError(f"no demo model at {root}; run `interpql build-demo` first")
    cfg = read_json_config(str(root / CONFIG_FILE), tdb_config_from_json)
    with reading(weights, "the demo's weights (safetensors)"):
        tensors = load_file(str(weights))
    used = tensors.pop("vocab.used_ids").long()
    embedding = tensors.pop("vocab.embedding").float()
    tok_embed = torch.zeros(cfg.n_vocab, cfg.d_model)
    tok_embed[used] = embedding
    unembed = tensors.pop("vocab.unused_unembed_row").float().expand(cfg.n_vocab, -1).clone()
    unembed[used] = embedding
    state = {key: value.float() for key, value in tensors.items()}
    return cfg, state | {"tok_embed.weight": tok_embed, "unembed.weight": unembed}


def autoencoder_path(root: Path, kind: str, layer: int) -> Path:
    return root / AUTOENCODER_DIR / kind / f"{layer}.pt"


def save_demo_autoencoders(
    root: Path, autoencoders: Mapping[tuple[str, int], SparseAutoencoder]
) -> None:
    for (kind, layer), ae in autoencoders.items():
        path = autoencoder_path(root, kind, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict_tdb(dtype=torch.float16), path)


def load_demo_autoencoders(root: Path = DEMO_DIR) -> dict[tuple[str, int], SparseAutoencoder]:
    """{(kind, layer): autoencoder}, kinds named as in Transformer Debugger (`mlp_post_act`,
    `resid_delta_attn`)."""
    autoencoders = {}
    for path in sorted((root / AUTOENCODER_DIR).glob("*/*.pt")):
        with reading(path, "a sparse autoencoder's state dict (torch.save)"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            ae = SparseAutoencoder.from_state_dict(sd).eval().requires_grad_(False)
        autoencoders[path.parent.name, int(path.stem)] = ae
    return dict(sorted(autoencoders.items()))


def load_demo_metrics(root: Path = DEMO_DIR) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((root / METRICS_FILE).read_text())
    return result


def export_hf_folder(dest: Path, root: Path = DEMO_DIR) -> Path:
    """Writes the demo model as a Hugging Face GPT-2 folder (untied lm_head), ~50 MB."""
    save_hf_folder(dest, *load_demo_model(root))
    return dest


def export_tdb_folder(dest: Path, root: Path = DEMO_DIR) -> Path:
    """Writes the demo model as a Transformer Debugger folder (config.json + model_pieces/)."""
    save_tdb_folder(dest, *load_demo_model(root))
    return dest


def artifact_bytes(root: Path = DEMO_DIR) -> dict[str, int]:
    """Bytes on disk per top-level entry of the demo folder, and their total."""
    sizes = {
        entry.name: sum(f.stat().st_size for f in [entry, *entry.rglob("*")] if f.is_file())
        for entry in sorted(root.iterdir())
    }
    return sizes | {"total": sum(sizes.values())}
