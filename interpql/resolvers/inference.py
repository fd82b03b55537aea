"""Live inference: an input checked into its spec, and what its pass computes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from interpql.errors import (
    InvalidInputError,
    check_position,
    check_range,
    invalid_argument,
    invalid_node,
)
from interpql.loaders.inference import LogitPositions, Needs, RowResult, objective_needs
from interpql.loaders.registry import ModelEntry
from interpql.loaders.tracing import reads_after
from interpql.resolvers.context import RequestContext
from interpql.resolvers.inputs import (
    AblationArgs,
    InferenceArgs,
    LossArgs,
    SteeringArgs,
    TraceArgs,
)
from interpql.resolvers.models import encode, encode_prompt, node_from_id
from interpql.specs import (
    Ablation,
    AttentionTrace,
    InferenceSpec,
    LayerNormScale,
    LossKind,
    LossSpec,
    NodeRef,
    Steering,
    TraceSpec,
)

# Far beyond any activation a model produces; larger ablation or steering values only overflow
# the forward pass (inf, then nan in every later layer), or even the weights' dtype.
MAX_INTERVENTION_MAGNITUDE = 1e6

# The analysis units InferenceInput's mlpComponent and attentionComponent name, by enum value.
MLP_KINDS = {"neuron": "mlp_neuron", "autoencoder_latent": "mlp_autoencoder_latent"}
ATTENTION_KINDS = {"head": "attention_head", "autoencoder_latent": "attention_autoencoder_latent"}


@dataclass(frozen=True)
class Prediction:
    token: int
    logit: float
    probability: float


@dataclass(frozen=True)
class NodeValues:
    node: NodeRef
    tokens: tuple[int, ...]
    values: np.ndarray  # [position]
    pattern: np.ndarray | None  # [query, key] for attention heads
    pair_attribution: np.ndarray | None  # [query, key] for attention heads
    # Why `values` and `pair_attribution` mean nothing on this model (a head's write norm
    # through Gemma-2's post-attention norm), raised by the fields that serve them; the
    # pattern stands.
    refused: Exception | None = None


@dataclass(frozen=True)
class PassFigures:
    """What the pass that served an input measured (zeros when it came from the cache)."""

    elapsed_ms: float
    batch_size: int
    memory_before_bytes: int
    memory_after_bytes: int
    from_cache: bool


def inference_spec(ctx: RequestContext, model_name: str, args: InferenceArgs) -> InferenceSpec:
    """The one spec of an `infer` input: its prompt tokenized, every node id resolved (within
    the model), every position and token checked."""
    entry = ctx.registry.get(model_name)
    entry.require_backend()
    tokens = encode_prompt(ctx, entry, args.prompt)
    return InferenceSpec(
        model=entry.name,
        prompt=args.prompt,
        tokens=tokens,
        ablations=ablations(ctx, entry, args.ablations, len(tokens)),
        steering=steering(
            ctx,
            entry,
            args.steering,
            lambda index: check_position("steering tokenIndices", index, len(tokens)),
        ),
        loss=LossSpec() if args.loss is None else loss_spec(ctx, entry, args.loss),
        trace=None if args.trace is None else _trace(ctx, entry, args.trace, len(tokens)),
        keep_error_term=args.autoencoder_error_term,
        layer_norm_scale=LayerNormScale(args.layer_norm_scale.value),
        mlp_kind=_ranked_dictionary(entry, args.mlp_dictionary, "mlp")
        or MLP_KINDS[args.mlp_component.value],
        attention_kind=_ranked_dictionary(entry, args.attention_dictionary, "attention")
        or ATTENTION_KINDS[args.attention_component.value],
        residual_kinds=tuple(
            filter(None, [_ranked_dictionary(entry, args.residual_dictionary, "residual")])
        ),
        hide_early_layers_when_ablating=args.hide_early_layers_when_ablating,
    )


def _ranked_dictionary(entry: ModelEntry, name: str | None, side: str) -> str | None:
    """A dictionary set named to rank on one side of the layers; INVALID_ARGUMENT if the model
    has none by that name, or it is on another side."""
    if name is None:
        return None
    sides = entry.dictionary_sides()
    if name not in sides:
        known = ", ".join(sorted(sides)) or "none"
        raise invalid_argument(f"no dictionary set {name!r} on {entry.name!r} (attached: {known}).")
    if sides[name] != side:
        raise invalid_argument(
            f"dictionary {name!r} is on the {sides[name]} side of its layers, not the {side}."
        )
    layers, n_layers = entry.dictionary_layers(name), entry.architecture.n_layers
    if side != "residual" and entry.backend is not None and len(layers) < n_layers:
        # Its latents stand for the side's writes in every layer: with layers missing, their
        # writes would be in no node, and the direct effects would not add up to the objective.
        # (A residual set decomposes the stream where it reads; it replaces no writer.)
        raise invalid_argument(
            f"dictionary {name!r} covers layers {', '.join(map(str, layers))} of {n_layers}: "
            f"ranking by a set replaces the {side} nodes of every layer, so it needs one "
            "dictionary per layer (its latents are still served as nodes, and in "
            "activations and ablations)."
        )
    return name


def plain_spec(ctx: RequestContext, node: NodeRef, prompt: str) -> InferenceSpec:
    """A prompt run as it is, for a node's activations on it (Node.activations)."""
    entry = ctx.registry.get(node.model)
    entry.require_backend()
    return InferenceSpec(model=entry.name, prompt=prompt, tokens=encode_prompt(ctx, entry, prompt))


