"""What one pass computes for one input: what fields ask of a pass (`Needs`), and one row of a
backend's `ForwardResult` turned into numpy arrays (`RowResult`), on the worker thread: node
scores per layer and kind, head pairs, patterns, LayerNorm scales and the bias terms."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from interpql.backends.base import ForwardResult, HookPoint, Location, LogitPositions
from interpql.backends.losses import last_logits_loss, reads_every_position, spec_loss
from interpql.backends.node_kinds import AttentionHeads
from interpql.loaders import tracing
from interpql.loaders.analysis import (
    NodeScores,
    bias_effects,
    head_pair_scores,
    node_scores,
    token_pair_attribution,
)
from interpql.loaders.registry import ModelEntry
from interpql.specs import InferenceSpec

__all__ = [
    "LayerKind",
    "LogitPositions",
    "Needs",
    "RowResult",
    "objective_needs",
    "row_result",
]

LayerKind = tuple[int, str]  # (layer, kind name)


@dataclass(frozen=True)
class Needs:
    """What fields need of a pass. Gradients are asked for only by fields that need them, and
    only then does the pass include a backward pass."""

    layer_kinds: frozenset[LayerKind] = frozenset()
    pattern_layers: frozenset[int] = frozenset()
    gradient_layer_kinds: frozenset[LayerKind] = frozenset()
    stream_gradient: bool = False  # the loss's gradient where direct effects are read
    # Layers whose heads are wanted per (query, key) pair, with a backward pass (node table).
    pair_layers: frozenset[int] = frozenset()
    # Stream points whose LayerNorm scale is wanted, per position (what a node there reads).
    norm_scales: frozenset[HookPoint] = frozenset()
    # The final LayerNorm bias's share of the loss, per position (see RowResult).
    final_norm_bias: bool = False
    # Each position's next-token loss (RowResult.token_losses).
    token_losses: bool = False
    # Positions (from 0) whose whole vocabulary of logits is kept (RowResult.position_logits):
    # predictions and token probabilities at a token other than the last.
    logit_rows: frozenset[int] = frozenset()
    # Each layer's residual-stream norm after attention and after the MLP, per position.
    stream_norms: bool = False
    # Where logits are read: the last position for top predictions and last-token losses,
    # every position for the next-token loss; the pass unembeds only there.
    logits: LogitPositions = LogitPositions.NONE

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.layer_kinds | other.layer_kinds,
            self.pattern_layers | other.pattern_layers,
            self.gradient_layer_kinds | other.gradient_layer_kinds,
            self.stream_gradient or other.stream_gradient,
            self.pair_layers | other.pair_layers,
            self.norm_scales | other.norm_scales,
            self.final_norm_bias or other.final_norm_bias,
            self.token_losses or other.token_losses,
            self.logit_rows | other.logit_rows,
            self.stream_norms or other.stream_norms,
            max(self.logits, other.logits),
        )

    @property
    def logit_positions(self) -> LogitPositions:
        """Where the pass must unembed for these needs."""
        if self.token_losses or self.final_norm_bias or self.logit_rows:
            return LogitPositions.ALL
        return self.logits

    def covered_by(self, other: Needs) -> bool:
        return (self | other) == other

    @property
    def backward(self) -> bool:
        return (
            bool(self.gradient_layer_kinds)
            or self.stream_gradient
            or bool(self.pair_layers)
            or self.final_norm_bias
        )

    def all_layer_kinds(self) -> frozenset[LayerKind]:
        return self.layer_kinds | self.gradient_layer_kinds

    def hook_points(self, entry: ModelEntry) -> frozenset[HookPoint]:
        backend = entry.require_backend()
        points = set()
        for layer, name in self.all_layer_kinds():
            kind = entry.kind(name)
            points.add(kind.point(layer))
            points |= {HookPoint(layer, loc) for loc in kind.extra_locations(backend, layer)}
        for layer in self.pattern_layers | self.pair_layers:
            points |= {HookPoint(layer, Location.ATTN_PROBS), HookPoint(layer, Location.ATTN_V)}
        points |= {HookPoint(layer, Location.ATTN_Z) for layer in self.pair_layers}
        if self.stream_norms:
            points |= set(stream_norm_points(entry))
        return frozenset(points | self.norm_scales)

    def gradient_points(self, entry: ModelEntry, stream_point: HookPoint) -> frozenset[HookPoint]:
        """`stream_point`: where direct effects are read (the final residual stream, or where a
        traced node reads it)."""
        points = {entry.kind(kind).point(layer) for layer, kind in self.gradient_layer_kinds}
        points |= {HookPoint(layer, Location.ATTN_Z) for layer in self.pair_layers}
        if self.stream_gradient or self.pair_layers:
            points.add(stream_point)
        return frozenset(points)


def stream_norm_points(entry: ModelEntry) -> list[HookPoint]:
    """Where residualNorms reads the stream: after each layer's attention and its MLP."""
    locations = entry.require_backend().locations
    return [
        HookPoint(layer, location)
        for layer in range(entry.architecture.n_layers)
        for location in (Location.RESID_MID, Location.RESID_POST)
        if location in locations
    ]


