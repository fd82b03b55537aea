"""Trains the demo model's sparse autoencoders: per layer, one on the MLP's post-activations and
one on what attention adds to the residual stream.

ReLU autoencoders with an L1 penalty, trained as in Anthropic's April 2024 update: inputs scaled
to a mean squared norm of n_inputs, the penalty on each latent weighted by its decoder column's
norm and warmed up over the first steps, the encoder initialised as the decoder's transpose.
ReLU (not TopK) because openai/sparse_autoencoder's loader LayerNorm-normalises TopK inputs and
Transformer Debugger's does not: a ReLU file means the same thing to both. The input scale is
folded back into the weights, so the saved autoencoders take raw activations.

Latents that stop firing are re-initialised (their encoder row, latent bias and decoder column
only: never `pre_bias` or the activation) during the first half of training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.backends.dictionaries.base import Dictionary
from interpql.backends.gpt2.model import GPT2
from interpql.backends.hooks import HookSession

MLP_KIND = "mlp_post_act"  # [d_mlp], Transformer Debugger's name for it
ATTN_KIND = "resid_delta_attn"  # [d_model]
KIND_LOCATIONS = {MLP_KIND: Location.MLP_POST, ATTN_KIND: Location.ATTN_OUT}
AutoencoderKey = tuple[str, int]  # (kind, layer)


@dataclass(frozen=True)
class AutoencoderConfig:
    mlp_latents: int = 1024
    attn_latents: int = 512
    train_tokens: int = 200_000  # activations per layer, from training-split windows
    eval_tokens: int = 100_000  # held-out activations for the reported metrics
    epochs: int = 4
    batch_size: int = 256
    learning_rate: float = 1e-3  # higher rates sparsify faster but leave many latents dead
    mlp_l1: float = 10.0  # on inputs scaled to mean squared norm n_inputs
    attn_l1: float = 6.0
    l1_warmup_fraction: float = 0.1
    resample_every: int = 250  # steps; latents silent that long are re-initialised
    seed: int = 0


@dataclass(frozen=True)
class AutoencoderMetrics:
    fve: float  # fraction of variance explained, on held-out activations
    mean_l0: float  # mean number of active latents per token
    dead_share: float  # share of latents that never fire on the held-out activations
    n_latents: int
    n_eval_tokens: int
    train_s: float


def layer_activations(
    model: GPT2,
    tokens: torch.Tensor,
    layer: int,
    locations: Mapping[str, Location] = KIND_LOCATIONS,
) -> dict[str, torch.Tensor]:
    """[batch, token] ids -> {name: [batch, token, width]} at `layer`'s `locations`, through
    the model's hooks.

    The blocks after `layer` and the 50k-wide unembedding are skipped, hence the loop here.
    """
    points = {kind: HookPoint(layer, location) for kind, location in locations.items()}
    hooks = HookSession(ForwardRequest(tokens=(), save=frozenset(points.values())))
    positions = torch.arange(tokens.shape[1])
    x = model.tok_embed(tokens) + model.pos_embed(positions)[None]
    for index, block in enumerate(model.xf_layers[: layer + 1]):
        x = block(x, index, hooks)
    return {kind: hooks.activations[point] for kind, point in points.items()}


@torch.inference_mode()
def collect_activations(
    model: GPT2,
    windows: NDArray[np.int64],
    layer: int,
    locations: Mapping[str, Location] = KIND_LOCATIONS,
    *,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """{name: [n_windows * n_ctx, width]} float32 activations over `windows` [n, n_ctx]."""
    parts: dict[str, list[torch.Tensor]] = {kind: [] for kind in locations}
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start : start + batch_size])
        for kind, acts in layer_activations(model, batch, layer, locations).items():
            parts[kind].append(acts.flatten(0, 1).float())
    return {kind: torch.cat(chunks) for kind, chunks in parts.items()}


def train_autoencoder(
    acts: torch.Tensor,
    n_latents: int,
    l1: float,
    config: AutoencoderConfig,
    *,
    seed: int,
    desc: str = "autoencoder",
    progress: bool = True,
) -> SparseAutoencoder:
    """Trains a ReLU autoencoder on `acts` [n, n_inputs]; returns it for raw activations."""
    generator = torch.Generator().manual_seed(seed)
    n, n_inputs = acts.shape
    mean = acts.mean(dim=0)
    scale = math.sqrt(n_inputs / (acts - mean).square().sum(dim=1).mean().item())
    ae = _initialised(n_inputs, n_latents, mean * scale, generator)
    optimizer = torch.optim.Adam(ae.parameters(), lr=config.learning_rate)
    steps = max(1, config.epochs * n // config.batch_size)
    warmup = max(1, int(config.l1_warmup_fraction * steps))
    silent = torch.zeros(n_latents, dtype=torch.long)  # steps since each latent last fired
    order, position = torch.randperm(n, generator=generator), 0
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
        if position + config.batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        x = acts[order[position : position + config.batch_size]] * scale
        position += config.batch_size
        latents, reconstruction = ae(x)
        mse = (reconstruction - x).square().sum(dim=-1).mean()
        penalty = (latents * ae.decoder.weight.norm(dim=0)).sum(dim=-1).mean()
        loss = mse + l1 * min(1.0, (step + 1) / warmup) * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        for group in optimizer.param_groups:  # linear decay over the last fifth
            group["lr"] = config.learning_rate * min(1.0, 5 * (1 - step / steps))
        optimizer.step()
        fired = (latents > 0).any(dim=0)
        silent = torch.where(fired, 0, silent + 1)
        if step < steps // 2 and (step + 1) % config.resample_every == 0:
            dead = silent >= config.resample_every
            _resample(ae, optimizer, dead, x, generator)
            silent[dead] = 0
    _fold_scale(ae, scale)
    _record_statistics(ae, acts, silent, config.batch_size)
    return ae.eval().requires_grad_(False)


def _initialised(
    n_inputs: int, n_latents: int, pre_bias: torch.Tensor, generator: torch.Generator
) -> SparseAutoencoder:
    ae = SparseAutoencoder(n_inputs, n_latents)
    with torch.no_grad():
        directions = torch.randn(n_inputs, n_latents, generator=generator)
        ae.decoder.weight.copy_(0.1 * directions / directions.norm(dim=0))
        ae.encoder.weight.copy_(ae.decoder.weight.t())
        ae.pre_bias.copy_(pre_bias)
    return ae


@torch.no_grad()
def _resample(
    ae: SparseAutoencoder,
    optimizer: torch.optim.Adam,
    dead: torch.Tensor,
    x: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Points dead latents at inputs the autoencoder reconstructs worst (x: scaled inputs)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return
    errors = (ae(x)[1] - x).square().sum(dim=-1)
    picks = torch.multinomial(errors / errors.sum(), n_dead, replacement=True, generator=generator)
    directions = x[picks] - ae.pre_bias
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-6)
    alive_norm = ae.encoder.weight[~dead].norm(dim=1).mean() if bool((~dead).any()) else 0.1
    ae.decoder.weight[:, dead] = 0.1 * directions.t()
    ae.encoder.weight[dead] = directions * float(alive_norm) * 0.2
    ae.latent_bias[dead] = 0.0
    forget_moments(
        optimizer,
        [
            (ae.encoder.weight, (dead,)),
            (ae.latent_bias, (dead,)),
            (ae.decoder.weight, (slice(None), dead)),
        ],
    )


@torch.no_grad()
def forget_moments(
    optimizer: torch.optim.Adam, parts: list[tuple[torch.Tensor, tuple[Any, ...]]]
) -> None:
    """Zeroes Adam's moments of the resampled parts (param, index) of each parameter, so that
    their past gradients do not push the new directions."""
    for param, index in parts:
        for moment in optimizer.state.get(param, {}).values():
            if moment.shape == param.shape:
                moment[index] = 0.0


@torch.no_grad()
def _fold_scale(ae: SparseAutoencoder, scale: float) -> None:
    """From an autoencoder of `scale * x` to one of `x` with the same latents."""
    ae.pre_bias.div_(scale)
    ae.encoder.weight.mul_(scale)
    ae.decoder.weight.div_(scale)


@torch.no_grad()
def _record_statistics(
    ae: SparseAutoencoder, acts: torch.Tensor, silent: torch.Tensor, batch_size: int
) -> None:
    active = torch.zeros(ae.n_latents)
    square = torch.zeros(ae.n_latents, dtype=torch.float64)
    for start in range(0, len(acts), 8 * batch_size):
        latents = ae.encode(acts[start : start + 8 * batch_size])
        active += (latents > 0).sum(dim=0)
        square += latents.double().square().sum(dim=0)
    ae.latents_activation_frequency.copy_(active / len(acts))
    ae.latents_mean_square.copy_(square / len(acts))
    ae.stats_last_nonzero.copy_(silent)


@torch.no_grad()
def evaluate_autoencoder(
    ae: Dictionary,
    acts: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    batch_size: int = 8192,
) -> tuple[float, float, float]:
    """(fraction of the targets' variance explained, mean L0, dead share) on `acts` [n,
    d_in]; the targets are the inputs themselves unless given (a transcoder's)."""
    targets = acts if targets is None else targets
    residual = 0.0
    l0 = 0.0
    fired = torch.zeros(ae.n_latents, dtype=torch.bool)
    for start in range(0, len(acts), batch_size):
        x, y = acts[start : start + batch_size], targets[start : start + batch_size]
        latents, reconstruction = ae(x)
        residual += (reconstruction - y).double().square().sum().item()
        l0 += (latents > 0).sum().item()
        fired |= (latents > 0).any(dim=0)
    total = (targets.double() - targets.double().mean(dim=0)).square().sum().item()
    return 1.0 - residual / total, l0 / len(acts), 1.0 - fired.float().mean().item()


def train_autoencoders(
    model: GPT2,
    train_windows: NDArray[np.int64],
    eval_windows: NDArray[np.int64],
    config: AutoencoderConfig,
    *,
    progress: bool = True,
) -> tuple[dict[AutoencoderKey, SparseAutoencoder], dict[str, dict[str, Any]]]:
    """Both autoencoders of every layer, and their held-out metrics keyed "<kind>/<layer>"."""
    autoencoders: dict[AutoencoderKey, SparseAutoencoder] = {}
    metrics: dict[str, dict[str, Any]] = {}
    widths = {
        MLP_KIND: (config.mlp_latents, config.mlp_l1),
        ATTN_KIND: (config.attn_latents, config.attn_l1),
    }
    for layer in range(model.cfg.n_layers):
        train_acts = collect_activations(model, train_windows, layer)
        eval_acts = collect_activations(model, eval_windows, layer)
        for kind_index, (kind, (n_latents, l1)) in enumerate(widths.items()):
            started = time.perf_counter()
            ae = train_autoencoder(
                train_acts[kind],
                n_latents,
                l1,
                config,
                seed=config.seed + 2 * layer + kind_index,
                desc=f"autoencoder {kind} {layer}",
                progress=progress,
            )
            fve, l0, dead = evaluate_autoencoder(ae, eval_acts[kind])
            autoencoders[kind, layer] = ae
            metrics[f"{kind}/{layer}"] = asdict(
                AutoencoderMetrics(
                    fve=fve,
                    mean_l0=l0,
                    dead_share=dead,
                    n_latents=n_latents,
                    n_eval_tokens=len(eval_acts[kind]),
                    train_s=time.perf_counter() - started,
                )
            )
        del train_acts, eval_acts
    return autoencoders, metrics
