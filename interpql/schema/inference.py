"""Inference inputs and results."""

from __future__ import annotations

import numpy as np
import strawberry

from interpql.resolvers import analysis as analysis_resolvers
from interpql.resolvers import inference as inference_resolvers
from interpql.resolvers import node_table as table_resolvers
from interpql.resolvers.models import token_text
from interpql.schema.enums import Group, NodeKind, kind_name
from interpql.schema.node_table import DirectEffectTerm, NodeTable, node_table_of
from interpql.schema.packed import PackedTensor, TensorDType, pack
from interpql.schema.scalars import FloatArray
from interpql.schema.types import (
    Info,
    Node,
    NodeActivations,
    Token,
    node_activations,
    tokens_of,
)
from interpql.specs import InferenceSpec


@strawberry.type(description="A predicted next token.")
class TokenPrediction:
    token: Token = strawberry.field(description="The token (its index is its rank, from 0).")
    logit: float = strawberry.field(description="Its logit.")
    probability: float = strawberry.field(description="Its softmax probability.")


@strawberry.type(description="A node with its value in a ranking.")
class ScoredNode:
    node: Node = strawberry.field(description="The node.")
    value: float = strawberry.field(description="Its value of the ranked group.")


@strawberry.type(description="Nodes ranked by one group of values.")
class NodeRanking:
    group: Group = strawberry.field(description="What the nodes are ranked by.")
    top: list[ScoredNode] = strawberry.field(description="The k highest, highest first.")
    bottom: list[ScoredNode] = strawberry.field(description="The k lowest, lowest first.")
    token_sums: list[float] = strawberry.field(
        description="Per token, the group's value summed over all ranked nodes (token display)."
    )


@strawberry.type(description="Activations of every node of one kind in one layer.")
class LayerActivations:
    layer: int = strawberry.field(description="Layer index.")
    kind: NodeKind = strawberry.field(description="Node kind.")
    shape: list[int] = strawberry.field(description="[tokens, nodes].")
    values: FloatArray = strawberry.field(
        description="values[token][node], as in NodeActivations.values."
    )

    @strawberry.field(
        description=(
            "The same values packed: little-endian float32 (or float16) bytes in base64, "
            "row-major in `shape`. Much smaller and faster than the list for large layers."
        )
    )
    def packed(self, dtype: TensorDType = TensorDType.FLOAT32) -> PackedTensor:
        return pack(np.asarray(self.values), dtype)


