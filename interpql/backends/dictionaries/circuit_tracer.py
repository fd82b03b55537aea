"""circuit-tracer's per-layer transcoder sets: a folder of `config.yaml` (`model_kind:
transcoder_set`, `feature_input_hook`, `feature_output_hook`, optionally `transcoders: [paths]`)
and `layer_{i}.safetensors` each holding `W_enc [d_tc, d_model]` (transposed relative to
SAELens), `W_dec [d_tc, d_model]`, `b_enc`, `b_dec`, and optionally
`activation_function.threshold` (JumpReLU, else ReLU) and `W_skip [d_model, d_model]`.

Each layer becomes a SAELens-layout transcoder (saelens.py) with the same function:
act(x W_enc^T + b_enc), then a W_dec + b_dec (+ x W_skip^T). Cross-layer transcoders
(`W_enc_{i}` / `W_dec_{i}` files) are refused by name: a latent there writes to every later
layer, which is not one dictionary per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml
from safetensors.torch import load

from interpql.backends import remote
from interpql.backends.dictionaries.saelens import SaeLensConfig, SaeLensDictionary
from interpql.file_errors import FileProblem, reading, require_finite

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class TranscoderLayer:
    layer: int
    path: str
    dictionary: SaeLensDictionary


def is_transcoder_set(files: list[str]) -> bool:
    return CONFIG_FILE in files


def read_transcoder_set(folder: str, n_layers: int) -> list[TranscoderLayer]:
    """Every layer's transcoder of the set in `folder`; FileProblem naming the file that does
    not fit."""
    config_path = folder.rstrip("/") + "/" + CONFIG_FILE
    with reading(config_path, "circuit-tracer's config.yaml"):
        [raw] = remote.read_files([config_path], "a transcoder set's config")
        config = yaml.safe_load(raw)
        if not isinstance(config, dict):
            raise ValueError("not a YAML mapping")
        kind = config.get("model_kind", "transcoder_set")
        if kind != "transcoder_set":
            raise ValueError(
                f"model_kind {kind!r}: only per-layer transcoder sets are read (cross-layer "
                "transcoders write to every later layer)"
            )
        input_hook, output_hook = (
            config.get("feature_input_hook"),
            config.get("feature_output_hook"),
        )
        if not isinstance(input_hook, str) or not isinstance(output_hook, str):
            raise ValueError("needs feature_input_hook and feature_output_hook")
    # Relative paths are the folder's (made whole below, once: a relative folder was prefixed
    # twice).
    paths = config.get("transcoders") or [f"layer_{i}.safetensors" for i in range(n_layers)]
    layers = []
    for layer, path in enumerate(paths):
        path = str(path)
        if not path.startswith(("/", "az://", "gs://", "s3://", "http")):
            path = folder.rstrip("/") + "/" + path
        with reading(path, "a circuit-tracer transcoder (safetensors)"):
            [data] = remote.read_files([path], f"layer {layer}'s transcoder")
            tensors = load(data)
            require_finite(path, tensors)  # NaN served NaN, which no GraphQL Float carries
            dictionary = _as_saelens(tensors, input_hook, output_hook, layer)
            layers.append(TranscoderLayer(layer, path, dictionary))
    if not layers:
        raise FileProblem(config_path, "lists no transcoders")
    return layers


def _as_saelens(
    tensors: dict[str, torch.Tensor], input_hook: str, output_hook: str, layer: int
) -> SaeLensDictionary:
    tensors = dict(tensors)
    if "W_enc" not in tensors or "W_dec" not in tensors:
        raise ValueError(f"needs W_enc and W_dec, has {sorted(tensors)}")
    w_enc = tensors.pop("W_enc")  # [d_tc, d_model]
    d_tc, d_in = w_enc.shape
    d_out = tensors["W_dec"].shape[-1]
    threshold = tensors.pop("activation_function.threshold", None)
    skip = "W_skip" in tensors
    architecture = ("jumprelu_" if threshold is not None else "") + (
        "skip_transcoder" if skip else "transcoder"
    )
    cfg = SaeLensConfig(
        architecture=architecture,
        d_in=int(d_in),
        d_sae=int(d_tc),
        d_out=int(d_out),
        hook_name=_full_hook(input_hook, layer),
        hook_name_out=_full_hook(output_hook, layer),
        apply_b_dec_to_input=False,
        normalize_activations="none",
    )
    tensors["W_enc"] = w_enc.T
    if threshold is not None:
        tensors["threshold"] = threshold
    return SaeLensDictionary(cfg, tensors)


def _full_hook(hook: str, layer: int) -> str:
    """circuit-tracer names hooks within a block (`mlp.hook_in`); SAELens with the block."""
    return hook if hook.startswith("blocks.") else f"blocks.{layer}.{hook}"
