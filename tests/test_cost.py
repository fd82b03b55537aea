"""The cost estimate (schema/cost.py) of documents, computed here by hand: fields, list sizes
from their arguments or their parent's, fragments where they are spread, prompt tokens times
the passes they need, and generation step by step."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import FragmentDefinitionNode, OperationDefinitionNode, parse

from interpql.schema.build import build_schema
from interpql.schema.cost import UNKNOWN_LIST_SIZE, estimate_cost

SCHEMA = build_schema()._schema


def tokens(text: str) -> int:
    """A stand-in tokenizer: one token per character, capped at 64 (the context)."""
    return min(64, len(text))


def cost(
    document: str, variables: dict[str, Any] | None = None, generation_caches: bool = False
) -> int:
    parsed = parse(document)
    [operation] = [d for d in parsed.definitions if isinstance(d, OperationDefinitionNode)]
    fragments = {
        d.name.value: d for d in parsed.definitions if isinstance(d, FragmentDefinitionNode)
    }
    return estimate_cost(SCHEMA, operation, fragments, variables or {}, tokens, generation_caches)


def test_fields_and_lists() -> None:
    assert cost("{ models { name } }") == 1 + UNKNOWN_LIST_SIZE * 1
    # nodes: its ids' count; each node: id and topActivations (first: 3) x tokens.
    ids = ["m/mlp_neuron/0/1", "m/mlp_neuron/0/2"]
    assert cost(
        "query($i: [ID!]!) { nodes(ids: $i) { id topActivations(first: 3) { tokens } } }",
        {"i": ids},
    ) == 1 + 2 * (1 + (1 + 3 * 1))


def test_a_parents_size_counts_for_its_list_children() -> None:
    # topNodes(k: 4) { top { value } }: top has no size of its own, so k's 4 items.
    document = (
        '{ model(name: "m") { infer(input: {prompt: "abcde"}) { '
        "topNodes(group: WRITE_NORM, k: 4) { top { value } } } } }"
    )
    assert cost(document) == 1 + 1 + 5 + 1 + (1 + 4 * 1)


def test_backward_passes_cost_three_times_their_tokens() -> None:
    forward = '{ model(name: "m") { infer(input: {prompt: "abcdef"}) { loss } } }'
    backward = (
        '{ model(name: "m") { infer(input: {prompt: "abcdef"}) { '
        "topNodes(group: ACT_TIMES_GRAD, k: 1) { top { value } } } } }"
    )
    assert cost(forward) == 3 + 6
    assert cost(backward) == 1 + 1 + 3 * 6 + 1 + (1 + 1)


def test_a_node_table_runs_backward_and_has_24_rows_per_k() -> None:
    document = (
        '{ model(name: "m") { infer(input: {prompt: "abcdef"}) { '
        "nodeTable(k: 2) { rows { activation } } } } }"
    )
    # model, infer + 3 x 6 tokens, nodeTable, rows: 24 x 2 items of one field.
    assert cost(document) == 1 + (1 + 3 * 6) + 1 + (1 + 48 * 1)
    terms = '{ model(name: "m") { infer(input: {prompt: "abc"}) { directEffectTerms { value } } } }'
    assert cost(terms) == 1 + (1 + 3 * 3) + (1 + UNKNOWN_LIST_SIZE * 1)


def test_fragments_count_where_they_are_spread() -> None:
    document = (
        'query { model(name: "m") { a: infer(input: {prompt: "ab"}) { ...L } '
        'b: infer(input: {prompt: "abc"}) { ...L } } } fragment L on InferenceResult { loss }'
    )
    assert cost(document) == 1 + (1 + 2 + 1) + (1 + 3 + 1)


@pytest.mark.parametrize(("steps", "steered"), [(3, False), (5, True)])
def test_generation_runs_a_pass_per_new_token(steps: int, steered: bool) -> None:
    steering = ', steering: [{nodeId: "m/mlp_neuron/0/0", strength: 1}]' if steered else ""
    document = (
        f'{{ model(name: "m") {{ generate(input: {{prompt: "abcd", maxTokens: {steps}{steering}}}) '
        "{ prompt } } }"
    )
    rows = 2 if steered else 1
    passes = sum(4 + step for step in range(steps))  # step s runs the prompt and s new tokens
    assert cost(document) == 1 + 1 + rows * passes + 1
    # With a key-value cache: the prompt's 4 tokens, then the one token made at each step.
    assert cost(document, generation_caches=True) == 1 + 1 + rows * (4 + steps - 1) + 1


@pytest.mark.parametrize(
    ("cap", "latents", "logits"),
    [
        ("", 40 * 6, 10),
        (", maxFeatureNodes: 100", 100, 10),
        # A cap above the latents that can be active costs what they cost: 10^6 was refused
        # as too costly though its range allows it.
        (", maxFeatureNodes: 1000000", 40 * 6, 10),
        # Out of its range: priced at the range's end, so the resolver names the argument.
        (", maxLogits: 1000000", 40 * 6, 100),
    ],
)
def test_an_attribution_graph_costs_a_backward_pass_per_batch_of_targets(
    cap: str, latents: int, logits: int
) -> None:
    document = (
        f'{{ model(name: "m") {{ attributionGraph(input: {{prompt: "abcde", dictionary: "t"{cap}}}) '
        "{ id } } }"
    )
    tokens_with_bos = 6
    batches = -(-(latents + logits) // 32)  # latents and logits, 32 a pass
    assert cost(document) == 1 + 1 + 3 * tokens_with_bos * (1 + batches) + 1
