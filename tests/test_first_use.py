"""What a researcher reaches for on first use (issue 24), each against a computation of its own:
per-position predictions and token probabilities from the plain-torch reference, negative token
indices, steering inside `infer` and the residual stream's norms as the same addition done by
hand, ranked nodes' per-token values from the ablated pass, per-step probabilities of a
generation, the demo's unused vocabulary from its weights file, and searchNodes' filters and
scores from its records."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from interpql.backends.tokenizer import gpt2_encoding
from interpql.demo.artifacts import DEMO_DIR, load_demo_model
from interpql.loaders.sources.compact_format import RecordStore
from tests.conftest import SMALL, CountingBackend, error_codes, graphql
from tests.processes import serve
from tests.reference import reference_forward

PROMPT = "import os\nimport sys\nimport"
TOKENS = gpt2_encoding().encode(PROMPT)
PROMPT_ARG = PROMPT.replace("\n", "\\n")  # inside a GraphQL string


def state_of(backend: CountingBackend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


async def infer(client: httpx.AsyncClient, input: str, fields: str) -> dict[str, Any]:
    body = await graphql(
        client, f'{{ model(name: "small") {{ infer(input: {input}) {{ {fields} }} }} }}'
    )
    assert "errors" not in body, body
    return body["data"]["model"]["infer"]  # type: ignore[no-any-return]


async def test_token_probabilities_and_predictions_at_any_position(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    logits, _ = reference_forward(SMALL, state_of(small_backend), TOKENS)
    log_probs = logits.log_softmax(-1)
    # " re" is one token; 50000 is a token id the prompt's model ranks somewhere far down.
    found = await infer(
        client,
        f'{{prompt: "{PROMPT_ARG}"}}',
        'last: tokenProbabilities(tokens: [" re", " os"], tokenIds: [50000]) '
        "{ token { id index } logit probability logProbability rank } "
        "third: tokenProbabilities(tokenIds: [50000], tokenIndex: 2) { logProbability rank } "
        "before: tokenProbabilities(tokenIds: [50000], tokenIndex: -3) { logProbability } "
        "topPredictions(k: 3, tokenIndex: 2) { token { id } logit probability } "
        "tokenLosses",
    )
    ids = [gpt2_encoding().encode(" re")[0], gpt2_encoding().encode(" os")[0], 50000]
    assert [p["token"]["id"] for p in found["last"]] == ids
    assert [p["token"]["index"] for p in found["last"]] == [0, 1, 2]
    for p, token in zip(found["last"], ids, strict=True):
        assert p["logit"] == pytest.approx(float(logits[-1, token]), abs=1e-4)
        assert p["logProbability"] == pytest.approx(float(log_probs[-1, token]), abs=1e-4)
        assert p["probability"] == pytest.approx(math.exp(float(log_probs[-1, token])), rel=1e-4)
        assert p["rank"] == int((logits[-1] > logits[-1, token]).sum())
    [third] = found["third"]
    assert third["logProbability"] == pytest.approx(float(log_probs[2, 50000]), abs=1e-4)
    assert third["rank"] == int((logits[2] > logits[2, 50000]).sum())
    # -3 counts from the end.
    n = len(TOKENS)
    assert found["before"][0]["logProbability"] == pytest.approx(
        float(log_probs[n - 3, 50000]), abs=1e-4
    )
    top = torch.topk(logits[2], 3)
    assert [p["token"]["id"] for p in found["topPredictions"]] == top.indices.tolist()
    for p, value in zip(found["topPredictions"], top.values.tolist(), strict=True):
        assert p["logit"] == pytest.approx(value, abs=1e-4)
    following = torch.tensor(TOKENS[1:])
    expected = (-log_probs[:-1].gather(-1, following[:, None])[:, 0]).tolist()
    assert found["tokenLosses"][:-1] == pytest.approx(expected, abs=1e-4)
    assert found["tokenLosses"][-1] is None


async def test_a_one_token_prompt_has_no_next_token_objective(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    """The next-token loss of one token averages nothing: null, with the rest of the answer
    intact; a loss that reads the last position is still defined."""
    [token] = gpt2_encoding().encode(" import")
    [re_id] = gpt2_encoding().encode(" re")
    [os_id] = gpt2_encoding().encode(" os")
    found = await infer(client, '{prompt: " import"}', "loss objective tokenLosses")
    assert found == {"loss": None, "objective": None, "tokenLosses": [None]}
    diff = await infer(
        client,
        '{prompt: " import", loss: {kind: LOGIT_DIFF, targetTokens: [" re"], '
        'distractorTokens: [" os"]}}',
        "objective",
    )
    logits, _ = reference_forward(SMALL, state_of(small_backend), [token])
    expected = float(logits[-1, re_id] - logits[-1, os_id])
    assert diff["objective"] == pytest.approx(expected, abs=1e-4)


async def test_negative_token_indices_mean_counting_from_the_end(
    client: httpx.AsyncClient,
) -> None:
    n = len(TOKENS)
    prompt = PROMPT_ARG
    ablate = '{nodeId: "small/mlp_neuron/1/3", value: 2.5, tokenIndex: %d}'
    fields = "loss topNodes(group: ACTIVATION, k: 3, tokenIndex: %d) { top { node { id } value } }"
    from_end = await infer(
        client, f'{{prompt: "{prompt}", ablations: [{ablate % -1}]}}', fields % -2
    )
    counted = await infer(
        client, f'{{prompt: "{prompt}", ablations: [{ablate % (n - 1)}]}}', fields % (n - 2)
    )
    assert from_end == counted
    body = await graphql(
        client,
        f'{{ model(name: "small") {{ infer(input: {{prompt: "{prompt}"}}) '
        f"{{ topPredictions(tokenIndex: {-n - 1}) {{ logit }} }} }} }}",
    )
    assert error_codes(body) == ["INVALID_ARGUMENT"]
    assert "-1 is the last token" in body["errors"][0]["message"]


async def test_steering_inside_infer_is_the_addition_done_by_hand(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    strength = 30.0
    prompt = PROMPT_ARG
    found = await infer(
        client,
        f'{{prompt: "{prompt}", steering: [{{nodeId: "small/mlp_neuron/2/9", '
        f"strength: {strength}, tokenIndices: [-1, 1]}}]}}",
        "loss topPredictions(k: 1) { logit } residualNorms { layer hookName tokenNorms median }",
    )
    w_out = small_backend.model.xf_layers[2].mlp.out_layer.weight[:, 9].double()
    vector = strength * w_out / w_out.norm()
    n = len(TOKENS)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def steer(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if (layer, name) == (2, "mlp_out"):
            act = act.clone()
            act[[n - 1, 1]] += vector
        if name in ("mlp_out", "resid_post"):
            seen[(layer, name)] = act.detach()
        return act

    logits, _ = reference_forward(SMALL, state_of(small_backend), TOKENS, edit=steer)
    following = torch.tensor(TOKENS[1:])
    loss = float(-logits[:-1].log_softmax(-1).gather(-1, following[:, None]).mean())
    assert found["loss"] == pytest.approx(loss, abs=1e-4)
    assert found["topPredictions"][0]["logit"] == pytest.approx(float(logits[-1].max()), abs=1e-4)
    norms = {(r["layer"], r["hookName"]): r for r in found["residualNorms"]}
    assert len(norms) == 2 * SMALL.n_layers
    for layer in range(SMALL.n_layers):
        post = seen[(layer, "resid_post")]
        mid = post - seen[(layer, "mlp_out")]
        for name, stream in (("resid_mid", mid), ("resid_post", post)):
            row = norms[(layer, f"blocks.{layer}.hook_{name}")]
            assert row["tokenNorms"] == pytest.approx(stream.norm(dim=-1).tolist(), rel=1e-4)
            assert row["median"] == pytest.approx(float(np.median(row["tokenNorms"])))


async def test_ranked_nodes_carry_their_values_from_the_ablated_pass(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    # An ablated neuron tops the ranking at the last token; its tokenValues come from that
    # pass, while its own activations(prompt) run the prompt clean.
    n = len(TOKENS)
    prompt = PROMPT_ARG
    found = await infer(
        client,
        f'{{prompt: "{prompt}", ablations: [{{nodeId: "small/mlp_neuron/1/3", value: 50, '
        "tokenIndex: -1}]}",
        "topNodes(group: ACTIVATION, k: 2, tokenIndex: -1) { top { node { id activations("
        f'prompt: "{prompt}") {{ values }} }} value tokenValues }} }}',
    )
    top = found["topNodes"]["top"][0]
    assert top["node"]["id"] == "small/mlp_neuron/1/3"
    state = state_of(small_backend)
    _, ablated = reference_forward(SMALL, state, TOKENS, overwrite_mlp_post=(1, n - 1, 3, 50.0))
    _, clean = reference_forward(SMALL, state, TOKENS)
    assert top["value"] == pytest.approx(50.0)
    assert top["tokenValues"] == pytest.approx(ablated[1][:, 3].tolist(), abs=1e-4)
    assert top["node"]["activations"]["values"] == pytest.approx(clean[1][:, 3].tolist(), abs=1e-4)


async def test_generation_reports_each_chosen_tokens_probability(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    body = await graphql(
        client,
        '{ model(name: "small") { generate(input: {prompt: "The meaning of life is", '
        'maxTokens: 4, steering: [{nodeId: "small/mlp_neuron/2/9", strength: 20}]}) { '
        "unsteered { tokens { id } tokenProbabilities } "
        "steered { tokens { id } tokenProbabilities } } } }",
    )
    assert "errors" not in body, body
    generated = body["data"]["model"]["generate"]
    w_out = small_backend.model.xf_layers[2].mlp.out_layer.weight[:, 9].double()
    vector = 20.0 * w_out / w_out.norm()
    state = state_of(small_backend)
    prompt = gpt2_encoding().encode("The meaning of life is")
    for name, edit in (
        ("unsteered", None),
        ("steered", lambda layer, at, act: act + vector if (layer, at) == (2, "mlp_out") else act),
    ):
        tokens = list(prompt)
        for step, chosen in enumerate(generated[name]["tokens"]):
            logits, _ = reference_forward(SMALL, state, tokens, edit=edit)
            probability = float(logits[-1].softmax(-1)[chosen["id"]])
            assert generated[name]["tokenProbabilities"][step] == pytest.approx(
                probability, rel=1e-4
            )
            tokens.append(chosen["id"])


@pytest.fixture(scope="module")
def demo_weights() -> dict[str, np.ndarray]:
    return load_file(str(DEMO_DIR / "weights.safetensors"))


async def test_the_demos_unused_vocabulary_is_flagged_and_left_out(
    demo: httpx.AsyncClient, demo_weights: dict[str, np.ndarray]
) -> None:
    # The weights file stores embeddings for the tokens its corpus uses, and nothing else.
    used = demo_weights["vocab.used_ids"].astype(np.int64)
    embedding = demo_weights["vocab.embedding"].astype(np.float64)  # [used, d_model]
    texts = [" def", " football", " the"]
    body = await graphql(
        demo,
        'query($t: [String!]!) { model(name: "tiny-stdlib") { tokenizeMany(texts: $t) '
        "{ id inUse } } "
        'node(id: "tiny-stdlib/mlp_neuron/1/7") { scoredTokens(k: 10) { '
        "upvotedOutputTokens { token { id inUse } value } "
        "upvotingInputTokens { token { id inUse } value } } } }",
        {"t": texts},
    )
    assert "errors" not in body, body
    tokenized = body["data"]["model"]["tokenizeMany"]
    assert [[t["id"] for t in row] for row in tokenized] == [
        gpt2_encoding().encode(t) for t in texts
    ]
    in_use = set(used.tolist())
    for row in tokenized:
        for token in row:
            assert token["inUse"] == (token["id"] in in_use)
    assert not all(t["inUse"] for row in tokenized for t in row)  # " football" is not
    scored = body["data"]["node"]["scoredTokens"]
    # The neuron's output column and input row against the used tokens' embeddings (the used
    # unembedding is tied to the embedding).
    w_out = demo_weights["xf_layers.1.mlp.out_layer.weight"][:, 7].astype(np.float64)
    w_in = demo_weights["xf_layers.1.mlp.in_layer.weight"][7].astype(np.float64)
    for name, values in (
        ("upvotedOutputTokens", embedding @ w_out),
        ("upvotingInputTokens", embedding @ w_in),
    ):
        order = np.argsort(-values)[:10]
        assert [s["token"]["id"] for s in scored[name]] == used[order].tolist()
        assert [s["value"] for s in scored[name]] == pytest.approx(values[order].tolist(), rel=1e-3)
        assert all(s["token"]["inUse"] for s in scored[name])


async def test_bottom_predictions_are_the_least_likely_learned_tokens(
    demo: httpx.AsyncClient, demo_weights: dict[str, np.ndarray]
) -> None:
    prompt = "import os\nimport sys\nimport"
    body = await graphql(
        demo,
        'query($p: String!) { model(name: "tiny-stdlib") { infer(input: {prompt: $p}) { '
        "bottomPredictions(k: 8) { token { id inUse } logit probability } } } }",
        {"p": prompt},
    )
    assert "errors" not in body, body
    found = body["data"]["model"]["infer"]["bottomPredictions"]
    cfg, weights = load_demo_model()
    logits, _ = reference_forward(cfg, weights, gpt2_encoding().encode(prompt))
    last = logits[-1].double()
    used = torch.from_numpy(demo_weights["vocab.used_ids"].astype(np.int64))
    order = used[last[used].argsort()[:8]]
    assert [p["token"]["id"] for p in found] == order.tolist()
    assert all(p["token"]["inUse"] for p in found)
    assert [p["logit"] for p in found] == pytest.approx(last[order].tolist(), abs=1e-3)
    probabilities = last.softmax(-1)[order]
    assert [p["probability"] for p in found] == pytest.approx(probabilities.tolist(), rel=1e-3)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            '{ searchNodes(text: "def", kind: DICTIONARY_LATENT, dictionary: "nope") '
            "{ totalCount } }",
            "No served model has node kind 'nope'.",
        ),
        (
            '{ searchNodes(text: "def", model: "tiny-stdlib", kind: DICTIONARY_LATENT, '
            'dictionary: "nope") { totalCount } }',
            "'tiny-stdlib' has no node kind 'nope'",
        ),
        (
            '{ searchNodes(text: "def", dictionary: "res-sae") { totalCount } }',
            "`dictionary` goes with kind: DICTIONARY_LATENT.",
        ),
        (
            '{ model(name: "tiny-stdlib") { layer(index: 1) { nodes(kind: DICTIONARY_LATENT, '
            'dictionary: "nope") { totalCount } } } }',
            "'tiny-stdlib' has no node kind 'nope'",
        ),
        (
            '{ model(name: "tiny-stdlib") { node(layer: 1, kind: DICTIONARY_LATENT, '
            'dictionary: "nope", index: 3) { id } } }',
            "'tiny-stdlib' has no node kind 'nope' (known: token_embedding, mlp_neuron",
        ),
    ],
)
async def test_a_filter_by_a_kind_no_model_has_is_refused(
    demo: httpx.AsyncClient, query: str, message: str
) -> None:
    """Not an empty answer, which reads as 'nothing matched'."""
    body = await graphql(demo, query)
    assert error_codes(body) == ["INVALID_ARGUMENT"]
    assert message in body["errors"][0]["message"]


async def test_search_filters_by_kind_and_layer_with_scores_that_compare(
    demo: httpx.AsyncClient,
) -> None:
    store = RecordStore.load(DEMO_DIR / "records")
    token = " def"
    token_id = gpt2_encoding().encode(token)[0]
    # From the records: for each node of layer 2, the share of its top examples peaking on it.
    expected: dict[str, float] = {}
    for kind in ("mlp_neuron", "transcoder"):
        arrays = store.arrays(kind, 2)
        offsets, acts = arrays["top_offsets"], arrays["top_acts"].astype(np.float32)
        peaks = offsets + acts.argmax(axis=2)
        for node in range(offsets.shape[0]):
            kept = offsets[node] >= 0
            hits = Counter(store.tokens[peaks[node][kept]].tolist())[token_id]
            if hits:
                expected[f"tiny-stdlib/{kind}/2/{node}"] = hits / int(kept.sum())
    query = (
        'query($k: NodeKind, $d: String) { searchNodes(token: " def", model: "tiny-stdlib", '
        "kind: $k, dictionary: $d, layer: 2, first: 1000) { totalCount edges { node { id } "
        "score peakActivation } } }"
    )
    found: dict[str, float] = {}
    for variables in ({"k": "MLP_NEURON"}, {"k": "DICTIONARY_LATENT", "d": "transcoder"}):
        body = await graphql(demo, query, variables)
        assert "errors" not in body, body
        edges = body["data"]["searchNodes"]["edges"]
        assert body["data"]["searchNodes"]["totalCount"] == len(edges)
        scores = [e["score"] for e in edges]
        assert scores == sorted(scores, reverse=True)
        kind = "/mlp_neuron/" if variables["k"] == "MLP_NEURON" else "/transcoder/"
        assert all(kind in e["node"]["id"] and "/2/" in e["node"]["id"] for e in edges)
        found.update({e["node"]["id"]: e["score"] for e in edges})
    assert found == pytest.approx(expected)
    assert expected  # the demo's layer 2 has such nodes
    text = await graphql(
        demo,
        '{ searchNodes(text: "def", kind: ATTENTION_HEAD, model: "tiny-stdlib") '
        "{ edges { node { id } } } }",
    )
    assert all("/attention_head/" in e["node"]["id"] for e in text["data"]["searchNodes"]["edges"])
    bad = await graphql(
        demo, '{ searchNodes(text: "def", model: "tiny-stdlib", layer: 9) { totalCount } }'
    )
    assert error_codes(bad) == ["INVALID_ARGUMENT"]


def test_a_served_demo_lists_no_byte_tokens_it_never_learned() -> None:
    """As reported over HTTP: these latents' upvoted output tokens were ten of the byte tokens
    95-153 (all U+FFFD), which the corpus never uses. A real `interpql serve` of the demo
    lists tokens the model learned, and says of each prompt token whether it did."""
    used = set(load_file(str(DEMO_DIR / "weights.safetensors"))["vocab.used_ids"].tolist())
    with serve() as url:
        for node in ("mlp_autoencoder_latent/1/1", "transcoder/0/0", "res-sae/1/1"):
            query = (
                f'{{ node(id: "tiny-stdlib/{node}") {{ scoredTokens(k: 10) {{ '
                "upvotedOutputTokens { token { id inUse } } } } }"
            )
            body = httpx.post(url + "/graphql", json={"query": query}, timeout=60).json()
            assert "errors" not in body, body
            listed = body["data"]["node"]["scoredTokens"]["upvotedOutputTokens"]
            assert len(listed) == 10
            assert all(t["token"]["id"] in used and t["token"]["inUse"] for t in listed)
        body = httpx.post(
            url + "/graphql",
            json={
                "query": '{ model(name: "tiny-stdlib") { tokenize(text: "the football") '
                "{ id inUse } } }"
            },
            timeout=60,
        ).json()
        tokens = body["data"]["model"]["tokenize"]
        assert [t["inUse"] for t in tokens] == [t["id"] in used for t in tokens] == [True, False]
