"""Live inference: a prompt's tokens, loss, predictions and activations."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from interpql.backends.base import AttentionTrace, LossSpec
from interpql.errors import check_range, invalid_argument, invalid_node
from interpql.loaders.inference import Ablation, ActivationNeeds, PromptRun, Variant
from interpql.loaders.nodes import NodeKind, NodeRef
from interpql.loaders.registry import ModelEntry
from interpql.loaders.tracing import TraceRequest
from interpql.resolvers.context import RequestContext
from interpql.resolvers.models import encode_prompt, node_from_id

# Far beyond any activation a model produces; larger ablation or steering values only overflow
# the forward pass (inf, then nan in every later layer), or even the weights' dtype.
MAX_INTERVENTION_MAGNITUDE = 1e6


class MlpComponent(Enum):
    """The unit of analysis in MLP layers, as in Transformer Debugger's requests."""

    NEURON = "neuron"
    AUTOENCODER_LATENT = "autoencoder_latent"


class AttentionComponent(Enum):
    """The unit of analysis in attention layers."""

    HEAD = "head"
    AUTOENCODER_LATENT = "autoencoder_latent"


@dataclass(frozen=True)
class Prompt:
    """A validated prompt of one model, with what to change while running it."""

    entry: ModelEntry
    text: str
    variant: Variant
    mlp_component: MlpComponent = MlpComponent.NEURON
    attention_component: AttentionComponent = AttentionComponent.HEAD
    hide_early_layers_when_ablating: bool = False

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.variant.tokens


@dataclass(frozen=True)
class TraceSpec:
    upstream_node_id: str
    token: int
    attention: AttentionTrace | None
    key_token: int | None
    downstream_node_id: str | None


@dataclass(frozen=True)
class AblationRequest:
    node_id: str
    value: float
    token: int | None


@dataclass(frozen=True)
class Prediction:
    token_id: int
    logit: float
    probability: float


@dataclass(frozen=True)
class NodeValues:
    node: NodeRef
    prompt: Prompt
    values: np.ndarray  # [token]
    pattern: np.ndarray | None  # [query, key] for attention heads
    pair_attribution: np.ndarray | None  # [query, key] for attention heads


def prepare(
    ctx: RequestContext,
    entry: ModelEntry,
    text: str,
    ablations: list[AblationRequest] | None = None,
    autoencoder_error_term: bool = True,
    loss: LossSpec | None = None,
    mlp_component: MlpComponent = MlpComponent.NEURON,
    attention_component: AttentionComponent = AttentionComponent.HEAD,
    trace: TraceSpec | None = None,
    hide_early_layers_when_ablating: bool = False,
) -> Prompt:
    entry.require_backend()
    tokens = encode_prompt(ctx, entry, text)
    checked = []
    for request in ablations or []:
        node = _own_node(ctx, entry, request.node_id)
        if request.token is not None:
            check_range("ablation tokenIndex", request.token, 0, len(tokens))
        if not abs(request.value) <= MAX_INTERVENTION_MAGNITUDE:  # nan too
            raise invalid_argument(
                f"Ablation value of {node.id} must be a number within "
                f"±{MAX_INTERVENTION_MAGNITUDE:g}, got {request.value}."
            )
        checked.append(Ablation(node, request.value, request.token))
    traced = None if trace is None else _trace(ctx, entry, tokens, trace)
    variant = Variant(tokens, tuple(checked), autoencoder_error_term, loss or LossSpec(), traced)
    return Prompt(
        entry,
        text,
        variant,
        mlp_component,
        attention_component,
        hide_early_layers_when_ablating,
    )


def _trace(
    ctx: RequestContext, entry: ModelEntry, tokens: tuple[int, ...], spec: TraceSpec
) -> TraceRequest:
    upstream = _own_node(ctx, entry, spec.upstream_node_id)
    check_range("trace tokenIndex", spec.token, 0, len(tokens))
    if spec.key_token is not None:
        check_range("trace keyTokenIndex", spec.key_token, 0, spec.token + 1)
    downstream = None
    if spec.downstream_node_id is not None:
        downstream = _own_node(ctx, entry, spec.downstream_node_id)
        if downstream.layer <= upstream.layer and downstream.kind is not NodeKind.RESIDUAL_CHANNEL:
            raise invalid_argument("The downstream node must be in a later layer.")
    return TraceRequest(upstream, spec.token, spec.attention, spec.key_token, downstream)


def _own_node(ctx: RequestContext, entry: ModelEntry, node_id: str) -> NodeRef:
    node = node_from_id(ctx, node_id)
    if node.model != entry.name:
        raise invalid_node(node_id, f"it belongs to another model than {entry.name!r}")
    return node


async def run(ctx: RequestContext, prompt: Prompt, needs: ActivationNeeds) -> PromptRun:
    return await ctx.inference.load(prompt.entry.name, prompt.variant, needs)


def _node_needs(nodes: list[NodeRef]) -> ActivationNeeds:
    return ActivationNeeds(
        layer_kinds=frozenset((n.layer, n.kind) for n in nodes),
        pattern_layers=frozenset(n.layer for n in nodes if n.kind is NodeKind.ATTENTION_HEAD),
    )


async def node_values(
    ctx: RequestContext, prompt: Prompt, nodes: list[NodeRef]
) -> list[NodeValues]:
    result = await run(ctx, prompt, _node_needs(nodes))
    out = []
    for node in nodes:
        values = result.activations(node.layer, node.kind)[:, node.index]
        pattern = pairs = None
        if node.kind is NodeKind.ATTENTION_HEAD:
            pattern = result.patterns[node.layer][:, node.index, :]
            found = result.pair_attributions.get(node.layer)
            pairs = None if found is None else found[:, node.index, :]
        out.append(NodeValues(node, prompt, values, pattern, pairs))
    return out


async def activations_of_ids(
    ctx: RequestContext, prompt: Prompt, node_ids: list[str]
) -> list[NodeValues]:
    check_range("number of ids", len(node_ids), 0, ctx.settings.max_nodes_per_request + 1)
    nodes = [_own_node(ctx, prompt.entry, node_id) for node_id in node_ids]
    return await node_values(ctx, prompt, nodes)


async def layer_values(
    ctx: RequestContext, prompt: Prompt, layer: int, kind: NodeKind
) -> np.ndarray:
    """[token, node] activations of every node of one kind in one layer."""
    entry = prompt.entry
    entry.check_layer(layer)
    entry.node(kind, layer, 0)  # raises when the model has no such nodes
    result = await run(ctx, prompt, ActivationNeeds(layer_kinds=frozenset({(layer, kind)})))
    return result.activations(layer, kind)


def top_predictions(
    ctx: RequestContext, result: PromptRun, k: int, bottom: bool = False
) -> list[Prediction]:
    check_range("k", k, 1, ctx.settings.max_top_k + 1)
    logits = result.last_logits.astype(np.float64)
    k = min(k, logits.shape[0])
    ranked = logits if bottom else -logits
    top = np.argpartition(ranked, k - 1)[:k]
    top = top[np.argsort(ranked[top], kind="stable")]
    log_norm = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    return [Prediction(int(t), float(logits[t]), float(np.exp(logits[t] - log_norm))) for t in top]
