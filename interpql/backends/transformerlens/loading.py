"""Booting a `TransformerBridge` from what a user names, with the tokenizer that goes with it.

`transformer_lens` and `transformers` are imported here, lazily: they are the optional extra
`interpql[transformerlens]`, and nothing else in interpql needs them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from interpql.backends.base import Architecture, Tokenizer
from interpql.backends.gpt2.loading import (
    REGISTERED_MODELS,
    load_weights,
    read_config,
    save_hf_folder,
)
from interpql.backends.hf_tokenizer import HFTokenizer, PaddedVocabulary, gpt2_hf_tokenizer
from interpql.backends.tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding

EXTRA = "interpql[transformerlens]"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

Booted = tuple[Any, Tokenizer, str]  # (bridge, tokenizer, family: the HF model_type)


def boot(spec: str, device: str, dtype: torch.dtype) -> Booted:
    """`spec`: a local Hugging Face folder, a hub name, or anything the native GPT-2 loader reads
    (random:<preset>, a Transformer Debugger folder or URL, a registered name), converted to a
    Hugging Face folder on the way."""
    bridge_class()  # without TransformerLens, say so before converting anything
    root = Path(spec)
    if _is_hf_folder(root):
        return _boot_folder(root, device, dtype)
    if _is_native_spec(spec):
        with tempfile.TemporaryDirectory(prefix="interpql-hf-") as folder:
            save_hf_folder(folder, *load_weights(spec))  # or its error, naming every format
            return _boot_folder(Path(folder), device, dtype)
    bridge = bridge_class().boot_transformers(spec, device=device, dtype=dtype)
    return bridge, HFTokenizer(bridge.tokenizer), str(bridge.original_model.config.model_type)


def boot_hf_model(hf_model: Any, hf_tokenizer: Any = None) -> Booted:
    """An already-loaded Hugging Face causal LM, left on its device and in its dtype.
    TransformerLens replaces some of its submodules in place."""
    config = hf_model.config
    tokenizer, for_bridge = _tokenizers(hf_tokenizer, int(config.vocab_size))
    bridge = bridge_class().boot_transformers(
        config.name_or_path or config.model_type, hf_model=hf_model, tokenizer=for_bridge
    )
    return bridge, tokenizer, str(config.model_type)


def _boot_folder(root: Path, device: str, dtype: torch.dtype) -> Booted:
    config = json.loads((root / "config.json").read_text())
    hf_tokenizer = None
    if any((root / name).exists() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(root))
    tokenizer, for_bridge = _tokenizers(hf_tokenizer, int(config["vocab_size"]))
    # Given a tokenizer, TransformerLens never looks for one on the hub.
    bridge = bridge_class().boot_transformers(
        str(root), device=device, dtype=dtype, tokenizer=for_bridge
    )
    return bridge, tokenizer, str(config.get("model_type", "unknown"))


def _tokenizers(hf_tokenizer: Any, n_vocab: int) -> tuple[Tokenizer, Any]:
    """(ours, the one TransformerLens is given). Without tokenizer files, a model whose
    vocabulary holds GPT-2's reads GPT-2's tokenizer (built offline)."""
    if hf_tokenizer is not None:
        return HFTokenizer(hf_tokenizer), hf_tokenizer
    if n_vocab < GPT2_VOCAB_SIZE:
        raise ValueError(
            f"the model has no tokenizer files and a vocabulary of {n_vocab} tokens, too few "
            f"for GPT-2's {GPT2_VOCAB_SIZE}: add its tokenizer's files to the folder"
        )
    encoding = gpt2_encoding()
    ours: Tokenizer = (
        encoding if n_vocab == GPT2_VOCAB_SIZE else PaddedVocabulary(encoding, n_vocab)
    )
    return ours, gpt2_hf_tokenizer()


def _is_hf_folder(root: Path) -> bool:
    # Transformer Debugger folders have a config.json too, without model_type.
    config = root / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def _is_native_spec(spec: str) -> bool:
    """Whether `spec` is for the native loader: anything but a hub name (which is never a local
    path: a path that is not a model folder gets the native loader's error)."""
    return (
        spec.startswith(("random:", "/", ".", "~"))
        or spec in REGISTERED_MODELS
        or "://" in spec
        or Path(spec).exists()
    )


def read_architecture(spec: str) -> Architecture:
    """The architecture `spec` names, from its config alone (for --no-model)."""
    if not _is_hf_folder(Path(spec)) and _is_native_spec(spec):
        return read_config(spec).architecture
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec)
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    return Architecture(
        n_layers=int(config.num_hidden_layers),
        d_model=d_model,
        n_heads=n_heads,
        d_head=int(getattr(config, "head_dim", None) or d_model // n_heads),
        d_mlp=int(getattr(config, "intermediate_size", None) or 4 * d_model),
        n_ctx=int(config.max_position_embeddings),
        n_vocab=int(config.vocab_size),
        family=str(config.model_type),
        norm_eps=float(
            getattr(config, "layer_norm_epsilon", None)
            or getattr(config, "rms_norm_eps", None)
            or 1e-5
        ),
        n_kv_heads=(
            None
            if getattr(config, "num_key_value_heads", None) in (None, n_heads)
            else int(config.num_key_value_heads)
        ),
        gated_mlp=config.model_type in GATED_MLP_FAMILIES,
        post_sublayer_norms=config.model_type in POST_NORM_FAMILIES,
    )


# What a config alone says of the MLP and the sublayer norms (for --no-model); with weights
# the backend reads both off the bridge's hooks instead.
GATED_MLP_FAMILIES = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
    }
)
POST_NORM_FAMILIES = frozenset({"gemma2", "gemma3", "gemma3_text"})


def bridge_class() -> Any:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise ImportError(
            f"the transformerlens backend needs TransformerLens 4.x: pip install '{EXTRA}'"
        ) from exc
    return TransformerBridge
