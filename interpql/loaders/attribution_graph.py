"""Attribution graphs for the API: computed on the model's worker thread, pruned, given ids
(kept by id in graph_store.py, for their URL and their interventions), and exported as
Neuronpedia's graph JSON.

Node ids never collide: a latent `{layer}_{index}_{position}` (circuit-tracer's and Neuronpedia's
form), an error node `err_{layer}_{position}`, an embedding `E_{token}_{position}`, a logit
`L_{token}_{position}`. Every number leaves as a Python float or a numpy array: nothing above
loaders/ sees torch.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from interpql.backends.base import ForwardRequest, Intervention
from interpql.backends.circuits import pruning
from interpql.backends.circuits.attribution import GraphParams, Progress, RawGraph, attribute
from interpql.backends.circuits.linearised import linear_change, linearise, transcoders_of
from interpql.backends.tokenizer import END_OF_TEXT
from interpql.errors import UnavailableError, invalid_argument
from interpql.loaders.registry import ModelEntry
from interpql.specs import FeatureIntervention, GraphSpec, NodeRef

__all__ = [
    "GraphData",
    "GraphNode",
    "InterventionResult",
    "NodeType",
    "TopLogit",
    "beginning_of_sequence",
    "build_graph",
    "check_transcoders",
    "graph_id",
    "intervene",
    "weights_fingerprint",
]


class NodeType(StrEnum):
    EMBEDDING = "embedding"
    FEATURE = "feature"
    ERROR = "error"
    LOGIT = "logit"


@dataclass(frozen=True)
class GraphNode:
    id: str
    type: NodeType
    layer: int | None  # latents and errors; None for embeddings and logits
    position: int
    token: int  # the prompt's token at the position; a logit node's own token
    influence: float  # on the logits, through every path of the unpruned graph
    cumulative_influence: float  # the share this node and those of more influence hold
    activation: float | None = None  # a latent's value; an error node's vector norm
    ref: NodeRef | None = None  # latents: the API's node; embeddings: token_embedding's
    probability: float | None = None  # logits
    logit: float | None = None  # logits: the logit minus the mean logit


@dataclass(frozen=True)
class Pruning:
    node_threshold: float
    edge_threshold: float
    node_score_threshold: float
    edge_score_threshold: float
    node_influence_kept: float
    edge_influence_kept: float


@dataclass(frozen=True)
class Sizes:
    active_features: int
    features: int  # selected (all active unless maxFeatureNodes was lower)
    errors: int
    embeddings: int
    logits: int
    edges: int  # nonzero

    @property
    def nodes(self) -> int:
        return self.features + self.errors + self.embeddings + self.logits


@dataclass(frozen=True)
class GraphData:
    id: str
    spec: GraphSpec
    n_layers: int
    nodes: list[GraphNode]  # the pruned graph's
    sources: np.ndarray  # [edges] indices into nodes
    targets: np.ndarray  # [edges]
    weights: np.ndarray  # [edges]: direct effects
    unpruned: Sizes
    pruning: Pruning
    replacement_score: float
    completeness_score: float
    pruned_replacement_score: float
    pruned_completeness_score: float
    elapsed_s: float

    @property
    def pruned(self) -> Sizes:
        count = {t: sum(1 for n in self.nodes if n.type is t) for t in NodeType}
        return Sizes(
            active_features=self.unpruned.active_features,
            features=count[NodeType.FEATURE],
            errors=count[NodeType.ERROR],
            embeddings=count[NodeType.EMBEDDING],
            logits=count[NodeType.LOGIT],
            edges=len(self.weights),
        )


@dataclass(frozen=True)
class TopLogit:
    token: int
    logit: float
    probability: float


@dataclass(frozen=True)
class InterventionResult:
    original: list[TopLogit]
    frozen: list[TopLogit]  # the linearised model: attention, LayerNorm scales, other latents
    free: list[TopLogit]  # the model running on, transcoder spliced in with its error term


def check_transcoders(entry: ModelEntry, dictionary: str) -> None:
    """UNSUPPORTED unless `dictionary` is a transcoder set a graph can replace every MLP with."""
    transcoders_of(entry.require_backend(), dictionary)


def beginning_of_sequence(entry: ModelEntry) -> int | None:
    """The model's beginning-of-sequence token: a Hugging Face tokenizer's own, else GPT-2's
    <|endoftext|> where the vocabulary has it."""
    tokenizer = entry.require_backend().tokenizer
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        found = hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id
        return None if found is None else int(found)
    try:
        ids = tokenizer.encode(END_OF_TEXT, allowed_special="all")
    except (KeyError, ValueError):
        return None
    return ids[0] if len(ids) == 1 else None


# Each weight read for the fingerprint, at most this many of its values (evenly strided).
_FINGERPRINT_SAMPLE = 4096


def weights_fingerprint(entry: ModelEntry, dictionary: str) -> str:
    """A digest of a strided sample of the embedding, unembedding, every layer's attention and
    MLP matrices and the transcoders' decoders: a model trained again (or other transcoders)
    under the same names gets another, so a stored graph of the old weights is never served
    for the new. Computed once per model and set."""
    key = ("weights_fingerprint", dictionary)
    if key not in entry.derived:
        backend = entry.require_backend()
        digest = hashlib.sha256()
        names = ["W_E", "W_U"] + [
            f"blocks.{layer}.{name}"
            for layer in range(entry.architecture.n_layers)
            for name in ("attn.W_Q", "attn.W_O", "mlp.W_out")
        ]
        tensors = [backend.weight(name) for name in names] + [
            attached.dictionary.decoder_directions()
            for _, attached in sorted(transcoders_of(backend, dictionary).items())
        ]
        for tensor in tensors:
            flat = tensor.detach().flatten()
            sample = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLE)]
            digest.update(sample.float().cpu().numpy().tobytes())
        entry.derived[key] = digest.hexdigest()[:16]
    found: str = entry.derived[key]
    return found


def graph_id(spec: GraphSpec) -> str:
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class GraphLimits:
    """The server's bounds on one graph's work and answer (Settings)."""

    batch_size: int = 32  # targets per batched backward pass
    matrix_budget_bytes: int = 2 << 30  # the unpruned adjacency matrix
    # Edges kept after pruning: thresholds near 1 keep nearly all of an unpruned graph's
    # millions, hundreds of MB of JSON that no viewer draws and the store would hold.
    max_edges: int = 200_000


def build_graph(
    entry: ModelEntry,
    spec: GraphSpec,
    limits: GraphLimits,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> GraphData:
    """Runs on the model's worker thread (through the runner's `compute`)."""
    started = time.perf_counter()
    backend = entry.require_backend()
    transcoders = transcoders_of(backend, spec.dictionary)
    params = GraphParams(
        max_feature_nodes=spec.max_feature_nodes,
        max_logits=spec.max_logits,
        logit_probability=spec.logit_probability,
        batch_size=limits.batch_size,
        matrix_budget_bytes=limits.matrix_budget_bytes,
    )
    raw = attribute(backend, list(spec.tokens), transcoders, params, stop, progress)
    layout = layout_of(raw)
    pruned = pruning.prune(
        raw.adjacency, layout, raw.logit_probabilities, spec.node_threshold, spec.edge_threshold
    )
    if len(pruned.weights) > limits.max_edges:
        raise UnavailableError(
            f"The pruned graph keeps {len(pruned.weights):,} edges, over this server's limit of "
            f"{limits.max_edges:,}: lower edgeThreshold (and nodeThreshold) to keep less of "
            f"the influence, or ask for fewer maxFeatureNodes.",
            code="RESOURCE_EXHAUSTED",
        )
    replacement, completeness = pruning.scores(
        raw.adjacency, layout, raw.logit_probabilities, pruned.influence
    )
    kept = pruned.node_mask.nonzero(as_tuple=True)[0]
    sub_replacement, sub_completeness = _pruned_scores(raw, layout, pruned, kept)
    position_of = torch.full((layout.n_nodes,), -1, dtype=torch.long)
    position_of[kept] = torch.arange(len(kept))
    all_nodes = _nodes(entry, spec, raw, pruned.influence)
    return GraphData(
        id=graph_id(spec),
        spec=spec,
        n_layers=raw.n_layers,
        nodes=[all_nodes[i] for i in kept.tolist()],
        sources=position_of[pruned.edges[:, 0]].numpy(),
        targets=position_of[pruned.edges[:, 1]].numpy(),
        weights=pruned.weights.numpy().astype(np.float64),
        unpruned=Sizes(
            active_features=raw.n_active,
            features=raw.n_features,
            errors=layout.n_errors,
            embeddings=layout.n_tokens,
            logits=layout.n_logits,
            edges=int((raw.adjacency != 0).sum()),
        ),
        pruning=Pruning(
            node_threshold=spec.node_threshold,
            edge_threshold=spec.edge_threshold,
            node_score_threshold=pruned.node_score_threshold,
            edge_score_threshold=pruned.edge_score_threshold,
            node_influence_kept=pruned.node_influence_kept,
            edge_influence_kept=pruned.edge_influence_kept,
        ),
        replacement_score=replacement,
        completeness_score=completeness,
        pruned_replacement_score=sub_replacement,
        pruned_completeness_score=sub_completeness,
        elapsed_s=time.perf_counter() - started,
    )


def layout_of(raw: RawGraph) -> pruning.Layout:
    return pruning.Layout(
        n_features=raw.n_features,
        n_errors=raw.n_layers * raw.n_positions,
        n_tokens=raw.n_positions,
        n_logits=len(raw.logit_tokens),
    )


def _pruned_scores(
    raw: RawGraph, layout: pruning.Layout, pruned: pruning.Pruned, kept: torch.Tensor
) -> tuple[float, float]:
    """The scores of the pruned graph as a graph of its own: its kept nodes (still in the
    node order latents, errors, embeddings, logits) and kept edges."""
    kinds = torch.bucketize(
        kept,
        torch.tensor([layout.n_features, layout.n_features + layout.n_errors, layout.n_sources]),
        right=True,
    )
    counts = torch.bincount(kinds, minlength=4).tolist()
    small = pruning.Layout(*counts)
    index = torch.full((layout.n_nodes,), -1, dtype=torch.long)
    index[kept] = torch.arange(len(kept))
    row_of = torch.full((small.n_nodes,), -1, dtype=torch.long)
    row_of[small.row_nodes()] = torch.arange(small.n_features + small.n_logits)
    matrix = torch.zeros(small.n_features + small.n_logits, small.n_sources)
    matrix[row_of[index[pruned.edges[:, 1]]], index[pruned.edges[:, 0]]] = pruned.weights
    influence = pruning.node_influence(matrix, small, raw.logit_probabilities)
    return pruning.scores(matrix, small, raw.logit_probabilities, influence)


def _nodes(
    entry: ModelEntry, spec: GraphSpec, raw: RawGraph, influence: torch.Tensor
) -> list[GraphNode]:
    """Every node of the unpruned graph, in the matrix's node order."""
    tokens = raw.tokens
    last = raw.n_positions - 1
    values = influence.tolist()
    order = influence.argsort(descending=True, stable=True)
    shares = torch.zeros_like(influence)
    shares[order] = influence[order].cumsum(0) / influence.sum().clamp(min=1e-30)
    cumulative = shares.tolist()
    nodes = []
    for i, ((layer, position, index), activation) in enumerate(
        zip(raw.features.tolist(), raw.activations.tolist(), strict=True)
    ):
        nodes.append(
            GraphNode(
                id=f"{layer}_{index}_{position}",
                type=NodeType.FEATURE,
                layer=layer,
                position=position,
                token=tokens[position],
                influence=values[i],
                cumulative_influence=cumulative[i],
                activation=activation,
                ref=NodeRef(entry.name, spec.dictionary, layer, index),
            )
        )
    norms = raw.error_norms.tolist()
    for layer in range(raw.n_layers):
        for position in range(raw.n_positions):
            nodes.append(
                GraphNode(
                    id=f"err_{layer}_{position}",
                    type=NodeType.ERROR,
                    layer=layer,
                    position=position,
                    token=tokens[position],
                    influence=values[len(nodes)],
                    cumulative_influence=cumulative[len(nodes)],
                    activation=norms[layer][position],
                )
            )
    for position, token in enumerate(tokens):
        nodes.append(
            GraphNode(
                id=f"E_{token}_{position}",
                type=NodeType.EMBEDDING,
                layer=None,
                position=position,
                token=token,
                influence=values[len(nodes)],
                cumulative_influence=cumulative[len(nodes)],
                # Transformer Debugger's embedding node: token plus position embedding.
                ref=NodeRef(entry.name, "token_embedding", 0, 0),
            )
        )
    for token, probability, logit in zip(
        raw.logit_tokens, raw.logit_probabilities.tolist(), raw.logit_values.tolist(), strict=True
    ):
        nodes.append(
            GraphNode(
                id=f"L_{token}_{last}",
                type=NodeType.LOGIT,
                layer=None,
                position=last,
                token=token,
                influence=0.0,
                cumulative_influence=1.0,
                probability=probability,
                logit=logit,
            )
        )
    return nodes


