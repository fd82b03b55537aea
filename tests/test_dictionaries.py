"""SAELens-format dictionaries and circuit-tracer transcoder sets (backends/dictionaries/),
against numpy written from the formats' formulas, on random weights written by our own writer;
and folders that do not fit their config, refused naming the file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from interpql.backends.dictionaries.circuit_tracer import read_transcoder_set
from interpql.backends.dictionaries.saelens import (
    ARCHITECTURES,
    read_saelens,
    saelens_config,
    write_saelens,
)
from interpql.file_errors import FileProblem

D_IN, D_SAE, K = 12, 40, 6
RNG = np.random.default_rng(5)


def random_tensors(
    architecture: str, d_in: int, d_out: int, d_sae: int, seed: int
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    tensors = {
        "W_enc": rand(d_in, d_sae),
        "W_dec": rand(d_sae, d_out),
        "b_dec": rand(d_out, scale=0.1),
    }
    if architecture == "gated":
        tensors |= {
            "b_gate": rand(d_sae, scale=0.1),
            "b_mag": rand(d_sae, scale=0.1),
            "r_mag": rand(d_sae, scale=0.2),
        }
    else:
        tensors["b_enc"] = rand(d_sae, scale=0.1)
    if "jumprelu" in architecture:
        tensors["threshold"] = rand(d_sae, scale=0.1).abs()
    if "skip" in architecture:
        tensors["W_skip"] = rand(d_out, d_in)
    return tensors


def reference(
    arch: str, t: dict[str, np.ndarray], x: np.ndarray, cfg: dict[str, Any], factor: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(latents, output) by the formulas, in float64 numpy."""
    mode = cfg["normalize_activations"]
    mean, std = x.mean(-1, keepdims=True), None
    if mode == "constant_norm_rescale":
        coeff = np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
        x_n = x * coeff
    elif mode == "layer_norm":
        std = (x - mean).std(-1, ddof=1, keepdims=True)
        x_n = (x - mean) / (std + 1e-5)
    elif mode == "expected_average_only_in":
        x_n = x * factor
    else:
        x_n = x
    if cfg["apply_b_dec_to_input"]:
        x_n = x_n - t["b_dec"]
    norms = np.linalg.norm(t["W_dec"], axis=-1)
    if arch == "gated":
        gate = x_n @ t["W_enc"] + t["b_gate"] > 0
        a = gate * np.maximum(x_n @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"], 0)
    else:
        pre = x_n @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            if cfg["rescale_acts_by_decoder_norm"]:
                pre = pre * norms
            a = np.zeros_like(pre)
            top = np.argsort(-pre, axis=-1)[..., :K]
            np.put_along_axis(a, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
        elif "jumprelu" in arch:
            a = np.maximum(pre, 0) * (pre > t["threshold"])
        else:
            a = np.maximum(pre, 0)
    decoded_latents = a / norms if arch == "topk" and cfg["rescale_acts_by_decoder_norm"] else a
    out = decoded_latents @ t["W_dec"] + t["b_dec"]
    if mode == "constant_norm_rescale":
        out = out / coeff
    elif mode == "layer_norm":
        out = out * std + mean
    elif mode == "expected_average_only_in":
        out = out / factor
    if "skip" in arch:
        out = out + x @ t["W_skip"].T
    return a, out


CASES = [
    (arch, mode, b_dec, rescale)
    for arch in ARCHITECTURES
    for mode in ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
    for b_dec in ((False, True) if "transcoder" not in arch else (False,))
    for rescale in ((False, True) if arch == "topk" else (False,))
]


@pytest.mark.parametrize(("arch", "mode", "b_dec", "rescale"), CASES)
def test_latents_and_outputs_are_the_formulas(
    tmp_path: Path, arch: str, mode: str, b_dec: bool, rescale: bool
) -> None:
    transcoder = "transcoder" in arch
    d_out = 9 if transcoder else D_IN  # transcoders may map between widths
    config = saelens_config(
        arch,
        D_IN,
        D_SAE,
        "blocks.1.ln2.hook_normalized" if transcoder else "blocks.1.hook_resid_post",
        d_out=d_out if transcoder else None,
        hook_name_out="blocks.1.hook_mlp_out" if transcoder else None,
        apply_b_dec_to_input=b_dec,
        normalize_activations=mode,
        k=K if arch == "topk" else None,
        rescale_acts_by_decoder_norm=rescale,
    )
    tensors = random_tensors(arch, D_IN, d_out, D_SAE, seed=len(arch) + len(mode))
    write_saelens(tmp_path / "sae", config, tensors)
    factor = 0.7 if mode == "expected_average_only_in" else None
    dictionary = read_saelens(str(tmp_path / "sae"), scaling_factor=factor)
    x = RNG.normal(size=(5, 3, D_IN)) * 2 + 0.3
    latents, output = dictionary(torch.tensor(x, dtype=torch.float32))
    expected_latents, expected_output = reference(
        arch, {k: v.double().numpy() for k, v in tensors.items()}, x, config, factor
    )
    np.testing.assert_allclose(latents.numpy(), expected_latents, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(output.numpy(), expected_output, atol=1e-6, rtol=1e-5)
    assert (expected_latents > 0).any() and (expected_latents == 0).any()  # both branches ran


def test_the_decomposition_is_the_output(tmp_path: Path) -> None:
    """latent writes + bias term + skip term = output, for a normalising skip transcoder."""
    config = saelens_config(
        "skip_transcoder",
        D_IN,
        D_SAE,
        "blocks.0.hook_resid_mid",
        d_out=D_IN,
        hook_name_out="blocks.0.hook_mlp_out",
        normalize_activations="layer_norm",
    )
    write_saelens(tmp_path / "t", config, random_tensors("skip_transcoder", D_IN, D_IN, D_SAE, 3))
    dictionary = read_saelens(str(tmp_path / "t"))
    x = torch.randn(4, D_IN)
    latents = dictionary.encode(x)
    writes = latents @ dictionary.decoder_directions() * dictionary.output_scale(x)
    total = writes + dictionary.decoded_bias(x) + dictionary.skip(x)  # type: ignore[operator]
    torch.testing.assert_close(total, dictionary.decode(latents, x))


def test_configs_before_6_0_are_read(tmp_path: Path) -> None:
    old = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_point": "blocks.2.hook_resid_pre",
        "hook_point_layer": 2,
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
    }
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "cfg.json").write_text(__import__("json").dumps(old))
    save_file(
        {k: v.contiguous() for k, v in random_tensors("topk", D_IN, D_IN, D_SAE, 1).items()},
        str(folder / "sae_weights.safetensors"),
    )
    dictionary = read_saelens(str(folder))
    assert dictionary.cfg.architecture == "topk" and dictionary.cfg.k == K
    assert dictionary.cfg.hook_name == "blocks.2.hook_resid_pre"
    assert dictionary.cfg.normalize_activations == "none"
    old["normalize_activations"] = True  # meant the dataset-wide factor
    (folder / "cfg.json").write_text(__import__("json").dumps(old))
    with pytest.raises(FileProblem, match="scaling factor"):
        read_saelens(str(folder))


def test_log_thresholds_of_old_jumprelu_files(tmp_path: Path) -> None:
    config = saelens_config("jumprelu", D_IN, D_SAE, "blocks.0.hook_resid_post")
    tensors = random_tensors("jumprelu", D_IN, D_IN, D_SAE, 2)
    threshold = tensors.pop("threshold")
    tensors["log_threshold"] = threshold.log()
    write_saelens(tmp_path / "j", config, tensors)
    torch.testing.assert_close(read_saelens(str(tmp_path / "j")).threshold, threshold)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, t: c.update(architecture="matryoshka"), "unknown architecture"),
        (lambda c, t: t.update(W_enc=torch.zeros(D_IN + 1, D_SAE)), "W_enc has shape"),
        (lambda c, t: t.pop("b_enc"), "missing \\['b_enc'\\]"),
        (lambda c, t: t.update(extra=torch.zeros(2)), "unexpected \\['extra'\\]"),
        (lambda c, t: c.update(normalize_activations="whiten"), "unknown normalize_activations"),
        (lambda c, t: c["metadata"].pop("hook_name"), "no hook_name"),
        # Read with another meaning, and nothing said: 16.7 latents as 16, "false" as true.
        (lambda c, t: c.update(d_sae=D_SAE + 0.7), "d_sae must be a whole number"),
        (lambda c, t: c.update(d_sae=0), "d_sae must be a whole number of at least 1, not 0"),
        (lambda c, t: c.update(d_in=True), "d_in must be a whole number"),
        (lambda c, t: c.update(apply_b_dec_to_input="false"), "must be true or false"),
        (lambda c, t: c.update(rescale_acts_by_decoder_norm=1), "must be true or false"),
    ],
)
def test_a_folder_that_does_not_fit_its_config_is_refused(
    tmp_path: Path, change: Any, message: str
) -> None:
    config = saelens_config("standard", D_IN, D_SAE, "blocks.0.hook_resid_post")
    tensors = random_tensors("standard", D_IN, D_IN, D_SAE, 4)
    change(config, tensors)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "cfg.json").write_text(__import__("json").dumps(config))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    with pytest.raises(FileProblem, match=message) as caught:
        read_saelens(str(folder))
    assert str(folder) in str(caught.value)


