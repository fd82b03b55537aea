"""The Backend protocol: the one page a backend author reads.

A backend owns one loaded model and answers batched forward (and backward) passes over it.
Everything that crosses this line is a frozen dataclass or a tensor; no GraphQL type, no node
id and no request of a client ever reaches a backend: loaders turn those into the hook-level
`ForwardRequest` below (through the node-kind table, `node_kinds.py`).

Words: a *token* is an id in the vocabulary, a *position* a token's index in a prompt, a *row* a
prompt's place in the batch, a *point* a `HookPoint` (layer, location).

Writing a backend
-----------------
Subclass `Backend` and set, in `__init__`:

    name           what users see in Model.backend, e.g. "native-gpt2"
    architecture   an `Architecture`: layer count and widths, `n_kv_heads` where heads share
                   keys and values (grouped-query attention), the context window, the vocabulary
    tokenizer      an object with tiktoken's `encode`/`decode`/`decode_single_token_bytes`
                   (`Tokenizer` below; `hf_tokenizer.HFTokenizer` wraps Hugging Face's)
    device, dtype  where the weights live and their dtype (activations come back float32)
    locations      the `Location`s it can save or intervene on; asking for another one must
                   raise `errors.UnavailableError(code="UNSUPPORTED")` saying why
    dictionaries   `{}` (filled by `attach_dictionary`, which checks widths)

and implement two methods:

`forward(request) -> ForwardResult`
    Build one `hooks.HookSession(request, self.dictionaries)` and hand the work to
    `runtime.execute(request, session, self.device, forward_fn)`, which pads the batch on the
    right (a causal model needs no mask then), chooses grad or inference mode, computes the
    losses (`losses.py`), runs the backward pass and collects the results. `forward_fn(tokens
    [row, position], session, track_grad, positions) -> logits` is the only code of your own
    (`session_forward` below): run the model, and pass every activation of every layer through
    `session.process(point, activation)` (skip the call where `session.wants(point)` is
    False), using what it returns downstream. Activations go in token-major, with the shapes
    listed on `Location` (attention patterns [row, query, head, key]: transpose head-major
    ones). The session applies interventions (ablations), additions (steering), splices
    dictionaries in (SAEs at their hook, transcoders from their input to their output
    location), saves what is asked and follows traces.

    Rules the session relies on:
    * the gradient leaf: with `track_grad`, make the residual stream after the embeddings a
      leaf that requires grad (`x = x.detach().requires_grad_(True)`); weights stay frozen
      (`requires_grad_(False)`), so gradients exist for activations alone;
    * hook order: within a layer, call the points in the order `Location` lists them (a QK
      trace reads attn_q before attn_k, a V trace attn_v before attn_probs; resid_mid is
      resid_pre + attn_out, as the MLP reads it);
    * never write an activation in place: autograd may still need the original;
    * return float32 logits [row, position, vocab] for every position when `positions` is
      None, else only at `positions` ([row, k] indices: `runtime.at_positions` picks them from
      the final residual stream, so that only they are unembedded) as [row, k, vocab];
      `runtime.execute` does the rest.

`weight(name) -> Tensor`
    Float32 weights by TransformerLens's names, shaped as `WEIGHT_SHAPES` says. With
    grouped-query attention W_K and W_V have `n_kv_heads` heads: query head h reads key-value
    head h // (n_heads // n_kv_heads). Raise KeyError for a weight the model does not have.

Optionally, `forward_cached(request, cache) -> (ForwardResult, cache)` with
`caches_keys_and_values = True`: the request's tokens continue the positions the (opaque) cache
holds, so that generation runs one new token a step. Build the session with
`HookSession(request, self.dictionaries, position_offset=<positions cached>)`, so that
interventions and additions at absolute positions land where they fall. Without it, generation
reruns the whole sequence each step.

Errors: raise `errors.InvalidInputError` for a request the model cannot take (a token outside
the vocabulary), `errors.UnavailableError(code="UNSUPPORTED")` for a location or trace it does
not offer; `loaders/out_of_memory.py` turns out-of-memory into RESOURCE_EXHAUSTED.

Registering it: add a loader in `loaders/models.py` (`BACKENDS`), the one place that maps a
`--backend` name to a class. tests/toy_backend.py is a worked example: a GPT-2 written from
scratch on this page alone, run through the same GraphQL checks as the real backends.

A backend is called from one worker thread at a time (the model's runner serialises calls),
so it need not be thread-safe, but it must keep no per-request state between calls.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Literal, Protocol

import torch

from interpql.backends.dictionaries.base import Dictionary
from interpql.errors import UnavailableError
from interpql.specs import AttentionTrace, LossSpec


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
    # The MLP's LayerNorm: its normalized input before the gain and bias, and its output (the
    # MLP's input): TransformerLens's ln2.hook_normalized and mlp.hook_in.
    MLP_NORMALIZED = "mlp_normalized"  # [batch, token, d_model]
    MLP_IN = "mlp_in"  # [batch, token, d_model]
    MLP_PRE = "mlp_pre"  # [batch, token, d_mlp]
    MLP_POST = "mlp_post"  # [batch, token, d_mlp]
    MLP_OUT = "mlp_out"  # [batch, token, d_model]: what the MLP adds to the residual
    RESID_POST = "resid_post"  # [batch, token, d_model]
    # A dictionary's latents, [batch, token, n_latents], computed by the session from its
    # input location (the point's `dictionary` names which): no backend reaches it itself.
    LATENTS = "latents"


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
    def kind_name(self) -> str:
        """The node kind of the latents of the openai-format autoencoders reading it."""
        if self is AutoencoderInput.RESID_DELTA_ATTN:
            return "attention_autoencoder_latent"
        return "mlp_autoencoder_latent"


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    location: Location
    dictionary: str = ""  # Location.LATENTS: whose latents

    def __str__(self) -> str:
        own = f"[{self.dictionary}]" if self.dictionary else ""
        return f"{self.layer}.{self.location.value}{own}"


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
    # Heads of keys and values (grouped-query attention); None: one per query head.
    n_kv_heads: int | None = None
    # The epsilon inside the LayerNorms' scale, 1/sqrt(variance + eps).
    norm_eps: float = 1e-5
    # A gated MLP, act(x W_gate) * (x W_in) (Llama, Mistral, Qwen2, Gemma): a neuron reads no
    # one direction of the stream, so it has no input direction (read_direction).
    gated_mlp: bool = False
    # A norm on each sublayer's output before it joins the residual stream (Gemma-2's
    # post-attention and post-feed-forward norms): a node's write direction (W_out, W_O) is
    # not what reaches the stream, so what is read off it (write norms, direct effects,
    # similar nodes, steering directions, output tokens) is refused
    # (ModelEntry.require_writes_reach_stream).
    post_sublayer_norms: bool = False


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Overwrite part of an activation with `value` while the forward pass runs.

    `position` None means every position; `index` indexes the trailing axes of the location's
    shape (a neuron, a head, a head's key position, ...) and () means the whole vector; `row`
    None means every row of the batch.
    """

    point: HookPoint
    value: float
    position: int | None = None
    index: tuple[int, ...] = ()
    row: int | None = None


