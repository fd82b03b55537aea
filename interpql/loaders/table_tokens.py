"""The tokens Transformer Debugger's UI shows beside each row of its node table, for all rows
of a table at once (on the model's worker thread):

* upvoted and downvoted output tokens: the row's write w (its activation times its direction;
  a head pair's p v_k W_O; an embedding's token plus position embedding; no biases) through the
  unembedding with the final LayerNorm's gain, u = w @ (W_U * gain), less u's mean over the
  vocabulary. The sign and size of the activation stay in: a negative one swaps the lists;
* input tokens that upvote an MLP neuron: W_E @ r, r the gradient of the neuron's
  pre-activation with respect to the residual stream it reads at the row's token, with the
  LayerNorm's scale s held: (1/s) P(gain_2 * W_in[:, n]), P removing the mean. Token
  embeddings alone: no position embedding, no LayerNorm;
* the 3 tokens an attention-dictionary latent attends to most: per key token k,
  (sum_h p[q, k, h] v_k W_O[h]) . e, e the latent's encoder row, while the latent is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from interpql.backends.base import Backend, HookPoint, Location, Tokenizer
from interpql.backends.dictionaries.base import Dictionary
from interpql.backends.node_kinds import (
    AttentionHeads,
    DictionaryLatents,
    MlpNeurons,
    TokenEmbeddings,
)
from interpql.loaders.analysis import write_directions
from interpql.loaders.node_table import TableRow
from interpql.loaders.pass_results import RowResult
from interpql.loaders.registry import ModelEntry

ATTENDED_TOKENS = 3  # Transformer Debugger's top attended-to tokens per latent

TokenValue = tuple[int, float]


@dataclass(frozen=True)
class RowTokens:
    upvoted_output: list[TokenValue]  # highest first
    downvoted_output: list[TokenValue]  # lowest first
    upvoting_input: list[TokenValue] | None  # MLP neurons only
    attended_to: list[TokenValue] | None  # (key token, attribution): attention latents only


def least_common_gpt2_tokens() -> frozenset[int]:
    """The 596 GPT-2 tokens Transformer Debugger leaves out of scored tokens as the least
    common (interpql/data/gpt2_least_common_tokens.txt says where the list comes from)."""
    text = (resources.files("interpql") / "data" / "gpt2_least_common_tokens.txt").read_text()
    return frozenset(
        int(line) for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def excluded_tokens(entry: ModelEntry, rare: bool) -> frozenset[int]:
    """Token ids no list of the table holds: tokens the model never learned (Token.inUse),
    and with `rare`, on a GPT-2 vocabulary, the 596 least common. Worked out once per model."""
    key = ("table_excluded_tokens", rare)
    if key not in entry.derived:
        excluded = frozenset[int]()
        if rare and uses_gpt2_vocabulary(entry.require_backend().tokenizer):
            excluded = least_common_gpt2_tokens()
        unused = entry.unused_tokens()
        if unused is not None:
            excluded |= frozenset(unused.nonzero().flatten().tolist())
        entry.derived[key] = excluded
    found: frozenset[int] = entry.derived[key]
    return found


def uses_gpt2_vocabulary(tokenizer: Tokenizer) -> bool:
    return (
        tokenizer.n_vocab == 50257
        and tokenizer.decode_single_token_bytes(50256) == b"<|endoftext|>"
        and tokenizer.decode_single_token_bytes(464) == b"The"
    )


def row_tokens(
    entry: ModelEntry, done: RowResult, rows: list[TableRow], n: int, excluded: frozenset[int]
) -> list[RowTokens]:
    """`n` tokens per list; `excluded`: token ids no output list may hold."""
    backend = entry.require_backend()
    if not rows:
        return []
    writes = torch.stack([_write(entry, done, row) for row in rows])  # [row, d_model]
    logits = writes @ _gained_unembedding(entry)  # [row, vocab]
    logits -= logits.mean(dim=-1, keepdim=True)
    blocked = torch.tensor(sorted(excluded), dtype=torch.long, device=logits.device)
    upvoted = _ranked(logits.index_fill(1, blocked, float("-inf")), n, largest=True)
    downvoted = _ranked(logits.index_fill(1, blocked, float("inf")), n, largest=False)
    inputs = _upvoting_inputs(entry, backend, done, rows, n, blocked)
    return [
        RowTokens(
            upvoted_output=upvoted[i],
            downvoted_output=downvoted[i],
            upvoting_input=inputs.get(i),
            attended_to=_attended_to(entry, backend, done, row),
        )
        for i, row in enumerate(rows)
    ]


def _ranked(values: torch.Tensor, n: int, largest: bool) -> list[list[TokenValue]]:
    found = torch.topk(values, min(n, values.shape[-1]), dim=-1, largest=largest)
    return [
        list(zip(ids, vals, strict=True))
        for ids, vals in zip(found.indices.tolist(), found.values.tolist(), strict=True)
    ]


def _gained_unembedding(entry: ModelEntry) -> torch.Tensor:
    """W_U with each input row times the final LayerNorm's gain: [d_model, vocab]."""
    key = ("gained_unembedding",)
    if key not in entry.derived:
        backend = entry.require_backend()
        unembed = backend.weight("W_U")
        gain = _optional_weight(backend, "ln_final.w")  # None: folded into W_U, or no gain
        if gain is not None:
            unembed = unembed * gain[:, None]
        entry.derived[key] = unembed.contiguous()
    found: torch.Tensor = entry.derived[key]
    return found