def steering(
    ctx: RequestContext,
    entry: ModelEntry,
    given: Sequence[SteeringArgs],
    position_of: Callable[[int], int],
) -> tuple[Steering, ...]:
    """Each steered node resolved and its direction checked; `position_of` checks a token index
    and returns its position."""
    if given:
        entry.require_writes_reach_stream("Steering")
    checked = []
    for steer in given:
        node = own_node(ctx, entry, str(steer.node_id))
        if not entry.kind(node.kind).steerable:
            raise invalid_argument(f"A {node.kind} node has no direction to steer along.")
        check_magnitude("Steering strength", steer.strength)
        positions = None
        if steer.token_indices is not None:
            positions = tuple(position_of(index) for index in steer.token_indices)
            _check_distinct(steer.token_indices, positions)
        checked.append(Steering(node=node, strength=steer.strength, positions=positions))
    return tuple(checked)


def _check_distinct(indices: Sequence[int], positions: Sequence[int]) -> None:
    """tokenIndices is a set of positions: one named twice (3 and -1 of four tokens, say) would
    be steered twice over, which a strength says better."""
    first_at: dict[int, int] = {}
    for index, position in zip(indices, positions, strict=True):
        if position in first_at:
            raise invalid_argument(
                f"Steering tokenIndices name position {position} twice ({first_at[position]} "
                f"and {index}); give each position once, and a larger strength to steer harder."
            )
        first_at[position] = index


def ablations(
    ctx: RequestContext, entry: ModelEntry, given: Sequence[AblationArgs], n_tokens: int
) -> tuple[Ablation, ...]:
    checked = []
    for args in given:
        node = own_node(ctx, entry, str(args.node_id))
        position = args.token_index
        if position is not None:
            position = check_position("ablation tokenIndex", position, n_tokens)
        check_magnitude(f"Ablation value of {node.id}", args.value)
        checked.append(Ablation(node=node, value=args.value, position=position))
    return tuple(checked)


def check_magnitude(what: str, value: float) -> None:
    if not abs(value) <= MAX_INTERVENTION_MAGNITUDE:  # nan too
        raise invalid_argument(
            f"{what} must be a number within ±{MAX_INTERVENTION_MAGNITUDE:g}, got {value}."
        )


def loss_spec(ctx: RequestContext, entry: ModelEntry, args: LossArgs) -> LossSpec:
    kind = LossKind(args.kind.value)
    targets = _token_ids(ctx, entry, args.target_tokens, args.target_token_ids)
    distractors = _token_ids(ctx, entry, args.distractor_tokens, args.distractor_token_ids)
    if kind is LossKind.LOGIT_DIFF and not (targets and distractors):
        raise invalid_argument("LOGIT_DIFF needs target and distractor tokens.")
    if kind in (LossKind.LOGIT_MINUS_MEAN, LossKind.PROBS) and not targets:
        raise invalid_argument(f"{kind.name} needs target tokens.")
    return LossSpec(kind=kind, targets=targets, distractors=distractors)


def _token_ids(
    ctx: RequestContext, entry: ModelEntry, texts: Sequence[str], ids: Sequence[int]
) -> tuple[int, ...]:
    found = []
    for text in texts:
        encoded = encode(ctx, entry, text)
        if len(encoded) != 1:
            raise InvalidInputError(
                f"{text!r} is {len(encoded)} tokens, not one: {list(encoded)}.",
                code="INVALID_TOKEN",
            )
        found.append(encoded[0])
    for token in ids:
        if not 0 <= token < entry.architecture.n_vocab:
            raise InvalidInputError(
                f"Token id {token} is not in [0, {entry.architecture.n_vocab}).",
                code="INVALID_TOKEN",
            )
        found.append(token)
    return tuple(found)


