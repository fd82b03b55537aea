"""The API's enums. The schema owns them: each member's value is the string the layers below
use for the same thing (a kind's name, a loss's, a group's), and they are mapped by it at the
resolver boundary, so renaming something below never changes the SDL unnoticed."""

from __future__ import annotations

from enum import Enum

import strawberry

from interpql.errors import invalid_argument


@strawberry.enum(description="What a node is: a unit of analysis inside a layer.")
class NodeKind(Enum):
    MLP_NEURON = "mlp_neuron"
    ATTENTION_HEAD = "attention_head"
    MLP_AUTOENCODER_LATENT = strawberry.enum_value(
        "mlp_autoencoder_latent",
        description="A latent of the openai-format MLP autoencoders (--mlp-autoencoder): the "
        "dictionary set named mlp_autoencoder_latent.",
    )
    ATTENTION_AUTOENCODER_LATENT = strawberry.enum_value(
        "attention_autoencoder_latent",
        description="A latent of the openai-format attention autoencoders "
        "(--attn-autoencoder): the dictionary set named attention_autoencoder_latent.",
    )
    RESIDUAL_CHANNEL = "residual_channel"
    TOKEN_EMBEDDING = strawberry.enum_value(
        "token_embedding",
        description="What the token and position embeddings write at a position: one node, in "
        "layer 0 (Transformer Debugger's embedding nodes).",
    )
    DICTIONARY_LATENT = strawberry.enum_value(
        "dictionary_latent",
        description="A latent of a named dictionary set (an SAE or a transcoder, SAELens or "
        "circuit-tracer format): the node's `dictionary` names the set, which is also the kind "
        "part of its id (<model>/<dictionary>/<layer>/<index>). Arguments that take a kind "
        "take the set's name in `dictionary` with this kind. Its value at a token is the "
        "latent's activation as SAELens defines it: the hook's activation normalised as the "
        "config says, less b_dec where apply_b_dec_to_input, times W_enc plus b_enc, through "
        "the architecture's activation (ReLU, JumpReLU, TopK, gated). Its write direction is "
        "its decoder row (times the normalisation's scale at the token), through W_out after "
        "mlp.hook_post and W_O after attn.hook_z.",
    )


@strawberry.enum(
    description=(
        "What a backward pass differentiates. NEXT_TOKEN: mean cross-entropy of the prompt's "
        "next tokens; LOGIT_DIFF: at the last token, mean target logit minus mean distractor "
        "logit; LOGIT_MINUS_MEAN: mean target logit minus the mean of all logits; PROBS: summed "
        "probability of the targets; ZERO: a constant 0."
    )
)
class LossKind(Enum):
    NEXT_TOKEN = "next_token"
    LOGIT_DIFF = "logit_diff"
    LOGIT_MINUS_MEAN = "logit_minus_mean"
    PROBS = "probs"
    ZERO = "zero"


@strawberry.enum(description="Which path of an attention head a trace's gradient flows through.")
class AttentionTraceType(Enum):
    Q = "q"
    K = "k"
    QK = "qk"
    V = "v"


@strawberry.enum(description="The unit of analysis in MLP layers.")
class MlpComponent(Enum):
    NEURON = "neuron"
    AUTOENCODER_LATENT = "autoencoder_latent"


@strawberry.enum(description="The unit of analysis in attention layers.")
class AttentionComponent(Enum):
    HEAD = "head"
    AUTOENCODER_LATENT = "autoencoder_latent"


