"""Scored tokens of a node, from the weights alone (no prompt):

* upvoted / downvoted output tokens: the logit lens of the node's write direction, d @ W_U;
* upvoting input tokens: for an MLP neuron, the token embeddings' dot product with its input
  weights, W_E @ W_in[:, n]; for an attention head, the norm of what each token embedding
  contributes to the head's query and key, |W_E @ W_Q[h]| and |W_E @ W_K[h']| (h' its key-value
  head: h itself, or h // (heads per key-value head) with grouped-query attention).

These are raw weight products, without the LayerNorms in between: a lens, not an exact
attribution. Attention heads write no fixed direction (W_O spans a subspace), so they have no
output tokens (None), and only heads have key tokens. Tokens the
model never learned (a zero input embedding: ModelEntry.unused_tokens) are left out: their
unembedding columns are whatever training left there, and they would crowd every list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interpql.backends.node_kinds import AttentionHeads, MlpNeurons
from interpql.errors import UnavailableError
from interpql.loaders.analysis import write_directions
from interpql.loaders.registry import ModelEntry
from interpql.specs import NodeRef


@dataclass(frozen=True)
class TokenScores:
    # None for attention heads: they write a subspace (W_O's rows), not one direction.
    upvoted_output: list[tuple[int, float]] | None
    downvoted_output: list[tuple[int, float]] | None
    # MLP neurons; heads: through their query. None for other kinds, and for a gated MLP's
    # neuron: it reads no one direction.
    upvoting_input: list[tuple[int, float]] | None
    upvoting_input_keys: list[tuple[int, float]] | None  # attention heads only: their key


def _top(
    values: torch.Tensor, k: int, unused: torch.Tensor | None, largest: bool = True
) -> list[tuple[int, float]]:
    ids = torch.arange(values.shape[0])
    if unused is not None:
        ids, values = ids[~unused], values[~unused]
    found = torch.topk(values, min(k, values.shape[0]), largest=largest)
    return list(zip(ids[found.indices].tolist(), found.values.tolist(), strict=True))


def scored_tokens(entry: ModelEntry, node: NodeRef, k: int) -> TokenScores:
    backend = entry.require_backend()
    kind = entry.kind(node.kind)
    w_e = backend.weight("W_E")  # [vocab, d_model]
    unused = entry.unused_tokens()
    if isinstance(kind, AttentionHeads):
        arch = backend.architecture
        # Grouped-query attention: query head h reads key-value head h // group (base.py).
        group = arch.n_heads // (arch.n_kv_heads or arch.n_heads)
        queries = (w_e @ backend.weight(f"blocks.{node.layer}.attn.W_Q")[node.index]).norm(dim=-1)
        w_k = backend.weight(f"blocks.{node.layer}.attn.W_K")[node.index // group]
        keys = (w_e @ w_k).norm(dim=-1)
        return TokenScores(None, None, _top(queries, k, unused), _top(keys, k, unused))
    if not kind.has_write_direction:
        raise UnavailableError(f"Nodes of kind {kind.name} have no scored tokens.")
    entry.require_writes_reach_stream("scoredTokens of a node that writes to the stream")
    direction = write_directions(entry, node.layer, node.kind)[node.index]  # [d_model]
    logits = direction @ backend.weight("W_U")  # [vocab]
    # Only a neuron reads one residual-stream direction through W_in; a latent reads its
    # hook (neuron values, the head outputs, the stream) through a LayerNorm or none: null.
    upvoting: list[tuple[int, float]] | None = None
    if isinstance(kind, MlpNeurons):
        read = kind.read_direction(backend, node.layer, node.index)
        upvoting = None if read is None else _top(w_e @ read, k, unused)
    return TokenScores(
        _top(logits, k, unused), _top(logits, k, unused, largest=False), upvoting, None
    )
