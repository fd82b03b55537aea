"""Transformer Debugger's node-table values, written from its definitions in plain float64 torch
over a Transformer Debugger state dict (independent of interpql's model and analysis code).

Elements: one token-embedding element per position, (position, neuron) for MLP neurons, and
(query, key, head) for attention heads. Groups:

    ACTIVATION      1; the post-activation; the attention probability p(q, k)
    WRITE_NORM      |tok + pos embedding|; post x |W_out[n]| (signed); p x |v_k W_O[h]|
    DIRECT_EFFECT   the write . g, g the loss's gradient at the final residual stream
    ACT_TIMES_GRAD  e . dL/de; post x dL/dpost; p x (v_k . dL/dz_q[h])

The loss is the logit difference at the last position (mean target logits - mean distractor
logits). `frozen`: the final LayerNorm's scale is held at its forward value in the backward
pass (Transformer Debugger's convention), else differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from interpql.backends.gpt2 import GPT2Config


@dataclass(frozen=True)
class Reference:
    loss: float
    embedding: dict[str, torch.Tensor]  # group -> [position]
    neurons: dict[str, torch.Tensor]  # group -> [layer, position, neuron]
    heads: dict[str, torch.Tensor]  # group -> [layer, query, key, head]
    stream_gradient: torch.Tensor  # [position, d_model] at the final residual stream
    bias_terms: dict[str, float]  # direct effects of the biases at the last position
    final_scale: torch.Tensor  # [position]: the final LayerNorm's scale
    mid_scales: torch.Tensor  # [layer, position]: each MLP LayerNorm's scale


def attention(
    cfg: GPT2Config, h: torch.Tensor, linear: Any, prefix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's causal attention pattern [query, head, key] and values [key, head, d_head]
    from its LayerNorm's output `h` [position, d_model]."""
    n = h.shape[0]
    shape = (n, cfg.n_heads, cfg.d_head)
    q = linear(h, prefix + "attn.q_proj").view(shape)
    k = linear(h, prefix + "attn.k_proj").view(shape)
    v = linear(h, prefix + "attn.v_proj").view(shape)
    scores = torch.einsum("qhd,khd->qhk", q, k) / math.sqrt(cfg.d_head)
    causal = torch.triu(torch.ones(n, n), 1).bool()
    return torch.softmax(scores.masked_fill(causal[:, None, :], -math.inf), dim=-1), v


# An element to move by a small amount in `logit_difference`: ("embedding", position),
# ("post", layer, position, neuron) or ("probs", layer, query, key, head).
Nudge = tuple[Any, ...]


def logit_difference(
    cfg: GPT2Config,
    state: dict[str, torch.Tensor],
    tokens: list[int],
    targets: list[int],
    distractors: list[int],
    final_scale: torch.Tensor,
    nudge: Nudge,
    delta: float,
) -> float:
    """The loss with one element moved by `delta` (an embedding row scaled by 1 + delta; a
    probability without renormalising the others) and the final LayerNorm's scale
    fixed at `final_scale` [position]: for finite differences of the FROZEN convention."""
    s = {k: v.double() for k, v in state.items()}
    n, heads, d_head = len(tokens), cfg.n_heads, cfg.d_head
    where, *at = nudge
    x = s["tok_embed.weight"][tokens] + s["pos_embed.weight"][:n]
    if where == "embedding":  # the row scaled by 1 + delta: d/d(delta) is e . dL/de
        x = x.clone()
        x[at[0]] *= 1 + delta

    def norm(h: torch.Tensor, prefix: str, scale: torch.Tensor | None = None) -> torch.Tensor:
        centred = h - h.mean(-1, keepdim=True)
        if scale is None:
            scale = torch.sqrt((centred**2).mean(-1, keepdim=True) + cfg.ln_eps)
        return centred / scale * s[prefix + ".weight"] + s[prefix + ".bias"]

    def linear(h: torch.Tensor, prefix: str) -> torch.Tensor:
        return h @ s[prefix + ".weight"].T + s[prefix + ".bias"]

    for layer in range(cfg.n_layers):
        p = f"xf_layers.{layer}."
        pattern, v = attention(cfg, norm(x, p + "ln_1"), linear, p)
        if where == "probs" and at[0] == layer:
            pattern = pattern.clone()
            pattern[at[1], at[3], at[2]] += delta  # [query, head, key]
        z = torch.einsum("qhk,khd->qhd", pattern, v)
        x = x + linear(z.reshape(n, heads * d_head), p + "attn.out_proj")
        post = torch.nn.functional.gelu(
            linear(norm(x, p + "ln_2"), p + "mlp.in_layer"), approximate="tanh"
        )
        if where == "post" and at[0] == layer:
            post = post.clone()
            post[at[1], at[2]] += delta
        x = x + linear(post, p + "mlp.out_layer")
    logits = norm(x, "final_ln", final_scale[:, None]) @ s["unembed.weight"].T
    return float(logits[-1, targets].mean() - logits[-1, distractors].mean())