@dataclass(frozen=True, kw_only=True)
class Addition:
    """Add `vector` to an activation's trailing axis while the forward pass runs (steering).

    `position` None means every position; `row` None means every row of the batch.
    """

    point: HookPoint
    vector: tuple[float, ...]
    position: int | None = None
    row: int | None = None


@dataclass(frozen=True, kw_only=True)
class Trace:
    """Start the backward pass at an upstream activation instead of at the loss.

    Without `attention`: the activation at `point`, `position` and `index`. With Q, K or QK:
    the attention score of head `index[0]` between query `position` and key `key_position`
    (`point` is that layer's ATTN_Q), the other side detached for Q and K. With V: what the head
    writes at query `position` from `key_position`, projected on each row's
    `value_directions[row]` (a d_head vector: W_O[h] applied to the direction of interest), with
    the attention probability detached. The value is summed over the rows of the batch.
    """

    point: HookPoint
    position: int
    index: tuple[int, ...]
    attention: AttentionTrace | None = None
    key_position: int | None = None
    value_directions: tuple[tuple[float, ...], ...] | None = None


class LogitPositions(IntEnum):
    """Where a pass unembeds. The unembedding is a large share of a pass (GPT-2's 50,257 × 768
    per position, about a third of GPT-2-small's multiply-adds), and most fields need one
    position (top predictions, a logit-difference loss) or none (activations)."""

    NONE = 0
    LAST = 1  # each row's last real token
    ALL = 2  # every position: the next-token loss, per-token losses


