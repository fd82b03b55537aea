"""Our locations in TransformerLens's hook names, and which of them a bridged model offers.

Architectures differ: a parallel block (GPT-J, GPT-NeoX, Pythia) has no residual between
attention and MLP; a gated MLP (Llama, Mistral, Gemma) has two pre-activations; grouped-query
attention shares keys and values between heads. Rather than list such cases by family, one
probe pass finds them: a location is offered when its hook exists, fires in every layer and
holds the shape documented on `Location`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from interpql.backends.base import Architecture, HookPoint, Location

Hook = Callable[..., torch.Tensor]  # TransformerLens calls fn(activation, hook=HookPoint)

# Hook names inside block L. resid_mid is computed at attn_out instead (see backend.py).
HOOK_NAMES: dict[Location, str] = {
    Location.RESID_PRE: "hook_resid_pre",
    Location.ATTN_Q: "attn.hook_q",
    Location.ATTN_K: "attn.hook_k",
    Location.ATTN_V: "attn.hook_v",
    Location.ATTN_SCORES: "attn.hook_attn_scores",
    Location.ATTN_PROBS: "attn.hook_pattern",
    Location.ATTN_Z: "attn.hook_z",
    Location.ATTN_OUT: "hook_attn_out",
    Location.MLP_NORMALIZED: "ln2.hook_normalized",
    Location.MLP_IN: "mlp.hook_in",
    Location.MLP_PRE: "mlp.hook_pre",
    Location.MLP_POST: "mlp.hook_post",
    Location.MLP_OUT: "hook_mlp_out",
    Location.RESID_POST: "hook_resid_post",
}
# TransformerLens holds these [batch, head, query, key]; ours are token-major.
HEAD_MAJOR = frozenset({Location.ATTN_SCORES, Location.ATTN_PROBS})


def find_unsupported(bridge: Any, arch: Architecture) -> dict[Location, str]:
    """Runs a few tokens with a recording hook on every candidate; returns why each location
    that cannot be offered is not."""
    n_tok = min(3, arch.n_ctx)
    names = {
        HookPoint(layer, location): f"blocks.{layer}.{hook_name}"
        for layer in range(arch.n_layers)
        for location, hook_name in HOOK_NAMES.items()
    }
    mid_names = {layer: f"blocks.{layer}.hook_resid_mid" for layer in range(arch.n_layers)}
    available = set(bridge.hook_dict)
    seen: dict[Any, torch.Tensor] = {}  # by HookPoint, and by layer for TransformerLens's mid

    def record(key: Any) -> Hook:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            seen[key] = act.detach().clone()
            return act

        return hook

    hooks = [(name, record(point)) for point, name in names.items() if name in available]
    hooks += [(name, record(layer)) for layer, name in mid_names.items() if name in available]
    tokens = torch.arange(n_tok, device=next(bridge.parameters()).device)[None] % arch.n_vocab
    with torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        bridge(tokens, return_type="logits")

    reasons: dict[Location, str] = {}
    for point, name in names.items():
        if point.location in reasons:
            continue
        expected = _shape(point.location, arch, n_tok)
        if name not in available:
            reasons[point.location] = f"TransformerLens has no hook {name} for this architecture"
        elif point not in seen:
            reasons[point.location] = f"TransformerLens's hook {name} never fires"
        elif tuple(seen[point].shape) != expected:
            reasons[point.location] = (
                f"TransformerLens's hook {name} holds shape {tuple(seen[point].shape)}, not "
                f"{expected} (grouped-query attention shares keys and values between heads)"
                if point.location in (Location.ATTN_K, Location.ATTN_V)
                else f"TransformerLens's hook {name} holds shape "
                f"{tuple(seen[point].shape)}, not {expected}"
            )
    if Location.MLP_PRE not in reasons and "blocks.0.mlp.hook_pre_linear" in available:
        reasons[Location.MLP_PRE] = (
            "the MLP is gated (act(gate) * up): two pre-activations, neither of them alone "
            "the neurons' input; mlp_post is the neurons' value"
        )
    reasons |= _resid_mid_reason(arch, mid_names, available, seen, reasons)
    return reasons


def _shape(location: Location, arch: Architecture, n_tok: int) -> tuple[int, ...]:
    """What TransformerLens's hook holds for one prompt of n_tok tokens."""
    if location in HEAD_MAJOR:
        return (1, arch.n_heads, n_tok, n_tok)
    if location in (Location.ATTN_Q, Location.ATTN_K, Location.ATTN_V, Location.ATTN_Z):
        return (1, n_tok, arch.n_heads, arch.d_head)
    if location in (Location.MLP_PRE, Location.MLP_POST):
        return (1, n_tok, arch.d_mlp)
    return (1, n_tok, arch.d_model)


def _resid_mid_reason(
    arch: Architecture,
    mid_names: dict[int, str],
    available: set[str],
    seen: dict[Any, torch.Tensor],
    reasons: dict[Location, str],
) -> dict[Location, str]:
    if any(name not in available for name in mid_names.values()):
        return {
            Location.RESID_MID: "attention and MLP read the same residual stream (a parallel "
            "block), so there is no residual between them"
        }
    if Location.RESID_PRE in reasons or Location.ATTN_OUT in reasons:
        return {Location.RESID_MID: "it is computed from resid_pre and attn_out"}
    # Our resid_mid is resid_pre + attn_out; check that this is what the block's MLP reads.
    for layer in range(arch.n_layers):
        computed = (
            seen[HookPoint(layer, Location.RESID_PRE)] + seen[HookPoint(layer, Location.ATTN_OUT)]
        )
        hooked = seen.get(layer)
        if hooked is None or not torch.allclose(
            computed.float(), hooked.float(), atol=1e-3, rtol=1e-2
        ):
            return {
                Location.RESID_MID: "in this architecture the residual between attention and "
                "MLP is not resid_pre + attn_out"
            }
    return {}
