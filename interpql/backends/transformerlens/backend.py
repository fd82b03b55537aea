"""The TransformerLens backend: any decoder-only model TransformerLens 4.x bridges.

`TransformerBridge` wraps a Hugging Face model and fires TransformerLens's hook points inside it.
Its weights stay raw (no LayerNorm folding: compatibility mode is never enabled), so on the same
GPT-2 weights every activation equals the native backend's.

Which locations a model offers is found at load (`locations.py`); requests for any other answer
UNSUPPORTED with the reason. Beyond renaming hooks:

* attn_scores / attn_probs: TransformerLens holds them head-major, [batch, head, query, key].
* attn_scores: its hook sees the scores after the causal mask, so future keys hold the mask
  value (the dtype's minimum) where the native backend shows q·k; writes there are undone,
  keeping the mask as the native backend does.
* resid_mid: TransformerLens's `hook_resid_mid` is the input of the second LayerNorm, read by the
  MLP alone; the skip connection keeps its own copy, so a write there would not reach the
  residual stream, nor would a gradient there count the skip path. We compute resid_mid at
  `hook_attn_out` as resid_pre + attn_out and hand the block back resid_mid' - resid_pre.
* attn_q / attn_k of rotary models are TransformerLens's hook_q / hook_k: before the rotation.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch

from interpql.backends.base import (
    Architecture,
    Backend,
    ForwardRequest,
    ForwardResult,
    HookPoint,
    HookSessionLike,
    Location,
    Tokenizer,
)
from interpql.backends.hooks import HookSession
from interpql.backends.runtime import at_positions, check_cacheable, execute
from interpql.backends.transformerlens.loading import boot, boot_hf_model
from interpql.backends.transformerlens.locations import (
    HEAD_MAJOR,
    HOOK_NAMES,
    Hook,
    find_unsupported,
)
from interpql.errors import UnavailableError, invalid_argument
from interpql.specs import AttentionTrace

_BLOCK_WEIGHT = re.compile(
    r"blocks\.(?P<layer>\d+)\.(?P<part>attn|mlp|ln1|ln2)\.(?P<name>W_([QKVO]|in|out)|b_O|b_out|w)"
)


class TransformerLensBackend(Backend):
    name = "transformerlens"

    def __init__(self, bridge: Any, tokenizer: Tokenizer, family: str) -> None:
        """`bridge`: a booted `TransformerBridge` (raw weights); `tokenizer`: its vocabulary's."""
        if not hasattr(bridge, "blocks"):
            raise ValueError("TransformerLens exposes no transformer blocks for this model")
        self.bridge = bridge.eval().requires_grad_(False)
        first = next(bridge.parameters())
        self.device, self.dtype = first.device, first.dtype
        cfg = bridge.cfg
        self.architecture = Architecture(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            d_head=cfg.d_head,
            d_mlp=cfg.d_mlp,
            n_ctx=cfg.n_ctx,
            n_vocab=cfg.d_vocab,
            family=family,
            norm_eps=float(getattr(cfg, "eps", 1e-5)),
            n_kv_heads=_kv_heads(getattr(cfg, "n_key_value_heads", None), cfg.n_heads),
            gated_mlp="blocks.0.mlp.gate.hook_out" in bridge.hook_dict,
            post_sublayer_norms=any(
                f"blocks.0.{norm}.hook_in" in bridge.hook_dict for norm in ("ln1_post", "ln2_post")
            ),
        )
        self.tokenizer = tokenizer
        self.dictionaries = {}
        # Why each missing location is missing; the backend offers every other one.
        self.unsupported = find_unsupported(bridge, self.architecture)
        self._rotary = getattr(cfg, "positional_embedding_type", None) == "rotary"
        self.locations = frozenset(Location) - frozenset(self.unsupported)

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls, spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> TransformerLensBackend:
        """`spec`: a local Hugging Face folder, a hub name, or anything the native GPT-2 loader
        reads (random:<preset>, a Transformer Debugger folder or URL, a registered name)."""
        return cls(*boot(spec, device, dtype))

    @classmethod
    def from_hf_model(cls, hf_model: Any, hf_tokenizer: Any = None) -> TransformerLensBackend:
        """An already-loaded Hugging Face causal LM, on its device and in its dtype (without
        `hf_tokenizer`, its vocabulary must hold GPT-2's)."""
        return cls(*boot_hf_model(hf_model, hf_tokenizer))

    # --- running ---------------------------------------------------------------------------

    def forward(self, request: ForwardRequest) -> ForwardResult:
        session = HookSession(request, self.dictionaries)
        self._check(request, session)
        return execute(request, session, self.device, self.session_forward)

    def session_forward(
        self,
        tokens: torch.Tensor,
        session: HookSessionLike,
        track_grad: bool,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        fwd_hooks = self._hooks(session, track_grad) + self._frozen_scales(session.frozen_norms)
        with self.bridge.hooks(fwd_hooks=fwd_hooks), warnings.catch_warnings():
            # A held scale is an edited hook_scale, which TransformerLens reports each time: we
            # ask for it.
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
            logits: torch.Tensor = self.bridge(tokens, return_type="logits")
        # The bridge unembeds every position (Hugging Face's forward does); only the choice of
        # positions is ours.
        return at_positions(logits, positions)

    caches_keys_and_values = True

    def forward_cached(
        self, request: ForwardRequest, cache: object | None
    ) -> tuple[ForwardResult, object]:
        """Hugging Face's own cache, handed back to the bridge each step (its manual
        key-value entry point); the hooks see the new positions alone."""
        check_cacheable(request)
        start = 0 if cache is None else int(cast(Any, cache).get_seq_length())
        session = HookSession(request, self.dictionaries, position_offset=start)
        self._check(request, session)
        grown: list[object] = []

        def run(
            tokens: torch.Tensor,
            session: HookSessionLike,
            track_grad: bool,
            positions: torch.Tensor | None,
        ) -> torch.Tensor:
            # `cache`: Hugging Face 5's name for what it called past_key_values (the bridge
            # passes it through as it is).
            extra = {} if cache is None else {"cache": cache}
            with (
                self.bridge.hooks(fwd_hooks=self._hooks(session, track_grad)),
                _attention_reads_the_cache(self.bridge),
            ):
                logits, after = self.bridge(
                    tokens, return_type="logits_and_cache", use_cache=True, **extra
                )
            grown.append(after)
            return at_positions(logits, positions)

        result = execute(request, session, self.device, run)
        return result, grown[0]

    def _check(self, request: ForwardRequest, session: HookSession) -> None:
        # Asking the session covers every way a request reaches a point: saves, writes,
        # additions, traces and dictionaries' inputs and outputs.
        for location, why in self.unsupported.items():
            for layer in range(self.architecture.n_layers):
                if session.wants(HookPoint(layer, location)):
                    raise self._unsupported(location.value, why)
        trace = request.trace
        if trace is not None and trace.attention not in (None, AttentionTrace.V) and self._rotary:
            raise self._unsupported(
                "an attention score's trace",
                "rotary positions rotate queries and keys after attn_q and attn_k, so their "
                "product is not the score",
            )
        largest = max((max(prompt) for prompt in request.tokens if prompt), default=0)
        if largest >= self.architecture.n_vocab:
            raise invalid_argument(
                f"token id {largest} is outside the vocabulary of {self.architecture.n_vocab}"
            )

    def _unsupported(self, what: str, why: str) -> UnavailableError:
        return UnavailableError(
            f"{what} is not available on this {self.architecture.family} model "
            f"(transformerlens backend): {why}",
            code="UNSUPPORTED",
            location=what,
        )

    def _frozen_scales(self, frozen: frozenset[HookPoint]) -> list[tuple[str, Hook]]:
        """LayerNorm scales the backward pass holds fixed: their hook_scale returns the scale
        detached (TransformerLens divides by what the hook returns)."""
        hooks = []
        for reads in sorted(frozen):
            name = norm_scale_hook(reads, self.architecture.n_layers)
            if name not in self.bridge.hook_dict:
                raise self._unsupported(
                    "a frozen LayerNorm scale",
                    f"TransformerLens has no hook {name} here (ask for layerNormScale: LIVE)",
                )
            hooks.append((name, _detached))
        return hooks

    def _hooks(self, session: HookSessionLike, backward: bool) -> list[tuple[str, Hook]]:
        """(TransformerLens hook name, function) for every point this request touches."""
        hooks: list[tuple[str, Hook]] = []
        resid_pre: dict[int, torch.Tensor] = {}  # kept for resid_mid, by layer
        for layer in range(self.architecture.n_layers):
            mid = HookPoint(layer, Location.RESID_MID)
            wants_mid = session.wants(mid)
            for location, hook_name in HOOK_NAMES.items():
                point = HookPoint(layer, location)
                hook: Hook | None = None
                if location is Location.RESID_PRE and (wants_mid or (backward and layer == 0)):
                    hook = _resid_pre_hook(session, point, backward and layer == 0, resid_pre)
                elif location is Location.ATTN_OUT and wants_mid:
                    hook = _attn_out_and_mid_hook(session, point, mid, resid_pre)
                elif session.wants(point) and location in HEAD_MAJOR:
                    hook = _head_major_hook(session, point)
                elif session.wants(point):
                    hook = _plain_hook(session, point)
                if hook is not None:
                    hooks.append((f"blocks.{layer}.{hook_name}", hook))
        return hooks

    # --- weights ---------------------------------------------------------------------------

    def weight(self, name: str) -> torch.Tensor:
        try:
            if name in ("W_E", "W_pos", "W_U"):
                tensor = getattr(self.bridge, name)
            elif name in ("ln_final.w", "ln_final.b"):
                tensor = getattr(self.bridge.ln_final, name.rsplit(".", 1)[1])
            else:
                match = _BLOCK_WEIGHT.fullmatch(name)
                if match is None or int(match["layer"]) >= self.architecture.n_layers:
                    raise KeyError(name)
                block = self.bridge.blocks[int(match["layer"])]
                tensor = getattr(getattr(block, match["part"]), match["name"])
        except AttributeError:  # e.g. W_pos of a rotary model
            raise KeyError(name) from None
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(name)
        return tensor.detach().float().contiguous()


# --- hook functions ------------------------------------------------------------------------


def _kv_heads(n_kv_heads: int | None, n_heads: int) -> int | None:
    """Heads of keys and values where grouped-query attention shares them, else None."""
    return None if n_kv_heads is None or int(n_kv_heads) == n_heads else int(n_kv_heads)


@contextlib.contextmanager
def _attention_reads_the_cache(bridge: Any) -> Iterator[None]:
    """Hugging Face 5 hands each attention layer its cache as `cache`; TransformerLens 4.3's
    attention components look for `past_key_values` (or `layer_past`), and without it neither
    store the new keys and values nor read the old ones. This passes it under that name too."""

    def rename(_: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [
        block.attn.register_forward_pre_hook(rename, with_kwargs=True) for block in bridge.blocks
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def norm_scale_hook(reads: HookPoint, n_layers: int) -> str:
    """The hook of the scale of the LayerNorm that reads the stream at `reads`."""
    if reads.location is Location.RESID_PRE:
        return f"blocks.{reads.layer}.ln1.hook_scale"
    if reads.location is Location.RESID_MID:
        return f"blocks.{reads.layer}.ln2.hook_scale"
    if reads.location is Location.RESID_POST and reads.layer == n_layers - 1:
        return "ln_final.hook_scale"
    raise ValueError(f"no LayerNorm reads {reads}")


def _detached(scale: torch.Tensor, hook: Any) -> torch.Tensor:
    return scale.detach()


def _plain_hook(session: HookSessionLike, point: HookPoint) -> Hook:
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return session.process(point, act)

    return hook


def _head_major_hook(session: HookSessionLike, point: HookPoint) -> Hook:
    def hook(act_bhqk: torch.Tensor, hook: Any) -> torch.Tensor:
        out = session.process(point, act_bhqk.transpose(1, 2)).transpose(1, 2)
        if point.location is Location.ATTN_SCORES:
            # The mask is already applied here: keep masked keys masked whatever was written.
            n_query, n_key = act_bhqk.shape[-2:]
            visible = torch.ones(n_query, n_key, dtype=torch.bool, device=act_bhqk.device)
            out = torch.where(visible.tril(n_key - n_query), out, act_bhqk)
        return out

    return hook


def _resid_pre_hook(
    session: HookSessionLike, point: HookPoint, track_grad: bool, keep: dict[int, torch.Tensor]
) -> Hook:
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if track_grad:
            # Autograd follows the residual stream from here on; the frozen weights get none.
            act = act.detach().requires_grad_(True)
        if session.wants(point):
            act = session.process(point, act)
        keep[point.layer] = act
        return act

    return hook


def _attn_out_and_mid_hook(
    session: HookSessionLike, point: HookPoint, mid: HookPoint, resid_pre: dict[int, torch.Tensor]
) -> Hook:
    def hook(attn_out: torch.Tensor, hook: Any) -> torch.Tensor:
        if session.wants(point):
            attn_out = session.process(point, attn_out)
        pre = resid_pre[point.layer]
        return session.process(mid, pre + attn_out) - pre

    return hook
