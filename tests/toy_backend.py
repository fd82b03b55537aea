"""A worked example of backends/base.py: a GPT-2 backend written from that page alone.

No nn.Module and no code of the native backend: the weights are a plain Transformer Debugger
state dict and the forward pass is a few lines of torch per layer. Everything a backend must
do, and nothing else, is here: describe the model, pass every activation through the hook
session in order (with the gradient leaf after the embeddings), hand the rest to
`runtime.execute`, and answer weights in TransformerLens's layout. tests/test_toy_backend.py
serves it and runs it through the GraphQL analyses the real backends pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from interpql.backends.base import (
    Architecture,
    Backend,
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Location,
)
from interpql.backends.hooks import HookSession
from interpql.backends.runtime import at_positions, execute
from interpql.backends.tokenizer import gpt2_encoding


class ToyBackend(Backend):
    name = "toy-gpt2"
    locations = frozenset(Location)

    def __init__(self, arch: Architecture, state: dict[str, torch.Tensor]) -> None:
        self.architecture = arch
        self.state = {key: value.detach().float().clone() for key, value in state.items()}
        self.tokenizer = gpt2_encoding()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.dictionaries = {}
        self.calls: list[ForwardRequest] = []  # counted, as the tests count the native's

    def forward(self, request: ForwardRequest) -> ForwardResult:
        self.calls.append(request)
        return execute(request, HookSession(request, self.dictionaries), self.device, self._run)

    def _run(
        self,
        tokens: torch.Tensor,
        session: HookSession,
        track_grad: bool,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        s, arch = self.state, self.architecture

        def hook(layer: int, location: Location, act: torch.Tensor) -> torch.Tensor:
            point = HookPoint(layer, location)
            return session.process(point, act) if session.wants(point) else act

        def norm(x: torch.Tensor, name: str, reads: HookPoint, mlp: bool = False) -> torch.Tensor:
            centred = x - x.mean(-1, keepdim=True)
            scale = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()  # GPT-2's epsilon
            if session.freezes_norm(reads):  # LayerNormScale.FROZEN: a constant to autograd
                scale = scale.detach()
            normalized = centred / scale
            if mlp:  # the MLP's LayerNorm: its normalized input and its output are locations
                normalized = hook(reads.layer, Location.MLP_NORMALIZED, normalized)
            out = normalized * s[name + ".weight"] + s[name + ".bias"]
            return hook(reads.layer, Location.MLP_IN, out) if mlp else out

        def linear(x: torch.Tensor, name: str) -> torch.Tensor:
            return x @ s[name + ".weight"].T + s[name + ".bias"]

        rows, n = tokens.shape
        x = s["tok_embed.weight"][tokens] + s["pos_embed.weight"][:n]
        if track_grad:
            x = x.detach().requires_grad_(True)  # the gradient leaf: weights stay frozen
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        heads = (rows, n, arch.n_heads, arch.d_head)
        for layer in range(arch.n_layers):
            p = f"xf_layers.{layer}."
            x = hook(layer, Location.RESID_PRE, x)
            h = norm(x, p + "ln_1", HookPoint(layer, Location.RESID_PRE))
            q = hook(layer, Location.ATTN_Q, linear(h, p + "attn.q_proj").view(heads))
            k = hook(layer, Location.ATTN_K, linear(h, p + "attn.k_proj").view(heads))
            v = hook(layer, Location.ATTN_V, linear(h, p + "attn.v_proj").view(heads))
            scores = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(arch.d_head)
            scores = hook(layer, Location.ATTN_SCORES, scores)
            masked = scores.masked_fill(~causal[None, :, None, :], float("-inf"))
            probs = hook(layer, Location.ATTN_PROBS, masked.softmax(dim=-1))
            z = hook(layer, Location.ATTN_Z, torch.einsum("bqhk,bkhd->bqhd", probs, v))
            attn_out = hook(
                layer, Location.ATTN_OUT, linear(z.reshape(rows, n, -1), p + "attn.out_proj")
            )
            x = hook(layer, Location.RESID_MID, x + attn_out)
            pre = hook(
                layer,
                Location.MLP_PRE,
                linear(
                    norm(x, p + "ln_2", HookPoint(layer, Location.RESID_MID), mlp=True),
                    p + "mlp.in_layer",
                ),
            )
            post = hook(layer, Location.MLP_POST, F.gelu(pre, approximate="tanh"))
            mlp_out = hook(layer, Location.MLP_OUT, linear(post, p + "mlp.out_layer"))
            x = hook(layer, Location.RESID_POST, x + mlp_out)
        last = HookPoint(arch.n_layers - 1, Location.RESID_POST)
        x = at_positions(x, positions)  # only the positions asked for are unembedded
        logits: torch.Tensor = norm(x, "final_ln", last) @ s["unembed.weight"].T
        return logits

    def weight(self, name: str) -> torch.Tensor:
        s, arch = self.state, self.architecture
        fixed = {
            "W_E": lambda: s["tok_embed.weight"],
            "W_pos": lambda: s["pos_embed.weight"],
            "W_U": lambda: s["unembed.weight"].T,
            "ln_final.w": lambda: s["final_ln.weight"],
            "ln_final.b": lambda: s["final_ln.bias"],
        }
        if name in fixed:
            return fixed[name]().contiguous()
        block, layer, part, what = name.split(".") if name.count(".") == 3 else ("", "", "", "")
        if block != "blocks" or not layer.isdigit() or int(layer) >= arch.n_layers:
            raise KeyError(name)
        p = f"xf_layers.{layer}."
        attention: dict[str, Any] = {
            "W_Q": "attn.q_proj",
            "W_K": "attn.k_proj",
            "W_V": "attn.v_proj",
        }
        if part == "attn" and what in attention:  # [head, d_model, d_head]
            w = s[p + attention[what] + ".weight"].T
            return w.reshape(arch.d_model, arch.n_heads, arch.d_head).transpose(0, 1).contiguous()
        if part == "attn" and what == "W_O":  # [head, d_head, d_model]
            return s[p + "attn.out_proj.weight"].T.reshape(arch.n_heads, arch.d_head, -1).clone()
        if part == "mlp" and what == "W_in":
            return s[p + "mlp.in_layer.weight"].T.contiguous()
        if part == "mlp" and what == "W_out":
            return s[p + "mlp.out_layer.weight"].T.contiguous()
        vectors = {
            ("attn", "b_O"): "attn.out_proj.bias",
            ("mlp", "b_out"): "mlp.out_layer.bias",
            ("ln1", "w"): "ln_1.weight",
            ("ln2", "w"): "ln_2.weight",
        }
        if (part, what) in vectors:
            return s[p + vectors[part, what]]
        raise KeyError(name)
