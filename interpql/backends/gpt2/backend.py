"""The native backend: our own GPT-2 (`model.py`) behind the Backend protocol."""

from __future__ import annotations

import re

import torch

from interpql.backends.base import (
    Backend,
    ForwardRequest,
    ForwardResult,
    HookSessionLike,
    Location,
)
from interpql.backends.gpt2.loading import WeightsFormatError, build_model, load_weights
from interpql.backends.gpt2.model import GPT2, GPT2Config, KeyValueCache
from interpql.backends.hooks import HookSession
from interpql.backends.runtime import check_cacheable, execute
from interpql.backends.tokenizer import gpt2_encoding
from interpql.file_errors import FileProblem


class NativeGPT2Backend(Backend):
    name = "native-gpt2"
    locations = frozenset(Location)

    def __init__(
        self,
        model: GPT2,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.cfg: GPT2Config = model.cfg
        self.architecture = self.cfg.architecture
        self.tokenizer = gpt2_encoding()
        self.dictionaries = {}

    @classmethod
    def load(
        cls, spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> NativeGPT2Backend:
        try:
            cfg, state = load_weights(spec)
            model = build_model(cfg, state)
        except RuntimeError as exc:
            # torch's words for weights that do not fit their config (a shape mismatch, a
            # negative size), on one line and naming what was loaded.
            detail = " ".join(str(exc).split())[:300]
            raise FileProblem(spec, f"the weights do not fit the config ({detail})") from exc
        except WeightsFormatError as exc:
            raise FileProblem(spec, str(exc)) from exc
        return cls(model, device=device, dtype=dtype)

    def forward(self, request: ForwardRequest) -> ForwardResult:
        return execute(
            request,
            HookSession(request, self.dictionaries),
            self.device,
            self.session_forward,
        )

    def session_forward(
        self,
        tokens: torch.Tensor,
        session: HookSessionLike,
        track_grad: bool,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits: torch.Tensor = self.model(tokens, session, track_grad, positions)
        return logits

    caches_keys_and_values = True

    def forward_cached(
        self, request: ForwardRequest, cache: object | None
    ) -> tuple[ForwardResult, object]:
        check_cacheable(request)
        kv = cache if isinstance(cache, KeyValueCache) else KeyValueCache(self.model.cfg.n_layers)
        session = HookSession(request, self.dictionaries, position_offset=kv.length)

        def run(
            tokens: torch.Tensor,
            session: HookSessionLike,
            track_grad: bool,
            positions: torch.Tensor | None,
        ) -> torch.Tensor:
            logits: torch.Tensor = self.model(tokens, session, track_grad, positions, kv)
            return logits

        return execute(request, session, self.device, run), kv

    def weight(self, name: str) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        if name == "W_E":
            return model.tok_embed.weight.float()
        if name == "W_pos":
            return model.pos_embed.weight.float()
        if name == "W_U":
            return model.unembed.weight.float().t()
        if name in ("ln_final.w", "ln_final.b"):
            norm = model.final_ln
            return (norm.weight if name.endswith(".w") else norm.bias).float()
        vector = _BLOCK_VECTOR.fullmatch(name)
        if vector is not None and int(vector["layer"]) < cfg.n_layers:
            block = model.block(int(vector["layer"]))
            return {
                "attn.b_O": block.attn.out_proj.bias,
                "mlp.b_out": block.mlp.out_layer.bias,
                "ln1.w": block.ln_1.weight,
                "ln2.w": block.ln_2.weight,
            }[vector["name"]].float()
        match = _BLOCK_WEIGHT.fullmatch(name)
        if match is None or int(match["layer"]) >= cfg.n_layers:
            raise KeyError(name)
        block = model.block(int(match["layer"]))
        # nn.Linear stores [out, in]; TransformerLens's layout is [head, in, d_head] and so on.
        linear = {
            "attn.W_Q": block.attn.q_proj,
            "attn.W_K": block.attn.k_proj,
            "attn.W_V": block.attn.v_proj,
            "attn.W_O": block.attn.out_proj,
            "mlp.W_in": block.mlp.in_layer,
            "mlp.W_out": block.mlp.out_layer,
        }[match["name"]]
        weight = linear.weight.float().t()  # [in, out]
        if match["name"] in ("attn.W_Q", "attn.W_K", "attn.W_V"):
            weight = weight.reshape(cfg.d_model, cfg.n_heads, cfg.d_head).transpose(0, 1)
        elif match["name"] == "attn.W_O":
            weight = weight.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)
        return weight.contiguous()


_BLOCK_WEIGHT = re.compile(r"blocks\.(?P<layer>\d+)\.(?P<name>attn\.W_[QKVO]|mlp\.W_(in|out))")
_BLOCK_VECTOR = re.compile(r"blocks\.(?P<layer>\d+)\.(?P<name>attn\.b_O|mlp\.b_out|ln[12]\.w)")
