"""Node identity: kinds, references and their readable ids (`<model>/<kind>/<layer>/<index>`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from interpql.errors import invalid_node


class NodeKind(Enum):
    MLP_NEURON = "mlp_neuron"
    ATTENTION_HEAD = "attention_head"
    MLP_AUTOENCODER_LATENT = "mlp_autoencoder_latent"
    ATTENTION_AUTOENCODER_LATENT = "attention_autoencoder_latent"
    RESIDUAL_CHANNEL = "residual_channel"


@dataclass(frozen=True, order=True)
class NodeRef:
    model: str
    kind: NodeKind
    layer: int
    index: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.kind.value}/{self.layer}/{self.index}"


_MAX_ID_LENGTH = 512


def parse_node_id(node_id: str) -> NodeRef:
    """Parses the syntax of an id; whether the node exists is the registry's question."""
    if len(node_id) > _MAX_ID_LENGTH:
        raise invalid_node(node_id[:64] + "...", f"ids are at most {_MAX_ID_LENGTH} characters")
    parts = node_id.rsplit("/", 3)
    if len(parts) != 4 or not parts[0]:
        raise invalid_node(node_id, "expected <model>/<kind>/<layer>/<index>")
    model, kind_text, layer_text, index_text = parts
    try:
        kind = NodeKind(kind_text)
    except ValueError:
        known = ", ".join(k.value for k in NodeKind)
        raise invalid_node(node_id, f"unknown kind {kind_text!r} (known: {known})") from None
    if not (layer_text.isascii() and layer_text.isdigit()):
        raise invalid_node(node_id, f"layer {layer_text!r} is not a non-negative integer")
    if not (index_text.isascii() and index_text.isdigit()) or len(index_text) > 12:
        raise invalid_node(node_id, f"index {index_text!r} is not a non-negative integer")
    return NodeRef(model=model, kind=kind, layer=int(layer_text), index=int(index_text))
