"""Models, layers, nodes and tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import numpy as np
import strawberry
from strawberry.types.nodes import SelectedField

from interpql.errors import check_range, invalid_argument
from interpql.resolvers import analysis as analysis_resolvers
from interpql.resolvers import inference as inference_resolvers
from interpql.resolvers import models as model_resolvers
from interpql.resolvers import neuronpedia as neuronpedia_resolvers
from interpql.resolvers import node_data as node_data_resolvers
from interpql.resolvers import search as search_resolvers
from interpql.resolvers.context import RequestContext
from interpql.resolvers.models import ModelView
from interpql.schema.enums import NodeKind, NodeOrder, dictionary_of, kind_name, node_kind
from interpql.schema.execution import direct
from interpql.schema.inputs import AttributionGraphInput, GenerateInput, InferenceInput
from interpql.schema.node_data import ActivationRecord, Explanation, NodeStatistics
from interpql.schema.packed import PackedTensor, TensorDType, lower_triangle, pack
from interpql.schema.scalars import FloatArray, NeuronpediaFeature
from interpql.specs import NodeRef

if TYPE_CHECKING:
    from interpql.schema.attribution_graph import AttributionGraph
    from interpql.schema.generation import GenerationResult
    from interpql.schema.inference import InferenceResult

Info = strawberry.Info[RequestContext, None]
T = TypeVar("T")


def _key_field(type_name: str, key: str, representation: dict[str, object]) -> str:
    # Entity representations are JSON from any client: the key may be missing or not a string,
    # and other fields may come along.
    value = representation.get(key)
    if not isinstance(value, str):
        raise invalid_argument(f"A {type_name} representation needs its key {key!r}, a string.")
    return value


@strawberry.type(description="A token of a tokenized text.")
class Token:
    index: int = strawberry.field(description="Position in the text, from 0.")
    id: int = strawberry.field(description="The token id in the model's vocabulary.")
    text: str = strawberry.field(
        description="The token's text (bytes that are not valid UTF-8 alone show as U+FFFD)."
    )
    in_use: bool = strawberry.field(
        description="False for a token the model never learned: its input embedding is zero "
        "(the demo's vocabulary outside the tokens its corpus uses). Such a token carries no "
        "information into the model, so a prompt containing it runs on nothing there; "
        "logit-lens and scored-token lists leave such tokens out."
    )

    @classmethod
    def of(cls, info: model_resolvers.TokenInfo) -> Token:
        return cls(index=info.index, id=info.id, text=info.text, in_use=info.in_use)

    @classmethod
    def at(cls, ctx: RequestContext, model: str, index: int, token: int) -> Token:
        """Token `token` of `model` at `index` (a position or a rank)."""
        return cls.of(model_resolvers.token_info(ctx, model, index, token))


@strawberry.type(description="How many nodes of one kind a layer (or a whole model) has.")
class NodeKindCount:
    kind: NodeKind = strawberry.field(description="The node kind.")
    dictionary: str | None = strawberry.field(
        description="For latents: the dictionary set's name (null for structural kinds)."
    )
    count: int = strawberry.field(description="How many.")

    @classmethod
    def of(cls, name: str, count: int) -> NodeKindCount:
        return cls(kind=node_kind(name), dictionary=dictionary_of(name), count=count)


@strawberry.type(
    description="A dictionary (SAE or transcoder) attached to one layer of a model; its "
    "latents are nodes of kind DICTIONARY_LATENT (or the openai-format kinds) named by its set."
)
class DictionaryInfo:
    name: str = strawberry.field(description="The set's name: the kind part of its nodes' ids.")
    layer: int = strawberry.field(description="The layer it reads.")
    hook_in: str = strawberry.field(
        description="Where it reads, in TransformerLens's hook names (blocks.L.hook_resid_post)."
    )
    hook_out: str = strawberry.field(
        description="Where its output goes: hookIn for an SAE, the MLP's output for a "
        "transcoder (which replaces the MLP when its latents are used)."
    )
    transcoder: bool = strawberry.field(description="Whether it is a transcoder.")
    architecture: str = strawberry.field(
        description="SAELens's architecture name (standard, topk, jumprelu, gated, transcoder, "
        "skip_transcoder, ...; openai-relu or openai-topk for openai-format autoencoders)."
    )
    d_in: int = strawberry.field(description="Width of what it reads.")
    d_out: int = strawberry.field(description="Width of what it writes.")
    n_latents: int = strawberry.field(description="Number of latents.")
    source: str = strawberry.field(description="Where its weights were loaded from.")


@strawberry.type(description="A sparse autoencoder attached to one layer of a model.")
class AutoencoderInfo:
    kind: NodeKind = strawberry.field(description="The kind of node its latents are.")
    layer: int = strawberry.field(description="The layer it reads from.")
    input: str = strawberry.field(
        description="What it reads: mlp_post_act, resid_delta_mlp or resid_delta_attn."
    )
    n_latents: int = strawberry.field(description="Number of latents.")
    source: str = strawberry.field(description="Where its weights were loaded from.")


@strawberry.federation.type(
    keys=["name"], description="A transformer language model served by interpql."
)
class Model:
    view: strawberry.Private[ModelView]

    @classmethod
    def resolve_reference(cls, info: Info, **representation: object) -> Model:
        name = _key_field("Model", "name", representation)
        return cls(view=model_resolvers.model(info.context, name))

    @strawberry.field(description="The model's name, unique on this server.")
    def name(self) -> str:
        return self.view.name

    @strawberry.field(description="The backend that runs it, e.g. native-gpt2.")
    def backend(self) -> str:
        return self.view.backend

    @strawberry.field(description="Whether weights are loaded (false with --no-model).")
    def loaded(self) -> bool:
        return self.view.loaded

    @strawberry.field(description="Device the weights live on, e.g. cpu or cuda:0.")
    def device(self) -> str:
        return self.view.device

    @strawberry.field(description="Weight dtype, e.g. float32 or bfloat16.")
    def dtype(self) -> str:
        return self.view.dtype

    @strawberry.field(description="Number of transformer layers.")
    def n_layers(self) -> int:
        return self.view.n_layers

    @strawberry.field(description="Width of the residual stream.")
    def d_model(self) -> int:
        return self.view.d_model

    @strawberry.field(description="Attention heads per layer.")
    def n_heads(self) -> int:
        return self.view.n_heads

    @strawberry.field(
        description="Key-value heads per layer: nHeads, or fewer where grouped-query attention "
        "shares them (query head h reads key-value head h // (nHeads / nKvHeads))."
    )
    def n_kv_heads(self) -> int:
        return self.view.n_kv_heads

    @strawberry.field(description="Width of one attention head.")
    def d_head(self) -> int:
        return self.view.d_head

    @strawberry.field(description="Neurons per MLP layer.")
    def d_mlp(self) -> int:
        return self.view.d_mlp

    @strawberry.field(description="Context window in tokens: the longest prompt accepted.")
    def n_ctx(self) -> int:
        return self.view.n_ctx

    @strawberry.field(description="Vocabulary size.")
    def n_vocab(self) -> int:
        return self.view.n_vocab

    @strawberry.field(description="Node kinds of the model, with their counts over all layers.")
    def node_kinds(self, info: Info) -> list[NodeKindCount]:
        counts = model_resolvers.node_kind_counts(info.context, self.view.name)
        return [NodeKindCount.of(k, n) for k, n in counts]

    @strawberry.field(
        description="Dictionaries (SAEs, transcoders) attached to the model, by set and layer."
    )
    def dictionaries(self, info: Info) -> list[DictionaryInfo]:
        return [
            DictionaryInfo(
                name=d.name,
                layer=d.layer,
                hook_in=d.hook_in,
                hook_out=d.hook_out,
                transcoder=d.transcoder,
                architecture=d.architecture,
                d_in=d.d_in,
                d_out=d.d_out,
                n_latents=d.n_latents,
                source=d.source,
            )
            for d in model_resolvers.dictionaries(info.context, self.view.name)
        ]

    @strawberry.field(
        description="The openai-format sparse autoencoders attached to the model, one per layer.",
        deprecation_reason="Use `dictionaries`, which lists every attached dictionary.",
    )
    def autoencoders(self, info: Info) -> list[AutoencoderInfo]:
        return [
            AutoencoderInfo(
                kind=NodeKind(a.kind),
                layer=a.layer,
                input=a.input,
                n_latents=a.n_latents,
                source=a.source,
            )
            for a in model_resolvers.autoencoders(info.context, self.view.name)
        ]

    @strawberry.field(description="All layers, from the embedding side.")
    def layers(self) -> list[Layer]:
        return [Layer(model_name=self.view.name, index=i) for i in range(self.view.n_layers)]

    @strawberry.field(description="One layer by index (from 0).")
    def layer(self, info: Info, index: int) -> Layer:
        checked = model_resolvers.check_layer(info.context, self.view.name, index)
        return Layer(model_name=self.view.name, index=checked)

    @strawberry.field(
        description="One node by layer, kind and index (a dictionary's latent: kind "
        "DICTIONARY_LATENT and the set's name in `dictionary`)."
    )
    def node(
        self, info: Info, layer: int, kind: NodeKind, index: int, dictionary: str | None = None
    ) -> Node:
        name = kind_name(kind, dictionary)
        return Node(ref=model_resolvers.node(info.context, self.view.name, name, layer, index))

    @strawberry.field(description="Tokenize a text with the model's tokenizer.")
    def tokenize(self, info: Info, text: str) -> list[Token]:
        return [Token.of(t) for t in model_resolvers.tokenize(info.context, self.view.name, text)]

    @strawberry.field(
        description="Tokenize several texts with the model's tokenizer, one list per text, "
        "in order (at most 100 texts)."
    )
    def tokenize_many(self, info: Info, texts: list[str]) -> list[list[Token]]:
        check_range("texts", len(texts), 0, 101)
        return [
            [Token.of(t) for t in model_resolvers.tokenize(info.context, self.view.name, text)]
            for text in texts
        ]

    @strawberry.field(
        description=(
            "Run the model on a prompt. Every field of the result shares one forward pass, "
            "with the input's ablations and steering (a backward pass is added for the fields "
            "that say so). Node fields nested in it that take a prompt of their own (a ranked "
            "node's activations(prompt)) run that prompt clean, in a pass of their own shared "
            "with other clean fields on the same prompt."
        )
    )
    def infer(
        self, info: Info, input: InferenceInput
    ) -> Annotated[InferenceResult, strawberry.lazy("interpql.schema.inference")]:
        # Imported here: inference.py builds on this module's types.
        from interpql.schema.inference import InferenceResult

        spec = inference_resolvers.inference_spec(info.context, self.view.name, input)
        return InferenceResult(spec=spec)

    @strawberry.field(
        description=(
            "Continue a prompt by sampling (greedy at temperature 0), with ablations; with "
            "steering, the steered and the unsteered continuation side by side."
        )
    )
    async def generate(
        self,
        info: Info,
        input: GenerateInput,
    ) -> Annotated[GenerationResult, strawberry.lazy("interpql.schema.generation")]:
        # Imported here: generation.py builds on this module's types.
        from interpql.schema import generation

        return await generation.generate(info, self.view.name, input)

    @strawberry.field(
        description=(
            "The attribution graph of a prompt over a transcoder set (circuit tracing): the "
            "circuit from embeddings through active latents to the next-token logits, each latent "
            "an API node with its explanations and examples. Computed once per prompt and "
            "parameters and kept by id; Subscription.attributionGraph streams its progress."
        )
    )
    async def attribution_graph(
        self, info: Info, input: AttributionGraphInput
    ) -> Annotated[AttributionGraph, strawberry.lazy("interpql.schema.attribution_graph")]:
        # Imported here: attribution_graph.py builds on this module's types.
        from interpql.schema import attribution_graph

        return await attribution_graph.attribution_graph(info, self.view.name, input)

    @strawberry.field(
        description=(
            "Run several inputs (prompts, or one prompt with several ablations) as one batched "
            "pass where their losses agree; one result per input, in order."
        )
    )
    def infer_batch(
        self, info: Info, inputs: list[InferenceInput]
    ) -> list[Annotated[InferenceResult, strawberry.lazy("interpql.schema.inference")]]:
        # Imported here: inference.py builds on this module's types.
        from interpql.schema.inference import InferenceResult

        check_range("number of inputs", len(inputs), 1, info.context.settings.max_batch + 1)
        return [
            InferenceResult(
                spec=inference_resolvers.inference_spec(info.context, self.view.name, i)
            )
            for i in inputs
        ]


@strawberry.type(description="An edge of a node connection.")
class NodeEdge:
    cursor: str = strawberry.field(description="Opaque cursor of this node.")
    node: Node = strawberry.field(description="The node.")


@strawberry.type(description="Where a page of a connection ends.")
class PageInfo:
    has_next_page: bool = strawberry.field(description="Whether more items follow.")
    end_cursor: str | None = strawberry.field(description="Cursor of the last item.")

    @classmethod
    def of(cls, start: int, count: int, total: int) -> PageInfo:
        """A page of `count` items from position `start` of `total` (an empty page, first: 0,
        still says whether items follow)."""
        return cls(
            has_next_page=start + count < total,
            end_cursor=str(start + count - 1) if count else None,
        )


@strawberry.type(description="A page of nodes (Relay cursor connection).")
class NodeConnection:
    edges: list[NodeEdge] = strawberry.field(description="The nodes of this page.")
    page_info: PageInfo = strawberry.field(description="Where this page ends.")
    total_count: int = strawberry.field(description="Nodes in the whole connection.")


@strawberry.type(description="One transformer layer (an attention block and an MLP block).")
class Layer:
    model_name: strawberry.Private[str]
    index: int = strawberry.field(description="Layer index, from 0.")

    @strawberry.field(description="The model this layer belongs to.")
    def model(self, info: Info) -> Model:
        return Model(view=model_resolvers.model(info.context, self.model_name))

    @strawberry.field(description="Node kinds present in this layer, with their counts.")
    def node_kinds(self, info: Info) -> list[NodeKindCount]:
        counts = model_resolvers.node_kind_counts(info.context, self.model_name, self.index)
        return [NodeKindCount.of(k, n) for k, n in counts]

    @strawberry.field(
        description=(
            "The layer's nodes of one kind, a page at a time, by index or by what the model's "
            "sources know of them (highest first; nodes with no known value last)."
        )
    )
    def nodes(
        self,
        info: Info,
        kind: NodeKind,
        first: int = 20,
        after: str | None = None,
        order_by: NodeOrder = NodeOrder.INDEX,
        dictionary: str | None = None,
    ) -> NodeConnection:
        page, total, start = model_resolvers.layer_nodes(
            info.context,
            self.model_name,
            layer=self.index,
            kind=kind_name(kind, dictionary),
            first=first,
            after=after,
            order=order_by.value,
        )
        edges = [NodeEdge(cursor=str(position), node=Node(ref=r)) for position, r in page]
        page_info = PageInfo.of(start, len(page), total)
        return NodeConnection(edges=edges, page_info=page_info, total_count=total)


@strawberry.type(description="A node with a similarity.")
class SimilarNode:
    node: Node = strawberry.field(description="The node.")
    cosine: float = strawberry.field(description="Cosine similarity of the write directions.")


@strawberry.type(description="A token with a score.")
class TokenScore:
    token: Token = strawberry.field(description="The token (its index is its rank).")
    value: float = strawberry.field(description="The score.")


@strawberry.type(
    description="Tokens a node's weights favour, from the weights alone (raw products, no "
    "LayerNorm in between); tokens the model never learned (Token.inUse false) are left out."
)
class ScoredTokens:
    upvoted_output_tokens: list[TokenScore] | None = strawberry.field(
        description="Output tokens whose logits the node's write raises most (d @ W_U, d its "
        "write direction). Null for an attention head: W_O writes a d_head-dimensional "
        "subspace, not one direction (a head's write on a prompt has tokens: NodeTableRow's)."
    )
    downvoted_output_tokens: list[TokenScore] | None = strawberry.field(
        description="Output tokens whose logits the node's write lowers most, lowest first. "
        "Null for an attention head, as upvotedOutputTokens."
    )
    upvoting_input_tokens: list[TokenScore] | None = strawberry.field(
        description=(
            "Input tokens whose embeddings drive it most: an MLP neuron's W_E @ W_in; an "
            "attention head's query, |W_E @ W_Q[h]|. Null for other kinds (a dictionary's "
            "latent reads its hook, not the token embeddings) and for a neuron of a gated MLP "
            "(Llama's, Gemma's: act(x . gate) * (x . up) reads two directions, and no one "
            "direction is its input)."
        )
    )
    upvoting_key_tokens: list[TokenScore] | None = strawberry.field(
        description="Attention heads only (null for other kinds): input tokens whose "
        "embeddings drive its key, |W_E @ W_K[h']|, h' the key-value head it reads (h itself, "
        "or h // (nHeads / nKvHeads) with grouped-query attention)."
    )


@strawberry.type(description="A node's activation on each token of a prompt.")
class NodeActivations:
    node: Node = strawberry.field(description="The node.")
    tokens: list[Token] = strawberry.field(description="The prompt's tokens.")
    attention_pattern: FloatArray | None = strawberry.field(
        description="Attention heads only: probabilities [queryToken][keyToken]."
    )
    per_token: strawberry.Private[np.ndarray]
    pattern: strawberry.Private[np.ndarray | None] = None
    pair_attribution: strawberry.Private[np.ndarray | None] = None
    # Why the per-token values (a head's write norms) mean nothing on this model: raised by
    # the fields that serve them (UNSUPPORTED), while the pattern is served.
    refused: strawberry.Private[Exception | None] = None

    def _served(self) -> np.ndarray:
        if self.refused is not None:
            raise self.refused
        return self.per_token

    @strawberry.field(
        description=(
            "One value per token: MLP neuron post-activation; attention head: norm of the head's "
            "write to the residual stream (UNSUPPORTED where a norm rescales writes before the "
            "stream, Gemma-2's); residual channel: the residual stream after the layer."
        )
    )
    def values(self) -> list[float]:
        found: list[float] = self._served().tolist()
        return found

    @strawberry.field(description="The largest value.")
    def max_value(self) -> float:
        return float(self._served().max())

    @strawberry.field(description="Where the largest value is.")
    def max_token_index(self) -> int:
        return int(self._served().argmax())

    @strawberry.field(
        description=(
            "Attention heads only: how much of the head's write at each query token came from "
            "each key token, probability x norm of the value's write, [queryToken][keyToken]; "
            "null where heads share their values (grouped-query attention)."
        )
    )
    def token_pair_attribution(self) -> FloatArray | None:
        if self.pair_attribution is None:
            return None
        self._served()
        return FloatArray(self.pair_attribution)

    @strawberry.field(
        description=(
            "attentionPattern's lower triangle (key <= query: the rest is 0), packed: row by "
            "row, [n (n + 1) / 2] for n tokens; entry q (q + 1) / 2 + k is (q, k)."
        )
    )
    def packed_attention_pattern(
        self, dtype: TensorDType = TensorDType.FLOAT16
    ) -> PackedTensor | None:
        return None if self.pattern is None else pack(lower_triangle(self.pattern), dtype)

    @strawberry.field(description="tokenPairAttribution's lower triangle, packed the same way.")
    def packed_token_pair_attribution(
        self, dtype: TensorDType = TensorDType.FLOAT16
    ) -> PackedTensor | None:
        found = self.pair_attribution
        if found is None:
            return None
        self._served()
        return pack(lower_triangle(found), dtype)


@strawberry.federation.type(
    keys=["id"],
    description=(
        "A unit of analysis: an MLP neuron, an attention head, an autoencoder latent or a "
        "residual channel. Its id reads <model>/<kind>/<layer>/<index>."
    ),
)
class Node:
    ref: strawberry.Private[NodeRef]

    @classmethod
    def resolve_reference(cls, info: Info, **representation: object) -> Node:
        node_id = _key_field("Node", "id", representation)
        return cls(ref=model_resolvers.node_from_id(info.context, node_id))

    @strawberry.field(description="Readable id: <model>/<kind>/<layer>/<index>.")
    @direct
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.ref.id)

    @strawberry.field(description="The node's kind.")
    @direct
    def kind(self) -> NodeKind:
        return node_kind(self.ref.kind)

    @strawberry.field(
        description="For a dictionary's latent, the dictionary set's name (null otherwise)."
    )
    @direct
    def dictionary(self) -> str | None:
        return dictionary_of(self.ref.kind)

    @strawberry.field(description="Layer index.")
    @direct
    def layer_index(self) -> int:
        return self.ref.layer

    @strawberry.field(description="Index of the node within its layer and kind.")
    @direct
    def index(self) -> int:
        return self.ref.index

    @strawberry.field(description="The model this node belongs to.")
    @direct
    def model(self, info: Info) -> Model:
        return Model(view=model_resolvers.model(info.context, self.ref.model))

    @strawberry.field(description="The layer this node belongs to.")
    @direct
    def layer(self, info: Info) -> Layer:
        return Layer(model_name=self.ref.model, index=self.ref.layer)

    # The node-data fields are plain functions answering the value, or an awaitable of it where
    # this request has not read the node's data yet (resolvers/node_data.py, `Soon`).
    @strawberry.field(description="Dataset examples where this node activates most, highest first.")
    @direct
    def top_activations(self, info: Info, first: int = 10) -> list[ActivationRecord]:
        shown = node_data_resolvers.top_activations(info.context, self.ref, first)
        return _answer(node_data_resolvers.then(shown, ActivationRecord.all_of))

    @strawberry.field(description="Dataset examples drawn at random, for contrast.")
    @direct
    def random_sample(self, info: Info, first: int = 10) -> list[ActivationRecord]:
        shown = node_data_resolvers.random_sample(info.context, self.ref, first)
        return _answer(node_data_resolvers.then(shown, ActivationRecord.all_of))

    @strawberry.field(description="Activation statistics over a dataset; null when unknown.")
    @direct
    def statistics(self, info: Info) -> NodeStatistics | None:
        data = node_data_resolvers.statistics(info.context, self.ref)
        return _answer(
            node_data_resolvers.then(data, lambda d: None if d is None else NodeStatistics(data=d))
        )

    @strawberry.field(
        description=(
            "Nodes of the same kind, in any layer, whose write direction (output weights, "
            "decoder column; heads: W_O) is closest to this node's, by cosine."
        )
    )
    async def similar_nodes(self, info: Info, first: int = 10) -> list[SimilarNode]:
        found = await search_resolvers.similar_nodes(info.context, self.ref, first)
        return [SimilarNode(node=Node(ref=ref), cosine=cosine) for ref, cosine in found]

    @strawberry.field(description="Every known explanation of this node, best score first.")
    @direct
    def explanations(self, info: Info) -> list[Explanation]:
        found = node_data_resolvers.explanations(info.context, self.ref)
        return _answer(node_data_resolvers.then(found, lambda es: [Explanation.of(e) for e in es]))

    @strawberry.field(description="The best-scoring explanation; null when there is none.")
    @direct
    def best_explanation(self, info: Info) -> Explanation | None:
        best = node_data_resolvers.best_explanation(info.context, self.ref)
        return _answer(
            node_data_resolvers.then(best, lambda b: None if b is None else Explanation.of(b))
        )

    @strawberry.field(
        description=(
            "The node in Neuronpedia's feature shape (see NeuronpediaFeature): its top "
            "examples, explanations and density from the model's sources, its top and bottom "
            "logits from the weights."
        )
    )
    async def neuronpedia(self, info: Info) -> NeuronpediaFeature:
        return NeuronpediaFeature(await neuronpedia_resolvers.feature(info.context, self.ref))

    @strawberry.field(
        description=(
            "Tokens this node's weights favour: the logit lens of its write direction (output "
            "tokens it up- and downvotes) and the input tokens whose embeddings drive it."
        )
    )
    async def scored_tokens(self, info: Info, k: int = 10) -> ScoredTokens:
        scores = await analysis_resolvers.node_scored_tokens(info.context, self.ref, k)
        ctx, model = info.context, self.ref.model

        def listed(pairs: list[tuple[int, float]] | None) -> list[TokenScore] | None:
            if pairs is None:
                return None
            return [
                TokenScore(
                    token=Token.at(ctx, model, rank, t),
                    value=v,
                )
                for rank, (t, v) in enumerate(pairs)
            ]

        return ScoredTokens(
            upvoted_output_tokens=listed(scores.upvoted_output),
            downvoted_output_tokens=listed(scores.downvoted_output),
            upvoting_input_tokens=listed(scores.upvoting_input),
            upvoting_key_tokens=listed(scores.upvoting_input_keys),
        )

    @strawberry.field(
        description="This node's activation on every token of a prompt, run clean: no "
        "ablations, wherever the node was found (nested in an `infer` with ablations it does "
        "not see them; ask that result's `activations(nodeIds)` or a ranking's tokenValues "
        "for values from the same pass). It shares a pass with other clean fields on the "
        "same prompt."
    )
    async def activations(self, info: Info, prompt: str) -> NodeActivations:
        spec = inference_resolvers.plain_spec(info.context, self.ref, prompt)
        [values] = await inference_resolvers.node_values(info.context, spec, [self.ref])
        return node_activations(info.context, values)


def _answer(soon: node_data_resolvers.Soon[T]) -> T:
    """A field's answer, now or awaitable: graphql-core awaits what is awaitable, while
    strawberry types the field by the value's type (the annotation)."""
    return cast(T, soon)


