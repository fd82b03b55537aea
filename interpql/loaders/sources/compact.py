"""The demo's compact store: records and explanations held in memory."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import overload

import numpy as np

from interpql.loaders.sources.base import (
    Example,
    ExplanationData,
    NodeRecordData,
    NodeSource,
    RecordAnswer,
    Statistics,
    finite,
)
from interpql.loaders.sources.compact_format import (
    STATISTICS,
    ExplanationTable,
    GroupKey,
    RecordStore,
    group_problem,
)
from interpql.loaders.sources.tdb import BrokenRecordError
from interpql.specs import NodeRef

log = logging.getLogger(__name__)

# Records kept built (with the examples read of them): about 15 MB at 5 examples each. Every
# full collection scans them (~10 objects each), so a few lookups' worth, not a layer's.
MAX_BUILT_RECORDS = 4096


class CompactSource(NodeSource):
    """Records and explanations held in memory from the demo's compact files."""

    def __init__(
        self,
        name: str,
        records: RecordStore,
        explanations: ExplanationTable | None,
        decode: Callable[[int], str],
    ):
        self.name = name
        self.records = records
        self.explanations = explanations
        self._decode = decode
        # Records already built, most recently read last, with the examples built so far:
        # the store never changes, and building a lookup's 1,000 records and 5,000 examples
        # again is most of its time.
        self._built: OrderedDict[tuple[str, int, int], NodeRecordData] = OrderedDict()
        self._built_lock = threading.Lock()
        # Each group's problem (None: it is sound), found on its first read, for a store built
        # in memory (a loaded one was checked as it loaded: RecordStore.checked).
        self._problems: dict[GroupKey, str | None] = {}

    @classmethod
    def open(cls, name: str, folder: Path, decode: Callable[[int], str]) -> CompactSource:
        explanations_dir = folder / "explanations"
        table = ExplanationTable.load(explanations_dir) if explanations_dir.exists() else None
        return cls(name, RecordStore.load(folder / "records"), table, decode)

    def read_records(self, nodes: Sequence[NodeRef]) -> list[RecordAnswer]:
        found: list[RecordAnswer] = [None] * len(nodes)
        # Each layer's nodes in one read of its arrays: lookups ask for thousands at once.
        by_group: dict[tuple[str, int], list[int]] = defaultdict(list)
        with self._built_lock:
            for position, node in enumerate(nodes):
                key = (node.kind, node.layer, node.index)
                if key in self._built:
                    self._built.move_to_end(key)
                    found[position] = self._built[key]
                elif self._group_problem(node.kind, node.layer) is not None:
                    found[position] = self._unreadable(node)
                elif 0 <= node.index < self.records.count(node.kind, node.layer):
                    by_group[(node.kind, node.layer)].append(position)
        for (kind, layer), positions in by_group.items():
            indices = [nodes[p].index for p in positions]
            try:
                records = self._group_records(kind, layer, indices)
            except Exception as exc:  # whatever the arrays hold that the checks missed
                log.warning("source %s: cannot read %s %d: %r", self.name, kind, layer, exc)
                for p in positions:
                    found[p] = self._unreadable(nodes[p])
                continue
            with self._built_lock:
                for p, index, record in zip(positions, indices, records, strict=True):
                    found[p] = self._built.setdefault((kind, layer, index), record)
                while len(self._built) > MAX_BUILT_RECORDS:
                    self._built.popitem(last=False)
        return found

    def _group_problem(self, kind: str, layer: int) -> str | None:
        if self.records.checked:
            return None
        key = (kind, layer)
        if key not in self._problems:
            try:
                arrays = self.records.arrays(kind, layer)
            except KeyError:  # no such group: its nodes have no records here
                return None
            problem = group_problem(
                arrays,
                len(arrays.get("mean", ())),
                self.records.layout.window,
                len(self.records.tokens),
            )
            if problem is not None:
                log.warning("source %s: %s.%d.%s", self.name, kind, layer, problem)
            self._problems[key] = problem
        return self._problems[key]

    def _unreadable(self, node: NodeRef) -> BrokenRecordError:
        return BrokenRecordError(f"The {self.name} data of {node.id} is unreadable.")

    def _group_records(self, kind: str, layer: int, indices: list[int]) -> list[NodeRecordData]:
        arrays = self.records.arrays(kind, layer)
        stats = {name: arrays[name][indices].tolist() for name in STATISTICS}
        boundaries = arrays["quantile_boundaries"][indices].tolist()
        # Offsets of -1 mark slots the corpus could not fill (a node active in few sequences).
        top_offsets = arrays["top_offsets"][indices]
        filled = {
            which: [
                tuple(slot for slot, offset in enumerate(row) if offset >= 0)
                for row in offsets.tolist()
            ]
            for which, offsets in (
                ("top", top_offsets),
                ("random", arrays["random_offsets"][indices]),
            )
        }
        # Each node's largest top activation, over its filled windows (0 where none is).
        acts = np.where((top_offsets >= 0)[..., None], arrays["top_acts"][indices], -np.inf)
        peaks = np.where(top_offsets.max(axis=1) >= 0, acts.max(axis=(1, 2)), 0.0).tolist()
        batches = {which: _WindowBatch(self, kind, layer, which) for which in ("top", "random")}
        return [
            NodeRecordData(
                source=self.name,
                top=batches["top"].add(index, filled["top"][i]),
                random=batches["random"].add(index, filled["random"][i]),
                statistics=Statistics(
                    max=stats["max"][i],
                    mean=stats["mean"][i],
                    variance=stats["variance"][i],
                    skewness=finite(stats["skewness"][i]),
                    kurtosis=finite(stats["kurtosis"][i]),
                    density=stats["density"][i],
                    quantile_boundaries=tuple(boundaries[i]),
                ),
                top_peak=peaks[i],
            )
            for i, index in enumerate(indices)
        ]

    def examples(
        self, kind: str, layer: int, which: str, indices: Sequence[int], slots: Sequence[int]
    ) -> list[Example]:
        """Stored windows (`which`: "top" or "random"), the `slots[i]`th of node `indices[i]`,
        as Examples: one gather of all their tokens and activations."""
        try:
            return self._gathered(kind, layer, which, indices, slots)
        except Exception as exc:  # read lazily, in a resolver: fail that field, typed
            log.warning("source %s: cannot read %s %d windows: %r", self.name, kind, layer, exc)
            raise BrokenRecordError(
                f"The {self.name} data of {kind} nodes in layer {layer} is unreadable."
            ) from exc

    def _gathered(
        self, kind: str, layer: int, which: str, indices: Sequence[int], slots: Sequence[int]
    ) -> list[Example]:
        arrays = self.records.arrays(kind, layer)
        offsets = arrays[f"{which}_offsets"][indices, slots]
        window, tokens = self.records.layout.window, self.records.tokens
        if len(offsets) and int(offsets.max()) + window > len(tokens):
            # A window cut short by the end of the corpus: each sliced as it is.
            ids = [tokens[o : o + window].tolist() for o in offsets.tolist()]
        else:
            ids = tokens[offsets[:, None] + np.arange(window)].tolist()
        acts = arrays[f"{which}_acts"][indices, slots].tolist()
        text_of = self._texts.__getitem__
        return [
            Example(tuple(map(text_of, row)), tuple(row), tuple(values))
            for row, values in zip(ids, acts, strict=True)
        ]

    def read_explanations(
        self, nodes: Sequence[NodeRef]
    ) -> list[list[ExplanationData] | Exception]:
        table = self.explanations
        if table is None:
            return [[] for _ in nodes]
        return [
            [
                ExplanationData(
                    self.name, row.text, finite(row.score), row.simulator, row.explainer
                )
                for row in table.for_node(node.kind, node.layer, node.index)
            ]
            for node in nodes
        ]

    @cached_property
    def _texts(self) -> list[str]:
        """Each corpus token's text by id, decoded once: a 1,000-node read decodes ~400,000
        window tokens, the bulk of its time when done one call each."""
        used = np.unique(self.records.tokens)
        texts = [""] * (int(used.max()) + 1 if len(used) else 0)
        for token in used.tolist():
            texts[token] = self._decode(token)
        return texts

    def list_explanations(self, model: str) -> Iterable[tuple[str, str, float | None]]:
        if self.explanations is None:
            return
        for row in self.explanations.rows:
            node = NodeRef(model, row.kind, row.layer, row.index)
            yield node.id, row.text, finite(row.score)

    def list_peaks(self, model: str) -> Iterable[tuple[str, str, float]]:
        window = self.records.layout.window
        n_tokens = len(self.records.tokens)
        texts = self._texts
        for group in self.records.groups():
            arrays = self.records.arrays(group.kind, group.layer)
            offsets = arrays["top_offsets"]  # [node, example]
            acts = arrays["top_acts"].astype(np.float32)  # [node, example, window]
            peaks = acts.argmax(axis=2)
            positions = offsets + peaks
            kept = (offsets >= 0) & (positions < n_tokens) & (peaks < window)
            ids = self.records.tokens[np.where(kept, positions, 0)]
            peak_acts = np.take_along_axis(acts, peaks[..., None], axis=2)[..., 0]
            for index, example in zip(*np.nonzero(kept), strict=True):
                node = NodeRef(model, group.kind, group.layer, int(index))
                yield node.id, texts[ids[index, example]], float(peak_acts[index, example])

    def layer_values(self, model: str, kind: str, layer: int, what: str) -> np.ndarray | None:
        count = self.records.count(kind, layer)
        if count == 0:
            return None
        if what == "max_activation":
            return self.records.arrays(kind, layer)["max"].astype(np.float64)
        scores = np.full(count, np.nan)
        if self.explanations is not None:
            for index in range(count):
                found = self.explanations.for_node(kind, layer, index)
                if found and math.isfinite(found[0].score):
                    scores[index] = found[0].score
        return scores