def _trace(ctx: RequestContext, entry: ModelEntry, args: TraceArgs, n_tokens: int) -> TraceSpec:
    upstream = own_node(ctx, entry, str(args.upstream_node_id))
    if not entry.kind(upstream.kind).traceable:
        raise invalid_argument(f"A trace cannot start at a {upstream.kind} node.")
    position = check_position("trace tokenIndex", args.token_index, n_tokens)
    key_position = args.key_token_index
    if key_position is not None:
        key_position = check_position("trace keyTokenIndex", key_position, n_tokens)
        if key_position > position:
            raise invalid_argument(
                f"trace keyTokenIndex ({key_position}) must not come after tokenIndex "
                f"({position}): a query attends to itself and earlier tokens only."
            )
    attention = (
        None
        if args.attention_trace_type is None
        else AttentionTrace(args.attention_trace_type.value)
    )
    if attention is AttentionTrace.V:
        # What a head writes from a key is read off W_O, which the stream never sees as such.
        entry.require_writes_reach_stream("A V trace")
    if entry.kind(upstream.kind).attends:
        if attention is None or key_position is None:
            raise invalid_argument(
                "Tracing an attention head needs attentionTraceType (Q, K, QK or V) and "
                "keyTokenIndex."
            )
    elif attention is not None or key_position is not None:
        raise invalid_argument(
            "attentionTraceType and keyTokenIndex apply to attention heads only."
        )
    downstream = None
    if args.downstream_node_id is not None:
        if attention is not AttentionTrace.V:
            # Only a V trace reads a downstream node; any other would ignore it.
            raise invalid_argument("downstreamNodeId applies to V traces only.")
        downstream = own_node(ctx, entry, str(args.downstream_node_id))
        if not reads_after(entry, upstream, downstream):
            raise invalid_argument(
                "The downstream node must read the residual stream after the upstream node "
                "writes to it."
            )
    return TraceSpec(
        upstream=upstream,
        position=position,
        attention=attention,
        key_position=key_position,
        downstream=downstream,
    )


def own_node(ctx: RequestContext, entry: ModelEntry, node_id: str) -> NodeRef:
    node = node_from_id(ctx, node_id)
    if node.model != entry.name:
        raise invalid_node(node_id, f"it belongs to another model than {entry.name!r}")
    return node


async def result(ctx: RequestContext, spec: InferenceSpec, needs: Needs | None = None) -> RowResult:
    return await ctx.inference.load(spec, needs or Needs())


async def next_token_loss(ctx: RequestContext, spec: InferenceSpec) -> float | None:
    return (await result(ctx, spec, Needs(logits=LogitPositions.ALL))).next_token_loss


async def token_losses(ctx: RequestContext, spec: InferenceSpec) -> list[float | None]:
    found = (await result(ctx, spec, Needs(token_losses=True))).token_losses
    assert found is not None
    return [None if np.isnan(v) else float(v) for v in found.tolist()]


async def objective(ctx: RequestContext, spec: InferenceSpec) -> float | None:
    value = (await result(ctx, spec, objective_needs(spec))).objective
    return value if math.isfinite(value) else None


async def pass_figures(ctx: RequestContext, spec: InferenceSpec) -> PassFigures:
    done = await result(ctx, spec)
    return PassFigures(
        elapsed_ms=done.elapsed_s * 1000.0,
        batch_size=done.batch_size,
        memory_before_bytes=done.memory_before_bytes,
        memory_after_bytes=done.memory_after_bytes,
        from_cache=done.from_cache,
    )


def _node_needs(entry: ModelEntry, nodes: list[NodeRef]) -> Needs:
    return Needs(
        layer_kinds=frozenset((n.layer, n.kind) for n in nodes),
        pattern_layers=frozenset(n.layer for n in nodes if entry.kind(n.kind).attends),
    )


async def node_values(
    ctx: RequestContext, spec: InferenceSpec, nodes: list[NodeRef]
) -> list[NodeValues]:
    entry = ctx.registry.get(spec.model)
    done = await result(ctx, spec, _node_needs(entry, nodes))
    out = []
    for node in nodes:
        refused = _writes_refused(entry, node.kind)
        values = done.activations(node.layer, node.kind)[:, node.index]
        pattern = pairs = None
        if entry.kind(node.kind).attends:
            pattern = done.patterns[node.layer][:, node.index, :]
            found = done.pair_attributions.get(node.layer)
            pairs = None if found is None else found[:, node.index, :]
        out.append(NodeValues(node, spec.tokens, values, pattern, pairs, refused))
    return out


