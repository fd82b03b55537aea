"""Sparse autoencoders in the openai/sparse_autoencoder and Transformer Debugger state-dict format.

    latents = activation(encoder(x - pre_bias) + latent_bias)
    reconstruction = decoder(latents) + pre_bias

Keys: `pre_bias [n_in]`, `encoder.weight [n_latents, n_in]`, `latent_bias [n_latents]`,
`decoder.weight [n_in, n_latents]`, the statistics buffers `stats_last_nonzero`,
`latents_activation_frequency`, `latents_mean_square` (each [n_latents]), and `activation`:
"ReLU", or "TopK" with `activation_state_dict = {"k": int, "postact_fn": "ReLU" | "Identity"}`.

Inputs are used as they are, as Transformer Debugger does. (openai/sparse_autoencoder's later
loader LayerNorm-normalises the inputs of every TopK autoencoder; a file meant for that loader
must be ReLU to mean the same thing in both.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interpql.backends.dictionaries.base import Dictionary

_PARAMETERS = ("pre_bias", "encoder.weight", "latent_bias", "decoder.weight")
_STATISTICS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
_POSTACT_FNS = ("ReLU", "Identity")


class SparseAutoencoder(Dictionary):
    stats_last_nonzero: torch.Tensor  # [n_latents] long: batches since the latent last fired
    latents_activation_frequency: torch.Tensor  # [n_latents]: share of inputs it fires on
    latents_mean_square: torch.Tensor  # [n_latents]: mean squared latent value

    def __init__(
        self, n_inputs: int, n_latents: int, *, k: int | None = None, postact_fn: str = "ReLU"
    ) -> None:
        """A ReLU autoencoder, or a TopK one keeping the `k` largest pre-activations."""
        super().__init__()
        if k is not None and not 0 < k <= n_latents:
            raise ValueError(f"TopK needs 0 < k <= n_latents ({n_latents}), got k={k}")
        if postact_fn not in _POSTACT_FNS:
            raise ValueError(f"unknown TopK postact_fn {postact_fn!r}; known: {_POSTACT_FNS}")
        self.k = k
        self.postact_fn = postact_fn
        self.architecture = "openai-" + ("relu" if k is None else "topk")
        self.pre_bias = nn.Parameter(torch.zeros(n_inputs))
        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.latent_bias = nn.Parameter(torch.zeros(n_latents))
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)
        self.register_buffer("stats_last_nonzero", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("latents_activation_frequency", torch.ones(n_latents))
        self.register_buffer("latents_mean_square", torch.zeros(n_latents))

    @property
    def d_in(self) -> int:
        return int(self.pre_bias.shape[0])

    @property
    def d_out(self) -> int:
        return self.d_in

    @property
    def n_latents(self) -> int:
        return int(self.latent_bias.shape[0])

    @property
    def activation(self) -> str:
        return "ReLU" if self.k is None else "TopK"

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return x, one, one * 0

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n_inputs] -> [..., n_latents], before the activation."""
        return F.linear(x - self.pre_bias, self.encoder.weight, self.latent_bias)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            return F.relu(pre)
        top = torch.topk(pre, self.k, dim=-1)
        values = F.relu(top.values) if self.postact_fn == "ReLU" else top.values
        return torch.zeros_like(pre).scatter(-1, top.indices, values)

    def decoder_directions(self) -> torch.Tensor:
        return self.decoder.weight.T

    def decoder_bias(self) -> torch.Tensor:
        return self.pre_bias

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """[..., n_latents] -> [..., n_inputs] (no normalisation: the input is not needed)."""
        return F.linear(latents, self.decoder.weight) + self.pre_bias

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> SparseAutoencoder:
        """Builds an autoencoder from a Transformer Debugger / openai state dict (not mutated).

        The statistics buffers may be missing (they then take their defaults); anything else
        missing, unexpected or of the wrong shape raises ValueError.
        """
        missing = [key for key in _PARAMETERS if key not in sd]
        unexpected = sorted(
            set(sd) - {*_PARAMETERS, *_STATISTICS, "activation", "activation_state_dict"}
        )
        if missing or unexpected:
            raise ValueError(
                f"not a sparse autoencoder state dict: missing {missing}, unexpected {unexpected}"
            )
        encoder = torch.as_tensor(sd["encoder.weight"])
        if encoder.ndim != 2:
            raise ValueError(f"encoder.weight must be [n_latents, n_inputs], got {encoder.shape}")
        n_latents, n_inputs = encoder.shape
        expected = {
            "pre_bias": (n_inputs,),
            "latent_bias": (n_latents,),
            "decoder.weight": (n_inputs, n_latents),
            **{key: (n_latents,) for key in _STATISTICS},
        }
        for key, shape in expected.items():
            if key in sd and tuple(torch.as_tensor(sd[key]).shape) != shape:
                raise ValueError(
                    f"{key} has shape {tuple(torch.as_tensor(sd[key]).shape)}, expected {shape} "
                    f"for an autoencoder of {n_inputs} inputs and {n_latents} latents"
                )
        activation = sd.get("activation", "ReLU")
        options = dict(sd.get("activation_state_dict") or {})
        if activation == "ReLU":
            ae = cls(n_inputs, n_latents)
        elif activation == "TopK":
            if "k" not in options:
                raise ValueError("a TopK autoencoder needs activation_state_dict['k']")
            ae = cls(
                n_inputs,
                n_latents,
                k=int(options["k"]),
                postact_fn=str(options.get("postact_fn", "ReLU")),
            )
        else:
            raise ValueError(f"unknown activation {activation!r}; known: 'ReLU', 'TopK'")
        tensors = {
            key: torch.as_tensor(sd[key]) for key in (*_PARAMETERS, *_STATISTICS) if key in sd
        }
        ae.load_state_dict(tensors, strict=False)
        return ae

    def state_dict_tdb(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The state dict in the public format; floating tensors cast to `dtype` if given."""
        sd: dict[str, Any] = {}
        for key, tensor in self.state_dict().items():
            value = tensor.detach().clone()
            sd[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        sd["activation"] = self.activation
        sd["activation_state_dict"] = (
            {} if self.k is None else {"k": self.k, "postact_fn": self.postact_fn}
        )
        return sd
