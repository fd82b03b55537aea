"""Writes the two models the node-table benchmark serves to both servers, as Transformer
Debugger folders (config.json + model_pieces/*.pt): a seeded random GPT-2-small-shaped model
(LayerNorm gains and biases perturbed, so that every parameter matters) and the embedded demo.

usage: python -m bench.tdb.export_models [OUT_DIR=/tmp/interpql-tdb-models]
Prints the two folders. Idempotent: a folder that exists is kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from interpql.backends.gpt2.loading import random_model, save_tdb_folder
from interpql.backends.gpt2.model import PRESETS
from interpql.loaders.models import load_model

RANDOM_SEED = 17


def export(out: Path) -> dict[str, Path]:
    folders = {"random-gpt2-small": out / "random-gpt2-small", "tiny-stdlib": out / "tiny-stdlib"}
    if not (folders["random-gpt2-small"] / "config.json").exists():
        cfg = PRESETS["gpt2-small"]
        save_tdb_folder(
            folders["random-gpt2-small"], cfg, random_model(cfg, RANDOM_SEED).state_dict()
        )
    if not (folders["tiny-stdlib"] / "config.json").exists():
        from interpql.embedded import EMBEDDED_DIR

        backend = load_model(str(EMBEDDED_DIR), name="tiny-stdlib").require_backend()
        save_tdb_folder(folders["tiny-stdlib"], backend.cfg, backend.model.state_dict())  # type: ignore[attr-defined]
    return folders


if __name__ == "__main__":
    for path in export(
        Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/interpql-tdb-models")
    ).values():
        print(path)
