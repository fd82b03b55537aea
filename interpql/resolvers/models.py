"""Models, layers, nodes and tokenization."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from interpql.errors import InvalidInputError, check_range
from interpql.loaders.registry import DictionarySummary, ModelEntry
from interpql.resolvers.context import RequestContext
from interpql.resolvers.search import offset_of, ordered_indices
from interpql.specs import NodeRef, parse_node_id


@dataclass(frozen=True)
class ModelView:
    """What the schema shows of a model, as plain values."""

    name: str
    backend: str
    loaded: bool
    device: str
    dtype: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    n_ctx: int
    n_vocab: int


@dataclass(frozen=True)
class AutoencoderSummary:
    kind: str
    layer: int
    input: str
    n_latents: int
    source: str


@dataclass(frozen=True)
class TokenInfo:
    index: int  # its position
    id: int
    text: str
    in_use: bool


def view(entry: ModelEntry) -> ModelView:
    arch = entry.architecture
    return ModelView(
        name=entry.name,
        backend=entry.backend_name,
        loaded=entry.backend is not None,
        device=entry.device,
        dtype=entry.dtype,
        n_layers=arch.n_layers,
        d_model=arch.d_model,
        n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads or arch.n_heads,
        d_head=arch.d_head,
        d_mlp=arch.d_mlp,
        n_ctx=arch.n_ctx,
        n_vocab=arch.n_vocab,
    )


def models(ctx: RequestContext) -> list[ModelView]:
    return [view(entry) for entry in ctx.registry.all()]


def model(ctx: RequestContext, name: str) -> ModelView:
    return view(ctx.registry.get(name))


def check_layer(ctx: RequestContext, model_name: str, layer: int) -> int:
    return ctx.registry.get(model_name).check_layer(layer)


def autoencoders(ctx: RequestContext, model_name: str) -> list[AutoencoderSummary]:
    """The openai-format autoencoders: the sets named for their latents' kinds."""
    summaries = [
        AutoencoderSummary(
            kind=d.name,
            layer=d.layer,
            input=d.autoencoder_input,
            n_latents=d.n_latents,
            source=d.source,
        )
        for d in dictionaries(ctx, model_name)
        if d.autoencoder_input
    ]
    return sorted(summaries, key=lambda s: (s.layer, s.kind))


def dictionaries(ctx: RequestContext, model_name: str) -> list[DictionarySummary]:
    return ctx.registry.get(model_name).dictionary_summaries()


def node_from_id(ctx: RequestContext, node_id: str) -> NodeRef:
    return ctx.registry.resolve(parse_node_id(node_id))


def nodes_from_ids(ctx: RequestContext, node_ids: list[str]) -> list[NodeRef]:
    check_range("number of ids", len(node_ids), 0, ctx.settings.max_nodes_per_request + 1)
    return [node_from_id(ctx, node_id) for node_id in node_ids]


def node(ctx: RequestContext, model_name: str, kind: str, layer: int, index: int) -> NodeRef:
    entry = ctx.registry.get(model_name)
    # Checked first: the client gave a kind (a dictionary's name), not an id to call invalid.
    entry.check_kind(kind)
    return entry.node(kind, layer, index)


def node_kind_counts(
    ctx: RequestContext, model_name: str, layer: int | None = None
) -> list[tuple[str, int]]:
    """Counts per kind in one layer, or summed over all layers; kinds with none are left out."""
    entry = ctx.registry.get(model_name)
    layers = range(entry.architecture.n_layers) if layer is None else [layer]
    counts = [(k.name, sum(entry.node_count(k.name, i) for i in layers)) for k in entry.kinds()]
    return [(kind, n) for kind, n in counts if n > 0]


def layer_nodes(
    ctx: RequestContext,
    model_name: str,
    *,
    layer: int,
    kind: str,
    first: int,
    after: str | None,
    order: str,
) -> tuple[list[tuple[int, NodeRef]], int, int]:
    """One page of a layer's nodes of one kind, as (position, node), the total count, and the
    position the page starts at."""
    entry = ctx.registry.get(model_name)
    entry.check_kind(kind)
    check_range("first", first, 0, 1001)
    start = offset_of(after)
    indices = ordered_indices(entry, layer, kind, order)[start : start + first]
    page = [
        (start + i, NodeRef(entry.name, kind, layer, int(index))) for i, index in enumerate(indices)
    ]
    return page, entry.node_count(kind, layer), start


