"""The linearised replacement model of one prompt (Ameisen et al. 2025).

On the prompt's own forward pass, every attention pattern and every LayerNorm scale is held at
its value (detached), and each layer's MLP output is rebuilt as

    mlp_out = sum over active latents a_i * D_i  +  b_dec  +  skip(x)  +  error

where the active latents' values a_i and the error (what the transcoder misses of the real
MLP output) are leaves of the autograd graph, and `x` is the transcoder's input. So from the
leaves on (embeddings, latents, errors) every activation downstream is an affine function of
them: a backward pass from any target gives the direct effect of each source on it, through
attention's values and outputs, the residual stream, the frozen LayerNorms and skip terms,
but never through another latent. With the leaves at their values the pass reproduces the
model's own logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from interpql.backends.base import (
    AttachedDictionary,
    Backend,
    ForwardRequest,
    HookPoint,
    Location,
)
from interpql.backends.hooks import HookSession
from interpql.errors import UnavailableError


@dataclass
class LayerSources:
    """One layer's sources: its active latents and its error node per position."""

    positions: torch.Tensor  # [n_active] long
    indices: torch.Tensor  # [n_active] long: the latent's index in the dictionary
    values: torch.Tensor  # [n_active] leaf: the latents' activations
    error: torch.Tensor  # [1, position, d_model] leaf


@dataclass
class Linearisation:
    tokens: list[int]
    logits: torch.Tensor  # [position, vocab], of the linearised pass (equal to the model's)
    embedding: torch.Tensor  # [1, position, d_model] leaf: token + position embeddings
    inputs: dict[int, torch.Tensor]  # each transcoder's input [1, position, d_in], in the graph
    final_residual: torch.Tensor  # [1, position, d_model], in the graph
    layers: dict[int, LayerSources] = field(default_factory=dict)

    @property
    def n_positions(self) -> int:
        return len(self.tokens)


def transcoders_of(backend: Backend, name: str) -> dict[int, AttachedDictionary]:
    """The set `name` by layer; UnavailableError unless it is a transcoder set covering every
    layer with an encoder affine in its input."""
    found = {a.layer: a for a in backend.dictionaries.values() if a.name == name}
    n_layers = backend.architecture.n_layers
    if not found or not all(a.is_transcoder for a in found.values()):
        raise UnavailableError(
            f"{name!r} is not a transcoder set: an attribution graph replaces each MLP with a "
            "transcoder",
            code="UNSUPPORTED",
        )
    missing = sorted(set(range(n_layers)) - set(found))
    if missing:
        raise UnavailableError(
            f"transcoder set {name!r} has no transcoder in layers {missing}: an attribution "
            "graph replaces every MLP",
            code="UNSUPPORTED",
        )
    for attached in found.values():
        if attached.dictionary.rescales:
            raise UnavailableError(
                f"transcoder set {name!r} normalises its input by the input's own size, which "
                "is not linear: its latents have no exact attribution",
                code="UNSUPPORTED",
            )
    return dict(sorted(found.items()))


