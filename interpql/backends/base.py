"""The Backend protocol: the one page a backend author reads.

A backend owns one loaded model and answers batched requests. Everything that crosses this line
is a plain dataclass or a tensor; no GraphQL type ever reaches a backend.

What a backend must do
----------------------
1. Describe its model: `architecture` (an `Architecture`), `tokenizer` (a tiktoken-compatible
   `encode`/`decode` object) and `locations` (the hook locations it can save or intervene on).

2. Run a batch of prompts: `run(request: ForwardRequest) -> ForwardResult`.
   * `request.tokens` holds one token list per prompt; lengths differ. Pad on the right and use a
     causal mask, so padding never changes a real token's computation. Results are padded to the
     longest prompt; `ForwardResult.lengths` says which positions are real.
   * At each `HookPoint` the model passes its activation through `HookSession.process` (see
     `hooks.py`): that applies `request.interventions` (set part of an activation to a value),
     saves what `request.save` names, and keeps gradients for what `request.save_grads` names.
     Every saved activation is token-major: ``[batch, token, ...]`` with the shapes listed on
     `Location`.
   * When `request.backward` is set, compute the per-prompt loss it describes (`losses.py`),
     backpropagate the sum over prompts (or, with `request.trace`, the traced value the hook
     session computed: `HookSession.traced_value`), and return gradients of the saved points.
     Otherwise run under `torch.inference_mode()`.
   * Always return float32 logits ``[batch, token, vocab]`` and the next-token loss per prompt.
   * Autoencoders attached with `attach_autoencoder` are spliced in by the hook session at
     their input location: their latents become one more location to save or overwrite.

3. Expose weights in TransformerLens's naming (`weight`), shapes as listed on `WEIGHT_SHAPES`,
   so loaders can compute write directions, direct effects and logit lenses without knowing the
   implementation.

A backend is called from one worker thread at a time (loaders serialise calls per model), so it
need not be thread-safe, but it must not keep per-request state between calls.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

import torch


class Location(StrEnum):
    """Where in a layer an activation can be saved or overwritten, with its saved shape."""

    RESID_PRE = "resid_pre"  # [batch, token, d_model]
    ATTN_Q = "attn_q"  # [batch, token, head, d_head]
    ATTN_K = "attn_k"  # [batch, token, head, d_head]
    ATTN_V = "attn_v"  # [batch, token, head, d_head]
    ATTN_SCORES = "attn_scores"  # [batch, query_token, head, key_token], before the mask
    ATTN_PROBS = "attn_probs"  # [batch, query_token, head, key_token]
    ATTN_Z = "attn_z"  # [batch, token, head, d_head]: probability-weighted values
    ATTN_OUT = "attn_out"  # [batch, token, d_model]: what attention adds to the residual
    RESID_MID = "resid_mid"  # [batch, token, d_model]
    MLP_PRE = "mlp_pre"  # [batch, token, d_mlp]
    MLP_POST = "mlp_post"  # [batch, token, d_mlp]
    MLP_OUT = "mlp_out"  # [batch, token, d_model]: what the MLP adds to the residual
    RESID_POST = "resid_post"  # [batch, token, d_model]
    # Latents of an attached autoencoder, computed from its input location (`AutoencoderInput`).
    MLP_AE_LATENTS = "mlp_autoencoder_latents"  # [batch, token, n_latents]
    ATTN_AE_LATENTS = "attn_autoencoder_latents"  # [batch, token, n_latents]


class AutoencoderInput(StrEnum):
    """What an autoencoder reads, in the names of openai/sparse_autoencoder's public files."""

    MLP_POST_ACT = "mlp_post_act"  # Location.MLP_POST
    RESID_DELTA_MLP = "resid_delta_mlp"  # Location.MLP_OUT
    RESID_DELTA_ATTN = "resid_delta_attn"  # Location.ATTN_OUT

    @property
    def location(self) -> Location:
        return {
            AutoencoderInput.MLP_POST_ACT: Location.MLP_POST,
            AutoencoderInput.RESID_DELTA_MLP: Location.MLP_OUT,
            AutoencoderInput.RESID_DELTA_ATTN: Location.ATTN_OUT,
        }[self]

    @property
    def latents(self) -> Location:
        if self is AutoencoderInput.RESID_DELTA_ATTN:
            return Location.ATTN_AE_LATENTS
        return Location.MLP_AE_LATENTS


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    location: Location

    def __str__(self) -> str:
        return f"{self.layer}.{self.location.value}"


