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
    AutoencoderInput,
    Backend,
    ForwardRequest,
    Location,
    Tokenizer,
)

DEFAULT_APP = "interpql"


@dataclass(frozen=True)
class ServedModel:
    """What a replica loads: the backend, with its autoencoders attached."""

    backend: Backend
    # The --model the deployment was given; None: interpql's default (the embedded demo).
    model: str | None
    # Where each attached autoencoder set came from, by the node kind of its latents.
    autoencoder_sources: dict[str, str] = field(default_factory=dict)


# Runs inside each replica; must pickle by reference (a module-level function or a partial).
LoadModel = Callable[[], ServedModel]


@dataclass(frozen=True)
class AutoencoderShape:
    layer: int
    input: AutoencoderInput
    n_inputs: int
    n_latents: int


@dataclass(frozen=True)
class Description:
    """Everything a GraphQL server needs to know about the deployed model before it runs it."""

    model: str | None
    backend: str  # the replica's backend name, e.g. native-gpt2
    architecture: Architecture
    tokenizer: Tokenizer
    locations: frozenset[Location]
    autoencoders: tuple[AutoencoderShape, ...]
    autoencoder_sources: dict[str, str]
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
