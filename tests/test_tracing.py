"""Tracing (loaders/tracing.py): where each kind reads and writes the residual stream, and V
traces over a batch whose rows differ, against autograd on the independent reference."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

from interpql.backends.base import HookPoint, Location
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.registry import ModelRegistry
from interpql.loaders.tracing import read_point, writes_reach
from interpql.specs import NodeRef
from tests.conftest import MODEL_NAME, SMALL, CountingBackend, graphql
from tests.reference import reference_forward

PROMPT = "import os\nimport sys"
TOKENS = gpt2_encoding().encode(PROMPT)


def test_each_kind_reads_where_its_side_reads(registry: ModelRegistry) -> None:
    entry = registry.get(MODEL_NAME)
    expected = {
        "attention_head": Location.RESID_PRE,
        "mlp_neuron": Location.RESID_MID,
        "residual_channel": Location.RESID_POST,
    }
    for kind, location in expected.items():
        assert read_point(entry, NodeRef(MODEL_NAME, kind, 1, 0)) == HookPoint(1, location)


@pytest.mark.parametrize(
    ("layer", "kind", "point", "reaches"),
    [
        # Attention writes before the MLP reads (resid_mid); the MLP writes after it.
        (1, "attention_head", HookPoint(1, Location.RESID_MID), True),
        (1, "mlp_neuron", HookPoint(1, Location.RESID_MID), False),
        (1, "mlp_neuron", HookPoint(1, Location.RESID_POST), True),
        (1, "attention_head", HookPoint(1, Location.RESID_PRE), False),
        (0, "mlp_neuron", HookPoint(1, Location.RESID_PRE), True),
        (2, "attention_head", HookPoint(1, Location.RESID_POST), False),
        (1, "residual_channel", HookPoint(1, Location.RESID_POST), True),
        (1, "residual_channel", HookPoint(1, Location.RESID_MID), False),
    ],
)
def test_writes_reach_the_stream_after_they_are_made(
    registry: ModelRegistry, layer: int, kind: str, point: HookPoint, reaches: bool
) -> None:
    assert writes_reach(registry.get(MODEL_NAME), layer, kind, point) is reaches


def v_trace_reference(
    state: dict[str, torch.Tensor], ablate: bool, layer: int = 2, head: int = 1
) -> dict[int, torch.Tensor]:
    """Act x grad (summed over positions) of every MLP neuron before `layer`, for the V trace of
    head `head` at query 3 from key 0: p(3, 0).detach() * (v_0 . W_O[h]^T g), g the gradient of
    the next-token loss at the head's layer's attention output at query 3, with neuron 0/5
    ablated everywhere when `ablate`."""

    def run(
        keep: dict[Any, torch.Tensor], frozen: frozenset[str]
    ) -> tuple[torch.Tensor, dict[Any, torch.Tensor]]:
        attention: dict[tuple[int, str], torch.Tensor] = {}

        def edit(at: int, name: str, act: torch.Tensor) -> torch.Tensor:
            if ablate and at == 0 and name == "mlp_post":
                act = act.clone()
                act[:, 5] = 0.0
            if name in ("mlp_post", "attn_out"):
                act.retain_grad()
                keep[(at, name)] = act
            return act

        leaf = dict(state)
        leaf["pos_embed.weight"] = state["pos_embed.weight"].clone().requires_grad_(True)
        logits, _ = reference_forward(
            SMALL, leaf, TOKENS, edit=edit, attention=attention, frozen_norms=frozen
        )
        return logits, attention

    first: dict[Any, torch.Tensor] = {}
    # FROZEN (the default): the loss's gradient with the final LayerNorm's scale held, and the
    # trace with that of the LayerNorm the head reads through.
    logits, _ = run(first, frozenset({"final_ln"}))
    log_probs = torch.log_softmax(logits, -1)
    loss = -log_probs[torch.arange(len(TOKENS) - 1), torch.tensor(TOKENS[1:])].mean()
    loss.backward()
    gradient = first[(layer, "attn_out")].grad[3]  # [d_model]
    second: dict[Any, torch.Tensor] = {}
    _, attention = run(second, frozenset({f"xf_layers.{layer}.ln_1"}))
    cols = slice(head * SMALL.d_head, (head + 1) * SMALL.d_head)
    w_o = state[f"xf_layers.{layer}.attn.out_proj.weight"][:, cols].double()  # [d_model, d_head]
    probability = attention[(layer, "probs")][3, head, 0].detach()
    traced = probability * (attention[(layer, "v")][0, head] @ (w_o.T @ gradient))
    traced.backward()
    return {
        at: (second[(at, "mlp_post")] * second[(at, "mlp_post")].grad).detach().sum(0)
        for at in range(layer)
    }


TRACE = (
    'trace: {upstreamNodeId: "small/attention_head/2/1", tokenIndex: 3, keyTokenIndex: 0, '
    "attentionTraceType: V}"
)


async def test_a_batch_of_v_traces_projects_each_row_on_its_own_gradient(
    client: httpx.AsyncClient, small_backend: CountingBackend
) -> None:
    """The same V trace on two inputs, the second with an ablation: one pass, and each row's
    values those of its own gradient (this failed with INTERNAL_SERVER_ERROR)."""
    inputs = (
        f"{{prompt: $p, {TRACE}}}, "
        f'{{prompt: $p, ablations: [{{nodeId: "small/mlp_neuron/0/5", value: 0}}], {TRACE}}}'
    )
    body = await graphql(
        client,
        f'query($p: String!) {{ model(name: "small") {{ inferBatch(inputs: [{inputs}]) {{ '
        "loss topNodes(group: ACT_TIMES_GRAD, k: 300) { top { node { id } value } } } } }",
        {"p": PROMPT},
    )
    assert "errors" not in body, body
    state = small_backend.state_dict()
    for row, ablate in enumerate((False, True)):
        expected = v_trace_reference(state, ablate)
        values = {
            item["node"]["id"]: item["value"]
            for item in body["data"]["model"]["inferBatch"][row]["topNodes"]["top"]
        }
        for layer, per_neuron in expected.items():
            for neuron in (0, 5, 17, 40, 79):
                node = f"small/mlp_neuron/{layer}/{neuron}"
                assert values[node] == pytest.approx(
                    float(per_neuron[neuron]), abs=1e-6, rel=1e-4
                ), (row, node)
