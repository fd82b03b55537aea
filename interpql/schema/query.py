"""The root Query type."""

from __future__ import annotations

import strawberry

from interpql.resolvers import models as model_resolvers
from interpql.schema.types import Info, Model, Node


@strawberry.type(description="Entry points: models and their nodes.")
class Query:
    @strawberry.field(description="Every model this server serves.")
    def models(self, info: Info) -> list[Model]:
        return [Model(entry=entry) for entry in info.context.registry.all()]

    @strawberry.field(description="One model by name; MODEL_NOT_FOUND when none has that name.")
    def model(self, info: Info, name: str) -> Model:
        return Model(entry=info.context.registry.get(name))

    @strawberry.field(description="One node by id (<model>/<kind>/<layer>/<index>).")
    def node(self, info: Info, id: strawberry.ID) -> Node:
        return Node(ref=model_resolvers.node_from_id(info.context, str(id)))

    @strawberry.field(description="Several nodes by id, in the order given.")
    def nodes(self, info: Info, ids: list[strawberry.ID]) -> list[Node]:
        return [
            Node(ref=ref)
            for ref in model_resolvers.nodes_from_ids(info.context, [str(i) for i in ids])
        ]
