from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.demo.records import compute_records, head_write_norms
from interpql.loaders.sources.compact_format import RecordStore, quantile_probs
from tests.conftest import SMALL, CountingBackend

SEQ_LEN, WINDOW, TOP_K, N_RANDOM = 32, 8, 4, 3
N_SEQ = 48
VOCAB = 200
GROUPS = {("mlp_neuron", 0): 5, ("mlp_autoencoder_latent", 1): 7}


def synthetic_activations(batch: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Per token: a function of the token and the one before it, by table lookup, so every
    activation is bitwise the same whatever the batch it is computed in."""
    out = {}
    previous = torch.cat([torch.zeros_like(batch[:, :1]), batch[:, :-1]], dim=1)
    for (kind, layer), n_nodes in GROUPS.items():
        gen = torch.Generator().manual_seed(layer)
        current_table = torch.randn(VOCAB, n_nodes, generator=gen)
        previous_table = torch.randn(VOCAB, n_nodes, generator=gen)
        acts = current_table[batch] + 0.5 * previous_table[previous]
        out[(kind, layer)] = acts if kind == "mlp_neuron" else torch.relu(acts - 1.5)
    return out


def corpus_tokens(n_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n_tokens).astype(np.uint16)


def make_store(**overrides: int) -> RecordStore:
    args = (
        dict(
            seq_len=SEQ_LEN,
            window=WINDOW,
            top_k=TOP_K,
            n_random=N_RANDOM,
            n_quantiles=5,
            n_per_quantile=2,
            pilot_sequences=16,
            seed=3,
            batch_size=4,
        )
        | overrides
    )
    tokens = corpus_tokens(N_SEQ * SEQ_LEN + 5)  # a tail too short for a sequence is dropped
    return compute_records(tokens, synthetic_activations, progress=False, **args)


@pytest.fixture(scope="module")
def store() -> RecordStore:
    return make_store()


def brute_force(store: RecordStore) -> dict[tuple[str, int], np.ndarray]:
    """Every activation at once: [sequence, token, node] per group."""
    seqs = torch.from_numpy(store.tokens.astype(np.int64).reshape(N_SEQ, SEQ_LEN))
    return {key: acts.numpy() for key, acts in synthetic_activations(seqs).items()}


def test_groups_and_counts(store: RecordStore) -> None:
    assert [(g.kind, g.layer, g.n_nodes) for g in store.groups()] == [
        (kind, layer, n) for (kind, layer), n in GROUPS.items()
    ]
    assert store.kinds() == ["mlp_neuron", "mlp_autoencoder_latent"]
    assert store.count("mlp_neuron", 0) == 5
    assert store.count("attention_head", 0) == 0
    assert len(store.tokens) == N_SEQ * SEQ_LEN


def test_top_examples_are_the_k_highest_sequences(store: RecordStore) -> None:
    for (kind, layer), acts in brute_force(store).items():
        flat = acts.reshape(-1, acts.shape[-1])
        for node in range(acts.shape[-1]):
            record = store.node_record(kind, layer, node)
            seq_peaks = acts[:, :, node].max(axis=1)
            expected = np.sort(seq_peaks)[::-1][:TOP_K].astype(np.float16)
            peaks = np.array([max(e.activations) for e in record.top], dtype=np.float16)
            np.testing.assert_array_equal(peaks, expected)
            sequences = [e.offset // SEQ_LEN for e in record.top]
            assert len(set(sequences)) == TOP_K
            for example, seq in zip(record.top, sequences, strict=True):
                assert seq == (example.offset + WINDOW - 1) // SEQ_LEN  # within one sequence
                window = flat[example.offset : example.offset + WINDOW, node].astype(np.float16)
                np.testing.assert_array_equal(np.array(example.activations, np.float16), window)
                assert example.token_ids == tuple(
                    store.tokens[example.offset : example.offset + WINDOW].tolist()
                )
                assert seq_peaks[seq].astype(np.float16) == max(example.activations)


def test_stats_equal_direct_moments(store: RecordStore) -> None:
    for (kind, layer), acts in brute_force(store).items():
        x = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
        mean = x.mean(axis=0)
        variance = ((x - mean) ** 2).mean(axis=0)
        skewness = ((x - mean) ** 3).mean(axis=0) / variance**1.5
        kurtosis = ((x - mean) ** 4).mean(axis=0) / variance**2 - 3
        a = store.arrays(kind, layer)
        np.testing.assert_allclose(a["mean"], mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a["variance"], variance, rtol=1e-5)
        np.testing.assert_allclose(a["skewness"], skewness, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["kurtosis"], kurtosis, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(a["max"], x.max(axis=0).astype(np.float32))
        np.testing.assert_allclose(a["density"], (x > 0).mean(axis=0), rtol=1e-6)
        stats = store.node_record(kind, layer, 1).stats
        assert stats.mean == pytest.approx(mean[1], rel=1e-5, abs=1e-7)


def test_random_samples_are_distinct_aligned_windows(store: RecordStore) -> None:
    for (kind, layer), acts in brute_force(store).items():
        flat = acts.reshape(-1, acts.shape[-1])
        for node in range(acts.shape[-1]):
            record = store.node_record(kind, layer, node)
            offsets = [e.offset for e in record.random]
            assert len(set(offsets)) == N_RANDOM
            assert all(o % SEQ_LEN % WINDOW == 0 for o in offsets)
            for e in record.random:
                expected = flat[e.offset : e.offset + WINDOW, node].astype(np.float16)
                np.testing.assert_array_equal(np.array(e.activations, np.float16), expected)


def test_quantile_samples_lie_in_their_buckets(store: RecordStore) -> None:
    assert store.layout.pilot_sequences == 16
    for (kind, layer), acts in brute_force(store).items():
        flat = acts.reshape(-1, acts.shape[-1])
        tile_peaks = acts.reshape(N_SEQ, SEQ_LEN // WINDOW, WINDOW, -1).max(axis=2)
        for node in range(acts.shape[-1]):
            record = store.node_record(kind, layer, node)
            bounds = record.quantile_boundaries
            assert len(bounds) == 4 and list(bounds) == sorted(bounds)
            assert tile_peaks[..., node].min() <= bounds[0] <= bounds[-1]
            assert bounds[-1] <= tile_peaks[..., node].max()
            assert len(record.by_quantile) == 5
            edges = [-np.inf, *bounds, np.inf]
            for q, bucket in enumerate(record.by_quantile):
                for e in bucket:
                    peak = flat[e.offset : e.offset + WINDOW, node].max()
                    assert edges[q] < peak <= edges[q + 1]
            # Buckets below the top one hold most windows, so they are never empty here.
            assert all(len(bucket) == 2 for bucket in record.by_quantile[:2])


def test_quantile_probs_follow_transformer_debugger() -> None:
    assert quantile_probs(5) == pytest.approx((0.5, 0.9, 0.99, 0.999))
    assert quantile_probs(2) == (0.5,)
    assert quantile_probs(1) == ()


def test_too_little_data_for_quantiles_gives_no_buckets() -> None:
    store = make_store(pilot_sequences=0)
    record = store.node_record("mlp_neuron", 0, 0)
    assert record.by_quantile == () and record.quantile_boundaries == ()
    tdb = store.to_tdb_json("mlp_neuron", 0, 0, decode_token=str)
    assert tdb["random_sample_by_quantile"] is None and tdb["quantile_boundaries"] is None


def test_same_seed_same_records(store: RecordStore) -> None:
    again = make_store()
    for g in store.groups():
        for name, value in store.arrays(g.kind, g.layer).items():
            np.testing.assert_array_equal(value, again.arrays(g.kind, g.layer)[name])


def test_save_load_round_trip(store: RecordStore, tmp_path: Path) -> None:
    store.save(tmp_path / "records")
    loaded = RecordStore.load(tmp_path / "records")
    assert loaded.layout == store.layout
    assert loaded.groups() == store.groups()
    np.testing.assert_array_equal(loaded.tokens, store.tokens)
    assert loaded.tokens.dtype == np.uint16
    for g in store.groups():
        original = store.arrays(g.kind, g.layer)
        copy = loaded.arrays(g.kind, g.layer)
        assert copy.keys() == original.keys()
        for name in original:
            assert copy[name].dtype == original[name].dtype
            np.testing.assert_array_equal(copy[name], original[name])
        assert loaded.node_record(g.kind, g.layer, 2) == store.node_record(g.kind, g.layer, 2)


def test_load_refuses_another_format(tmp_path: Path) -> None:
    (tmp_path / "header.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="no node records"):
        RecordStore.load(tmp_path)


def test_tdb_json_layout(store: RecordStore) -> None:
    tdb = store.to_tdb_json("mlp_autoencoder_latent", 1, 3, decode_token=lambda t: f"<{t}>")
    assert list(tdb) == [
        "dataclass_name",
        "neuron_id",
        "random_sample",
        "random_sample_by_quantile",
        "quantile_boundaries",
        "mean",
        "variance",
        "skewness",
        "kurtosis",
        "most_positive_activation_records",
    ]
    assert tdb["dataclass_name"] == "NeuronRecord"
    assert tdb["neuron_id"] == {"dataclass_name": "NeuronId", "neuron_index": 3, "layer_index": 1}
    top = tdb["most_positive_activation_records"]
    assert len(top) == TOP_K and len(tdb["random_sample"]) == N_RANDOM
    assert list(top[0]) == ["dataclass_name", "activations", "tokens"]
    assert top[0]["dataclass_name"] == "ActivationRecord"
    record = store.node_record("mlp_autoencoder_latent", 1, 3)
    assert top[0]["tokens"] == [f"<{t}>" for t in record.top[0].token_ids]
    assert top[0]["activations"] == list(record.top[0].activations)
    assert len(tdb["random_sample_by_quantile"]) == 5 and len(tdb["quantile_boundaries"]) == 4
    assert tdb["mean"] == record.stats.mean
    json.dumps(tdb, allow_nan=False)


def test_tdb_json_writes_undefined_moments_as_null() -> None:
    def constant(batch: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
        return {("mlp_autoencoder_latent", 0): torch.zeros(*batch.shape, 2)}

    store = compute_records(
        corpus_tokens(4 * SEQ_LEN), constant, seq_len=SEQ_LEN, window=WINDOW, top_k=2
    )
    tdb = store.to_tdb_json("mlp_autoencoder_latent", 0, 1, decode_token=str)
    assert tdb["variance"] == 0.0 and tdb["skewness"] is None and tdb["kurtosis"] is None
    assert store.node_record("mlp_autoencoder_latent", 0, 1).stats.density == 0.0


def test_tdb_json_decodes_gpt2_tokens_by_default(store: RecordStore) -> None:
    tdb = store.to_tdb_json("mlp_neuron", 0, 0)
    record = store.node_record("mlp_neuron", 0, 0)
    from interpql.backends.tokenizer import gpt2_encoding

    expected = [gpt2_encoding().decode([t]) for t in record.top[0].token_ids]
    assert tdb["most_positive_activation_records"][0]["tokens"] == expected


def test_rejects_a_window_longer_than_a_sequence() -> None:
    with pytest.raises(ValueError, match="window"):
        compute_records(corpus_tokens(64), synthetic_activations, seq_len=8, window=9)


# --- With a real (random) model: MLP neurons and attention heads ------------------------------


Activations = dict[tuple[str, int], torch.Tensor]


def model_activations(backend: CountingBackend) -> Callable[[torch.Tensor], Activations]:
    layers = range(SMALL.n_layers)
    save = frozenset(
        HookPoint(layer, loc) for layer in layers for loc in (Location.MLP_POST, Location.ATTN_Z)
    )
    w_o = [backend.weight(f"blocks.{layer}.attn.W_O") for layer in layers]

    def activations(batch: torch.Tensor) -> Activations:
        tokens = tuple(tuple(row) for row in batch.tolist())
        result = backend.forward(ForwardRequest(tokens=tokens, save=save))
        out = {}
        for layer in layers:
            out[("mlp_neuron", layer)] = result.activations[HookPoint(layer, Location.MLP_POST)]
            z = result.activations[HookPoint(layer, Location.ATTN_Z)]
            out[("attention_head", layer)] = head_write_norms(z, w_o[layer])
        return out

    return activations


def test_head_write_norms_split_the_attention_output(small_backend: CountingBackend) -> None:
    points = frozenset({HookPoint(1, Location.ATTN_Z), HookPoint(1, Location.ATTN_OUT)})
    result = small_backend.forward(ForwardRequest(tokens=((5, 6, 7, 8),), save=points))
    z = result.activations[HookPoint(1, Location.ATTN_Z)]
    w_o = small_backend.weight("blocks.1.attn.W_O")
    writes = torch.einsum("bthd,hdm->bthm", z, w_o)
    bias = small_backend.model.state_dict()["xf_layers.1.attn.out_proj.bias"]
    attn_out = result.activations[HookPoint(1, Location.ATTN_OUT)]
    torch.testing.assert_close(writes.sum(dim=2) + bias, attn_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_write_norms(z, w_o), writes.norm(dim=-1))


def test_records_of_a_random_model(small_backend: CountingBackend) -> None:
    torch.set_num_threads(1)
    activations = model_activations(small_backend)
    tokens = corpus_tokens(12 * SEQ_LEN, seed=5)
    store = compute_records(
        tokens, activations, seq_len=SEQ_LEN, window=WINDOW, top_k=3, batch_size=5
    )
    assert [(g.layer, g.kind) for g in store.groups()] == [
        (layer, kind)
        for layer in range(SMALL.n_layers)
        for kind in ("mlp_neuron", "attention_head")
    ]
    assert store.count("mlp_neuron", 2) == SMALL.d_mlp
    assert store.count("attention_head", 2) == SMALL.n_heads
    heads = store.arrays("attention_head", 1)
    assert (heads["density"] == 1).all()  # a norm: positive on every token
    # A top example's activations are the model's, recomputed on its own sequence.
    record = store.node_record("mlp_neuron", 1, 7)
    example = record.top[0]
    seq = example.offset // SEQ_LEN
    sequence = torch.from_numpy(store.tokens[seq * SEQ_LEN : (seq + 1) * SEQ_LEN].astype(np.int64))
    acts = activations(sequence[None])[("mlp_neuron", 1)][0, :, 7]
    start = example.offset - seq * SEQ_LEN
    np.testing.assert_allclose(
        example.activations, acts[start : start + WINDOW].numpy(), rtol=2e-3, atol=1e-4
    )
    assert max(example.activations) == pytest.approx(float(acts.max()), rel=2e-3)
