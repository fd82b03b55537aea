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
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from interpql.backends.base import (
    Architecture,
    AttachedDictionary,
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

    # The embeddings read the tokens, not the stream, and write before layer 0 does anything.
    EMBEDDING = (Location.RESID_PRE, Location.RESID_PRE, -1)
    ATTENTION = (Location.RESID_PRE, Location.ATTN_OUT, 1)
    MLP = (Location.RESID_MID, Location.MLP_OUT, 2)
    RESIDUAL = (Location.RESID_POST, Location.RESID_POST, 2)
    # Dictionaries on the stream before the layer and between attention and MLP.
    RESIDUAL_PRE = (Location.RESID_PRE, Location.RESID_PRE, 0)
    RESIDUAL_MID = (Location.RESID_MID, Location.RESID_MID, 1)

    @property
    def reads(self) -> Location:
        return self.value[0]

    @property
    def writes(self) -> Location:
        return self.value[1]

    @property
    def order(self) -> int:
        return self.value[2]

    @property
    def group(self) -> str:
        """The analyses' name for the side: embedding, attention, mlp or residual."""
        if self in (Side.RESIDUAL, Side.RESIDUAL_PRE, Side.RESIDUAL_MID):
            return "residual"
        return self.name.lower()


# Where each residual-stream point falls within a layer, in the order of `Side.order`.
_STREAM_ORDER = {Location.RESID_PRE: 0, Location.RESID_MID: 1, Location.RESID_POST: 2}


@dataclass(frozen=True)
class Values:
    """A layer's nodes of one kind on one prompt, [position, node] each."""

    activation: torch.Tensor
    write_norm: torch.Tensor
    direct_effect: torch.Tensor | None = None  # with a gradient at the stream's read point
    act_times_grad: torch.Tensor | None = None  # with the gradient at `location`


Saved = Mapping[Location, torch.Tensor]  # one prompt's activations at one layer, [position, ...]


def projected(stream_grad: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """stream_grad [position, d_model] @ directions [node, d_model].T -> [position, node],
    multiplying only the positions whose gradient is not 0 (a loss at the last token has
    none elsewhere under FROZEN: that is most of the work saved)."""
    live = stream_grad.ne(0).any(dim=-1)
    if bool(live.all()):
        return stream_grad @ directions.T
    out = stream_grad.new_zeros(stream_grad.shape[0], directions.shape[0])
    out[live] = stream_grad[live] @ directions.T
    return out


class NodeKind(abc.ABC):
    name: str
    side: Side
    location: Location
    # Residual channels and embeddings write no one direction to compare or lens.
    has_write_direction: bool = True
    # Whether generation can add a node's write direction (steering).
    steerable: bool = True
    # Whether a backward pass can start at one of its nodes.
    traceable: bool = True
    # The embeddings' writes: ranked with whichever kinds an analysis ranks.
    embeds: bool = False
    # Attention heads: a pattern per node, and traces through their score (Q, K, QK) or
    # their write from one key (V) rather than through their value.
    attends: bool = False
    # Which of `values` is a node's value at a token where one number is served per token
    # (activations on a prompt, its records' top activations).
    per_token_value: str = "activation"
    # Transformer Debugger's node table signs the write norm of this kind by its activation.
    signed_table_write_norm: bool = False

    @abc.abstractmethod
    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        """Nodes of this kind in `layer` (0 where there are none, e.g. no dictionary there)."""

    @abc.abstractmethod
    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        """What one unit of each node's value adds to the residual stream: [node, d_model]."""

    def read_direction(self, backend: Backend, layer: int, index: int) -> torch.Tensor | None:
        """The residual-stream direction a node reads, [d_model]; None where it has none."""
        return None

    def extra_locations(self, backend: Backend, layer: int) -> tuple[Location, ...]:
        """What else `values` and `bias_writes` read of a pass, besides `location`."""
        return ()

    def values(
        self,
        act: torch.Tensor,
        directions: torch.Tensor,
        grad: torch.Tensor | None,
        stream_grad: torch.Tensor | None,
        saved: Saved,
        norms: torch.Tensor | None = None,
        write_scale: torch.Tensor | None = None,
    ) -> Values:
        """`act` [position, node] as saved at `location` and its gradient there; `stream_grad`
        [position, d_model]: the gradient where direct effects are read; `saved`: the layer's
        `extra_locations`; `norms`: the directions' norms [node], where known already;
        `write_scale` [position, 1]: what each token's writes are multiplied by (`write_scale`)."""
        act = act.float()
        written = act if write_scale is None else act * write_scale.to(act.device)
        return Values(
            activation=act,
            write_norm=written.abs() * (directions.norm(dim=-1) if norms is None else norms),
            direct_effect=None
            if stream_grad is None
            else written * projected(stream_grad, directions),
            act_times_grad=None if grad is None else act * grad.float(),
        )

    def write_scale(self, backend: Backend, layer: int, saved: Saved) -> torch.Tensor | None:
        """[position, 1]: the factor each token's writes carry besides the value (a normalising
        dictionary's un-normalising scale); None where it is 1."""
        return None

    def bias_writes(self, backend: Backend, layer: int, saved: Saved) -> dict[str, torch.Tensor]:
        """What this side of the layer writes besides its nodes' values times their
        directions (output biases, a dictionary's bias and error), by name, [position, d_model]
        or [d_model]: with the nodes' writes, everything the layer adds to the stream."""
        return {}

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
    signed_table_write_norm = True  # post x |W_out row|

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        return arch.d_mlp

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        return backend.weight(f"blocks.{layer}.mlp.W_out")

    def read_direction(self, backend: Backend, layer: int, index: int) -> torch.Tensor | None:
        # A gated neuron, act(x . gate) * (x . up), reads two directions: neither alone is its
        # input, and no single one is.
        if backend.architecture.gated_mlp:
            return None
        return backend.weight(f"blocks.{layer}.mlp.W_in")[:, index]

    def bias_writes(self, backend: Backend, layer: int, saved: Saved) -> dict[str, torch.Tensor]:
        return {"MLP output bias": backend.weight(f"blocks.{layer}.mlp.b_out")}


class AttentionHeads(NodeKind):
    """A head's value is its z, [d_head] per position: directions are W_O, [head, d_head,
    d_model]. Its activation at a query position is its attention probability there: the
    largest, its strongest (query, key) pair (summed over keys it would be 1)."""

    name = "attention_head"
    side = Side.ATTENTION
    location = Location.ATTN_Z
    attends = True
    # One number per token for a head is the norm of its write, as its records hold it: its
    # activation, an attention probability, belongs to a (query, key) pair.
    per_token_value = "write_norm"

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        return arch.n_heads

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        return backend.weight(f"blocks.{layer}.attn.W_O")

    def extra_locations(self, backend: Backend, layer: int) -> tuple[Location, ...]:
        return (Location.ATTN_PROBS,)

    def values(
        self,
        act: torch.Tensor,
        directions: torch.Tensor,
        grad: torch.Tensor | None,
        stream_grad: torch.Tensor | None,
        saved: Saved,
        norms: torch.Tensor | None = None,
        write_scale: torch.Tensor | None = None,
    ) -> Values:
        act = act.float()  # [position, head, d_head]
        write = torch.einsum("phd,hdm->phm", act, directions)
        probs = saved[Location.ATTN_PROBS].float()  # [query, head, key]
        return Values(
            activation=probs.max(dim=-1).values,
            write_norm=write.norm(dim=-1),
            direct_effect=None
            if stream_grad is None
            else torch.einsum("phm,pm->ph", write, stream_grad),
            act_times_grad=None if grad is None else (act * grad.float()).sum(-1),
        )

    def bias_writes(self, backend: Backend, layer: int, saved: Saved) -> dict[str, torch.Tensor]:
        return {"attention output bias": backend.weight(f"blocks.{layer}.attn.b_O")}

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


class TokenEmbeddings(NodeKind):
    """One node, in layer 0: what the token and position embeddings write at each position
    (Transformer Debugger's embedding nodes). Its value at a position is that write, saved at
    resid_pre of layer 0 (setting it to 0 removes the token); its activation is 1, its write
    norm |tok + pos|, its act x grad the write times the gradient there (Transformer
    Debugger's token attribution)."""

    name = "token_embedding"
    side = Side.EMBEDDING
    location = Location.RESID_PRE
    has_write_direction = False
    steerable = False
    traceable = False
    embeds = True

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        return 1 if layer == 0 else 0

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        return torch.zeros(0, backend.architecture.d_model, device=backend.device)

    def values(
        self,
        act: torch.Tensor,
        directions: torch.Tensor,
        grad: torch.Tensor | None,
        stream_grad: torch.Tensor | None,
        saved: Saved,
        norms: torch.Tensor | None = None,
        write_scale: torch.Tensor | None = None,
    ) -> Values:
        act = act.float()  # [position, d_model]: the write itself
        return Values(
            activation=torch.ones(act.shape[0], 1, device=act.device),
            write_norm=act.norm(dim=-1, keepdim=True),
            direct_effect=None if stream_grad is None else (act * stream_grad).sum(-1, True),
            act_times_grad=None if grad is None else (act * grad.float()).sum(-1, keepdim=True),
        )

    def ablation(
        self, layer: int, index: int, value: float, position: int | None, row: int
    ) -> Intervention:
        # The node is the whole vector: every channel of the write is set.
        return Intervention(point=self.point(layer), value=value, position=position, row=row)


class DictionaryLatents(NodeKind):
    """The latents of one named set of dictionaries, at most one per layer, on one side of
    their layers: an SAE reads and rewrites its hook; a transcoder reads its input and writes
    the MLP's output.

    A latent's value is saved at `Location.LATENTS` (the point names the set). What one unit
    of it adds to the stream is its decoder row times the un-normalising scale of its token,
    carried into the stream through what sits between the hook and it (W_out after mlp_post,
    W_O after attn_z); its write norm and direct effect use that scaled write.
    """

    location = Location.LATENTS

    def __init__(self, name: str, side: Side) -> None:
        self.name = name
        self.side = side

    def point(self, layer: int) -> HookPoint:
        return HookPoint(layer, Location.LATENTS, self.name)

    def attached(self, backend: Backend, layer: int) -> AttachedDictionary:
        return backend.dictionaries[self.point(layer)]

    def count(self, arch: Architecture, backend: Backend | None, layer: int) -> int:
        found = None if backend is None else backend.dictionaries.get(self.point(layer))
        return 0 if found is None else found.dictionary.n_latents

    def directions(self, backend: Backend, layer: int) -> torch.Tensor:
        attached = self.attached(backend, layer)
        return _written(backend, attached, attached.dictionary.decoder_directions().float())

    def extra_locations(self, backend: Backend, layer: int) -> tuple[Location, ...]:
        attached = self.attached(backend, layer)
        return tuple(dict.fromkeys((attached.input, attached.output)))

    def write_scale(self, backend: Backend, layer: int, saved: Saved) -> torch.Tensor | None:
        attached = self.attached(backend, layer)
        if not attached.dictionary.rescales:
            return None
        return attached.dictionary.output_scale(_inputs(attached, saved)).reshape(-1, 1)

    def bias_writes(self, backend: Backend, layer: int, saved: Saved) -> dict[str, torch.Tensor]:
        """The dictionary's bias (its output with every latent 0), a skip transcoder's skip
        term, and its error (what the hook held, less what the latents decode to), in the
        stream; the output bias of what follows the hook (W_out's, W_O's) where it has one."""
        attached = self.attached(backend, layer)
        dictionary = attached.dictionary
        inputs = _inputs(attached, saved)
        latents = saved[Location.LATENTS].float()
        target = saved[attached.output].float().reshape(latents.shape[0], -1)
        writes = {
            "dictionary bias": _written(backend, attached, dictionary.decoded_bias(inputs)),
            "dictionary error": _written(
                backend, attached, target - dictionary.decode(latents, inputs)
            ),
        }
        skip = dictionary.skip(inputs)
        if skip is not None:
            writes["transcoder skip"] = _written(backend, attached, skip)
        if attached.output is Location.MLP_POST:
            writes["MLP output bias"] = backend.weight(f"blocks.{layer}.mlp.b_out")
        if attached.output is Location.ATTN_Z:
            writes["attention output bias"] = backend.weight(f"blocks.{layer}.attn.b_O")
        return writes


def _inputs(attached: AttachedDictionary, saved: Saved) -> torch.Tensor:
    """A dictionary's input as it reads it (attn_z's heads side by side, head-major)."""
    x = saved[attached.input].float()
    return x.reshape(x.shape[0], -1) if attached.input is Location.ATTN_Z else x


def _written(backend: Backend, attached: AttachedDictionary, x: torch.Tensor) -> torch.Tensor:
    """`x`, in the space of the location the dictionary writes, as it enters the stream."""
    if attached.output is Location.MLP_POST:
        return x @ backend.weight(f"blocks.{attached.layer}.mlp.W_out")
    if attached.output is Location.ATTN_Z:
        w_o = backend.weight(f"blocks.{attached.layer}.attn.W_O")  # [head, d_head, d_model]
        return x @ w_o.reshape(-1, w_o.shape[-1])
    return x


def dictionary_side(attached: AttachedDictionary) -> Side:
    """The side of its layer a dictionary is on, by the location it writes; ValueError for an
    SAE whose hook is not part of the residual stream's writes (mlp_in, its normalized input)."""
    if attached.output not in _DICTIONARY_SIDES:
        raise ValueError(
            f"dictionary {attached.name!r}: an SAE at {attached.output.value} writes nothing to "
            "the residual stream of its own (only transcoders read there, writing mlp_out)"
        )
    return _DICTIONARY_SIDES[attached.output]


# Where a dictionary's write enters the residual stream, by the location it writes.
_DICTIONARY_SIDES = {
    Location.RESID_PRE: Side.RESIDUAL_PRE,
    Location.ATTN_Z: Side.ATTENTION,
    Location.ATTN_OUT: Side.ATTENTION,
    Location.RESID_MID: Side.RESIDUAL_MID,
    Location.MLP_POST: Side.MLP,
    Location.MLP_OUT: Side.MLP,
    Location.RESID_POST: Side.RESIDUAL,
}

STRUCTURAL: tuple[NodeKind, ...] = (
    TokenEmbeddings(),
    MlpNeurons(),
    AttentionHeads(),
    ResidualChannels(),
)
STRUCTURAL_TABLE: dict[str, NodeKind] = {kind.name: kind for kind in STRUCTURAL}


def kind_table(backend: Backend | None) -> dict[str, NodeKind]:
    """A model's kinds: the structural ones, and one per named set of attached dictionaries;
    ValueError if a set's name is a structural kind's or its layers are on different sides."""
    table = dict(STRUCTURAL_TABLE)
    for attached in [] if backend is None else backend.dictionaries.values():
        if attached.name in STRUCTURAL_TABLE:
            raise ValueError(f"a dictionary cannot be named {attached.name!r}: a kind of node is")
        side = dictionary_side(attached)
        known = table.setdefault(attached.name, DictionaryLatents(attached.name, side))
        if known.side is not side:
            raise ValueError(
                f"dictionary {attached.name!r} is on the {known.side.group} side in one layer "
                f"and the {side.group} side in layer {attached.layer}: a set stays on one side"
            )
    return table