@dataclass(frozen=True)
class Architecture:
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    n_vocab: int
    family: str = "gpt2"


@dataclass(frozen=True)
class Intervention:
    """Overwrite part of an activation with `value` while the forward pass runs.

    `token` None means every token; `index` indexes the trailing axes of the location's shape
    (a neuron, a head, a head's key token, ...) and () means the whole vector; `prompt` None means
    every prompt of the batch.
    """

    point: HookPoint
    value: float
    token: int | None = None
    index: tuple[int, ...] = ()
    prompt: int | None = None


@dataclass(frozen=True)
class Addition:
    """Add `vector` to an activation's trailing axis while the forward pass runs (steering).

    `token` None means every token; `prompt` None means every prompt of the batch.
    """

    point: HookPoint
    vector: tuple[float, ...]
    token: int | None = None
    prompt: int | None = None


class AttentionTrace(StrEnum):
    """Which path of an attention score or write the gradient may flow through."""

    Q = "q"
    K = "k"
    QK = "qk"
    V = "v"


@dataclass(frozen=True)
class Trace:
    """Start the backward pass at an upstream activation instead of at the loss.

    Without `attention`: the activation at `point`, `token` and `index`. With Q, K or QK: the
    attention score of head `index[0]` between query `token` and key `key_token` (`point` is
    that layer's ATTN_Q), the other side detached for Q and K. With V: what the head writes at
    query `token` from `key_token`, projected on `value_direction` (a d_head vector: W_O[h]
    applied to the direction of interest), with the attention probability detached.
    The value is summed over the prompts of the batch.
    """

    point: HookPoint
    token: int
    index: tuple[int, ...]
    attention: AttentionTrace | None = None
    key_token: int | None = None
    value_direction: tuple[float, ...] | None = None


class LossKind(StrEnum):
    NEXT_TOKEN = "next_token"  # mean cross-entropy of each next token of the prompt
    LOGIT_DIFF = "logit_diff"  # last token: mean target logits - mean distractor logits
    LOGIT_MINUS_MEAN = "logit_minus_mean"  # last token: mean target logits - mean of all logits
    PROBS = "probs"  # last token: summed probability of the targets
    ZERO = "zero"  # a constant 0: gradients are all zero, useful as a baseline


@dataclass(frozen=True)
class LossSpec:
    kind: LossKind = LossKind.NEXT_TOKEN
    target_tokens: tuple[int, ...] = ()
    distractor_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class ForwardRequest:
    tokens: tuple[tuple[int, ...], ...]
    save: frozenset[HookPoint] = frozenset()
    interventions: tuple[Intervention, ...] = ()
    additions: tuple[Addition, ...] = ()
    backward: LossSpec | None = None
    trace: Trace | None = None  # when set, gradients are of the traced value, not the loss
    save_grads: frozenset[HookPoint] = frozenset()
    # Where an autoencoder's latents are used (saved, overwritten or differentiated), the model
    # continues from decode(latents) + error, the error being what the autoencoder misses: with
    # latents untouched that is the original activation. False drops the error term, running
    # the model on the reconstruction alone.
    autoencoder_error_term: bool = True