def token_text(ctx: RequestContext, model_name: str, token: int) -> str:
    return ctx.registry.get(model_name).token_text(token)


def token_info(ctx: RequestContext, model_name: str, index: int, token: int) -> TokenInfo:
    return _token_info(ctx.registry.get(model_name), index, token)


def token_infos(ctx: RequestContext, model_name: str, tokens: Sequence[int]) -> list[TokenInfo]:
    return tokens_of(ctx.registry.get(model_name), tokens)


def _token_info(entry: ModelEntry, index: int, token: int) -> TokenInfo:
    return TokenInfo(index, token, entry.token_text(token), entry.token_in_use(token))


def encode(ctx: RequestContext, entry: ModelEntry, text: str) -> tuple[int, ...]:
    max_chars = entry.architecture.n_ctx * ctx.settings.max_chars_per_token
    if len(text) > max_chars:
        # Checked before tokenizing, so a megabyte is refused without the work; tokenize's
        # answers may be longer than a context, but not by more than this.
        raise InvalidInputError(
            f"Text of {len(text)} characters is over the limit of {max_chars} (the model's "
            f"context of {entry.architecture.n_ctx} tokens, at "
            f"{ctx.settings.max_chars_per_token} characters a token).",
            code="PROMPT_TOO_LONG",
        )
    tokenizer = entry.require_backend().tokenizer
    return tuple(tokenizer.encode(text, allowed_special="all"))


def tokenize(ctx: RequestContext, model_name: str, text: str) -> list[TokenInfo]:
    entry = ctx.registry.get(model_name)
    return tokens_of(entry, encode(ctx, entry, text))


def tokens_of(entry: ModelEntry, tokens: Sequence[int]) -> list[TokenInfo]:
    return [_token_info(entry, i, t) for i, t in enumerate(tokens)]


def encode_nonempty(ctx: RequestContext, entry: ModelEntry, prompt: str) -> tuple[int, ...]:
    """The prompt's tokens, EMPTY_PROMPT when there are none; its length is the caller's to
    check (an attribution graph's limit is not the context window)."""
    tokens = encode(ctx, entry, prompt)
    if not tokens:
        raise InvalidInputError("The prompt is empty.", code="EMPTY_PROMPT")
    return tokens


def encode_prompt(ctx: RequestContext, entry: ModelEntry, prompt: str) -> tuple[int, ...]:
    tokens = encode_nonempty(ctx, entry, prompt)
    if len(tokens) > entry.architecture.n_ctx:
        raise InvalidInputError(
            f"The prompt has {len(tokens)} tokens; model {entry.name!r} reads at most "
            f"{entry.architecture.n_ctx}.",
            code="PROMPT_TOO_LONG",
        )
    return tokens


def generation_caches(ctx: RequestContext) -> bool:
    """Whether every served model's backend keeps a key-value cache while it generates (each
    step after the first then runs one token): what the cost estimate charges generation."""
    backends = [entry.backend for entry in ctx.registry.all() if entry.backend is not None]
    return bool(backends) and all(b.caches_keys_and_values for b in backends)


def prompt_token_counter(ctx: RequestContext) -> Callable[[str], int]:
    """Counts a prompt's tokens with every served model's tokenizer (the largest count),
    capped at the longest context window: what the cost estimate charges. A text too long for
    any context is not tokenized: it is refused for its length before anything runs."""
    entries = ctx.registry.all()
    most = max((e.architecture.n_ctx for e in entries), default=1)
    tokenizers = list({id(b.tokenizer): b.tokenizer for e in entries if (b := e.backend)}.values())
    max_chars = most * ctx.settings.max_chars_per_token

    def count(text: str) -> int:
        if len(text) > max_chars:
            return most
        if not tokenizers:  # metadata only: byte-level BPE makes at most a token per byte
            return min(most, len(text.encode("utf-8", errors="replace")))
        return min(most, max(len(t.encode(text, allowed_special="all")) for t in tokenizers))

    return count