@dataclass(frozen=True, kw_only=True)
class ForwardRequest:
    tokens: tuple[tuple[int, ...], ...]  # one row of token ids per prompt
    save: frozenset[HookPoint] = frozenset()
    interventions: tuple[Intervention, ...] = ()
    additions: tuple[Addition, ...] = ()
    backward: LossSpec | None = None
    trace: Trace | None = None  # when set, gradients are of the traced value, not the loss
    save_grads: frozenset[HookPoint] = frozenset()
    # LayerNorms whose scale the backward pass holds at its forward value, named by the
    # residual-stream point each reads: resid_pre of layer L is layer L's attention LayerNorm,
    # resid_mid its MLP LayerNorm, resid_post of the last layer the final LayerNorm.
    frozen_norm_inputs: frozenset[HookPoint] = frozenset()
    # Where a dictionary's latents are used (saved, overwritten or differentiated), the model
    # continues from decode(latents) + error, the error being what the dictionary misses of the
    # activation it rebuilds (an SAE its input, a transcoder the MLP's output): with latents
    # untouched that is the original activation. False drops the error term, running the model
    # on the reconstruction alone.
    autoencoder_error_term: bool = True
    # Where logits are wanted; the pass widens it to what its backward loss reads.
    logits: LogitPositions = LogitPositions.ALL


@dataclass
class ForwardResult:
    lengths: list[int]
    # float32 [batch, token, vocab] with ALL (positions >= length are padding), [batch, 1,
    # vocab] with LAST (each row's last real token), [batch, 0, vocab] with NONE.
    logits: torch.Tensor
    next_token_loss: torch.Tensor  # [batch]; nan for one-token prompts, and unless ALL
    activations: dict[HookPoint, torch.Tensor] = field(default_factory=dict)
    gradients: dict[HookPoint, torch.Tensor] = field(default_factory=dict)
    backward_loss: torch.Tensor | None = None  # [batch], when request.backward was set
    elapsed_s: float = 0.0
    memory_before_bytes: int = 0
    memory_after_bytes: int = 0
    # Rows of the whole pass when the backend ran this request together with other callers'
    # (a Ray Serve deployment does); None: the pass was this request's alone.
    pass_rows: int | None = None
    logit_positions: LogitPositions = LogitPositions.ALL

    def last_logits(self, row: int) -> torch.Tensor:
        """[vocab] at the row's last real token (ValueError when the pass unembedded none)."""
        if self.logit_positions is LogitPositions.NONE:
            raise ValueError("this pass computed no logits")
        if self.logit_positions is LogitPositions.LAST:
            return self.logits[row, 0]
        return self.logits[row, self.lengths[row] - 1]


class HookSessionLike(Protocol):
    """What a backend's forward asks of a hook session (hooks.HookSession is the one)."""

    def wants(self, point: HookPoint) -> bool: ...

    def process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor: ...

    def freezes_norm(self, reads: HookPoint) -> bool: ...

    @property
    def frozen_norms(self) -> frozenset[HookPoint]: ...


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
    # kv_head: n_kv_heads of them with grouped-query attention, else one per query head.
    "blocks.{L}.attn.W_K": "[kv_head, d_model, d_head]",
    "blocks.{L}.attn.W_V": "[kv_head, d_model, d_head]",
    "blocks.{L}.attn.W_O": "[head, d_head, d_model]",
    "blocks.{L}.mlp.W_in": "[d_model, d_mlp]",
    "blocks.{L}.mlp.W_out": "[d_mlp, d_model]",
    "blocks.{L}.attn.b_O": "[d_model]",
    "blocks.{L}.mlp.b_out": "[d_model]",
    "blocks.{L}.ln1.w": "[d_model]",
    "blocks.{L}.ln2.w": "[d_model]",
    "ln_final.w": "[d_model]",
    "ln_final.b": "[d_model]",
}


# The locations a dictionary may read or write.
DICTIONARY_LOCATIONS = (
    Location.RESID_PRE,
    Location.ATTN_Z,
    Location.ATTN_OUT,
    Location.RESID_MID,
    Location.MLP_NORMALIZED,
    Location.MLP_IN,
    Location.MLP_POST,
    Location.MLP_OUT,
    Location.RESID_POST,
)


@dataclass(frozen=True)
class AttachedDictionary:
    """A dictionary in one layer: an SAE reads and writes `input`; a transcoder reads `input`
    and writes `output` (the MLP's output, which it replaces)."""

    name: str  # its set's name: the kind of its latents' nodes
    layer: int
    dictionary: Dictionary
    input: Location
    output: Location

    @property
    def input_point(self) -> HookPoint:
        return HookPoint(self.layer, self.input)

    @property
    def output_point(self) -> HookPoint:
        return HookPoint(self.layer, self.output)

    @property
    def latents_point(self) -> HookPoint:
        return HookPoint(self.layer, Location.LATENTS, self.name)

    @property
    def is_transcoder(self) -> bool:
        return self.input is not self.output