@dataclass
class ForwardResult:
    lengths: list[int]
    logits: torch.Tensor  # [batch, token, vocab], float32; positions >= length are padding
    next_token_loss: torch.Tensor  # [batch]; nan for one-token prompts
    activations: dict[HookPoint, torch.Tensor] = field(default_factory=dict)
    gradients: dict[HookPoint, torch.Tensor] = field(default_factory=dict)
    backward_loss: torch.Tensor | None = None  # [batch], when request.backward was set
    elapsed_s: float = 0.0
    memory_before_bytes: int = 0
    memory_after_bytes: int = 0
    # Rows of the whole pass when the backend ran this request together with other callers'
    # (a Ray Serve deployment does); None: the pass was this request's alone.
    pass_rows: int | None = None


class Tokenizer(Protocol):
    """What backends offer for text (tiktoken's `Encoding` has it; wrap other tokenizers)."""

    @property
    def n_vocab(self) -> int: ...

    def encode(self, text: str, *, allowed_special: Literal["all"] = ...) -> list[int]: ...

    def decode(self, tokens: Sequence[int], errors: str = ...) -> str: ...

    def decode_single_token_bytes(self, token: int) -> bytes: ...


# TransformerLens's weight names, which every backend answers in `weight`.
WEIGHT_SHAPES: dict[str, str] = {
    "W_E": "[vocab, d_model]",
    "W_pos": "[n_ctx, d_model]",
    "W_U": "[d_model, vocab]",
    "blocks.{L}.attn.W_Q": "[head, d_model, d_head]",
    "blocks.{L}.attn.W_K": "[head, d_model, d_head]",
    "blocks.{L}.attn.W_V": "[head, d_model, d_head]",
    "blocks.{L}.attn.W_O": "[head, d_head, d_model]",
    "blocks.{L}.mlp.W_in": "[d_model, d_mlp]",
    "blocks.{L}.mlp.W_out": "[d_mlp, d_model]",
}


class Autoencoder(Protocol):
    """A sparse autoencoder (see `backends/autoencoder.py`)."""

    @property
    def n_inputs(self) -> int: ...

    @property
    def n_latents(self) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttachedAutoencoder:
    layer: int
    input: AutoencoderInput
    autoencoder: Autoencoder

    @property
    def input_point(self) -> HookPoint:
        return HookPoint(self.layer, self.input.location)

    @property
    def latents_point(self) -> HookPoint:
        return HookPoint(self.layer, self.input.latents)


class Backend(abc.ABC):
    name: str  # what users see, e.g. "native-gpt2"
    architecture: Architecture
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    locations: frozenset[Location]
    autoencoders: dict[HookPoint, AttachedAutoencoder]  # by latents point

    def attach_autoencoder(
        self, layer: int, input: AutoencoderInput, autoencoder: Autoencoder
    ) -> None:
        """Attaches an autoencoder to a layer; ValueError if its width does not fit."""
        width = self.input_width(input)
        if autoencoder.n_inputs != width:
            raise ValueError(
                f"an autoencoder on {input.value} of layer {layer} must read {width} values, "
                f"this one reads {autoencoder.n_inputs}"
            )
        if not 0 <= layer < self.architecture.n_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.architecture.n_layers})")
        if isinstance(autoencoder, torch.nn.Module):
            # Autoencoders run in float32 on the model's device, whatever the model's dtype.
            autoencoder.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        attached = AttachedAutoencoder(layer, input, autoencoder)
        self.autoencoders = {**self.autoencoders, attached.latents_point: attached}

    def input_width(self, input: AutoencoderInput) -> int:
        if input is AutoencoderInput.MLP_POST_ACT:
            return self.architecture.d_mlp
        return self.architecture.d_model

    @abc.abstractmethod
    def run(self, request: ForwardRequest) -> ForwardResult:
        """Runs the batch forward (and backward when asked); see the module docstring."""

    @abc.abstractmethod
    def weight(self, name: str) -> torch.Tensor:
        """Returns a float32 weight by its TransformerLens name (`WEIGHT_SHAPES`)."""
