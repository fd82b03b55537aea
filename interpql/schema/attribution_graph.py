"""Attribution graphs (circuit tracing over transcoder latents): the types, the stream of a
graph's progress, and interventions on its latents."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from enum import Enum

import strawberry

from interpql.resolvers import attribution_graph as graph_resolvers
from interpql.resolvers.attribution_graph import (
    GraphData,
    GraphProgress,
)
from interpql.resolvers.attribution_graph import (
    GraphNode as GraphNodeData,
)
from interpql.resolvers.attribution_graph import (
    TopLogit as TopLogitData,
)
from interpql.schema.inputs import AttributionGraphInput, GraphInterventionInput
from interpql.schema.scalars import NeuronpediaGraph
from interpql.schema.types import Info, Node, Token


@strawberry.enum(description="What a node of an attribution graph stands for.")
class GraphNodeType(Enum):
    EMBEDDING = strawberry.enum_value(
        "embedding",
        description="A prompt position's embedding: token plus position embedding (the "
        "residual stream entering layer 0).",
    )
    FEATURE = strawberry.enum_value(
        "feature", description="An active transcoder latent at one position."
    )
    ERROR = strawberry.enum_value(
        "error",
        description="What a layer's transcoder misses of the MLP's output at one position (the "
        "MLP's output minus the transcoder's), held fixed.",
    )
    LOGIT = strawberry.enum_value(
        "logit", description="A target: a next-token logit at the last position."
    )


@strawberry.type(description="A node of an attribution graph.")
class GraphNode:
    data: strawberry.Private[GraphNodeData]
    model: strawberry.Private[str]

    @strawberry.field(
        description="Its id in this graph (and in the graph JSON): {layer}_{index}_{tokenIndex} "
        "for latents, err_{layer}_{tokenIndex}, E_{token}_{tokenIndex}, L_{token}_{tokenIndex}; "
        "no two nodes share one."
    )
    def id(self) -> str:
        return self.data.id

    @strawberry.field(description="What it stands for.")
    def type(self) -> GraphNodeType:
        return GraphNodeType(self.data.type.value)

    @strawberry.field(description="Latents and errors: the layer; null for embeddings and logits.")
    def layer(self) -> int | None:
        return self.data.layer

    @strawberry.field(description="Its position in the prompt.")
    def token_index(self) -> int:
        return self.data.position

    @strawberry.field(description="The prompt's token there; a logit node's own next token.")
    def token(self, info: Info) -> Token:
        return Token.at(info.context, self.model, self.data.position, self.data.token)

    @strawberry.field(
        description="Its share of the logits' probability-weighted inputs through every path "
        "of the unpruned graph (circuit tracing's influence: the sum over k >= 1 of w Â^k, "
        "Â the absolute edge weights normalised per target, w the logit probabilities); 0 for "
        "logits."
    )
    def influence(self) -> float:
        return self.data.influence

    @strawberry.field(
        description="The share of all nodes' influence held by this node and every node of "
        "higher influence (what circuit-tracer's graph JSON calls influence)."
    )
    def cumulative_influence(self) -> float:
        return self.data.cumulative_influence

    @strawberry.field(
        description="A latent's activation at its position; an error node's vector norm; null "
        "otherwise."
    )
    def activation(self) -> float | None:
        return self.data.activation

    @strawberry.field(description="Logits: the next token's probability.")
    def probability(self) -> float | None:
        return self.data.probability

    @strawberry.field(description="Logits: the logit minus the mean logit over the vocabulary.")
    def logit(self) -> float | None:
        return self.data.logit

    @strawberry.field(
        description="The API's node: a latent's (its explanations, examples, activations); for "
        "embeddings the model's token_embedding node (what token and position embeddings "
        "write); null for errors and logits."
    )
    def node(self) -> Node | None:
        return None if self.data.ref is None else Node(ref=self.data.ref)


@strawberry.type(
    description="A direct effect in the linearised replacement model: the source's activation "
    "times the derivative of the target's input (a latent's pre-activation, a logit minus the "
    "mean logit) with respect to it, attention patterns and LayerNorm scales frozen."
)
class GraphEdge:
    source: str = strawberry.field(description="The source node's id.")
    target: str = strawberry.field(description="The target node's id.")
    weight: float = strawberry.field(description="The direct effect.")


@strawberry.type(description="How many nodes and edges a graph has.")
class GraphSizes:
    active_features: int = strawberry.field(description="Latents active on the prompt.")
    features: int = strawberry.field(description="Latent nodes.")
    errors: int = strawberry.field(description="Error nodes.")
    embeddings: int = strawberry.field(description="Embedding nodes.")
    logits: int = strawberry.field(description="Logit nodes.")
    nodes: int = strawberry.field(description="All nodes.")
    edges: int = strawberry.field(description="Nonzero edges.")


@strawberry.type(description="The pruning applied.")
class GraphPruning:
    node_threshold: float = strawberry.field(description="The share of node influence kept.")
    edge_threshold: float = strawberry.field(description="The share of edge influence kept.")
    node_score_threshold: float = strawberry.field(
        description="The smallest influence a kept node has."
    )
    edge_score_threshold: float = strawberry.field(
        description="The smallest edge influence a kept edge has."
    )
    node_influence_kept: float = strawberry.field(
        description="The share of all nodes' influence the node-pruned graph holds."
    )
    edge_influence_kept: float = strawberry.field(
        description="The share of the node-pruned graph's edge influence the kept edges hold."
    )


@strawberry.type(description="A next token, its logit and its probability.")
class TopLogit:
    data: strawberry.Private[TopLogitData]
    model: strawberry.Private[str]

    @strawberry.field(description="The token.")
    def token(self, info: Info) -> Token:
        return Token.at(info.context, self.model, 0, self.data.token)

    @strawberry.field(description="Its logit.")
    def logit(self) -> float:
        return self.data.logit

    @strawberry.field(description="Its probability.")
    def probability(self) -> float:
        return self.data.probability


@strawberry.type(
    description="The top next tokens at the last position before and after an intervention."
)
class GraphIntervention:
    original: list[TopLogit] = strawberry.field(description="Without it.")
    frozen_attention: list[TopLogit] = strawberry.field(
        description="The linear prediction: in the linearised replacement model (attention "
        "patterns, LayerNorm scales, error nodes and every other latent held at their values "
        "on the prompt)."
    )
    free: list[TopLogit] = strawberry.field(
        description="The model running freely with the latents edited: the transcoder spliced "
        "into their layers with its error term, everything downstream recomputed."
    )


def _tops(model: str, found: list[TopLogitData]) -> list[TopLogit]:
    return [TopLogit(data=t, model=model) for t in found]


@strawberry.type(
    description="An attribution graph (Ameisen et al. 2025, circuit-tracer's algorithm): with "
    "attention patterns and LayerNorm scales frozen at their values on the prompt and every MLP "
    "replaced by its transcoder plus an error node, the logits are sums of direct effects "
    "between nodes: embeddings, active latents and errors to latents and logits. Pruned by "
    "cumulative influence."
)
class AttributionGraph:
    data: strawberry.Private[GraphData]

    @strawberry.field(description="Its id: the same prompt and parameters give the same id.")
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.data.id)

    @strawberry.field(description="The prompt.")
    def prompt(self) -> str:
        return self.data.spec.prompt

    @strawberry.field(
        description="The prompt's tokens (the beginning-of-sequence one first, when prepended)."
    )
    def tokens(self, info: Info) -> list[Token]:
        model = self.data.spec.model
        return [Token.at(info.context, model, i, t) for i, t in enumerate(self.data.spec.tokens)]

    @strawberry.field(description="The pruned graph's nodes: latents, errors, embeddings, logits.")
    def nodes(self) -> list[GraphNode]:
        model = self.data.spec.model
        return [GraphNode(data=n, model=model) for n in self.data.nodes]

    @strawberry.field(description="The pruned graph's edges.")
    def edges(self) -> list[GraphEdge]:
        nodes = self.data.nodes
        return [
            GraphEdge(source=nodes[int(s)].id, target=nodes[int(t)].id, weight=float(w))
            for s, t, w in zip(self.data.sources, self.data.targets, self.data.weights, strict=True)
        ]

    @strawberry.field(description="The sizes before pruning.")
    def unpruned(self) -> GraphSizes:
        return _sizes(self.data.unpruned)

    @strawberry.field(description="The sizes after pruning.")
    def pruned(self) -> GraphSizes:
        return _sizes(self.data.pruned)

    @strawberry.field(description="The pruning applied.")
    def pruning(self) -> GraphPruning:
        p = self.data.pruning
        return GraphPruning(
            node_threshold=p.node_threshold,
            edge_threshold=p.edge_threshold,
            node_score_threshold=p.node_score_threshold,
            edge_score_threshold=p.edge_score_threshold,
            node_influence_kept=p.node_influence_kept,
            edge_influence_kept=p.edge_influence_kept,
        )

    @strawberry.field(
        description="Of the unpruned graph: the embeddings' share of the influence that "
        "embeddings and error nodes hold together (circuit tracing's replacement score; 1 "
        "when errors explain nothing)."
    )
    def replacement_score(self) -> float:
        return self.data.replacement_score

    @strawberry.field(
        description="Of the unpruned graph: the influence-weighted share of nodes' inputs that "
        "does not come from error nodes (circuit tracing's completeness score)."
    )
    def completeness_score(self) -> float:
        return self.data.completeness_score

    @strawberry.field(description="The replacement score of the pruned graph (its kept edges).")
    def pruned_replacement_score(self) -> float:
        return self.data.pruned_replacement_score

    @strawberry.field(description="The completeness score of the pruned graph (its kept edges).")
    def pruned_completeness_score(self) -> float:
        return self.data.pruned_completeness_score

    @strawberry.field(description="Milliseconds its computation took on the model's worker.")
    def compute_time_ms(self) -> float:
        return self.data.elapsed_s * 1000

    @strawberry.field(description="Where the graph JSON is served (relative to the server).")
    def json_url(self) -> str:
        return f"/graphs/{self.data.id}.json"

    @strawberry.field(
        description="The graph JSON, with each latent's best explanation as its clerp."
    )
    async def neuronpedia_json(self, info: Info) -> NeuronpediaGraph:
        return NeuronpediaGraph(await graph_resolvers.neuronpedia_json(info.context, self.data))

    @strawberry.field(
        description="Set or scale latents and read the top next tokens at the last position, "
        "in the linearised model and in the model running freely."
    )
    async def intervene(
        self, info: Info, interventions: list[GraphInterventionInput], k: int = 10
    ) -> GraphIntervention:
        changes = graph_resolvers.interventions_on(
            self.data, [(i.node_id, i.value, i.scale) for i in interventions]
        )
        found = await graph_resolvers.run_interventions(info.context, self.data, changes, k)
        model = self.data.spec.model
        return GraphIntervention(
            original=_tops(model, found.original),
            frozen_attention=_tops(model, found.frozen),
            free=_tops(model, found.free),
        )


def _sizes(sizes: graph_resolvers.Sizes) -> GraphSizes:
    return GraphSizes(
        active_features=sizes.active_features,
        features=sizes.features,
        errors=sizes.errors,
        embeddings=sizes.embeddings,
        logits=sizes.logits,
        nodes=sizes.nodes,
        edges=sizes.edges,
    )


@strawberry.type(description="An attribution graph's progress, or the graph on the last event.")
class AttributionGraphEvent:
    rows_done: int = strawberry.field(description="Targets whose edges are computed.")
    rows: int = strawberry.field(description="Targets in all (latents and logits).")
    graph: AttributionGraph | None = strawberry.field(description="The graph, on the last event.")


async def attribution_graph(
    info: Info, model: str, input: AttributionGraphInput
) -> AttributionGraph:
    spec = graph_resolvers.graph_spec(info.context, model, input.args())
    return AttributionGraph(data=await graph_resolvers.attribution_graph(info.context, spec))


async def graph_events(
    info: Info, model: str, input: AttributionGraphInput
) -> AsyncGenerator[AttributionGraphEvent, None]:
    spec = graph_resolvers.graph_spec(info.context, model, input.args())
    rows = 0
    async for event in graph_resolvers.stream_graph(info.context, spec):
        if isinstance(event, GraphProgress):
            rows = event.rows
            yield AttributionGraphEvent(rows_done=event.rows_done, rows=event.rows, graph=None)
        else:
            yield AttributionGraphEvent(
                rows_done=rows, rows=rows, graph=AttributionGraph(data=event)
            )


async def graph_by_id(info: Info, id: strawberry.ID) -> AttributionGraph:
    return AttributionGraph(data=await graph_resolvers.graph_by_id(info.context, str(id)))