def _writes_refused(entry: ModelEntry, kind: str) -> Exception | None:
    """Why a kind's one number per token cannot be served, where it is a write's norm and
    the writes pass a norm before the stream (None where it can)."""
    if entry.kind(kind).per_token_value != "write_norm":
        return None
    return entry.writes_refusal(
        f"The {kind} value per token (the norm of its write; attentionPattern is served)"
    )


async def activations_of_ids(
    ctx: RequestContext, spec: InferenceSpec, node_ids: list[str]
) -> list[NodeValues]:
    check_range("number of ids", len(node_ids), 0, ctx.settings.max_nodes_per_request + 1)
    entry = ctx.registry.get(spec.model)
    nodes = [own_node(ctx, entry, node_id) for node_id in node_ids]
    return await node_values(ctx, spec, nodes)


async def layer_values(
    ctx: RequestContext, spec: InferenceSpec, layer: int, kind: str
) -> np.ndarray:
    """[position, node] activations of every node of one kind in one layer."""
    entry = ctx.registry.get(spec.model)
    entry.check_layer(layer)
    entry.node(kind, layer, 0)  # raises when the model has no such nodes
    refused = _writes_refused(entry, kind)
    if refused is not None:
        raise refused
    done = await result(ctx, spec, Needs(layer_kinds=frozenset({(layer, kind)})))
    return done.activations(layer, kind)


async def logits_at(ctx: RequestContext, spec: InferenceSpec, token_index: int) -> np.ndarray:
    """[vocab] float64 logits at `token_index` (negative counts from the end); the pass
    unembeds only the last position when that is the one asked for."""
    n_tokens = len(spec.tokens)
    position = check_position("tokenIndex", token_index, n_tokens)
    if position == n_tokens - 1:
        found = (await result(ctx, spec, Needs(logits=LogitPositions.LAST))).last_logits
    else:
        done = await result(ctx, spec, Needs(logit_rows=frozenset({position})))
        found = done.position_logits[position]
    assert found is not None
    return found.astype(np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    peak = float(logits.max())
    log_norm = float(np.log(np.exp(logits - peak).sum())) + peak
    shifted: np.ndarray = logits - log_norm
    return shifted


async def top_predictions(
    ctx: RequestContext, spec: InferenceSpec, k: int, bottom: bool = False, token_index: int = -1
) -> list[Prediction]:
    check_range("k", k, 1, ctx.settings.max_top_k + 1)
    logits = await logits_at(ctx, spec, token_index)
    ranked = logits if bottom else -logits
    in_use = ctx.registry.get(spec.model).tokens_in_use()
    if bottom and in_use is not None:
        # Tokens never learned share one logit below every learned token's (the demo's):
        # the least likely of them says nothing about the prompt.
        ranked = np.where(in_use, ranked, np.inf)
        k = min(k, int(in_use.sum()))
    k = min(k, logits.shape[0])
    top = np.argpartition(ranked, k - 1)[:k]
    top = top[np.argsort(ranked[top], kind="stable")]
    log_probs = _log_softmax(logits)
    return [Prediction(int(t), float(logits[t]), float(np.exp(log_probs[t]))) for t in top]


@dataclass(frozen=True)
class TokenProbability:
    token: int
    logit: float
    log_probability: float
    rank: int  # tokens with a strictly higher logit


async def token_probabilities(
    ctx: RequestContext,
    spec: InferenceSpec,
    texts: Sequence[str],
    ids: Sequence[int],
    token_index: int,
) -> list[TokenProbability]:
    check_range("tokens asked for", len(texts) + len(ids), 1, ctx.settings.max_top_k + 1)
    tokens = _token_ids(ctx, ctx.registry.get(spec.model), texts, ids)
    logits = await logits_at(ctx, spec, token_index)
    log_probs = _log_softmax(logits)
    return [
        TokenProbability(
            token=t,
            logit=float(logits[t]),
            log_probability=float(log_probs[t]),
            rank=int((logits > logits[t]).sum()),
        )
        for t in tokens
    ]


@dataclass(frozen=True)
class StreamNorms:
    layer: int
    hook_name: str  # TransformerLens's name of the point
    norms: list[float]  # per position


async def residual_norms(ctx: RequestContext, spec: InferenceSpec) -> list[StreamNorms]:
    done = await result(ctx, spec, Needs(stream_norms=True))
    return [
        StreamNorms(point.layer, f"blocks.{point.layer}.hook_{point.location.value}", v.tolist())
        for point, v in sorted(
            done.stream_norms.items(), key=lambda item: (item[0].layer, item[0].location.value)
        )
    ]
