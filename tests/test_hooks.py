"""The hook session (backends/hooks.py) on tensors made here: interventions and additions land
where they say, saved activations keep gradients, autoencoders splice in exactly, and traces
compute the value their definition says."""

from __future__ import annotations

import math

import torch

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import (
    Addition,
    AttachedDictionary,
    ForwardRequest,
    HookPoint,
    Intervention,
    Location,
    Trace,
)
from interpql.backends.hooks import HookSession
from interpql.specs import AttentionTrace, LossSpec

POST = HookPoint(0, Location.MLP_POST)
G = torch.Generator().manual_seed(0)


def activation(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def test_interventions_and_additions_at_rows_and_positions() -> None:
    act = activation(2, 4, 6)  # [row, position, neuron]
    request = ForwardRequest(
        tokens=((1,) * 4, (1,) * 4),
        save=frozenset({POST}),
        interventions=(
            Intervention(point=POST, value=5.0, position=2, index=(3,), row=1),
            Intervention(point=POST, value=-1.0, index=(0,)),  # every row and position
        ),
        additions=(Addition(point=POST, vector=tuple(range(6)), position=1, row=0),),
    )
    session = HookSession(request)
    out = session.process(POST, act)
    expected = act.clone()
    expected[1, 2, 3] = 5.0
    expected[:, :, 0] = -1.0
    expected[0, 1] += torch.arange(6, dtype=torch.float32)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(session.activations[POST], expected)
    assert torch.equal(act, act.clone())  # the input itself is never written in place


def test_saved_activations_keep_their_gradients() -> None:
    leaf = activation(1, 3, 6).requires_grad_(True)
    request = ForwardRequest(tokens=((1, 2, 3),), save_grads=frozenset({POST}), backward=LossSpec())
    session = HookSession(request)
    (session.process(POST, leaf * 2.0) ** 2).sum().backward()
    torch.testing.assert_close(session.gradients()[POST], 2 * (leaf * 2.0).detach())


def test_an_autoencoder_splices_in_exactly_with_its_error_term() -> None:
    ae = SparseAutoencoder(6, 10)
    with torch.no_grad():
        for parameter in ae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=G))
    latents = HookPoint(0, Location.LATENTS, "ae")
    attached = {latents: AttachedDictionary("ae", 0, ae, Location.MLP_POST, Location.MLP_POST)}
    x = activation(1, 3, 6)
    kept = HookSession(ForwardRequest(tokens=((1, 2, 3),), save=frozenset({latents})), attached)
    torch.testing.assert_close(kept.process(POST, x), x)  # untouched latents: exactly x
    pre = (x - ae.pre_bias) @ ae.encoder.weight.T + ae.latent_bias
    torch.testing.assert_close(kept.activations[latents], torch.relu(pre))
    dropped = HookSession(
        ForwardRequest(
            tokens=((1, 2, 3),), save=frozenset({latents}), autoencoder_error_term=False
        ),
        attached,
    )
    reconstruction = torch.relu(pre) @ ae.decoder.weight.T + ae.pre_bias
    torch.testing.assert_close(dropped.process(POST, x), reconstruction.detach())


def test_attention_traces_compute_scores_and_value_writes() -> None:
    q, k, v = (activation(2, 5, 3, 4).requires_grad_(True) for _ in range(3))
    probs = torch.softmax(activation(2, 5, 3, 5), dim=-1)
    points = {loc: HookPoint(1, loc) for loc in (Location.ATTN_Q, Location.ATTN_K)}
    for kind in (AttentionTrace.Q, AttentionTrace.K, AttentionTrace.QK):
        trace = Trace(
            point=points[Location.ATTN_Q],
            position=4,
            index=(2,),
            attention=kind,
            key_position=1,
        )
        session = HookSession(ForwardRequest(tokens=((1,) * 5,) * 2, trace=trace))
        session.process(points[Location.ATTN_Q], q)
        session.process(points[Location.ATTN_K], k)
        expected = (q[:, 4, 2] * k[:, 1, 2]).sum() / math.sqrt(4)
        torch.testing.assert_close(session.traced_value(), expected)
    directions = ((1.0, 0.0, 2.0, -1.0), (0.5, 0.5, 0.5, 0.5))  # one per row
    trace = Trace(
        point=HookPoint(1, Location.ATTN_V),
        position=4,
        index=(2,),
        attention=AttentionTrace.V,
        key_position=1,
        value_directions=directions,
    )
    session = HookSession(ForwardRequest(tokens=((1,) * 5,) * 2, trace=trace))
    session.process(HookPoint(1, Location.ATTN_V), v)
    session.process(HookPoint(1, Location.ATTN_PROBS), probs)
    expected = sum(
        probs[row, 4, 2, 1] * (v[row, 1, 2] @ torch.tensor(directions[row])) for row in range(2)
    )
    torch.testing.assert_close(session.traced_value(), expected)
    session.traced_value().backward()
    assert v.grad is not None and probs.grad is None  # the probability is held fixed