class Backend(abc.ABC):
    name: str  # what users see, e.g. "native-gpt2"
    architecture: Architecture
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    locations: frozenset[Location]
    # Why each location it does not offer is missing, where it can say (TransformerLens does).
    unsupported: Mapping[Location, str] = MappingProxyType({})
    dictionaries: dict[HookPoint, AttachedDictionary]  # by latents point

    def attach_dictionary(
        self,
        name: str,
        layer: int,
        dictionary: Dictionary,
        input: Location,
        output: Location | None = None,
    ) -> AttachedDictionary:
        """Attaches a dictionary reading `input` of `layer` (and, for a transcoder, writing
        `output`); ValueError if a location is not one dictionaries use, not offered here,
        its width does not fit, or the set already has one in that layer."""
        output = input if output is None else output
        if not 0 <= layer < self.architecture.n_layers:
            raise ValueError(f"layer {layer} is not in [0, {self.architecture.n_layers})")
        for role, location, width in (
            ("read", input, dictionary.d_in),
            ("write", output, dictionary.d_out),
        ):
            if location not in DICTIONARY_LOCATIONS:
                raise ValueError(f"a dictionary cannot {role} {location.value}")
            if location not in self.locations:
                why = self.unsupported.get(location, "this backend does not offer it")
                raise ValueError(f"a dictionary cannot {role} {location.value} here: {why}")
            expected = self.location_width(location)
            if width != expected:
                raise ValueError(
                    f"a dictionary that {role}s {location.value} of layer {layer} must have "
                    f"{expected} values there, {name!r} has {width}"
                )
        if output is not input and output is not Location.MLP_OUT:
            raise ValueError("a transcoder writes the MLP's output (mlp_out)")
        attached = AttachedDictionary(name, layer, dictionary, input, output)
        if attached.latents_point in self.dictionaries:
            raise ValueError(f"dictionary {name!r} already has one in layer {layer}")
        for other in self.dictionaries.values():
            if other.name == name and other.is_transcoder != attached.is_transcoder:
                raise ValueError(
                    f"dictionary {name!r} mixes SAEs and transcoders: a set is one or the other"
                )
        if isinstance(dictionary, torch.nn.Module):
            # Dictionaries run in float32 on the model's device, whatever the model's dtype.
            dictionary.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.dictionaries = {**self.dictionaries, attached.latents_point: attached}
        return attached

    def attach_autoencoder(
        self, layer: int, input: AutoencoderInput, autoencoder: Dictionary
    ) -> AttachedDictionary:
        """An openai-format autoencoder: a dictionary named for the kind of its latents."""
        return self.attach_dictionary(input.kind_name, layer, autoencoder, input.location)

    def location_width(self, location: Location) -> int:
        arch = self.architecture
        if location is Location.MLP_POST:
            return arch.d_mlp
        if location is Location.ATTN_Z:
            return arch.n_heads * arch.d_head
        return arch.d_model

    @abc.abstractmethod
    def forward(self, request: ForwardRequest) -> ForwardResult:
        """Runs the batch forward (and backward when asked); see the module docstring."""

    def session_forward(
        self,
        tokens: torch.Tensor,
        session: HookSessionLike,
        track_grad: bool,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's own forward over [row, position] ids with `session` at every hook:
        logits [row, position, vocab] (at `positions` only, [row, k, vocab], when given),
        autograd left to the caller. Analyses that need their
        own session (attribution graphs' linearised pass) run through it; a backend that cannot
        hand it out answers UNSUPPORTED."""
        raise UnavailableError(
            f"the {self.name} backend cannot run an analysis's own pass", code="UNSUPPORTED"
        )

    # Whether `forward_cached` runs here (else generation reruns the whole sequence a step).
    caches_keys_and_values: bool = False

    def forward_cached(
        self, request: ForwardRequest, cache: object | None
    ) -> tuple[ForwardResult, object]:
        """`request.tokens` as the continuation of the positions `cache` holds (None: from the
        first position), every row as long as the others, and the cache holding them too.
        Interventions and additions name absolute positions. Forward only (no backward,
        trace or saves); logits as `request.logits` asks, for these positions."""
        raise UnavailableError(
            f"the {self.name} backend keeps no key-value cache", code="UNSUPPORTED"
        )

    @abc.abstractmethod
    def weight(self, name: str) -> torch.Tensor:
        """Returns a float32 weight by its TransformerLens name (`WEIGHT_SHAPES`)."""
