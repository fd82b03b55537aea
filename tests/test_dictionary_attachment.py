"""SAELens SAEs and transcoders (and circuit-tracer transcoder sets) attached to a model: inside
the forward pass of both backends against the plain-torch reference with the dictionary applied
by hand (numpy formulas, tests/test_dictionaries.py), and as nodes over GraphQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from interpql.backends.base import Backend, ForwardRequest, HookPoint, Location
from interpql.backends.dictionaries.saelens import saelens_config, write_saelens
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.models import attach_dictionaries
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import SMALL, error_codes, graphql
from tests.reference import reference_forward
from tests.test_dictionaries import random_tensors
from tests.test_dictionaries import reference as dictionary_reference

TOKENS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
PROMPT = gpt2_encoding().decode(TOKENS)
D_SAE = 24
K = 6  # tests/test_dictionaries.py's TopK k


def state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in random_model(SMALL, seed=21).state_dict().items()}


def native(weights: dict[str, torch.Tensor]) -> NativeGPT2Backend:
    model = random_model(SMALL, seed=0)
    model.load_state_dict(weights)
    return NativeGPT2Backend(model)


def write_set(
    root: Path,
    architecture: str,
    hook: str,
    *,
    hook_out: str | None = None,
    d_in: int = SMALL.d_model,
    normalize: str = "none",
    seed: int = 0,
) -> dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """A folder of per-layer SAELens folders (as a release holds them); `hook`'s L is the layer.
    Returns each layer's (config, tensors)."""
    written = {}
    for layer in range(SMALL.n_layers):
        config = saelens_config(
            architecture,
            d_in,
            D_SAE,
            hook.replace("L", str(layer)),
            d_out=SMALL.d_model if hook_out else None,
            hook_name_out=hook_out.replace("L", str(layer)) if hook_out else None,
            normalize_activations=normalize,
            k=K if architecture == "topk" else None,
        )
        tensors = random_tensors(
            architecture, d_in, d_in if not hook_out else SMALL.d_model, D_SAE, seed + layer
        )
        write_saelens(root / f"layer_{layer}", config, tensors)
        written[layer] = (config, tensors)
    return written


def apply(
    written: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]], layer: int, x: torch.Tensor
) -> tuple[np.ndarray, torch.Tensor]:
    """(latents, output) of layer's dictionary on x [position, d_in], by the numpy formulas."""
    config, tensors = written[layer]
    arrays = {k: v.double().numpy() for k, v in tensors.items()}
    latents, out = dictionary_reference(
        config["architecture"], arrays, x.detach().double().numpy(), config, None
    )
    return latents, torch.from_numpy(out)


def transformerlens(weights: dict[str, torch.Tensor]) -> Backend:
    from interpql.backends.gpt2.loading import save_hf_folder
    from interpql.backends.transformerlens import TransformerLensBackend

    with tempfile.TemporaryDirectory() as folder:
        save_hf_folder(Path(folder), SMALL, weights)
        return TransformerLensBackend.load(folder)


BACKENDS: dict[str, Callable[[dict[str, torch.Tensor]], Backend]] = {
    "native": native,
    "transformerlens": transformerlens,
}


def entry_of(backend: Backend, name: str = "m") -> ModelEntry:
    return ModelEntry(name, SMALL.architecture, backend, backend.name, "cpu", "float32")


