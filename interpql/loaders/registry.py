"""The models this server serves, each with its backend and its one inference worker."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from interpql.backends.base import Architecture, AutoencoderInput, Backend
from interpql.backends.dictionaries.loading import hook_name
from interpql.backends.node_kinds import DictionaryLatents, NodeKind, kind_table
from interpql.backends.tokenizer import gpt2_encoding
from interpql.errors import (
    NotFoundError,
    UnavailableError,
    check_range,
    invalid_argument,
    invalid_node,
    model_not_found,
)
from interpql.loaders.search import SearchIndex, index_model
from interpql.loaders.sources.base import NodeSource
from interpql.specs import NodeRef

# Model and dictionary-set names: each is one path segment of a node id.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class DictionarySummary:
    name: str
    layer: int
    hook_in: str  # TransformerLens's hook names
    hook_out: str
    architecture: str
    d_in: int
    d_out: int
    n_latents: int
    transcoder: bool
    source: str
    autoencoder_input: str  # openai-format sets: what they read (mlp_post_act, ...); else ""


@dataclass
class ModelEntry:
    name: str
    architecture: Architecture
    backend: Backend | None  # None when serving metadata only (--no-model)
    backend_name: str
    device: str
    dtype: str
    # Where each attached dictionary set came from, by its name (the kind its latents are).
    dictionary_sources: dict[str, str] = field(default_factory=dict)
    # What is known about its nodes (records, explanations), first source first.
    sources: list[NodeSource] = field(default_factory=list)
    # Values derived once from the weights (write directions, ...), by the deriving module.
    derived: dict[Any, Any] = field(default_factory=dict)
    # One worker per model: torch already uses every core inside one forward pass, and a
    # single queue keeps requests from thrashing each other.
    _table: tuple[object, dict[str, NodeKind]] | None = field(default=None, init=False, repr=False)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
    )

    @property
    def table(self) -> dict[str, NodeKind]:
        """The model's node kinds by name: the structural ones and one per dictionary set
        (rebuilt only when a dictionary is attached, which replaces the backend's mapping)."""
        attached = None if self.backend is None else self.backend.dictionaries
        if self._table is None or self._table[0] is not attached:
            self._table = (attached, kind_table(self.backend))
        return self._table[1]

    def kinds(self) -> list[NodeKind]:
        """The kinds this model has nodes of (a dictionary's only where it is attached)."""
        return [
            kind
            for kind in self.table.values()
            if any(self.node_count(kind.name, layer) for layer in range(self.architecture.n_layers))
        ]

    def kind(self, name: str) -> NodeKind:
        """The table's entry for a kind name already checked (a parsed, resolved node's)."""
        return self.table[name]

    def check_kind(self, name: str) -> str:
        """INVALID_ARGUMENT for a kind name (a dictionary set's among them) this model lacks:
        a filter by it would find nothing, silently."""
        if name not in self.table:
            known = ", ".join(self.table)
            raise invalid_argument(f"{self.name!r} has no node kind {name!r} (known: {known}).")
        return name

    def node_count(self, kind: str, layer: int) -> int:
        """Nodes of `kind` in `layer` (0 where there are none, e.g. no dictionary there)."""
        found = self.table.get(kind)
        return 0 if found is None else found.count(self.architecture, self.backend, layer)

    def dictionary_sides(self) -> dict[str, str]:
        """Each dictionary set's side of its layers: mlp, attention or residual."""
        return {
            name: kind.side.group
            for name, kind in self.table.items()
            if isinstance(kind, DictionaryLatents)
        }

    def dictionary_layers(self, name: str) -> list[int]:
        """The layers that set `name` has a dictionary at, in order."""
        attached = {} if self.backend is None else self.backend.dictionaries
        return sorted(point.layer for point in attached if point.dictionary == name)

    def dictionary_summaries(self) -> list[DictionarySummary]:
        openai_inputs = {(i.kind_name, i.location): i.value for i in AutoencoderInput}
        attached = [] if self.backend is None else self.backend.dictionaries.values()
        summaries = [
            DictionarySummary(
                name=a.name,
                layer=a.layer,
                hook_in=hook_name(a.layer, a.input),
                hook_out=hook_name(a.layer, a.output),
                architecture=a.dictionary.architecture,
                d_in=a.dictionary.d_in,
                d_out=a.dictionary.d_out,
                n_latents=a.dictionary.n_latents,
                transcoder=a.is_transcoder,
                source=self.dictionary_sources.get(a.name, ""),
                autoencoder_input=openai_inputs.get((a.name, a.input), ""),
            )
            for a in attached
        ]
        return sorted(summaries, key=lambda s: (s.name, s.layer))

    def token_text(self, token: int) -> str:
        """A token's text; bytes that are not valid UTF-8 alone show as U+FFFD."""
        # Served without weights, a GPT-2 model still has its tokenizer.
        tokenizer = self.backend.tokenizer if self.backend is not None else gpt2_encoding()
        return tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    def unused_tokens(self) -> torch.Tensor | None:
        """[vocab] bool: the tokens whose input embedding is zero, which the model never saw
        in training (the demo's vocabulary outside its corpus); None when every token is used
        or, without weights, unknown."""
        if "unused_tokens" not in self.derived:
            unused = None
            if self.backend is not None:
                zero = self.backend.weight("W_E").abs().amax(dim=-1) == 0
                unused = zero if bool(zero.any()) else None
            self.derived["unused_tokens"] = unused
        found: torch.Tensor | None = self.derived["unused_tokens"]
        return found

    def tokens_in_use(self) -> np.ndarray | None:
        """[vocab] bool (numpy, for resolvers): the tokens the model learned; None when every
        token is used or, without weights, unknown."""
        unused = self.unused_tokens()
        return None if unused is None else ~unused.cpu().numpy()

    def token_in_use(self, token: int) -> bool:
        unused = self.unused_tokens()
        return unused is None or not (0 <= token < unused.shape[0] and bool(unused[token]))

    def require_writes_reach_stream(self, what: str) -> None:
        """UNSUPPORTED for `what` (a field reading nodes' write directions) on a model whose
        sublayer outputs pass a norm before they join the residual stream."""
        refused = self.writes_refusal(what)
        if refused is not None:
            raise refused

    def writes_refusal(self, what: str) -> UnavailableError | None:
        """The error require_writes_reach_stream raises, for a field to raise later (None
        where writes reach the stream as they are)."""
        if self.architecture.post_sublayer_norms:
            return UnavailableError(
                f"{what} is not computed for {self.name!r}: its post-attention and post-"
                "feed-forward norms (Gemma-2's) rescale every write, per token and per "
                "channel, before it joins the residual stream, so W_O and W_out do not say "
                "what reaches it. Activations, ablations and the ACTIVATION and "
                "ACT_TIMES_GRAD rankings are exact."
            )
        return None

    def require_backend(self) -> Backend:
        if self.backend is None:
            raise UnavailableError(
                f"Model {self.name!r} is served without weights (--no-model).",
                code="MODEL_NOT_LOADED",
            )
        return self.backend

    def check_layer(self, layer: int) -> int:
        return check_range("layer", layer, 0, self.architecture.n_layers)

    def node(self, kind: str, layer: int, index: int) -> NodeRef:
        """A reference to an existing node; INVALID_NODE when there is no such node."""
        ref = NodeRef(self.name, kind, layer, index)
        if kind not in self.table:
            known = ", ".join(self.table)
            raise invalid_node(ref.id, f"unknown kind {kind!r} (known: {known})")
        if not 0 <= layer < self.architecture.n_layers:
            raise invalid_node(ref.id, f"layer must be in [0, {self.architecture.n_layers})")
        count = self.node_count(kind, layer)
        if count == 0:
            raise invalid_node(ref.id, f"layer {layer} of {self.name!r} has no {kind} nodes")
        if not 0 <= index < count:
            raise invalid_node(ref.id, f"index must be in [0, {count}) for {kind}")
        return ref


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}
        self.search = SearchIndex()

    def add(self, entry: ModelEntry) -> None:
        if not NAME.match(entry.name):
            raise ValueError(
                f"model name {entry.name!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        if entry.name in self._models:
            raise ValueError(f"a model named {entry.name!r} is already registered")
        self._models[entry.name] = entry
        index_model(self.search, entry.name, entry.sources)

    def get(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise model_not_found(name)
        return entry

    def all(self) -> list[ModelEntry]:
        return list(self._models.values())

    def resolve(self, ref: NodeRef) -> NodeRef:
        """Checks that a parsed id names an existing node of a served model."""
        try:
            entry = self.get(ref.model)
        except NotFoundError:
            raise invalid_node(ref.id, f"no model named {ref.model!r} is served") from None
        return entry.node(ref.kind, ref.layer, ref.index)

    def close(self) -> None:
        for entry in self._models.values():
            entry.executor.shutdown(wait=False, cancel_futures=True)
