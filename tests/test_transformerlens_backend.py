"""The TransformerLens backend: parity with the native backend on the same GPT-2 weights (through
`run` and through GraphQL), non-GPT-2 architectures served end to end and checked against
Hugging Face, and UNSUPPORTED answers for what an architecture lacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interpql.backends.base import (
    Addition,
    AutoencoderInput,
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Intervention,
    Location,
    Trace,
)
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model, save_hf_folder
from interpql.backends.hf_tokenizer import HFTokenizer, gpt2_hf_tokenizer
from interpql.backends.tokenizer import gpt2_encoding
from interpql.backends.transformerlens import TransformerLensBackend
from interpql.errors import UnavailableError
from interpql.loaders.models import load_model
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.server import create_app
from interpql.specs import Ablation, AttentionTrace, GenerationSpec, LossKind, LossSpec, NodeRef
from tests.conftest import SMALL, error_codes, graphql
from tests.processes import serve
from tests.test_autoencoder_latents import with_two_autoencoders
from tests.test_generation import edited_spec, generated_both_ways

PROMPTS = [
    [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    [15496, 995],
    [50256, 4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 1635, 362],
]
MLP_LATENTS = HookPoint(1, Location.LATENTS, "mlp_autoencoder_latent")
ATTN_LATENTS = HookPoint(2, Location.LATENTS, "attention_autoencoder_latent")
MODEL_LOCATIONS = [
    loc for loc in Location if loc not in (MLP_LATENTS.location, ATTN_LATENTS.location)
]
EVERY_POINT = frozenset(
    {HookPoint(layer, loc) for layer in range(SMALL.n_layers) for loc in MODEL_LOCATIONS}
    | {MLP_LATENTS, ATTN_LATENTS}
)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in random_model(SMALL, seed=21).state_dict().items()}


@pytest.fixture(scope="module")
def native(state: dict[str, torch.Tensor]) -> NativeGPT2Backend:
    return with_two_autoencoders(state)


@pytest.fixture(scope="module")
def lens(
    tmp_path_factory: pytest.TempPathFactory,
    state: dict[str, torch.Tensor],
    native: NativeGPT2Backend,
) -> TransformerLensBackend:
    folder = tmp_path_factory.mktemp("hf-gpt2")
    save_hf_folder(folder, SMALL, state)
    backend = TransformerLensBackend.load(str(folder))
    for attached in native.dictionaries.values():
        backend.attach_dictionary(
            attached.name, attached.layer, attached.dictionary, attached.input, attached.output
        )
    return backend


def visible(point: HookPoint, act: torch.Tensor, n_tok: int) -> torch.Tensor:
    """One prompt's real positions; attention scores only where the query may see the key.

    attn_scores is the one location whose values differ by design: TransformerLens hooks the
    scores after the causal mask, so a future key holds the dtype's minimum where the native
    backend holds q·k. Both then mask it, so the probabilities agree everywhere.
    """
    act = act[:n_tok]
    if point.location in (Location.ATTN_SCORES, Location.ATTN_PROBS):
        act = act[:, :, :n_tok]
    if point.location is Location.ATTN_SCORES:
        causal = torch.ones(n_tok, n_tok, dtype=torch.bool).tril()
        act = act.permute(1, 0, 2)[:, causal]  # [head, visible (query, key) pairs]
    return act


def max_difference(a: ForwardResult, b: ForwardResult, point: HookPoint, grads: bool) -> float:
    source_a = a.gradients if grads else a.activations
    source_b = b.gradients if grads else b.activations
    return max(
        float(
            (visible(point, source_a[point][row], n) - visible(point, source_b[point][row], n))
            .abs()
            .max()
        )
        for row, n in enumerate(a.lengths)
    )


def run_both(
    native: NativeGPT2Backend, lens: TransformerLensBackend, **kwargs: Any
) -> tuple[ForwardResult, ForwardResult]:
    request = ForwardRequest(tokens=tuple(map(tuple, PROMPTS)), **kwargs)
    return native.forward(request), lens.forward(request)


def test_every_location_and_its_gradient_match_native(
    native: NativeGPT2Backend, lens: TransformerLensBackend
) -> None:
    assert lens.locations == frozenset(Location) and lens.architecture == native.architecture
    a, b = run_both(native, lens, save=EVERY_POINT, backward=LossSpec(), save_grads=EVERY_POINT)
    assert a.lengths == b.lengths == [len(p) for p in PROMPTS]
    for row, n in enumerate(a.lengths):
        assert float((a.logits[row, :n] - b.logits[row, :n]).abs().max()) < TOLERANCE
    torch.testing.assert_close(b.next_token_loss, a.next_token_loss, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(b.backward_loss, a.backward_loss, atol=TOLERANCE, rtol=0)
    for point in sorted(EVERY_POINT):
        for grads in (False, True):
            # Random weights give small gradients: they must agree relative to their scale too.
            scale = float((a.gradients if grads else a.activations)[point].abs().max())
            assert scale > 0, point  # the comparison means something
            difference = max_difference(a, b, point, grads)
            assert difference < TOLERANCE and difference < TOLERANCE * scale, (point, grads)
    for point in (HookPoint(1, Location.MLP_POST), MLP_LATENTS):  # act x grad
        act_times_grad = [r.activations[point] * r.gradients[point] for r in (a, b)]
        assert float((act_times_grad[0] - act_times_grad[1]).abs().max()) < TOLERANCE
    future = b.activations[HookPoint(0, Location.ATTN_SCORES)][0, 0, :, 1]  # query 0, key 1
    assert bool((future == torch.finfo(torch.float32).min).all())


@pytest.mark.parametrize(
    "change",
    [
        Intervention(point=HookPoint(1, Location.MLP_POST), value=2.0, position=3, index=(5,)),
        Intervention(point=HookPoint(1, Location.MLP_PRE), value=-1.0, index=(11,)),
        # resid_mid feeds the MLP and the skip connection: both must see the write.
        Intervention(point=HookPoint(1, Location.RESID_MID), value=0.5, position=4, index=(7,)),
        Intervention(point=HookPoint(0, Location.ATTN_PROBS), value=0.0, position=5, index=(1, 2)),
        Intervention(point=HookPoint(2, Location.ATTN_SCORES), value=3.0, position=2, index=(0, 1)),
        Intervention(point=HookPoint(1, Location.ATTN_Z), value=0.0, index=(2,)),
        Intervention(point=HookPoint(0, Location.ATTN_V), value=0.3, position=1),
        Intervention(
            point=HookPoint(2, Location.RESID_PRE), value=1.0, position=0, index=(3,), row=2
        ),
        Intervention(point=MLP_LATENTS, value=0.0, position=6),
        Intervention(point=ATTN_LATENTS, value=1.5, index=(4,)),
        Addition(
            point=HookPoint(1, Location.RESID_MID), vector=tuple(0.1 * (i % 5) for i in range(48))
        ),
    ],
    ids=lambda change: f"{type(change).__name__}-{change.point}",
)
def test_interventions_match_native(
    native: NativeGPT2Backend, lens: TransformerLensBackend, change: Intervention | Addition
) -> None:
    key = "interventions" if isinstance(change, Intervention) else "additions"
    point = HookPoint(1, Location.MLP_POST)
    a, b = run_both(
        native,
        lens,
        **{key: (change,)},
        save=frozenset({point}),
        backward=LossSpec(),
        save_grads=frozenset({point}),
    )
    plain = native.forward(ForwardRequest(tokens=tuple(map(tuple, PROMPTS))))
    for row, n in enumerate(a.lengths):
        assert float((a.logits[row, :n] - b.logits[row, :n]).abs().max()) < TOLERANCE
    assert max_difference(a, b, point, grads=True) < TOLERANCE
    assert float((a.logits - plain.logits).abs().max()) > 1e-3  # the change did something


@pytest.mark.parametrize(
    "trace",
    [
        Trace(point=HookPoint(2, Location.MLP_POST), position=5, index=(3,)),
        Trace(point=HookPoint(2, Location.RESID_MID), position=6, index=(10,)),
        Trace(
            point=HookPoint(1, Location.ATTN_Q),
            position=4,
            index=(1,),
            attention=AttentionTrace.QK,
            key_position=2,
        ),
        Trace(
            point=HookPoint(1, Location.ATTN_V),
            position=4,
            index=(1,),
            attention=AttentionTrace.V,
            key_position=2,
            # One direction per row: each prompt's own.
            value_directions=tuple(
                tuple(0.1 * i * (row + 1) for i in range(16)) for row in range(len(PROMPTS))
            ),
        ),
    ],
    ids=lambda trace: f"{trace.point}-{trace.attention}",
)
def test_traces_match_native(
    native: NativeGPT2Backend, lens: TransformerLensBackend, trace: Trace
) -> None:
    points = frozenset({HookPoint(0, Location.MLP_POST), HookPoint(1, Location.RESID_PRE)})
    a, b = run_both(native, lens, trace=trace, save=points, save_grads=points)
    for point in points:
        scale = float(a.gradients[point].abs().max())
        assert scale > 0
        assert max_difference(a, b, point, grads=True) < TOLERANCE * scale, point


@pytest.mark.parametrize(
    "frozen",
    [
        frozenset({HookPoint(SMALL.n_layers - 1, Location.RESID_POST)}),
        frozenset({HookPoint(1, Location.RESID_PRE), HookPoint(2, Location.RESID_MID)}),
    ],
    ids=["final", "inner"],
)
def test_frozen_layer_norm_scales_match_native(
    native: NativeGPT2Backend, lens: TransformerLensBackend, frozen: frozenset[HookPoint]
) -> None:
    """Both backends hold the same LayerNorms' scales, and that changes the gradients."""
    points = frozenset(
        {
            HookPoint(0, Location.MLP_POST),
            HookPoint(1, Location.RESID_PRE),
            HookPoint(2, Location.RESID_POST),
        }
    )
    loss = LossSpec(kind=LossKind.LOGIT_DIFF, targets=(262,), distractors=(13,))
    kwargs: dict[str, Any] = dict(save=points, save_grads=points, backward=loss)
    a, b = run_both(native, lens, frozen_norm_inputs=frozen, **kwargs)
    live, _ = run_both(native, lens, **kwargs)
    for point in points:
        scale = float(a.gradients[point].abs().max())
        assert scale > 0
        assert max_difference(a, b, point, grads=True) < TOLERANCE * scale, point
    assert max(max_difference(a, live, point, grads=True) for point in points) > 1e-3


