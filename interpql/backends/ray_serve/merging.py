"""Several callers' forward requests as one pass, and the pass's result split back per caller.

Requests merge when their request-wide switches are equal: the loss of the backward pass, the
trace, the dictionary error term and, without the error term, which dictionaries are spliced
in (splicing one in then changes every row's computation; with the error term it changes
nothing). Saved points are unioned; each caller's interventions and additions move to its own
rows, those for "every prompt" becoming one per row of that caller. Rows of a causal model with
right padding are independent, so each caller gets what it would have got alone: its rows,
padded to its own longest prompt, and only the points it asked for. A request whose indices
point past its own rows or tokens runs alone, where it fails as it would have anyway.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import replace

import torch

from interpql.backends.base import (
    Addition,
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Intervention,
    Location,
    LogitPositions,
)
from interpql.backends.runtime import logit_positions

_KEY_AXIS = frozenset({Location.ATTN_SCORES, Location.ATTN_PROBS})  # [batch, query, head, key]


def merge_key(request: ForwardRequest) -> Hashable:
    spliced: frozenset[HookPoint] = frozenset()
    if not request.autoencoder_error_term:
        touched = (
            request.save
            | request.save_grads
            | {iv.point for iv in request.interventions}
            | {add.point for add in request.additions}
        )
        spliced = frozenset(p for p in touched if p.location is Location.LATENTS)
    return (
        request.backward,
        request.trace,
        request.autoencoder_error_term,
        request.frozen_norm_inputs,
        spliced,
    )


def plan(requests: Sequence[ForwardRequest], max_length_ratio: float = 2.0) -> list[list[int]]:
    """Indices of `requests`, grouped into passes: equal switches, and prompts of similar
    length (the padding a pass wastes is bounded by `max_length_ratio`)."""
    groups: dict[Hashable, list[int]] = {}
    passes: list[list[int]] = []
    for i, request in enumerate(requests):
        if _fits(request):
            groups.setdefault(merge_key(request), []).append(i)
        else:
            passes.append([i])
    for members in groups.values():
        shortest = 0
        current: list[int] = []
        for i in sorted(members, key=lambda i: _longest(requests[i])):
            lengths = [len(t) for t in requests[i].tokens]
            if current and max(lengths) <= max_length_ratio * shortest:
                current.append(i)
                shortest = min(shortest, *lengths)
            else:
                current = [i]
                passes.append(current)
                shortest = min(lengths)
    return passes


def merge(requests: Sequence[ForwardRequest]) -> ForwardRequest:
    """One request for the rows of all `requests`, in order (their switches must be equal)."""
    interventions: list[Intervention] = []
    additions: list[Addition] = []
    offset = 0
    for request in requests:
        rows = len(request.tokens)
        interventions += [
            replace(iv, row=offset + row)
            for iv in request.interventions
            for row in _rows(iv.row, rows)
        ]
        additions += [
            replace(add, row=offset + row)
            for add in request.additions
            for row in _rows(add.row, rows)
        ]
        offset += rows
    first = requests[0]
    trace = first.trace
    if trace is not None and trace.value_directions is not None:
        # A V trace projects each row on its own direction: the rows' directions, in order.
        trace = replace(
            trace,
            value_directions=tuple(
                d for r in requests if r.trace for d in r.trace.value_directions or ()
            ),
        )
    return ForwardRequest(
        tokens=tuple(prompt for request in requests for prompt in request.tokens),
        save=frozenset().union(*(r.save for r in requests)),
        interventions=tuple(interventions),
        additions=tuple(additions),
        backward=first.backward,
        trace=trace,
        save_grads=frozenset().union(*(r.save_grads for r in requests)),
        autoencoder_error_term=first.autoencoder_error_term,
        frozen_norm_inputs=first.frozen_norm_inputs,
        logits=max(logit_positions(r) for r in requests),
    )


def split(result: ForwardResult, requests: Sequence[ForwardRequest]) -> list[ForwardResult]:
    """Each request's part of the merged pass's `result`, on the CPU."""
    total = sum(len(r.tokens) for r in requests)
    parts = []
    offset = 0
    for request in requests:
        rows = slice(offset, offset + len(request.tokens))
        offset += len(request.tokens)
        longest = _longest(request)
        wanted = request.save | request.save_grads
        positions = logit_positions(request)
        parts.append(
            ForwardResult(
                lengths=result.lengths[rows],
                logits=owned(_logits_at(result, rows, longest, positions)),
                next_token_loss=owned(
                    result.next_token_loss[rows]
                    if positions is LogitPositions.ALL
                    else torch.full((len(request.tokens),), torch.nan)
                ),
                activations={
                    p: owned(_trim(p, t[rows], longest))
                    for p, t in result.activations.items()
                    if p in wanted
                },
                gradients={
                    p: owned(_trim(p, g[rows], longest))
                    for p, g in result.gradients.items()
                    if p in request.save_grads
                },
                backward_loss=None
                if result.backward_loss is None
                else owned(result.backward_loss[rows]),
                elapsed_s=result.elapsed_s,
                memory_before_bytes=result.memory_before_bytes,
                memory_after_bytes=result.memory_after_bytes,
                pass_rows=total,
                logit_positions=positions,
            )
        )
    return parts


def _logits_at(
    result: ForwardResult, rows: slice, longest: int, positions: LogitPositions
) -> torch.Tensor:
    """A caller's rows of the merged pass's logits, at the positions it asked for (the pass
    unembedded where any caller asked): only those cross back to it."""
    logits = result.logits[rows]
    if positions is LogitPositions.NONE:
        return logits[:, :0]
    if positions is LogitPositions.ALL or result.logit_positions is LogitPositions.LAST:
        return logits[:, :longest]
    return torch.stack([result.last_logits(row) for row in range(rows.start, rows.stop)])[:, None]


def on_cpu(result: ForwardResult) -> ForwardResult:
    """`result` with every tensor on the CPU and owning its memory, ready to pickle."""
    return replace(
        result,
        logits=owned(result.logits),
        next_token_loss=owned(result.next_token_loss),
        activations={p: owned(t) for p, t in result.activations.items()},
        gradients={p: owned(g) for p, g in result.gradients.items()},
        backward_loss=None if result.backward_loss is None else owned(result.backward_loss),
    )


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, holding only its own elements: a pickled view would carry its whole base."""
    tensor = tensor.detach().cpu()
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if whole and tensor.is_contiguous() and tensor.storage_offset() == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _trim(point: HookPoint, tensor: torch.Tensor, longest: int) -> torch.Tensor:
    tensor = tensor[:, :longest]
    return tensor[..., :longest] if point.location in _KEY_AXIS else tensor


def _rows(row: int | None, rows: int) -> Iterable[int]:
    return range(rows) if row is None else (row,)


def _longest(request: ForwardRequest) -> int:
    return max((len(t) for t in request.tokens), default=0)


def _fits(request: ForwardRequest) -> bool:
    """Whether every row and position of `request` points inside its own rows."""
    rows, longest = len(request.tokens), _longest(request)
    if rows == 0 or longest == 0:
        return False
    changes: list[Intervention | Addition] = [*request.interventions, *request.additions]
    row_indices = [c.row for c in changes if c.row is not None]
    positions = [c.position for c in changes if c.position is not None]
    if request.trace is not None:
        positions.append(request.trace.position)
        if request.trace.key_position is not None:
            positions.append(request.trace.key_position)
    return all(0 <= r < rows for r in row_indices) and all(0 <= p < longest for p in positions)
