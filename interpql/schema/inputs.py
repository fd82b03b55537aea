"""Input types."""

from __future__ import annotations

import strawberry

from interpql.resolvers.attribution_graph import GraphArgs
from interpql.schema.enums import (
    AttentionComponent,
    AttentionTraceType,
    LayerNormScale,
    LossKind,
    MlpComponent,
)


@strawberry.input(description="The loss that gradients and attributions are taken of.")
class LossInput:
    kind: LossKind = strawberry.field(description="Which loss.")
    target_tokens: list[str] = strawberry.field(
        default_factory=list, description="Target tokens as text; each must be one token."
    )
    distractor_tokens: list[str] = strawberry.field(
        default_factory=list, description="Distractor tokens as text; each must be one token."
    )
    target_token_ids: list[int] = strawberry.field(
        default_factory=list, description="Target tokens by id."
    )
    distractor_token_ids: list[int] = strawberry.field(
        default_factory=list, description="Distractor tokens by id."
    )


@strawberry.input(description="Set a node's activation to a value while the model runs.")
class AblationInput:
    node_id: strawberry.ID = strawberry.field(description="The node (same model).")
    value: float = strawberry.field(
        default=0.0,
        description=(
            "The value to set. For an attention head its output vector (z) is set, so 0 "
            "removes what the head writes."
        ),
    )
    token_index: int | None = strawberry.field(
        default=None,
        description="The token to ablate at (negative counts from the end: -1 is the last "
        "token); null ablates at every token.",
    )


@strawberry.input(
    description=(
        "Start the backward pass at an upstream node's activation instead of the loss. An "
        "attention head is traced through its score between tokenIndex and keyTokenIndex (Q, "
        "K or QK), or through its write from keyTokenIndex at tokenIndex (V), projected on the "
        "downstream node's read direction or, without one, on the loss's gradient."
    )
)
class TraceInput:
    upstream_node_id: strawberry.ID = strawberry.field(description="The node to trace from.")
    token_index: int = strawberry.field(
        description="Its token (an attention head's query); -1 is the last."
    )
    attention_trace_type: AttentionTraceType | None = strawberry.field(
        default=None, description="Attention heads: Q, K, QK or V."
    )
    key_token_index: int | None = strawberry.field(
        default=None,
        description="Attention heads: the key token (-1 the last), at or before tokenIndex.",
    )
    downstream_node_id: strawberry.ID | None = strawberry.field(
        default=None,
        description="V traces: an MLP neuron or residual channel whose read direction is used.",
    )


@strawberry.input(description="Add a node's write direction to the residual stream.")
class SteeringInput:
    node_id: strawberry.ID = strawberry.field(description="The node (same model).")
    strength: float = strawberry.field(
        description=(
            "How much of the node's unit write direction to add, in residual-stream units "
            "(its norm: compare InferenceResult.residualNorms, the stream's own norm at each "
            "layer and token; a strength of that size rivals everything else in the stream). "
            "An attention head's direction is the one its W_O writes most strongly."
        )
    )
    token_indices: list[int] | None = strawberry.field(
        default=None,
        description="Positions to steer at (negative counts back from the prompt's end: -1 is "
        "its last token); null steers every position, generated ones too.",
    )


