"""How the demo's artefacts lie on disk (interpql/data/tiny-stdlib/), and how they load.

    tiny-stdlib/
      config.json, weights.safetensors
                           the model, a compact GPT-2 folder (backends/gpt2/compact.py)
      autoencoders/{mlp_post_act,resid_delta_attn}/{layer}.pt
                           float16 state dicts in the openai/sparse_autoencoder format
      dictionaries/{res-sae,transcoder}/layer_{L}/{cfg.json,sae_weights.safetensors}
                           SAELens folders (float16): residual-stream TopK SAEs at
                           hook_resid_post, skip transcoders from mlp.hook_in to hook_mlp_out
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

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import Location
from interpql.backends.dictionaries.loading import read_dictionaries
from interpql.backends.dictionaries.saelens import SaeLensDictionary
from interpql.backends.gpt2.compact import is_compact_folder, load_compact, save_compact
from interpql.backends.gpt2.loading import StateDict, save_hf_folder, save_tdb_folder
from interpql.backends.gpt2.model import GPT2Config
from interpql.embedded import EMBEDDED_DIR, EMBEDDED_NAME
from interpql.file_errors import reading

DEMO_NAME = EMBEDDED_NAME
DEMO_DIR = EMBEDDED_DIR
METRICS_FILE = "metrics.json"
AUTOENCODER_DIR = "autoencoders"
DICTIONARY_DIR = "dictionaries"


class DemoArtifactsError(RuntimeError):
    pass


def save_demo_model(root: Path, cfg: GPT2Config, state: StateDict, used_ids: torch.Tensor) -> None:
    save_compact(root, cfg, state, used_ids)


def load_demo_model(root: Path = DEMO_DIR) -> tuple[GPT2Config, StateDict]:
    """The demo model's config and full-vocabulary float32 state dict."""
    if not is_compact_folder(root):
        raise DemoArtifactsError(f"no demo model at {root}; run `interpql build-demo` first")
    return load_compact(root)


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


def load_demo_dictionaries(
    root: Path = DEMO_DIR,
) -> dict[tuple[str, int], tuple[SaeLensDictionary, Location, Location]]:
    """{(set name, layer): (dictionary, input, output)} of the demo's SAELens dictionaries."""
    found = {}
    for folder in sorted((root / DICTIONARY_DIR).glob("*")):
        for each in read_dictionaries(str(folder), n_layers=load_demo_model(root)[0].n_layers):
            assert isinstance(each.dictionary, SaeLensDictionary)
            found[folder.name, each.layer] = (each.dictionary, each.input, each.output)
    return dict(sorted(found.items()))


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
