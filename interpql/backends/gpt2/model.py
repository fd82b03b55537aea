"""Our own pre-LN GPT-2, with a hook call at every location of `Location`.

Parameter names are Transformer Debugger's state-dict keys, so its `model_pieces/` load as they
are. LayerNorm and softmax run in float32 whatever the weights' dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from interpql.backends.base import Architecture, HookPoint, HookSessionLike, Location
from interpql.backends.runtime import at_positions


@dataclass(frozen=True)
class GPT2Config:
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    n_vocab: int = 50257
    ln_eps: float = 1e-5

    @property
    def architecture(self) -> Architecture:
        return Architecture(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            n_vocab=self.n_vocab,
            family="gpt2",
            norm_eps=self.ln_eps,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Shapes of common GPT-2 sizes, for random models of a realistic shape.
PRESETS: dict[str, GPT2Config] = {
    "gpt2-small": GPT2Config(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024
    ),
    "gpt2-medium": GPT2Config(
        n_layers=24, d_model=1024, n_heads=16, d_head=64, d_mlp=4096, n_ctx=1024
    ),
    "tiny": GPT2Config(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=128),
}


class _LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor, frozen_scale: bool = False) -> torch.Tensor:
        """`frozen_scale`: the backward pass sees the scale (1/sqrt(var + eps)) as a constant."""
        if not frozen_scale:
            normed = F.layer_norm(
                x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps
            )
            return normed.to(x.dtype)
        return self.affine(self.normalized(x, frozen_scale)).to(x.dtype)

    def normalized(self, x: torch.Tensor, frozen_scale: bool = False) -> torch.Tensor:
        """Centred and divided by the scale, before the gain and bias (float32)."""
        centred = x.float() - x.float().mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return centred / (scale.detach() if frozen_scale else scale)

    def affine(self, normalized: torch.Tensor) -> torch.Tensor:
        return normalized * self.weight.float() + self.bias.float()


class KeyValueCache:
    """Each layer's keys and values [row, position, head, d_head] of the positions run so far,
    as the hooks left them (an edited key stays edited), so that generation runs one new
    token a step rather than the whole sequence again."""

    def __init__(self, n_layers: int) -> None:
        self._keys: list[torch.Tensor | None] = [None] * n_layers
        self._values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Positions held."""
        first = self._keys[0]
        return 0 if first is None else first.shape[1]

    def extend(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values of every position so far, these new ones included."""
        past_k, past_v = self._keys[layer], self._values[layer]
        if past_k is not None and past_v is not None:
            keys, values = torch.cat([past_k, keys], dim=1), torch.cat([past_v, values], dim=1)
        self._keys[layer], self._values[layer] = keys, values
        return keys, values


class _Attention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        d_attn = cfg.n_heads * cfg.d_head
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, d_attn)
        self.k_proj = nn.Linear(cfg.d_model, d_attn)
        self.v_proj = nn.Linear(cfg.d_model, d_attn)
        self.out_proj = nn.Linear(d_attn, cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        hooks: HookSessionLike | None,
        cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        batch, n_tok, _ = x.shape
        split = (batch, n_tok, self.n_heads, self.d_head)
        q = _hook(hooks, layer, Location.ATTN_Q, self.q_proj(x).view(split))
        k = _hook(hooks, layer, Location.ATTN_K, self.k_proj(x).view(split))
        v = _hook(hooks, layer, Location.ATTN_V, self.v_proj(x).view(split))
        if cache is not None:
            k, v = cache.extend(layer, k, v)
        wants_pattern = hooks is not None and (
            hooks.wants(HookPoint(layer, Location.ATTN_SCORES))
            or hooks.wants(HookPoint(layer, Location.ATTN_PROBS))
        )
        if wants_pattern:
            z = self._explicit_attention(q, k, v, layer, hooks)
        else:
            # The fused kernel computes the same thing faster when nobody looks at the pattern.
            # New queries after cached keys see every earlier key: the causal mask is offset.
            n_keys = k.shape[1]
            mask = None
            if n_tok not in (1, n_keys):
                mask = torch.ones(n_tok, n_keys, dtype=torch.bool, device=q.device)
                mask = mask.tril(diagonal=n_keys - n_tok)
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=n_tok == n_keys and n_tok > 1,
            ).transpose(1, 2)
        z = _hook(hooks, layer, Location.ATTN_Z, z)
        out: torch.Tensor = self.out_proj(z.reshape(batch, n_tok, self.n_heads * self.d_head))
        return out

    def _explicit_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int,
        hooks: HookSessionLike | None,
    ) -> torch.Tensor:
        n_tok, n_keys = q.shape[1], k.shape[1]
        scores = torch.einsum("bqhd,bkhd->bqhk", q.float(), k.float()) / math.sqrt(self.d_head)
        scores = _hook(hooks, layer, Location.ATTN_SCORES, scores)
        causal = torch.ones(n_tok, n_keys, dtype=torch.bool, device=q.device)
        causal = causal.tril(diagonal=n_keys - n_tok)
        masked = scores.masked_fill(~causal[None, :, None, :], float("-inf"))
        probs = _hook(hooks, layer, Location.ATTN_PROBS, masked.softmax(dim=-1))
        return torch.einsum("bqhk,bkhd->bqhd", probs.to(v.dtype), v)


class _MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.in_layer = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.out_layer = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor, layer: int, hooks: HookSessionLike | None) -> torch.Tensor:
        pre = _hook(hooks, layer, Location.MLP_PRE, self.in_layer(x))
        post = _hook(hooks, layer, Location.MLP_POST, F.gelu(pre, approximate="tanh"))
        out: torch.Tensor = self.out_layer(post)
        return out


class _Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = _Attention(cfg)
        self.ln_2 = _LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = _MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        hooks: HookSessionLike | None,
        cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        x = _hook(hooks, layer, Location.RESID_PRE, x)
        h = self.ln_1(x, _frozen(hooks, layer, Location.RESID_PRE))
        attn_out = _hook(hooks, layer, Location.ATTN_OUT, self.attn(h, layer, hooks, cache))
        x = _hook(hooks, layer, Location.RESID_MID, x + attn_out)
        frozen = _frozen(hooks, layer, Location.RESID_MID)
        if hooks is not None and hooks.wants(HookPoint(layer, Location.MLP_NORMALIZED)):
            # The LayerNorm in its two steps, only when someone looks between them.
            normed = _hook(hooks, layer, Location.MLP_NORMALIZED, self.ln_2.normalized(x, frozen))
            h = self.ln_2.affine(normed).to(x.dtype)
        else:
            h = self.ln_2(x, frozen)
        h = _hook(hooks, layer, Location.MLP_IN, h)
        mlp_out = _hook(hooks, layer, Location.MLP_OUT, self.mlp(h, layer, hooks))
        return _hook(hooks, layer, Location.RESID_POST, x + mlp_out)


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.n_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.xf_layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.final_ln = _LayerNorm(cfg.d_model, cfg.ln_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.n_vocab, bias=False)

    def forward(
        self,
        tokens: torch.Tensor,
        hooks: HookSessionLike | None = None,
        track_grad: bool = False,
        positions: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        """[batch, token] ids -> [batch, token, vocab] logits ([batch, k, vocab] at `positions`
        [batch, k] when given: only those are unembedded). With `cache`, the tokens continue
        the positions it holds, and it grows by them.

        With `track_grad`, autograd follows the residual stream from the embeddings on, so that
        activations have gradients while the (frozen) weights get none.
        """
        start = 0 if cache is None else cache.length
        where = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.tok_embed(tokens) + self.pos_embed(where)[None]
        if track_grad:
            x = x.detach().requires_grad_(True)
        for layer, block in enumerate(self.xf_layers):
            x = block(x, layer, hooks, cache)
        last = self.cfg.n_layers - 1
        x = at_positions(x, positions)
        logits: torch.Tensor = self.unembed(
            self.final_ln(x, _frozen(hooks, last, Location.RESID_POST))
        )
        return logits

    def block(self, layer: int) -> _Block:
        return cast(_Block, self.xf_layers[layer])


def _hook(
    hooks: HookSessionLike | None, layer: int, location: Location, act: torch.Tensor
) -> torch.Tensor:
    if hooks is None:
        return act
    point = HookPoint(layer, location)
    return hooks.process(point, act) if hooks.wants(point) else act


def _frozen(hooks: HookSessionLike | None, layer: int, reads: Location) -> bool:
    return hooks is not None and hooks.freezes_norm(HookPoint(layer, reads))


def init_random(model: GPT2, seed: int) -> GPT2:
    """GPT-2's initialisation (normal 0.02), with LayerNorm gains and biases also perturbed so
    that tests comparing implementations exercise every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "final_ln.weight")):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model
