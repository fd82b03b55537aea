from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from interpql.backends.base import ForwardRequest, HookPoint, Intervention, Location
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import (
    load_weights,
    random_model,
    save_hf_folder,
    save_tdb_folder,
    tdb_config_from_json,
)
from interpql.specs import LossSpec
from tests.conftest import SMALL
from tests.reference import reference_forward

PROMPTS = [
    [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    [15496, 995],
    [50256, 4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 1635, 362],
]
MLP_POSTS = frozenset(HookPoint(layer, Location.MLP_POST) for layer in range(SMALL.n_layers))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in random_model(SMALL, seed=7).state_dict().items()}


@pytest.fixture(scope="module")
def backend(state: dict[str, torch.Tensor]) -> NativeGPT2Backend:
    model = random_model(SMALL, seed=0)
    model.load_state_dict(state)
    return NativeGPT2Backend(model)


def run(backend: NativeGPT2Backend, prompts: list[list[int]], **kwargs: object) -> object:
    return backend.forward(ForwardRequest(tokens=tuple(tuple(p) for p in prompts), **kwargs))  # type: ignore[arg-type]


def test_batched_forward_matches_reference(backend: NativeGPT2Backend, state: dict) -> None:
    result = backend.forward(ForwardRequest(tokens=tuple(map(tuple, PROMPTS)), save=MLP_POSTS))
    assert result.lengths == [len(p) for p in PROMPTS]
    for row, prompt in enumerate(PROMPTS):
        logits, posts = reference_forward(SMALL, state, prompt)
        n = len(prompt)
        torch.testing.assert_close(result.logits[row, :n].double(), logits, atol=1e-5, rtol=0)
        for layer in range(SMALL.n_layers):
            saved = result.activations[HookPoint(layer, Location.MLP_POST)][row, :n]
            torch.testing.assert_close(saved.double(), posts[layer], atol=1e-5, rtol=0)
        expected_loss = F.cross_entropy(logits[:-1], torch.tensor(prompt[1:]))
        assert float(result.next_token_loss[row]) == pytest.approx(float(expected_loss), abs=1e-5)


def test_matches_hugging_face_gpt2(tmp_path: Path, backend: NativeGPT2Backend, state: dict) -> None:
    from transformers import GPT2LMHeadModel

    save_hf_folder(tmp_path, SMALL, state)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    result = backend.forward(ForwardRequest(tokens=(tuple(PROMPTS[0]),)))
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPTS[0]])).logits
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=0)


def test_tdb_and_hf_folders_give_identical_outputs(tmp_path: Path, state: dict) -> None:
    save_tdb_folder(tmp_path / "tdb", SMALL, state)
    save_hf_folder(tmp_path / "hf", SMALL, state)
    outputs = []
    for folder in ("tdb", "hf"):
        cfg, loaded = load_weights(str(tmp_path / folder))
        assert cfg == SMALL
        model = random_model(cfg, seed=3)
        model.load_state_dict(loaded)
        result = NativeGPT2Backend(model).forward(ForwardRequest(tokens=tuple(map(tuple, PROMPTS))))
        outputs.append(result.logits)
    assert torch.equal(outputs[0], outputs[1])


def test_unknown_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a registered model"):
        load_weights(str(tmp_path))


def test_ablation_matches_reference_with_overwritten_activation(
    backend: NativeGPT2Backend, state: dict
) -> None:
    layer, token, neuron, value = 1, 4, 17, 3.5
    point = HookPoint(layer, Location.MLP_POST)
    result = backend.forward(
        ForwardRequest(
            tokens=(tuple(PROMPTS[0]),),
            save=frozenset({point}),
            interventions=(
                Intervention(point=point, value=value, position=token, index=(neuron,)),
            ),
        )
    )
    logits, _ = reference_forward(SMALL, state, PROMPTS[0], (layer, token, neuron, value))
    assert float(result.activations[point][0, token, neuron]) == value
    torch.testing.assert_close(result.logits[0].double(), logits, atol=1e-5, rtol=0)