def test_a_write_to_a_masked_score_changes_nothing(lens: TransformerLensBackend) -> None:
    future = Intervention(
        point=HookPoint(1, Location.ATTN_SCORES), value=5.0, position=1, index=(0, 4)
    )
    plain = lens.forward(ForwardRequest(tokens=(tuple(PROMPTS[0]),)))
    written = lens.forward(ForwardRequest(tokens=(tuple(PROMPTS[0]),), interventions=(future,)))
    assert torch.equal(plain.logits, written.logits)


def test_batched_prompts_run_as_they_would_alone(lens: TransformerLensBackend) -> None:
    point = HookPoint(2, Location.RESID_MID)
    batch = lens.forward(ForwardRequest(tokens=tuple(map(tuple, PROMPTS)), save=frozenset({point})))
    for row, prompt in enumerate(PROMPTS):
        alone = lens.forward(ForwardRequest(tokens=(tuple(prompt),), save=frozenset({point})))
        n = len(prompt)
        torch.testing.assert_close(batch.logits[row, :n], alone.logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            batch.activations[point][row, :n], alone.activations[point][0], atol=1e-5, rtol=0
        )


def test_weights_match_native(native: NativeGPT2Backend, lens: TransformerLensBackend) -> None:
    names = (
        ["W_E", "W_pos", "W_U"]
        + [
            f"blocks.{layer}.{name}"
            for layer in range(SMALL.n_layers)
            for name in (
                *("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out"),
                *("attn.b_O", "mlp.b_out", "ln1.w", "ln2.w"),
            )
        ]
        + ["ln_final.w", "ln_final.b"]
    )
    for name in names:
        assert torch.equal(lens.weight(name), native.weight(name)), name
    for bad in ("blocks.3.mlp.W_in", "blocks.0.attn.nope", "W_nope"):
        with pytest.raises(KeyError):
            lens.weight(bad)


