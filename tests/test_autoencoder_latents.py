"""Autoencoder latents inside the forward pass, checked against offline encodes and the
plain-torch reference with the autoencoder applied by hand."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.autoencoder_files import (
    REGISTERED_AUTOENCODERS,
    AutoencoderFilesError,
    load_autoencoder_set,
)
from interpql.backends.base import (
    AutoencoderInput,
    ForwardRequest,
    HookPoint,
    Intervention,
    Location,
)
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.loaders.models import attach_autoencoders
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.server import create_app
from interpql.specs import LossSpec
from tests.conftest import SMALL, error_codes, graphql
from tests.reference import reference_forward

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
MLP_LATENTS = HookPoint(1, Location.LATENTS, "mlp_autoencoder_latent")
ATTN_LATENTS = HookPoint(2, Location.LATENTS, "attention_autoencoder_latent")


def random_autoencoder(
    n_in: int, n_latents: int, seed: int, k: int | None = None
) -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(seed)
    ae = SparseAutoencoder(n_in, n_latents, k=k)
    with torch.no_grad():
        ae.encoder.weight.copy_(torch.randn(n_latents, n_in, generator=generator) / n_in**0.5)
        ae.decoder.weight.copy_(torch.randn(n_in, n_latents, generator=generator) / n_latents**0.5)
        ae.pre_bias.copy_(0.05 * torch.randn(n_in, generator=generator))
        ae.latent_bias.copy_(0.05 * torch.randn(n_latents, generator=generator))
    return ae


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in random_model(SMALL, seed=11).state_dict().items()}


def with_two_autoencoders(state: dict[str, torch.Tensor]) -> NativeGPT2Backend:
    """SMALL with `state`'s weights, a random MLP autoencoder at layer 1 and an attention one
    at layer 2."""
    model = random_model(SMALL, seed=0)
    model.load_state_dict(state)
    backend = NativeGPT2Backend(model)
    backend.attach_autoencoder(1, AutoencoderInput.MLP_POST_ACT, random_autoencoder(80, 200, 1))
    backend.attach_autoencoder(2, AutoencoderInput.RESID_DELTA_ATTN, random_autoencoder(48, 96, 2))
    return backend


@pytest.fixture(scope="module")
def backend(state: dict[str, torch.Tensor]) -> NativeGPT2Backend:
    return with_two_autoencoders(state)


def mlp_ae(backend: NativeGPT2Backend) -> SparseAutoencoder:
    return backend.dictionaries[MLP_LATENTS].dictionary  # type: ignore[return-value]


def test_online_latents_equal_offline_encode(backend: NativeGPT2Backend) -> None:
    inputs = {HookPoint(1, Location.MLP_POST), HookPoint(2, Location.ATTN_OUT)}
    result = backend.forward(
        ForwardRequest(
            tokens=(tuple(PROMPT),), save=frozenset({MLP_LATENTS, ATTN_LATENTS, *inputs})
        )
    )
    for latents, source in ((MLP_LATENTS, Location.MLP_POST), (ATTN_LATENTS, Location.ATTN_OUT)):
        ae = backend.dictionaries[latents].dictionary
        offline = ae.encode(result.activations[HookPoint(latents.layer, source)])
        torch.testing.assert_close(result.activations[latents], offline, atol=1e-5, rtol=0)
        assert (result.activations[latents] > 0).any()


def test_error_term_leaves_logits_unchanged(backend: NativeGPT2Backend) -> None:
    plain = backend.forward(ForwardRequest(tokens=(tuple(PROMPT),)))
    spliced = backend.forward(
        ForwardRequest(tokens=(tuple(PROMPT),), save=frozenset({MLP_LATENTS, ATTN_LATENTS}))
    )
    torch.testing.assert_close(spliced.logits, plain.logits, atol=1e-5, rtol=0)


def test_ablating_a_latent_matches_decoding_the_modified_latents(
    backend: NativeGPT2Backend, state: dict[str, torch.Tensor]
) -> None:
    token, latent = (
        6,
        int(
            backend.forward(ForwardRequest(tokens=(tuple(PROMPT),), save=frozenset({MLP_LATENTS})))
            .activations[MLP_LATENTS][0, 6]
            .argmax()
        ),
    )
    ablated = backend.forward(
        ForwardRequest(
            tokens=(tuple(PROMPT),),
            interventions=(
                Intervention(point=MLP_LATENTS, value=0.0, position=token, index=(latent,)),
            ),
        )
    )
    ae = copy.deepcopy(mlp_ae(backend)).double()

    def edit(layer: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if (layer, name) != (1, "mlp_post"):
            return act
        latents = ae.encode(act)
        changed = latents.clone()
        changed[token, latent] = 0.0
        return act + ae.decode(changed) - ae.decode(latents)

    expected, _ = reference_forward(SMALL, state, PROMPT, edit=edit)
    torch.testing.assert_close(ablated.logits[0].double(), expected, atol=1e-5, rtol=0)
    plain, _ = reference_forward(SMALL, state, PROMPT)
    assert (ablated.logits[0].double() - plain).abs().max() > 1e-4  # the ablation did something


def test_without_error_term_the_model_runs_on_the_reconstruction(
    backend: NativeGPT2Backend, state: dict[str, torch.Tensor]
) -> None:
    result = backend.forward(
        ForwardRequest(
            tokens=(tuple(PROMPT),), save=frozenset({MLP_LATENTS}), autoencoder_error_term=False
        )
    )
    ae = copy.deepcopy(mlp_ae(backend)).double()
    expected, _ = reference_forward(
        SMALL,
        state,
        PROMPT,
        edit=lambda layer, name, act: (
            ae.decode(ae.encode(act)) if (layer, name) == (1, "mlp_post") else act
        ),
    )
    torch.testing.assert_close(result.logits[0].double(), expected, atol=1e-5, rtol=0)


def test_gradients_reach_latents(
    backend: NativeGPT2Backend, state: dict[str, torch.Tensor]
) -> None:
    result = backend.forward(
        ForwardRequest(
            tokens=(tuple(PROMPT),),
            save=frozenset({MLP_LATENTS}),
            backward=LossSpec(),
            save_grads=frozenset({MLP_LATENTS}),
        )
    )
    grad = result.gradients[MLP_LATENTS][0]
    acts = result.activations[MLP_LATENTS][0]
    ae = copy.deepcopy(mlp_ae(backend)).double()
    # Finite differences: nudge one latent, decode, run the reference, watch the loss.
    for token, latent in [(3, int(acts[3].argmax())), (8, int(acts[8].argmax()))]:
        losses = []
        for delta in (1e-4, -1e-4):

            def edit(
                layer: int,
                name: str,
                act: torch.Tensor,
                d: float = delta,
                at: tuple[int, int] = (token, latent),
            ) -> torch.Tensor:
                if (layer, name) != (1, "mlp_post"):
                    return act
                latents = ae.encode(act)
                nudged = latents.clone()
                nudged[at] += d
                return act + ae.decode(nudged) - ae.decode(latents)

            logits, _ = reference_forward(SMALL, state, PROMPT, edit=edit)
            losses.append(float(F.cross_entropy(logits[:-1], torch.tensor(PROMPT[1:]))))
        numeric = (losses[0] - losses[1]) / 2e-4
        assert float(grad[token, latent]) == pytest.approx(numeric, abs=1e-5, rel=1e-3)
        assert float(acts[token, latent] * grad[token, latent]) != 0.0  # act x grad is defined


def test_width_mismatch_is_refused(backend: NativeGPT2Backend) -> None:
    with pytest.raises(ValueError, match="must have 80 values there"):
        backend.attach_autoencoder(0, AutoencoderInput.MLP_POST_ACT, random_autoencoder(48, 10, 3))


def test_sets_load_from_folders_relu_and_topk(tmp_path: Path, backend: NativeGPT2Backend) -> None:
    topk = random_autoencoder(80, 64, 4, k=5)
    relu = random_autoencoder(80, 64, 5)
    torch.save(topk.state_dict_tdb(), tmp_path / "0.pt")
    torch.save(relu.state_dict_tdb(), tmp_path / "2.pt")
    loaded, source = load_autoencoder_set(str(tmp_path), SMALL.n_layers)
    assert sorted(loaded) == [0, 2] and source == str(tmp_path)
    x = torch.randn(7, 80)
    torch.testing.assert_close(loaded[0].encode(x), topk.encode(x))
    assert int((loaded[0].encode(x) > 0).sum(-1).max()) <= 5
    torch.testing.assert_close(loaded[2].encode(x), relu.encode(x))


def test_unknown_set_and_registered_names(tmp_path: Path) -> None:
    with pytest.raises(AutoencoderFilesError, match="neither a registered"):
        load_autoencoder_set(str(tmp_path / "missing"), 3)
    with pytest.raises(AutoencoderFilesError, match=r"no <layer>\.pt"):
        load_autoencoder_set(str(tmp_path), 3)
    assert REGISTERED_AUTOENCODERS["ae-resid-delta-attn-v4"][0] == (
        "az://openaipublic/sparse-autoencoder/gpt2-small/resid_delta_attn_v4/autoencoders"
    )


def test_cli_refuses_mismatched_autoencoders_at_start(tmp_path: Path) -> None:
    torch.save(random_autoencoder(13, 8, 6).state_dict_tdb(), tmp_path / "0.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "interpql.cli",
            "serve",
            "--model",
            "random:tiny",
            "--mlp-autoencoder",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "reads 13" in result.stderr
    assert "Traceback" not in result.stderr


async def test_latents_as_nodes_over_graphql(tmp_path: Path, backend: NativeGPT2Backend) -> None:
    mlp_dir, attn_dir = tmp_path / "mlp", tmp_path / "attn"
    mlp_dir.mkdir()
    attn_dir.mkdir()
    torch.save(mlp_ae(backend).state_dict_tdb(), mlp_dir / "1.pt")
    torch.save(backend.dictionaries[ATTN_LATENTS].dictionary.state_dict_tdb(), attn_dir / "2.pt")  # type: ignore[attr-defined]
    model = random_model(SMALL, seed=0)
    model.load_state_dict(backend.model.state_dict())
    served = NativeGPT2Backend(model)
    entry = ModelEntry("sae", SMALL.architecture, served, served.name, "cpu", "float32")
    attach_autoencoders(entry, str(mlp_dir), "mlp")
    attach_autoencoders(entry, str(attn_dir), "attention")
    registry = ModelRegistry()
    registry.add(entry)
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        body = await graphql(
            client,
            """{ model(name: "sae") {
                  autoencoders { kind layer input nLatents source }
                  layer(index: 1) { nodeKinds { kind count } }
                  infer(input: {prompt: "The quick brown fox"}) {
                    layerActivations(layer: 1, kind: MLP_AUTOENCODER_LATENT) { shape values }
                    activations(nodeIds: ["sae/attention_autoencoder_latent/2/5"]) { values } } }
                node(id: "sae/mlp_autoencoder_latent/1/199") { kind index } }""",
        )
        assert "errors" not in body, body
        model_data = body["data"]["model"]
        assert model_data["autoencoders"] == [
            {
                "kind": "MLP_AUTOENCODER_LATENT",
                "layer": 1,
                "input": "mlp_post_act",
                "nLatents": 200,
                "source": str(mlp_dir),
            },
            {
                "kind": "ATTENTION_AUTOENCODER_LATENT",
                "layer": 2,
                "input": "resid_delta_attn",
                "nLatents": 96,
                "source": str(attn_dir),
            },
        ]
        assert {"kind": "MLP_AUTOENCODER_LATENT", "count": 200} in model_data["layer"]["nodeKinds"]
        tokens = (464, 2068, 7586, 21831)
        expected = served.forward(
            ForwardRequest(tokens=(tokens,), save=frozenset({MLP_LATENTS, ATTN_LATENTS}))
        )
        np.testing.assert_allclose(
            model_data["infer"]["layerActivations"]["values"],
            expected.activations[MLP_LATENTS][0],
            atol=1e-6,
        )
        np.testing.assert_allclose(
            model_data["infer"]["activations"][0]["values"],
            expected.activations[ATTN_LATENTS][0, :, 5],
            atol=1e-6,
        )
        latent = int(expected.activations[MLP_LATENTS][0, 3].argmax())
        ablated = await graphql(
            client,
            """query($id: ID!) { model(name: "sae") { infer(input: {prompt: "The quick brown fox",
                 ablations: [{nodeId: $id, tokenIndex: 3, value: 0}]}) {
                 activations(nodeIds: [$id]) { values } loss } } }""",
            {"id": f"sae/mlp_autoencoder_latent/1/{latent}"},
        )
        values = ablated["data"]["model"]["infer"]["activations"][0]["values"]
        assert values[3] == 0.0 and values[:3] == pytest.approx(
            expected.activations[MLP_LATENTS][0, :3, latent].tolist(), abs=1e-6
        )
        for bad in ("sae/mlp_autoencoder_latent/0/1", "sae/mlp_autoencoder_latent/1/200"):
            assert error_codes(await graphql(client, f'{{ node(id: "{bad}") {{ id }} }}')) == [
                "INVALID_NODE"
            ]
    registry.close()
