"""SAELens dictionaries: a folder of `cfg.json` and `sae_weights.safetensors` (sae-lens 6.x, and
the older configs it still reads), SAEs and transcoders of every architecture it saves.

Written from the format's definitions (DESIGN.md, "SAELens dictionaries"), not from its code:

    x_n = norm_in(x) - b_dec * apply_b_dec_to_input
    standard, transcoder, skip_transcoder    a = relu(x_n W_enc + b_enc)
    jumprelu (and its transcoders)            pre = x_n W_enc + b_enc; a = relu(pre) [pre > theta]
    topk                                      pre = x_n W_enc + b_enc (x |W_dec row| when
                                              rescaling); the k largest, relu'd; the rest 0
    gated                                     a = [x_n W_enc + b_gate > 0] relu(x_n (W_enc
                                              exp(r_mag)) + b_mag)
    output = norm_out(a W_dec + b_dec) (+ x W_skip^T for skip transcoders)

with TopK's latents divided by the decoder rows' norms before decoding when it rescales. The
normalisations: none; constant_norm_rescale (x sqrt(d_in)/|x|, the output divided by the same
factor); layer_norm ((x - mean)/(std + 1e-5), torch's unbiased std, the output times std plus
the mean); expected_average_only_in (x times a dataset-wide factor that the folder does not
hold: it must be given, and the output is divided by it, as folding it into the weights does).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load, save_file

from interpql.backends import remote
from interpql.backends.dictionaries.base import Dictionary
from interpql.file_errors import config_size, is_whole, reading, require_finite

ARCHITECTURES = (
    "standard",
    "gated",
    "topk",
    "jumprelu",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
CONFIG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"


@dataclass(frozen=True)
class SaeLensConfig:
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    hook_name: str
    hook_name_out: str | None  # transcoders: where the output goes
    apply_b_dec_to_input: bool
    normalize_activations: str
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    model_name: str | None = None

    @property
    def is_transcoder(self) -> bool:
        return "transcoder" in self.architecture

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the weights file must hold, and its shape (old JumpReLU files hold
        `log_threshold` instead of `threshold`)."""
        shapes: dict[str, tuple[int, ...]] = {
            "W_enc": (self.d_in, self.d_sae),
            "W_dec": (self.d_sae, self.d_out),
            "b_dec": (self.d_out,),
        }
        if self.architecture == "gated":
            shapes |= {"b_gate": (self.d_sae,), "b_mag": (self.d_sae,), "r_mag": (self.d_sae,)}
        else:
            shapes["b_enc"] = (self.d_sae,)
        if "jumprelu" in self.architecture:
            shapes["threshold"] = (self.d_sae,)
        if "skip" in self.architecture:
            shapes["W_skip"] = (self.d_out, self.d_in)
        return shapes


def parse_config(raw: dict[str, Any]) -> SaeLensConfig:
    """A cfg.json's dictionary; ValueError naming what does not fit."""
    metadata = raw.get("metadata") or {}
    architecture = str(raw.get("architecture", "standard"))
    if architecture == "standard" and raw.get("activation_fn_str") == "topk":
        architecture = "topk"  # how configs before 6.0 said TopK
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    hook = metadata.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if not isinstance(hook, str):
        raise ValueError("no hook_name (metadata.hook_name, hook_name or hook_point)")
    hook_out = metadata.get("hook_name_out") or raw.get("hook_name_out")
    if "transcoder" in architecture and not isinstance(hook_out, str):
        raise ValueError(f"a {architecture} needs hook_name_out")
    normalize = raw.get("normalize_activations")
    if isinstance(normalize, bool):  # configs before 6.0
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = "none" if normalize is None else str(normalize)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize_activations {normalize!r}; known: {NORMALIZATIONS}")
    d_in, d_sae = config_size(raw, "d_in"), config_size(raw, "d_sae")
    d_out = config_size(raw, "d_out") if raw.get("d_out") is not None else d_in
    apply_b_dec = _flag(raw, "apply_b_dec_to_input")
    if apply_b_dec and d_in != d_out:
        raise ValueError("apply_b_dec_to_input needs d_out == d_in")
    if apply_b_dec and "transcoder" in architecture:
        raise ValueError("a transcoder cannot apply_b_dec_to_input")
    k: Any = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if architecture == "topk" and not (is_whole(k) and 0 < int(k) <= d_sae):
        raise ValueError(f"a topk dictionary needs a whole 0 < k <= d_sae ({d_sae}), got {k!r}")
    return SaeLensConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        hook_name=hook,
        hook_name_out=hook_out if "transcoder" in architecture else None,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalize,
        k=int(k) if architecture == "topk" and k is not None else None,
        rescale_acts_by_decoder_norm=_flag(raw, "rescale_acts_by_decoder_norm"),
        model_name=metadata.get("model_name") or raw.get("model_name"),
    )


def _flag(raw: dict[str, Any], key: str) -> bool:
    """raw[key] as JSON's true or false: the string "false" was read as true."""
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value


