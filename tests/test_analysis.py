"""Transformer Debugger's analyses over GraphQL, against autograd on the plain-torch reference,
hand computations from the weights, and real ablations."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import torch

from interpql.backends.base import HookPoint, Location
from interpql.backends.tokenizer import gpt2_encoding
from tests.conftest import SMALL, CountingBackend, error_codes, graphql
from tests.reference import reference_forward

PROMPT = "When Mary and John went to the store, John gave a drink to"
TOKENS = gpt2_encoding().encode(PROMPT)
FINAL = frozenset({"final_ln"})
TARGET, DISTRACTOR = " Mary", " John"
LOSS = f'loss: {{kind: LOGIT_DIFF, targetTokens: ["{TARGET}"], distractorTokens: ["{DISTRACTOR}"]}}'


def state_of(backend: CountingBackend) -> dict[str, torch.Tensor]:
    """The served weights as a Transformer Debugger state dict (whatever the backend)."""
    return {k: v.detach().clone() for k, v in backend.state_dict().items()}


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    [target], [distractor] = gpt2_encoding().encode(TARGET), gpt2_encoding().encode(DISTRACTOR)
    return logits[-1, target] - logits[-1, distractor]


def reference_with_grads(state: dict[str, torch.Tensor], frozen: bool = True) -> dict[str, Any]:
    """Autograd on the reference: every MLP post-activation and the final residual stream,
    with their gradients of the logit difference (the final LayerNorm's scale held, as the
    default FROZEN convention does, unless `frozen` is False)."""
    state = dict(state)
    state["pos_embed.weight"] = state["pos_embed.weight"].clone().requires_grad_(True)
    kept: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        act.retain_grad()
        kept[(layer, name)] = act
        return act

    logits, _ = reference_forward(
        SMALL, state, TOKENS, edit=keep, frozen_norms=FINAL if frozen else frozenset()
    )
    loss = logit_diff(logits)
    loss.backward()
    return {"logits": logits.detach(), "loss": float(loss.detach()), "kept": kept}


async def infer(client: httpx.AsyncClient, fields: str, extra: str = "") -> dict[str, Any]:
    body = await graphql(
        client,
        f'query($p: String!) {{ model(name: "small") {{ infer(input: {{prompt: $p, {LOSS} {extra}}}) '
        f"{{ {fields} }} }} }}",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    return body["data"]["model"]["infer"]  # type: ignore[no-any-return]


def node_index(node_id: str) -> tuple[str, int, int]:
    _, kind, layer, index = node_id.split("/")
    return kind, int(layer), int(index)


async def test_objective_is_the_logit_difference(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    reference = reference_with_grads(state_of(small_backend))
    result = await infer(client, "objective loss")
    assert result["objective"] == pytest.approx(reference["loss"], abs=1e-5)


async def test_act_times_grad_matches_autograd(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    reference = reference_with_grads(state_of(small_backend))
    result = await infer(
        client,
        "at: topNodes(group: ACT_TIMES_GRAD, k: 8, tokenIndex: 5) { top { node { id } value } "
        "bottom { node { id } value } } "
        "summed: topNodes(group: ACT_TIMES_GRAD, k: 8) { top { node { id } value } tokenSums }",
    )
    checked = 0
    for ranking, token in ((result["at"], 5), (result["summed"], None)):
        for item in ranking["top"] + ranking.get("bottom", []):
            kind, layer, index = node_index(item["node"]["id"])
            if kind != "mlp_neuron":
                continue
            post = reference["kept"][(layer, "mlp_post")]
            per_token = (post * post.grad).detach()[:, index]
            expected = per_token[token] if token is not None else per_token.sum()
            assert item["value"] == pytest.approx(float(expected), abs=1e-5, rel=1e-4)
            checked += 1
    assert checked >= 8
    values = [item["value"] for item in result["at"]["top"]]
    assert values == sorted(values, reverse=True)


async def test_act_times_grad_estimates_real_ablations(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    """Zeroing a neuron changes the loss by about -act x grad; within 25% (or 2e-3) for the
    strongest few neurons of this random model."""
    state = state_of(small_backend)
    base = reference_with_grads(state)["loss"]
    result = await infer(
        client,
        "topNodes(group: ACT_TIMES_GRAD, k: 10, tokenIndex: 9) { top { node { id } value } }",
    )
    tried = 0
    for item in result["topNodes"]["top"]:
        kind, layer, index = node_index(item["node"]["id"])
        if kind != "mlp_neuron" or tried == 4:
            continue
        logits, _ = reference_forward(SMALL, state, TOKENS, (layer, 9, index, 0.0))
        actual = float(logit_diff(logits).detach()) - base
        assert actual == pytest.approx(-item["value"], rel=0.25, abs=2e-3)
        tried += 1
    assert tried == 4


async def test_direct_effect_and_write_norm_by_hand(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    state = state_of(small_backend)
    reference = reference_with_grads(state)
    final_grad = reference["kept"][(SMALL.n_layers - 1, "resid_final")].grad  # [token, d_model]
    attention: dict[tuple[int, str], torch.Tensor] = {}
    reference_forward(SMALL, state, TOKENS, attention=attention)
    result = await infer(
        client,
        "direct: topNodes(group: DIRECT_EFFECT, k: 6, tokenIndex: 7) { top { node { id } value } } "
        "norm: topNodes(group: WRITE_NORM, k: 6, tokenIndex: 7) { top { node { id } value } }",
    )
    for group in ("direct", "norm"):
        for item in result[group]["top"]:
            kind, layer, index = node_index(item["node"]["id"])
            p = f"xf_layers.{layer}."
            if kind == "mlp_neuron":
                act = reference["kept"][(layer, "mlp_post")].detach()[7, index]
                w_out = state[p + "mlp.out_layer.weight"][:, index].double()  # [d_model]
                write = act * w_out
            elif kind == "token_embedding":
                write = (
                    state["tok_embed.weight"][TOKENS[7]] + state["pos_embed.weight"][7]
                ).double()
            else:
                assert kind == "attention_head"
                # The head's output at token 7, from the reference's z.
                z = attention[(layer, "z")][7, index]
                w_o = state[p + "attn.out_proj.weight"][:, index * 16 : (index + 1) * 16].double()
                write = w_o @ z
            expected = write @ final_grad[7] if group == "direct" else write.norm()
            assert item["value"] == pytest.approx(float(expected), abs=1e-5, rel=1e-4)


def _point(layer: int, location: str) -> HookPoint:
    return HookPoint(layer, Location(location))


async def test_token_pair_attribution_by_hand(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    result = await infer(
        client,
        'activations(nodeIds: ["small/attention_head/1/2"]) { attentionPattern tokenPairAttribution }',
    )
    [head] = result["activations"]
    state = state_of(small_backend)
    attention: dict[tuple[int, str], torch.Tensor] = {}
    reference_forward(SMALL, state, TOKENS, attention=attention)
    probs = attention[(1, "probs")][:, 2, :]  # [query, key]
    v = attention[(1, "v")][:, 2, :].detach()  # [key, d_head]
    w_o = state["xf_layers.1.attn.out_proj.weight"][:, 32:48].double()  # [d_model, d_head]
    expected = probs * (v @ w_o.T).norm(dim=-1)[None, :]
    np.testing.assert_allclose(head["tokenPairAttribution"], expected, atol=1e-6)
    np.testing.assert_allclose(np.sum(head["attentionPattern"], axis=1), 1.0, atol=1e-5)


async def test_scored_tokens_are_matrix_products(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    body = await graphql(
        client,
        '{ node(id: "small/mlp_neuron/2/11") { scoredTokens(k: 5) { '
        "upvotedOutputTokens { token { id } value } downvotedOutputTokens { token { id } value } "
        "upvotingInputTokens { token { id } value } } } }",
    )
    scored = body["data"]["node"]["scoredTokens"]
    state = state_of(small_backend)
    logits = state["unembed.weight"] @ state["xf_layers.2.mlp.out_layer.weight"][:, 11]  # [vocab]
    inputs = state["tok_embed.weight"] @ state["xf_layers.2.mlp.in_layer.weight"][11]  # [vocab]
    for field, values, largest in (
        ("upvotedOutputTokens", logits, True),
        ("downvotedOutputTokens", logits, False),
        ("upvotingInputTokens", inputs, True),
    ):
        expected = torch.topk(values, 5, largest=largest)
        assert [t["token"]["id"] for t in scored[field]] == expected.indices.tolist()
        np.testing.assert_allclose([t["value"] for t in scored[field]], expected.values, rtol=1e-5)


async def test_scored_token_lists_a_kind_has_no_meaning_for_are_null(
    client: httpx.AsyncClient,
) -> None:
    """A head writes a subspace (no output tokens); only a head has key tokens."""
    fields = (
        "scoredTokens(k: 2) { upvotedOutputTokens { value } downvotedOutputTokens { value } "
        "upvotingInputTokens { value } upvotingKeyTokens { value } }"
    )
    body = await graphql(
        client,
        f'{{ head: node(id: "small/attention_head/1/2") {{ {fields} }} '
        f'neuron: node(id: "small/mlp_neuron/2/11") {{ {fields} }} }}',
    )
    head, neuron = body["data"]["head"]["scoredTokens"], body["data"]["neuron"]["scoredTokens"]
    assert head["upvotedOutputTokens"] is None and head["downvotedOutputTokens"] is None
    assert len(head["upvotingInputTokens"]) == len(head["upvotingKeyTokens"]) == 2
    assert neuron["upvotingKeyTokens"] is None
    assert len(neuron["upvotedOutputTokens"]) == len(neuron["downvotedOutputTokens"]) == 2


async def test_ablation_matches_reference(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    result = await infer(
        client,
        "objective loss",
        extra='ablations: [{nodeId: "small/mlp_neuron/1/30", tokenIndex: 4, value: 2.5}]',
    )
    logits, _ = reference_forward(SMALL, state_of(small_backend), TOKENS, (1, 4, 30, 2.5))
    assert result["objective"] == pytest.approx(float(logit_diff(logits)), abs=1e-5)


async def test_batched_equals_separate(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    fields = "objective loss topNodes(group: ACT_TIMES_GRAD, k: 5) { top { node { id } value } }"
    inputs = [
        f'{{prompt: "{PROMPT}", {LOSS}}}',
        f'{{prompt: "John and Mary", {LOSS}}}',
        f'{{prompt: "{PROMPT}", {LOSS}, ablations: [{{nodeId: "small/attention_head/0/1", value: 0}}]}}',
    ]
    small_backend.calls.clear()
    batched = await graphql(
        client,
        f'{{ model(name: "small") {{ inferBatch(inputs: [{", ".join(inputs)}]) {{ {fields} batchSize }} }} }}',
    )
    assert len(small_backend.calls) == 1 and small_backend.calls[0].backward is not None
    results = batched["data"]["model"]["inferBatch"]
    assert [r["batchSize"] for r in results] == [3, 3, 3]
    for one, batched_result in zip(inputs, results, strict=True):
        alone = await graphql(
            client, f'{{ model(name: "small") {{ infer(input: {one}) {{ {fields} }} }} }}'
        )
        single = alone["data"]["model"]["infer"]
        assert batched_result["objective"] == pytest.approx(single["objective"], abs=1e-5)
        assert batched_result["loss"] == pytest.approx(single["loss"], abs=1e-5)
        for a, b in zip(batched_result["topNodes"]["top"], single["topNodes"]["top"], strict=True):
            assert a["node"]["id"] == b["node"]["id"]
            assert a["value"] == pytest.approx(b["value"], abs=1e-5)


async def test_backward_only_when_needed(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    small_backend.calls.clear()
    await infer(client, "objective topNodes(group: WRITE_NORM) { top { value } }")
    assert [c.backward for c in small_backend.calls] == [None]
    small_backend.calls.clear()
    # Everything of a Transformer Debugger request: one forward and one backward pass.
    await infer(
        client,
        "loss objective topPredictions(k: 5) { token { text } } bottomPredictions(k: 5) { logit } "
        "a: topNodes(group: ACTIVATION) { top { value } } w: topNodes(group: WRITE_NORM) { top { value } } "
        "d: topNodes(group: DIRECT_EFFECT) { top { value } tokenSums } "
        "g: topNodes(group: ACT_TIMES_GRAD) { top { value } } "
        'activations(nodeIds: ["small/attention_head/2/0"]) { tokenPairAttribution }',
    )
    assert len(small_backend.calls) == 1 and small_backend.calls[0].backward is not None


@pytest.mark.parametrize(
    ("loss", "code"),
    [
        (
            '{kind: LOGIT_DIFF, targetTokens: [" Mary Ann"], distractorTokens: [" John"]}',
            "INVALID_TOKEN",
        ),
        ("{kind: LOGIT_DIFF, targetTokenIds: [60000], distractorTokenIds: [1]}", "INVALID_TOKEN"),
        ('{kind: LOGIT_DIFF, targetTokens: [" Mary"]}', "INVALID_ARGUMENT"),
        ("{kind: PROBS}", "INVALID_ARGUMENT"),
    ],
)
async def test_bad_losses(client: httpx.AsyncClient, loss: str, code: str) -> None:
    body = await graphql(
        client,
        f'{{ model(name: "small") {{ infer(input: {{prompt: "hi", loss: {loss}}}) {{ objective }} }} }}',
    )
    assert error_codes(body) == [code]


# --- Tracing ----------------------------------------------------------------------------------


def traced_reference(state: dict[str, torch.Tensor], layer: int, token: int, neuron: int) -> dict:
    """Autograd of one MLP post-activation on the reference."""
    state = dict(state)
    state["pos_embed.weight"] = state["pos_embed.weight"].clone().requires_grad_(True)
    kept: dict[tuple[int, str], torch.Tensor] = {}

    def keep(at: int, name: str, act: torch.Tensor) -> torch.Tensor:
        act.retain_grad()
        kept[(at, name)] = act
        return act

    # FROZEN holds the scale of the norm the traced neuron reads through, as for a loss.
    frozen = frozenset({f"xf_layers.{layer}.ln_2"})
    reference_forward(SMALL, state, TOKENS, edit=keep, frozen_norms=frozen)
    kept[(layer, "mlp_post")][token, neuron].backward()
    return kept


async def test_trace_from_a_neuron_matches_autograd(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    kept = traced_reference(state_of(small_backend), 2, 8, 13)
    result = await infer(
        client,
        "topNodes(group: ACT_TIMES_GRAD, k: 20) { top { node { id } value } bottom { node { id } value } } "
        "direct: topNodes(group: DIRECT_EFFECT, k: 500) { top { node { id } value } }",
        extra='trace: {upstreamNodeId: "small/mlp_neuron/2/8", tokenIndex: 8}'.replace(
            "2/8", "2/13"
        ),
    )
    checked = 0
    for item in result["topNodes"]["top"] + result["topNodes"]["bottom"]:
        kind, layer, index = node_index(item["node"]["id"])
        if kind == "mlp_neuron" and layer < 2:
            post = kept[(layer, "mlp_post")]
            expected = (post * post.grad).detach()[:, index].sum()
            assert item["value"] == pytest.approx(float(expected), abs=1e-5, rel=1e-4)
            checked += 1
    assert checked >= 5
    # Direct effects are read where the traced neuron reads (layer 2's resid_mid): nothing
    # written after that point has one.
    for item in result["direct"]["top"]:
        kind, layer, _ = node_index(item["node"]["id"])
        if layer > 2 or (layer == 2 and kind == "mlp_neuron"):
            assert item["value"] == 0.0


async def test_attention_traces(client: httpx.AsyncClient) -> None:
    def trace(kind: str, extra: str = "", query: int = 9) -> str:
        return (
            f'trace: {{upstreamNodeId: "small/attention_head/2/1", tokenIndex: {query}, '
            f"keyTokenIndex: 4, attentionTraceType: {kind} {extra}}}"
        )

    fields = "topNodes(group: ACT_TIMES_GRAD, k: 400) { top { node { id } value } }"
    results = {}
    for kind in ("Q", "K", "QK"):
        ranking = (await infer(client, fields, extra=trace(kind)))["topNodes"]["top"]
        results[kind] = {item["node"]["id"]: item["value"] for item in ranking}
    # The score's gradient is the sum of its query and key paths.
    for node_id, value in results["QK"].items():
        assert value == pytest.approx(results["Q"][node_id] + results["K"][node_id], abs=1e-5)
    assert any(abs(v) > 1e-6 for v in results["Q"].values())
    # Without a downstream node, V projects on the loss's gradient, which only the last token's
    # write reaches in the last layer.
    last = len(TOKENS) - 1
    for extra in ("", ', downstreamNodeId: "small/residual_channel/2/3"'):
        ranking = (await infer(client, fields, extra=trace("V", extra, last)))["topNodes"]["top"]
        values = {item["node"]["id"]: item["value"] for item in ranking}
        assert any(abs(v) > 1e-8 for v in values.values())
        # Nothing at or after the traced head's layer feeds its value vectors.
        assert all(v == 0.0 for n, v in values.items() if node_index(n)[1] >= 2)


@pytest.mark.parametrize(
    "trace",
    [
        '{upstreamNodeId: "small/attention_head/2/1", tokenIndex: 9}',
        '{upstreamNodeId: "small/attention_head/2/1", tokenIndex: 3, keyTokenIndex: 5, attentionTraceType: Q}',
        '{upstreamNodeId: "small/mlp_neuron/2/1", tokenIndex: 99}',
        '{upstreamNodeId: "small/mlp_neuron/2/1", tokenIndex: 3, attentionTraceType: V}',
        # Options a trace of this kind would ignore.
        '{upstreamNodeId: "small/mlp_neuron/2/1", tokenIndex: 3, keyTokenIndex: 1}',
        '{upstreamNodeId: "small/attention_head/1/1", tokenIndex: 3, keyTokenIndex: 1, attentionTraceType: Q, downstreamNodeId: "small/mlp_neuron/2/1"}',
    ],
)
async def test_bad_traces(client: httpx.AsyncClient, trace: str) -> None:
    body = await graphql(
        client,
        f'{{ model(name: "small") {{ infer(input: {{prompt: "{PROMPT}", trace: {trace}}}) '
        "{ topNodes(group: ACT_TIMES_GRAD) { top { value } } } } }",
    )
    assert error_codes(body) == ["INVALID_ARGUMENT"], body


async def test_hide_early_layers_when_ablating(client: httpx.AsyncClient) -> None:
    ablation = 'ablations: [{nodeId: "small/mlp_neuron/1/3", value: 0}]'
    fields = "topNodes(group: ACTIVATION, k: 1000) { top { node { layerIndex } } }"
    shown = await infer(client, fields, extra=ablation)
    hidden = await infer(client, fields, extra=ablation + ", hideEarlyLayersWhenAblating: true")
    assert {n["node"]["layerIndex"] for n in shown["topNodes"]["top"]} == {0, 1, 2}
    assert {n["node"]["layerIndex"] for n in hidden["topNodes"]["top"]} == {1, 2}


async def test_packed_patterns_are_the_lower_triangles(client: httpx.AsyncClient) -> None:
    import base64

    result = await infer(
        client,
        'activations(nodeIds: ["small/attention_head/1/2"]) { attentionPattern '
        "tokenPairAttribution packedAttentionPattern(dtype: FLOAT32) { dtype shape base64 } "
        "packedTokenPairAttribution { dtype shape base64 } }",
    )
    [head] = result["activations"]
    n = len(TOKENS)
    for full, packed, tolerance in (
        ("attentionPattern", "packedAttentionPattern", 0),
        ("tokenPairAttribution", "packedTokenPairAttribution", 1e-3),  # float16
    ):
        found = head[packed]
        assert found["shape"] == [n * (n + 1) // 2]
        dtype = np.float32 if found["dtype"] == "FLOAT32" else np.float16
        values = np.frombuffer(base64.b64decode(found["base64"]), dtype=dtype)
        square = np.asarray(head[full])
        expected = [square[q, k] for q in range(n) for k in range(q + 1)]
        np.testing.assert_allclose(values, expected, atol=tolerance, rtol=tolerance)
        assert np.all(np.triu(square, 1) == 0)  # nothing is lost above the diagonal
