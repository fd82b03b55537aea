import io
from typing import Any

import numpy as np
import pytest
import torch

from interpql.backends.autoencoder import SparseAutoencoder

N_IN, N_LATENTS = 6, 10
# The keys Transformer Debugger's and openai/sparse_autoencoder's loaders read.
PUBLIC_KEYS = {
    "pre_bias",
    "encoder.weight",
    "latent_bias",
    "decoder.weight",
    "stats_last_nonzero",
    "latents_activation_frequency",
    "latents_mean_square",
    "activation",
    "activation_state_dict",
}


def public_state_dict(activation: str = "ReLU", **options: Any) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {
        "pre_bias": torch.randn(N_IN, generator=generator),
        "encoder.weight": torch.randn(N_LATENTS, N_IN, generator=generator),
        "latent_bias": torch.randn(N_LATENTS, generator=generator),
        "decoder.weight": torch.randn(N_IN, N_LATENTS, generator=generator),
        "stats_last_nonzero": torch.arange(N_LATENTS),
        "latents_activation_frequency": torch.rand(N_LATENTS, generator=generator),
        "latents_mean_square": torch.rand(N_LATENTS, generator=generator),
        "activation": activation,
        "activation_state_dict": options,
    }


def numpy_latents(sd: dict[str, Any], x: np.ndarray, k: int | None = None) -> np.ndarray:
    pre = (x - sd["pre_bias"].numpy()) @ sd["encoder.weight"].numpy().T + sd["latent_bias"].numpy()
    if k is not None:
        kth_largest = np.sort(pre, axis=-1)[..., -k][..., None]
        pre = np.where(pre >= kth_largest, pre, 0.0)
    latents: np.ndarray = np.maximum(pre, 0.0)
    return latents


def numpy_reconstruction(sd: dict[str, Any], latents: np.ndarray) -> np.ndarray:
    reconstruction: np.ndarray = latents @ sd["decoder.weight"].numpy().T + sd["pre_bias"].numpy()
    return reconstruction


def saved_and_loaded(sd: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def assert_same_state_dict(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value.to(actual[key].dtype)), key
        else:
            assert actual[key] == value, key


@pytest.mark.parametrize(
    ("activation", "options", "k"),
    [("ReLU", {}, None), ("TopK", {"k": 3, "postact_fn": "ReLU"}, 3)],
)
def test_encodes_decodes_and_round_trips_like_the_formula(
    activation: str, options: dict[str, Any], k: int | None
) -> None:
    sd = public_state_dict(activation, **options)
    ae = SparseAutoencoder.from_state_dict(sd)
    x = torch.randn(4, 5, N_IN, generator=torch.Generator().manual_seed(1))

    latents = ae.encode(x)
    expected = numpy_latents(sd, x.numpy(), k)
    np.testing.assert_allclose(latents.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ae.decode(latents).detach().numpy(),
        numpy_reconstruction(sd, expected),
        rtol=1e-5,
        atol=1e-5,
    )
    if k is not None:
        assert int((latents > 0).sum(dim=-1).max()) <= k
    assert (ae.n_inputs, ae.n_latents, ae.activation) == (N_IN, N_LATENTS, activation)

    exported = ae.state_dict_tdb()
    assert set(exported) == PUBLIC_KEYS
    assert_same_state_dict(exported, sd)
    assert_same_state_dict(saved_and_loaded(exported), sd)
    again = SparseAutoencoder.from_state_dict(saved_and_loaded(exported))
    assert torch.equal(again.encode(x), latents)


def test_from_state_dict_leaves_its_argument_alone() -> None:
    sd = public_state_dict("TopK", k=2, postact_fn="ReLU")
    keys = set(sd)
    SparseAutoencoder.from_state_dict(sd)
    assert set(sd) == keys


def test_topk_identity_postact_keeps_negative_values() -> None:
    sd = public_state_dict("TopK", k=N_LATENTS, postact_fn="Identity")
    ae = SparseAutoencoder.from_state_dict(sd)
    x = torch.randn(3, N_IN)
    assert torch.allclose(ae.encode(x), ae.pre_activation(x))


def test_float16_state_dict_loads_as_float32() -> None:
    sd = SparseAutoencoder.from_state_dict(public_state_dict()).state_dict_tdb(torch.float16)
    assert sd["encoder.weight"].dtype == torch.float16
    assert sd["stats_last_nonzero"].dtype == torch.long
    ae = SparseAutoencoder.from_state_dict(sd)
    assert ae.encoder.weight.dtype == torch.float32
    assert torch.equal(ae.encoder.weight, sd["encoder.weight"].float())


def test_dead_latents_load_and_stay_silent() -> None:
    sd = public_state_dict()
    dead = torch.tensor([1, 4, 7])
    sd["encoder.weight"][dead] = 0.0
    sd["latent_bias"][dead] = -1.0
    sd["latents_activation_frequency"][dead] = 0.0
    sd["stats_last_nonzero"][dead] = 10**9
    ae = SparseAutoencoder.from_state_dict(sd)
    latents = ae.encode(torch.randn(64, N_IN))
    assert not bool(latents[:, dead].any())
    assert torch.equal(ae.pre_bias, sd["pre_bias"])
    assert ae.activation == "ReLU"
    assert_same_state_dict(ae.state_dict_tdb(), sd)


def test_missing_statistics_take_defaults() -> None:
    sd = public_state_dict()
    for key in ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square"):
        del sd[key]
    ae = SparseAutoencoder.from_state_dict(sd)
    assert torch.equal(ae.latents_activation_frequency, torch.ones(N_LATENTS))


def test_activation_defaults_to_relu() -> None:
    sd = public_state_dict()
    del sd["activation"], sd["activation_state_dict"]
    assert SparseAutoencoder.from_state_dict(sd).activation == "ReLU"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: sd.update({"decoder.weight": sd["decoder.weight"].t()}), "decoder.weight"),
        (lambda sd: sd.update({"pre_bias": torch.zeros(N_IN + 1)}), "pre_bias"),
        (lambda sd: sd.update({"latent_bias": torch.zeros(N_LATENTS, 1)}), "latent_bias"),
        (lambda sd: sd.update({"latents_mean_square": torch.zeros(3)}), "latents_mean_square"),
        (lambda sd: sd.update({"encoder.weight": torch.zeros(N_IN)}), "encoder.weight"),
        (lambda sd: sd.pop("latent_bias"), "missing"),
        (lambda sd: sd.update({"encoder.bias": torch.zeros(N_LATENTS)}), "unexpected"),
        (lambda sd: sd.update({"activation": "GELU"}), "activation"),
        (lambda sd: sd.update({"activation": "TopK"}), "k"),
        (lambda sd: sd.update(activation="TopK", activation_state_dict={"k": 11}), "k"),
        (
            lambda sd: sd.update(
                activation="TopK", activation_state_dict={"k": 2, "postact_fn": "X"}
            ),
            "postact_fn",
        ),
    ],
)
def test_bad_state_dicts_raise_value_error(change: Any, message: str) -> None:
    sd = public_state_dict()
    change(sd)
    with pytest.raises(ValueError, match=message):
        SparseAutoencoder.from_state_dict(sd)