def objective_needs(spec: InferenceSpec) -> Needs:
    """What the input's loss (RowResult.objective) reads of a pass without a backward."""
    every = reads_every_position(spec.loss)
    return Needs(logits=LogitPositions.ALL if every else LogitPositions.LAST)


@dataclass
class RowResult:
    """What one pass computed for one input (one row of the batch), as numpy arrays."""

    spec: InferenceSpec
    needs: Needs
    next_token_loss: float | None  # None for one-token prompts, and unless logits were ALL
    last_logits: np.ndarray | None  # [vocab] at the last position, unless logits were NONE
    # -log p(token t+1 | tokens <= t) at each position t, nan at the last (`Needs.token_losses`).
    token_losses: np.ndarray | None = None
    # [vocab] logits at each of `Needs.logit_rows`.
    position_logits: dict[int, np.ndarray] = field(default_factory=dict)
    # [position] the residual stream's L2 norm at each of `stream_norm_points` (Needs).
    stream_norms: dict[HookPoint, np.ndarray] = field(default_factory=dict)
    scores: dict[LayerKind, NodeScores] = field(default_factory=dict)
    patterns: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    pair_attributions: dict[int, np.ndarray] = field(default_factory=dict)  # [query, head, key]
    # Per (query, key, head) element of a layer's heads (`Needs.pair_layers`).
    pairs: dict[int, NodeScores] = field(default_factory=dict)
    # The direct effect per position of what each layer-kind's side writes besides its nodes.
    bias_effects: dict[LayerKind, dict[str, np.ndarray]] = field(default_factory=dict)
    # The values of the heads of `pattern_layers` and `pair_layers`, [key, head, d_head].
    head_values: dict[int, np.ndarray] = field(default_factory=dict)
    # LayerNorm scales sqrt(variance + eps) at `Needs.norm_scales`, [position].
    norm_scales: dict[HookPoint, np.ndarray] = field(default_factory=dict)
    # What the final LayerNorm's bias adds to the loss through the logits, b . (W_U dL/dlogits)
    # per position: with the nodes' and biases' direct effects (FROZEN), the whole of a loss
    # linear in the logits. None unless asked (`Needs.final_norm_bias`) or with a trace.
    final_norm_bias_effect: np.ndarray | None = None
    objective: float = 0.0  # the input's loss, whether or not a backward pass ran
    elapsed_s: float = 0.0
    memory_before_bytes: int = 0
    memory_after_bytes: int = 0
    batch_size: int = 1  # rows of the pass that computed it
    from_cache: bool = False  # answered from an earlier request's pass: none ran for it now

    def activations(self, layer: int, kind: str) -> np.ndarray:
        """[position, node]: each node's one number per token (NodeKind.per_token_value)."""
        values = self.scores[(layer, kind)].per_token
        assert values is not None
        return values


