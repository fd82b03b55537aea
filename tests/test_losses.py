"""The losses (backends/losses.py), per prompt of a padded batch, against numpy written from
their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interpql.backends.losses import next_token_loss, spec_loss
from interpql.specs import LossKind, LossSpec

RNG = np.random.default_rng(3)
VOCAB = 11
LOGITS = RNG.normal(size=(3, 5, VOCAB))  # [row, position, vocab]
TOKENS = RNG.integers(0, VOCAB, size=(3, 5))
LENGTHS = np.array([5, 3, 1])  # the last row has no next token


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS), torch.tensor(TOKENS), torch.tensor(LENGTHS)


def test_next_token_loss_is_the_mean_cross_entropy_of_real_positions() -> None:
    got = next_token_loss(*tensors()).numpy()
    for row, n in enumerate(LENGTHS):
        if n < 2:
            assert np.isnan(got[row])
            continue
        lp = log_softmax(LOGITS[row, : n - 1])
        expected = -np.mean([lp[t, TOKENS[row, t + 1]] for t in range(n - 1)])
        assert got[row] == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", list(LossKind))
def test_every_loss_at_each_prompts_last_real_position(kind: LossKind) -> None:
    spec = LossSpec(kind=kind, targets=(2, 7), distractors=(4,))
    got = spec_loss(spec, *tensors()).numpy()
    for row, n in enumerate(LENGTHS):
        last = LOGITS[row, n - 1]
        expected = {
            LossKind.LOGIT_DIFF: last[[2, 7]].mean() - last[4],
            LossKind.LOGIT_MINUS_MEAN: last[[2, 7]].mean() - last.mean(),
            LossKind.PROBS: np.exp(log_softmax(last))[[2, 7]].sum(),
            LossKind.ZERO: 0.0,
        }
        if kind is LossKind.NEXT_TOKEN:
            continue  # the same function as above, on these rows
        assert got[row] == pytest.approx(expected[kind], rel=1e-6, abs=1e-7)
