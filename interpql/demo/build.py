"""`interpql build-demo`: the embedded demo, from the standard library's sources to the files
in `interpql/data/tiny-stdlib/` (layout in artifacts.py). Seeds are fixed; each stage shows a
progress bar and its figures go to `metrics.json`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import Location
from interpql.backends.dictionaries.saelens import SaeLensDictionary
from interpql.backends.gpt2.loading import build_model
from interpql.backends.gpt2.model import GPT2, GPT2Config
from interpql.demo.artifacts import (
    AUTOENCODER_DIR,
    DEMO_NAME,
    DICTIONARY_DIR,
    METRICS_FILE,
    artifact_bytes,
    load_demo_autoencoders,
    load_demo_dictionaries,
    load_demo_metrics,
    load_demo_model,
    save_demo_autoencoders,
    save_demo_model,
)
from interpql.demo.corpus import Corpus, load_corpus
from interpql.demo.node_data import RECORDS_DIR, build_node_data, explain_store
from interpql.demo.train_autoencoders import (
    AutoencoderConfig,
    AutoencoderKey,
    train_autoencoders,
)
from interpql.demo.train_dictionaries import DictionaryConfig, train_dictionaries
from interpql.demo.train_model import (
    TrainConfig,
    eval_windows,
    model_loss,
    ngram_baselines,
    train_model,
)
from interpql.loaders.sources.compact_format import RecordStore


@dataclass(frozen=True)
class BuildConfig:
    model: TrainConfig = field(default_factory=TrainConfig)
    autoencoders: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    dictionaries: DictionaryConfig = field(default_factory=DictionaryConfig)
    heldout_eval_tokens: int | None = None  # None: the whole held-out split


# A smoke-test build of about a minute: same stages, toy sizes, meaningless quality.
QUICK = BuildConfig(
    model=TrainConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=64, train_tokens=32_768
    ),
    autoencoders=AutoencoderConfig(
        mlp_latents=128,
        attn_latents=64,
        train_tokens=16_384,
        eval_tokens=8_192,
        resample_every=20,
    ),
    dictionaries=DictionaryConfig(
        sae_latents=64,
        sae_k=8,
        transcoder_latents=128,
        train_tokens=16_384,
        eval_tokens=8_192,
        resample_every=20,
        loss_windows=8,
    ),
    heldout_eval_tokens=16_384,
)


@dataclass
class DemoBuild:
    """What a build has made so far; later stages read it and add to `metrics`."""

    out_dir: Path
    config: BuildConfig
    corpus: Corpus
    cfg: GPT2Config
    model: GPT2  # as loaded back from `out_dir`: exactly what is served
    autoencoders: dict[AutoencoderKey, SparseAutoencoder]
    # {(set name, layer): (dictionary, input, output)}: the SAELens sets, as loaded back
    dictionaries: dict[tuple[str, int], tuple[SaeLensDictionary, Location, Location]]
    metrics: dict[str, Any]
    started: float


def build_demo(
    out_dir: Path,
    *,
    quick: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    device: str = "cpu",
    train_tokens: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Builds the demo into `out_dir` and returns its metrics (also in `metrics.json`).
    `device`, `train_tokens`, `batch_size`: the model's training (the same recipe, longer or
    in larger batches, on an accelerator); None keeps the recipe's own."""
    config = QUICK if quick else BuildConfig()
    sizes = {"train_tokens": train_tokens, "batch_size": batch_size}
    config = replace(
        config, model=replace(config.model, **{k: v for k, v in sizes.items() if v is not None})
    )
    build = build_model_and_autoencoders(
        out_dir, config, progress=progress, cache_dir=cache_dir, device=device
    )
    build_node_data(build, progress=progress)
    finish(build, progress=progress)
    return build.metrics