def test_gradients_match_autograd_on_reference(backend: NativeGPT2Backend, state: dict) -> None:
    point = HookPoint(1, Location.MLP_POST)
    result = backend.forward(
        ForwardRequest(
            tokens=(tuple(PROMPTS[0]),),
            save=frozenset({point}),
            backward=LossSpec(),
            save_grads=frozenset({point}),
        )
    )
    # Independent gradient: finite differences on the reference, a few neurons.
    grad = result.gradients[point][0]
    prompt = PROMPTS[0]
    for token, neuron in [(2, 5), (7, 40), (9, 79)]:
        _, posts = reference_forward(SMALL, state, prompt)
        base = float(posts[1][token, neuron])
        eps = 1e-4
        losses = []
        for delta in (eps, -eps):
            logits, _ = reference_forward(SMALL, state, prompt, (1, token, neuron, base + delta))
            losses.append(float(F.cross_entropy(logits[:-1], torch.tensor(prompt[1:]))))
        numeric = (losses[0] - losses[1]) / (2 * eps)
        assert float(grad[token, neuron]) == pytest.approx(numeric, abs=1e-5, rel=1e-3)


def test_attention_probs_are_causal_and_normalised(backend: NativeGPT2Backend) -> None:
    point = HookPoint(0, Location.ATTN_PROBS)
    result = backend.forward(ForwardRequest(tokens=(tuple(PROMPTS[0]),), save=frozenset({point})))
    probs = result.activations[point][0]  # [query, head, key]
    n = len(PROMPTS[0])
    torch.testing.assert_close(probs.sum(-1), torch.ones(n, SMALL.n_heads))
    future = torch.triu(torch.ones(n, n), 1).bool()
    assert probs.permute(1, 0, 2)[:, future].abs().max() == 0


def test_explicit_and_fused_attention_agree(backend: NativeGPT2Backend) -> None:
    tokens = (tuple(PROMPTS[2]),)
    fused = backend.forward(ForwardRequest(tokens=tokens))
    explicit = backend.forward(
        ForwardRequest(
            tokens=tokens,
            save=frozenset({HookPoint(layer, Location.ATTN_PROBS) for layer in range(3)}),
        )
    )
    torch.testing.assert_close(fused.logits, explicit.logits, atol=1e-5, rtol=0)


def test_bfloat16_runs_close_to_float32(state: dict) -> None:
    model = random_model(SMALL, seed=0)
    model.load_state_dict(state)
    fp32 = NativeGPT2Backend(model).forward(ForwardRequest(tokens=(tuple(PROMPTS[0]),)))
    model = random_model(SMALL, seed=0)
    model.load_state_dict(state)
    bf16 = NativeGPT2Backend(model, dtype=torch.bfloat16).forward(
        ForwardRequest(tokens=(tuple(PROMPTS[0]),))
    )
    assert bf16.logits.dtype == torch.float32
    torch.testing.assert_close(bf16.logits, fp32.logits, atol=0.05, rtol=0.05)


def test_weights_in_transformerlens_layout(backend: NativeGPT2Backend) -> None:
    w_o = backend.weight("blocks.1.attn.W_O")
    assert w_o.shape == (SMALL.n_heads, SMALL.d_head, SMALL.d_model)
    out_proj = backend.model.xf_layers[1].attn.out_proj.weight  # [d_model, heads * d_head]
    torch.testing.assert_close(w_o[2], out_proj[:, 32:48].T)
    w_q = backend.weight("blocks.0.attn.W_Q")
    q_proj = backend.model.xf_layers[0].attn.q_proj.weight
    torch.testing.assert_close(w_q[1], q_proj[16:32].T)
    assert backend.weight("W_U").shape == (SMALL.d_model, SMALL.n_vocab)
    with pytest.raises(KeyError):
        backend.weight("blocks.0.attn.nope")


def test_a_transformer_debugger_folder_has_only_the_keys_its_loader_takes(
    tmp_path: Path, state: dict
) -> None:
    """Transformer Debugger's TransformerConfig(**config) refuses any other key (n_vocab
    included: its vocabulary is the encoding's), so a folder we write in its format must hold
    exactly these (its config's fields, neuron_explainer/models/transformer.py)."""
    save_tdb_folder(tmp_path / "tdb", SMALL, state)
    config = json.loads((tmp_path / "tdb" / "config.json").read_text())
    assert set(config) <= {"enc", "ctx_window", "d_model", "n_layers", "m_attn", "n_heads", "m_mlp"}
    assert config == {
        "enc": "gpt2",
        "ctx_window": SMALL.n_ctx,
        "d_model": SMALL.d_model,
        "n_layers": SMALL.n_layers,
        "m_attn": SMALL.n_heads * SMALL.d_head / SMALL.d_model,
        "n_heads": SMALL.n_heads,
        "m_mlp": SMALL.d_mlp / SMALL.d_model,
    }
    assert tdb_config_from_json(config) == SMALL