@strawberry.enum(
    description=(
        "Transformer Debugger's groups of values, per node and token (topNodes; nodeTable has "
        "them per element)."
    )
)
class Group(Enum):
    ACTIVATION = strawberry.enum_value(
        "activation",
        description=(
            "The node's activation: an MLP neuron's post-activation, a latent's value, 1 for "
            "the embedding; an attention head's largest attention probability at the token "
            "(its strongest pair: summed over keys it would be 1), where the table ranks each "
            "(query, key) probability."
        ),
    )
    WRITE_NORM = strawberry.enum_value(
        "write_norm",
        description=(
            "The norm of what the node writes to the residual stream at the token, biases "
            "aside (never negative here; the table signs a neuron's by its activation, and "
            "splits a head's write by key)."
        ),
    )
    DIRECT_EFFECT = strawberry.enum_value(
        "direct_effect",
        description=(
            "That write projected on the loss's gradient at the final residual stream (at the "
            "traced node's input with a trace), under the input's layerNormScale; the same in "
            "the table, per (query, key) pair for heads. Signed as the loss's gradient: with "
            "the default NEXT_TOKEN loss (a cross-entropy), a positive value raises the loss "
            "(the write hurts the prediction), so `top` lists the writes that hurt most and "
            "`bottom` those that help most; with LOGIT_DIFF, positive favours the targets."
        ),
    )
    ACT_TIMES_GRAD = strawberry.enum_value(
        "act_times_grad",
        description=(
            "Activation times the loss's gradient with respect to it, a first-order estimate of "
            "the node's total effect (a head's: z . dL/dz, the sum of its pairs' p x dL/dp; "
            "the embedding's: its write . dL/dwrite). Signed as the loss's gradient: with the "
            "default NEXT_TOKEN loss, a positive value means the node raises the loss to first "
            "order (removing it would lower the loss by about that much), so `top` lists the "
            "nodes that hurt the prediction most and `bottom` those that help most; with "
            "LOGIT_DIFF, positive favours the targets."
        ),
    )


@strawberry.enum(description="Where a job is.")
class JobStatus(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@strawberry.enum(description="How to order a layer's nodes.")
class NodeOrder(Enum):
    INDEX = "index"
    MAX_ACTIVATION = "max_activation"
    EXPLANATION_SCORE = "explanation_score"


@strawberry.enum(
    description=(
        "How gradients treat LayerNorm's scale (its 1/sqrt(variance + eps)). FROZEN (the "
        "default; Transformer Debugger's convention and standard direct logit attribution): "
        "held at its forward value, in the final LayerNorm, and with a trace in the LayerNorm "
        "the traced node reads through, so that the gradient at the final residual stream is "
        "linear in what writes to it and the direct effects of every writer plus the bias "
        "terms add up to the loss. LIVE: differentiated through, as autograd does by default "
        "(LayerNorm is scale-invariant: direct effects then add up to about 0)."
    )
)
class LayerNormScale(Enum):
    FROZEN = "frozen"
    LIVE = "live"


# Kinds whose nodes are latents of a dictionary set (the openai-format sets are named for theirs).
_DICTIONARY_KINDS = frozenset(
    {
        NodeKind.DICTIONARY_LATENT,
        NodeKind.MLP_AUTOENCODER_LATENT,
        NodeKind.ATTENTION_AUTOENCODER_LATENT,
    }
)


def node_kind(name: str) -> NodeKind:
    """The enum member of a kind name below: a named dictionary set's is DICTIONARY_LATENT."""
    try:
        return NodeKind(name)
    except ValueError:
        return NodeKind.DICTIONARY_LATENT


def dictionary_of(name: str) -> str | None:
    """The dictionary set a kind name's nodes belong to; None for structural kinds."""
    return name if node_kind(name) in _DICTIONARY_KINDS else None


def optional_kind_name(kind: NodeKind | None, dictionary: str | None) -> str | None:
    """kind_name of an optional kind: None for neither; a dictionary alone is refused."""
    if kind is None:
        if dictionary is not None:
            raise invalid_argument("`dictionary` goes with kind: DICTIONARY_LATENT.")
        return None
    return kind_name(kind, dictionary)


def kind_name(kind: NodeKind, dictionary: str | None) -> str:
    """The kind name below of a (kind, dictionary) argument pair."""
    if kind is NodeKind.DICTIONARY_LATENT:
        if not dictionary:
            raise invalid_argument("kind DICTIONARY_LATENT needs `dictionary`: the set's name.")
        return dictionary
    if dictionary is not None and dictionary != kind.value:
        raise invalid_argument(f"`dictionary` goes with kind DICTIONARY_LATENT, not {kind.name}.")
    return str(kind.value)
