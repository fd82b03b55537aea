"""Every query of the core schema over HTTP (ASGI), checked against the backend and numpy."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import httpx
import numpy as np
import pytest
import strawberry.schema.schema as strawberry_schema
import torch

from interpql.backends.base import HookPoint, Location
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.inference import InferenceLoader
from tests.conftest import MODEL_NAME, SMALL, CountingBackend, error_codes, graphql
from tests.reference import reference_forward

PROMPT = "The quick brown fox jumps over the lazy dog."
SMALL_MODEL = '{ model(name: "small") { %s } }'
ON_HI = SMALL_MODEL % 'infer(input: {prompt: "hi"}) { %s }'


def reference_loss(backend: CountingBackend, prompt: str) -> float:
    """The prompt's next-token loss on the independent reference (tests/reference.py)."""
    ids = gpt2_encoding().encode(prompt)
    logits, _ = reference_forward(SMALL, backend.state_dict(), ids)
    log_probs = torch.log_softmax(logits, -1)
    return float(-log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


async def test_models_and_architecture(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client,
        "{ models { name backend loaded nLayers dModel nHeads dHead dMlp nCtx nVocab "
        "nodeKinds { kind count } } }",
    )
    [model] = body["data"]["models"]
    assert model == {
        "name": MODEL_NAME,
        "backend": "native-gpt2",
        "loaded": True,
        "nLayers": 3,
        "dModel": 48,
        "nHeads": 3,
        "dHead": 16,
        "dMlp": 80,
        "nCtx": 64,
        "nVocab": 50257,
        "nodeKinds": [
            {"kind": "TOKEN_EMBEDDING", "count": 1},
            {"kind": "MLP_NEURON", "count": 3 * 80},
            {"kind": "ATTENTION_HEAD", "count": 3 * 3},
            {"kind": "RESIDUAL_CHANNEL", "count": 3 * 48},
        ],
    }


async def test_layers_and_nodes(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client,
        """{ model(name: "small") {
              layers { index }
              layer(index: 2) { index model { name } nodeKinds { kind count }
                nodes(kind: ATTENTION_HEAD, first: 2) {
                  totalCount edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }
              node(layer: 1, kind: MLP_NEURON, index: 7) {
                id kind layerIndex index layer { index } }
            }
            nodes(ids: ["small/attention_head/0/2", "small/residual_channel/2/47"]) { id kind }
            node(id: "small/mlp_neuron/0/79") { id model { name } } }""",
    )
    data = body["data"]
    assert [layer["index"] for layer in data["model"]["layers"]] == [0, 1, 2]
    assert [k["count"] for k in data["model"]["layer"]["nodeKinds"]] == [80, 3, 48]
    page = data["model"]["layer"]["nodes"]
    assert page["totalCount"] == 3
    assert [e["node"]["id"] for e in page["edges"]] == [
        "small/attention_head/2/0",
        "small/attention_head/2/1",
    ]
    assert page["pageInfo"] == {"hasNextPage": True, "endCursor": "1"}
    assert data["model"]["node"] == {
        "id": "small/mlp_neuron/1/7",
        "kind": "MLP_NEURON",
        "layerIndex": 1,
        "index": 7,
        "layer": {"index": 1},
    }
    assert [n["kind"] for n in data["nodes"]] == ["ATTENTION_HEAD", "RESIDUAL_CHANNEL"]
    assert data["node"]["model"]["name"] == MODEL_NAME

    rest = await graphql(
        client,
        '{ model(name: "small") { layer(index: 2) { nodes(kind: ATTENTION_HEAD, after: "1") '
        "{ edges { node { index } } pageInfo { hasNextPage } } } } }",
    )
    assert rest["data"]["model"]["layer"]["nodes"] == {
        "edges": [{"node": {"index": 2}}],
        "pageInfo": {"hasNextPage": False},
    }
    # An empty page still says whether items follow it.
    for after, follows in (("null", True), ('"1"', True), ('"2"', False)):
        empty = await graphql(
            client,
            f'{{ model(name: "small") {{ layer(index: 2) {{ nodes(kind: ATTENTION_HEAD, '
            f"first: 0, after: {after}) {{ edges {{ cursor }} pageInfo {{ hasNextPage endCursor }} }} }} }} }}",
        )
        assert empty["data"]["model"]["layer"]["nodes"] == {
            "edges": [],
            "pageInfo": {"hasNextPage": follows, "endCursor": None},
        }


async def test_tokenize(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client,
        '{ model(name: "small") { tokenize(text: "Hello world<|endoftext|>") { index id text } } }',
    )
    assert body["data"]["model"]["tokenize"] == [
        {"index": 0, "id": 15496, "text": "Hello"},
        {"index": 1, "id": 995, "text": " world"},
        {"index": 2, "id": 50256, "text": "<|endoftext|>"},
    ]


async def test_infer_matches_the_reference(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    body = await graphql(
        client,
        """query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) {
             prompt tokens { id text } loss inferenceTimeMs batchSize memoryBeforeBytes
             topPredictions(k: 5) { token { id index } logit probability }
             layerActivations(layer: 1, kind: MLP_NEURON) { layer kind shape values }
             activations(nodeIds: ["small/mlp_neuron/2/3", "small/attention_head/1/2"]) {
               node { id } values maxValue maxTokenIndex attentionPattern }
        } } }""",
        {"p": PROMPT},
    )
    infer = body["data"]["model"]["infer"]
    ids = gpt2_encoding().encode(PROMPT)
    state = small_backend.state_dict()
    attention: dict[tuple[int, str], torch.Tensor] = {}
    logits, mlp_posts = reference_forward(SMALL, state, ids, attention=attention)
    assert infer["prompt"] == PROMPT
    assert [t["id"] for t in infer["tokens"]] == ids
    assert infer["loss"] == pytest.approx(reference_loss(small_backend, PROMPT), abs=1e-5)
    assert infer["inferenceTimeMs"] > 0 and infer["batchSize"] == 1
    assert infer["memoryBeforeBytes"] > 0

    last = logits[-1]
    probs = torch.softmax(last, -1)
    top = torch.topk(last, 5)
    assert [p["token"]["id"] for p in infer["topPredictions"]] == top.indices.tolist()
    assert [p["token"]["index"] for p in infer["topPredictions"]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([p["logit"] for p in infer["topPredictions"]], top.values, atol=1e-5)
    np.testing.assert_allclose(
        [p["probability"] for p in infer["topPredictions"]], probs[top.indices], rtol=1e-4
    )

    layer = infer["layerActivations"]
    assert layer["shape"] == [len(ids), SMALL.d_mlp]
    np.testing.assert_allclose(layer["values"], mlp_posts[1], atol=1e-5)

    neuron, head = infer["activations"]
    np.testing.assert_allclose(neuron["values"], mlp_posts[2][:, 3], atol=1e-5)
    assert neuron["attentionPattern"] is None
    assert neuron["maxTokenIndex"] == int(np.argmax(neuron["values"]))
    # A head's value is the norm of its write: z_h @ W_O[h], from the reference's z.
    z = attention[(1, "z")][:, 2]  # [position, d_head]
    w_o = state["xf_layers.1.attn.out_proj.weight"][:, 32:48].double()  # [d_model, d_head]
    np.testing.assert_allclose(head["values"], (z @ w_o.T).norm(dim=-1), atol=1e-5)
    np.testing.assert_allclose(head["attentionPattern"], attention[(1, "probs")][:, 2], atol=1e-5)


async def test_one_forward_pass_per_prompt(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    small_backend.calls.clear()
    body = await graphql(
        client,
        """query($p: String!) {
          model(name: "small") {
            infer(input: {prompt: $p}) {
              loss topPredictions { probability }
              layerActivations(layer: 0, kind: MLP_NEURON) { shape }
              other: layerActivations(layer: 2, kind: RESIDUAL_CHANNEL) { shape }
              activations(nodeIds: ["small/attention_head/1/0"]) { values }
            }
            again: infer(input: {prompt: $p}) { loss }
          }
          node(id: "small/mlp_neuron/1/4") { activations(prompt: $p) { values } }
          nodes(ids: ["small/mlp_neuron/2/1", "small/attention_head/0/1"]) {
            activations(prompt: $p) { maxValue }
          }
        }""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    assert len(small_backend.calls) == 1
    saved = small_backend.calls[0].save
    assert HookPoint(0, Location.MLP_POST) in saved and HookPoint(2, Location.MLP_POST) in saved


async def test_different_prompts_share_one_batched_pass(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    small_backend.calls.clear()
    body = await graphql(
        client,
        """{ model(name: "small") {
            a: infer(input: {prompt: "one two three"}) { loss batchSize }
            b: infer(input: {prompt: "a longer prompt than the first"}) { loss batchSize } } }""",
    )
    assert len(small_backend.calls) == 1
    model = body["data"]["model"]
    assert model["a"]["batchSize"] == model["b"]["batchSize"] == 2
    assert model["a"]["loss"] == pytest.approx(
        reference_loss(small_backend, "one two three"), abs=1e-5
    )


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ('{ model(name: "gpt9") { name } }', "MODEL_NOT_FOUND"),
        ('{ node(id: "small/mlp_neuron/1") { id } }', "INVALID_NODE"),
        ('{ node(id: "../../etc/passwd") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/mlp_neuron/../../../etc/passwd/1") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/neuron/1/2") { id } }', "INVALID_NODE"),
        ('{ node(id: "other/mlp_neuron/1/2") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/mlp_neuron/3/0") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/mlp_neuron/0/80") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/mlp_neuron/0/99999999999999999999") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/mlp_neuron/0/-1") { id } }', "INVALID_NODE"),
        ('{ node(id: "small/mlp_autoencoder_latent/0/1") { id } }', "INVALID_NODE"),
        ('{ model(name: "small") { layer(index: 3) { index } } }', "INVALID_ARGUMENT"),
        ('{ model(name: "small") { layer(index: -1) { index } } }', "INVALID_ARGUMENT"),
        (
            '{ model(name: "small") { node(layer: 0, kind: ATTENTION_HEAD, index: 3) { id } } }',
            "INVALID_NODE",
        ),
        ('{ model(name: "small") { infer(input: {prompt: ""}) { loss } } }', "EMPTY_PROMPT"),
        (
            ON_HI % "topPredictions(k: 0) { logit }",
            "INVALID_ARGUMENT",
        ),
        (
            ON_HI % "topPredictions(k: 100000) { logit }",
            "INVALID_ARGUMENT",
        ),
        (
            ON_HI % "layerActivations(layer: 9, kind: MLP_NEURON) { shape }",
            "INVALID_ARGUMENT",
        ),
        (
            ON_HI % 'activations(nodeIds: ["x"]) { values }',
            "INVALID_NODE",
        ),
        (
            SMALL_MODEL % 'layer(index: 0) { nodes(kind: MLP_NEURON, after: "zz") { totalCount } }',
            "INVALID_ARGUMENT",
        ),
        ("{ models { name ", "GRAPHQL_PARSE_FAILED"),
        ("{ nope }", "GRAPHQL_VALIDATION_FAILED"),
        ("{ model(name: 3) { name } }", "GRAPHQL_VALIDATION_FAILED"),
    ],
)
async def test_bad_input_is_a_typed_error(client: httpx.AsyncClient, query: str, code: str) -> None:
    body = await graphql(client, query)
    assert error_codes(body) == [code], body
    assert "Traceback" not in str(body)
    # ... and the server keeps answering.
    assert (await graphql(client, "{ models { name } }"))["data"]["models"][0]["name"] == MODEL_NAME


async def test_overlong_prompts(client: httpx.AsyncClient) -> None:
    query = 'query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) { loss } } }'
    just_fits = " x" * SMALL.n_ctx
    assert len(gpt2_encoding().encode(just_fits)) == SMALL.n_ctx
    assert "errors" not in await graphql(client, query, {"p": just_fits})
    assert error_codes(await graphql(client, query, {"p": just_fits + " x"})) == ["PROMPT_TOO_LONG"]
    # A megabyte is refused before it is tokenized.
    assert error_codes(await graphql(client, query, {"p": "y" * 1_000_000})) == ["PROMPT_TOO_LONG"]


async def test_wrong_variable_type(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client,
        'query($i: Int!) { model(name: "small") { layer(index: $i) { index } } }',
        {"i": "x"},
    )
    assert error_codes(body) == ["BAD_USER_INPUT"]


async def test_depth_alias_and_token_bombs(client: httpx.AsyncClient) -> None:
    deep = "{ models { " + "layers { model { " * 8 + "name" + " } }" * 8 + " } }"
    assert error_codes(await graphql(client, deep)) == ["QUERY_TOO_COMPLEX"]
    aliases = "{ " + " ".join(f"m{i}: models {{ name }}" for i in range(200)) + " }"
    assert error_codes(await graphql(client, aliases)) == ["QUERY_TOO_COMPLEX"]
    tokens = "{ models { " + "name " * 10_000 + "} }"
    assert error_codes(await graphql(client, tokens)) == ["QUERY_TOO_COMPLEX"]


async def test_a_repeated_query_is_validated_once(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation cache hits: the depth and alias rules are the same classes for every
    request (strawberry's limiter extensions would make new ones, and a new cache key)."""
    validated: list[object] = []
    real = strawberry_schema.validate

    def counting(*args: Any, **kwargs: Any) -> Any:
        validated.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(strawberry_schema, "validate", counting)
    query = "{ models { name nLayers } validatedOnce: __typename }"
    for _ in range(3):
        assert "errors" not in await graphql(client, query)
    assert len(validated) == 1
    deep = "{ models { " + "layers { model { " * 9 + "nLayers" + " } }" * 9 + " } }"
    for _ in range(2):  # the cached answer is the refusal
        assert error_codes(await graphql(client, deep)) == ["QUERY_TOO_COMPLEX"]
    assert len(validated) == 2


async def test_internal_errors_are_masked(
    client: httpx.AsyncClient, small_backend: CountingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(request: object) -> object:
        raise RuntimeError("secret internals at /srv/weights")

    monkeypatch.setattr(small_backend, "forward", explode)
    body = await graphql(
        client, '{ model(name: "small") { infer(input: {prompt: "boom"}) { loss } } }'
    )
    assert error_codes(body) == ["INTERNAL_SERVER_ERROR"]
    assert "secret" not in str(body)
    monkeypatch.undo()
    assert "errors" not in await graphql(
        client, '{ model(name: "small") { infer(input: {prompt: "fine"}) { loss } } }'
    )


async def test_concurrent_requests(client: httpx.AsyncClient) -> None:
    query = 'query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) { loss } } }'
    bodies = await asyncio.gather(*(graphql(client, query, {"p": f"prompt {i}"}) for i in range(8)))
    assert all("errors" not in b for b in bodies)


async def test_packed_layer_activations(client: httpx.AsyncClient) -> None:
    import base64

    body = await graphql(
        client,
        """query($p: String!) { model(name: "small") { infer(input: {prompt: $p}) {
             layerActivations(layer: 2, kind: MLP_NEURON) { shape values
               f32: packed { dtype shape base64 } f16: packed(dtype: FLOAT16) { dtype base64 } } } } }""",
        {"p": PROMPT},
    )
    layer = body["data"]["model"]["infer"]["layerActivations"]
    values = np.array(layer["values"], dtype=np.float32)
    f32 = np.frombuffer(base64.b64decode(layer["f32"]["base64"]), dtype="<f4").reshape(
        layer["f32"]["shape"]
    )
    assert layer["f32"]["dtype"] == "FLOAT32" and layer["f32"]["shape"] == layer["shape"]
    np.testing.assert_array_equal(f32, values)
    f16 = np.frombuffer(base64.b64decode(layer["f16"]["base64"]), dtype="<f2").reshape(
        layer["shape"]
    )
    np.testing.assert_allclose(f16, values, rtol=1e-3, atol=1e-4)


async def test_token_losses_are_each_positions_next_token_loss(
    client: httpx.AsyncClient, small_backend: Any
) -> None:
    """-ln softmax(logits[t])[token t+1] at each position, from the plain-torch reference; their
    mean is the loss."""
    body = await graphql(
        client,
        '{ model(name: "small") { infer(input: {prompt: "The quick brown fox jumps"}) '
        "{ loss tokenLosses tokens { id } } } }",
    )
    found = body["data"]["model"]["infer"]
    ids = [t["id"] for t in found["tokens"]]
    logits, _ = reference_forward(SMALL, small_backend.state_dict(), ids)
    expected = -logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert found["tokenLosses"][-1] is None
    assert found["tokenLosses"][:-1] == pytest.approx(expected.tolist(), abs=1e-5)
    assert found["loss"] == pytest.approx(float(expected.mean()), abs=1e-5)


async def test_what_a_request_loaded_is_freed_when_its_answer_is_sent(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """graphql-core's execution context is a reference cycle holding the request's context:
    its passes' results must not wait for the cycle collector (here switched off)."""
    results: list[weakref.ref[Any]] = []
    load = InferenceLoader.load

    async def kept(self: InferenceLoader, spec: Any, needs: Any) -> Any:
        result = await load(self, spec, needs)
        results.append(weakref.ref(result))
        return result

    monkeypatch.setattr(InferenceLoader, "load", kept)
    query = (
        f'{{ model(name: "{MODEL_NAME}") {{ infer(input: {{prompt: "freed once sent"}}) '
        "{ loss topPredictions(k: 2) { probability } } } }"
    )
    gc.collect()
    gc.disable()
    try:
        body = await graphql(client, query)
        assert "errors" not in body and results
        assert [r() for r in results] == [None] * len(results)
    finally:
        gc.enable()


def test_a_value_graphql_cannot_serialise_is_an_internal_error() -> None:
    """graphql's own errors while completing a result (they carry a path) are our fault, not
    the request's: never GRAPHQL_VALIDATION_FAILED, which tells a client to change its query."""
    from graphql import GraphQLError

    from interpql.schema.errors import add_codes

    completing = GraphQLError("Float cannot represent non numeric value: nan", path=["a", "b"])
    validating = GraphQLError("Cannot query field 'x' on type 'Query'.")
    add_codes([completing, validating])
    assert completing.extensions == {"code": "INTERNAL_SERVER_ERROR"}
    assert validating.extensions == {"code": "GRAPHQL_VALIDATION_FAILED"}
