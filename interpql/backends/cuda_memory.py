"""CUDA memory debugging: PyTorch's allocator records the history of every allocation (with its
stack), and a snapshot of it is a pickle that https://pytorch.org/memory_viz draws.

Recording is process-wide and costs a little on every allocation, hence a start-up switch
(`interpql serve --cuda-memory-debugging`), not a default.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch


def start_recording(device: str, max_entries: int) -> None:
    """Starts recording allocations; a ValueError says why it cannot (no CUDA device)."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(
            "--cuda-memory-debugging needs a CUDA device, and torch "
            f"{torch.__version__} ({build}) sees none on this machine."
        )
    if not device.startswith("cuda"):
        raise ValueError(
            "--cuda-memory-debugging needs a CUDA device for the model: add --device cuda "
            f"(the model is on {device!r})."
        )
    if max_entries < 1:
        raise ValueError(f"--cuda-memory-max-entries must be at least 1, got {max_entries}.")
    torch.cuda.memory._record_memory_history(enabled="all", max_entries=max_entries)


def dump_snapshot(folder: Path) -> Path:
    """Writes the allocator's state and recorded history to a new, timestamped pickle in
    `folder` and returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = folder / f"cuda-memory-{stamp}.pickle"
    torch.cuda.memory._dump_snapshot(str(path))  # type: ignore[no-untyped-call]
    return path.resolve()
