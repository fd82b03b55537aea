"""Where the embedded default model lives: a folder of data shipped in the package (built by
`interpql build-demo`, code in interpql/demo/), served by `interpql serve` with no --model."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "tiny-stdlib"
EMBEDDED_DIR = Path(__file__).parent / "data" / EMBEDDED_NAME
# Served instead where the embedded model has not been built (a fresh checkout).
FALLBACK_MODEL = "random:tiny"
FALLBACK_NAME = "tiny-random"


def embedded_available() -> bool:
    return (EMBEDDED_DIR / "weights.safetensors").exists()
