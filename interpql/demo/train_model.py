"""Trains the demo's GPT-2 on the corpus, and measures it against n-gram baselines.

Training runs over the corpus's own vocabulary only (about 19k of GPT-2's 50,257 tokens): the
model is trained with `n_vocab` = that many tokens and tied embeddings, then widened into a normal
full-vocabulary GPT-2. Tokens the corpus never uses get a zero input embedding and an output row
whose logit is a constant far below anything a used token can reach:

* during training, coordinate 0 of the final LayerNorm's output is pinned to the constant 1
  (gain 0, bias 1), so the unembedding's column 0 acts as a per-token output bias;
* every unused token's unembedding row is `(c, 0, ..., 0)`, so its logit is exactly `c`, and `c`
  is set `UNUSED_LOGIT_MARGIN` below a bound on the lowest logit the best used token can have for
  any input. Unused tokens never win, and together they hold a negligible probability.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from tqdm import tqdm

from interpql.backends.gpt2.model import GPT2, GPT2Config
from interpql.backends.tokenizer import GPT2_VOCAB_SIZE
from interpql.demo.corpus import Corpus, Tokens

StateDict = dict[str, torch.Tensor]
UNUSED_LOGIT_MARGIN = 30.0  # e^-30 x 31k unused tokens: ~3e-9 of the best used token's mass
_EMBEDDINGS = ("tok_embed.weight", "unembed.weight")


@dataclass(frozen=True)
class TrainConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 256
    train_tokens: int = 3_200_000  # the budget: ~15-20 minutes on 2 CPU cores
    # Small batches learn the most per token here (the corpus is seen less than once).
    batch_size: int = 4  # sequences of n_ctx tokens
    learning_rate: float = 2e-3
    final_lr_fraction: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def gpt2_config(self, n_vocab: int = GPT2_VOCAB_SIZE) -> GPT2Config:
        return GPT2Config(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            n_vocab=n_vocab,
        )


@dataclass(frozen=True)
class TrainedModel:
    cfg: GPT2Config  # full GPT-2 vocabulary
    state: StateDict  # float32 values that float16 represents exactly
    used_tokens: NDArray[np.int64]  # sorted ids the model was trained over
    unused_token_logit: float
    steps: int
    tokens_seen: int
    train_losses: list[float] = field(repr=False)  # one per step
    elapsed_s: float = 0.0


def train_model(
    corpus: Corpus, config: TrainConfig, *, progress: bool = True, device: str = "cpu"
) -> TrainedModel:
    """`device`: where the steps run (`cuda` on an accelerator). The seeds fix the
    initialisation and the order of the windows on every device; the steps' arithmetic is the
    device's own, so a model trained elsewhere differs in its last bits."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    used = corpus.used_tokens
    stream = torch.from_numpy(compact_ids(used)[corpus.train.tokens])
    model = _initialised(config.gpt2_config(len(used)), generator).to(device)
    windows = (len(stream) - 1) // config.n_ctx
    steps = max(1, math.ceil(config.train_tokens / (config.batch_size * config.n_ctx)))
    optimizer = _optimizer(model, config)
    order = torch.randperm(windows, generator=generator)
    position, losses = 0, []
    bar = tqdm(range(steps), desc="training the model", unit="step", disable=not progress)
    for step in bar:
        if position + config.batch_size > windows:
            order, position = torch.randperm(windows, generator=generator), 0
        starts = order[position : position + config.batch_size] * config.n_ctx
        position += config.batch_size
        batch = stream[starts[:, None] + torch.arange(config.n_ctx + 1)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, steps, config)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        _unpin_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    state, unused_logit = full_vocabulary_state(model.cpu(), used)
    return TrainedModel(
        cfg=config.gpt2_config(),
        state=state,
        used_tokens=used,
        unused_token_logit=unused_logit,
        steps=steps,
        tokens_seen=steps * config.batch_size * config.n_ctx,
        train_losses=losses,
        elapsed_s=time.perf_counter() - started,
    )


def compact_ids(used: NDArray[np.int64]) -> NDArray[np.int64]:
    """A [GPT-2 vocab] table from token id to its index among `used` (-1 when unused)."""
    table = np.full(GPT2_VOCAB_SIZE, -1, dtype=np.int64)
    table[used] = np.arange(len(used))
    return table


def _initialised(cfg: GPT2Config, generator: torch.Generator) -> GPT2:
    """GPT-2's initialisation, embeddings tied, the final LayerNorm's coordinate 0 pinned to 1."""
    model = GPT2(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("out_proj.weight", "out_layer.weight")):
                param.normal_(0.0, residual_std, generator=generator)
            elif param.ndim == 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
        model.final_ln.weight[0] = 0.0
        model.final_ln.bias[0] = 1.0
    model.unembed.weight = model.tok_embed.weight
    return model