def run(backend: Backend, name: str, error_term: bool = True) -> torch.Tensor:
    """The logits with every layer's latents of set `name` saved (so spliced in)."""
    save = frozenset(HookPoint(layer, Location.LATENTS, name) for layer in range(SMALL.n_layers))
    result = backend.forward(
        ForwardRequest(tokens=(tuple(TOKENS),), save=save, autoencoder_error_term=error_term)
    )
    return result


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("hook", ["blocks.L.mlp.hook_in", "blocks.L.ln2.hook_normalized"])
def test_transcoders_replace_the_mlp(tmp_path: Path, backend_name: str, hook: str) -> None:
    """With the error term the logits are the original's; without it, the model's, with every
    MLP's output replaced by its transcoder's output on the MLP's (normalized) input."""
    weights = state()
    written = write_set(
        tmp_path / "tc", "skip_transcoder", hook, hook_out="blocks.L.hook_mlp_out", seed=3
    )
    backend = BACKENDS[backend_name](weights)
    attach_dictionaries(entry_of(backend), "tc", str(tmp_path / "tc"))

    captured: dict[int, torch.Tensor] = {}

    def by_hand(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if name == "mlp_in":
            reads = act
            if hook.endswith("ln2.hook_normalized"):
                p = f"xf_layers.{layer}.ln_2."
                reads = (act - weights[p + "bias"].double()) / weights[p + "weight"].double()
            captured[layer] = reads
        if name == "mlp_out" and replace:
            return apply(written, layer, captured[layer])[1]
        return act

    replace = False
    original, _ = reference_forward(SMALL, weights, TOKENS, edit=by_hand)
    kept = run(backend, "tc")
    torch.testing.assert_close(kept.logits[0].double(), original, atol=1e-5, rtol=0)
    for layer in range(SMALL.n_layers):
        latents = apply(written, layer, captured[layer])[0]
        saved = kept.activations[HookPoint(layer, Location.LATENTS, "tc")][0]
        np.testing.assert_allclose(saved.numpy(), latents, atol=1e-4)
        assert (latents > 0).any()

    replace = True
    replaced, _ = reference_forward(SMALL, weights, TOKENS, edit=by_hand)
    dropped = run(backend, "tc", error_term=False)
    torch.testing.assert_close(dropped.logits[0].double(), replaced, atol=1e-4, rtol=0)
    assert (replaced - original).abs().max() > 1e-2  # the replacement changed something


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    ("architecture", "normalize"), [("topk", "none"), ("jumprelu", "layer_norm")]
)
def test_residual_saes_rebuild_the_stream(
    tmp_path: Path, backend_name: str, architecture: str, normalize: str
) -> None:
    weights = state()
    written = write_set(
        tmp_path / "res", architecture, "blocks.L.hook_resid_post", normalize=normalize
    )
    backend = BACKENDS[backend_name](weights)
    attach_dictionaries(entry_of(backend), "res", str(tmp_path / "res"))
    captured: dict[int, torch.Tensor] = {}

    def by_hand(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if name != "resid_post":
            return act
        captured[layer] = act
        return apply(written, layer, act)[1] if replace else act

    replace = False
    original, _ = reference_forward(SMALL, weights, TOKENS, edit=by_hand)
    kept = run(backend, "res")
    torch.testing.assert_close(kept.logits[0].double(), original, atol=1e-5, rtol=0)
    for layer in range(SMALL.n_layers):
        saved = kept.activations[HookPoint(layer, Location.LATENTS, "res")][0]
        np.testing.assert_allclose(
            saved.numpy(), apply(written, layer, captured[layer])[0], atol=1e-4
        )
    replace = True
    replaced, _ = reference_forward(SMALL, weights, TOKENS, edit=by_hand)
    dropped = run(backend, "res", error_term=False)
    torch.testing.assert_close(dropped.logits[0].double(), replaced, atol=1e-4, rtol=0)


HOOKS = [
    "hook_resid_pre",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]


def activations_at(weights: dict[str, torch.Tensor], hook: str) -> dict[int, torch.Tensor]:
    """Each layer's activation at `hook` on TOKENS, by the plain-torch reference."""
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        seen[(layer, name)] = act
        return act

    attention: dict[tuple[int, str], torch.Tensor] = {}
    reference_forward(SMALL, weights, TOKENS, edit=keep, attention=attention)
    out = {}
    for layer in range(SMALL.n_layers):
        before = seen[(0, "embedding")] if layer == 0 else seen[(layer - 1, "resid_post")]
        at = {
            "hook_resid_pre": before,
            "attn.hook_z": attention[(layer, "z")].flatten(1),
            "hook_attn_out": seen[(layer, "attn_out")],
            "hook_resid_mid": before + seen[(layer, "attn_out")],
            "mlp.hook_post": seen[(layer, "mlp_post")],
            "hook_mlp_out": seen[(layer, "mlp_out")],
            "hook_resid_post": seen[(layer, "resid_post")],
        }
        out[layer] = at[hook]
    return out


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("hook", HOOKS)
def test_an_sae_at_each_hook_reads_what_the_model_holds_there(
    tmp_path: Path, backend_name: str, hook: str
) -> None:
    """Served latents are the formulas applied to the reference's activation at the hook; with
    the error term kept, the logits are the bare model's."""
    weights = state()
    width = {"attn.hook_z": SMALL.n_heads * SMALL.d_head, "mlp.hook_post": SMALL.d_mlp}
    written = write_set(
        tmp_path / "sae", "standard", f"blocks.L.{hook}", d_in=width.get(hook, SMALL.d_model)
    )
    backend = BACKENDS[backend_name](weights)
    attach_dictionaries(entry_of(backend), "sae", str(tmp_path / "sae"))
    original, _ = reference_forward(SMALL, weights, TOKENS)
    kept = run(backend, "sae")
    torch.testing.assert_close(kept.logits[0].double(), original, atol=1e-5, rtol=0)
    for layer, x in activations_at(weights, hook).items():
        latents = apply(written, layer, x)[0]
        saved = kept.activations[HookPoint(layer, Location.LATENTS, "sae")][0]
        np.testing.assert_allclose(saved.numpy(), latents, atol=1e-4)
        assert (latents > 0).mean() > 0.1


def write_circuit_tracer_set(root: Path, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """circuit-tracer's layout: config.yaml and layer_{i}.safetensors, W_enc [d_tc, d_model]."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\n"
    )
    layers = {}
    for layer in range(SMALL.n_layers):
        t = random_tensors(
            "jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, seed + layer
        )
        layers[layer] = t
        save_file(
            {
                "W_enc": t["W_enc"].T.contiguous(),
                "W_dec": t["W_dec"],
                "b_enc": t["b_enc"],
                "b_dec": t["b_dec"],
                "W_skip": t["W_skip"],
                "activation_function.threshold": t["threshold"],
            },
            str(root / f"layer_{layer}.safetensors"),
        )
    return layers


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return state()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dictionaries")
    write_circuit_tracer_set(root / "tc", seed=40)
    write_set(root / "res", "topk", "blocks.L.hook_resid_post", seed=50)
    write_set(
        root / "z",
        "standard",
        "blocks.L.attn.hook_z",
        d_in=SMALL.n_heads * SMALL.d_head,
        normalize="layer_norm",
        seed=60,
    )
    write_set(root / "attn", "jumprelu", "blocks.L.hook_attn_out", seed=70)
    return {name: root / name for name in ("tc", "res", "z", "attn")}


@pytest.fixture(scope="module")
async def client(
    weights: dict[str, torch.Tensor], folders: dict[str, Path]
) -> AsyncIterator[httpx.AsyncClient]:
    entry = entry_of(native(weights))
    for name, folder in folders.items():
        attach_dictionaries(entry, name, str(folder))
    registry = ModelRegistry()
    registry.add(entry)
    app = create_app(registry, settings=Settings(max_top_k=10_000, cached_runs=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        yield client
    registry.close()


async def test_dictionaries_are_listed_and_their_latents_are_nodes(
    client: httpx.AsyncClient, folders: dict[str, Path]
) -> None:
    body = await graphql(
        client,
        """{ model(name: "m") {
              dictionaries { name layer hookIn hookOut transcoder architecture dIn dOut nLatents
                             source }
              layer(index: 1) { nodeKinds { kind dictionary count } }
              node(layer: 2, kind: DICTIONARY_LATENT, dictionary: "res", index: 3) { id } }
            node(id: "m/tc/1/7") { kind dictionary layerIndex index } }""",
    )
    assert "errors" not in body, body
    found = body["data"]["model"]
    by_name = {(d["name"], d["layer"]): d for d in found["dictionaries"]}
    assert len(by_name) == 4 * SMALL.n_layers
    assert by_name[("tc", 1)] == {
        "name": "tc",
        "layer": 1,
        "hookIn": "blocks.1.mlp.hook_in",
        "hookOut": "blocks.1.hook_mlp_out",
        "transcoder": True,
        "architecture": "jumprelu_skip_transcoder",
        "dIn": SMALL.d_model,
        "dOut": SMALL.d_model,
        "nLatents": D_SAE,
        "source": str(folders["tc"]),
    }
    assert by_name[("z", 0)]["hookIn"] == by_name[("z", 0)]["hookOut"] == "blocks.0.attn.hook_z"
    kinds = {(k["kind"], k["dictionary"]): k["count"] for k in found["layer"]["nodeKinds"]}
    assert kinds[("DICTIONARY_LATENT", "res")] == D_SAE
    assert kinds[("MLP_NEURON", None)] == SMALL.d_mlp
    assert found["node"]["id"] == "m/res/2/3"
    assert body["data"]["node"] == {
        "kind": "DICTIONARY_LATENT",
        "dictionary": "tc",
        "layerIndex": 1,
        "index": 7,
    }


async def test_latents_served_are_the_formulas(
    client: httpx.AsyncClient, weights: dict[str, torch.Tensor]
) -> None:
    tc = write_circuit_tracer_set_reference(weights)
    body = await graphql(
        client,
        """query($p: String!) { model(name: "m") { infer(input: {prompt: $p}) {
              layerActivations(layer: 2, kind: DICTIONARY_LATENT, dictionary: "tc") { values }
              activations(nodeIds: ["m/tc/2/0", "m/tc/2/1"]) { values } } } }""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    served = np.array(body["data"]["model"]["infer"]["layerActivations"]["values"])
    np.testing.assert_allclose(served, tc[2], atol=1e-4)
    per_node = body["data"]["model"]["infer"]["activations"]
    np.testing.assert_allclose(per_node[1]["values"], tc[2][:, 1], atol=1e-4)


def write_circuit_tracer_set_reference(weights: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """The latents of the fixture's circuit-tracer set on TOKENS, by numpy, per layer."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if name == "mlp_in":
            captured[layer] = act
        return act

    reference_forward(SMALL, weights, TOKENS, edit=keep)
    out = {}
    for layer in range(SMALL.n_layers):
        t = {
            k: v.double().numpy()
            for k, v in random_tensors(
                "jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, 40 + layer
            ).items()
        }
        pre = captured[layer].double().numpy() @ t["W_enc"] + t["b_enc"]
        out[layer] = np.maximum(pre, 0) * (pre > t["threshold"])
    return out


LOSS = 'loss: {kind: LOGIT_DIFF, targetTokens: [" the"], distractorTokens: [" a"]}'


async def test_an_ablated_transcoder_latent_is_the_reference_with_its_write_removed(
    client: httpx.AsyncClient, weights: dict[str, torch.Tensor]
) -> None:
    """Zeroing latent j of layer 1's transcoder at every position removes a_j W_dec[j] from
    the MLP's output there (the error term keeps the rest as it was)."""
    latents = write_circuit_tracer_set_reference(weights)[1]
    j = int(np.argmax(latents.sum(0)))
    w_dec = random_tensors("jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, 41)[
        "W_dec"
    ].double()

    def ablated(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if (layer, name) == (1, "mlp_out"):
            return act - torch.from_numpy(latents[:, j])[:, None] * w_dec[j]
        return act

    logits, _ = reference_forward(SMALL, weights, TOKENS, edit=ablated)
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(TOKENS[1:])[:, None])
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
              ablations: [{{nodeId: "m/tc/1/{j}", value: 0}}]}}) {{ loss }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    assert body["data"]["model"]["infer"]["loss"] == pytest.approx(
        -float(expected.mean()), abs=1e-4
    )


async def test_act_times_grad_of_a_latent_is_the_finite_difference(
    client: httpx.AsyncClient, weights: dict[str, torch.Tensor]
) -> None:
    """ACT_TIMES_GRAD of transcoder latent j at token p: a d(objective)/da, against a central
    difference of the reference with a's write scaled by 1 +- h."""
    latents = write_circuit_tracer_set_reference(weights)[2]
    p = len(TOKENS) - 1
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
              mlpDictionary: "tc", layerNormScale: LIVE, {LOSS}}}) {{
              topNodes(group: ACT_TIMES_GRAD, k: 1000, tokenIndex: {p}) {{
                top {{ node {{ id }} value }} }}
            }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    tops = [
        t
        for t in body["data"]["model"]["infer"]["topNodes"]["top"]
        if "/tc/2/" in t["node"]["id"] and t["value"] != 0
    ][:3]
    assert tops, body
    w_dec = random_tensors("jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, 42)[
        "W_dec"
    ].double()
    the, a = gpt2_encoding().encode(" the")[0], gpt2_encoding().encode(" a")[0]
    for top in tops:
        j = int(top["node"]["id"].rsplit("/", 1)[1])

        def objective(h: float, j: int = j) -> float:
            def scaled(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
                if (layer, name) == (2, "mlp_out"):
                    act = act.clone()
                    act[p] += h * latents[p, j] * w_dec[j]
                return act

            logits, _ = reference_forward(SMALL, weights, TOKENS, edit=scaled)
            return float(logits[-1, the] - logits[-1, a])

        step = 1e-3
        fd = (objective(step) - objective(-step)) / (2 * step)
        assert top["value"] == pytest.approx(fd, rel=1e-3, abs=1e-6)


async def test_direct_effects_with_dictionaries_add_up_to_the_objective(
    client: httpx.AsyncClient,
) -> None:
    """Transcoders for the MLPs and an attention SAE (at attn.hook_z, layer-normalising, or at
    hook_attn_out): every latent's direct effect and every term (dictionary bias, skip, error,
    output biases) sum to the logit difference."""
    n = len(TOKENS)
    for attention in ("z", "attn"):
        body = await graphql(
            client,
            f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
                  mlpDictionary: "tc", attentionDictionary: "{attention}", {LOSS}}}) {{
                objective
                topNodes(group: DIRECT_EFFECT, k: 10000, tokenIndex: {n - 1}) {{
                  top {{ node {{ id }} value }} }}
                directEffectTerms(tokenIndex: {n - 1}) {{ name value }} }} }} }}""",
            {"p": PROMPT},
        )
        assert "errors" not in body, body
        found = body["data"]["model"]["infer"]
        kinds = {t["node"]["id"].split("/")[1] for t in found["topNodes"]["top"]}
        assert kinds == {"token_embedding", "tc", attention}
        names = {t["name"] for t in found["directEffectTerms"]}
        assert {"dictionary bias", "dictionary error", "transcoder skip"} <= names
        total = sum(t["value"] for t in found["topNodes"]["top"])
        total += sum(t["value"] for t in found["directEffectTerms"])
        assert total == pytest.approx(found["objective"], abs=1e-5)
        assert abs(found["objective"]) > 1e-3


async def test_a_residual_dictionary_decomposes_the_stream_and_is_not_summed(
    client: httpx.AsyncClient,
) -> None:
    """With residualDictionary "res" (at hook_resid_post of every layer) ranked too: the
    writers' direct effects and terms still add up to the objective, and tokenSums is the
    writers' sum; at each layer, its latents plus its bias and error (`residual` terms) add up
    to everything written up to that layer's hook_resid_post (the audit summed both)."""
    n = len(TOKENS)
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
              mlpDictionary: "tc", attentionDictionary: "attn", residualDictionary: "res",
              {LOSS}}}) {{
            objective
            topNodes(group: DIRECT_EFFECT, k: 10000, tokenIndex: {n - 1}) {{
              top {{ node {{ id }} value }} tokenSums }}
            directEffectTerms(tokenIndex: {n - 1}) {{ name layerIndex value residual }} }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    found = body["data"]["model"]["infer"]
    nodes = [(t["node"]["id"].split("/"), t["value"]) for t in found["topNodes"]["top"]]
    writers = [(int(layer), v) for (_, kind, layer, _), v in nodes if kind != "res"]
    written = sum(v for _, v in writers)
    assert found["topNodes"]["tokenSums"][n - 1] == pytest.approx(written, abs=1e-5)
    terms = found["directEffectTerms"]
    assert {t["layerIndex"] for t in terms if t["residual"]} == set(range(SMALL.n_layers))
    writes = [t for t in terms if not t["residual"]]
    assert written + sum(t["value"] for t in writes) == pytest.approx(found["objective"], abs=1e-5)
    for layer in range(SMALL.n_layers):
        decomposed = sum(v for (_, kind, at, _), v in nodes if kind == "res" and int(at) == layer)
        decomposed += sum(t["value"] for t in terms if t["residual"] and t["layerIndex"] == layer)
        before = sum(v for at, v in writers if at <= layer)
        before += sum(
            t["value"] for t in writes if t["layerIndex"] is not None and t["layerIndex"] <= layer
        )
        assert decomposed == pytest.approx(before, abs=1e-5), layer


async def test_the_node_table_ranks_the_chosen_dictionaries(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
              mlpDictionary: "tc", attentionDictionary: "attn", residualDictionary: "res",
              {LOSS}}}) {{
              nodeTable(k: 5) {{ rows {{ node {{ id dictionary }} }} }} }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    rows = body["data"]["model"]["infer"]["nodeTable"]["rows"]
    seen = {row["node"]["dictionary"] for row in rows}
    assert {"tc", "attn", "res"} <= seen


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mlpDictionary", "res", "residual side"),
        ("attentionDictionary", "tc", "mlp side"),
        ("mlpDictionary", "nope", "no dictionary set 'nope'"),
    ],
)
async def test_a_dictionary_on_the_wrong_side_is_refused(
    client: httpx.AsyncClient, field: str, value: str, message: str
) -> None:
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
              {field}: "{value}"}}) {{ topNodes(group: ACTIVATION, k: 3) {{ top {{ value }} }}
            }} }} }}""",
        {"p": PROMPT},
    )
    assert error_codes(body) == ["INVALID_ARGUMENT"], body
    assert message in body["errors"][0]["message"]


async def test_a_dictionary_kind_needs_its_name(client: httpx.AsyncClient) -> None:
    body = await graphql(
        client, '{ model(name: "m") { node(layer: 0, kind: DICTIONARY_LATENT, index: 0) { id } } }'
    )
    assert error_codes(body) == ["INVALID_ARGUMENT"], body


def test_bad_dictionary_folders_stop_the_server_naming_the_file(tmp_path: Path) -> None:
    """Start-up refuses what does not fit the model (random:tiny, d_model 64, 2 layers) with
    the file's name and exit status 2."""
    width = 64
    cases = {
        "width": saelens_config("standard", width + 1, D_SAE, "blocks.0.hook_resid_post"),
        "hook": saelens_config("standard", width, D_SAE, "blocks.0.hook_nowhere"),
        "layer": saelens_config("standard", width, D_SAE, "blocks.9.hook_resid_post"),
        "mlp-in": saelens_config("standard", width, D_SAE, "blocks.0.mlp.hook_in"),
        "mlp_neuron": saelens_config("standard", width, D_SAE, "blocks.0.hook_resid_post"),
        # Refused as "already has one in layer 0", as if the name were free.
        "mlp_autoencoder_latent": saelens_config(
            "standard", width, D_SAE, "blocks.0.hook_resid_post"
        ),
    }
    for name, config in cases.items():
        folder = tmp_path / name
        d_in = config["d_in"]
        write_saelens(folder, config, random_tensors("standard", d_in, d_in, D_SAE, 0))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "interpql.cli",
                "serve",
                "--model",
                "random:tiny",
                "--port",
                "0",
                "--dictionary",
                f"{name}={folder}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, (name, done.stderr)
        reserved = name in ("mlp_neuron", "mlp_autoencoder_latent")
        assert (str(folder) if not reserved else "kind of node") in done.stderr, (
            name,
            done.stderr,
        )
        assert "Traceback" not in done.stderr
        if name == "width":  # which of several served models it was meant for
            assert "does not fit model 'random-tiny'" in done.stderr, done.stderr