def _centred_reads(entry: ModelEntry, layer: int) -> torch.Tensor:
    """P(gain_2 * W_in) of a layer's MLP, [d_model, d_mlp]: each neuron's input weights through
    its LayerNorm's gain, less their mean (the LayerNorm's centring). Once per model and layer."""
    key = ("centred_mlp_reads", layer)
    if key not in entry.derived:
        backend = entry.require_backend()
        reads = backend.weight(f"blocks.{layer}.mlp.W_in")
        gain = _optional_weight(backend, f"blocks.{layer}.ln2.w")
        if gain is not None:
            reads = reads * gain[:, None]
        entry.derived[key] = reads - reads.mean(dim=0, keepdim=True)
    found: torch.Tensor = entry.derived[key]
    return found


def _optional_weight(backend: Backend, name: str) -> torch.Tensor | None:
    try:
        return backend.weight(name)
    except KeyError:
        return None


def _write(entry: ModelEntry, done: RowResult, row: TableRow) -> torch.Tensor:
    """What the row's element writes to the residual stream, biases aside: [d_model]."""
    backend = entry.require_backend()
    e, activation = row.element, row.values["activation"]
    if e.kind == TokenEmbeddings.name:
        write = backend.weight("W_E")[done.spec.tokens[e.position]]
        positions = _optional_weight(backend, "W_pos")  # None: rotary models
        if positions is not None:
            write = write + positions[e.position]
        return write.float()
    if e.kind == AttentionHeads.name:
        assert e.key_position is not None
        value = torch.from_numpy(done.head_values[e.layer][e.key_position, e.index])
        w_o = write_directions(entry, e.layer, AttentionHeads.name)[e.index]  # [d_head, d_model]
        return activation * (value.to(w_o.device) @ w_o)
    return activation * write_directions(entry, e.layer, e.kind)[e.index]


def _upvoting_inputs(
    entry: ModelEntry,
    backend: Backend,
    done: RowResult,
    rows: list[TableRow],
    n: int,
    blocked: torch.Tensor,
) -> dict[int, list[TokenValue]]:
    neurons = [i for i, row in enumerate(rows) if row.element.kind == MlpNeurons.name]
    if not neurons or entry.architecture.gated_mlp:  # a gated neuron reads no one direction
        return {}
    reads = []
    for i in neurons:
        e = rows[i].element
        scale = done.norm_scales[HookPoint(e.layer, Location.RESID_MID)][e.position]
        reads.append(_centred_reads(entry, e.layer)[:, e.index] / float(scale))
    scores = torch.stack(reads) @ backend.weight("W_E").T  # [neuron row, vocab]
    ranked = _ranked(scores.index_fill(1, blocked, float("-inf")), n, largest=True)
    return dict(zip(neurons, ranked, strict=True))


def _attended_to(
    entry: ModelEntry, backend: Backend, done: RowResult, row: TableRow
) -> list[TokenValue] | None:
    e = row.element
    kind = entry.kind(e.kind)
    # Latents reading the attention's output: which keys' writes they read.
    if not isinstance(kind, DictionaryLatents):
        return None
    attached = kind.attached(backend, e.layer)
    if attached.input is not Location.ATTN_OUT:
        return None
    if row.values["activation"] == 0:  # an inactive latent reads nothing
        return None
    probs = torch.from_numpy(done.patterns[e.layer][e.position])  # [head, key]
    values = torch.from_numpy(done.head_values[e.layer])  # [key, head, d_head]
    w_o = write_directions(entry, e.layer, AttentionHeads.name)  # [head, d_head, d_model]
    per_key = torch.einsum("hk,khd,hdm->km", probs, values, w_o.cpu())  # [key, d_model]
    attribution = per_key @ _encoder_row(attached.dictionary, e.index, backend).cpu()
    found = torch.topk(attribution, min(ATTENDED_TOKENS, attribution.shape[0]))
    return list(zip(found.indices.tolist(), found.values.tolist(), strict=True))


def _encoder_row(dictionary: Dictionary, index: int, backend: Backend) -> torch.Tensor:
    """The gradient of latent `index`'s pre-activation with respect to the dictionary's input
    (its encoder row, for a linear encoder without normalisation)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros(dictionary.d_in, device=backend.device, requires_grad=True)
        (grad,) = torch.autograd.grad(dictionary.pre_activation(x)[index], x)
    return grad.float()
