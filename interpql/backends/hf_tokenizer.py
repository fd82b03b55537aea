"""Hugging Face tokenizers behind `base.Tokenizer`, and GPT-2's tokenizer in both shapes offline.

`transformers` is imported lazily: it is an optional dependency, needed only by backends that
run Hugging Face models.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from interpql.backends.base import Tokenizer
from interpql.backends.tokenizer import END_OF_TEXT, GPT2_VOCAB_SIZE, _verified_path

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's pieces for raw bytes
_SENTENCEPIECE_SPACE = "\u2581"


class HFTokenizer:
    """A Hugging Face tokenizer, read like tiktoken: text in, ids out, with nothing added.

    Special tokens written in the text are recognised (tiktoken's ``allowed_special="all"``);
    none are inserted, so a prompt means the same tokens whatever the backend. Ids past the
    tokenizer's vocabulary (padding rows of a larger embedding) decode to nothing.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"

    @property
    def n_vocab(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, allowed_special: Literal["all"] = "all") -> list[int]:
        ids: list[int] = self.hf.encode(text, add_special_tokens=False)
        return ids

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        return b"".join(self.decode_single_token_bytes(t) for t in tokens).decode(
            "utf-8", errors=errors
        )

    def decode_single_token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.n_vocab:
            return b""
        piece = self.hf.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if piece in self.hf.all_special_tokens:
            return str(piece).encode()
        table = _byte_decoder()
        if self._byte_level and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback is not None:
            return bytes([int(fallback[1], 16)])
        return str(piece).replace(_SENTENCEPIECE_SPACE, " ").encode()


class PaddedVocabulary:
    """A tokenizer for a model whose embedding has more rows than the tokenizer has tokens
    (Pythia pads GPT-2's 50,257 to 50,304): the extra ids decode to nothing."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int) -> None:
        self._inner = tokenizer
        self._n_vocab = n_vocab

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def encode(self, text: str, *, allowed_special: Literal["all"] = "all") -> list[int]:
        return self._inner.encode(text, allowed_special=allowed_special)

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        known = [t for t in tokens if t < self._inner.n_vocab]
        return self._inner.decode(known, errors=errors)

    def decode_single_token_bytes(self, token: int) -> bytes:
        if token >= self._inner.n_vocab:
            return b""
        return self._inner.decode_single_token_bytes(token)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: bytes that are printable
    Latin-1 stand for themselves, the others are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = (b for b in range(256) if b not in printable)
    table = {chr(b): b for b in printable}
    table |= {chr(256 + n): b for n, b in enumerate(shifted)}
    return table


def gpt2_hf_tokenizer() -> Any:
    """GPT-2's tokenizer as a `transformers` object, built offline from the same verified files
    as `tokenizer.gpt2_encoding` (for libraries that want a Hugging Face tokenizer)."""
    from transformers import GPT2Tokenizer

    from interpql.backends.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256

    with open(_verified_path("encoder.json", ENCODER_JSON_SHA256), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(_verified_path("vocab.bpe", VOCAB_BPE_SHA256), encoding="utf-8") as f:
        # (left, right) pairs, as `tokenizers` wants them (transformers' annotation says str).
        merges: Any = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    # add_bos_token: TransformerLens would otherwise reload "gpt2" from the hub to set it.
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, name_or_path="gpt2", add_bos_token=True)
    assert len(tokenizer) == GPT2_VOCAB_SIZE and tokenizer.eos_token == END_OF_TEXT
    return tokenizer