@strawberry.input(description="What to run the model on, and what to change while it runs.")
class InferenceInput:
    prompt: str = strawberry.field(description="The text to run; at most the model's nCtx tokens.")
    ablations: list[AblationInput] = strawberry.field(
        default_factory=list, description="Activations to overwrite, applied together."
    )
    steering: list[SteeringInput] = strawberry.field(
        default_factory=list,
        description="Node directions added to the residual stream where each node writes, as "
        "in generate: every field of the result sees them (tokenIndices here index the "
        "prompt; negative counts from its end). residualNorms gives the stream's scale for "
        "choosing a strength.",
    )
    loss: LossInput | None = strawberry.field(
        default=None,
        description="The loss for gradients and attributions; default NEXT_TOKEN.",
    )
    trace: TraceInput | None = strawberry.field(
        default=None,
        description="Trace from an upstream node: gradients and attributions are of it.",
    )
    mlp_component: MlpComponent = strawberry.field(
        default=MlpComponent.NEURON,
        description=(
            "Rank MLP neurons or the openai-format MLP autoencoder's latents in topNodes and "
            "nodeTable (mlpDictionary names any other set)."
        ),
    )
    attention_component: AttentionComponent = strawberry.field(
        default=AttentionComponent.HEAD,
        description=(
            "Rank attention heads (nodeTable: their (query, key) pairs) or attention "
            "autoencoder latents in topNodes and nodeTable."
        ),
    )
    mlp_dictionary: str | None = strawberry.field(
        default=None,
        description=(
            "Rank the latents of this dictionary set instead (topNodes, nodeTable): one that "
            "reads or rebuilds the MLP (mlp.hook_post, hook_mlp_out, or a transcoder), with a "
            "dictionary at every layer (INVALID_ARGUMENT otherwise: a layer without one would "
            "have no MLP nodes); overrides mlpComponent."
        ),
    )
    attention_dictionary: str | None = strawberry.field(
        default=None,
        description=(
            "Rank the latents of this dictionary set instead (topNodes, nodeTable): one on the "
            "attention's output (attn.hook_z, hook_attn_out), with a dictionary at every "
            "layer; overrides attentionComponent."
        ),
    )
    residual_dictionary: str | None = strawberry.field(
        default=None,
        description=(
            "Also rank the latents of this residual-stream dictionary set (hook_resid_pre, "
            "hook_resid_mid, hook_resid_post) in topNodes and nodeTable. They decompose the "
            "stream at their hook, everything written before it, rather than write to it: "
            "tokenSums and the sum of directEffectTerms leave them out."
        ),
    )
    hide_early_layers_when_ablating: bool = strawberry.field(
        default=False,
        description=(
            "Leave layers before the first ablated node, and the embedding, out of topNodes and "
            "nodeTable (Transformer Debugger's UI sends this flag; its server ignores it)."
        ),
    )
    autoencoder_error_term: bool = strawberry.field(
        default=True,
        description=(
            "Where a dictionary's latents are used (saved, ablated, ranked or differentiated), "
            "keep its error term (what the hook held less what the clean latents decode to) so "
            "that untouched latents leave the model exactly as it was; false runs the model on "
            "the reconstruction alone (a transcoder's output in place of the MLP's)."
        ),
    )
    layer_norm_scale: LayerNormScale = strawberry.field(
        default=LayerNormScale.FROZEN,
        description=(
            "How DIRECT_EFFECT, ACT_TIMES_GRAD and traces treat LayerNorm's scale: FROZEN "
            "(default) or LIVE; see LayerNormScale."
        ),
    )


@strawberry.input(description="What to generate from.")
class GenerateInput:
    prompt: str = strawberry.field(description="The text to continue.")
    max_tokens: int = strawberry.field(default=20, description="Tokens to generate, at most.")
    temperature: float = strawberry.field(default=0.0, description="0 samples greedily.")
    top_p: float = strawberry.field(default=1.0, description="Nucleus sampling mass, in (0, 1].")
    seed: int = strawberry.field(default=0, description="Seed of the sampler.")
    ablations: list[AblationInput] = strawberry.field(
        default_factory=list, description="Applied to both continuations."
    )
    steering: list[SteeringInput] = strawberry.field(
        default_factory=list, description="Applied to the steered continuation only."
    )


@strawberry.input(
    description="An attribution graph's prompt and parameters (circuit-tracer's defaults)."
)
class AttributionGraphInput:
    prompt: str = strawberry.field(description="The text.")
    dictionary: str = strawberry.field(
        description="A transcoder set with a transcoder in every layer (Model.dictionaries)."
    )
    max_feature_nodes: int | None = strawberry.field(
        default=None,
        description="At most this many latents, chosen greedily by their estimated influence on "
        "the logits; null: every active latent.",
    )
    max_logits: int = strawberry.field(default=10, description="At most this many logit targets.")
    logit_probability: float = strawberry.field(
        default=0.95,
        description="The most probable next tokens are targets until they hold this much "
        "probability (or maxLogits is reached).",
    )
    node_threshold: float = strawberry.field(
        default=0.8, description="Pruning keeps the nodes holding this share of all influence."
    )
    edge_threshold: float = strawberry.field(
        default=0.98,
        description="Then the edges holding this share of the node-pruned graph's edge influence.",
    )
    prepend_bos: bool = strawberry.field(
        default=True,
        description="Put the beginning-of-sequence token (<|endoftext|> for GPT-2) first, as "
        "circuit-tracer does.",
    )

    def args(self) -> GraphArgs:
        return GraphArgs(
            prompt=self.prompt,
            dictionary=self.dictionary,
            max_feature_nodes=self.max_feature_nodes,
            max_logits=self.max_logits,
            logit_probability=self.logit_probability,
            node_threshold=self.node_threshold,
            edge_threshold=self.edge_threshold,
            prepend_bos=self.prepend_bos,
        )


@strawberry.input(description="Set or scale one transcoder latent at one position.")
class GraphInterventionInput:
    node_id: str = strawberry.field(
        description="The latent as a graph node id, {layer}_{index}_{tokenIndex}; it need not "
        "be active or in the pruned graph."
    )
    value: float | None = strawberry.field(default=None, description="Its new activation.")
    scale: float | None = strawberry.field(
        default=None, description="Or: multiply its activation on the prompt by this."
    )
