"""The node-kind table: every kind of node, and everything that differs between kinds, here.

A node is one unit of analysis in one layer (`specs.NodeRef`). Its kind says

    location     where each node's per-token value lives: what is saved for it, what an
                 ablation sets and what a gradient is taken of
    side         which residual-stream write it belongs to (attention or MLP, or the stream
                 itself), hence where it reads the stream, where its write enters it (steering
                 adds there) and which writers' direct effects reach what it reads
    count        how many nodes of the kind a layer has
    directions   what one unit of a node's value adds to the residual stream
    analysis     its activation, write norm, direct effect and act x grad from its value
    traces       how the backward pass starts at one of its nodes

Everything else reads this table: adding a kind is adding one class (or one instance of an
existing class) and one entry in `TABLE`. Kinds are looked up by the name node ids carry.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import Enum

import torch

from interpql.backends.base import (
    Architecture,
    AutoencoderInput,
    Backend,
    HookPoint,
    Intervention,
    Location,
    Trace,
)
from interpql.specs import AttentionTrace


class Side(Enum):
    """Where in a layer a kind's write enters the residual stream, as (reads, writes, order):
    the stream point its nodes read, the location of the write, and the write's rank within
    the layer (attention writes before the MLP reads)."""

    ATTENTION = (Location.RESID_PRE, Location.ATTN_OUT, 1)
    MLP = (Location.RESID_MID, Location.MLP_OUT, 2)
    RESIDUAL = (Location.RESID_POST, Location.RESID_POST, 2)

    @property
    def reads(self) -> Location:
        return self.value[0]

    @property
    def writes(self) -> Location:
        return self.value[1]

    @property
    def order(self) -> int:
        return self.value[2]


# Where each residual-stream point falls within a layer, in the order of `Side.order`.
_STREAM_ORDER = {Location.RESID_PRE: 0, Location.RESID_MID: 1, Location.RESID_POST: 2}


@dataclass(frozen=True)
class Values:
    """A layer's nodes of one kind on one prompt, [position, node] each."""

    activation: torch.Tensor
    write_norm: torch.Tensor
    direct_effect: torch.Tensor | None = None  # with a gradient at the stream's read point
    act_times_grad: torch.Tensor | None = None  # with the gradient at `location`


class NodeKind(abc.ABC):
    name: str
    side: Side
    location: Location
    # Residual channels are the stream itself: they write no direction to compare or lens.
    has_write_direction: bool = True
    # Attention heads: a pattern per node, and traces through their score (Q, K, QK) or
    # their write from one key (V) rather than through their value.
    attends: bool = False

    @abc.abstractmethod
    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        """Nodes of this kind in `layer` (0 where there are none, e.g. no dictionary there)."""

    @abc.abstractmethod
    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        """What one unit of each node's value adds to the residual stream: [node, d_model]."""

    def read_direction(self, backend: Backend, layer: int, index: int) -> torch.Tensor | None:
        """The residual-stream direction a node reads, [d_model]; None where it has none."""
        return None

    def values(
        self,
        act: torch.Tensor,
        directions: torch.Tensor,
        grad: torch.Tensor | None,
        stream_grad: torch.Tensor | None,
    ) -> Values:
        """`act` [position, node] as saved at `location` and its gradient there; `stream_grad`
        [position, d_model]: the gradient where direct effects are read."""
        act = act.float()
        return Values(
            activation=act,
            write_norm=act.abs() * directions.norm(dim=-1),
            direct_effect=None if stream_grad is None else act * (stream_grad @ directions.T),
            act_times_grad=None if grad is None else act * grad.float(),
        )

    def point(self, layer: int) -> HookPoint:
        return HookPoint(layer, self.location)

    def ablation(
        self, layer: int, index: int, value: float, position: int | None, row: int
    ) -> Intervention:
        return Intervention(
            point=self.point(layer), value=value, position=position, index=(index,), row=row
        )

    def trace(self, layer: int, index: int, position: int) -> Trace:
        """The backward pass's start at a node's value (attention heads override this)."""
        return Trace(point=self.point(layer), position=position, index=(index,))

    def reads_at(self, layer: int) -> HookPoint:
        return HookPoint(layer, self.side.reads)

    def reaches(self, layer: int, point: HookPoint) -> bool:
        """Whether what this kind writes in `layer` is part of the stream at `point`."""
        return (layer, self.side.order) <= (point.layer, _STREAM_ORDER[point.location])


class MlpNeurons(NodeKind):
    name = "mlp_neuron"
    side = Side.MLP
    location = Location.MLP_POST

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        return arch.d_mlp

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        return backend.weight(f"blocks.{layer}.mlp.W_out")

    def read_direction(self, backend: Backend, layer: int, index: int) -> torch.Tensor:
        return backend.weight(f"blocks.{layer}.mlp.W_in")[:, index]