class SaeLensDictionary(Dictionary):
    def __init__(
        self,
        cfg: SaeLensConfig,
        tensors: dict[str, torch.Tensor],
        scaling_factor: float | None = None,
    ) -> None:
        """`tensors`: the weights file's, checked against `cfg`; `scaling_factor`: the
        dataset-wide input factor of expected_average_only_in (needed there, refused
        elsewhere)."""
        super().__init__()
        if cfg.normalize_activations == "expected_average_only_in" and scaling_factor is None:
            raise ValueError(
                "normalize_activations is expected_average_only_in: the input's scaling factor "
                "is not in the folder; give it (scaling_factor=...) or fold it into the weights"
            )
        if scaling_factor is not None and not (math.isfinite(scaling_factor) and scaling_factor):
            # inf or NaN served nulls; 0 divided by zero on the way out.
            raise ValueError(
                f"scaling_factor must be a finite number other than 0, not {scaling_factor}"
            )
        if scaling_factor is not None and cfg.normalize_activations != "expected_average_only_in":
            raise ValueError(
                "a scaling factor is only for normalize_activations expected_average_only_in"
            )
        self.cfg = cfg
        self.architecture = cfg.architecture
        self.scaling_factor = scaling_factor
        tensors = dict(tensors)
        if (
            "jumprelu" in cfg.architecture
            and "threshold" not in tensors
            and "log_threshold" in tensors
        ):
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        expected = cfg.weight_shapes()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"the weights do not fit a {cfg.architecture} dictionary: missing {missing}, "
                f"unexpected {unexpected}"
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensors[name].shape)}, the config says {shape} "
                    f"(d_in {cfg.d_in}, d_sae {cfg.d_sae}, d_out {cfg.d_out})"
                )
            self.register_buffer(name, tensors[name].detach().float().clone())

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def n_latents(self) -> int:
        return self.cfg.d_sae

    @property
    def rescales(self) -> bool:
        return self.cfg.normalize_activations != "none"

    def _weight(self, name: str) -> torch.Tensor:
        found: torch.Tensor = getattr(self, name)
        return found

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mode = self.cfg.normalize_activations
        one = torch.ones((*x.shape[:-1], 1), dtype=x.dtype, device=x.device)
        if mode == "none":
            return x, one, one * 0
        if mode == "constant_norm_rescale":
            factor = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * factor, 1 / factor, one * 0
        if mode == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = (x - mean).std(dim=-1, keepdim=True)
            return (x - mean) / (std + 1e-5), std, mean
        assert self.scaling_factor is not None
        return x * self.scaling_factor, one / self.scaling_factor, one * 0

    def _decoder_norms(self) -> torch.Tensor:
        norms: torch.Tensor = self._weight("W_dec").norm(dim=-1)
        return norms

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        x_n = self.normalize(x)[0]
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self._weight("b_dec")
        w_enc = self._weight("W_enc")
        if self.architecture == "gated":
            return x_n @ w_enc + self._weight("b_gate")
        pre = x_n @ w_enc + self._weight("b_enc")
        if self.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self._decoder_norms()
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.architecture
        if "jumprelu" in arch:
            return F.relu(pre) * (pre > self._weight("threshold"))
        if arch == "topk":
            assert self.cfg.k is not None
            top = torch.topk(pre, self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        return F.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.architecture != "gated":
            return self.activate(self.pre_activation(x))
        # The gate decides which latents fire, the magnitude path how much.
        x_n = self.normalize(x)[0]
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self._weight("b_dec")
        w_enc = self._weight("W_enc")
        gate = (x_n @ w_enc + self._weight("b_gate")) > 0
        magnitude = x_n @ (w_enc * self._weight("r_mag").exp()) + self._weight("b_mag")
        return gate * F.relu(magnitude)

    def decoder_directions(self) -> torch.Tensor:
        w_dec = self._weight("W_dec")
        if self.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            return w_dec / self._decoder_norms()[:, None]
        return w_dec

    def decoder_bias(self) -> torch.Tensor:
        return self._weight("b_dec")

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        if "skip" not in self.architecture:
            return None
        return x @ self._weight("W_skip").T


def read_saelens(path: str, scaling_factor: float | None = None) -> SaeLensDictionary:
    """The dictionary in a SAELens folder (local or a blobfile URL); FileProblem naming the
    file that does not fit."""
    config_path, weights_path = _join(path, CONFIG_FILE), _join(path, WEIGHTS_FILE)
    with reading(config_path, "a SAELens cfg.json"):
        [raw_config] = remote.read_files([config_path], "a SAELens config")
        raw = json.loads(raw_config)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        cfg = parse_config(raw)
    with reading(weights_path, "a SAELens sae_weights.safetensors"):
        [raw_weights] = remote.read_files([weights_path], "a SAELens dictionary's weights")
        tensors = load(raw_weights)
        require_finite(weights_path, tensors)
        dictionary = SaeLensDictionary(cfg, tensors, scaling_factor)
    return dictionary


def write_saelens(
    folder: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Writes a SAELens folder (sae-lens 6.x layout) from a cfg.json's contents and the weights.
    Checked on the way out: what this writes, `read_saelens` reads."""
    cfg = parse_config(config)
    expected = cfg.weight_shapes()
    if "log_threshold" in tensors:
        expected = {("log_threshold" if k == "threshold" else k): v for k, v in expected.items()}
    if set(tensors) != set(expected):
        raise ValueError(f"tensors {sorted(tensors)} do not fit the config's {sorted(expected)}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(root / WEIGHTS_FILE))


def saelens_config(
    architecture: str,
    d_in: int,
    d_sae: int,
    hook_name: str,
    *,
    d_out: int | None = None,
    hook_name_out: str | None = None,
    model_name: str = "",
    apply_b_dec_to_input: bool = False,
    normalize_activations: str = "none",
    k: int | None = None,
    rescale_acts_by_decoder_norm: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A cfg.json of sae-lens 6.x's shape."""
    config: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name, "sae_lens_version": "6.5.1"},
    }
    if d_out is not None:
        config["d_out"] = d_out
    if hook_name_out is not None:
        config["metadata"]["hook_name_out"] = hook_name_out
    if architecture == "topk":
        config["k"] = k
        config["rescale_acts_by_decoder_norm"] = rescale_acts_by_decoder_norm
    return config


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name