def test_a_missing_weights_file_is_named(tmp_path: Path) -> None:
    config = saelens_config("standard", D_IN, D_SAE, "blocks.0.hook_resid_post")
    (tmp_path / "cfg.json").write_text(__import__("json").dumps(config))
    with pytest.raises(FileProblem, match=r"sae_weights\.safetensors.*no such file"):
        read_saelens(str(tmp_path))


def test_circuit_tracer_transcoder_sets(tmp_path: Path) -> None:
    """Per-layer files with W_enc [d_tc, d_model]; encode act(x W_enc^T + b_enc), decode
    a W_dec + b_dec + x W_skip^T."""
    (tmp_path / "config.yaml").write_text(
        "model_kind: transcoder_set\nmodel_name: tiny\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\nscan: local\n"
    )
    raw = []
    for layer in range(2):
        t = random_tensors("jumprelu_skip_transcoder", D_IN, D_IN, D_SAE, 10 + layer)
        files = {
            "W_enc": t["W_enc"].T.contiguous(),
            "W_dec": t["W_dec"],
            "b_enc": t["b_enc"],
            "b_dec": t["b_dec"],
            "W_skip": t["W_skip"],
        }
        if layer == 0:
            files["activation_function.threshold"] = t["threshold"]
        save_file(files, str(tmp_path / f"layer_{layer}.safetensors"))
        raw.append({k: v.double().numpy() for k, v in files.items()})
    layers = read_transcoder_set(str(tmp_path), n_layers=2)
    x = RNG.normal(size=(7, D_IN))
    for found, t in zip(layers, raw, strict=True):
        assert found.dictionary.cfg.hook_name == f"blocks.{found.layer}.mlp.hook_in"
        assert found.dictionary.cfg.hook_name_out == f"blocks.{found.layer}.mlp.hook_out"
        pre = x @ t["W_enc"].T + t["b_enc"]
        threshold = t.get("activation_function.threshold")
        a = np.maximum(pre, 0) if threshold is None else pre * (pre > threshold)
        out = a @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
        latents, output = found.dictionary(torch.tensor(x, dtype=torch.float32))
        np.testing.assert_allclose(latents.numpy(), a, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(output.numpy(), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("factor", [math.nan, math.inf, 0.0])
def test_a_scaling_factor_that_no_input_can_be_scaled_by_is_refused(
    tmp_path: Path, factor: float
) -> None:
    """NaN and inf served nulls and internal errors, 0 a division by zero, all at query time."""
    config = saelens_config("standard", D_IN, D_SAE, "blocks.0.hook_resid_post")
    config["normalize_activations"] = "expected_average_only_in"
    write_saelens(tmp_path / "d", config, random_tensors("standard", D_IN, D_IN, D_SAE, 5))
    with pytest.raises(FileProblem, match="scaling_factor must be a finite number other than 0"):
        read_saelens(str(tmp_path / "d"), scaling_factor=factor)


def test_a_topk_k_that_is_no_whole_number_is_refused(tmp_path: Path) -> None:
    config = saelens_config("topk", D_IN, D_SAE, "blocks.0.hook_resid_post", k=4)
    write_saelens(tmp_path / "t", config, random_tensors("topk", D_IN, D_IN, D_SAE, 6))
    for k in (3.7, True):  # read as 3 and as 1
        (tmp_path / "t" / "cfg.json").write_text(json.dumps(config | {"k": k}))
        with pytest.raises(FileProblem, match="needs a whole 0 < k <= d_sae"):
            read_saelens(str(tmp_path / "t"))


def circuit_tracer_folder(folder: Path, n_layers: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\n"
    )
    for layer in range(n_layers):
        t = random_tensors("transcoder", D_IN, D_IN, D_SAE, 20 + layer)
        files = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"]}
        save_file(files | {"b_dec": t["b_dec"]}, str(folder / f"layer_{layer}.safetensors"))


def test_a_circuit_tracer_set_named_by_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its folder was put in front of each layer's file twice: bad/ct/bad/ct/layer_0..."""
    circuit_tracer_folder(tmp_path / "sets" / "ct")
    monkeypatch.chdir(tmp_path)
    layers = read_transcoder_set("sets/ct", n_layers=2)
    assert [found.path for found in layers] == [
        "sets/ct/layer_0.safetensors",
        "sets/ct/layer_1.safetensors",
    ]


def test_a_circuit_tracer_set_holding_nan_is_refused_naming_the_file(tmp_path: Path) -> None:
    """It started, and an ablation of one of its latents answered INTERNAL_SERVER_ERROR."""
    circuit_tracer_folder(tmp_path)
    layer_1 = tmp_path / "layer_1.safetensors"
    tensors = load_file(layer_1)
    tensors["W_dec"][0, 0] = math.nan
    save_file(tensors, str(layer_1))
    with pytest.raises(FileProblem, match="tensor 'W_dec' holds 1 NaN") as refused:
        read_transcoder_set(str(tmp_path), n_layers=2)
    assert refused.value.path == str(layer_1)


def test_cross_layer_transcoders_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
    )
    with pytest.raises(FileProblem, match=r"config\.yaml.*cross-layer"):
        read_transcoder_set(str(tmp_path), n_layers=2)