def _unpin_gradients(model: GPT2) -> None:
    # With zero gradients Adam never moves them, and weight decay skips LayerNorm parameters.
    for param in (model.final_ln.weight, model.final_ln.bias):
        if param.grad is not None:
            param.grad[0] = 0.0


def _optimizer(model: GPT2, config: TrainConfig) -> torch.optim.AdamW:
    decayed = [p for p in model.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if p.ndim != 2]
    return torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )


def _lr_factor(step: int, steps: int, config: TrainConfig) -> float:
    warmup = max(1, int(config.warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = config.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def full_vocabulary_state(model: GPT2, used: NDArray[np.int64]) -> tuple[StateDict, float]:
    """Widens a model trained over `used` tokens into a full GPT-2, every value fp16-exact."""
    compact = {k: v.detach().to(torch.float16).float() for k, v in model.state_dict().items()}
    embedding = compact["tok_embed.weight"]  # [n_used, d_model]
    unused_logit = unused_token_logit(
        embedding, compact["final_ln.weight"], compact["final_ln.bias"]
    )
    rows = torch.from_numpy(used)
    tok_embed = torch.zeros(GPT2_VOCAB_SIZE, embedding.shape[1])
    tok_embed[rows] = embedding
    unembed = torch.zeros_like(tok_embed)
    unembed[:, 0] = unused_logit
    unembed[rows] = embedding
    state = {k: v for k, v in compact.items() if k not in _EMBEDDINGS}
    return state | {"tok_embed.weight": tok_embed, "unembed.weight": unembed}, unused_logit


def unused_token_logit(
    embedding: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor
) -> float:
    """The logit for unused tokens: a margin below what the best used token is sure to get.

    The final LayerNorm's output is h = (1, g * n + b) with |n| <= sqrt(d_model), so
    |h[1:]| <= max|g| sqrt(d_model) + |b| and token v's logit is at least
    W[v, 0] - |W[v, 1:]| * that bound, whatever the input.
    """
    if ln_weight[0] != 0.0 or ln_bias[0] != 1.0:
        raise ValueError("the final LayerNorm's coordinate 0 is not pinned to 1")
    d_model = embedding.shape[1]
    h_bound = ln_weight[1:].abs().max() * math.sqrt(d_model) + ln_bias[1:].norm()
    lowest = embedding[:, 0] - embedding[:, 1:].norm(dim=1) * h_bound
    return float(math.floor(lowest.max().item() - UNUSED_LOGIT_MARGIN))


# --- Evaluation --------------------------------------------------------------------------------


def eval_windows(tokens: Tokens, n_ctx: int, max_tokens: int | None = None) -> NDArray[np.int64]:
    """Non-overlapping [n, n_ctx] windows, evenly spread over `tokens` when capped."""
    n = len(tokens) // n_ctx
    windows = tokens[: n * n_ctx].astype(np.int64).reshape(n, n_ctx)
    if max_tokens is not None and max_tokens // n_ctx < n:
        windows = windows[np.linspace(0, n - 1, max(1, max_tokens // n_ctx)).astype(np.int64)]
    return windows


def final_hidden(model: GPT2, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, token] ids -> [batch, token, d_model], the final LayerNorm's output: the model's
    forward pass without its unembedding."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    x = model.tok_embed(tokens) + model.pos_embed(positions)[None]
    for layer, block in enumerate(model.xf_layers):
        x = block(x, layer, None)
    out: torch.Tensor = model.final_ln(x)
    return out


@torch.inference_mode()
def model_loss(
    model: GPT2,
    windows: NDArray[np.int64],
    used: NDArray[np.int64],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Mean next-token cross-entropy (nats) over the full vocabulary, at every window position
    but the first.

    Exact and cheap: the tokens outside `used` share one unembedding row, so their equal logits
    enter the log-sum-exp as a single term. The first windows are checked against the plain
    full-vocabulary forward pass.
    """
    unembed = model.unembed.weight.float()
    unused = torch.ones(len(unembed), dtype=torch.bool)
    unused[torch.from_numpy(used)] = False
    shared_row = unembed[unused][0]
    if not bool((unembed[unused] == shared_row).all()):
        raise ValueError("the unused tokens' unembedding rows differ")
    log_unused = math.log(int(unused.sum()))
    used_rows = unembed[torch.from_numpy(used)]  # [n_used, d_model]
    table = torch.from_numpy(compact_ids(used))

    def token_losses(batch: torch.Tensor) -> torch.Tensor:
        hidden = final_hidden(model, batch[:, :-1]).float()
        logits = hidden @ used_rows.t()
        normaliser = torch.logaddexp(logits.logsumexp(-1), hidden @ shared_row + log_unused)
        return normaliser - logits.gather(-1, table[batch[:, 1:], None]).squeeze(-1)

    check = torch.from_numpy(windows[:2])
    full = F.cross_entropy(
        model(check[:, :-1]).float().transpose(1, 2), check[:, 1:], reduction="none"
    )
    if not torch.allclose(token_losses(check), full, atol=1e-3):
        raise RuntimeError("the cheap held-out loss disagrees with the full forward pass")
    total, count = 0.0, 0
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="held-out loss", unit="batch", disable=not progress):
        losses = token_losses(torch.from_numpy(windows[start : start + batch_size]))
        total += losses.double().sum().item()
        count += losses.numel()
    return total / count


def ngram_baselines(
    train: Tokens, windows: NDArray[np.int64], used: NDArray[np.int64]
) -> dict[str, float]:
    """Held-out cross-entropy (nats) of n-gram models fitted on `train`, over the same
    predictions as `model_loss` and the same vocabulary (the corpus's `used` tokens).

    Smoothing strengths are chosen on the last 5% of the training stream, then the models are
    refitted on all of it: no held-out token informs them.
    """
    table = compact_ids(used)
    stream = table[train]
    fit, valid = stream[: len(stream) * 19 // 20], stream[len(stream) * 19 // 20 :]
    held = table[windows]
    prev, target = held[:, :-1].ravel(), held[:, 1:].ravel()
    n = len(used)
    fit_counts = _Counts(fit, n)
    unigram_k = _best(lambda k: float(_unigram(fit, n, k)[valid].mean()), (0.01, 0.1, 0.5, 1.0))
    bigram_k = _best(
        lambda k: float(_bigram(fit_counts, valid[:-1], valid[1:], k, None).mean()),
        (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0),
    )
    prior = _unigram(fit, n, unigram_k)
    alpha = _best(
        lambda a: float(_bigram(fit_counts, valid[:-1], valid[1:], a, prior).mean()),
        (1.0, 3.0, 10.0, 30.0, 100.0, 300.0),
    )
    counts = _Counts(stream, n)
    return {
        "unigram": float(_unigram(stream, n, unigram_k)[target].mean()),
        "bigram": float(_bigram(counts, prev, target, bigram_k, None).mean()),
        "bigram_interpolated": float(
            _bigram(counts, prev, target, alpha, _unigram(stream, n, unigram_k)).mean()
        ),
        "unigram_k": unigram_k,
        "bigram_k": bigram_k,
        "bigram_interpolated_alpha": alpha,
    }


class _Counts:
    def __init__(self, stream: NDArray[np.int64], n: int) -> None:
        self.n = n
        self.pairs, self.pair_counts = np.unique(stream[:-1] * n + stream[1:], return_counts=True)
        self.row_counts = np.bincount(stream[:-1], minlength=n)

    def of(self, prev: NDArray[np.int64], target: NDArray[np.int64]) -> NDArray[np.int64]:
        keys = prev * self.n + target
        index = np.minimum(np.searchsorted(self.pairs, keys), len(self.pairs) - 1)
        return np.where(self.pairs[index] == keys, self.pair_counts[index], 0)


def _unigram(stream: NDArray[np.int64], n: int, k: float) -> NDArray[np.float64]:
    """Negative log-probability of each token id under add-k smoothing."""
    counts = np.bincount(stream, minlength=n) + k
    nll: NDArray[np.float64] = -np.log(counts / counts.sum())
    return nll


def _bigram(
    counts: _Counts,
    prev: NDArray[np.int64],
    target: NDArray[np.int64],
    strength: float,
    prior_nll: NDArray[np.float64] | None,
) -> NDArray[np.float64]:
    """Per-pair negative log-probability: add-k (no prior) or interpolated with a unigram prior
    p(b|a) = (c(a,b) + alpha p(b)) / (c(a) + alpha)."""
    pair = counts.of(prev, target)
    row = counts.row_counts[prev]
    if prior_nll is None:
        return -np.log((pair + strength) / (row + strength * counts.n))
    return -np.log((pair + strength * np.exp(-prior_nll[target])) / (row + strength))


def _best(loss: Callable[[float], float], grid: tuple[float, ...]) -> float:
    return min(grid, key=loss)
