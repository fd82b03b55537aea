"""Attribution graphs: the request checked into a `GraphSpec`, the graph computed once per
spec (and kept by id), its Neuronpedia JSON, and interventions on its latents."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from interpql.errors import InvalidInputError, NotFoundError, check_range, invalid_argument
from interpql.loaders.attribution_graph import (
    GraphData,
    GraphLimits,
    GraphNode,
    InterventionResult,
    NodeType,
    Sizes,
    TopLogit,
    beginning_of_sequence,
    build_graph,
    check_transcoders,
    graph_id,
    intervene,
    weights_fingerprint,
)
from interpql.loaders.graph_store import GraphStore
from interpql.loaders.jobs import Job
from interpql.resolvers.context import RequestContext
from interpql.resolvers.jobs import JobView, job_view
from interpql.resolvers.models import encode_nonempty
from interpql.resolvers.node_data import best_explanation, settled
from interpql.specs import FeatureIntervention, GraphSpec

__all__ = [
    "GraphArgs",
    "GraphData",
    "GraphNode",
    "GraphProgress",
    "InterventionResult",
    "NodeType",
    "Sizes",
    "TopLogit",
    "attribution_graph",
    "graph_by_id",
    "graph_of_job",
    "graph_spec",
    "interventions_on",
    "neuronpedia_json",
    "run_interventions",
    "start_graph_job",
    "stream_graph",
]

MAX_LOGITS = 100
GRAPH_JOB = "attribution_graph"  # a job whose subject (node_id) is the graph's id
_FEATURE_ID = re.compile(r"(\d{1,6})_(\d{1,12})_(\d{1,6})")


@dataclass(frozen=True)
class GraphArgs:
    prompt: str
    dictionary: str
    max_feature_nodes: int | None
    max_logits: int
    logit_probability: float
    node_threshold: float
    edge_threshold: float
    prepend_bos: bool


@dataclass(frozen=True)
class GraphProgress:
    rows_done: int
    rows: int


def _fraction(name: str, value: float, *, zero: bool = False) -> float:
    low_ok = value >= 0 if zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= 1):
        raise invalid_argument(f"{name} must be in {'[0' if zero else '(0'}, 1], got {value}.")
    return value


def graph_spec(ctx: RequestContext, model_name: str, args: GraphArgs) -> GraphSpec:
    entry = ctx.registry.get(model_name)
    entry.require_backend()
    if args.dictionary not in entry.dictionary_sides():
        known = ", ".join(entry.dictionary_sides()) or "none"
        raise invalid_argument(
            f"model {entry.name!r} has no dictionary {args.dictionary!r} (attached: {known})."
        )
    check_transcoders(entry, args.dictionary)
    tokens = encode_nonempty(ctx, entry, args.prompt)
    if args.prepend_bos:
        bos = beginning_of_sequence(entry)
        if bos is None:
            raise invalid_argument(
                f"model {entry.name!r} has no beginning-of-sequence token: set prependBos false."
            )
        tokens = (bos, *tokens)
    limit = min(ctx.settings.max_graph_tokens, entry.architecture.n_ctx)
    if len(tokens) > limit:
        # One code and the graph's own limit whatever the length (past the context window it
        # was PROMPT_TOO_LONG naming the model's, below it INVALID_ARGUMENT naming this).
        raise InvalidInputError(
            f"an attribution graph reads at most {limit} tokens here; the prompt has "
            f"{len(tokens)} (with the beginning-of-sequence token when prepended).",
            code="PROMPT_TOO_LONG",
        )
    if args.max_feature_nodes is not None:
        check_range("maxFeatureNodes", args.max_feature_nodes, 1, 10**7)
    check_range("maxLogits", args.max_logits, 1, MAX_LOGITS + 1)
    return GraphSpec(
        model=entry.name,
        dictionary=args.dictionary,
        prompt=args.prompt,
        tokens=tokens,
        max_feature_nodes=args.max_feature_nodes,
        max_logits=args.max_logits,
        logit_probability=_fraction("logitProbability", args.logit_probability),
        node_threshold=_fraction("nodeThreshold", args.node_threshold),
        edge_threshold=_fraction("edgeThreshold", args.edge_threshold),
        weights=weights_fingerprint(entry, args.dictionary),
    )


def _limits(ctx: RequestContext) -> GraphLimits:
    settings = ctx.settings
    return GraphLimits(
        batch_size=settings.graph_batch_size,
        matrix_budget_bytes=settings.graph_memory_mb << 20,
        max_edges=settings.max_graph_edges,
    )


def _store(ctx: RequestContext) -> GraphStore:
    return ctx.services.graphs


async def attribution_graph(ctx: RequestContext, spec: GraphSpec) -> GraphData:
    """The graph of `spec`: from the server's store when it was computed before."""
    found = await _store(ctx).get(graph_id(spec))
    if found is not None:
        return found
    entry = ctx.registry.get(spec.model)
    graph = await ctx.services.model_runner.compute(
        entry,
        "attribution_graph",
        lambda stop: build_graph(entry, spec, _limits(ctx), stop),
    )
    await _store(ctx).put(graph)
    return graph


