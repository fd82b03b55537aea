"""Inference inputs and results."""

from __future__ import annotations

import math

import numpy as np
import strawberry

from interpql.resolvers import analysis as analysis_resolvers
from interpql.resolvers import inference as inference_resolvers
from interpql.resolvers import node_table as table_resolvers
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


@strawberry.type(description="A token's probability as the next token at one position.")
class TokenProbability:
    token: Token = strawberry.field(
        description="The token (its index is its place in the list asked for)."
    )
    logit: float = strawberry.field(description="Its logit.")
    probability: float = strawberry.field(description="Its softmax probability.")
    log_probability: float = strawberry.field(
        description="ln of its probability (log-softmax of the logits), exact where the "
        "probability underflows to 0."
    )
    rank: int = strawberry.field(
        description="How many tokens have a higher logit: 0 for the most likely. Counts every "
        "token of the vocabulary, those not in use (Token.inUse false) too."
    )


@strawberry.type(description="The residual stream's norm at one point, on each token.")
class ResidualNorm:
    layer: int = strawberry.field(description="Layer index.")
    hook_name: str = strawberry.field(
        description="The point, by TransformerLens's name: blocks.L.hook_resid_mid (after the "
        "layer's attention) or blocks.L.hook_resid_post (after its MLP)."
    )
    token_norms: list[float] = strawberry.field(
        description="The stream's L2 norm at each token, in this input's pass (its ablations "
        "and steering included)."
    )
    median: float = strawberry.field(description="The median of tokenNorms.")


@strawberry.type(description="A node with its value in a ranking.")
class ScoredNode:
    node: Node = strawberry.field(
        description="The node. Its own fields that take a prompt (activations, "
        "traceActivations) run that prompt again, clean: without this input's ablations."
    )
    value: float = strawberry.field(
        description="Its value of the ranked group (at tokenIndex, or summed over tokens)."
    )
    token_values: list[float] = strawberry.field(
        description="Its value of the ranked group at each token, from the same pass as value "
        "(with the input's ablations, when it has some)."
    )


@strawberry.type(description="Nodes ranked by one group of values.")
class NodeRanking:
    group: Group = strawberry.field(description="What the nodes are ranked by.")
    top: list[ScoredNode] = strawberry.field(description="The k highest, highest first.")
    bottom: list[ScoredNode] = strawberry.field(description="The k lowest, lowest first.")
    token_sums: list[float] = strawberry.field(
        description="Per token, the group's value summed over the ranked nodes that write to "
        "the stream (token display): a residualDictionary's latents, a decomposition of the "
        "stream at their hook, are ranked but not summed (see directEffectTerms)."
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
        description=(
            "The value of the input's loss (default NEXT_TOKEN, then equal to loss); null "
            "where that loss reads no position (NEXT_TOKEN on a one-token prompt). With a "
            "trace, gradients are the traced node's value's, but this stays the loss."
        )
    )
    async def objective(self, info: Info) -> float | None:
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
            return [
                ScoredNode(node=Node(ref=s.node), value=s.value, token_values=s.token_values)
                for s in items
            ]

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
            "GPT-2 tokens Transformer Debugger leaves out (GPT-2-vocabulary models); tokens the "
            "model never learned (Token.inUse false) are always left out. Adds one backward "
            "pass of the input's loss."
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
            "objective. A residualDictionary's terms (`residual` true) and latents are left out "
            "of that sum: they decompose the stream at their hook rather than write to it, and "
            "add up, per hook, to the direct effect of everything written before it."
        )
    )
    async def direct_effect_terms(
        self, info: Info, token_index: int | None = None
    ) -> list[DirectEffectTerm]:
        terms = await table_resolvers.direct_effect_terms(info.context, self.spec, token_index)
        return [
            DirectEffectTerm(name=t.name, layer_index=t.layer, value=t.value, residual=t.residual)
            for t in terms
        ]

    @strawberry.field(
        description="The k least likely next tokens at tokenIndex (default -1: after the "
        "whole prompt; negative counts from the end), least first, among the tokens the model "
        "learned: those it never did (Token.inUse false: a zero input embedding, as the demo's "
        "vocabulary outside its corpus) are left out."
    )
    async def bottom_predictions(
        self, info: Info, k: int = 10, token_index: int = -1
    ) -> list[TokenPrediction]:
        return await self._predictions(info, k, True, token_index)

    @strawberry.field(
        description="The k most likely next tokens at tokenIndex (default -1: after the whole "
        "prompt; negative counts from the end), most first."
    )
    async def top_predictions(
        self, info: Info, k: int = 10, token_index: int = -1
    ) -> list[TokenPrediction]:
        return await self._predictions(info, k, False, token_index)

    async def _predictions(
        self, info: Info, k: int, bottom: bool, token_index: int
    ) -> list[TokenPrediction]:
        ctx, model = info.context, self.spec.model
        predictions = await inference_resolvers.top_predictions(
            ctx, self.spec, k, bottom, token_index
        )
        return [
            TokenPrediction(
                token=Token.at(ctx, model, rank, p.token),
                logit=p.logit,
                probability=p.probability,
            )
            for rank, p in enumerate(predictions)
        ]

    @strawberry.field(
        description=(
            "The model's prediction of the given tokens as the next token at tokenIndex "
            "(default -1: after the whole prompt; negative counts from the end): each one's "
            "logit, probability and rank, however unlikely. Tokens as texts of one token each "
            "(`tokens`) and as ids (`tokenIds`), texts first; at most 1,000 in all."
        )
    )
    async def token_probabilities(
        self,
        info: Info,
        tokens: list[str] | None = None,
        token_ids: list[int] | None = None,
        token_index: int = -1,
    ) -> list[TokenProbability]:
        ctx, model = info.context, self.spec.model
        found = await inference_resolvers.token_probabilities(
            ctx, self.spec, tokens or [], token_ids or [], token_index
        )
        return [
            TokenProbability(
                token=Token.at(ctx, model, i, p.token),
                logit=p.logit,
                probability=math.exp(p.log_probability),
                log_probability=p.log_probability,
                rank=p.rank,
            )
            for i, p in enumerate(found)
        ]

    @strawberry.field(
        description="The residual stream's norm after each layer's attention and MLP, per "
        "token: the scale a steering strength is measured against (a strength near the "
        "median rivals the whole stream there). Shares the input's pass."
    )
    async def residual_norms(self, info: Info) -> list[ResidualNorm]:
        found = await inference_resolvers.residual_norms(info.context, self.spec)
        return [
            ResidualNorm(
                layer=n.layer,
                hook_name=n.hook_name,
                token_norms=n.norms,
                median=float(np.median(n.norms)),
            )
            for n in found
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
