"""Models, layers, nodes and tokenization."""

from __future__ import annotations

from dataclasses import dataclass

from interpql.backends.tokenizer import gpt2_encoding
from interpql.errors import InvalidInputError, check_range
from interpql.loaders.nodes import NodeKind, NodeRef, parse_node_id
from interpql.loaders.registry import LATENT_LOCATIONS, ModelEntry
from interpql.resolvers.context import RequestContext
from interpql.resolvers.search import offset_of, ordered_indices


@dataclass(frozen=True)
class AutoencoderSummary:
    kind: NodeKind
    layer: int
    input: str
    n_latents: int
    source: str


def autoencoders(entry: ModelEntry) -> list[AutoencoderSummary]:
    if entry.backend is None:
        return []
    kinds = {location: kind for kind, location in LATENT_LOCATIONS.items()}
    summaries = []
    for point, attached in sorted(entry.backend.autoencoders.items()):
        kind = kinds[point.location]
        summaries.append(
            AutoencoderSummary(
                kind=kind,
                layer=point.layer,
                input=attached.input.value,
                n_latents=attached.autoencoder.n_latents,
                source=entry.autoencoder_sources.get(kind, ""),
            )
        )
    return summaries


@dataclass(frozen=True)
class TokenInfo:
    index: int
    id: int
    text: str


def node_from_id(ctx: RequestContext, node_id: str) -> NodeRef:
    return ctx.registry.resolve(parse_node_id(node_id))


def nodes_from_ids(ctx: RequestContext, node_ids: list[str]) -> list[NodeRef]:
    check_range("number of ids", len(node_ids), 0, ctx.settings.max_nodes_per_request + 1)
    return [node_from_id(ctx, node_id) for node_id in node_ids]


def node_kind_counts(entry: ModelEntry, layer: int | None = None) -> list[tuple[NodeKind, int]]:
    """Counts per kind in one layer, or summed over all layers; kinds with none are left out."""
    layers = range(entry.architecture.n_layers) if layer is None else [layer]
    counts = [(kind, sum(entry.node_count(kind, i) for i in layers)) for kind in NodeKind]
    return [(kind, n) for kind, n in counts if n > 0]


def layer_nodes(
    entry: ModelEntry, layer: int, kind: NodeKind, first: int, after: str | None, order: str
) -> tuple[list[tuple[int, NodeRef]], int]:
    """One page of a layer's nodes of one kind, as (position, node), and the total count."""
    check_range("first", first, 0, 1001)
    start = offset_of(after)
    indices = ordered_indices(entry, layer, kind, order)[start : start + first]
    return [
        (start + i, NodeRef(entry.name, kind, layer, int(index))) for i, index in enumerate(indices)
    ], entry.node_count(kind, layer)


def token_text(entry: ModelEntry, token_id: int) -> str:
    # Served without weights, a GPT-2 model still has its tokenizer.
    tokenizer = entry.backend.tokenizer if entry.backend is not None else gpt2_encoding()
    return tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


def encode(ctx: RequestContext, entry: ModelEntry, text: str) -> tuple[int, ...]:
    max_chars = entry.architecture.n_ctx * ctx.settings.max_chars_per_token
    if len(text) > max_chars:
        raise InvalidInputError(
            f"Text of {len(text)} characters cannot fit the context of "
            f"{entry.architecture.n_ctx} tokens.",
            code="PROMPT_TOO_LONG",
        )
    tokenizer = entry.require_backend().tokenizer
    return tuple(tokenizer.encode(text, allowed_special="all"))


def tokenize(ctx: RequestContext, entry: ModelEntry, text: str) -> list[TokenInfo]:
    return [
        TokenInfo(index=i, id=t, text=token_text(entry, t))
        for i, t in enumerate(encode(ctx, entry, text))
    ]


def encode_prompt(ctx: RequestContext, entry: ModelEntry, prompt: str) -> tuple[int, ...]:
    tokens = encode(ctx, entry, prompt)
    if not tokens:
        raise InvalidInputError("The prompt is empty.", code="EMPTY_PROMPT")
    if len(tokens) > entry.architecture.n_ctx:
        raise InvalidInputError(
            f"The prompt has {len(tokens)} tokens; model {entry.name!r} reads at most "
            f"{entry.architecture.n_ctx}.",
            code="PROMPT_TOO_LONG",
        )
    return tokens
