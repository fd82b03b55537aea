"""A sparse dictionary (SAE or transcoder), as the hooks and the analyses use it.

    x_n, scale, shift = normalize(x)              per input; (x, 1, 0) without normalisation
    latents           = encode(x)                 from x_n (less b_dec where the config says)
    output            = (latents @ D + b_dec) * scale + shift + skip(x)

`D` (`decoder_directions`) is what one unit of each latent adds before un-normalising: the
decoder rows (divided by their norms for TopK dictionaries that rescale by them). So a latent's
write at a token is `latent * D[i] * scale`, the dictionary's bias term `b_dec * scale + shift`,
and a skip transcoder's skip term `skip(x)`; with the error term (target - output of the clean
latents), these are the whole of what the dictionary's hook holds.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class Dictionary(nn.Module, abc.ABC):
    """Subclasses set `architecture` and implement `normalize`, `pre_activation`, `activate`,
    `decoder_directions` and `decoder_bias` (and `skip` for skip transcoders)."""

    architecture: str

    @property
    @abc.abstractmethod
    def d_in(self) -> int: ...

    @property
    @abc.abstractmethod
    def d_out(self) -> int: ...

    @property
    @abc.abstractmethod
    def n_latents(self) -> int: ...

    @property
    def n_inputs(self) -> int:  # the openai autoencoders' name for d_in
        return self.d_in

    @property
    def is_transcoder(self) -> bool:
        return "transcoder" in self.architecture

    @abc.abstractmethod
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d_in] -> (x_n, scale [..., 1], shift [..., 1 or d_out])."""

    @abc.abstractmethod
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Each latent's pre-activation from the raw input: [..., n_latents]."""

    @abc.abstractmethod
    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The latents from their pre-activations (ReLU, JumpReLU, TopK, ...)."""

    @abc.abstractmethod
    def decoder_directions(self) -> torch.Tensor:
        """[n_latents, d_out]: what one unit of each latent adds, before un-normalising."""

    @abc.abstractmethod
    def decoder_bias(self) -> torch.Tensor:
        """[d_out]: the decoder's bias, before un-normalising."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., n_latents]."""
        return self.activate(self.pre_activation(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """A skip transcoder's direct path from its input, [..., d_out]; None for the rest."""
        return None

    @property
    def rescales(self) -> bool:
        """Whether un-normalising multiplies decoded values by anything but 1."""
        return False

    def output_scale(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 1]: the factor un-normalising multiplies decoded values by."""
        return self.normalize(x)[1]

    def decoded_bias(self, x: torch.Tensor) -> torch.Tensor:
        """What the output holds with every latent 0, the skip term aside: [..., d_out]."""
        _, scale, shift = self.normalize(x)
        return self.decoder_bias() * scale + shift

    def decode(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[..., n_latents] latents of the input `x` [..., d_in] -> [..., d_out]."""
        _, scale, shift = self.normalize(x)
        out = (latents @ self.decoder_directions() + self.decoder_bias()) * scale + shift
        skip = self.skip(x)
        return out if skip is None else out + skip

    def decoded_change(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """decode(latents + delta, x) - decode(latents, x): decoding is affine in the latents,
        so one product instead of two decodes (the error term's edit)."""
        scale = self.output_scale(x) if self.rescales else 1.0
        change: torch.Tensor = (delta @ self.decoder_directions()) * scale
        return change

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (latents, output)."""
        latents = self.encode(x)
        return latents, self.decode(latents, x)
