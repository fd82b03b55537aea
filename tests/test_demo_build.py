import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from interpql.backends.gpt2.loading import build_model, load_hf_folder
from interpql.demo.artifacts import (
    export_hf_folder,
    load_demo_autoencoders,
    load_demo_metrics,
    load_demo_model,
)
from interpql.demo.build import QUICK, build_demo
from interpql.demo.corpus import is_heldout, load_corpus
from interpql.demo.train_autoencoders import ATTN_KIND, MLP_KIND, layer_activations
from interpql.demo.train_model import eval_windows, model_loss


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Path]:
    out_dir = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The quick recipe in smaller batches: what `--batch-size` changes, and nothing else.
        build_demo(out_dir, quick=True, progress=False, cache_dir=cache_dir, batch_size=2)
        yield out_dir
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def metrics(demo: Path) -> dict[str, Any]:
    return load_demo_metrics(demo)


def test_quick_build_reports_its_figures(metrics: dict[str, Any]) -> None:
    corpus, held = metrics["corpus"], metrics["heldout"]
    assert corpus["train_tokens"] > 10 * corpus["heldout_tokens"] > 0
    assert corpus["vocabulary_used"] > 10_000
    for key in ("model_loss", "unigram_loss", "bigram_loss", "bigram_interpolated_loss"):
        assert math.isfinite(held[key]) and held[key] > 0
    assert held["bigram_interpolated_loss"] < held["bigram_loss"] < held["unigram_loss"]
    assert held["beats_bigram"] == (held["model_loss"] < held["bigram_loss"])
    n_layers = metrics["model"]["config"]["n_layers"]
    assert set(metrics["autoencoders"]["heldout"]) == {
        f"{kind}/{layer}" for kind in (MLP_KIND, ATTN_KIND) for layer in range(n_layers)
    }
    for ae in metrics["autoencoders"]["heldout"].values():
        assert 0.0 < ae["fve"] <= 1.0
        assert 0.0 < ae["mean_l0"] < ae["n_latents"]
        assert 0.0 <= ae["dead_share"] < 1.0
    assert metrics["artifact_bytes"]["total"] < 30e6
    training = metrics["model"]["training"]
    assert training == {**asdict(QUICK.model), "batch_size": 2, "device": "cpu"}
    window_tokens = 2 * QUICK.model.n_ctx
    assert metrics["model"]["steps"] == math.ceil(QUICK.model.train_tokens / window_tokens)
    assert metrics["model"]["tokens_seen"] == metrics["model"]["steps"] * window_tokens
    assert {"corpus", "model_training", "autoencoders", "total"} <= set(metrics["timings_s"])


def test_model_loads_as_a_full_vocabulary_gpt2(demo: Path, metrics: dict[str, Any]) -> None:
    cfg, state = load_demo_model(demo)
    assert cfg.n_vocab == 50257 and cfg.n_layers == QUICK.model.n_layers
    model = build_model(cfg, state).eval()
    tokens = torch.tensor([[50256, 4299, 22944, 7, 944, 2599]])  # "def main(self):"
    with torch.inference_mode():
        logits = model(tokens)
    assert logits.shape == (1, 6, 50257)
    used = state["tok_embed.weight"].any(dim=1)
    assert int(used.sum()) == metrics["corpus"]["vocabulary_used"]
    assert bool(used[logits.argmax(dim=-1)].all())  # unused tokens never win
    unused_logits = logits[..., ~used]
    assert torch.equal(
        unused_logits, torch.full_like(unused_logits, metrics["model"]["unused_token_logit"])
    )


def test_held_out_loss_recomputes_from_the_saved_model(
    demo: Path, metrics: dict[str, Any], cache_dir: Path
) -> None:
    cfg, state = load_demo_model(demo)
    corpus = load_corpus(cache_dir)
    windows = eval_windows(corpus.heldout.tokens, cfg.n_ctx, QUICK.heldout_eval_tokens)
    loss = model_loss(build_model(cfg, state).eval(), windows, corpus.used_tokens)
    assert loss == pytest.approx(metrics["heldout"]["model_loss"], rel=1e-6)


def test_autoencoders_load_and_encode_model_activations(demo: Path) -> None:
    cfg, state = load_demo_model(demo)
    model = build_model(cfg, state).eval()
    autoencoders = load_demo_autoencoders(demo)
    assert set(autoencoders) == {
        (kind, layer) for kind in (MLP_KIND, ATTN_KIND) for layer in range(cfg.n_layers)
    }
    tokens = torch.tensor([[50256, 4299, 22944, 7, 944, 2599]])
    with torch.inference_mode():
        acts = layer_activations(model, tokens, cfg.n_layers - 1)
        for kind in (MLP_KIND, ATTN_KIND):
            ae = autoencoders[kind, cfg.n_layers - 1]
            assert ae.n_inputs == acts[kind].shape[-1]
            assert ae.activation == "ReLU"
            latents = ae.encode(acts[kind])
            assert latents.shape == (1, 6, ae.n_latents)
            assert ae.decode(latents).shape == acts[kind].shape


def test_hugging_face_export_loads_the_same_weights(demo: Path, tmp_path: Path) -> None:
    cfg, state = load_demo_model(demo)
    hf_cfg, hf_state = load_hf_folder(export_hf_folder(tmp_path / "hf", demo))
    assert hf_cfg == cfg
    assert set(hf_state) == set(state)
    for key, value in state.items():
        assert torch.equal(hf_state[key], value), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False


def test_corpus_is_split_by_file_deterministically(cache_dir: Path) -> None:
    corpus = load_corpus(cache_dir)
    assert not set(corpus.train.documents) & set(corpus.heldout.documents)
    assert all(is_heldout(name) for name in corpus.heldout.documents)
    assert not any(is_heldout(name) for name in corpus.train.documents)
    assert list(corpus.train.documents) == sorted(corpus.train.documents)
    assert not any("site-packages" in name or "/test/" in name for name in corpus.train.documents)
    assert any(name.startswith("pydoc_data/topics/") for name in corpus.train.documents)
    for split in (corpus.train, corpus.heldout):
        assert split.tokens.dtype == np.uint16
        assert np.all(split.tokens[split.starts - 1] == 50256)
        assert split.document_at(int(split.starts[1])) == split.documents[1]
    assert load_corpus(None).fingerprint == corpus.fingerprint