async def test_a_trace_from_a_latent_is_the_finite_difference(
    client: httpx.AsyncClient, weights: dict[str, torch.Tensor]
) -> None:
    """Traced from transcoder latent j of layer 2 at the last token, ACT_TIMES_GRAD of layer 1's
    latent i there is a_i d(a_j)/d(a_i): against a central difference of the reference, layer
    2's latent computed by numpy from its MLP input."""
    p = len(TOKENS) - 1
    layer2 = write_circuit_tracer_set_reference(weights)[2]
    j = int(np.argmax(layer2[p]))
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{ infer(input: {{prompt: $p,
              mlpDictionary: "tc", layerNormScale: LIVE,
              trace: {{upstreamNodeId: "m/tc/2/{j}", tokenIndex: {p}}}}}) {{
              topNodes(group: ACT_TIMES_GRAD, k: 1000, tokenIndex: {p}) {{
                top {{ node {{ id }} value }} }} }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    tops = [
        t
        for t in body["data"]["model"]["infer"]["topNodes"]["top"]
        if "/tc/1/" in t["node"]["id"] and abs(t["value"]) > 1e-4
    ][:2]
    assert tops, body
    layer1 = write_circuit_tracer_set_reference(weights)[1]
    t1 = random_tensors("jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, 41)
    t2 = {
        k: v.double()
        for k, v in random_tensors(
            "jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, 42
        ).items()
    }
    for top in tops:
        i = int(top["node"]["id"].rsplit("/", 1)[1])

        def traced(h: float, i: int = i) -> float:
            seen: dict[int, torch.Tensor] = {}

            def edit(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
                if (layer, name) == (1, "mlp_out"):
                    act = act.clone()
                    act[p] += h * layer1[p, i] * t1["W_dec"][i].double()
                if name == "mlp_in":
                    seen[layer] = act
                return act

            reference_forward(SMALL, weights, TOKENS, edit=edit)
            pre = seen[2][p] @ t2["W_enc"] + t2["b_enc"]
            return float(torch.relu(pre[j]) * (pre[j] > t2["threshold"][j]))

        step = 1e-4
        fd = (traced(step) - traced(-step)) / (2 * step)
        assert top["value"] == pytest.approx(fd, rel=1e-3, abs=1e-6)


async def test_a_latents_write_direction_in_scored_tokens_similarity_and_steering(
    client: httpx.AsyncClient, weights: dict[str, torch.Tensor], folders: dict[str, Path]
) -> None:
    """A residual SAE latent's write is its decoder row; an attn.hook_z latent's is its row
    carried through W_O: scored tokens are them @ W_U, similar nodes their cosines, and
    steering adds them (generation runs with it)."""
    w_u = weights["unembed.weight"].double().T  # [d_model, vocab]
    res = random_tensors("topk", SMALL.d_model, SMALL.d_model, D_SAE, 51)["W_dec"].double()
    z = random_tensors(
        "standard", SMALL.n_heads * SMALL.d_head, SMALL.n_heads * SMALL.d_head, D_SAE, 62
    )["W_dec"].double()
    w_o = weights["xf_layers.2.attn.out_proj.weight"].double().T  # [h * d_head, d_model]
    body = await graphql(
        client,
        """{ res: node(id: "m/res/1/3") {
               scoredTokens(k: 3) { upvotedOutputTokens { token { id } value }
                 upvotingInputTokens { value } upvotingKeyTokens { value } }
               similarNodes(first: 1) { node { id } cosine } }
             z: node(id: "m/z/2/4") { scoredTokens(k: 3) { upvotedOutputTokens { value } } }
             model(name: "m") { generate(input: {prompt: "Hello", maxTokens: 3,
               steering: [{nodeId: "m/res/1/3", strength: 50}]}) { steered { text } } } }""",
    )
    assert "errors" not in body, body
    # A latent reads its hook, not the embeddings: no input tokens (they were an empty list).
    assert body["data"]["res"]["scoredTokens"]["upvotingInputTokens"] is None
    assert body["data"]["res"]["scoredTokens"]["upvotingKeyTokens"] is None
    expected = torch.topk(res[3] @ w_u, 3)
    served = body["data"]["res"]["scoredTokens"]["upvotedOutputTokens"]
    assert [t["token"]["id"] for t in served] == expected.indices.tolist()
    np.testing.assert_allclose([t["value"] for t in served], expected.values.numpy(), rtol=1e-4)
    expected_z = torch.topk(z[4] @ w_o @ w_u, 3).values.numpy()
    served_z = [t["value"] for t in body["data"]["z"]["scoredTokens"]["upvotedOutputTokens"]]
    np.testing.assert_allclose(served_z, expected_z, rtol=1e-4)
    similar = body["data"]["res"]["similarNodes"][0]
    other_layer, other = map(int, similar["node"]["id"].split("/")[2:])
    other_row = random_tensors("topk", SMALL.d_model, SMALL.d_model, D_SAE, 50 + other_layer)[
        "W_dec"
    ].double()[other]
    cosine = float(torch.nn.functional.cosine_similarity(res[3], other_row, dim=0))
    assert similar["cosine"] == pytest.approx(cosine, abs=1e-5)
    assert body["data"]["model"]["generate"]["steered"]["text"]


async def test_without_error_terms_each_input_runs_with_its_own_dictionaries(
    client: httpx.AsyncClient, weights: dict[str, torch.Tensor]
) -> None:
    """Inputs in one request that drop the error term but rank different things run apart:
    with mlpDictionary the transcoders replace the MLPs (the reference with them applied by
    hand), without it the model is the bare one; and the direct effects of the replaced model
    add up to its objective with no error term among them."""
    layers = {
        layer: random_tensors("jumprelu_skip_transcoder", SMALL.d_model, SMALL.d_model, D_SAE, s)
        for layer, s in zip(range(SMALL.n_layers), range(40, 40 + SMALL.n_layers), strict=True)
    }
    inputs: dict[int, torch.Tensor] = {}

    def replaced(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if name == "mlp_in":
            inputs[layer] = act
        if name != "mlp_out":
            return act
        t = {k: v.double() for k, v in layers[layer].items()}
        pre = inputs[layer] @ t["W_enc"] + t["b_enc"]
        latents = torch.relu(pre) * (pre > t["threshold"])
        return latents @ t["W_dec"] + t["b_dec"] + inputs[layer] @ t["W_skip"].T

    def loss(logits: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(TOKENS[1:])))

    bare, _ = reference_forward(SMALL, weights, TOKENS)
    with_transcoders, _ = reference_forward(SMALL, weights, TOKENS, edit=replaced)
    n = len(TOKENS)
    body = await graphql(
        client,
        f"""query($p: String!) {{ model(name: "m") {{
              tc: infer(input: {{prompt: $p, autoencoderErrorTerm: false, mlpDictionary: "tc",
                                {LOSS}}}) {{
                loss objective
                topNodes(group: DIRECT_EFFECT, k: 10000, tokenIndex: {n - 1}) {{ top {{ value }} }}
                directEffectTerms(tokenIndex: {n - 1}) {{ name value }} }}
              plain: infer(input: {{prompt: $p, autoencoderErrorTerm: false, {LOSS}}}) {{
                loss topNodes(group: DIRECT_EFFECT, k: 3) {{ top {{ value }} }} }} }} }}""",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    found = body["data"]["model"]
    assert found["tc"]["loss"] == pytest.approx(loss(with_transcoders), abs=1e-4)
    assert found["plain"]["loss"] == pytest.approx(loss(bare), abs=1e-4)
    assert abs(loss(with_transcoders) - loss(bare)) > 1e-3
    names = {t["name"] for t in found["tc"]["directEffectTerms"]}
    assert "dictionary error" not in names and "transcoder skip" in names
    total = sum(t["value"] for t in found["tc"]["topNodes"]["top"])
    total += sum(t["value"] for t in found["tc"]["directEffectTerms"])
    assert total == pytest.approx(found["tc"]["objective"], abs=1e-5)


async def test_ranking_by_a_set_missing_layers_is_refused(
    weights: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """With a transcoder missing at layer 0, the node table had no MLP node there,
    and its direct effects missed the objective by that layer's share (an outside audit: 0.15
    of a logit difference of 0.001). Its latents are still nodes."""
    write_set(
        tmp_path / "one", "transcoder", "blocks.L.mlp.hook_in", hook_out="blocks.L.hook_mlp_out"
    )
    shutil.rmtree(tmp_path / "one" / "layer_0")
    entry = entry_of(native(weights))
    attach_dictionaries(entry, "one", str(tmp_path / "one"))
    registry = ModelRegistry()
    registry.add(entry)
    transport = httpx.ASGITransport(app=create_app(registry, settings=Settings(cached_runs=0)))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            ranked = await graphql(
                client,
                """query($p: String!) { model(name: "m") { infer(input: {prompt: $p,
                  mlpDictionary: "one"}) { topNodes(group: DIRECT_EFFECT, k: 3) { tokenSums } } } }""",
                {"p": PROMPT},
            )
            assert error_codes(ranked) == ["INVALID_ARGUMENT"], ranked
            assert "'one' covers layers 1, 2 of 3" in ranked["errors"][0]["message"]
            node = await graphql(
                client,
                'query($p: String!) { node(id: "m/one/1/0") { activations(prompt: $p) { values } } }',
                {"p": PROMPT},
            )
            assert "errors" not in node, node
    finally:
        registry.close()