async def stream_graph(
    ctx: RequestContext, spec: GraphSpec
) -> AsyncIterator[GraphProgress | GraphData]:
    """Progress as the worker thread computes rows, then the graph."""
    found = await _store(ctx).get(graph_id(spec))
    if found is not None:
        yield found
        return
    loop = asyncio.get_running_loop()
    entry = ctx.registry.get(spec.model)
    events: asyncio.Queue[GraphProgress] = asyncio.Queue()

    def progress(done: int, rows: int) -> None:
        loop.call_soon_threadsafe(events.put_nowait, GraphProgress(done, rows))

    work = asyncio.ensure_future(
        ctx.services.model_runner.compute(
            entry,
            "attribution_graph",
            lambda stop: build_graph(entry, spec, _limits(ctx), stop, progress),
        )
    )
    try:
        while not work.done() or not events.empty():
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
            if next_event.done():
                yield next_event.result()
            else:
                next_event.cancel()
        graph = work.result()  # or the error that stopped it
        await _store(ctx).put(graph)
        yield graph
    finally:
        work.cancel()


async def start_graph_job(ctx: RequestContext, spec: GraphSpec) -> JobView:
    """The graph computed as a job of the caller's key: its progress over jobUpdates, the
    graph (kept by id, which is the job's subject) once it succeeded. Not bounded by the
    inference timeout: no request waits for it."""
    key_id = ctx.services.api_keys.require(ctx.authorization)
    loop = asyncio.get_running_loop()
    entry = ctx.registry.get(spec.model)
    store = _store(ctx)

    async def work(job: Job, progress: Callable[[float, str], None]) -> None:
        if await store.get(graph_id(spec)) is not None:
            return

        def rows(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress, done / total, f"{done} of {total} targets")

        graph = await ctx.services.model_runner.compute(
            entry,
            "attribution_graph",
            lambda stop: build_graph(entry, spec, _limits(ctx), stop, rows),
            bounded=False,
        )
        await store.put(graph)

    job = await ctx.services.jobs.submit(GRAPH_JOB, graph_id(spec), key_id, work)
    return job_view(job)


async def graph_of_job(ctx: RequestContext, view: JobView) -> GraphData | None:
    """A succeeded graph job's graph; None for other jobs, or once it is no longer kept."""
    if view.kind != GRAPH_JOB or view.status != "succeeded":
        return None
    return await _store(ctx).get(view.node_id)


async def graph_by_id(ctx: RequestContext, id: str) -> GraphData:
    found = await _store(ctx).get(id)
    if found is None:
        raise NotFoundError(
            f"no attribution graph {id[:64]!r} is kept (graphs are kept while recent: ask "
            "Model.attributionGraph again)",
            code="GRAPH_NOT_FOUND",
        )
    return found


def interventions_on(
    graph: GraphData, changes: list[tuple[str, float | None, float | None]]
) -> list[FeatureIntervention]:
    """(latent node id `{layer}_{index}_{position}`, value, scale) checked against the graph's
    model and prompt; a latent need not be active or in the pruned graph."""
    if not changes:
        raise invalid_argument("interventions must name at least one latent.")
    n_positions = len(graph.spec.tokens)
    found = []
    seen: set[tuple[int, int, int]] = set()
    for node_id, value, scale in changes:
        match = _FEATURE_ID.fullmatch(node_id)
        if match is None:
            raise invalid_argument(
                f"{node_id[:64]!r} is not a latent's node id ({{layer}}_{{index}}_{{position}})."
            )
        layer, index, position = (int(part) for part in match.groups())
        if (layer, index, position) in seen:
            # Which of its values would hold is no answer a caller should have to guess.
            raise invalid_argument(f"{node_id} is changed twice: give each latent once.")
        seen.add((layer, index, position))
        check_range("the latent's layer", layer, 0, graph.n_layers)
        check_range("the latent's position", position, 0, n_positions)
        if (value is None) == (scale is None):
            raise invalid_argument(f"give one of value and scale for {node_id}.")
        given = value if value is not None else scale
        assert given is not None
        if not math.isfinite(given) or abs(given) > 1e6:
            raise invalid_argument(f"the intervention on {node_id} must be finite, |x| <= 1e6.")
        found.append(
            FeatureIntervention(
                layer=layer, position=position, index=index, value=value, scale=scale
            )
        )
    return found