def test_native_specs_load_through_a_converted_folder() -> None:
    request = ForwardRequest(tokens=(tuple(PROMPTS[0]),))
    expected = NativeGPT2Backend.load("random:tiny").forward(request).logits
    got = TransformerLensBackend.load("random:tiny").forward(request).logits
    assert float((got - expected).abs().max()) < TOLERANCE


# --- GraphQL -----------------------------------------------------------------------------------

PARITY_QUERY = """query($m: String!, $p: String!, $head: ID!, $latent: ID!, $neuron: ID!) {
  model(name: $m) {
    nLayers dModel nHeads dHead dMlp nCtx nVocab
    tokenize(text: $p) { id text }
    infer(input: {prompt: $p, mlpComponent: AUTOENCODER_LATENT,
                  loss: {kind: LOGIT_DIFF, targetTokens: [" Mary"], distractorTokens: [" John"]}}) {
      loss objective
      topPredictions(k: 5) { token { id text } logit probability }
      mlp: layerActivations(layer: 1, kind: MLP_NEURON) { shape values }
      resid: layerActivations(layer: 2, kind: RESIDUAL_CHANNEL) { values }
      heads: layerActivations(layer: 0, kind: ATTENTION_HEAD) { values }
      latents: layerActivations(layer: 1, kind: MLP_AUTOENCODER_LATENT) { values }
      activations(nodeIds: [$head]) { values attentionPattern tokenPairAttribution }
      actTimesGrad: topNodes(group: ACT_TIMES_GRAD, k: 8) {
        top { node { id } value } bottom { node { id } value } tokenSums }
      directEffect: topNodes(group: DIRECT_EFFECT, k: 8) { top { node { id } value } tokenSums }
    }
    ablated: infer(input: {prompt: $p, ablations: [{nodeId: $latent, tokenIndex: 3, value: 0}]}) {
      loss latents: layerActivations(layer: 1, kind: MLP_AUTOENCODER_LATENT) { values } }
    table: infer(input: {prompt: $p,
                  loss: {kind: LOGIT_DIFF, targetTokens: [" Mary"], distractorTokens: [" John"]}}) {
      nodeTable(k: 4, scoredTokens: 3) {
        rows { node { id } tokenIndex keyTokenIndex activation writeNorm directEffect actTimesGrad
               upvotedOutputTokens { token { id } value } upvotingInputTokens { token { id } value } }
        tokenSums { embedding mlp attentionFrom attentionTo } }
      directEffectTerms { name layerIndex value }
    }
    live: infer(input: {prompt: $p, layerNormScale: LIVE,
                  loss: {kind: LOGIT_DIFF, targetTokens: [" Mary"], distractorTokens: [" John"]}}) {
      topNodes(group: DIRECT_EFFECT, k: 6) { top { node { id } value } }
      nodeTable(k: 2) { rows { node { id } directEffect actTimesGrad } }
    }
    node(layer: 1, kind: MLP_NEURON, index: 3) {
      scoredTokens(k: 3) { upvotedOutputTokens { token { id } value } } }
  }
  neuron: node(id: $neuron) { activations(prompt: $p) { values maxTokenIndex } }
}"""


