"""What crosses between GraphQL servers and the Ray Serve deployment: plain, picklable values.

Nothing here imports ray, so `interpql serve` without `--ray` never pays for it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from interpql.backends.base import (
    Architecture,
    Backend,
    ForwardRequest,
    Location,
    Tokenizer,
)

DEFAULT_APP = "interpql"


@dataclass(frozen=True)
class ServedModel:
    """What a replica loads: the backend, with its dictionaries attached."""

    backend: Backend
    # The --model the deployment was given; None: interpql's default (the embedded demo).
    model: str | None
    # Where each attached dictionary set came from, by its name.
    dictionary_sources: dict[str, str] = field(default_factory=dict)


# Runs inside each replica; must pickle by reference (a module-level function or a partial).
LoadModel = Callable[[], ServedModel]


@dataclass(frozen=True)
class DictionaryShape:
    """An attached dictionary as a GraphQL server sees it: its place and sizes (its weights
    stay in the replicas)."""

    name: str
    layer: int
    input: Location
    output: Location
    architecture: str
    d_in: int
    d_out: int
    n_latents: int
    rescales: bool


# The dictionary methods a GraphQL server calls on a replica's dictionaries (tensors in, a
# tensor or None out).
REMOTE_METHODS = frozenset(
    {
        "pre_activation",
        "activate",
        "encode",
        "decode",
        "decoder_directions",
        "decoder_bias",
        "skip",
        "output_scale",
        "decoded_bias",
    }
)


@dataclass(frozen=True)
class Description:
    """Everything a GraphQL server needs to know about the deployed model before it runs it."""

    model: str | None
    backend: str  # the replica's backend name, e.g. native-gpt2
    architecture: Architecture
    tokenizer: Tokenizer
    locations: frozenset[Location]
    dictionaries: tuple[DictionaryShape, ...]
    dictionary_sources: dict[str, str]
    device: str  # where the replica runs it, e.g. cuda:0
    dtype: torch.dtype
    torch_threads: int


@dataclass(frozen=True)
class RemoteCall:
    """One caller's request; `caller` names the process, so that shared passes can be counted."""

    caller: str
    request: ForwardRequest


@dataclass(frozen=True)
class PassRecord:
    callers: tuple[str, ...]  # one per request merged into the pass
    rows: int
    elapsed_s: float


@dataclass(frozen=True)
class ReplicaStats:
    replica: str
    passes: int
    calls: int
    rows: int  # prompts, over all passes
    recent: tuple[PassRecord, ...]  # the latest passes, oldest first


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
