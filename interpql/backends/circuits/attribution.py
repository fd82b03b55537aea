"""An attribution graph's edges: each target's direct effects from every source.

Targets are the logit nodes (the logit minus the mean logit at the last position) and the
active latents (their pre-activation, through their encoder). A target's row of the adjacency
matrix is one backward pass through the linearised model (linearised.py) seeded with the
target's read direction where it reads the residual stream; a batch of targets is one
vectorised backward (autograd's batched gradients), the forward graph built once. The edge
weight from a source is its activation times the target's derivative with respect to it: a
latent's value, an error node's vector, an embedding's vector, each dotted with the gradient.
By linearity a target's value is the sum of its incoming edges plus a constant (the biases).

Node order of the matrix: sources are [latents (by layer, position, index), errors (by layer,
position), embeddings (by position)]; rows are [the selected latents, the logits].
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from interpql.backends.base import AttachedDictionary, Backend
from interpql.backends.circuits import pruning
from interpql.backends.circuits.linearised import Linearisation, linearise
from interpql.errors import UnavailableError

# (rows done, rows in all)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GraphParams:
    max_feature_nodes: int | None = None  # None: every active latent
    max_logits: int = 10
    logit_probability: float = 0.95
    batch_size: int = 64
    # The largest adjacency matrix held in memory; a larger graph answers RESOURCE_EXHAUSTED.
    matrix_budget_bytes: int = 2 << 30


@dataclass
class RawGraph:
    tokens: list[int]
    n_layers: int
    features: torch.Tensor  # [F, 3] long: (layer, position, index) of the selected latents
    activations: torch.Tensor  # [F]
    n_active: int  # active latents before selection
    error_norms: torch.Tensor  # [layer, position]: each error node's vector's norm
    logit_tokens: list[int]
    logit_probabilities: torch.Tensor  # [K]
    logit_values: torch.Tensor  # [K]: the logit minus the mean logit
    adjacency: torch.Tensor  # [F + K, F + layer * position + position]: [target, source]
    last_logits: torch.Tensor  # [vocab] at the last position

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])


class _Sources:
    """Where each source of the linearised pass sits among the matrix's columns."""

    def __init__(self, lin: Linearisation, n_layers: int) -> None:
        self.lin = lin
        self.n_layers = n_layers
        self.offsets: dict[int, int] = {}
        total = 0
        for layer in range(n_layers):
            self.offsets[layer] = total
            total += int(lin.layers[layer].values.shape[0])
        self.n_active = total
        self.error_start = total
        self.token_start = total + n_layers * lin.n_positions
        self.n_columns = self.token_start + lin.n_positions

    def all_features(self) -> torch.Tensor:
        """[n_active, 3] (layer, position, index), in column order."""
        parts = []
        for layer in range(self.n_layers):
            found = self.lin.layers[layer]
            column = torch.full_like(found.positions, layer)
            parts.append(torch.stack([column, found.positions, found.indices], dim=1))
        return torch.cat(parts).cpu()

    def leaves(self) -> list[torch.Tensor]:
        found = [self.lin.layers[layer] for layer in range(self.n_layers)]
        return [self.lin.embedding] + [f.values for f in found] + [f.error for f in found]

    def row(self, grads: tuple[torch.Tensor | None, ...], batch: int) -> torch.Tensor:
        """[batch, n_columns] edge weights from the batched gradients of `leaves()`."""
        lin = self.lin
        n_layers = self.n_layers
        device = lin.embedding.device
        out = torch.zeros(batch, self.n_columns, device=device)

        def given(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(batch, *like.shape, device=device) if grad is None else grad

        embedding = given(grads[0], lin.embedding)  # [batch, 1, position, d]
        out[:, self.token_start :] = (embedding[:, 0] * lin.embedding[0].detach()).sum(-1)
        for layer in range(n_layers):
            found = lin.layers[layer]
            start = self.offsets[layer]
            values = found.values.detach()
            out[:, start : start + values.shape[0]] = given(grads[1 + layer], values) * values
            error = given(grads[1 + n_layers + layer], found.error)
            at = self.error_start + layer * lin.n_positions
            out[:, at : at + lin.n_positions] = (error[:, 0] * found.error[0].detach()).sum(-1)
        return out


def attribute(
    backend: Backend,
    tokens: list[int],
    transcoders: dict[int, AttachedDictionary],
    params: GraphParams,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> RawGraph:
    n_layers = backend.architecture.n_layers
    lin = linearise(backend, tokens, transcoders)
    sources = _Sources(lin, n_layers)
    last = lin.n_positions - 1
    probabilities = lin.logits[last].softmax(-1).detach()
    logit_tokens = _logit_targets(probabilities, params.max_logits, params.logit_probability)
    n_select = sources.n_active
    if params.max_feature_nodes is not None:
        n_select = min(n_select, params.max_feature_nodes)
    n_rows = n_select + len(logit_tokens)
    needed = n_rows * sources.n_columns * 4
    if needed > params.matrix_budget_bytes:
        raise UnavailableError(
            f"this graph's adjacency matrix would take {needed / 2**20:.0f} MiB, more than the "
            f"server's budget of {params.matrix_budget_bytes / 2**20:.0f} MiB: ask for fewer "
            "feature nodes (maxFeatureNodes) or a shorter prompt",
            code="RESOURCE_EXHAUSTED",
        )
    features = sources.all_features()
    done = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        if stop is not None and stop.is_set():
            raise TimeoutError("the attribution graph was stopped")
        if progress is not None:
            progress(done, n_rows)

    # The one matrix of the graph: rows are written into it in place as batches finish.
    adjacency = torch.zeros(n_rows, sources.n_columns)
    logit_rows = adjacency[n_select:]
    logit_rows[:] = _logit_rows(lin, sources, logit_tokens, params.batch_size)
    advance(len(logit_tokens))
    chosen = _select_and_attribute(
        lin,
        sources,
        transcoders,
        features,
        logit_rows,
        probabilities[logit_tokens],
        adjacency[:n_select],
        params.batch_size,
        advance,
    )
    if n_select < sources.n_active:  # the unchosen latents' columns go
        adjacency = adjacency[
            :, torch.cat([chosen, torch.arange(sources.error_start, sources.n_columns)])
        ]
    mean_logit = lin.logits[last].mean()
    return RawGraph(
        tokens=list(tokens),
        n_layers=n_layers,
        features=features[chosen],
        activations=torch.cat(
            [lin.layers[layer].values.detach() for layer in range(n_layers)]
        ).cpu()[chosen],
        n_active=sources.n_active,
        error_norms=torch.stack(
            [lin.layers[layer].error.detach()[0].norm(dim=-1) for layer in range(n_layers)]
        ).cpu(),
        logit_tokens=logit_tokens,
        logit_probabilities=probabilities[logit_tokens].cpu(),
        logit_values=(lin.logits[last, logit_tokens] - mean_logit).detach().cpu(),
        adjacency=adjacency,
        last_logits=lin.logits[last].detach().cpu(),
    )


def _logit_targets(probabilities: torch.Tensor, most: int, mass: float) -> list[int]:
    """The most probable tokens until they hold `mass` of the probability, at most `most`."""
    values, tokens = probabilities.sort(descending=True)
    cumulative = values.cumsum(0)
    needed = int((cumulative < mass).sum()) + 1
    return [int(t) for t in tokens[: max(1, min(most, needed))]]


def _backward(
    lin: Linearisation,
    sources: _Sources,
    seeds: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Edge rows for a batch: `seeds` pairs each target tensor of the pass (a transcoder's
    input, or the final residual) with its [batch, 1, position, width] seed."""
    batch = int(seeds[0][1].shape[0])
    grads = torch.autograd.grad(
        outputs=[tensor for tensor, _ in seeds],
        inputs=sources.leaves(),
        grad_outputs=[seed for _, seed in seeds],
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    return sources.row(grads, batch).cpu()


def _logit_rows(
    lin: Linearisation, sources: _Sources, logit_tokens: list[int], batch_size: int
) -> torch.Tensor:
    last = lin.n_positions - 1
    final = lin.final_residual
    directions = []
    for token in logit_tokens:
        logits = lin.logits[last]
        target = logits[token] - logits.mean()
        (grad,) = torch.autograd.grad(target, final, retain_graph=True)
        directions.append(grad[0, last])
    rows = []
    for start in range(0, len(directions), batch_size):
        chunk = torch.stack(directions[start : start + batch_size])
        seed = torch.zeros(len(chunk), *final.shape, device=final.device)
        seed[:, 0, last] = chunk
        rows.append(_backward(lin, sources, [(final, seed)]))
    return torch.cat(rows)


def _encoder_directions(
    attached: AttachedDictionary, x: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """Each latent's derivative of its pre-activation with respect to the input [n, d_in]:
    the encoder's direction (exactly, for the affine encoders transcoders_of admits)."""
    x = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        pre = attached.dictionary.pre_activation(x)
        (grad,) = torch.autograd.grad(pre.gather(1, indices[:, None]).sum(), x)
    return grad


def _feature_seeds(
    lin: Linearisation,
    transcoders: dict[int, AttachedDictionary],
    targets: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The seeds of latents `targets` [batch, 3] (layer, position, index) for one backward."""
    seeds = []
    for layer in sorted({int(layer) for layer in targets[:, 0]}):
        tensor = lin.inputs[layer]
        mine = (targets[:, 0] == layer).nonzero(as_tuple=True)[0]
        positions = targets[mine, 1].to(tensor.device)
        directions = _encoder_directions(
            transcoders[layer], tensor[0, positions], targets[mine, 2].to(tensor.device)
        )
        seed = torch.zeros(len(targets), *tensor.shape, device=tensor.device)
        seed[mine.to(tensor.device), 0, positions] = directions.to(seed.dtype)
        seeds.append((tensor, seed))
    return seeds


def _select_and_attribute(
    lin: Linearisation,
    sources: _Sources,
    transcoders: dict[int, AttachedDictionary],
    features: torch.Tensor,
    logit_rows: torch.Tensor,
    logit_weights: torch.Tensor,
    feature_rows: torch.Tensor,
    batch_size: int,
    advance: Callable[[int], None],
) -> torch.Tensor:
    """Fills `feature_rows` and returns the columns of the latents chosen: all of them when
    they fit, else the most influential on the logits, estimated from the rows known so far
    and refined batch by batch (circuit tracing's greedy selection)."""
    n_select = feature_rows.shape[0]
    if n_select == sources.n_active:
        # Highest layers first: a batch's backward then starts where most of its rows do.
        order = torch.arange(sources.n_active).flip(0)
        for start in range(0, n_select, batch_size):
            chosen = order[start : start + batch_size]
            seeds = _feature_seeds(lin, transcoders, features[chosen])
            feature_rows[chosen] = _backward(lin, sources, seeds)
            advance(len(chosen))
        return torch.arange(sources.n_active)
    visited = torch.zeros(sources.n_active, dtype=torch.bool)
    chosen_order: list[int] = []
    while len(chosen_order) < n_select:
        known = torch.cat([feature_rows[: len(chosen_order)], logit_rows])
        row_nodes = torch.tensor(chosen_order, dtype=torch.long)
        weights = torch.cat([torch.zeros(len(chosen_order)), logit_weights.cpu()])
        influence = pruning.column_influence(known, row_nodes, weights)[: sources.n_active]
        influence[visited] = -1.0
        # Steps of a batch, or of a 16th of the cap when larger: each step re-estimates the
        # influence over every row known so far.
        take = min(max(batch_size, n_select // 16), n_select - len(chosen_order))
        picked = influence.topk(take).indices
        for start in range(0, take, batch_size):
            part = picked[start : start + batch_size]
            at = len(chosen_order) + start
            seeds = _feature_seeds(lin, transcoders, features[part])
            feature_rows[at : at + len(part)] = _backward(lin, sources, seeds)
        visited[picked] = True
        chosen_order.extend(int(i) for i in picked)
        advance(take)
    # Rows follow the chosen order; reorder both by column so the graph's nodes are sorted.
    chosen = torch.tensor(chosen_order, dtype=torch.long)
    order = chosen.argsort()
    feature_rows[:] = feature_rows[order]
    return chosen[order]
