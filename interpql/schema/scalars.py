"""Custom scalars: Python types here, their GraphQL definitions in `SCALARS` (the schema's
scalar_map)."""

from __future__ import annotations

from typing import Any, NewType

import numpy as np
import strawberry
from strawberry.types.scalar import ScalarDefinition

FloatArray = NewType("FloatArray", object)
StringArray = NewType("StringArray", object)
IntArray = NewType("IntArray", object)
NeuronpediaFeature = NewType("NeuronpediaFeature", object)
NeuronpediaGraph = NewType("NeuronpediaGraph", object)


def _serialize_array(value: Any) -> Any:
    # One leaf for a whole tensor: graphql-core would otherwise visit every float.
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


SCALARS: dict[object, ScalarDefinition] = {
    FloatArray: strawberry.scalar(
        name="FloatArray",
        description=(
            "A (possibly nested) JSON array of floats, e.g. activations [token][node]; its shape "
            "is given next to it. One scalar rather than nested [Float] lists keeps large "
            "results fast."
        ),
        serialize=_serialize_array,
        parse_value=lambda value: value,
    ),
    IntArray: strawberry.scalar(
        name="IntArray",
        description=(
            "A (possibly nested) JSON array of integers, null where there is none, e.g. a "
            "column of token indices. One scalar rather than nested [Int] lists."
        ),
        serialize=_serialize_array,
        parse_value=lambda value: value,
    ),
    NeuronpediaGraph: strawberry.scalar(
        name="NeuronpediaGraph",
        description=(
            "A JSON object in the graph format circuit-tracer writes and Neuronpedia's graph "
            "viewer reads (schema_version 1): metadata {slug, scan, transcoder_list, "
            "prompt_tokens, prompt, node_threshold, schema_version}, qParams {pinnedIds, "
            "supernodes, linkType, clickedId, sg_pos}, nodes [{node_id, feature, layer, "
            "ctx_idx, feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, "
            "jsNodeId, clerp, influence (circuit-tracer's cumulative share: this node's and "
            "every more influential node's), activation}] and links [{source, target, weight}]."
        ),
        serialize=lambda value: value,
        parse_value=lambda value: value,
    ),
    NeuronpediaFeature: strawberry.scalar(
        name="NeuronpediaFeature",
        description=(
            "A JSON object in the shape Neuronpedia's API answers for a feature: modelId, "
            "source (<layer>-<dictionary>, e.g. 8-res-jb), index, density (the share of tokens "
            "where it is above 0, from its records' statistics), maxActApprox (its largest "
            "recorded activation), explanations [{description, typeName (the scorer), "
            "explanationModelName, score}], activations [{tokens, values, maxValue, "
            "maxValueTokenIndex}] (its top examples, highest first), top_logits and "
            "bottom_logits [{token, value}] (the logit lens of its write direction, d @ W_U, "
            "as scoredTokens)."
        ),
        serialize=lambda value: value,
        parse_value=lambda value: value,
    ),
    StringArray: strawberry.scalar(
        name="StringArray",
        description=(
            "A JSON array of strings, e.g. the tokens of a dataset example. One scalar rather "
            "than [String] keeps answers about thousands of nodes fast."
        ),
        # Tuples go out as they are: orjson writes them as arrays.
        serialize=lambda value: value if isinstance(value, list | tuple) else list(value),
        parse_value=lambda value: value,
    ),
}
