"""Sets of per-layer autoencoder files (`<folder>/<layer>.pt`), local or behind a blobfile URL.

The public GPT-2-small sets of openai/sparse_autoencoder are registered by name; they load where
the network allows.
"""

from __future__ import annotations

import io

import blobfile as bf
import torch

from interpql.backends import remote
from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import AutoencoderInput
from interpql.file_errors import FileProblem, reading, require_finite

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


def read_autoencoder(path: str, data: bytes | None = None) -> SparseAutoencoder:
    """The autoencoder in the file at `path` (from its bytes, when already read)."""
    with reading(path, "a sparse autoencoder's state dict (torch.save)"):
        data = bf.read_bytes(path) if data is None else data
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise FileProblem(path, "does not hold a state dict")
    require_finite(path, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    try:
        return SparseAutoencoder.from_state_dict(state)
    except ValueError as exc:
        raise FileProblem(path, str(exc)) from exc


def load_autoencoder_set(spec: str, n_layers: int) -> tuple[dict[int, SparseAutoencoder], str]:
    """Reads `<layer>.pt` for every layer present; returns them and the folder they came from."""
    folder = REGISTERED_AUTOENCODERS[spec][0] if spec in REGISTERED_AUTOENCODERS else spec
    if not remote.call(lambda: bf.isdir(folder), "autoencoders", folder):
        known = ", ".join(sorted(REGISTERED_AUTOENCODERS))
        raise AutoencoderFilesError(
            f"{spec!r} is neither a registered autoencoder set ({known}) nor a folder"
        )
    present = set(remote.call(lambda: list(bf.listdir(folder)), "autoencoders", folder))
    paths = {
        layer: bf.join(folder, f"{layer}.pt")
        for layer in range(n_layers)
        if f"{layer}.pt" in present
    }
    if not paths:
        raise AutoencoderFilesError(f"{folder} has no <layer>.pt files for layers 0-{n_layers - 1}")
    data = remote.read_files(list(paths.values()), "autoencoders")
    loaded = {
        layer: read_autoencoder(path, raw)
        for (layer, path), raw in zip(paths.items(), data, strict=True)
    }
    return loaded, folder


def registered_input(spec: str) -> AutoencoderInput | None:
    entry = REGISTERED_AUTOENCODERS.get(spec)
    return None if entry is None else entry[1]
