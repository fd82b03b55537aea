"""The API's enums. The schema owns them: each member's value is the string the layers below
use for the same thing (a kind's name, a loss's, a group's), and they are mapped by it at the
resolver boundary, so renaming something below never changes the SDL unnoticed."""

from __future__ import annotations

from enum import Enum

import strawberry


@strawberry.enum(description="What a node is: a unit of analysis inside a layer.")
class NodeKind(Enum):
    MLP_NEURON = "mlp_neuron"
    ATTENTION_HEAD = "attention_head"
    MLP_AUTOENCODER_LATENT = "mlp_autoencoder_latent"
    ATTENTION_AUTOENCODER_LATENT = "attention_autoencoder_latent"
    RESIDUAL_CHANNEL = "residual_channel"
    TOKEN_EMBEDDING = strawberry.enum_value(
        "token_embedding",
        description="What the token and position embeddings write at a position: one node, in "
        "layer 0 (Transformer Debugger's embedding nodes).",
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
            "the table, per (query, key) pair for heads."
        ),
    )
    ACT_TIMES_GRAD = strawberry.enum_value(
        "act_times_grad",
        description=(
            "Activation times the loss's gradient with respect to it, a first-order estimate of "
            "the node's total effect (a head's: z . dL/dz, the sum of its pairs' p x dL/dp; "
            "the embedding's: its write . dL/dwrite)."
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
