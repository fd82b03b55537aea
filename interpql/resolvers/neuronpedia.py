"""A node in Neuronpedia's feature shape (what its API answers for a feature), so that
front-ends and scripts written for Neuronpedia read interpql's nodes as they are."""

from __future__ import annotations

from typing import Any

from interpql.errors import invalid_argument
from interpql.loaders.sources.neuronpedia import parse_source_name, source_name
from interpql.resolvers import analysis, node_data
from interpql.resolvers.context import RequestContext
from interpql.specs import NodeRef

LOGITS = 10
ACTIVATIONS = 20


def node_of(ctx: RequestContext, model_id: str, source: str, index: int) -> NodeRef:
    """Neuronpedia's (modelId, source, index): `8-res-jb` is layer 8 of the set res-jb."""
    try:
        layer, kind = parse_source_name(source)
    except ValueError as exc:
        raise invalid_argument(str(exc)) from None
    return ctx.registry.resolve(NodeRef(model_id, kind, layer, index))


async def feature(ctx: RequestContext, node: NodeRef) -> dict[str, Any]:
    entry = ctx.registry.get(node.model)
    stats = await node_data.settled(node_data.statistics(ctx, node))
    examples = await node_data.settled(node_data.top_activations(ctx, node, ACTIVATIONS))
    explanations = await node_data.settled(node_data.explanations(ctx, node))
    shaped: dict[str, Any] = {
        "modelId": node.model,
        "source": source_name(node),
        "index": str(node.index),
        "density": None if stats is None else stats.density,
        "maxActApprox": None if stats is None else stats.max,
        "explanations": [
            {
                "description": e.text,
                "typeName": e.scorer or e.source,
                "explanationModelName": e.explainer,
                "score": e.score,
            }
            for e in explanations
        ],
        "activations": [
            {
                "tokens": list(e.tokens),
                "values": list(e.activations),
                "maxValue": e.max_activation,
                "maxValueTokenIndex": max(
                    range(len(e.activations)), key=e.activations.__getitem__, default=0
                ),
            }
            for e in examples.examples
        ],
        "top_logits": [],
        "bottom_logits": [],
    }
    kind = entry.kind(node.kind)
    if entry.backend is not None and kind.has_write_direction:
        scores = await analysis.node_scored_tokens(ctx, node, LOGITS)
        for key, found in (
            ("top_logits", scores.upvoted_output),
            ("bottom_logits", scores.downvoted_output),
        ):
            if found is not None:  # None for a head: Neuronpedia's lists stay empty
                shaped[key] = [{"token": entry.token_text(t), "value": v} for t, v in found]
    return shaped
