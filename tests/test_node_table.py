"""Transformer Debugger's node table over GraphQL, against tests/tdb_reference.py: a float64
computation of its element-level definitions from the weights, independent of interpql."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from interpql.backends.base import AutoencoderInput, HookPoint, Location
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.backends.tokenizer import gpt2_encoding
from interpql.bootstrap import ServeOptions, build_services
from interpql.loaders.registry import ModelEntry
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import SMALL, CountingBackend, graphql
from tests.reference import reference_forward
from tests.tdb_reference import Reference, tdb_reference
from tests.test_analysis import (
    DISTRACTOR,
    LOSS,
    PROMPT,
    TARGET,
    TOKENS,
    infer,
    logit_diff,
    state_of,
)
from tests.test_autoencoder_latents import random_autoencoder

GROUPS = ("write_norm", "act_times_grad", "direct_effect", "activation")
FIELDS = {
    "write_norm": "writeNorm",
    "act_times_grad": "actTimesGrad",
    "direct_effect": "directEffect",
    "activation": "activation",
}
ROW = "node { id } tokenIndex keyTokenIndex activation writeNorm directEffect actTimesGrad"
K = 5


def reference(backend: CountingBackend, frozen: bool) -> Reference:
    [target], [distractor] = gpt2_encoding().encode(TARGET), gpt2_encoding().encode(DISTRACTOR)
    return tdb_reference(SMALL, state_of(backend), TOKENS, [target], [distractor], frozen=frozen)


def element_values(ref: Reference) -> dict[str, list[tuple[tuple[Any, ...], dict[str, float]]]]:
    """Every element of each kind, in element order, with its four values."""
    n = len(TOKENS)
    kinds: dict[str, list[tuple[tuple[Any, ...], dict[str, float]]]] = {
        "token_embedding": [
            (("token_embedding", 0, t, 0, None), {g: float(ref.embedding[g][t]) for g in GROUPS})
            for t in range(n)
        ],
        "attention_head": [],
        "mlp_neuron": [],
    }
    for layer in range(SMALL.n_layers):
        for q in range(n):
            for k in range(q + 1):
                for h in range(SMALL.n_heads):
                    values = {g: float(ref.heads[g][layer, q, k, h]) for g in GROUPS}
                    kinds["attention_head"].append((("attention_head", layer, q, h, k), values))
    for layer in range(SMALL.n_layers):
        for t in range(n):
            for i in range(SMALL.d_mlp):
                values = {g: float(ref.neurons[g][layer, t, i]) for g in GROUPS}
                kinds["mlp_neuron"].append((("mlp_neuron", layer, t, i, None), values))
    return kinds


def expected_rows(ref: Reference, k: int) -> list[tuple[Any, ...]]:
    """The table's rows by its rule: per group and kind the k highest and k lowest (ties by
    element order), each group's lists highest first, the union in order."""
    kinds = element_values(ref)
    rows: list[tuple[Any, ...]] = []
    for group in GROUPS:
        for largest in (True, False):
            picked = []
            for elements in kinds.values():
                sign = -1 if largest else 1
                ranked = sorted(
                    range(len(elements)), key=lambda i: (sign * elements[i][1][group], i)
                )
                picked += [elements[i] for i in ranked[:k]]
            for element, _ in sorted(picked, key=lambda p: -p[1][group]):
                if element not in rows:
                    rows.append(element)
    return rows


def served_element(row: dict[str, Any]) -> tuple[Any, ...]:
    _, kind, layer, index = row["node"]["id"].split("/")
    return (kind, int(layer), row["tokenIndex"], int(index), row["keyTokenIndex"])


@pytest.mark.parametrize("convention", ["FROZEN", "LIVE"])
async def test_every_group_of_every_row_matches_the_reference(
    client: httpx.AsyncClient, small_backend: CountingBackend, convention: str
) -> None:
    ref = reference(small_backend, frozen=convention == "FROZEN")
    result = await infer(
        client, f"nodeTable(k: {K}) {{ rows {{ {ROW} }} }}", extra=f"layerNormScale: {convention}"
    )
    rows = result["nodeTable"]["rows"]
    expected = {
        element: values for kind in element_values(ref).values() for element, values in kind
    }
    for row in rows:
        values = expected[served_element(row)]
        for group in GROUPS:
            assert row[FIELDS[group]] == pytest.approx(values[group], abs=1e-5), (row, group)
    assert [served_element(r) for r in rows] == expected_rows(ref, K)


