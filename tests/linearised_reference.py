"""An independent linearised replacement model of a GPT-2 with per-layer transcoders, in
float64, written from circuit tracing's definitions and not from interpql's code.

A clean run of the real model on the prompt fixes each LayerNorm's scale and each attention
pattern, and gives every layer's transcoder latents and its error (the real MLP output minus
the transcoder's). `run` then computes, from any given sources (embeddings, latents, errors),
every latent's pre-activation and the last position's logits in the linearised model: affine
in the sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from interpql.backends.gpt2 import GPT2Config


@dataclass
class Sources:
    embedding: torch.Tensor  # [position, d_model]
    latents: list[torch.Tensor]  # per layer [position, d_sae]
    errors: list[torch.Tensor]  # per layer [position, d_model]

    def scaled(self, kind: str, layer: int, position: int, index: int, by: float) -> Sources:
        """A copy with one source's vector (an embedding, an error) or value (a latent) times
        `by`."""
        embedding = self.embedding.clone()
        latents = [t.clone() for t in self.latents]
        errors = [t.clone() for t in self.errors]
        if kind == "embedding":
            embedding[position] *= by
        elif kind == "error":
            errors[layer][position] *= by
        else:
            latents[layer][position, index] *= by
        return Sources(embedding, latents, errors)

    def zeros(self) -> Sources:
        return Sources(
            torch.zeros_like(self.embedding),
            [torch.zeros_like(t) for t in self.latents],
            [torch.zeros_like(t) for t in self.errors],
        )


class LinearisedReference:
    """`transcoders[layer]`: SAELens tensors (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out],
    b_dec, optional W_skip [d_out, d_in] and threshold) of a ReLU or JumpReLU transcoder reading
    the MLP's input (ln_2's output) and writing its output."""

    def __init__(
        self,
        cfg: GPT2Config,
        state: dict[str, torch.Tensor],
        transcoders: dict[int, dict[str, torch.Tensor]],
        tokens: list[int],
    ) -> None:
        self.cfg = cfg
        self.s = {k: v.double() for k, v in state.items()}
        self.t = {
            layer: {k: v.double() for k, v in ts.items()} for layer, ts in transcoders.items()
        }
        self.tokens = tokens
        self.scales: dict[str, torch.Tensor] = {}
        self.patterns: dict[int, torch.Tensor] = {}
        self.clean_logits, self.clean = self._clean_run()

    def _norm(self, h: torch.Tensor, prefix: str, record: bool) -> torch.Tensor:
        centred = h - h.mean(-1, keepdim=True)
        if record:
            self.scales[prefix] = torch.sqrt((centred**2).mean(-1, keepdim=True) + self.cfg.ln_eps)
        return centred / self.scales[prefix] * self.s[prefix + ".weight"] + self.s[prefix + ".bias"]

    def _linear(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        return h @ self.s[prefix + ".weight"].T + self.s[prefix + ".bias"]

    def _attention(self, x: torch.Tensor, layer: int, record: bool) -> torch.Tensor:
        cfg, p = self.cfg, f"xf_layers.{layer}."
        h = self._norm(x, p + "ln_1", record)
        q, k, v = (self._linear(h, p + f"attn.{n}_proj") for n in "qkv")
        n = len(x)
        heads = []
        if record:
            patterns = []
            for head in range(cfg.n_heads):
                cols = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
                scores = q[:, cols] @ k[:, cols].T / math.sqrt(cfg.d_head)
                scores = scores.masked_fill(torch.triu(torch.ones(n, n), 1).bool(), -math.inf)
                patterns.append(scores.softmax(-1))
            self.patterns[layer] = torch.stack(patterns)
        for head in range(cfg.n_heads):
            cols = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
            heads.append(self.patterns[layer][head] @ v[:, cols])
        return self._linear(torch.cat(heads, -1), p + "attn.out_proj")

    def pre_activations(self, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
        t = self.t[layer]
        return mlp_in @ t["W_enc"] + t["b_enc"]

    def _activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        threshold = self.t[layer].get("threshold")
        if threshold is None:
            return pre.clamp(min=0)
        return torch.where(pre > threshold, pre, torch.zeros_like(pre))

    def _decoded(self, layer: int, latents: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        t = self.t[layer]
        out = latents @ t["W_dec"] + t["b_dec"]
        if "W_skip" in t:
            out = out + mlp_in @ t["W_skip"].T
        return out

    def _clean_run(self) -> tuple[torch.Tensor, Sources]:
        cfg, s, n = self.cfg, self.s, len(self.tokens)
        embedding = s["tok_embed.weight"][self.tokens] + s["pos_embed.weight"][:n]
        x = embedding
        latents, errors = [], []
        for layer in range(cfg.n_layers):
            p = f"xf_layers.{layer}."
            x = x + self._attention(x, layer, record=True)
            mlp_in = self._norm(x, p + "ln_2", record=True)
            pre = self._linear(mlp_in, p + "mlp.in_layer")
            post = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
            mlp_out = self._linear(post, p + "mlp.out_layer")
            found = self._activate(layer, self.pre_activations(layer, mlp_in))
            latents.append(found)
            errors.append(mlp_out - self._decoded(layer, found, mlp_in))
            x = x + mlp_out
        logits = self._norm(x, "final_ln", record=True) @ s["unembed.weight"].T
        return logits, Sources(embedding, latents, errors)

    def run(self, sources: Sources) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(each layer's latent pre-activations [position, d_sae], the last position's logits
        minus their mean [vocab]) of the linearised model on `sources`."""
        x = sources.embedding
        pres = []
        for layer in range(self.cfg.n_layers):
            p = f"xf_layers.{layer}."
            x = x + self._attention(x, layer, record=False)
            mlp_in = self._norm(x, p + "ln_2", record=False)
            pres.append(self.pre_activations(layer, mlp_in))
            x = x + self._decoded(layer, sources.latents[layer], mlp_in) + sources.errors[layer]
        final = self._norm(x, "final_ln", record=False)[-1] @ self.s["unembed.weight"].T
        return pres, final - final.mean()