class LinearisedSession(HookSession):
    """The hook session of the linearised pass (see the module docstring). `extra` names
    latents {(layer, position, index)} to make sources even where they are 0 (inactive), so
    that an intervention can set them."""

    def __init__(
        self,
        tokens: list[int],
        n_layers: int,
        transcoders: Mapping[int, AttachedDictionary],
        extra: frozenset[tuple[int, int, int]] = frozenset(),
    ) -> None:
        frozen = {HookPoint(layer, Location.RESID_PRE) for layer in range(n_layers)}
        frozen |= {HookPoint(layer, Location.RESID_MID) for layer in range(n_layers)}
        frozen.add(HookPoint(n_layers - 1, Location.RESID_POST))
        super().__init__(
            ForwardRequest(tokens=(tuple(tokens),), frozen_norm_inputs=frozenset(frozen))
        )
        self._n_layers = n_layers
        self._transcoders = transcoders
        self._inputs_at = {a.input_point: a.layer for a in transcoders.values()}
        self._extra = extra
        self.tokens = tokens
        self.embedding: torch.Tensor | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self.final_residual: torch.Tensor | None = None
        self.layers: dict[int, LayerSources] = {}

    def wants(self, point: HookPoint) -> bool:
        location = point.location
        return (
            (location is Location.RESID_PRE and point.layer == 0)
            or location is Location.ATTN_PROBS
            or point in self._inputs_at
            or (location is Location.MLP_OUT and point.layer in self._transcoders)
            or (location is Location.RESID_POST and point.layer == self._n_layers - 1)
        )

    def process(self, point: HookPoint, act: torch.Tensor) -> torch.Tensor:
        location = point.location
        if location is Location.RESID_PRE and point.layer == 0:
            self.embedding = act.detach().clone().requires_grad_(True)
            act = self.embedding
        if location is Location.ATTN_PROBS:
            act = act.detach()
        if point in self._inputs_at:
            self.inputs[self._inputs_at[point]] = act
        if location is Location.MLP_OUT and point.layer in self._transcoders:
            act = self._replaced_mlp(point.layer, act)
        if location is Location.RESID_POST and point.layer == self._n_layers - 1:
            self.final_residual = act
        return act

    def _replaced_mlp(self, layer: int, mlp_out: torch.Tensor) -> torch.Tensor:
        dictionary = self._transcoders[layer].dictionary
        x = self.inputs[layer].float()
        with torch.no_grad():
            latents = dictionary.encode(x)[0]  # [position, n_latents]
            error = mlp_out.detach().float() - dictionary.decode(latents[None], x.detach())
        chosen = latents != 0
        for at_layer, position, index in self._extra:
            if at_layer == layer:
                chosen[position, index] = True
        positions, indices = chosen.nonzero(as_tuple=True)
        values = latents[positions, indices].clone().requires_grad_(True)
        error = error.clone().requires_grad_(True)
        self.layers[layer] = LayerSources(positions, indices, values, error)
        directions = dictionary.decoder_directions()[indices]  # [n_active, d_out]
        written = torch.zeros_like(error[0]).index_add(0, positions, values[:, None] * directions)
        out = written[None] + dictionary.decoded_bias(x).detach() + error
        skip = dictionary.skip(x)
        if skip is not None:
            out = out + skip
        return out.to(mlp_out.dtype)


def linearise(
    backend: Backend,
    tokens: list[int],
    transcoders: Mapping[int, AttachedDictionary],
    extra: frozenset[tuple[int, int, int]] = frozenset(),
) -> Linearisation:
    """Runs the linearised pass over one prompt; its graph stays alive for the backward passes."""
    session = LinearisedSession(tokens, backend.architecture.n_layers, transcoders, extra)
    ids = torch.tensor([tokens], dtype=torch.long, device=backend.device)
    with torch.enable_grad():
        logits = backend.session_forward(ids, session, True)
    if session.embedding is None or session.final_residual is None:
        raise RuntimeError("the backend's pass skipped the linearised session's hook points")
    return Linearisation(
        tokens=list(tokens),
        logits=logits[0].float(),
        embedding=session.embedding,
        inputs=session.inputs,
        final_residual=session.final_residual,
        layers=session.layers,
    )


def linear_change(
    lin: Linearisation, changes: Mapping[tuple[int, int, int], float], position: int
) -> torch.Tensor:
    """How the logits at `position` move when latents change by `changes` {(layer, position,
    index): delta} with everything else held (attention patterns, LayerNorm scales, errors,
    the other latents): the linearised model's Jacobian times the change, exact since the
    model is affine in its sources. Each latent must be a source of `lin` (linearise's
    `extra`). Forward-mode by two reverse passes: J·d = d/du (Jᵀu)·d."""
    leaves, deltas = [], []
    for (layer, at, index), delta in changes.items():
        found = lin.layers[layer]
        where = ((found.positions == at) & (found.indices == index)).nonzero(as_tuple=True)[0]
        leaves.append(found.values)
        change = torch.zeros_like(found.values)
        change[where] = delta
        deltas.append(change)
    logits = lin.logits[position]
    with torch.enable_grad():
        probe = torch.zeros_like(logits, requires_grad=True)
        transposed = torch.autograd.grad(
            logits, leaves, grad_outputs=probe, create_graph=True, retain_graph=True
        )
        (moved,) = torch.autograd.grad(transposed, probe, grad_outputs=deltas, retain_graph=True)
    return moved
