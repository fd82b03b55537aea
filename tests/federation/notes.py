"""A second subgraph for the federation test: notes about interpql's nodes, and a featured model.

It extends interpql's `Node` (key `id`) with `notes`, and returns `Node` and `Model` references
that only interpql can resolve, so a gateway query through it crosses both subgraphs both ways.

    python tests/federation/notes.py PORT MODEL_NAME NOTES_JSON   # NOTES_JSON: {node id: [notes]}
"""

from __future__ import annotations

import json
import sys

import strawberry
import uvicorn
from strawberry.asgi import GraphQL
from strawberry.federation.schema_directives import FieldSet, Key

# Set from the command line before serving.
NOTES: dict[str, list[str]] = {}
FEATURED_MODEL = ""


@strawberry.federation.type(keys=["id"], description="A node of interpql, with notes.")
class Node:
    id: strawberry.ID = strawberry.field(description="interpql's node id.")

    @strawberry.field(description="What people wrote about this node.")
    def notes(self) -> list[str]:
        return NOTES.get(str(self.id), [])

    @classmethod
    def resolve_reference(cls, id: strawberry.ID) -> Node:
        return cls(id=id)


@strawberry.federation.type(
    keys=[Key(fields=FieldSet("name"), resolvable=False)],
    description="A model that interpql serves (only interpql resolves it).",
)
class Model:
    name: str = strawberry.field(description="interpql's model name.")


@strawberry.type(description="Notes about nodes.")
class Query:
    @strawberry.field(description="Nodes with notes.")
    def noted_nodes(self) -> list[Node]:
        return [Node(id=strawberry.ID(node_id)) for node_id in NOTES]

    @strawberry.field(description="The model of the week.")
    def featured_model(self) -> Model:
        return Model(name=FEATURED_MODEL)


if __name__ == "__main__":
    port, FEATURED_MODEL, notes_json = sys.argv[1:]
    NOTES.update(json.loads(notes_json))
    schema = strawberry.federation.Schema(query=Query)
    uvicorn.run(
        GraphQL(schema, graphql_ide=None), host="127.0.0.1", port=int(port), log_level="warning"
    )