@strawberry.type(description="The result of running a model on a prompt.")
class InferenceResult:
    spec: strawberry.Private[InferenceSpec]

    @strawberry.field(name="prompt", description="The prompt as given.")
    def prompt_text(self) -> str:
        return self.spec.prompt

    @strawberry.field(description="The prompt's tokens.")
    def tokens(self, info: Info) -> list[Token]:
        return tokens_of(info.context, self.spec.model, self.spec.tokens)

    @strawberry.field(
        description="Mean cross-entropy of each next token of the prompt (null for one token)."
    )
    async def loss(self, info: Info) -> float | None:
        return await inference_resolvers.next_token_loss(info.context, self.spec)

    @strawberry.field(
        description=(
            "Each position's next-token loss, -ln p(the next token | the tokens so far), in "
            "nats; null at the last position (no next token). Their mean is loss."
        )
    )
    async def token_losses(self, info: Info) -> list[float | None]:
        return await inference_resolvers.token_losses(info.context, self.spec)

    @strawberry.field(
        description="The value of the input's loss (default NEXT_TOKEN, then equal to loss)."
    )
    async def objective(self, info: Info) -> float:
        return await inference_resolvers.objective(info.context, self.spec)

    @strawberry.field(
        description=(
            "Nodes ranked by a group of values, at one token or summed over tokens; the nodes "
            "are those of the input's mlpComponent and attentionComponent, in every layer. "
            "DIRECT_EFFECT and ACT_TIMES_GRAD add one backward pass of the input's loss."
        )
    )
    async def top_nodes(
        self, info: Info, group: Group, k: int = 10, token_index: int | None = None
    ) -> NodeRanking:
        ranking = await analysis_resolvers.top_nodes(
            info.context, self.spec, analysis_resolvers.Group[group.name], k, token_index
        )

        def scored(items: list[analysis_resolvers.RankedNode]) -> list[ScoredNode]:
            return [ScoredNode(node=Node(ref=s.node), value=s.value) for s in items]

        return NodeRanking(
            group=group,
            top=scored(ranking.top),
            bottom=scored(ranking.bottom),
            token_sums=ranking.token_sums,
        )

    @strawberry.field(
        description=(
            "Transformer Debugger's node table of this input (see NodeTable): k highest and "
            "lowest elements per group and kind, `scoredTokens` tokens per list of each row's "
            "scored tokens; `excludeRareTokens` leaves out of those lists the 596 least common "
            "GPT-2 tokens Transformer Debugger leaves out (GPT-2-vocabulary models). Adds one "
            "backward pass of the input's loss."
        )
    )
    async def node_table(
        self, info: Info, k: int = 10, scored_tokens: int = 10, exclude_rare_tokens: bool = True
    ) -> NodeTable:
        view = await table_resolvers.node_table(
            info.context, self.spec, k, scored_tokens, exclude_rare_tokens
        )
        return node_table_of(view)

    @strawberry.field(
        description=(
            "The direct effects, at one token or summed over tokens, of what writes to the "
            "residual stream besides the input's ranked kinds, in every layer: output biases, "
            "a dictionary's bias and error, and the final LayerNorm's bias. With layerNormScale "
            "FROZEN and a loss linear in the logits (LOGIT_DIFF, LOGIT_MINUS_MEAN), these plus "
            "every node's DIRECT_EFFECT (the embedding, heads, neurons or latents) add up to the "
            "objective."
        )
    )
    async def direct_effect_terms(
        self, info: Info, token_index: int | None = None
    ) -> list[DirectEffectTerm]:
        terms = await table_resolvers.direct_effect_terms(info.context, self.spec, token_index)
        return [DirectEffectTerm(name=t.name, layer_index=t.layer, value=t.value) for t in terms]

    @strawberry.field(description="The k least likely tokens after the prompt, least first.")
    async def bottom_predictions(self, info: Info, k: int = 10) -> list[TokenPrediction]:
        return await self._predictions(info, k, bottom=True)

    @strawberry.field(description="The k most likely tokens after the prompt.")
    async def top_predictions(self, info: Info, k: int = 10) -> list[TokenPrediction]:
        return await self._predictions(info, k, bottom=False)

    async def _predictions(self, info: Info, k: int, bottom: bool) -> list[TokenPrediction]:
        ctx, model = info.context, self.spec.model
        predictions = await inference_resolvers.top_predictions(ctx, self.spec, k, bottom)
        return [
            TokenPrediction(
                token=Token(index=rank, id=p.token, text=token_text(ctx, model, p.token)),
                logit=p.logit,
                probability=p.probability,
            )
            for rank, p in enumerate(predictions)
        ]

    @strawberry.field(
        description=(
            "Wall time of the forward pass that served this result, in ms (0 when it came "
            "from the cache of an earlier identical input: no pass ran for it)."
        )
    )
    async def inference_time_ms(self, info: Info) -> float:
        return (await inference_resolvers.pass_figures(info.context, self.spec)).elapsed_ms

    @strawberry.field(
        description="Prompts run together in that forward pass (0 when it came from the cache)."
    )
    async def batch_size(self, info: Info) -> int:
        return (await inference_resolvers.pass_figures(info.context, self.spec)).batch_size

    @strawberry.field(
        description=(
            "Whether an earlier request's identical input answered it (the server keeps "
            "--cached-runs results): no forward pass ran for it in this request."
        )
    )
    async def from_cache(self, info: Info) -> bool:
        return (await inference_resolvers.pass_figures(info.context, self.spec)).from_cache

    @strawberry.field(
        description=(
            "Memory in use before the pass, in bytes (CUDA allocated, or process RSS; 0 when "
            "it came from the cache)."
        )
    )
    async def memory_before_bytes(self, info: Info) -> float:
        figures = await inference_resolvers.pass_figures(info.context, self.spec)
        return float(figures.memory_before_bytes)

    @strawberry.field(description="Memory in use after the pass, in bytes.")
    async def memory_after_bytes(self, info: Info) -> float:
        figures = await inference_resolvers.pass_figures(info.context, self.spec)
        return float(figures.memory_after_bytes)

    @strawberry.field(description="Activations of the given nodes (ids) on every token.")
    async def activations(self, info: Info, node_ids: list[strawberry.ID]) -> list[NodeActivations]:
        values = await inference_resolvers.activations_of_ids(
            info.context, self.spec, [str(i) for i in node_ids]
        )
        return [node_activations(info.context, v) for v in values]

    @strawberry.field(
        description="Activations of every node of one kind in one layer (a dictionary's "
        "latents: kind DICTIONARY_LATENT and the set's name in `dictionary`)."
    )
    async def layer_activations(
        self, info: Info, layer: int, kind: NodeKind, dictionary: str | None = None
    ) -> LayerActivations:
        name = kind_name(kind, dictionary)
        values = await inference_resolvers.layer_values(info.context, self.spec, layer, name)
        return LayerActivations(
            layer=layer, kind=kind, shape=list(values.shape), values=FloatArray(values)
        )
