"""Explaining and scoring nodes as jobs; following them.

A job belongs to the API key that created it; callers with another key, or with none, are
told there is no such job (and not that it exists and is someone else's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from interpql.errors import UnavailableError, check_range, invalid_argument
from interpql.loaders.explaining import ExplainOptions, ExplanationService, ScoreOptions
from interpql.loaders.jobs import Job
from interpql.loaders.sources import ExplanationData, StoredExplanation
from interpql.resolvers.context import RequestContext
from interpql.resolvers.models import node_from_id

METHODS = ("auto", "api", "baseline")


class ExplainArgs(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def examples(self) -> int: ...
    @property
    def explanations(self) -> int: ...
    @property
    def held_out_random(self) -> int: ...


class ScoreArgs(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def held_out_random(self) -> int: ...


@dataclass(frozen=True)
class JobView:
    id: str
    kind: str
    status: str  # JobStatus's value
    progress: float
    message: str
    node_id: str
    result: list[ExplanationData]
    from_store: bool
    error: str | None
    created: str


@dataclass(frozen=True)
class JobEventView:
    sequence: int
    status: str
    progress: float
    message: str


def job_view(job: Job) -> JobView:
    stored: list[StoredExplanation] = job.result or []
    return JobView(
        id=job.id,
        kind=job.kind,
        status=job.status.value,
        progress=job.progress,
        message=job.message,
        node_id=job.node_id,
        result=[s.data for s in stored],
        from_store=job.from_store,
        error=job.error,
        created=job.created,
    )


def _authorized(ctx: RequestContext) -> str:
    return ctx.services.api_keys.require(ctx.authorization)


def _service(ctx: RequestContext) -> ExplanationService:
    service = ctx.services.explaining
    if service is None:
        raise UnavailableError("Explaining is not configured on this server.")
    return service


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise invalid_argument(f"method must be one of {', '.join(METHODS)}.")


async def explain_node(ctx: RequestContext, node_id: str, args: ExplainArgs) -> JobView:
    key_id = _authorized(ctx)
    _check_method(args.method)
    check_range("examples", args.examples, 1, 101)
    check_range("explanations", args.explanations, 1, 11)
    check_range("heldOutRandom", args.held_out_random, 0, 101)
    options = ExplainOptions(args.method, args.examples, args.explanations, args.held_out_random)
    node = node_from_id(ctx, node_id)
    entry = ctx.registry.get(node.model)
    return job_view(await _service(ctx).submit_explain(entry, node, options, key_id))


async def score_explanation(
    ctx: RequestContext, node_id: str, text: str, args: ScoreArgs
) -> JobView:
    key_id = _authorized(ctx)
    _check_method(args.method)
    check_range("heldOutRandom", args.held_out_random, 0, 101)
    if not text.strip() or len(text) > 2000:
        raise invalid_argument("The explanation must be 1-2000 characters.")
    control = next((c for c in text if c < " " and c not in "\n\t"), None)
    if control is not None:
        # Stored, searched and sent to a model as text: a NUL or an escape is never meant.
        raise invalid_argument(
            f"The explanation must be plain text; it holds control character "
            f"U+{ord(control):04X} at index {text.index(control)}."
        )
    options = ScoreOptions(args.method, args.held_out_random)
    node = node_from_id(ctx, node_id)
    entry = ctx.registry.get(node.model)
    job = await _service(ctx).submit_score(entry, node, text.strip(), options, key_id)
    return job_view(job)


async def job(ctx: RequestContext, job_id: str) -> JobView:
    return job_view(await ctx.services.jobs.get(job_id, _caller(ctx)))


async def follow(ctx: RequestContext, job_id: str) -> AsyncIterator[JobEventView]:
    async for event in ctx.services.jobs.follow(job_id, _caller(ctx)):
        yield JobEventView(event.sequence, event.status.value, event.progress, event.message)


def _caller(ctx: RequestContext) -> str:
    # Every job has its creator's key id; no caller without a key matches one.
    return ctx.key_id or ""
