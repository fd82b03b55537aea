"""GPT-2 weights in the formats that exist in the wild, to and from our `GPT2` module.

* Transformer Debugger folders: `config.json` + `model_pieces/<key>.pt`, one tensor per file,
  from a local path or any blobfile URL (az://, gs://).
* Hugging Face folders: `config.json` (GPT2Config) + `model.safetensors`, whose Conv1D weights
  are stored transposed relative to nn.Linear.
* Random models of any shape, for tests and benchmarks.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import blobfile as bf
import torch
from safetensors.torch import load_file, save_file

from interpql.backends import remote
from interpql.backends.gpt2.model import GPT2, PRESETS, GPT2Config, init_random
from interpql.file_errors import FileProblem, config_size, reading, require_finite

# Transformer Debugger's public GPT-2 folders, readable where the network allows.
REGISTERED_MODELS: dict[str, str] = {
    f"gpt2-{size}": f"az://openaipublic/neuron-explainer/subject-models/gpt2/{size}"
    for size in ("small", "medium", "large", "xl")
}
_VOCAB_SIZES = {"gpt2": 50257, "r50k_base": 50257}

StateDict = dict[str, torch.Tensor]


class WeightsFormatError(ValueError):
    pass


def build_model(cfg: GPT2Config, state: StateDict) -> GPT2:
    model = GPT2(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsFormatError(
            f"weights do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model


def random_model(cfg: GPT2Config, seed: int = 0) -> GPT2:
    return init_random(GPT2(cfg), seed)


# --- Transformer Debugger ----------------------------------------------------------------------


def read_json_config(path: str, reader: Any) -> GPT2Config:
    """A config.json read through `reader` (tdb_ or hf_config_from_json); any problem with it
    names the file."""
    [data] = remote.read_files([path], "the model's config")
    with reading(path, "a model's config.json"):
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        cfg: GPT2Config = reader(raw)
    return cfg


def tdb_config_from_json(raw: dict[str, Any]) -> GPT2Config:
    d_model = config_size(raw, "d_model")
    n_heads = config_size(raw, "n_heads")
    encoding = raw.get("enc", "gpt2")
    # m_attn and m_mlp are multiples of d_model: what they make must be a size too.
    sizes = {"d_attn": d_model * raw.get("m_attn", 1), "d_mlp": d_model * raw.get("m_mlp", 4)}
    d_attn = config_size(sizes, "d_attn")
    if d_attn % n_heads:
        raise ValueError(f"d_model * m_attn = {d_attn} does not divide into {n_heads} heads")
    return GPT2Config(
        n_layers=config_size(raw, "n_layers"),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_attn // n_heads,
        d_mlp=config_size(sizes, "d_mlp"),
        n_ctx=config_size(raw, "ctx_window"),
        n_vocab=config_size(raw, "n_vocab", _VOCAB_SIZES.get(encoding, 50257)),
    )


# The keys Transformer Debugger's TransformerConfig takes: its loader refuses any other (an
# n_vocab among them: the vocabulary is the encoding's).
TDB_CONFIG_KEYS = ("enc", "ctx_window", "d_model", "n_layers", "m_attn", "n_heads", "m_mlp")


def tdb_config_to_json(cfg: GPT2Config) -> dict[str, Any]:
    vocab = {size: name for name, size in _VOCAB_SIZES.items()}
    if cfg.n_vocab not in vocab:
        raise ValueError(
            f"a Transformer Debugger folder's vocabulary is its encoding's (gpt2: 50257 "
            f"tokens); this model has {cfg.n_vocab}"
        )
    return {
        "enc": "gpt2",
        "ctx_window": cfg.n_ctx,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "m_attn": cfg.n_heads * cfg.d_head / cfg.d_model,
        "n_heads": cfg.n_heads,
        "m_mlp": cfg.d_mlp / cfg.d_model,
    }


def load_tdb_folder(location: str) -> tuple[GPT2Config, StateDict]:
    """Reads a Transformer Debugger model folder from a path or a blobfile URL."""
    config_path = bf.join(location, "config.json")
    if not remote.call(lambda: bf.exists(config_path), "the model", config_path):
        raise WeightsFormatError(f"{location} has no config.json")
    cfg = read_json_config(config_path, tdb_config_from_json)
    pieces_dir = bf.join(location, "model_pieces")
    listed = remote.call(lambda: list(bf.listdir(pieces_dir)), "the model", pieces_dir)
    paths = [bf.join(pieces_dir, name) for name in listed if name.endswith(".pt")]
    state = {}
    for path, data in zip(paths, remote.read_files(paths, "the model's weights"), strict=True):
        with reading(path, "a tensor saved by torch.save"):
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state[path.rsplit("/", 1)[-1].removesuffix(".pt")] = tensor.float()
    return cfg, state


def save_tdb_folder(location: str | os.PathLike[str], cfg: GPT2Config, state: StateDict) -> None:
    root = Path(location)
    (root / "model_pieces").mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(tdb_config_to_json(cfg), indent=2))
    for key, tensor in state.items():
        torch.save(tensor.detach().clone().contiguous(), root / "model_pieces" / f"{key}.pt")


# --- Hugging Face ------------------------------------------------------------------------------


def hf_config_from_json(raw: dict[str, Any]) -> GPT2Config:
    if raw.get("model_type", "gpt2") != "gpt2":
        raise WeightsFormatError(
            f"the native backend serves GPT-2 only, not {raw.get('model_type')!r}; "
            "use --backend transformerlens"
        )
    d_model = config_size(raw, "n_embd")
    n_heads = config_size(raw, "n_head")
    if d_model % n_heads:
        raise ValueError(f"n_embd {d_model} does not divide into {n_heads} heads")
    return GPT2Config(
        n_layers=config_size(raw, "n_layer"),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=config_size({"n_inner": raw.get("n_inner") or 4 * d_model}, "n_inner"),  # null: 4x
        n_ctx=config_size(raw, "n_positions"),
        n_vocab=config_size(raw, "vocab_size"),
        ln_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
    )


def hf_config_to_json(cfg: GPT2Config, tied: bool) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layers,
        "n_embd": cfg.d_model,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_mlp,
        "n_positions": cfg.n_ctx,
        "n_ctx": cfg.n_ctx,
        "vocab_size": cfg.n_vocab,
        "layer_norm_epsilon": cfg.ln_eps,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": tied,
    }


def load_hf_folder(location: str | os.PathLike[str]) -> tuple[GPT2Config, StateDict]:
    root = Path(location)
    cfg = read_json_config(str(root / "config.json"), hf_config_from_json)
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        raise FileProblem(root / "config.json", "n_embd must be a multiple of n_head")
    weights = root / "model.safetensors"
    with reading(weights, "a safetensors file"):
        raw = load_file(str(weights))
    hf = {key.removeprefix("transformer."): value.float() for key, value in raw.items()}
    state: StateDict = {
        "tok_embed.weight": hf["wte.weight"],
        "pos_embed.weight": hf["wpe.weight"],
        "final_ln.weight": hf["ln_f.weight"],
        "final_ln.bias": hf["ln_f.bias"],
        "unembed.weight": hf.get("lm_head.weight", hf["wte.weight"]),
    }
    for i in range(cfg.n_layers):
        h, x = f"h.{i}.", f"xf_layers.{i}."
        q, k, v = hf[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = hf[h + "attn.c_attn.bias"].chunk(3)
        state |= {
            x + "attn.q_proj.weight": q,
            x + "attn.k_proj.weight": k,
            x + "attn.v_proj.weight": v,
            x + "attn.q_proj.bias": qb,
            x + "attn.k_proj.bias": kb,
            x + "attn.v_proj.bias": vb,
            x + "attn.out_proj.weight": hf[h + "attn.c_proj.weight"].t(),
            x + "attn.out_proj.bias": hf[h + "attn.c_proj.bias"],
            x + "mlp.in_layer.weight": hf[h + "mlp.c_fc.weight"].t(),
            x + "mlp.in_layer.bias": hf[h + "mlp.c_fc.bias"],
            x + "mlp.out_layer.weight": hf[h + "mlp.c_proj.weight"].t(),
            x + "mlp.out_layer.bias": hf[h + "mlp.c_proj.bias"],
        }
        for ln in ("ln_1", "ln_2"):
            state[x + f"{ln}.weight"] = hf[h + f"{ln}.weight"]
            state[x + f"{ln}.bias"] = hf[h + f"{ln}.bias"]
    return cfg, {key: value.contiguous() for key, value in state.items()}


def save_hf_folder(location: str | os.PathLike[str], cfg: GPT2Config, state: StateDict) -> None:
    root = Path(location)
    root.mkdir(parents=True, exist_ok=True)
    tied = torch.equal(state["unembed.weight"], state["tok_embed.weight"])
    hf: StateDict = {
        "transformer.wte.weight": state["tok_embed.weight"],
        "transformer.wpe.weight": state["pos_embed.weight"],
        "transformer.ln_f.weight": state["final_ln.weight"],
        "transformer.ln_f.bias": state["final_ln.bias"],
    }
    if not tied:
        hf["lm_head.weight"] = state["unembed.weight"]
    for i in range(cfg.n_layers):
        h, x = f"transformer.h.{i}.", f"xf_layers.{i}."
        hf |= {
            h + "attn.c_attn.weight": torch.cat(
                [state[x + f"attn.{p}_proj.weight"] for p in "qkv"], dim=0
            ).t(),
            h + "attn.c_attn.bias": torch.cat([state[x + f"attn.{p}_proj.bias"] for p in "qkv"]),
            h + "attn.c_proj.weight": state[x + "attn.out_proj.weight"].t(),
            h + "attn.c_proj.bias": state[x + "attn.out_proj.bias"],
            h + "mlp.c_fc.weight": state[x + "mlp.in_layer.weight"].t(),
            h + "mlp.c_fc.bias": state[x + "mlp.in_layer.bias"],
            h + "mlp.c_proj.weight": state[x + "mlp.out_layer.weight"].t(),
            h + "mlp.c_proj.bias": state[x + "mlp.out_layer.bias"],
        }
        for ln in ("ln_1", "ln_2"):
            hf[h + f"{ln}.weight"] = state[x + f"{ln}.weight"]
            hf[h + f"{ln}.bias"] = state[x + f"{ln}.bias"]
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(hf_config_to_json(cfg, tied), indent=2))


# --- Resolving what the user named -------------------------------------------------------------


def read_config(spec: str) -> GPT2Config:
    """The architecture `spec` names, without reading its weights."""
    if spec.startswith("random:"):
        return _preset(spec)[0]
    location = REGISTERED_MODELS.get(spec, spec)
    config_path = bf.join(location, "config.json")
    if "://" not in location and (Path(location) / "weights.safetensors").exists():
        return read_json_config(config_path, tdb_config_from_json)
    if "://" not in location and (Path(location) / "model.safetensors").exists():
        return read_json_config(config_path, hf_config_from_json)
    if not remote.call(lambda: bf.exists(config_path), "the model", config_path):
        raise WeightsFormatError(f"{spec!r} has no config.json")
    return read_json_config(config_path, tdb_config_from_json)


def _preset(spec: str) -> tuple[GPT2Config, int]:
    _, preset, *seed = spec.split(":")
    if preset not in PRESETS:
        raise WeightsFormatError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset], int(seed[0]) if seed else 0


def load_weights(spec: str) -> tuple[GPT2Config, StateDict]:
    """`spec` is a registered name, a blobfile URL, a local TDB or HF folder, or
    `random:<preset>[:seed]` (presets in `model.PRESETS`)."""
    if spec.startswith("random:"):
        cfg, seed = _preset(spec)
        return cfg, {k: v.detach() for k, v in random_model(cfg, seed).state_dict().items()}
    location = REGISTERED_MODELS.get(spec, spec)
    cfg, state = _load_located(spec, location)
    require_finite(location, state)
    return cfg, state


def _load_located(spec: str, location: str) -> tuple[GPT2Config, StateDict]:
    if "://" in location:
        return load_tdb_folder(location)
    root = Path(location)
    if (root / "model.safetensors").exists():
        return load_hf_folder(root)
    if (root / "weights.safetensors").exists():
        # The compact format (compact.py), which builds on this module.
        from interpql.backends.gpt2.compact import load_compact

        return load_compact(root)
    if (root / "model_pieces").is_dir():
        return load_tdb_folder(str(root))
    raise WeightsFormatError(
        f"{spec!r} is neither a registered model ({', '.join(REGISTERED_MODELS)}), a URL, "
        "a Transformer Debugger folder (config.json + model_pieces/) nor a Hugging Face "
        "folder (config.json + model.safetensors)"
    )