class AttentionHeads(NodeKind):
    """A head's value is its z, [d_head] per position: directions are W_O, [head, d_head,
    d_model], its activation (for now) the norm of its write."""

    name = "attention_head"
    side = Side.ATTENTION
    location = Location.ATTN_Z
    attends = True

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        return arch.n_heads

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        return backend.weight(f"blocks.{layer}.attn.W_O")

    def values(
        self,
        act: torch.Tensor,
        directions: torch.Tensor,
        grad: torch.Tensor | None,
        stream_grad: torch.Tensor | None,
    ) -> Values:
        act = act.float()  # [position, head, d_head]
        write = torch.einsum("phd,hdm->phm", act, directions)
        norms = write.norm(dim=-1)
        return Values(
            activation=norms,
            write_norm=norms,
            direct_effect=None
            if stream_grad is None
            else torch.einsum("phm,pm->ph", write, stream_grad),
            act_times_grad=None if grad is None else (act * grad.float()).sum(-1),
        )

    def trace_attention(
        self,
        layer: int,
        index: int,
        position: int,
        attention: AttentionTrace,
        key_position: int,
        value_directions: tuple[tuple[float, ...], ...] | None = None,
    ) -> Trace:
        """A score's trace (Q, K, QK: read at attn_q and attn_k) or a write's (V: the values at
        `key_position` projected on each row's `value_directions`, [row][d_head])."""
        location = Location.ATTN_V if attention is AttentionTrace.V else Location.ATTN_Q
        return Trace(
            point=HookPoint(layer, location),
            position=position,
            index=(index,),
            attention=attention,
            key_position=key_position,
            value_directions=value_directions if attention is AttentionTrace.V else None,
        )


class ResidualChannels(NodeKind):
    name = "residual_channel"
    side = Side.RESIDUAL
    location = Location.RESID_POST
    has_write_direction = False

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        return arch.d_model

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        return torch.eye(backend.architecture.d_model, device=backend.device)

    def read_direction(self, backend: Backend, layer: int, index: int) -> torch.Tensor:
        direction = torch.zeros(backend.architecture.d_model, device=backend.device)
        direction[index] = 1.0
        return direction


class DictionaryLatents(NodeKind):
    """Latents of the dictionaries attached at one latents location, one per layer."""

    def __init__(self, name: str, side: Side, location: Location) -> None:
        self.name = name
        self.side = side
        self.location = location

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        attached = None if backend is None else backend.autoencoders.get(self.point(layer))
        return 0 if attached is None else attached.autoencoder.n_latents

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        attached = backend.autoencoders[self.point(layer)]
        ae = attached.autoencoder
        # decode(e_j) - decode(0) is latent j's decoder column, in the dictionary's input space.
        eye = torch.eye(ae.n_latents, device=backend.device)
        decoded = ae.decode(eye) - ae.decode(torch.zeros(1, ae.n_latents, device=backend.device))
        if attached.input is AutoencoderInput.MLP_POST_ACT:
            return decoded.float() @ backend.weight(f"blocks.{layer}.mlp.W_out")
        return decoded.float()


STRUCTURAL: tuple[NodeKind, ...] = (MlpNeurons(), AttentionHeads(), ResidualChannels())
# The openai-format autoencoders: one dictionary on the MLP side (mlp_post_act or
# resid_delta_mlp) and one on the attention side (resid_delta_attn), named as their kinds
# always were.
MLP_AUTOENCODER = DictionaryLatents("mlp_autoencoder_latent", Side.MLP, Location.MLP_AE_LATENTS)
ATTENTION_AUTOENCODER = DictionaryLatents(
    "attention_autoencoder_latent", Side.ATTENTION, Location.ATTN_AE_LATENTS
)
AUTOENCODERS: tuple[NodeKind, ...] = (MLP_AUTOENCODER, ATTENTION_AUTOENCODER)
TABLE: dict[str, NodeKind] = {kind.name: kind for kind in (*STRUCTURAL, *AUTOENCODERS)}

# The kind of the latents an openai-format autoencoder makes, by what it reads.
AUTOENCODER_KINDS: dict[AutoencoderInput, DictionaryLatents] = {
    AutoencoderInput.MLP_POST_ACT: MLP_AUTOENCODER,
    AutoencoderInput.RESID_DELTA_MLP: MLP_AUTOENCODER,
    AutoencoderInput.RESID_DELTA_ATTN: ATTENTION_AUTOENCODER,
}
