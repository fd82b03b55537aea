"""Loading the models a server is asked to serve into registry entries."""

from __future__ import annotations

from pathlib import PurePosixPath

import torch

from interpql.backends.gpt2.backend import NativeGPT2Backend
from interpql.backends.gpt2.loading import REGISTERED_MODELS, read_config
from interpql.loaders.registry import ModelEntry

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "random:tiny"
DEFAULT_MODEL_NAME = "tiny-random"


def default_name(spec: str) -> str:
    if spec in REGISTERED_MODELS:
        return spec
    if spec.startswith("random:"):
        return "random-" + spec.split(":")[1]
    return PurePosixPath(spec.rstrip("/")).name or "model"


def load_model(
    spec: str,
    *,
    name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    with_weights: bool = True,
) -> ModelEntry:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    name = name or default_name(spec)
    if not with_weights:
        arch = read_config(spec).architecture
        return ModelEntry(name, arch, None, NativeGPT2Backend.name, device, dtype)
    backend = NativeGPT2Backend.load(spec, device=device, dtype=DTYPES[dtype])
    return ModelEntry(name, backend.architecture, backend, backend.name, str(backend.device), dtype)