def tdb_reference(
    cfg: GPT2Config,
    state: dict[str, torch.Tensor],
    tokens: list[int],
    targets: list[int],
    distractors: list[int],
    frozen: bool = True,
) -> Reference:
    s = {k: v.double() for k, v in state.items()}
    n, heads, d_head = len(tokens), cfg.n_heads, cfg.d_head

    def norm(h: torch.Tensor, prefix: str, freeze: bool = False) -> torch.Tensor:
        centred = h - h.mean(-1, keepdim=True)
        scale = torch.sqrt((centred**2).mean(-1, keepdim=True) + cfg.ln_eps)
        if freeze:
            scale = scale.detach()
        return centred / scale * s[prefix + ".weight"] + s[prefix + ".bias"]

    def linear(h: torch.Tensor, prefix: str) -> torch.Tensor:
        return h @ s[prefix + ".weight"].T + s[prefix + ".bias"]

    embedding = (s["tok_embed.weight"][tokens] + s["pos_embed.weight"][:n]).requires_grad_(True)
    x = embedding
    posts, probs, values, zs, mids = [], [], [], [], []
    for layer in range(cfg.n_layers):
        p = f"xf_layers.{layer}."
        pattern, v = attention(cfg, norm(x, p + "ln_1"), linear, p)
        z = torch.einsum("qhk,khd->qhd", pattern, v)
        z.retain_grad()
        x = x + linear(z.reshape(n, heads * d_head), p + "attn.out_proj")
        mids.append(torch.sqrt(x.detach().var(-1, unbiased=False) + cfg.ln_eps))
        post = torch.nn.functional.gelu(
            linear(norm(x, p + "ln_2"), p + "mlp.in_layer"), approximate="tanh"
        )
        post.retain_grad()
        x = x + linear(post, p + "mlp.out_layer")
        posts.append(post)
        probs.append(pattern)
        values.append(v)
        zs.append(z)
    x.retain_grad()
    final = x
    centred = final - final.mean(-1, keepdim=True)
    final_scale = torch.sqrt((centred**2).mean(-1) + cfg.ln_eps)
    logits = norm(final, "final_ln", freeze=frozen) @ s["unembed.weight"].T
    loss = logits[-1, targets].mean() - logits[-1, distractors].mean()
    loss.backward()
    g = final.grad  # [position, d_model]
    assert g is not None and embedding.grad is not None

    e = embedding.detach()
    emb = {
        "activation": torch.ones(n, dtype=torch.float64),
        "write_norm": e.norm(dim=-1),
        "direct_effect": (e * g).sum(-1),
        "act_times_grad": (e * embedding.grad).sum(-1),
    }
    neurons: dict[str, list[torch.Tensor]] = {name: [] for name in emb}
    pairs: dict[str, list[torch.Tensor]] = {name: [] for name in emb}
    for layer in range(cfg.n_layers):
        p = f"xf_layers.{layer}."
        w_out = s[p + "mlp.out_layer.weight"].T  # [neuron, d_model]
        post, post_grad = posts[layer].detach(), posts[layer].grad
        assert post_grad is not None
        neurons["activation"].append(post)
        neurons["write_norm"].append(post * w_out.norm(dim=-1))
        neurons["direct_effect"].append(post * (g @ w_out.T))
        neurons["act_times_grad"].append(post * post_grad)
        w_o = s[p + "attn.out_proj.weight"].T.reshape(heads, d_head, -1)  # [head, d_head, d_model]
        pattern = probs[layer].detach().permute(0, 2, 1)  # [query, key, head]
        v = values[layer].detach()  # [key, head, d_head]
        value_writes = torch.einsum("khd,hdm->khm", v, w_o)  # [key, head, d_model]
        z_grad = zs[layer].grad  # [query, head, d_head]
        assert z_grad is not None
        pairs["activation"].append(pattern)
        pairs["write_norm"].append(pattern * value_writes.norm(dim=-1)[None])
        pairs["direct_effect"].append(pattern * torch.einsum("khm,qm->qkh", value_writes, g))
        pairs["act_times_grad"].append(pattern * torch.einsum("khd,qhd->qkh", v, z_grad))
    last = g[-1]
    unembed_direction = s["unembed.weight"][targets].mean(0) - s["unembed.weight"][
        distractors
    ].mean(0)
    bias_terms = {
        **{
            f"attention output bias {layer}": float(
                s[f"xf_layers.{layer}.attn.out_proj.bias"] @ last
            )
            for layer in range(cfg.n_layers)
        },
        **{
            f"MLP output bias {layer}": float(s[f"xf_layers.{layer}.mlp.out_layer.bias"] @ last)
            for layer in range(cfg.n_layers)
        },
        "final LayerNorm bias": float(s["final_ln.bias"] @ unembed_direction),
    }
    return Reference(
        loss=float(loss.detach()),
        embedding=emb,
        neurons={name: torch.stack(parts) for name, parts in neurons.items()},
        heads={name: torch.stack(parts) for name, parts in pairs.items()},
        stream_gradient=g.detach(),
        bias_terms=bias_terms,
        final_scale=final_scale.detach(),
        mid_scales=torch.stack(mids),
    )
