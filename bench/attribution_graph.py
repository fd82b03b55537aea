"""Attribution graphs on the demo with its trained transcoders, against circuit-tracer 0.5.0.

For prompts of 16, 32 and 64 tokens (a beginning-of-sequence token first, as circuit-tracer
does), every active latent attributed, circuit-tracer's defaults otherwise:

  ours           `attribute()` (backends/circuits) on the native backend: median time, peak
                 resident memory over the call (the kernel's high-water mark, reset first) and
                 its rise over the process before the call; then pruning and scores
  circuit-tracer the same prompt, model and transcoders through its own `attribute()`, in its
                 own venv (`bench/circuit_tracer_peer.py`: it pins transformer-lens<4), run from
                 here as a subprocess in the same run; its adjacency is read back and compared
                 edge by edge with ours where the definitions agree (see `compare`)

    .venv/bin/python -m bench.attribution_graph [--peer-python /tmp/ctvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.circuit_tracer_peer import PROMPT, PeakMemory, mib
from bench.common import save
from interpql.backends.circuits import pruning
from interpql.backends.circuits.attribution import GraphParams, RawGraph, attribute
from interpql.backends.circuits.linearised import transcoders_of
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import build_model
from interpql.backends.tokenizer import END_OF_TEXT_ID, gpt2_encoding
from interpql.demo.artifacts import load_demo_dictionaries, load_demo_model
from interpql.loaders.attribution_graph import layout_of

PEER = Path(__file__).with_name("circuit_tracer_peer.py")


def demo_backend() -> NativeGPT2Backend:
    cfg, weights = load_demo_model()
    backend = NativeGPT2Backend(build_model(cfg, weights))
    for (name, layer), (dictionary, input, output) in load_demo_dictionaries().items():
        if name == "transcoder":
            backend.attach_dictionary(name, layer, dictionary, input, output)
    return backend


def ours(
    backend: NativeGPT2Backend, tokens: list[int], repeats: int
) -> tuple[dict[str, Any], RawGraph]:
    transcoders = transcoders_of(backend, "transcoder")
    params = GraphParams(batch_size=32)
    attribute(backend, tokens, transcoders, params)  # warm-up
    times, peaks, rises = [], [], []
    raw = None
    for _ in range(repeats):
        raw = None
        with PeakMemory() as memory:
            started = time.perf_counter()
            raw = attribute(backend, tokens, transcoders, params)
            times.append(time.perf_counter() - started)
        peak = memory.hwm if memory.hwm is not None else memory.sampled_peak
        peaks.append(peak)
        rises.append(peak - memory.before)
    assert raw is not None
    started = time.perf_counter()
    layout = layout_of(raw)
    pruned = pruning.prune(raw.adjacency, layout, raw.logit_probabilities, 0.8, 0.98)
    replacement, completeness = pruning.scores(
        raw.adjacency, layout, raw.logit_probabilities, pruned.influence
    )
    prune_s = time.perf_counter() - started
    return {
        "attribute_s_median": round(statistics.median(times), 4),
        "attribute_s_all": [round(t, 4) for t in times],
        "peak_rss_mib": mib(max(peaks)),
        "peak_rss_rise_mib": mib(max(rises)),
        "prune_and_scores_s": round(prune_s, 4),
        "active_features": raw.n_active,
        "active_features_past_bos": int((raw.features[:, 1] > 0).sum()),
        "nonzero_edges": int((raw.adjacency != 0).sum()),
        "logits": len(raw.logit_tokens),
        "replacement_score": round(replacement, 6),
        "completeness_score": round(completeness, 6),
        "pruned_nodes": int(pruned.node_mask.sum()),
        "pruned_edges": len(pruned.edges),
    }, raw


def compare(raw: RawGraph, peer_npz: Path) -> dict[str, Any]:
    """Edges between nodes both graphs have, where both define them alike: latents past the
    first position (circuit-tracer leaves the BOS position's latents and error out), error
    nodes and logits. Embedding edges differ by definition: circuit-tracer's embedding node is
    the token embedding alone, ours token plus position embedding (the whole residual stream
    entering layer 0), so theirs leaves the position embedding unattributed."""
    peer = np.load(peer_npz)
    shape = tuple(peer["adjacency_shape"])
    theirs = np.zeros(shape, dtype=np.float64)
    theirs[peer["adjacency_rows"], peer["adjacency_cols"]] = peer["adjacency_values"]
    n_layers, n_positions = raw.n_layers, raw.n_positions
    their_features = [tuple(f) for f in peer["feature_nodes"].tolist()]
    n_theirs = len(their_features)
    our_index = {tuple(f): i for i, f in enumerate(raw.features.tolist())}
    # Matrix indices of the shared nodes, (ours, theirs), as targets (rows) and sources.
    rows = [(our_index[f], i) for i, f in enumerate(their_features) if f in our_index]
    n_ours = raw.n_features
    rows += [
        (n_ours + k, n_theirs + n_layers * n_positions + n_positions + k)
        for k in range(len(raw.logit_tokens))
    ]
    columns = [(our_index[f], i) for i, f in enumerate(their_features) if f in our_index]
    for layer in range(n_layers):
        for position in range(1, n_positions):
            columns.append(
                (n_ours + layer * n_positions + position, n_theirs + layer * n_positions + position)
            )
    ours_m = raw.adjacency.double().numpy()[np.ix_([r for r, _ in rows], [c for c, _ in columns])]
    theirs_m = theirs[np.ix_([r for _, r in rows], [c for _, c in columns])]
    scale = np.abs(theirs_m).max()
    return {
        "shared_latents": len([1 for f in their_features if f in our_index]),
        "their_latents": n_theirs,
        "same_logit_tokens": raw.logit_tokens == peer["logit_tokens"].tolist(),
        "edges_compared": int((theirs_m != 0).sum()),
        "max_abs_difference": float(np.abs(ours_m - theirs_m).max()),
        "largest_edge": float(scale),
        "max_relative_to_largest": float(np.abs(ours_m - theirs_m).max() / scale),
    }


def peer_run(python: str, lengths: list[int], repeats: int, out: Path) -> dict[int, dict[str, Any]]:
    done = subprocess.run(
        [
            python,
            str(PEER),
            "--out",
            str(out),
            "--lengths",
            ",".join(map(str, lengths)),
            "--repeats",
            str(repeats),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("{") and '"n_prompt_tokens"' in line:
            figures = json.loads(line)
            found[figures["n_prompt_tokens"]] = figures
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-python", default="/tmp/ctvenv/bin/python")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    lengths = [int(n) for n in args.lengths.split(",")]
    backend = demo_backend()
    prompt = gpt2_encoding().encode(PROMPT)
    results: dict[str, Any] = {"prompt_lengths": lengths, "repeats": args.repeats}
    raws = {}
    for n in lengths:
        figures, raws[n] = ours(backend, [END_OF_TEXT_ID, *prompt[:n]], args.repeats)
        results[f"ours_{n}"] = figures
    if Path(args.peer_python).exists():
        with tempfile.TemporaryDirectory() as folder:
            peers = peer_run(args.peer_python, lengths, args.repeats, Path(folder))
            for n in lengths:
                peer = peers[n]
                mine = results[f"ours_{n}"]
                results[f"circuit_tracer_{n}"] = {
                    key: peer[key]
                    for key in (
                        "attribute_s_median",
                        "attribute_s_all",
                        "peak_rss_mib_hwm",
                        "peak_rss_delta_mib_hwm",
                        "active_features",
                        "nonzero_edges",
                        "replacement_score",
                        "completeness_score",
                        "pruned_nodes",
                        "pruned_edges",
                    )
                }
                results[f"speedup_{n}"] = round(
                    peer["attribute_s_median"] / mine["attribute_s_median"], 2
                )
                results[f"memory_rise_ratio_{n}"] = round(
                    mine["peak_rss_rise_mib"] / peer["peak_rss_delta_mib_hwm"], 3
                )
                results[f"agreement_{n}"] = compare(raws[n], Path(peer["raw_npz"]))
    save("attribution_graph", results)
    return results


if __name__ == "__main__":
    main()
