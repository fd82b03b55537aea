"""The demo's corpus: the Python standard library's sources and its pydoc topic texts.

Every Python installation carries these, so the corpus is reproducible without a download (it
differs slightly between Python versions; the fingerprint says which one was used). Documents are
sorted by relative path, each preceded by <|endoftext|>, and split by file into train and held-out
by a stable hash of the path. Tokens are GPT-2 BPE ids, stored as uint16.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from interpql.backends.tokenizer import END_OF_TEXT_ID, GPT2_VOCAB_SIZE, gpt2_encoding

HELDOUT_PERCENT = 5
# Test suites (large and often odd), third-party packages, the platform's build configuration,
# the codecs' character tables, and topics.py (its texts come in as documents of their own).
_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings"})
_EXCLUDED_FILES = frozenset({"pydoc_data/topics.py"})
_FORMAT_VERSION = 1  # bump when the selection, split or layout changes

Tokens = NDArray[np.uint16]


@dataclass(frozen=True)
class Split:
    tokens: Tokens  # [n]: each document preceded by <|endoftext|>
    documents: tuple[str, ...]  # relative paths, in stream order
    starts: NDArray[np.int64]  # [n_documents]: index of each document's first token

    def document_at(self, position: int) -> str:
        """The document a stream position belongs to (its separator counts as its own)."""
        index = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.documents[max(index, 0)]


@dataclass(frozen=True)
class Corpus:
    train: Split
    heldout: Split
    fingerprint: str  # sha256 of the Python version, the documents and the split rule

    @property
    def used_tokens(self) -> NDArray[np.int64]:
        """Sorted ids of every token that occurs anywhere in the corpus."""
        seen = np.zeros(GPT2_VOCAB_SIZE, dtype=bool)
        seen[self.train.tokens] = True
        seen[self.heldout.tokens] = True
        return np.flatnonzero(seen)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every document, sorted by path."""
    root = stdlib_root() if root is None else root
    documents = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        name = relative.as_posix()
        if set(relative.parts[:-1]) & _EXCLUDED_DIRS or name in _EXCLUDED_FILES:
            continue
        if relative.parts[0].startswith("config-"):
            continue
        try:
            with tokenize.open(path) as handle:  # honours PEP 263 coding cookies
                documents.append((name, handle.read()))
        except (SyntaxError, UnicodeDecodeError):
            documents.append((name, path.read_text(encoding="utf-8", errors="replace")))
    from pydoc_data.topics import topics

    documents += [(f"pydoc_data/topics/{key}", text) for key, text in topics.items()]
    return sorted(documents)


def is_heldout(path: str, percent: int = HELDOUT_PERCENT) -> bool:
    digest = hashlib.sha256(path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def fingerprint(documents: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256(f"{_FORMAT_VERSION} {HELDOUT_PERCENT} {sys.version}".encode())
    for name, text in documents:
        digest.update(name.encode() + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def tokenize_split(documents: list[tuple[str, str]]) -> Split:
    encoded = gpt2_encoding().encode_ordinary_batch([text for _, text in documents], num_threads=2)
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    starts = np.cumsum(lengths) - lengths + 1
    for start, ids in zip(starts, encoded, strict=True):
        tokens[start - 1] = END_OF_TEXT_ID
        tokens[start : start + len(ids)] = ids
    return Split(tokens=tokens, documents=tuple(name for name, _ in documents), starts=starts)


def build_corpus(documents: list[tuple[str, str]]) -> Corpus:
    heldout = [doc for doc in documents if is_heldout(doc[0])]
    train = [doc for doc in documents if not is_heldout(doc[0])]
    return Corpus(
        train=tokenize_split(train),
        heldout=tokenize_split(heldout),
        fingerprint=fingerprint(documents),
    )


def load_corpus(cache_dir: Path | None = None) -> Corpus:
    """The corpus of this Python installation, from `cache_dir` when it holds the same one."""
    documents = collect_documents()
    if cache_dir is None:
        return build_corpus(documents)
    key = fingerprint(documents)
    cached = cache_dir / f"corpus-{key[:16]}.npz"
    if cached.exists():
        with np.load(cached) as data:
            return Corpus(
                train=_split_from(data, "train"),
                heldout=_split_from(data, "heldout"),
                fingerprint=str(data["fingerprint"]),
            )
    corpus = build_corpus(documents)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".tmp.npz")
    arrays: dict[str, Any] = {"fingerprint": np.array(corpus.fingerprint)}
    for name, split in (("train", corpus.train), ("heldout", corpus.heldout)):
        arrays[f"{name}_tokens"] = split.tokens
        arrays[f"{name}_documents"] = np.array(split.documents)
        arrays[f"{name}_starts"] = split.starts
    np.savez(partial, **arrays)
    partial.replace(cached)
    return corpus


def _split_from(data: np.lib.npyio.NpzFile, name: str) -> Split:
    return Split(
        tokens=data[f"{name}_tokens"].astype(np.uint16),
        documents=tuple(str(doc) for doc in data[f"{name}_documents"]),
        starts=data[f"{name}_starts"].astype(np.int64),
    )
