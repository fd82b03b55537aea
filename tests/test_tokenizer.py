from __future__ import annotations

import pytest

from interpql.backends import tokenizer


def test_known_gpt2_ids() -> None:
    enc = tokenizer.gpt2_encoding()
    # Ids of GPT-2's published vocabulary.
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257


@pytest.mark.parametrize(
    "text", ["def f(x):\n    return x ** 2\n", "naïve café — 日本語 🙂", "  spaces\t\ttabs\n\n"]
)
def test_round_trip(text: str) -> None:
    enc = tokenizer.gpt2_encoding()
    assert enc.decode(enc.encode(text)) == text


def test_tampered_files_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(tokenizer.TokenizerFilesError, match=r"vocab\.bpe"):
        tokenizer._verified_path("vocab.bpe", tokenizer.VOCAB_BPE_SHA256)