def intervene(
    entry: ModelEntry,
    spec: GraphSpec,
    interventions: list[FeatureIntervention],
    k: int,
) -> InterventionResult:
    """The top-k logits at the last position with the chosen latents set or scaled, in the
    linearised model and in the model running freely. Runs on the model's worker thread."""
    backend = entry.require_backend()
    transcoders = transcoders_of(backend, spec.dictionary)
    tokens = list(spec.tokens)
    keys = frozenset((c.layer, c.position, c.index) for c in interventions)
    for layer, _, index in keys:
        count = transcoders[layer].dictionary.n_latents
        if index >= count:
            raise invalid_argument(f"layer {layer} of {spec.dictionary!r} has {count} latents.")
    clean = linearise(backend, tokens, transcoders, extra=keys)
    values, changes = {}, {}
    for change in interventions:
        found = clean.layers[change.layer]
        at = (found.positions == change.position) & (found.indices == change.index)
        current = float(found.values.detach()[at].sum())
        key = (change.layer, change.position, change.index)
        values[key] = (
            change.value if change.value is not None else current * float(change.scale or 0.0)
        )
        changes[key] = values[key] - current
    last = len(tokens) - 1
    frozen = clean.logits[last].detach() + linear_change(clean, changes, last)
    free = backend.forward(
        ForwardRequest(
            tokens=(tuple(tokens),),
            interventions=tuple(
                Intervention(
                    point=transcoders[layer].latents_point,
                    value=value,
                    position=position,
                    index=(index,),
                )
                for (layer, position, index), value in values.items()
            ),
        )
    )
    return InterventionResult(
        original=_top(clean.logits[last], k),
        frozen=_top(frozen, k),
        free=_top(free.logits[0, len(tokens) - 1], k),
    )


def _top(logits: torch.Tensor, k: int) -> list[TopLogit]:
    logits = logits.detach().float()
    probabilities = logits.softmax(-1)
    top = probabilities.topk(min(k, len(probabilities)))
    return [
        TopLogit(token=int(t), logit=float(logits[t]), probability=float(p))
        for p, t in zip(top.values, top.indices, strict=True)
    ]