def _selected(info: Info) -> set[str]:
    """The field names selected on this field's items, through fragments too."""
    names: set[str] = set()
    stack: list[Any] = list(info.selected_fields)
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, SelectedField):
                names.add(selection.name)
            else:  # a fragment: its selections are the items' own
                stack.append(selection)
    return names


async def with_node_data(info: Info, refs: list[NodeRef]) -> list[Node]:
    """Nodes whose records and explanations, where selected, are read for all at once."""
    selected = _selected(info)
    await node_data_resolvers.prefetch(
        info.context,
        refs,
        records=bool(selected & node_data_resolvers.RECORD_FIELDS),
        known=bool(selected & node_data_resolvers.EXPLANATION_FIELDS),
    )
    return [Node(ref=ref) for ref in refs]


def tokens_of(ctx: RequestContext, model: str, ids: tuple[int, ...]) -> list[Token]:
    return [Token.of(t) for t in model_resolvers.token_infos(ctx, model, ids)]


def node_activations(
    ctx: RequestContext, values: inference_resolvers.NodeValues
) -> NodeActivations:
    return NodeActivations(
        node=Node(ref=values.node),
        tokens=tokens_of(ctx, values.node.model, values.tokens),
        attention_pattern=None if values.pattern is None else FloatArray(values.pattern),
        per_token=values.values,
        pattern=values.pattern,
        pair_attribution=values.pair_attribution,
        refused=values.refused,
    )
