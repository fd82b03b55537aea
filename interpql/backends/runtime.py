"""What every backend does around its own forward pass: padding, grad mode, losses, the
backward pass, timing and memory figures. A backend supplies only `forward`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import psutil
import torch

from interpql.backends.base import ForwardRequest, ForwardResult, LogitPositions
from interpql.backends.hooks import HookSession
from interpql.backends.losses import (
    last_logits_loss,
    next_token_loss,
    reads_every_position,
    spec_loss,
)

# (token ids [row, position], hook session, whether autograd must follow, the positions to
# unembed [row, k] or None for all) -> logits [row, position or k, vocab]
Forward = Callable[[torch.Tensor, HookSession, bool, torch.Tensor | None], torch.Tensor]


def execute(
    request: ForwardRequest, session: HookSession, device: torch.device, forward: Forward
) -> ForwardResult:
    """Runs `request` around a backend's own `forward` (see base.py): pads the rows, picks
    grad or inference mode, computes the losses, runs the backward pass, times it and
    collects what the session saved."""
    memory_before = memory_in_use(device)
    started = time.perf_counter()
    # Right padding in a causal model: no real token attends to a pad, so no mask is needed
    # and every prompt runs exactly as it would alone.
    tokens, lengths = right_padded(request.tokens, device)
    backward = request.backward is not None or request.trace is not None
    grad_mode = contextlib.nullcontext() if backward else torch.inference_mode()
    wanted = logit_positions(request)
    positions = None
    if wanted is LogitPositions.LAST:
        positions = (lengths - 1)[:, None]
    elif wanted is LogitPositions.NONE:
        positions = lengths.new_zeros((len(lengths), 0))
    with grad_mode:
        logits = forward(tokens, session, backward, positions).float()
        if wanted is LogitPositions.ALL:
            lm_loss = next_token_loss(logits, tokens, lengths)
        else:
            lm_loss = torch.full((len(lengths),), torch.nan, device=logits.device)
        backward_loss = None
        if request.backward is not None:
            if wanted is LogitPositions.ALL:
                backward_loss = spec_loss(request.backward, logits, tokens, lengths)
            else:
                backward_loss = last_logits_loss(request.backward, logits[:, 0])
        if request.trace is not None:
            torch.autograd.backward(session.traced_value())
        elif backward_loss is not None:
            torch.autograd.backward(backward_loss.sum())
    gradients = session.gradients()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ForwardResult(
        lengths=lengths.tolist(),
        logits=logits.detach(),
        next_token_loss=lm_loss.detach(),
        activations={p: a.detach() for p, a in session.activations.items()},
        gradients={p: g.detach() for p, g in gradients.items()},
        backward_loss=None if backward_loss is None else backward_loss.detach(),
        elapsed_s=time.perf_counter() - started,
        memory_before_bytes=memory_before,
        memory_after_bytes=memory_in_use(device),
        logit_positions=wanted,
    )


def check_cacheable(request: ForwardRequest) -> None:
    """What `Backend.forward_cached` takes: rows of equal length, a forward pass alone."""
    if len({len(row) for row in request.tokens}) != 1:
        raise ValueError("a cached pass needs rows of equal length (padding would be cached)")
    if request.backward is not None or request.trace is not None or request.save_grads:
        raise ValueError("a cached pass runs forward only")


def logit_positions(request: ForwardRequest) -> LogitPositions:
    """Where `request`'s pass unembeds: what it asks, and what its backward loss reads."""
    wanted = request.logits
    if request.backward is not None:
        every = reads_every_position(request.backward)
        wanted = max(wanted, LogitPositions.ALL if every else LogitPositions.LAST)
    return LogitPositions(wanted)


def at_positions(stream: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """[row, position, d] -> [row, k, d] at `positions` [row, k] (None: all of them). Backends
    call it on the final residual stream, before the last LayerNorm and the unembedding."""
    if positions is None:
        return stream
    index = positions[..., None].expand(-1, -1, stream.shape[-1])
    return stream.gather(1, index)


def right_padded(
    tokens: tuple[tuple[int, ...], ...], device: torch.device, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ([row, longest] token ids, [row] lengths); padding goes on the right."""
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    batch = torch.full((len(tokens), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(tokens):
        batch[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return batch.to(device), lengths.to(device)


def memory_in_use(device: torch.device) -> int:
    """Bytes in use: allocated CUDA memory on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return int(psutil.Process().memory_info().rss)
