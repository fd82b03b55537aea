"""Running out of memory in a forward pass fails that request, not the server.

A CUDA allocator raises torch.OutOfMemoryError; the CPU allocator raises a RuntimeError ("can't
allocate memory") or, from Python-side buffers, MemoryError. Each becomes RESOURCE_EXHAUSTED,
and on CUDA the cached blocks the failed pass left are handed back so the next request starts
from a clean allocator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from interpql.errors import resource_exhausted

log = logging.getLogger(__name__)

_CPU_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _CPU_MESSAGES)


@contextlib.contextmanager
def out_of_memory_as_error(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        log.warning("out of memory in %s: %s", what, str(exc).splitlines()[0][:200])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise resource_exhausted(what) from None
