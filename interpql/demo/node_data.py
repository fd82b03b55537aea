"""The demo's node data: records of every node (neurons, heads, both autoencoders' latents, the
SAELens dictionaries' latents) on the held-out split, and baseline explanations scored by the
baseline simulator."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from interpql.backends.base import AutoencoderInput, ForwardRequest, HookPoint, Location
from interpql.backends.gpt2.backend import NativeGPT2Backend
from interpql.backends.tokenizer import gpt2_encoding
from interpql.demo.explanations import explain_and_score_all
from interpql.demo.records import compute_records, head_write_norms
from interpql.loaders.sources.compact_format import ExplanationTable, RecordStore

if TYPE_CHECKING:
    from interpql.demo.build import DemoBuild

RECORDS_DIR = "records"
EXPLANATIONS_DIR = "explanations"
# Autoencoder folders are named by what they read; records by the node kind of their latents.
_LATENT_KINDS = {
    AutoencoderInput.MLP_POST_ACT.value: ("mlp_autoencoder_latent", Location.MLP_POST),
    AutoencoderInput.RESID_DELTA_MLP.value: ("mlp_autoencoder_latent", Location.MLP_OUT),
    AutoencoderInput.RESID_DELTA_ATTN.value: ("attention_autoencoder_latent", Location.ATTN_OUT),
}

Activations = dict[tuple[str, int], torch.Tensor]


def activations_fn(build: DemoBuild) -> Callable[[torch.Tensor], Activations]:
    """One forward pass per batch: every node kind of every layer, [batch, token, node]."""
    backend = NativeGPT2Backend(build.model)
    n_layers = build.cfg.n_layers
    save = {
        HookPoint(layer, loc)
        for layer in range(n_layers)
        for loc in (Location.MLP_POST, Location.ATTN_Z)
    }
    save |= {HookPoint(layer, _LATENT_KINDS[kind][1]) for kind, layer in build.autoencoders}
    # A dictionary's latents as the served model computes them (its inputs saved alongside).
    for name, layer in build.dictionaries:
        backend.attach_dictionary(name, layer, *build.dictionaries[name, layer])
        save.add(HookPoint(layer, Location.LATENTS, name))
    w_o = {layer: backend.weight(f"blocks.{layer}.attn.W_O") for layer in range(n_layers)}

    def activations(batch: torch.Tensor) -> Activations:
        result = backend.forward(
            ForwardRequest(tokens=tuple(tuple(row) for row in batch.tolist()), save=frozenset(save))
        )
        acts = result.activations
        out: Activations = {}
        for layer in range(n_layers):
            out[("mlp_neuron", layer)] = acts[HookPoint(layer, Location.MLP_POST)]
            out[("attention_head", layer)] = head_write_norms(
                acts[HookPoint(layer, Location.ATTN_Z)], w_o[layer]
            )
        for (kind, layer), ae in build.autoencoders.items():
            node_kind, location = _LATENT_KINDS[kind]
            out[(node_kind, layer)] = ae.encode(acts[HookPoint(layer, location)].float())
        for name, layer in build.dictionaries:
            out[(name, layer)] = acts[HookPoint(layer, Location.LATENTS, name)]
        return out

    return activations


def build_node_data(build: DemoBuild, *, progress: bool = True) -> None:
    """Writes records/ and explanations/ under the build's folder and adds their figures."""
    started = time.perf_counter()
    heldout = build.corpus.heldout.tokens
    with torch.inference_mode():
        store = compute_records(
            heldout,
            activations_fn(build),
            seq_len=build.cfg.n_ctx,
            window=24,
            top_k=10,
            n_random=5,
            batch_size=16,
            progress=progress,
        )
    store.save(build.out_dir / RECORDS_DIR)
    records_s = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "nodes": {f"{g.kind}/{g.layer}": g.n_nodes for g in store.groups()},
        "heldout_tokens": len(heldout),
        **explain_store(store, build.out_dir, progress=progress),
    }
    build.metrics["node_data"] = metrics
    build.metrics["timings_s"]["records"] = records_s
    build.metrics["timings_s"]["explanations"] = time.perf_counter() - started - records_s


def explain_store(store: RecordStore, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Writes explanations/ under `out_dir`, every node of `store` explained and scored by the
    baselines, and returns their figures."""
    encoding = gpt2_encoding()

    def decode(token: int) -> str:
        return encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    table = explain_and_score_all(store, decode, progress=progress)
    table.save(out_dir / EXPLANATIONS_DIR)
    scores = torch.tensor([row.score for row in table.rows], dtype=torch.float64)
    finite = scores[torch.isfinite(scores)]
    return {
        "explanations": len(table),
        "mean_score": float(finite.mean()) if len(finite) else None,
        "share_score_above_0_5": float((finite > 0.5).double().mean()) if len(finite) else None,
        "share_with_a_layer_twin": _share_with_a_layer_twin(table),
    }


def _share_with_a_layer_twin(table: ExplanationTable) -> float:
    """The share of nodes whose explanation is word for word another's of their layer and
    kind: how often the baseline fails to tell nodes apart."""
    texts = Counter((row.kind, row.layer, row.text) for row in table.rows)
    twins = sum(count for count in texts.values() if count > 1)
    return twins / len(table) if len(table) else 0.0
