"""Per-prompt losses computed from logits; shared by every backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from interpql.specs import LossKind, LossSpec


def next_token_loss(
    logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of each real next token; [batch, token, vocab] -> [batch]."""
    predicting = logits[:, :-1].float()
    # logsumexp minus the picked logit: log_softmax's value without writing it for the whole
    # vocabulary at every position.
    picked = predicting.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    nll = torch.logsumexp(predicting, dim=-1) - picked  # [batch, token - 1]
    positions = torch.arange(nll.shape[1], device=nll.device)
    real = positions[None, :] < (lengths[:, None] - 1)
    counts = real.sum(dim=1)
    total = (nll * real).sum(dim=1)
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.nan)


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[batch, token, vocab] -> [batch, vocab] at each prompt's last real token."""
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1]


def reads_every_position(spec: LossSpec) -> bool:
    """Whether the loss reads the logits of every position (else the last one's alone)."""
    return spec.kind is LossKind.NEXT_TOKEN


def spec_loss(
    spec: LossSpec, logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The loss `spec` describes, per prompt: [batch]."""
    if spec.kind is LossKind.NEXT_TOKEN:
        return next_token_loss(logits, tokens, lengths)
    return last_logits_loss(spec, last_token_logits(logits, lengths))


def last_logits_loss(spec: LossSpec, last: torch.Tensor) -> torch.Tensor:
    """A loss that reads the last position alone, from its logits [batch, vocab]: [batch]."""
    if reads_every_position(spec):
        raise ValueError(f"a {spec.kind} loss reads every position")
    last = last.float()
    targets = list(spec.targets)
    if spec.kind is LossKind.ZERO:
        return last.sum(dim=-1) * 0.0
    if spec.kind is LossKind.LOGIT_DIFF:
        distractors = list(spec.distractors)
        return last[:, targets].mean(dim=-1) - last[:, distractors].mean(dim=-1)
    if spec.kind is LossKind.LOGIT_MINUS_MEAN:
        return last[:, targets].mean(dim=-1) - last.mean(dim=-1)
    if spec.kind is LossKind.PROBS:
        return F.softmax(last, dim=-1)[:, targets].sum(dim=-1)
    raise ValueError(f"unknown loss kind {spec.kind}")
