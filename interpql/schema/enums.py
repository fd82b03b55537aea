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
        "What to rank nodes by, per token. ACTIVATION: the node's activation (an attention "
        "head's: the norm of its write); WRITE_NORM: the norm of what it writes to the residual "
        "stream; DIRECT_EFFECT: that write projected on the loss's gradient at the final "
        "residual stream; ACT_TIMES_GRAD: activation times the loss's gradient, a first-order "
        "estimate of the node's total effect."
    )
)
class Group(Enum):
    ACTIVATION = "activation"
    WRITE_NORM = "write_norm"
    DIRECT_EFFECT = "direct_effect"
    ACT_TIMES_GRAD = "act_times_grad"


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