async def run_interventions(
    ctx: RequestContext, graph: GraphData, changes: list[FeatureIntervention], k: int
) -> InterventionResult:
    check_range("k", k, 1, ctx.settings.max_top_k + 1)
    entry = ctx.registry.get(graph.spec.model)
    return await ctx.services.model_runner.compute(
        entry, "graph_intervention", lambda stop: intervene(entry, graph.spec, changes, k)
    )


async def neuronpedia_json(ctx: RequestContext, graph: GraphData) -> dict[str, Any]:
    """The graph in circuit-tracer's JSON (what Neuronpedia's graph viewer reads), each latent
    with its best explanation as the `clerp`."""
    entry = ctx.registry.get(graph.spec.model)
    features = [n for n in graph.nodes if n.type is NodeType.FEATURE]
    found = await asyncio.gather(
        *(settled(best_explanation(ctx, n.ref)) for n in features if n.ref)
    )
    clerps = {n.id: (e.text if e is not None else "") for n, e in zip(features, found, strict=True)}
    tokens = [entry.token_text(t) for t in graph.spec.tokens]
    # The most probable logit is the target the viewer opens on.
    target = next((n.id for n in graph.nodes if n.type is NodeType.LOGIT), "")
    return {
        "metadata": {
            "slug": graph.id,
            "scan": entry.name,
            "transcoder_list": [graph.spec.dictionary],
            "prompt_tokens": tokens,
            "prompt": graph.spec.prompt,
            "node_threshold": graph.spec.node_threshold,
            "schema_version": 1,
            "info": {"generator": "interpql", "edge_threshold": graph.spec.edge_threshold},
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": [
            _json_node(graph, node, entry.token_text, clerps, node.id == target)
            for node in graph.nodes
        ],
        "links": [
            {
                "source": graph.nodes[int(s)].id,
                "target": graph.nodes[int(t)].id,
                "weight": float(w),
            }
            for s, t, w in zip(graph.sources, graph.targets, graph.weights, strict=True)
        ],
    }


_FEATURE_TYPES = {
    NodeType.FEATURE: "cross layer transcoder",  # the viewer's name for any transcoder latent
    NodeType.ERROR: "mlp reconstruction error",
    NodeType.EMBEDDING: "embedding",
    NodeType.LOGIT: "logit",
}


def _json_node(
    graph: GraphData,
    node: GraphNode,
    token_text: Any,
    clerps: dict[str, str],
    is_target: bool,
) -> dict[str, Any]:
    n_positions = len(graph.spec.tokens)
    if node.type is NodeType.FEATURE:
        assert node.ref is not None
        feature, layer, js_id = node.ref.index, str(node.layer), f"{node.layer}_{node.ref.index}-0"
    elif node.type is NodeType.ERROR:
        feature, layer, js_id = -1, str(node.layer), f"{node.id}-0"
    elif node.type is NodeType.EMBEDDING:
        feature, layer, js_id = node.position, "E", f"E_{node.token}-{node.position}"
    else:
        feature, layer, js_id = (
            node.token,
            str(graph.n_layers + 1),
            f"L_{node.token}-{node.position}",
        )
    clerp = clerps.get(node.id, "")
    if node.type is NodeType.LOGIT:
        clerp = f'Output "{token_text(node.token)}" (p={node.probability or 0.0:.3f})'
    return {
        "node_id": node.id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": node.position,
        "feature_type": _FEATURE_TYPES[node.type],
        "token_prob": node.probability or 0.0,
        "is_target_logit": is_target,
        "run_idx": 0,
        "reverse_ctx_idx": n_positions - 1 - node.position,
        "jsNodeId": js_id,
        "clerp": clerp,
        "influence": node.cumulative_influence,
        "activation": node.activation,
    }
