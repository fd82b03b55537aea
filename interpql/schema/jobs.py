"""Mutations that cost money (explaining and scoring nodes through an API) and their jobs."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from interpql.loaders.explaining import ExplainOptions, ScoreOptions
from interpql.loaders.jobs import Job as JobData
from interpql.loaders.jobs import JobStatus
from interpql.loaders.sources import StoredExplanation
from interpql.resolvers import jobs as job_resolvers
from interpql.resolvers.models import node_from_id
from interpql.schema.node_data import Explanation
from interpql.schema.types import Info, Node

strawberry.enum(JobStatus, description="Where a job is.")


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


@strawberry.type(description="A long-running job: explaining or scoring a node.")
class Job:
    data: strawberry.Private[JobData]

    @strawberry.field(description="The job's id, for Query.job and Subscription.jobUpdates.")
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.data.id)

    @strawberry.field(description="explain or score.")
    def kind(self) -> str:
        return self.data.kind

    @strawberry.field(description="Where it is.")
    def status(self) -> JobStatus:
        return self.data.status

    @strawberry.field(description="From 0 to 1.")
    def progress(self) -> float:
        return self.data.progress

    @strawberry.field(description="What it is doing.")
    def message(self) -> str:
        return self.data.message

    @strawberry.field(description="The node it is about.")
    def node(self, info: Info) -> Node:
        return Node(ref=node_from_id(info.context, self.data.node_id))

    @strawberry.field(description="The explanations it stored (on success).")
    def result(self) -> list[Explanation]:
        stored: list[StoredExplanation] = self.data.result or []
        return [Explanation(data=s.data) for s in stored]

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
        parsed = ExplainOptions(
            given.method, given.examples, given.explanations, given.held_out_random
        )
        return Job(data=await job_resolvers.explain_node(info.context, str(node_id), parsed))

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
        parsed = ScoreOptions(given.method, given.held_out_random)
        data = await job_resolvers.score_explanation(info.context, str(node_id), text, parsed)
        return Job(data=data)


async def job(info: Info, id: strawberry.ID) -> Job:
    return Job(data=await job_resolvers.job(info.context, str(id)))


async def job_updates(info: Info, id: strawberry.ID) -> AsyncGenerator[JobEvent, None]:
    async for event in job_resolvers.follow(info.context, str(id)):
        yield JobEvent(
            sequence=event.sequence,
            status=event.status,
            progress=event.progress,
            message=event.message,
        )
