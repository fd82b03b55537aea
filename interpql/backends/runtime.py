"""Small helpers every backend needs around a forward pass: padding and memory figures."""

from __future__ import annotations

import psutil
import torch


def right_padded(
    tokens: tuple[tuple[int, ...], ...], device: torch.device, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ([batch, max_len] token ids, [batch] lengths); padding goes on the right."""
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    batch = torch.full((len(tokens), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(tokens):
        batch[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return batch.to(device), lengths.to(device)


def memory_in_use(device: torch.device) -> int:
    """Bytes in use: allocated CUDA memory on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return int(psutil.Process().memory_info().rss)