@pytest.fixture(scope="module")
async def pair_client(
    native: NativeGPT2Backend, lens: TransformerLensBackend
) -> AsyncIterator[httpx.AsyncClient]:
    registry = ModelRegistry()
    for name, backend in (("native", native), ("lens", lens)):
        registry.add(
            ModelEntry(name, backend.architecture, backend, backend.name, "cpu", "float32")
        )
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client
    registry.close()


def assert_same_answers(a: dict[str, Any], b: dict[str, Any], abs_tolerance: float = 1e-6) -> None:
    """Identical JSON, but the node tables' rows as sets: elements whose values tie within
    float32 noise (a trained model's many neurons at GELU's minimum) may swap places."""
    for answer in (a, b):
        model = answer["data"]["model"]
        model["tableRows"] = model["table"]["nodeTable"].pop("rows")
        model["liveRows"] = model["live"]["nodeTable"].pop("rows")
    for key in ("tableRows", "liveRows"):
        assert_same_rows(a["data"]["model"].pop(key), b["data"]["model"].pop(key), abs_tolerance)
    assert_same_json(a, b, abs_tolerance=abs_tolerance)


def assert_same_rows(
    a: list[dict[str, Any]], b: list[dict[str, Any]], abs_tolerance: float
) -> None:
    def by_element(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {(r["node"]["id"], r.get("tokenIndex"), r.get("keyTokenIndex")): r for r in rows}

    left, right = by_element(a), by_element(b)
    for element in left.keys() & right.keys():
        assert_same_json(left[element], right[element], str(element), abs_tolerance)
    only_left, only_right = left.keys() - right.keys(), right.keys() - left.keys()
    # Ties within float32 noise may order differently on another CPU; each is checked below.
    assert len(only_left) == len(only_right) <= max(4, len(a) // 20)
    for element in only_left:
        row = left[element]
        assert any(
            abs(row[g] - other[g]) < abs_tolerance
            for other in (right[e] for e in only_right)
            for g in row
            if isinstance(row[g], float)
        ), element


def assert_same_json(a: Any, b: Any, where: str = "", abs_tolerance: float = 1e-6) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_json(a[key], b[key], f"{where}.{key}", abs_tolerance)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_json(x, y, f"{where}[{i}]", abs_tolerance)
    elif isinstance(a, float) or isinstance(b, float):
        # Relative: act x grad and probabilities of random weights are far below 1e-4.
        assert a == pytest.approx(b, rel=TOLERANCE, abs=abs_tolerance), where
    else:
        assert a == b, where


async def test_the_same_query_gives_the_same_answers_over_graphql(
    pair_client: httpx.AsyncClient,
) -> None:
    answers = []
    for model in ("native", "lens"):
        body = await graphql(
            pair_client,
            PARITY_QUERY,
            {
                "m": model,
                "p": "When Mary and John went to the store, John gave a drink to",
                "head": f"{model}/attention_head/0/1",
                "latent": f"{model}/mlp_autoencoder_latent/1/7",
                "neuron": f"{model}/mlp_neuron/2/5",
            },
        )
        assert "errors" not in body, body
        # Node ids name their model; the rest must be identical.
        answers.append(json.loads(re.sub(rf'"{model}/', '"', json.dumps(body))))
    assert_same_answers(answers[0], answers[1])


# --- other architectures -------------------------------------------------------------------------


def tiny_hf_model(family: str, folder: Path, gqa: bool = False) -> Any:
    """A random Hugging Face causal LM of another family, saved without tokenizer files: its
    vocabulary holds GPT-2's, so the backend reads it with GPT-2's tokenizer."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(5)
    shape = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72)
    if family == "gemma2":
        # Post-attention and post-feed-forward norms, a gated MLP, grouped-query attention.
        config = Gemma2Config(
            vocab_size=50257,
            max_position_embeddings=64,
            num_key_value_heads=2,
            head_dim=12,
            **shape,
        )
        model = Gemma2ForCausalLM(config)
    elif family == "gpt_neox":
        # Pythia pads GPT-2's 50,257 tokens to 50,304 embedding rows.
        config = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=64, **shape)
        model = GPTNeoXForCausalLM(config)
    else:
        config = LlamaConfig(
            vocab_size=50257,
            max_position_embeddings=64,
            num_key_value_heads=2 if gqa else 4,
            **shape,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model.eval()


def down_projection(model: Any, layer: int) -> torch.nn.Module:
    """The module reading the MLP neurons' values in a Hugging Face model."""
    if model.config.model_type == "gpt_neox":
        return model.gpt_neox.layers[layer].mlp.dense_4h_to_h  # type: ignore[no-any-return]
    return model.model.layers[layer].mlp.down_proj  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
async def test_another_architecture_answers_infer(tmp_path: Path, family: str) -> None:
    hf = tiny_hf_model(family, tmp_path)
    entry = load_model(str(tmp_path), name="other", backend="transformerlens")
    registry = ModelRegistry()
    registry.add(entry)
    prompt = "The quick brown fox jumps over the lazy dog"
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        body = await graphql(
            client,
            """query($p: String!) { model(name: "other") { backend nLayers dMlp nVocab
                 infer(input: {prompt: $p}) { loss
                   layerActivations(layer: 1, kind: MLP_NEURON) { shape values }
                   topNodes(group: ACT_TIMES_GRAD, k: 3) { top { node { id } value } } } } }""",
            {"p": prompt},
        )
    registry.close()
    assert "errors" not in body, body
    model = body["data"]["model"]
    assert model["backend"] == "transformerlens" and entry.architecture.family == family
    assert (model["nLayers"], model["dMlp"], model["nVocab"]) == (2, 72, hf.config.vocab_size)
    # Against Hugging Face's own forward pass on the same tokens.
    tokens = torch.tensor([gpt2_encoding().encode(prompt)])
    seen: list[torch.Tensor] = []
    handle = down_projection(hf, 1).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        expected_loss = float(hf(tokens, labels=tokens).loss)
    handle.remove()
    infer = model["infer"]
    assert infer["loss"] == pytest.approx(expected_loss, abs=TOLERANCE)
    activations = torch.tensor(infer["layerActivations"]["values"])
    assert infer["layerActivations"]["shape"] == [tokens.shape[1], 72]
    assert float((activations - seen[0][0]).abs().max()) < TOLERANCE
    assert len(infer["topNodes"]["top"]) == 3


def test_a_folder_with_tokenizer_files_reads_them(tmp_path: Path) -> None:
    tiny_hf_model("llama", tmp_path)
    gpt2_hf_tokenizer().save_pretrained(tmp_path)
    tokenizer = TransformerLensBackend.load(str(tmp_path)).tokenizer
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.n_vocab == 50257
    encoding = gpt2_encoding()
    text = "Hello <|endoftext|> wörld \U0001f600 code:\n\tx = 1"
    assert tokenizer.encode(text) == encoding.encode(text, allowed_special="all")
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for token in range(0, 50257, 101):  # byte-level pieces, partial UTF-8 characters included
        assert tokenizer.decode_single_token_bytes(token) == encoding.decode_single_token_bytes(
            token
        )


def test_what_an_architecture_lacks_is_listed_with_its_reason(tmp_path: Path) -> None:
    tiny_hf_model("gpt_neox", tmp_path / "neox")
    tiny_hf_model("llama", tmp_path / "llama", gqa=True)
    neox = TransformerLensBackend.load(str(tmp_path / "neox"))
    llama = TransformerLensBackend.load(str(tmp_path / "llama"))
    assert set(neox.unsupported) == {Location.RESID_MID}
    assert "parallel" in neox.unsupported[Location.RESID_MID]
    assert set(llama.unsupported) == {Location.ATTN_K, Location.ATTN_V, Location.MLP_PRE}
    assert "gated" in llama.unsupported[Location.MLP_PRE]
    with pytest.raises(UnavailableError, match="resid_mid is not available") as raised:
        neox.forward(
            ForwardRequest(tokens=((1, 2),), save=frozenset({HookPoint(0, Location.RESID_MID)}))
        )
    assert raised.value.code == "UNSUPPORTED"


def test_metadata_only_reads_the_config(tmp_path: Path) -> None:
    tiny_hf_model("llama", tmp_path)
    entry = load_model(str(tmp_path), with_weights=False, backend="transformerlens")
    assert entry.backend is None and entry.backend_name == "transformerlens"
    assert entry.architecture == TransformerLensBackend.load(str(tmp_path)).architecture


async def test_an_unsupported_location_is_an_unsupported_error_over_graphql(tmp_path: Path) -> None:
    tiny_hf_model("llama", tmp_path, gqa=True)
    registry = ModelRegistry()
    registry.add(load_model(str(tmp_path), name="gqa", backend="transformerlens"))
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        # An attention score's trace needs the rotated queries and keys, which a rotary
        # model's hooks do not give.
        body = await graphql(
            client,
            """{ model(name: "gqa") { infer(input: {prompt: "Hello there", trace: {
                 upstreamNodeId: "gqa/attention_head/0/1", tokenIndex: 1, keyTokenIndex: 0,
                 attentionTraceType: Q}}) { topNodes(group: ACT_TIMES_GRAD) { top { value } } } } }""",
        )
        assert error_codes(body) == ["UNSUPPORTED"]
        # Heads share their values (grouped-query attention): their activations and patterns
        # answer, token-pair attribution is null.
        heads = await graphql(
            client,
            """{ model(name: "gqa") { infer(input: {prompt: "Hello there"}) {
                 activations(nodeIds: ["gqa/attention_head/0/1"]) {
                   values attentionPattern tokenPairAttribution } } } }""",
        )
        assert "errors" not in heads, heads
        [head] = heads["data"]["model"]["infer"]["activations"]
        assert head["attentionPattern"] and head["tokenPairAttribution"] is None
        fine = await graphql(
            client,
            """{ model(name: "gqa") { infer(input: {prompt: "Hello there"}) { loss
                 layerActivations(layer: 0, kind: MLP_NEURON) { shape } } } }""",
        )
        assert "errors" not in fine, fine
    registry.close()


def test_rotary_score_traces_are_refused(tmp_path: Path) -> None:
    tiny_hf_model("llama", tmp_path)
    llama = TransformerLensBackend.load(str(tmp_path))
    trace = Trace(
        point=HookPoint(0, Location.ATTN_Q),
        position=2,
        index=(1,),
        attention=AttentionTrace.QK,
        key_position=0,
    )
    with pytest.raises(UnavailableError, match="rotary"):
        llama.forward(ForwardRequest(tokens=((1, 2, 3),), trace=trace))


def test_without_transformer_lens_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['transformer_lens'] = None\n"
        "from interpql.loaders.models import load_model\n"
        "try:\n    load_model('random:tiny', backend='transformerlens')\n"
        "except ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "pip install 'interpql[transformerlens]'" in result.stdout


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of native-gpt2, transformerlens"):
        load_model("random:tiny", backend="jax")


def test_next_token_loss_matches_cross_entropy(lens: TransformerLensBackend) -> None:
    result = lens.forward(
        ForwardRequest(tokens=(tuple(PROMPTS[2]),), backward=LossSpec(kind=LossKind.ZERO))
    )
    expected = F.cross_entropy(result.logits[0, :-1], torch.tensor(PROMPTS[2][1:]))
    assert float(result.next_token_loss[0]) == pytest.approx(float(expected), abs=1e-5)
    assert float(result.backward_loss[0]) == 0.0  # type: ignore[index]


async def test_both_backends_serve_the_demo_alike() -> None:
    """The shipped demo through both backends, with its autoencoders: the same answers."""
    from interpql.demo.artifacts import DEMO_DIR, load_demo_autoencoders

    registry = ModelRegistry()
    for name, backend in (("native", "native-gpt2"), ("lens", "transformerlens")):
        entry = load_model(str(DEMO_DIR), name=name, backend=backend)
        for (reads, layer), ae in load_demo_autoencoders().items():
            entry.require_backend().attach_autoencoder(layer, AutoencoderInput(reads), ae)
        registry.add(entry)
    transport = httpx.ASGITransport(app=create_app(registry))
    answers = []
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for model in ("native", "lens"):
            body = await graphql(
                client,
                PARITY_QUERY,
                {
                    "m": model,
                    "p": "def main(argv):\n    for arg in argv:\n        print(arg)",
                    "head": f"{model}/attention_head/1/2",
                    "latent": f"{model}/mlp_autoencoder_latent/1/7",
                    "neuron": f"{model}/mlp_neuron/1/149",
                },
            )
            assert "errors" not in body, body
            answers.append(json.loads(re.sub(rf'"{model}/', '"', json.dumps(body))))
    registry.close()
    # The issue's 1e-4 (fp32): a trained model's activations are larger than random ones'.
    assert_same_answers(answers[0], answers[1], abs_tolerance=1e-4)


# --- generation with Hugging Face's key-value cache ---------------------------------------------


def test_cached_generation_equals_rerunning_every_step(
    lens: TransformerLensBackend, native: NativeGPT2Backend
) -> None:
    tokens = PROMPTS[0]
    spec = edited_spec("small", tokens, 16)
    cached, rerun = generated_both_ways(lens, spec)
    assert cached.unsteered == rerun.unsteered and cached.steered == rerun.steered
    assert cached.steered != cached.unsteered
    native_cached, _ = generated_both_ways(native, spec)  # the same model, our own code
    assert native_cached.steered == cached.steered


@pytest.mark.parametrize("gqa", [False, True])
def test_cached_generation_on_a_rotary_model(tmp_path: Path, gqa: bool) -> None:
    """Rotary positions continue from the cache's length; grouped-query keys and values are
    cached per key-value head."""
    tiny_hf_model("llama", tmp_path, gqa=gqa)
    backend = TransformerLensBackend.load(str(tmp_path))
    spec = GenerationSpec(
        model="other",
        prompt="",
        tokens=tuple(PROMPTS[2]),
        max_tokens=12,
        ablations=(Ablation(node=NodeRef("other", "mlp_neuron", 0, 3), value=0.0, position=1),),
    )
    cached, rerun = generated_both_ways(backend, spec)
    assert cached.unsteered == rerun.unsteered and len(cached.unsteered) == 12


def test_scored_key_tokens_of_grouped_query_heads(tmp_path: Path) -> None:
    """Each query head's key tokens come from the key-value head it reads (Hugging Face's own
    k_proj rows), for the heads past the number of key-value heads too, over HTTP from a real
    `interpql serve` of the folder (where they answered INTERNAL_SERVER_ERROR)."""
    hf = tiny_hf_model("llama", tmp_path / "llama", gqa=True)
    attention = hf.model.layers[1].self_attn
    heads, kv_heads = hf.config.num_attention_heads, hf.config.num_key_value_heads
    d_head = hf.config.hidden_size // heads
    embeddings = hf.model.embed_tokens.weight.detach()
    args = ("--backend", "transformerlens", "--model", str(tmp_path / "llama"), "--name", "other")
    with serve(*args, "--explanation-store", str(tmp_path / "explanations.sqlite")) as url:
        for head in range(heads):
            query = (
                f'{{ node(id: "other/attention_head/1/{head}") {{ scoredTokens(k: 5) {{ '
                "upvotingKeyTokens { token { id } value } "
                "upvotingInputTokens { token { id } value } } } }"
            )
            body = httpx.post(url + "/graphql", json={"query": query}, timeout=60).json()
            assert "errors" not in body, body
            scored = body["data"]["node"]["scoredTokens"]
            kv = head // (heads // kv_heads)
            w_k = attention.k_proj.weight.detach()[kv * d_head : (kv + 1) * d_head]
            w_q = attention.q_proj.weight.detach()[head * d_head : (head + 1) * d_head]
            for field, weight in (("upvotingKeyTokens", w_k), ("upvotingInputTokens", w_q)):
                expected = torch.topk((embeddings @ weight.T).norm(dim=-1), 5)
                assert [t["token"]["id"] for t in scored[field]] == expected.indices.tolist()
                values = [t["value"] for t in scored[field]]
                assert values == pytest.approx(expected.values.tolist(), rel=1e-5)


async def test_what_writes_through_norms_or_gates_mean_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    """Gemma-2 rescales each sublayer's output (its post-attention and post-feed-forward norms)
    before the residual stream: fields read off W_O and W_out answer UNSUPPORTED, saying so,
    while rankings by activation and act x grad answer. A gated MLP's neuron reads no one
    direction: its upvoting input tokens are null, and it is no V trace's downstream node;
    its output tokens are still W_U @ its down_proj column (Hugging Face's own weights)."""
    registry = ModelRegistry()
    for family in ("gemma2", "llama", "gpt_neox"):
        tiny_hf_model(family, tmp_path / family)
        registry.add(load_model(str(tmp_path / family), name=family, backend="transformerlens"))
    flags = {
        name: (
            registry.get(name).architecture.gated_mlp,
            registry.get(name).architecture.post_sublayer_norms,
        )
        for name in ("gemma2", "llama", "gpt_neox")
    }
    assert flags == {"gemma2": (True, True), "llama": (True, False), "gpt_neox": (False, False)}
    for family in flags:  # the config alone (--no-model) says the same
        config_only = load_model(
            str(tmp_path / family), with_weights=False, backend="transformerlens"
        )
        assert config_only.architecture == registry.get(family).architecture
    prompt = "The quick brown fox"
    refused = {
        "topNodes": "infer(input: {prompt: $p}) { topNodes(group: WRITE_NORM) { top { value } } }",
        "directEffect": "infer(input: {prompt: $p}) { topNodes(group: DIRECT_EFFECT) { top { value } } }",
        "nodeTable": "infer(input: {prompt: $p}) { nodeTable(k: 2) { rows { activation } } }",
        "steering": 'infer(input: {prompt: $p, steering: [{nodeId: "gemma2/mlp_neuron/0/1", '
        "strength: 2}]}) { loss }",
    }
    refused["headValues"] = (
        'infer(input: {prompt: $p}) { activations(nodeIds: ["gemma2/attention_head/1/0"]) '
        "{ values } }"
    )
    refused["headLayer"] = (
        "infer(input: {prompt: $p}) { layerActivations(layer: 1, kind: ATTENTION_HEAD) { shape } }"
    )
    gemma = tiny_hf_model("gemma2", tmp_path / "gemma2-eager")
    hf = tiny_hf_model("llama", tmp_path / "llama")
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        # A head's values are its write's norm, rescaled before the stream: refused. Its
        # pattern stands, and is Hugging Face's own attention weights.
        pattern = await graphql(
            client,
            'query($p: String!) { node(id: "gemma2/attention_head/1/0") { '
            "activations(prompt: $p) { tokens { id } attentionPattern } } }",
            {"p": prompt},
        )
        assert "errors" not in pattern, pattern
        found = pattern["data"]["node"]["activations"]
        gemma.config._attn_implementation = "eager"
        with torch.no_grad():
            ids = torch.tensor([[t["id"] for t in found["tokens"]]])
            expected = gemma(ids, output_attentions=True).attentions[1][0, 0]
        np.testing.assert_allclose(np.array(found["attentionPattern"]), expected.numpy(), atol=2e-5)
        for field, query in refused.items():
            body = await graphql(
                client,
                'query($p: String!) { model(name: "gemma2") { ' + query + " } }",
                {"p": prompt},
            )
            assert error_codes(body) == ["UNSUPPORTED"], (field, body)
            assert "post-attention and post-feed-forward norms" in body["errors"][0]["message"]
        for node in ("gemma2/mlp_neuron/1/3", "gemma2/attention_head/1/0"):
            body = await graphql(
                client, "query($n: ID!) { node(id: $n) { similarNodes { cosine } } }", {"n": node}
            )
            assert error_codes(body) == ["UNSUPPORTED"]
        exact = await graphql(
            client,
            'query($p: String!) { model(name: "gemma2") { infer(input: {prompt: $p}) { loss '
            "byGrad: topNodes(group: ACT_TIMES_GRAD, k: 3) { top { value } } "
            "byActivation: topNodes(group: ACTIVATION, k: 3) { top { value } } } } }",
            {"p": prompt},
        )
        assert "errors" not in exact, exact
        scored = await graphql(
            client,
            '{ node(id: "llama/mlp_neuron/1/5") { scoredTokens(k: 5) { '
            "upvotingInputTokens { value } upvotedOutputTokens { token { id } value } } } }",
        )
        assert "errors" not in scored, scored
        tokens = scored["data"]["node"]["scoredTokens"]
        assert tokens["upvotingInputTokens"] is None
        down = hf.model.layers[1].mlp.down_proj.weight.detach()[:, 5]
        expected = torch.topk(hf.lm_head.weight.detach() @ down, 5)
        assert [
            t["token"]["id"] for t in tokens["upvotedOutputTokens"]
        ] == expected.indices.tolist()
        assert [t["value"] for t in tokens["upvotedOutputTokens"]] == pytest.approx(
            expected.values.tolist(), rel=1e-4
        )
        trace = await graphql(
            client,
            'query($p: String!) { model(name: "llama") { infer(input: {prompt: $p, trace: {'
            "upstreamNodeId: "
            '"llama/attention_head/0/1", tokenIndex: -1, keyTokenIndex: 0, '
            'attentionTraceType: V, downstreamNodeId: "llama/mlp_neuron/1/5"}}) '
            "{ topNodes(group: ACT_TIMES_GRAD) { top { value } } } } }",
            {"p": prompt},
        )
        assert error_codes(trace) == ["UNSUPPORTED"]
        assert "gated MLP" in trace["errors"][0]["message"]
    registry.close()
