"""Transformer Debugger's analyses of one run: losses, top nodes per group, token-pair
attribution and scored tokens."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

import numpy as np

from interpql.backends.base import LossKind, LossSpec
from interpql.errors import InvalidInputError, check_range, invalid_argument
from interpql.loaders.inference import ActivationNeeds, LayerKind, PromptRun
from interpql.loaders.nodes import NodeKind, NodeRef
from interpql.loaders.registry import ModelEntry
from interpql.loaders.scored_tokens import TokenScores, scored_tokens
from interpql.resolvers.context import RequestContext
from interpql.resolvers.inference import AttentionComponent, MlpComponent, Prompt, run
from interpql.resolvers.models import encode


class Group(Enum):
    ACTIVATION = "activation"
    WRITE_NORM = "write_norm"
    DIRECT_EFFECT = "direct_effect"
    ACT_TIMES_GRAD = "act_times_grad"


@dataclass(frozen=True)
class LossRequest:
    kind: LossKind
    target_tokens: list[str]
    distractor_tokens: list[str]
    target_token_ids: list[int]
    distractor_token_ids: list[int]


@dataclass(frozen=True)
class ScoredNode:
    node: NodeRef
    value: float


@dataclass(frozen=True)
class Ranking:
    top: list[ScoredNode]
    bottom: list[ScoredNode]
    token_sums: list[float]  # per token: the group's value summed over every ranked node


def loss_spec(ctx: RequestContext, entry: ModelEntry, request: LossRequest) -> LossSpec:
    targets = _token_ids(ctx, entry, request.target_tokens, request.target_token_ids)
    distractors = _token_ids(ctx, entry, request.distractor_tokens, request.distractor_token_ids)
    if request.kind is LossKind.LOGIT_DIFF and not (targets and distractors):
        raise invalid_argument("LOGIT_DIFF needs target and distractor tokens.")
    if request.kind in (LossKind.LOGIT_MINUS_MEAN, LossKind.PROBS) and not targets:
        raise invalid_argument(f"{request.kind.name} needs target tokens.")
    return LossSpec(request.kind, targets, distractors)


def _token_ids(
    ctx: RequestContext, entry: ModelEntry, texts: list[str], ids: list[int]
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


def ranked_kinds(prompt: Prompt) -> list[NodeKind]:
    mlp = (
        NodeKind.MLP_NEURON
        if prompt.mlp_component is MlpComponent.NEURON
        else NodeKind.MLP_AUTOENCODER_LATENT
    )
    attention = (
        NodeKind.ATTENTION_HEAD
        if prompt.attention_component is AttentionComponent.HEAD
        else NodeKind.ATTENTION_AUTOENCODER_LATENT
    )
    return [attention, mlp]


def _layer_kinds(prompt: Prompt) -> list[LayerKind]:
    entry = prompt.entry
    first_layer = 0
    if prompt.hide_early_layers_when_ablating and prompt.variant.ablations:
        # Layers before the first ablation run as without it: nothing there to see.
        first_layer = min(a.node.layer for a in prompt.variant.ablations)
    return [
        (layer, kind)
        for layer in range(first_layer, entry.architecture.n_layers)
        for kind in ranked_kinds(prompt)
        if entry.node_count(kind, layer) > 0
    ]


def group_needs(group: Group, layer_kinds: list[LayerKind]) -> ActivationNeeds:
    chosen = frozenset(layer_kinds)
    if group is Group.ACT_TIMES_GRAD:
        return ActivationNeeds(gradient_layer_kinds=chosen)
    return ActivationNeeds(layer_kinds=chosen, final_gradient=group is Group.DIRECT_EFFECT)


def _group_values(result: PromptRun, layer_kind: LayerKind, group: Group) -> np.ndarray:
    scores = result.scores[layer_kind]
    values = getattr(scores, group.value)
    assert values is not None, f"{group} was not computed"
    return values  # type: ignore[no-any-return]


async def top_nodes(
    ctx: RequestContext, prompt: Prompt, group: Group, k: int, token: int | None
) -> Ranking:
    check_range("k", k, 0, ctx.settings.max_top_k + 1)
    if token is not None:
        check_range("tokenIndex", token, 0, len(prompt.tokens))
    layer_kinds = _layer_kinds(prompt)
    if not layer_kinds:
        raise invalid_argument("The model has no nodes of the chosen component types.")
    result = await run(ctx, prompt, group_needs(group, layer_kinds))
    blocks = [_group_values(result, lk, group) for lk in layer_kinds]  # each [token, node]
    owners = [
        (lk, i)
        for lk, block in zip(layer_kinds, blocks, strict=True)
        for i in range(block.shape[1])
    ]
    per_token = np.concatenate(blocks, axis=1)  # [token, all nodes]
    values = per_token[token] if token is not None else per_token.sum(axis=0)
    k = min(k, values.shape[0])
    order = np.argsort(-values, kind="stable")

    def scored(indices: np.ndarray) -> list[ScoredNode]:
        out = []
        for i in indices:
            (layer, kind), index = owners[int(i)]
            out.append(ScoredNode(NodeRef(prompt.entry.name, kind, layer, index), float(values[i])))
        return out

    return Ranking(
        top=scored(order[:k]),
        bottom=scored(order[::-1][:k]),
        token_sums=per_token.sum(axis=1).tolist(),
    )


async def objective(ctx: RequestContext, prompt: Prompt) -> float:
    return (await run(ctx, prompt, ActivationNeeds())).objective


async def node_scored_tokens(ctx: RequestContext, node: NodeRef, k: int) -> TokenScores:
    check_range("k", k, 1, ctx.settings.max_top_k + 1)
    entry = ctx.registry.get(node.model)
    entry.require_backend()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(entry.executor, scored_tokens, entry, node, k)
