"""Explaining and scoring nodes as jobs; following them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from interpql.errors import UnavailableError, check_range, invalid_argument
from interpql.loaders.explaining import ExplainOptions, ExplanationService, ScoreOptions
from interpql.loaders.jobs import Job, JobEvent
from interpql.resolvers.context import RequestContext
from interpql.resolvers.models import node_from_id

METHODS = ("auto", "api", "baseline")


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


async def explain_node(ctx: RequestContext, node_id: str, options: ExplainOptions) -> Job:
    key_id = _authorized(ctx)
    _check_method(options.method)
    check_range("examples", options.examples, 1, 101)
    check_range("explanations", options.explanations, 1, 11)
    check_range("heldOutRandom", options.held_out_random, 0, 101)
    node = node_from_id(ctx, node_id)
    entry = ctx.registry.get(node.model)
    return await _service(ctx).submit_explain(entry, node, options, key_id)


async def score_explanation(
    ctx: RequestContext, node_id: str, text: str, options: ScoreOptions
) -> Job:
    key_id = _authorized(ctx)
    _check_method(options.method)
    check_range("heldOutRandom", options.held_out_random, 0, 101)
    if not text.strip() or len(text) > 2000:
        raise invalid_argument("The explanation must be 1-2000 characters.")
    node = node_from_id(ctx, node_id)
    entry = ctx.registry.get(node.model)
    return await _service(ctx).submit_score(entry, node, text.strip(), options, key_id)


# A job belongs to the API key that created it; callers with another key, or with none, are
# told there is no such job (and not that it exists and is someone else's).


async def job(ctx: RequestContext, job_id: str) -> Job:
    return await ctx.services.jobs.get(job_id, _caller(ctx))


def follow(ctx: RequestContext, job_id: str) -> AsyncIterator[JobEvent]:
    return ctx.services.jobs.follow(job_id, _caller(ctx))


def _caller(ctx: RequestContext) -> str:
    # Every job has its creator's key id; no caller without a key matches one.
    return ctx.key_id or ""
