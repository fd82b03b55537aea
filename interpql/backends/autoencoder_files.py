"""Sets of per-layer autoencoder files (`<folder>/<layer>.pt`), local or behind a blobfile URL.

The public GPT-2-small sets of openai/sparse_autoencoder are registered by name; they load where
the network allows.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import blobfile as bf
import torch

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import AutoencoderInput
from interpql.file_errors import FileProblem, reading

_PUBLIC = "az://openaipublic/sparse-autoencoder/gpt2-small"
REGISTERED_AUTOENCODERS: dict[str, tuple[str, AutoencoderInput]] = {
    f"ae-{kind.value.replace('_', '-')}{suffix}": (
        f"{_PUBLIC}/{kind.value}{suffix.replace('-', '_')}/autoencoders",
        kind,
    )
    for kind in AutoencoderInput
    for suffix in ("", "-v4")
}


class AutoencoderFilesError(ValueError):
    pass


def read_autoencoder(path: str) -> SparseAutoencoder:
    with reading(path, "a sparse autoencoder's state dict (torch.save)"):
        state = torch.load(io.BytesIO(bf.read_bytes(path)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise FileProblem(path, "does not hold a state dict")
    try:
        return SparseAutoencoder.from_state_dict(state)
    except ValueError as exc:
        raise FileProblem(path, str(exc)) from exc


def load_autoencoder_set(spec: str, n_layers: int) -> tuple[dict[int, SparseAutoencoder], str]:
    """Reads `<layer>.pt` for every layer present; returns them and the folder they came from."""
    folder = REGISTERED_AUTOENCODERS[spec][0] if spec in REGISTERED_AUTOENCODERS else spec
    if not bf.isdir(folder):
        known = ", ".join(sorted(REGISTERED_AUTOENCODERS))
        raise AutoencoderFilesError(
            f"{spec!r} is neither a registered autoencoder set ({known}) nor a folder"
        )
    paths = {
        layer: bf.join(folder, f"{layer}.pt")
        for layer in range(n_layers)
        if bf.exists(bf.join(folder, f"{layer}.pt"))
    }
    if not paths:
        raise AutoencoderFilesError(f"{folder} has no <layer>.pt files for layers 0-{n_layers - 1}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = dict(zip(paths, pool.map(read_autoencoder, paths.values()), strict=True))
    return loaded, folder


def registered_input(spec: str) -> AutoencoderInput | None:
    entry = REGISTERED_AUTOENCODERS.get(spec)
    return None if entry is None else entry[1]
