"""An independent, plain-torch GPT-2 forward pass over a Transformer Debugger state dict.

Written from the equations, not from interpql's model code, so the tests compare two separate
implementations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from interpql.backends.gpt2 import GPT2Config


def reference_forward(
    cfg: GPT2Config,
    state: dict[str, torch.Tensor],
    tokens: list[int],
    overwrite_mlp_post: tuple[int, int, int, float] | None = None,
    edit: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
    attention: dict[tuple[int, str], torch.Tensor] | None = None,
    frozen_norms: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One prompt -> (logits [T, V], mlp post-activations per layer [T, F]).

    `overwrite_mlp_post` = (layer, token, neuron, value) sets one post-activation; `edit`, if
    given, maps (layer, "embedding" | "attn_out" | "mlp_in" | "mlp_post" | "mlp_out" |
    "resid_post" | "resid_final", activation) to the activation to use instead ("embedding":
    token plus position embeddings, layer 0; "mlp_in": the MLP's LayerNorm's output;
    "resid_final": the last residual stream, before the final LayerNorm).
    `frozen_norms` names the LayerNorms ("final_ln", "xf_layers.2.ln_2") whose scale the backward
    pass holds constant (interpql's default LayerNormScale, FROZEN, holds "final_ln"'s, and a
    trace's also that of the norm its node reads through). `attention`, if given, receives each layer's (layer, "probs") [query, head, key] and
    (layer, "z") and (layer, "v") [position, head, d_head] (v still attached to the graph).
    """
    edit = edit or (lambda layer, name, act: act)
    s = {k: v.double() for k, v in state.items()}
    n = len(tokens)
    x = edit(0, "embedding", s["tok_embed.weight"][tokens] + s["pos_embed.weight"][:n])
    mlp_posts = []

    def layer_norm(h: torch.Tensor, prefix: str) -> torch.Tensor:
        mu = h.mean(-1, keepdim=True)
        scale = torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + cfg.ln_eps)
        if prefix in frozen_norms:  # the backward pass sees the scale as a constant
            scale = scale.detach()
        return (h - mu) / scale * s[prefix + ".weight"] + s[prefix + ".bias"]

    def linear(h: torch.Tensor, prefix: str) -> torch.Tensor:
        return h @ s[prefix + ".weight"].T + s[prefix + ".bias"]

    for i in range(cfg.n_layers):
        p = f"xf_layers.{i}."
        h = layer_norm(x, p + "ln_1")
        heads, patterns, values = [], [], []
        for head in range(cfg.n_heads):
            cols = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
            q = linear(h, p + "attn.q_proj")[:, cols]
            k = linear(h, p + "attn.k_proj")[:, cols]
            v = linear(h, p + "attn.v_proj")[:, cols]
            scores = q @ k.T / math.sqrt(cfg.d_head)
            scores = scores.masked_fill(torch.triu(torch.ones(n, n), 1).bool(), -math.inf)
            patterns.append(torch.softmax(scores, -1))
            values.append(v)
            heads.append(patterns[-1] @ v)
        if attention is not None:
            attention[(i, "probs")] = torch.stack(patterns, dim=1).detach()
            attention[(i, "z")] = torch.stack(heads, dim=1).detach()
            # Values keep their graph: a V trace differentiates through them.
            attention[(i, "v")] = torch.stack(values, dim=1)
        x = x + edit(i, "attn_out", linear(torch.cat(heads, -1), p + "attn.out_proj"))
        pre = linear(edit(i, "mlp_in", layer_norm(x, p + "ln_2")), p + "mlp.in_layer")
        post = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
        if overwrite_mlp_post is not None and overwrite_mlp_post[0] == i:
            _, token, neuron, value = overwrite_mlp_post
            post = post.clone()
            post[token, neuron] = value
        post = edit(i, "mlp_post", post)
        mlp_posts.append(post)
        x = edit(i, "resid_post", x + edit(i, "mlp_out", linear(post, p + "mlp.out_layer")))
    x = edit(cfg.n_layers - 1, "resid_final", x)
    logits = layer_norm(x, "final_ln") @ s["unembed.weight"].T
    return logits, mlp_posts
