"""What every backend's pass goes through (backends/runtime.py): right padding that changes no
real position, grad mode only for a backward pass, the losses and the backward pass itself,
checked with a forward written in the test (a causal running sum, so every position depends on
the ones before it)."""

from __future__ import annotations

import pytest
import torch

from interpql.backends.base import ForwardRequest, HookPoint, Location, LogitPositions
from interpql.backends.hooks import HookSession
from interpql.backends.runtime import at_positions, execute, right_padded
from interpql.specs import LossKind, LossSpec

VOCAB, WIDTH = 7, 4
EMBED = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))
UNEMBED = torch.randn(WIDTH, VOCAB, generator=torch.Generator().manual_seed(1))
POINT = HookPoint(0, Location.RESID_POST)
seen_grad_modes: list[bool] = []


def causal_sum(
    tokens: torch.Tensor, session: HookSession, track_grad: bool, positions: torch.Tensor | None
) -> torch.Tensor:
    seen_grad_modes.append(torch.is_grad_enabled())
    x = EMBED[tokens]
    if track_grad:
        x = x.detach().requires_grad_(True)
    x = torch.cumsum(x, dim=1)  # position t sees positions 0..t: causal
    x = session.process(POINT, x) if session.wants(POINT) else x
    return at_positions(x, positions) @ UNEMBED


def run(request: ForwardRequest) -> object:
    return execute(request, HookSession(request), torch.device("cpu"), causal_sum)


def test_right_padding() -> None:
    tokens, lengths = right_padded(((1, 2, 3), (4,)), torch.device("cpu"))
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]


def test_a_padded_batch_computes_what_each_prompt_alone_does() -> None:
    prompts = ((1, 2, 3, 4), (5, 6), (3,))
    batch = run(ForwardRequest(tokens=prompts, save=frozenset({POINT})))
    for row, prompt in enumerate(prompts):
        alone = run(ForwardRequest(tokens=(prompt,), save=frozenset({POINT})))
        n = len(prompt)
        torch.testing.assert_close(batch.logits[row, :n], alone.logits[0])  # type: ignore[attr-defined]
        expected = torch.cumsum(EMBED[list(prompt)], dim=0)
        torch.testing.assert_close(batch.activations[POINT][row, :n], expected)  # type: ignore[attr-defined]
    assert batch.lengths == [4, 2, 1]  # type: ignore[attr-defined]


def test_gradients_only_with_a_backward_pass_and_equal_to_the_closed_form() -> None:
    seen_grad_modes.clear()
    run(ForwardRequest(tokens=((1, 2),), save=frozenset({POINT})))
    assert seen_grad_modes == [False]  # inference mode
    spec = LossSpec(kind=LossKind.LOGIT_DIFF, targets=(3,), distractors=(5,))
    result = run(
        ForwardRequest(
            tokens=((1, 2, 6),),
            backward=spec,
            save=frozenset({POINT}),
            save_grads=frozenset({POINT}),
        )
    )
    assert seen_grad_modes[-1] is True
    # loss = (x_last @ U)[3] - (x_last @ U)[5]: its gradient at the last position is
    # U[:, 3] - U[:, 5], and zero before it.
    grad = result.gradients[POINT][0]  # type: ignore[attr-defined]
    torch.testing.assert_close(grad[-1], UNEMBED[:, 3] - UNEMBED[:, 5])
    assert torch.count_nonzero(grad[:-1]) == 0
    logits = torch.cumsum(EMBED[[1, 2, 6]], 0)[-1] @ UNEMBED
    assert float(result.backward_loss[0]) == pytest.approx(float(logits[3] - logits[5]))  # type: ignore[attr-defined,index]


def test_logits_only_where_asked_and_as_wide_as_the_backward_loss_reads() -> None:
    prompts = ((1, 2, 3, 4), (5, 6), (3,))
    full = run(ForwardRequest(tokens=prompts))
    last = run(ForwardRequest(tokens=prompts, logits=LogitPositions.LAST))
    none = run(ForwardRequest(tokens=prompts, logits=LogitPositions.NONE))
    assert tuple(last.logits.shape) == (3, 1, VOCAB)  # type: ignore[attr-defined]
    assert tuple(none.logits.shape) == (3, 0, VOCAB)  # type: ignore[attr-defined]
    for row, prompt in enumerate(prompts):
        expected = torch.cumsum(EMBED[list(prompt)], dim=0)[-1] @ UNEMBED
        torch.testing.assert_close(full.last_logits(row), expected)  # type: ignore[attr-defined]
        torch.testing.assert_close(last.last_logits(row), expected)  # type: ignore[attr-defined]
    # The next-token loss reads every position: without them there is none.
    assert not torch.isnan(full.next_token_loss[:2]).any()  # type: ignore[attr-defined]
    assert torch.isnan(last.next_token_loss).all()  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        none.last_logits(0)  # type: ignore[attr-defined]
    # A backward loss widens the logits to what it reads.
    next_token = LossSpec(kind=LossKind.NEXT_TOKEN)
    widened = run(ForwardRequest(tokens=prompts, logits=LogitPositions.NONE, backward=next_token))
    assert widened.logit_positions is LogitPositions.ALL  # type: ignore[attr-defined]
    torch.testing.assert_close(widened.backward_loss, full.next_token_loss, equal_nan=True)  # type: ignore[attr-defined]
    diff = LossSpec(kind=LossKind.LOGIT_DIFF, targets=(3,), distractors=(5,))
    at_last = run(ForwardRequest(tokens=prompts, logits=LogitPositions.NONE, backward=diff))
    assert at_last.logit_positions is LogitPositions.LAST  # type: ignore[attr-defined]
    for row in range(3):
        logits = full.last_logits(row)  # type: ignore[attr-defined]
        assert float(at_last.backward_loss[row]) == pytest.approx(float(logits[3] - logits[5]))  # type: ignore[attr-defined]