class _WindowBatch:
    """The top (or random) windows of the nodes one read built, of one kind and layer. A
    field asks the same examples of every node of a list (`topActivations(first: 5)` of
    1,000 nodes), so the first node's read builds them for all the batch, in one gather. The
    batch lives while any of its records does; few objects each, since the records a source
    keeps are scanned by every full collection."""

    def __init__(self, source: CompactSource, kind: str, layer: int, which: str) -> None:
        self._source, self._where = source, (kind, layer, which)
        self._nodes: list[tuple[int, tuple[int, ...]]] = []  # (index, filled slots)
        self.built: dict[tuple[int, int], Example] = {}  # by (index, slot)

    def add(self, index: int, slots: tuple[int, ...]) -> _Windows:
        self._nodes.append((index, slots))
        return _Windows(self, index, slots)

    def build(self, positions: range) -> None:
        """Builds the examples at `positions` (of each node's filled slots) not built yet."""
        built = self.built
        pending = [
            (index, slots[p])
            for index, slots in self._nodes
            for p in positions
            if p < len(slots) and (index, slots[p]) not in built
        ]
        if not pending:
            return
        examples = self._source.examples(
            *self._where, [index for index, _ in pending], [slot for _, slot in pending]
        )
        built.update(zip(pending, examples, strict=True))


class _Windows(Sequence[Example]):
    """A node's filled window slots, each built into an Example when read (then kept, in
    its batch)."""

    __slots__ = ("_batch", "index_in_layer", "slots")

    def __init__(self, batch: _WindowBatch, index: int, slots: tuple[int, ...]) -> None:
        self._batch, self.index_in_layer, self.slots = batch, index, slots

    def __len__(self) -> int:
        return len(self.slots)

    @overload
    def __getitem__(self, item: int) -> Example: ...

    @overload
    def __getitem__(self, item: slice) -> tuple[Example, ...]: ...

    def __getitem__(self, item: int | slice) -> Example | tuple[Example, ...]:
        if isinstance(item, slice):
            positions = range(*item.indices(len(self)))
        else:
            self.slots[item]  # IndexError past the end, as a tuple's
            positions = range(item % len(self), item % len(self) + 1)
        built, index = self._batch.built, self.index_in_layer
        wanted = [(index, self.slots[p]) for p in positions]
        if any(key not in built for key in wanted):
            self._batch.build(positions)
        if isinstance(item, slice):
            return tuple(built[key] for key in wanted)
        return built[wanted[0]]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))
