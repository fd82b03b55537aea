"""Mutations that cost money (explaining and scoring nodes through an API) and their jobs."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from interpql.resolvers import attribution_graph as graph_resolvers
from interpql.resolvers import jobs as job_resolvers
from interpql.resolvers.jobs import JobView
from interpql.resolvers.models import node_from_id
from interpql.schema.attribution_graph import AttributionGraph
from interpql.schema.enums import JobStatus
from interpql.schema.inputs import AttributionGraphInput
from interpql.schema.node_data import Explanation
from interpql.schema.types import Info, Node


@strawberry.input(description="How to explain a node.")
class ExplainOptionsInput:
    method: str = strawberry.field(
        default="auto",
        description="api (the configured OpenAI-compatible server), baseline (offline, from "
        "top tokens) or auto (api when configured).",
    )
    examples: int = strawberry.field(default=10, description="Top records shown to the explainer.")
    explanations: int = strawberry.field(default=1, description="Candidates; each is scored.")
    held_out_random: int = strawberry.field(
        default=5, description="Random records mixed into the held-out scoring set."
    )


@strawberry.input(description="How to score an explanation.")
class ScoreOptionsInput:
    method: str = strawberry.field(default="auto", description="api, baseline or auto.")
    held_out_random: int = strawberry.field(
        default=5, description="Random records mixed into the held-out scoring set."
    )


@strawberry.type(description="A change in a job: its status, progress and what it is doing.")
class JobEvent:
    sequence: int = strawberry.field(description="Events of a job are numbered from 0, in order.")
    status: JobStatus = strawberry.field(description="The job's status.")
    progress: float = strawberry.field(description="From 0 to 1.")
    message: str = strawberry.field(description="What it is doing, or why it failed.")


@strawberry.type(
    description="A long-running job: explaining or scoring a node, or an attribution graph."
)
class Job:
    data: strawberry.Private[JobView]

    @strawberry.field(description="The job's id, for Query.job and Subscription.jobUpdates.")
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.data.id)

    @strawberry.field(description="explain, score or attribution_graph.")
    def kind(self) -> str:
        return self.data.kind

    @strawberry.field(description="Where it is.")
    def status(self) -> JobStatus:
        return JobStatus(self.data.status)

    @strawberry.field(description="From 0 to 1.")
    def progress(self) -> float:
        return self.data.progress

    @strawberry.field(description="What it is doing.")
    def message(self) -> str:
        return self.data.message

    @strawberry.field(description="The node it is about (null for an attribution graph).")
    def node(self, info: Info) -> Node | None:
        if self.data.kind == graph_resolvers.GRAPH_JOB:
            return None
        return Node(ref=node_from_id(info.context, self.data.node_id))

    @strawberry.field(
        description="An attribution graph job's graph once it succeeded (null before, for other "
        "jobs, and once this server no longer keeps it)."
    )
    async def graph(self, info: Info) -> AttributionGraph | None:
        found = await graph_resolvers.graph_of_job(info.context, self.data)
        return None if found is None else AttributionGraph(data=found)

    @strawberry.field(description="The explanations it stored (on success).")
    def result(self) -> list[Explanation]:
        return [Explanation.of(e) for e in self.data.result]

    @strawberry.field(
        description="True when an identical earlier request answered it from the store."
    )
    def from_store(self) -> bool:
        return self.data.from_store

    @strawberry.field(description="Why it failed, if it did.")
    def error(self) -> str | None:
        return self.data.error

    @strawberry.field(description="When it was submitted (ISO 8601).")
    def created(self) -> str:
        return self.data.created


@strawberry.type(description="Operations that change state; they need an API key.")
class Mutation:
    @strawberry.mutation(
        description=(
            "Explain a node from its top records and score the explanation by simulation on "
            "held-out records; the result is stored and appears in Node.explanations. Needs "
            "'Authorization: Bearer <key>'."
        )
    )
    async def explain_node(
        self, info: Info, node_id: strawberry.ID, options: ExplainOptionsInput | None = None
    ) -> Job:
        given = options or ExplainOptionsInput()
        return Job(data=await job_resolvers.explain_node(info.context, str(node_id), given))

    @strawberry.mutation(
        description=(
            "Score an explanation of a node by simulation on its held-out records; the result "
            "is stored. Needs 'Authorization: Bearer <key>'."
        )
    )
    async def score_explanation(
        self,
        info: Info,
        node_id: strawberry.ID,
        text: str,
        options: ScoreOptionsInput | None = None,
    ) -> Job:
        given = options or ScoreOptionsInput()
        data = await job_resolvers.score_explanation(info.context, str(node_id), text, given)
        return Job(data=data)

    @strawberry.mutation(
        description=(
            "Compute Model.attributionGraph as a job of the caller's key, for graphs too large "
            "to wait for in one request: its progress over Subscription.jobUpdates, the graph "
            "in Job.graph (and Query.attributionGraph) once it succeeded. Not bounded by the "
            "inference timeout. Needs 'Authorization: Bearer <key>'."
        )
    )
    async def start_attribution_graph(
        self, info: Info, model: str, input: AttributionGraphInput
    ) -> Job:
        spec = graph_resolvers.graph_spec(info.context, model, input.args())
        return Job(data=await graph_resolvers.start_graph_job(info.context, spec))


async def job(info: Info, id: strawberry.ID) -> Job:
    return Job(data=await job_resolvers.job(info.context, str(id)))


async def job_updates(info: Info, id: strawberry.ID) -> AsyncGenerator[JobEvent, None]:
    async for event in job_resolvers.follow(info.context, str(id)):
        yield JobEvent(
            sequence=event.sequence,
            status=JobStatus(event.status),
            progress=event.progress,
            message=event.message,
        )
