"""Trains the demo's SAELens-format dictionaries: per layer, a TopK SAE on the residual stream
after the layer (`hook_resid_post`) and a skip transcoder from the MLP's input
(`mlp.hook_in`, the LayerNorm's output) to its output (`hook_mlp_out`).

The TopK SAE subtracts its decoder bias from the input (apply_b_dec_to_input) and keeps the k
largest pre-activations; its decoder rows are held at unit norm. The transcoder's latents are
ReLU with an L1 penalty weighted by decoder norms (warmed up), plus a linear skip path from
input to output, as skip transcoders are trained for circuit tracing. Inputs and outputs are
scaled to a mean squared norm of their width while training, and the scales are folded back
into the weights, so the saved files take raw activations. Latents silent for
`resample_every` steps are re-pointed at badly reconstructed examples in the first half of
training (`resample_until`), and the TopK SAEs add Gao et al.'s auxiliary loss (the dead
latents' own top k reconstructing what the live ones miss).
Everything is seeded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from tqdm import tqdm

from interpql.backends.base import ForwardRequest, HookPoint, Intervention, Location
from interpql.backends.dictionaries.loading import hook_name
from interpql.backends.dictionaries.saelens import (
    SaeLensDictionary,
    parse_config,
    read_saelens,
    saelens_config,
    write_saelens,
)
from interpql.backends.gpt2.backend import NativeGPT2Backend
from interpql.backends.gpt2.model import GPT2
from interpql.demo.artifacts import DICTIONARY_DIR
from interpql.demo.train_autoencoders import (
    collect_activations,
    evaluate_autoencoder,
    forget_moments,
)

RESIDUAL_SAES = "res-sae"  # the sets' names: the node kinds of their latents
TRANSCODERS = "transcoder"


@dataclass(frozen=True)
class DictionaryConfig:
    sae_latents: int = 256
    sae_k: int = 16
    transcoder_latents: int = 512
    transcoder_l1: float = 1.0  # on inputs and outputs scaled to mean squared norm d_model
    train_tokens: int = 200_000
    eval_tokens: int = 100_000
    epochs: int = 4
    batch_size: int = 256
    learning_rate: float = 1e-3
    l1_warmup_fraction: float = 0.1
    resample_every: int = 250
    resample_until: float = 0.5  # share of the steps during which silent latents are resampled
    aux_k: int = 32  # TopK: dead latents that reconstruct the error (Gao et al.'s AuxK)
    aux_coefficient: float = 1 / 32
    loss_windows: int = 64  # held-out windows for the replaced model's loss
    seed: int = 100


def set_folder(root: Path, name: str, layer: int) -> Path:
    return root / DICTIONARY_DIR / name / f"layer_{layer}"


# --- activations -------------------------------------------------------------------------------


POINTS = {
    "resid_post": Location.RESID_POST,
    "mlp_in": Location.MLP_IN,
    "mlp_out": Location.MLP_OUT,
}


def _scale(acts: torch.Tensor) -> float:
    """The factor that brings `acts` [n, d] to a mean squared norm of d."""
    return math.sqrt(acts.shape[1] / acts.square().sum(dim=1).mean().item())


# --- training ----------------------------------------------------------------------------------


class _Trainable(torch.nn.Module):
    """A dictionary's weights while it trains, in SAELens's layout (W_enc [d_in, n])."""

    def __init__(self, d_in: int, d_out: int, n: int, generator: torch.Generator, skip: bool):
        super().__init__()
        directions = torch.randn(n, d_out, generator=generator)
        self.W_dec = torch.nn.Parameter(directions / directions.norm(dim=1, keepdim=True))
        self.W_enc = torch.nn.Parameter(
            self.W_dec.detach().T.clone() if d_in == d_out else 0.1 * torch.randn(d_in, n)
        )
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        self.W_skip = torch.nn.Parameter(torch.zeros(d_out, d_in)) if skip else None


def _train(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    n_latents: int,
    config: DictionaryConfig,
    *,
    topk: int | None,
    seed: int,
    desc: str,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Trains on scaled inputs and targets; returns SAELens tensors for raw activations."""
    generator = torch.Generator().manual_seed(seed)
    n, d_in = inputs.shape
    d_out = targets.shape[1]
    s_in, s_out = _scale(inputs), _scale(targets)
    sae = topk is not None  # an SAE: the target is its input, the decoder bias subtracted
    net = _Trainable(d_in, d_out, n_latents, generator, skip=not sae)
    with torch.no_grad():
        net.b_dec.copy_(targets.mean(dim=0) * s_out)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    steps = max(1, config.epochs * n // config.batch_size)
    warmup = max(1, int(config.l1_warmup_fraction * steps))
    silent = torch.zeros(n_latents, dtype=torch.long)
    order, position = torch.randperm(n, generator=generator), 0
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
        if position + config.batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        batch = order[position : position + config.batch_size]
        position += config.batch_size
        x, y = inputs[batch] * s_in, targets[batch] * s_out
        pre = (x - net.b_dec if sae else x) @ net.W_enc + net.b_enc
        if topk is not None:
            top = torch.topk(pre, topk, dim=-1)
            latents = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        else:
            latents = F.relu(pre)
        out = latents @ net.W_dec + net.b_dec
        if net.W_skip is not None:
            out = out + x @ net.W_skip.T
        loss: torch.Tensor = (out - y).square().sum(dim=-1).mean()
        dead = silent >= config.resample_every
        if topk is not None and bool(dead.any()):
            # AuxK: the dead latents' own top k reconstruct what the live ones miss.
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            aux_top = torch.topk(aux_pre, min(config.aux_k, int(dead.sum())), dim=-1)
            aux = torch.zeros_like(pre).scatter(-1, aux_top.indices, F.relu(aux_top.values))
            error = (y - out).detach()
            aux_loss = (aux @ net.W_dec - error).square().sum(dim=-1).mean()
            loss = loss + config.aux_coefficient * aux_loss
        if topk is None:
            penalty = (latents * net.W_dec.norm(dim=1)).sum(dim=-1).mean()
            loss = loss + config.transcoder_l1 * min(1.0, (step + 1) / warmup) * penalty
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for group in optimizer.param_groups:  # linear decay over the last fifth
            group["lr"] = config.learning_rate * min(1.0, 5 * (1 - step / steps))
        optimizer.step()
        with torch.no_grad():
            if sae:
                net.W_dec.div_(net.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            silent = torch.where((latents > 0).any(dim=0), 0, silent + 1)
            if step < config.resample_until * steps and (step + 1) % config.resample_every == 0:
                dead = silent >= config.resample_every
                _resample(net, optimizer, dead, x, y, out, generator)
                silent[dead] = 0
    return _folded(net, s_in, s_out, sae)


@torch.no_grad()
def _resample(
    net: _Trainable,
    optimizer: torch.optim.Adam,
    dead: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Points dead latents at the batch's worst-reconstructed examples."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return
    errors = (out - y).square().sum(dim=-1)
    picks = torch.multinomial(errors / errors.sum(), n_dead, replacement=True, generator=generator)
    residual = y[picks] - out[picks]
    residual = residual / residual.norm(dim=1, keepdim=True).clamp_min(1e-6)
    reads = x[picks] / x[picks].norm(dim=1, keepdim=True).clamp_min(1e-6)
    alive = net.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else 0.1
    net.W_dec[dead] = residual
    net.W_enc[:, dead] = reads.T * float(alive) * 0.2
    net.b_enc[dead] = 0.0
    forget_moments(
        optimizer, [(net.W_dec, (dead,)), (net.W_enc, (slice(None), dead)), (net.b_enc, (dead,))]
    )


@torch.no_grad()
def _folded(net: _Trainable, s_in: float, s_out: float, sae: bool) -> dict[str, torch.Tensor]:
    """The tensors of a dictionary of raw activations with the same latents: x_s = s_in x in,
    out = out_s / s_out. An SAE has s_in == s_out (its input is its target), so its raw decoder
    bias b_dec / s is also what its raw input loses: (s x - b) W = (x - b / s) (s W)."""
    tensors = {
        "W_enc": net.W_enc * s_in,
        "b_enc": net.b_enc.clone(),
        "W_dec": net.W_dec / s_out,
        "b_dec": net.b_dec / s_out,
    }
    if net.W_skip is not None:
        tensors["W_skip"] = net.W_skip * (s_in / s_out)
    return {name: t.detach().clone().contiguous() for name, t in tensors.items()}


# --- evaluation --------------------------------------------------------------------------------


def replaced_losses(
    backend: NativeGPT2Backend, windows: NDArray[np.int64], name: str = TRANSCODERS
) -> dict[str, float]:
    """Mean next-token loss over `windows`: of the model, of the model with every MLP replaced
    by its transcoder (no error term), and with every MLP's output zero; and the share of the
    loss the transcoders recover, (zero - replaced) / (zero - original)."""
    layers = range(backend.architecture.n_layers)
    latents = frozenset(HookPoint(layer, Location.LATENTS, name) for layer in layers)
    zero = tuple(
        Intervention(point=HookPoint(layer, Location.MLP_OUT), value=0.0) for layer in layers
    )
    totals = {"original": 0.0, "replaced": 0.0, "zero_ablated": 0.0}
    for start in range(0, len(windows), 8):
        rows = tuple(tuple(int(t) for t in row) for row in windows[start : start + 8])
        for key, request in (
            ("original", ForwardRequest(tokens=rows)),
            ("replaced", ForwardRequest(tokens=rows, save=latents, autoencoder_error_term=False)),
            ("zero_ablated", ForwardRequest(tokens=rows, interventions=zero)),
        ):
            totals[key] += float(backend.forward(request).next_token_loss.double().sum())
    losses = {key: value / len(windows) for key, value in totals.items()}
    recovered = (losses["zero_ablated"] - losses["replaced"]) / (
        losses["zero_ablated"] - losses["original"]
    )
    return losses | {"loss_recovered": recovered, "windows": len(windows)}


# --- the stage ---------------------------------------------------------------------------------


def train_dictionaries(
    model: GPT2,
    out_dir: Path,
    train_windows: NDArray[np.int64],
    eval_windows: NDArray[np.int64],
    loss_windows: NDArray[np.int64],
    config: DictionaryConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains, writes (SAELens folders under `out_dir/dictionaries/`) and evaluates both sets;
    returns their metrics."""
    metrics: dict[str, Any] = {RESIDUAL_SAES: {}, TRANSCODERS: {}}
    d_model = model.cfg.d_model
    for layer in range(model.cfg.n_layers):
        train = collect_activations(model, train_windows, layer, POINTS)
        held = collect_activations(model, eval_windows, layer, POINTS)
        for name, inputs, targets, n_latents, topk, config_json in (
            (
                RESIDUAL_SAES,
                "resid_post",
                "resid_post",
                config.sae_latents,
                config.sae_k,
                saelens_config(
                    "topk",
                    d_model,
                    config.sae_latents,
                    hook_name(layer, Location.RESID_POST),
                    model_name="tiny-stdlib",
                    apply_b_dec_to_input=True,
                    k=config.sae_k,
                    dtype="float16",
                ),
            ),
            (
                TRANSCODERS,
                "mlp_in",
                "mlp_out",
                config.transcoder_latents,
                None,
                saelens_config(
                    "skip_transcoder",
                    d_model,
                    config.transcoder_latents,
                    hook_name(layer, Location.MLP_IN),
                    d_out=d_model,
                    hook_name_out=hook_name(layer, Location.MLP_OUT),
                    model_name="tiny-stdlib",
                    dtype="float16",
                ),
            ),
        ):
            started = time.perf_counter()
            tensors = _train(
                train[inputs],
                train[targets],
                n_latents,
                config,
                topk=topk,
                seed=config.seed + 2 * layer + (name == TRANSCODERS),
                desc=f"{name} {layer}",
                progress=progress,
            )
            half = {key: value.half() for key, value in tensors.items()}
            write_saelens(set_folder(out_dir, name, layer), config_json, half)
            saved = SaeLensDictionary(parse_config(config_json), half).eval()
            fve, l0, dead = evaluate_autoencoder(saved, held[inputs], held[targets])
            metrics[name][str(layer)] = {
                "fve": fve,
                "mean_l0": l0,
                "dead_share": dead,
                "n_latents": n_latents,
                "n_eval_tokens": len(held[inputs]),
                "train_s": time.perf_counter() - started,
            }
        del train, held
    backend = NativeGPT2Backend(model)
    for layer in range(model.cfg.n_layers):
        folder = set_folder(out_dir, TRANSCODERS, layer)
        backend.attach_dictionary(
            TRANSCODERS, layer, read_saelens(str(folder)), Location.MLP_IN, Location.MLP_OUT
        )
    with torch.inference_mode():
        metrics["transcoder_losses"] = replaced_losses(backend, loss_windows)
    return metrics
