"""What a request asks for, once checked: the frozen specs that every layer below the schema
reads, and the identity of a node.

The schema maps each GraphQL input to one of these once, at the resolver boundary (after the
resolvers have checked it against the model); the spec then travels down unchanged, and only
where the model runs (loaders/inference.py, loaders/generation.py) are its node-level parts
turned into hook-level interventions, through the node-kind table (backends/node_kinds.py).

Words used throughout, with one meaning each:

    prompt     the text a request runs (never a dataclass, never a row index)
    token      a token id in the model's vocabulary
    position   a token's place in the prompt, from 0 (GraphQL calls it tokenIndex)
    row        a prompt's place in one batched pass
    pass       one forward (and maybe backward) computation of the model over a batch of rows
    kind       the second part of a node id: a structural kind (mlp_neuron, attention_head,
               residual_channel) or the name of an attached dictionary of latents
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from interpql.errors import invalid_node


@dataclass(frozen=True, order=True)
class NodeRef:
    """A node: `<model>/<kind>/<layer>/<index>`. Whether it exists is the model's question."""

    model: str
    kind: str
    layer: int
    index: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.kind}/{self.layer}/{self.index}"


MAX_ID_LENGTH = 512


def parse_node_id(node_id: str) -> NodeRef:
    """The parts of an id (its syntax only; `kind` is checked against the model's table)."""
    if len(node_id) > MAX_ID_LENGTH:
        raise invalid_node(node_id[:64] + "...", f"ids are at most {MAX_ID_LENGTH} characters")
    parts = node_id.rsplit("/", 3)
    if len(parts) != 4 or not parts[0] or not parts[1]:
        raise invalid_node(node_id, "expected <model>/<kind>/<layer>/<index>")
    model, kind, layer_text, index_text = parts
    if not (layer_text.isascii() and layer_text.isdigit()) or len(layer_text) > 6:
        raise invalid_node(node_id, f"layer {layer_text!r} is not a non-negative integer")
    if not (index_text.isascii() and index_text.isdigit()) or len(index_text) > 12:
        raise invalid_node(node_id, f"index {index_text!r} is not a non-negative integer")
    return NodeRef(model=model, kind=kind, layer=int(layer_text), index=int(index_text))


class LossKind(StrEnum):
    NEXT_TOKEN = "next_token"  # mean cross-entropy of each next token of the prompt
    LOGIT_DIFF = "logit_diff"  # last position: mean target logits - mean distractor logits
    LOGIT_MINUS_MEAN = "logit_minus_mean"  # last position: mean target logits - mean logit
    PROBS = "probs"  # last position: summed probability of the targets
    ZERO = "zero"  # a constant 0: gradients are all zero, useful as a baseline


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """The objective a backward pass differentiates (tokens are ids)."""

    kind: LossKind = LossKind.NEXT_TOKEN
    targets: tuple[int, ...] = ()
    distractors: tuple[int, ...] = ()


class AttentionTrace(StrEnum):
    """Which path of an attention score or write a trace's gradient may flow through."""

    Q = "q"
    K = "k"
    QK = "qk"
    V = "v"


class LayerNormScale(StrEnum):
    """How gradients treat LayerNorm's scale (its 1/sqrt(var + eps)). FROZEN holds it at its
    forward value, so that the gradient at the final residual stream is linear in the writes
    and direct effects add up to the logit difference (Transformer Debugger's convention and
    standard direct logit attribution): the final LayerNorm's, and with a trace the one the
    traced node reads through. LIVE differentiates through every scale."""

    FROZEN = "frozen"
    LIVE = "live"


@dataclass(frozen=True, kw_only=True)
class Ablation:
    """Set a node's activation to `value` at one position (None: every position). An
    attention head's activation is its output vector (z): 0 removes what it writes."""

    node: NodeRef
    value: float
    position: int | None = None


@dataclass(frozen=True, kw_only=True)
class Steering:
    """Add `strength` x the node's unit write direction at `positions` (None: every position,
    generated ones included)."""

    node: NodeRef
    strength: float
    positions: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class TraceSpec:
    """Start the backward pass at an upstream node instead of at the loss. Attention heads are
    traced through Q, K or QK (their score between `position` and `key_position`) or V (their
    write from `key_position` at `position`, projected on the downstream node's read direction,
    or on the loss's gradient without one)."""

    upstream: NodeRef
    position: int
    attention: AttentionTrace | None = None
    key_position: int | None = None
    downstream: NodeRef | None = None


@dataclass(frozen=True, kw_only=True)
class InferenceSpec:
    """One `infer` input (or one of `inferBatch`'s), checked against its model."""

    model: str
    prompt: str
    tokens: tuple[int, ...]
    ablations: tuple[Ablation, ...] = ()
    steering: tuple[Steering, ...] = ()
    loss: LossSpec = field(default_factory=LossSpec)
    trace: TraceSpec | None = None
    # Where dictionary latents are used, keep each dictionary's error term, so that untouched
    # latents leave the model exactly as it was; False runs on the reconstructions alone.
    keep_error_term: bool = True
    layer_norm_scale: LayerNormScale = LayerNormScale.FROZEN
    # The kinds ranked on the attention and MLP side (topNodes): a structural kind or a
    # dictionary's name.
    attention_kind: str = "attention_head"
    mlp_kind: str = "mlp_neuron"
    residual_kinds: tuple[str, ...] = ()  # residual-stream dictionaries ranked as well
    hide_early_layers_when_ablating: bool = False

    def pass_key(self) -> tuple[Any, ...]:
        """What decides the numbers a pass computes for this input: equal keys share a pass
        (within a request) and a cached result (across requests)."""
        return (
            self.model,
            self.tokens,
            self.ablations,
            self.steering,
            self.loss,
            self.trace,
            self.keep_error_term,
            self.spliced_kinds,
            self.layer_norm_scale,  # what the backward pass holds fixed
        )

    @property
    def spliced_kinds(self) -> tuple[Any, ...]:
        """Without error terms, every dictionary whose latents a pass uses changes its numbers
        (and every row's of the pass): the ranked kinds are part of what decides them."""
        if self.keep_error_term:
            return ()
        return (self.attention_kind, self.mlp_kind, self.residual_kinds)


@dataclass(frozen=True, kw_only=True)
class GenerationSpec:
    model: str
    prompt: str
    tokens: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ablations: tuple[Ablation, ...] = ()
    steering: tuple[Steering, ...] = ()


@dataclass(frozen=True, kw_only=True)
class GraphSpec:
    """An attribution graph's request (loaders/attribution_graph.py)."""

    model: str
    dictionary: str  # a transcoder set covering every layer
    prompt: str
    tokens: tuple[int, ...]  # with the beginning-of-sequence token when it was prepended
    max_feature_nodes: int | None = None  # None: every active latent
    max_logits: int = 10
    logit_probability: float = 0.95
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    # A fingerprint of the weights it runs on (the model's and the transcoders': see
    # attribution_graph.weights_fingerprint): the same request on other weights under the same
    # names is another graph, with another id.
    weights: str = ""


@dataclass(frozen=True, kw_only=True)
class FeatureIntervention:
    """Set (`value`) or multiply (`scale`) a transcoder latent at one position."""

    layer: int
    position: int
    index: int
    value: float | None = None
    scale: float | None = None