def row_result(
    entry: ModelEntry,
    result: ForwardResult,
    row: int,
    spec: InferenceSpec,
    needs: Needs,
    stream_point: HookPoint,
    batch_size: int,
) -> RowResult:
    """Row `row` of `result`; `stream_point`: where direct effects are read."""
    part = _RowPart(entry, result, row, stream_point, needs)
    done = RowResult(
        spec=spec,
        needs=needs,
        next_token_loss=None,
        last_logits=(
            None
            if result.logit_positions is LogitPositions.NONE
            else result.last_logits(row).float().cpu().numpy()
        ),
        pairs={layer: part.pair_scores(layer) for layer in needs.pair_layers},
        norm_scales={point: part.norm_scale(point) for point in needs.norm_scales},
        objective=_objective(result, row, spec),
        elapsed_s=result.elapsed_s,
        memory_before_bytes=result.memory_before_bytes,
        memory_after_bytes=result.memory_after_bytes,
        batch_size=batch_size,
    )
    loss = float(result.next_token_loss[row])
    done.next_token_loss = None if np.isnan(loss) else loss
    if needs.token_losses:
        done.token_losses = _token_losses(result, row, spec)
    for position in needs.logit_rows:
        done.position_logits[position] = _numpy_of(result.logits[row, position])
    if needs.stream_norms:
        for point in stream_norm_points(entry):
            done.stream_norms[point] = _numpy_of(part.saved(point).float().norm(dim=-1))
    for layer, kind in needs.all_layer_kinds():
        done.scores[(layer, kind)], biases = part.node_scores(layer, kind)
        if biases is not None:
            if not spec.keep_error_term:
                # The ranked dictionaries are spliced in without it: the stream holds none.
                biases.pop("dictionary error", None)
            done.bias_effects[(layer, kind)] = biases
    for layer in needs.pattern_layers:
        done.patterns[layer], attribution = part.pattern(layer)
        if attribution is not None:
            done.pair_attributions[layer] = attribution
    for layer in needs.pattern_layers | needs.pair_layers:
        point = HookPoint(layer, Location.ATTN_V)
        if point in result.activations:
            done.head_values[layer] = _numpy_of(part.saved(point))
    if needs.final_norm_bias and spec.trace is None:
        done.final_norm_bias_effect = _final_norm_bias_effect(entry, result, row, spec)
    return done


