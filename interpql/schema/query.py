"""The root Query type."""

from __future__ import annotations

import asyncio

import strawberry

from interpql.resolvers import models as model_resolvers
from interpql.resolvers import neuronpedia as neuronpedia_resolvers
from interpql.resolvers import search as search_resolvers
from interpql.schema.attribution_graph import AttributionGraph, graph_by_id
from interpql.schema.enums import NodeKind, optional_kind_name
from interpql.schema.jobs import Job, job
from interpql.schema.types import Info, Model, Node, PageInfo, with_node_data


@strawberry.type(description="A node found by a search.")
class SearchEdge:
    cursor: str = strawberry.field(description="Opaque cursor of this hit.")
    node: Node = strawberry.field(description="The node.")
    score: float = strawberry.field(
        description="Relevance, higher better: for text, BM25 of the matched explanation (its "
        "sign flipped, as SQLite's FTS5 computes it); for a token, the share of the node's "
        "top examples whose highest activation is on that token (0 to 1; ties go to the node "
        "whose activation there is nearest its own peak)."
    )
    matched_explanation: str | None = strawberry.field(
        description="For text searches, the explanation that matched."
    )
    peak_activation: float | None = strawberry.field(
        description="For token searches, the node's highest activation on the token in its "
        "top examples (in the node's own units)."
    )


@strawberry.type(description="A page of search hits, best first.")
class SearchConnection:
    edges: list[SearchEdge] = strawberry.field(description="The hits of this page.")
    page_info: PageInfo = strawberry.field(description="Where this page ends.")
    total_count: int = strawberry.field(description="Hits in all.")


@strawberry.type(description="Entry points: models and their nodes.")
class Query:
    @strawberry.field(description="Every model this server serves.")
    def models(self, info: Info) -> list[Model]:
        return [Model(view=view) for view in model_resolvers.models(info.context)]

    @strawberry.field(description="One model by name; MODEL_NOT_FOUND when none has that name.")
    def model(self, info: Info, name: str) -> Model:
        return Model(view=model_resolvers.model(info.context, name))

    @strawberry.field(
        description="An attribution graph computed recently, by its id: by any server sharing "
        "this one's Redis (--redis; kept a day), else by this server or its --workers (the 64 "
        "most recent, in a SQLite file beside the explanation store); GRAPH_NOT_FOUND once it "
        "is no longer kept."
    )
    async def attribution_graph(self, info: Info, id: strawberry.ID) -> AttributionGraph:
        return await graph_by_id(info, id)

    @strawberry.field(description="One node by id (<model>/<kind>/<layer>/<index>).")
    def node(self, info: Info, id: strawberry.ID) -> Node:
        return Node(ref=model_resolvers.node_from_id(info.context, str(id)))

    @strawberry.field(
        description=(
            "A node by Neuronpedia's address: modelId (the model's name here), source "
            "(<layer>-<dictionary>, e.g. 8-res-jb: layer 8 of the set res-jb; structural kinds "
            "too, e.g. 3-mlp_neuron) and index."
        )
    )
    def neuronpedia_feature(self, info: Info, model_id: str, source: str, index: int) -> Node:
        return Node(ref=neuronpedia_resolvers.node_of(info.context, model_id, source, index))

    @strawberry.field(
        description=(
            "Find nodes by the words of their explanations (text: full-text search over every "
            "stored explanation's text, each word stemmed, every word required, ranked by "
            "BM25) or by the token their top dataset examples peak on (token: exact token "
            'text, e.g. " def"; ranked by the share of the node\'s top examples that peak '
            "there), optionally within one model, node kind (a dictionary set: kind "
            "DICTIONARY_LATENT and its name in `dictionary`) and layer. Both scores compare "
            "across kinds: neither depends on a kind's scale of activations."
        )
    )
    async def search_nodes(
        self,
        info: Info,
        text: str | None = None,
        token: str | None = None,
        model: str | None = None,
        kind: NodeKind | None = None,
        dictionary: str | None = None,
        layer: int | None = None,
        first: int = 20,
        after: str | None = None,
    ) -> SearchConnection:
        scope = search_resolvers.Scope(
            model=model,
            kind=optional_kind_name(kind, dictionary),
            layer=layer,
        )
        # On a worker thread: the first token search indexes every top example's peak.
        hits, total, start = await asyncio.to_thread(
            search_resolvers.search, info.context, scope, text, token, first, after
        )
        edges = [
            SearchEdge(
                cursor=str(start + i),
                node=Node(ref=h.node),
                score=h.score,
                matched_explanation=h.text,
                peak_activation=h.activation,
            )
            for i, h in enumerate(hits)
        ]
        return SearchConnection(
            edges=edges, page_info=PageInfo.of(start, len(hits), total), total_count=total
        )

    @strawberry.field(description="A job (explaining or scoring a node) by id.")
    async def job(self, info: Info, id: strawberry.ID) -> Job:
        return await job(info, id)

    @strawberry.field(description="Several nodes by id, in the order given.")
    async def nodes(self, info: Info, ids: list[strawberry.ID]) -> list[Node]:
        refs = model_resolvers.nodes_from_ids(info.context, [str(i) for i in ids])
        return await with_node_data(info, refs)