def build_model_and_autoencoders(
    out_dir: Path,
    config: BuildConfig,
    *,
    progress: bool = True,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> DemoBuild:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with _timed(timings, "corpus"):
        corpus = load_corpus(cache_dir)
    with _timed(timings, "model_training"):
        trained = train_model(corpus, config.model, progress=progress, device=device)
        save_demo_model(out_dir, trained.cfg, trained.state, torch.from_numpy(trained.used_tokens))
        cfg, state = load_demo_model(out_dir)
        model = build_model(cfg, state).eval().requires_grad_(False)
    heldout = eval_windows(corpus.heldout.tokens, cfg.n_ctx, config.heldout_eval_tokens)
    with _timed(timings, "heldout_loss"):
        loss = model_loss(model, heldout, trained.used_tokens, progress=progress)
    with _timed(timings, "ngram_baselines"):
        baselines = ngram_baselines(corpus.train.tokens, heldout, corpus.used_tokens)
    with _timed(timings, "autoencoders"):
        ae_config = config.autoencoders
        autoencoders, ae_metrics = train_autoencoders(
            model,
            eval_windows(corpus.train.tokens, cfg.n_ctx, ae_config.train_tokens),
            eval_windows(corpus.heldout.tokens, cfg.n_ctx, ae_config.eval_tokens),
            ae_config,
            progress=progress,
        )
        shutil.rmtree(out_dir / AUTOENCODER_DIR, ignore_errors=True)
        save_demo_autoencoders(out_dir, autoencoders)
        autoencoders = load_demo_autoencoders(out_dir)
    metrics: dict[str, Any] = {
        "model_name": DEMO_NAME,
        "python": sys.version.split()[0],
        "corpus": {
            "fingerprint": corpus.fingerprint,
            "train_documents": len(corpus.train.documents),
            "heldout_documents": len(corpus.heldout.documents),
            "train_tokens": len(corpus.train.tokens),
            "heldout_tokens": len(corpus.heldout.tokens),
            "vocabulary_used": len(corpus.used_tokens),
        },
        "model": {
            "config": cfg.to_json(),
            "training": asdict(config.model) | {"device": device},
            "parameters": sum(t.numel() for t in state.values()),
            "steps": trained.steps,
            "tokens_seen": trained.tokens_seen,
            "final_train_loss": sum(trained.train_losses[-50:]) / len(trained.train_losses[-50:]),
            "unused_token_logit": trained.unused_token_logit,
        },
        "heldout": {
            "tokens_predicted": int(heldout[:, 1:].size),
            "model_loss": loss,
            "unigram_loss": baselines.pop("unigram"),
            "bigram_loss": baselines.pop("bigram"),
            "bigram_interpolated_loss": baselines.pop("bigram_interpolated"),
            "smoothing": baselines,
        },
        "autoencoders": {"training": asdict(ae_config), "heldout": ae_metrics},
        "timings_s": timings,
    }
    metrics["heldout"]["beats_bigram"] = loss < metrics["heldout"]["bigram_loss"]
    build = DemoBuild(out_dir, config, corpus, cfg, model, autoencoders, {}, metrics, started)
    add_dictionaries(build, progress=progress)
    return build


def add_dictionaries(build: DemoBuild, *, progress: bool = True) -> None:
    """Trains the SAELens dictionaries on the build's model, writes them, loads them back."""
    config, cfg, corpus = build.config.dictionaries, build.cfg, build.corpus
    with _timed(build.metrics["timings_s"], "dictionaries"):
        shutil.rmtree(build.out_dir / DICTIONARY_DIR, ignore_errors=True)
        found = train_dictionaries(
            build.model,
            build.out_dir,
            eval_windows(corpus.train.tokens, cfg.n_ctx, config.train_tokens),
            eval_windows(corpus.heldout.tokens, cfg.n_ctx, config.eval_tokens),
            eval_windows(corpus.heldout.tokens, cfg.n_ctx, config.loss_windows * cfg.n_ctx),
            config,
            progress=progress,
        )
        build.dictionaries = load_demo_dictionaries(build.out_dir)
    build.metrics["dictionaries"] = {"training": asdict(config), "heldout": found}


def rebuild_dictionaries(out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """`build-demo --only-dictionaries`: the SAELens dictionaries trained again on the model
    and autoencoders already in `out_dir`, then every node's records and explanations (the
    other stages' figures kept from its metrics.json)."""
    metrics = load_demo_metrics(out_dir)
    cfg, state = load_demo_model(out_dir)
    model = build_model(cfg, state).eval().requires_grad_(False)
    kept = {
        stage: seconds
        for stage, seconds in metrics["timings_s"].items()
        if stage not in ("dictionaries", "records", "explanations", "total")
    }
    metrics["timings_s"] = dict(kept)
    build = DemoBuild(
        out_dir,
        BuildConfig(),
        load_corpus(None),
        cfg,
        model,
        load_demo_autoencoders(out_dir),
        {},
        metrics,
        time.perf_counter() - sum(kept.values()),
    )
    add_dictionaries(build, progress=progress)
    build_node_data(build, progress=progress)
    finish(build, progress=progress)
    return build.metrics


def rebuild_explanations(out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """`build-demo --only-explanations`: every node of the records already in `out_dir`
    explained and scored again (after a change to the baseline explainer or simulator)."""
    metrics = load_demo_metrics(out_dir)
    started = time.perf_counter()
    store = RecordStore.load(out_dir / RECORDS_DIR)
    metrics["node_data"].update(explain_store(store, out_dir, progress=progress))
    metrics["timings_s"]["explanations"] = time.perf_counter() - started
    metrics.pop("artifact_bytes", None)
    metrics_path = out_dir / METRICS_FILE
    metrics["artifact_bytes"] = artifact_bytes(out_dir)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    metrics["artifact_bytes"] = artifact_bytes(out_dir)  # with metrics.json's new size
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    if progress:
        print(summary(metrics, this_run_s=time.perf_counter() - started))
    return metrics


def finish(build: DemoBuild, *, progress: bool = True) -> None:
    """Writes `metrics.json` (with the artefacts' sizes and the total time) and prints them."""
    build.metrics["timings_s"]["total"] = time.perf_counter() - build.started
    metrics_path = build.out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(build.metrics, indent=2) + "\n")
    build.metrics["artifact_bytes"] = artifact_bytes(build.out_dir)  # metrics.json included
    metrics_path.write_text(json.dumps(build.metrics, indent=2) + "\n")
    if progress:
        print(summary(build.metrics))


def summary(metrics: dict[str, Any], this_run_s: float | None = None) -> str:
    """The build's figures; `this_run_s`: the time of a partial rebuild (the training times
    shown are the full build's, which it kept)."""
    cfg, held = metrics["model"]["config"], metrics["heldout"]
    lines = [
        f"{metrics['model_name']}: {cfg['n_layers']} layers, d_model {cfg['d_model']}, "
        f"trained on {metrics['model']['tokens_seen']:,} tokens "
        f"in {metrics['timings_s']['model_training'] / 60:.1f} min",
        f"held-out loss over {held['tokens_predicted']:,} tokens (nats): "
        f"model {held['model_loss']:.3f} | bigram {held['bigram_loss']:.3f} "
        f"(interpolated {held['bigram_interpolated_loss']:.3f}) | "
        f"unigram {held['unigram_loss']:.3f}",
        f"{'autoencoder':<22}{'latents':>8}{'FVE':>8}{'L0':>8}{'dead':>8}",
    ]
    for name, ae in metrics["autoencoders"]["heldout"].items():
        lines.append(
            f"{name:<22}{ae['n_latents']:>8}{ae['fve']:>8.3f}{ae['mean_l0']:>8.1f}"
            f"{ae['dead_share']:>8.1%}"
        )
    dictionaries = metrics.get("dictionaries", {}).get("heldout", {})
    for name, layers in dictionaries.items():
        if name == "transcoder_losses":
            continue
        for layer, d in layers.items():
            lines.append(
                f"{name + '/' + layer:<22}{d['n_latents']:>8}{d['fve']:>8.3f}"
                f"{d['mean_l0']:>8.1f}{d['dead_share']:>8.1%}"
            )
    losses = dictionaries.get("transcoder_losses")
    if losses:
        lines.append(
            f"every MLP replaced by its transcoder: loss {losses['replaced']:.3f} (model "
            f"{losses['original']:.3f}, MLPs zeroed {losses['zero_ablated']:.3f}): "
            f"{losses['loss_recovered']:.1%} of the loss recovered"
        )
    node_data = metrics.get("node_data", {})
    if "mean_score" in node_data:
        lines.append(
            f"baseline explanations of {node_data['explanations']:,} nodes: mean score "
            f"{node_data['mean_score']:.2f}; {node_data['share_score_above_0_5']:.0%} above 0.5; "
            f"{node_data['share_with_a_layer_twin']:.1%} share their text with another node "
            "of their layer and kind"
        )
    lines.append(
        f"artefacts {metrics['artifact_bytes']['total'] / 1e6:.1f} MB; "
        f"full build {metrics['timings_s']['total'] / 60:.1f} min"
        + (f"; this run {this_run_s:.0f} s" if this_run_s is not None else "")
    )
    return "\n".join(lines)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started