async def test_token_display_sums_every_layer(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    ref = reference(small_backend, frozen=True)
    result = await infer(
        client, "nodeTable(k: 1) { tokenSums { embedding mlp attentionFrom attentionTo } }"
    )
    sums = result["nodeTable"]["tokenSums"]
    heads = ref.heads["act_times_grad"].sum(dim=(0, 3))  # [query, key]
    expected = {
        "embedding": ref.embedding["act_times_grad"],
        "mlp": ref.neurons["act_times_grad"].sum(dim=(0, 2)),
        "attentionFrom": heads.sum(dim=1),
        "attentionTo": heads.sum(dim=0),
    }
    for name, values in expected.items():
        np.testing.assert_allclose(sums[name], values.numpy(), atol=1e-5, err_msg=name)


def excluded_tokens() -> set[int]:
    """Transformer Debugger's least common GPT-2 tokens, from the shipped list: checked here
    against a few of its strings, encoded independently."""
    from interpql.loaders.table_tokens import least_common_gpt2_tokens

    ids = set(least_common_gpt2_tokens())
    assert len(ids) == 596
    for text in (" Tradable", "galitarian", " antioxid", "66666666", " Cosponsors"):
        [token] = gpt2_encoding().encode(text)
        assert token in ids, text
    return ids


async def test_scored_tokens_of_each_row_kind(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    state = {k: v.double() for k, v in state_of(small_backend).items()}
    ref = reference(small_backend, frozen=True)
    scored = "{ token { id } value }"
    result = await infer(
        client,
        f"nodeTable(k: 3, scoredTokens: 6) {{ rows {{ {ROW} upvotedOutputTokens {scored} "
        f"downvotedOutputTokens {scored} upvotingInputTokens {scored} attendedToTokens {{ tokenIndex }} }} }}",
    )
    excluded = sorted(excluded_tokens())
    gained = state["unembed.weight"] * state["final_ln.weight"]  # [vocab, d_model]
    attention: dict[tuple[int, str], torch.Tensor] = {}
    reference_forward(SMALL, state_of(small_backend), TOKENS, attention=attention)
    seen = set()
    for row in result["nodeTable"]["rows"]:
        kind, layer, t, index, key = served_element(row)
        if kind in seen:
            continue
        seen.add(kind)
        p = f"xf_layers.{layer}."
        if kind == "token_embedding":
            write = state["tok_embed.weight"][TOKENS[t]] + state["pos_embed.weight"][t]
        elif kind == "mlp_neuron":
            write = (
                ref.neurons["activation"][layer, t, index]
                * state[p + "mlp.out_layer.weight"][:, index]
            )
        else:
            w_o = state[p + "attn.out_proj.weight"][
                :, index * 16 : (index + 1) * 16
            ]  # [d_model, d_head]
            value = attention[(layer, "v")][key, index].detach()
            write = ref.heads["activation"][layer, t, key, index] * (w_o @ value)
        logits = gained @ write
        logits = logits - logits.mean()
        for field, largest in (("upvotedOutputTokens", True), ("downvotedOutputTokens", False)):
            masked = logits.clone()
            masked[excluded] = -np.inf if largest else np.inf
            top = torch.topk(masked, 6, largest=largest)
            assert [s["token"]["id"] for s in row[field]] == top.indices.tolist(), (kind, field)
            np.testing.assert_allclose([s["value"] for s in row[field]], top.values, atol=1e-6)
        if kind == "mlp_neuron":
            read = state[p + "ln_2.weight"] * state[p + "mlp.in_layer.weight"][index]
            read = (read - read.mean()) / ref.mid_scales[layer, t]
            inputs = state["tok_embed.weight"] @ read
            inputs[excluded] = -np.inf
            top = torch.topk(inputs, 6)
            assert [s["token"]["id"] for s in row["upvotingInputTokens"]] == top.indices.tolist()
            np.testing.assert_allclose(
                [s["value"] for s in row["upvotingInputTokens"]], top.values, rtol=1e-5
            )
        else:
            assert row["upvotingInputTokens"] is None
        assert row["attendedToTokens"] is None  # heads and neurons: only attention latents
    assert seen == {"token_embedding", "mlp_neuron", "attention_head"}


async def test_act_times_grad_is_the_finite_difference_of_the_loss(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    """Under FROZEN, with the final LayerNorm's scale fixed at its forward value: central
    differences of the reference's loss, for the strongest elements of every kind."""
    from tests.tdb_reference import logit_difference

    ref = reference(small_backend, frozen=True)
    [target], [distractor] = gpt2_encoding().encode(TARGET), gpt2_encoding().encode(DISTRACTOR)
    state = state_of(small_backend)
    result = await infer(client, f"nodeTable(k: 3) {{ rows {{ {ROW} }} }}")
    checked: dict[str, int] = {}
    delta = 1e-4
    for row in result["nodeTable"]["rows"]:
        kind, layer, t, index, key = served_element(row)
        if checked.get(kind, 0) == 4 or abs(row["actTimesGrad"]) < 1e-4:
            continue
        if kind == "token_embedding":
            nudge, scale = ("embedding", t), 1.0  # e . dL/de directly
        elif kind == "mlp_neuron":
            nudge, scale = ("post", layer, t, index), row["activation"]
        else:
            nudge, scale = ("probs", layer, t, key, index), row["activation"]

        up, down = (
            logit_difference(
                SMALL, state, TOKENS, [target], [distractor], ref.final_scale, nudge, d
            )
            for d in (delta, -delta)
        )
        slope = (up - down) / (2 * delta)
        assert row["actTimesGrad"] == pytest.approx(scale * slope, abs=2e-6, rel=1e-4), row
        checked[kind] = checked.get(kind, 0) + 1
    assert checked == {"token_embedding": 4, "mlp_neuron": 4, "attention_head": 4}


# --- decomposition: direct effects add up to the loss ------------------------------------------

DEMO_PROMPT = (
    "def check(x):\n    if x > 3:\n        return True\n    return False\n\nok = check(5) =="
)
COMPONENTS = [
    ("NEURON", "HEAD"),
    ("AUTOENCODER_LATENT", "AUTOENCODER_LATENT"),
    ("NEURON", "AUTOENCODER_LATENT"),
]


def with_dictionaries_everywhere() -> NativeGPT2Backend:
    """SMALL with a dictionary on both sides of every layer (the MLP's read from its neurons,
    and in the last layer from its output)."""
    backend = NativeGPT2Backend(random_model(SMALL, seed=1))
    for layer in range(SMALL.n_layers):
        mlp_input = AutoencoderInput.MLP_POST_ACT if layer < 2 else AutoencoderInput.RESID_DELTA_MLP
        width = SMALL.d_mlp if layer < 2 else SMALL.d_model
        backend.attach_autoencoder(layer, mlp_input, random_autoencoder(width, 64, seed=layer))
        backend.attach_autoencoder(
            layer,
            AutoencoderInput.RESID_DELTA_ATTN,
            random_autoencoder(SMALL.d_model, 40, 10 + layer),
        )
    return backend


@pytest.fixture(scope="module")
async def wide_client() -> AsyncIterator[httpx.AsyncClient]:
    """The demo and SMALL with dictionaries everywhere; rankings as long as every node."""
    services = build_services(
        ServeOptions(
            explanation_store=":memory:", settings=Settings(max_top_k=10_000, cached_runs=0)
        )
    )
    services.registry.add(
        ModelEntry(
            "dictionaries",
            SMALL.architecture,
            with_dictionaries_everywhere(),
            "native-gpt2",
            "cpu",
            "float32",
        )
    )
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client
    services.registry.close()


async def decomposition(
    client: httpx.AsyncClient,
    model: str,
    prompt: str,
    target: str,
    distractor: str,
    mlp: str,
    attention: str,
    convention: str = "FROZEN",
) -> tuple[float, float, dict[str, Any]]:
    """(objective, sum of every node's direct effect and every term at the last token, body)."""
    n = len(gpt2_encoding().encode(prompt))
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "{model}") {{ infer(input: {{prompt: $p,
          mlpComponent: {mlp}, attentionComponent: {attention}, layerNormScale: {convention},
          loss: {{kind: LOGIT_DIFF, targetTokens: ["{target}"], distractorTokens: ["{distractor}"]}}}}) {{
            objective
            topNodes(group: DIRECT_EFFECT, k: 10000, tokenIndex: {n - 1}) {{ top {{ node {{ id }} value }} }}
            directEffectTerms(tokenIndex: {n - 1}) {{ name layerIndex value }} }} }} }}""",
        {"p": prompt},
    )
    assert "errors" not in body, body
    found = body["data"]["model"]["infer"]
    total = sum(item["value"] for item in found["topNodes"]["top"])
    total += sum(term["value"] for term in found["directEffectTerms"])
    return found["objective"], total, found


@pytest.mark.parametrize(("mlp", "attention"), COMPONENTS)
async def test_direct_effects_add_up_to_the_logit_difference(
    wide_client: httpx.AsyncClient, mlp: str, attention: str
) -> None:
    for model, prompt, target, distractor in (
        ("dictionaries", PROMPT, TARGET, DISTRACTOR),
        ("tiny-stdlib", DEMO_PROMPT, " True", " False"),
    ):
        objective, total, found = await decomposition(
            wide_client, model, prompt, target, distractor, mlp, attention
        )
        kinds = {item["node"]["id"].split("/")[1] for item in found["topNodes"]["top"]}
        names = {term["name"] for term in found["directEffectTerms"]}
        assert "token_embedding" in kinds and "final LayerNorm bias" in names
        if mlp == "AUTOENCODER_LATENT":
            assert {"dictionary bias", "dictionary error"} <= names
        assert total == pytest.approx(objective, abs=1e-5), (model, mlp, attention)
        assert abs(objective) > 1e-3  # a decomposition of something


async def test_live_direct_effects_add_up_to_nothing(wide_client: httpx.AsyncClient) -> None:
    """LayerNorm is scale-invariant: differentiated through its scale, the writers' direct
    effects cancel, which is why FROZEN is the default."""
    objective, total, found = await decomposition(
        wide_client, "tiny-stdlib", DEMO_PROMPT, " True", " False", "NEURON", "HEAD", "LIVE"
    )
    final_bias = sum(
        t["value"] for t in found["directEffectTerms"] if t["name"] == "final LayerNorm bias"
    )
    assert abs(total - final_bias) < 1e-3 < abs(objective)


async def test_attention_latents_name_the_tokens_they_attend_to(
    wide_client: httpx.AsyncClient,
) -> None:
    """Per key token, (sum over heads of p v_k W_O) . the latent's encoder row; the top 3."""
    body = await graphql(
        wide_client,
        f"""query($p: String!) {{ model(name: "dictionaries") {{ infer(input: {{prompt: $p,
          attentionComponent: AUTOENCODER_LATENT, {LOSS}}}) {{
            nodeTable(k: 4) {{ rows {{ {ROW} attendedToTokens {{ tokenIndex value }} }} }} }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    backend = with_dictionaries_everywhere()
    state = {k: v.detach() for k, v in backend.model.state_dict().items()}
    attention: dict[tuple[int, str], torch.Tensor] = {}
    reference_forward(SMALL, state, TOKENS, attention=attention)
    checked = 0
    for row in body["data"]["model"]["infer"]["nodeTable"]["rows"]:
        kind, layer, q, index, _ = served_element(row)
        if kind != "attention_autoencoder_latent":
            assert row["attendedToTokens"] is None
            continue
        if row["activation"] == 0:
            assert row["attendedToTokens"] is None
            continue
        ae = backend.dictionaries[
            HookPoint(layer, Location.LATENTS, "attention_autoencoder_latent")
        ].dictionary
        w_o = state[f"xf_layers.{layer}.attn.out_proj.weight"].double()  # [d_model, head x d_head]
        probs = attention[(layer, "probs")][q]  # [head, key]
        values = attention[(layer, "v")].detach()  # [key, head, d_head]
        weighted = (probs.T[:, :, None] * values).reshape(len(TOKENS), -1)  # [key, head x d_head]
        per_key = weighted @ w_o.T  # [key, d_model]
        attribution = per_key @ ae.encoder.weight[index].double()  # type: ignore[attr-defined]
        top = torch.topk(attribution, 3)
        assert [a["tokenIndex"] for a in row["attendedToTokens"]] == top.indices.tolist()
        np.testing.assert_allclose(
            [a["value"] for a in row["attendedToTokens"]], top.values, rtol=1e-4, atol=1e-6
        )
        checked += 1
    assert checked >= 3


async def test_an_ablated_embedding_removes_the_token(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    """Setting the embedding node to 0 at a token is running without that token's embedding."""
    state = state_of(small_backend)

    def without_token_3(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if name == "embedding":
            act = act.clone()
            act[3] = 0.0
        return act

    logits, _ = reference_forward(SMALL, state, TOKENS, edit=without_token_3)
    result = await infer(
        client,
        "objective",
        extra='ablations: [{nodeId: "small/token_embedding/0/0", tokenIndex: 3, value: 0}]',
    )
    assert result["objective"] == pytest.approx(float(logit_diff(logits)), abs=1e-5)
    clean = await infer(client, "objective")
    assert abs(clean["objective"] - result["objective"]) > 1e-3


async def test_hiding_early_layers_leaves_them_out_of_the_table(client: httpx.AsyncClient) -> None:
    result = await infer(
        client,
        f"nodeTable(k: 4) {{ rows {{ {ROW} }} }}",
        extra='hideEarlyLayersWhenAblating: true, ablations: [{nodeId: "small/mlp_neuron/1/3"}]',
    )
    rows = result["nodeTable"]["rows"]
    layers = {(r["node"]["id"].split("/")[1], int(r["node"]["id"].split("/")[2])) for r in rows}
    assert layers and all(layer >= 1 and kind != "token_embedding" for kind, layer in layers)
    shown = await infer(
        client,
        f"nodeTable(k: 4) {{ rows {{ {ROW} }} }}",
        extra='ablations: [{nodeId: "small/mlp_neuron/1/3"}]',
    )
    assert any(
        r["node"]["id"].startswith("small/token_embedding") for r in shown["nodeTable"]["rows"]
    )


async def test_the_columns_hold_the_rows(client: httpx.AsyncClient) -> None:
    scored = "{ token { id text } value }"
    columns = "{ ids texts values }"
    result = await infer(
        client,
        f"nodeTable(k: 3, scoredTokens: 4) {{ rows {{ {ROW} upvotedOutputTokens {scored} "
        f"downvotedOutputTokens {scored} upvotingInputTokens {scored} }} columns {{ nodeIds "
        "tokenIndex keyTokenIndex activation writeNorm directEffect actTimesGrad "
        f"upvotedOutputTokens {columns} downvotedOutputTokens {columns} "
        f"upvotingInputTokens {columns} attendedToTokens {{ tokenIndex values }} }} }}",
    )
    rows, columns = result["nodeTable"]["rows"], result["nodeTable"]["columns"]
    assert columns["nodeIds"] == [r["node"]["id"] for r in rows]
    for field in ("tokenIndex", "keyTokenIndex", *FIELDS.values()):
        assert columns[field] == [r[field] for r in rows], field
    for field in ("upvotedOutputTokens", "downvotedOutputTokens", "upvotingInputTokens"):
        lists = [r[field] or [] for r in rows]
        assert columns[field]["ids"] == [[s["token"]["id"] for s in items] for items in lists]
        assert columns[field]["texts"] == [[s["token"]["text"] for s in items] for items in lists]
        assert columns[field]["values"] == [[s["value"] for s in items] for items in lists]
    assert columns["attendedToTokens"]["tokenIndex"] == [[] for _ in rows]


async def test_the_result_cache_keeps_the_layernorm_conventions_apart() -> None:
    """A LIVE request after a FROZEN one on the same prompt is answered from its own pass, not
    from the cached FROZEN result (their direct effects differ), and a cached LIVE answer is the
    one a fresh server gives."""
    query = (
        '{ model(name: "tiny-stdlib") { infer(input: {prompt: "import os", layerNormScale: %s})'
        " { topNodes(group: DIRECT_EFFECT, k: 3) { top { node { id } value } } } } }"
    )

    async def answers(modes: list[str]) -> list[Any]:
        services = build_services(ServeOptions(explanation_store=":memory:"))
        assert services.settings.cached_runs > 0
        transport = httpx.ASGITransport(app=create_app(services))
        found = []
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for mode in modes:
                body = await graphql(client, query % mode)
                assert "errors" not in body, body
                found.append(body["data"]["model"]["infer"]["topNodes"]["top"])
        services.registry.close()
        return found

    frozen, live, live_again = await answers(["FROZEN", "LIVE", "LIVE"])
    [fresh_live] = await answers(["LIVE"])
    assert live == fresh_live == live_again
    assert live != frozen