class _RowPart:
    """One row of a result: its real positions, and the gradient where direct effects are
    read (zero for writers whose write does not reach that point)."""

    def __init__(
        self,
        entry: ModelEntry,
        result: ForwardResult,
        row: int,
        stream_point: HookPoint,
        needs: Needs,
    ) -> None:
        self.entry, self.result, self.row = entry, result, row
        self.n_tok = result.lengths[row]
        self.stream_point = stream_point
        self.stream_grad: torch.Tensor | None = None
        if needs.stream_gradient or needs.pair_layers:
            self.stream_grad = result.gradients[stream_point][row, : self.n_tok].float()

    def saved(self, point: HookPoint) -> torch.Tensor:
        return _row_part(self.result, point, self.row, self.n_tok)

    def reached(self, layer: int, kind: str) -> torch.Tensor | None:
        if self.stream_grad is None:
            return None
        if tracing.writes_reach(self.entry, layer, kind, self.stream_point):
            return self.stream_grad
        return torch.zeros_like(self.stream_grad)

    def node_scores(self, layer: int, kind: str) -> tuple[NodeScores, dict[str, np.ndarray] | None]:
        """The kind's values in `layer`, and the direct effects of its side's bias terms."""
        node_kind = self.entry.kind(kind)
        point = node_kind.point(layer)
        backend = self.entry.require_backend()
        saved = {
            loc: self.saved(HookPoint(layer, loc))
            for loc in node_kind.extra_locations(backend, layer)
        }
        saved[point.location] = self.saved(point)
        grad = self.result.gradients.get(point)
        reached = self.reached(layer, kind)
        scores = node_scores(
            self.entry,
            layer,
            kind,
            saved[point.location],
            None if grad is None else grad[self.row, : self.n_tok],
            reached,
            saved,
        )
        if reached is None:
            return scores, None
        return scores, bias_effects(self.entry, layer, kind, reached, saved)

    def pair_scores(self, layer: int) -> NodeScores:
        reached = self.reached(layer, AttentionHeads.name)
        assert reached is not None
        z_grad = self.result.gradients[HookPoint(layer, Location.ATTN_Z)]
        return head_pair_scores(
            self.entry,
            layer,
            self.saved(HookPoint(layer, Location.ATTN_PROBS)),
            self.saved(HookPoint(layer, Location.ATTN_V)),
            z_grad[self.row, : self.n_tok],
            reached,
        )

    def pattern(self, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A layer's attention pattern [query, head, key], and its token-pair attribution
        where values were saved."""
        probs = self.saved(HookPoint(layer, Location.ATTN_PROBS))
        values = self.result.activations.get(HookPoint(layer, Location.ATTN_V))
        attribution = None
        if values is not None:
            attribution = token_pair_attribution(
                self.entry, layer, probs, values[self.row, : self.n_tok]
            )
        return _numpy_of(probs), attribution

    def norm_scale(self, point: HookPoint) -> np.ndarray:
        """The LayerNorm scale sqrt(variance + eps) at each position of the stream at `point`
        (what a LayerNorm reading it divides by)."""
        stream = self.saved(point).float()
        eps = self.entry.architecture.norm_eps
        return _numpy_of(stream.var(dim=-1, unbiased=False).add(eps).sqrt())


def _row_part(result: ForwardResult, point: HookPoint, row: int, n_tok: int) -> torch.Tensor:
    """One row's real positions of a saved activation (patterns: real keys too)."""
    act = result.activations[point][row, :n_tok]
    return act[..., :n_tok] if point.location is Location.ATTN_PROBS else act


def _final_norm_bias_effect(
    entry: ModelEntry, result: ForwardResult, row: int, spec: InferenceSpec
) -> np.ndarray | None:
    """b . (W_U c_t) per position t, c = dL/dlogits (autograd of the loss on the logits alone);
    None where the final norm has no bias."""
    backend = entry.require_backend()
    try:
        bias_logits = backend.weight("ln_final.b") @ backend.weight("W_U")  # [vocab]
    except KeyError:
        return None
    n_tok = len(spec.tokens)
    with torch.inference_mode(False), torch.enable_grad():
        logits = result.logits[row : row + 1, :n_tok].float().clone().requires_grad_(True)
        device = logits.device
        loss = spec_loss(
            spec.loss,
            logits,
            torch.tensor([spec.tokens], device=device),
            torch.tensor([n_tok], device=device),
        )
        (per_logit,) = torch.autograd.grad(loss.sum(), logits)  # [1, position, vocab]
    return _numpy_of(per_logit[0] @ bias_logits.to(device).float())


def _numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _token_losses(result: ForwardResult, row: int, spec: InferenceSpec) -> np.ndarray:
    """[position] -log softmax(logits[t])[token t+1], nan at the last position."""
    n_tok = len(spec.tokens)
    logits = result.logits[row, : n_tok - 1].float()
    following = torch.tensor(spec.tokens[1:], dtype=torch.long, device=logits.device)
    picked = logits.log_softmax(-1).gather(-1, following[:, None])[:, 0]
    losses = np.full(n_tok, np.nan)
    losses[: n_tok - 1] = -picked.double().cpu().numpy()
    return losses


def _objective(result: ForwardResult, row: int, spec: InferenceSpec) -> float:
    """The input's loss; nan where the pass unembedded too little to compute it (no field
    asked for it)."""
    if result.backward_loss is not None:
        return float(result.backward_loss[row])
    if reads_every_position(spec.loss):
        return float(result.next_token_loss[row])  # nan unless the logits were ALL
    if result.logit_positions is LogitPositions.NONE:
        return float("nan")
    return float(last_logits_loss(spec.loss, result.last_logits(row)[None])[0])
