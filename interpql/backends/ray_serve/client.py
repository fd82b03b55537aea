"""`RayBackend`: the Backend protocol answered by a Ray Serve deployment (`deployment.py`).

Forward passes run in the deployment's replicas. What analyses read besides them (architecture,
tokenizer, weights, dictionaries' encoders and decoders) comes from the deployment through the
same handle; weights are kept here after their first use, so a GraphQL server needs neither the
model's files nor a device. Calls block: they come from the model's worker threads, never from
an event loop.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from interpql.backends.base import (
    AttachedDictionary,
    Backend,
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Location,
)
from interpql.backends.dictionaries.base import Dictionary
from interpql.backends.ray_serve.protocol import (
    DEFAULT_APP,
    Description,
    DictionaryShape,
    RemoteCall,
    ReplicaStats,
    this_process,
)
from interpql.errors import UnavailableError

# Calls one GraphQL server keeps in flight to the deployment, which batches them with the
# other servers' calls.
IN_FLIGHT = 8


def join(address: str) -> None:
    """Joins the Ray cluster at `address` (host:port of its head, `auto`, or ray://host:port)
    as a driver; OSError when nothing answers there."""
    if ray.is_initialized():
        return
    if address != "auto":
        # ray.init waits minutes on an address where nothing listens; a refused or silent
        # socket says the same in seconds.
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise OSError(f"no Ray cluster answers at {address!r} ({exc})") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise OSError(
            f"cannot join the Ray cluster at {address!r}: {exc} (with token authentication, "
            "set RAY_AUTH_MODE=token and the cluster's token: docs/DEPLOYMENT.md)"
        ) from None


def connect(address: str, app: str = DEFAULT_APP, timeout_s: float | None = None) -> RayBackend:
    """The backend of the Ray Serve application `app` (started by `interpql deploy`)."""
    join(address)
    try:
        handle = serve.get_app_handle(app)
    except RayServeException as exc:
        raise ValueError(
            f"no Ray Serve application {app!r} on the cluster at {address!r} ({exc}); start it "
            f"with `interpql deploy --ray {address} --app {app}`"
        ) from None
    return RayBackend(handle, handle.describe.remote().result(timeout_s=60), timeout_s)


class RayBackend(Backend):
    def __init__(
        self,
        handle: DeploymentHandle[Any],
        description: Description,
        timeout_s: float | None = None,
    ) -> None:
        self.name = f"ray-serve/{description.backend}"
        self.description = description
        self.architecture = description.architecture
        self.tokenizer = description.tokenizer
        # Where results arrive; `description.device` is where replicas compute them.
        self.device = torch.device("cpu")
        self.dtype = description.dtype
        self.locations = description.locations
        self.dictionaries = {}
        for shape in description.dictionaries:
            attached = AttachedDictionary(
                shape.name, shape.layer, RemoteDictionary(self, shape), shape.input, shape.output
            )
            self.dictionaries[attached.latents_point] = attached
        self._handle = handle
        self._timeout_s = timeout_s
        self._caller = this_process()
        self._weights: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def attach_dictionary(
        self,
        name: str,
        layer: int,
        dictionary: Dictionary,
        input: Location,
        output: Location | None = None,
    ) -> AttachedDictionary:
        raise ValueError(
            "a Ray Serve deployment's dictionaries are attached where it is deployed: pass "
            "--dictionary (or --mlp-autoencoder/--attn-autoencoder) to `interpql deploy`, not "
            "to `interpql serve`"
        )

    def forward(self, request: ForwardRequest) -> ForwardResult:
        result: ForwardResult = self.call("forward", RemoteCall(self._caller, request))
        return result

    def weight(self, name: str) -> torch.Tensor:
        with self._lock:
            found = self._weights.get(name)
        if found is None:
            found = self.call("weight", name)
            with self._lock:
                self._weights[name] = found
        return found

    def stats(self) -> list[ReplicaStats]:
        """Passes and callers of every replica."""
        stats: list[ReplicaStats] = self._handle.broadcast("stats").results(timeout_s=60)
        return stats

    def call(self, method: str, *args: Any) -> Any:
        """A method of a replica, with the replica's own exception raised here."""
        response = getattr(self._handle, method).remote(*args)
        try:
            return response.result(timeout_s=self._timeout_s)
        except RayTaskError as exc:
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise
        except (RayError, RayServeException) as exc:
            # A replica died, the application was deleted, or no replica answered in time:
            # this request fails with a code a client can retry on; the server stays up.
            raise UnavailableError(
                f"The model's Ray Serve deployment did not answer ({type(exc).__name__}).",
                code="BACKEND_UNAVAILABLE",
            ) from None


class RemoteDictionary(Dictionary):
    """A dictionary that lives in the replicas: its shape is here, each method a call (the
    decoder, fixed, is kept after its first use)."""

    def __init__(self, backend: RayBackend, shape: DictionaryShape) -> None:
        super().__init__()
        self._backend = backend
        self._shape = shape
        self._point = HookPoint(shape.layer, Location.LATENTS, shape.name)
        self.architecture = shape.architecture
        self._kept: dict[str, torch.Tensor] = {}

    @property
    def d_in(self) -> int:
        return self._shape.d_in

    @property
    def d_out(self) -> int:
        return self._shape.d_out

    @property
    def n_latents(self) -> int:
        return self._shape.n_latents

    @property
    def rescales(self) -> bool:
        return self._shape.rescales

    def _call(self, method: str, *args: torch.Tensor) -> Any:
        moved = [arg.detach().float().cpu() for arg in args]
        return self._backend.call("dictionary", self._point, method, *moved)

    def _fixed(self, method: str) -> torch.Tensor:
        if method not in self._kept:
            self._kept[method] = self._call(method)
        return self._kept[method]

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a remote dictionary normalises inside encode and decode")

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        pre: torch.Tensor = self._call("pre_activation", x)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        latents: torch.Tensor = self._call("activate", pre)
        return latents

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        latents: torch.Tensor = self._call("encode", x)
        return latents

    def decode(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        decoded: torch.Tensor = self._call("decode", latents, x)
        return decoded

    def decoder_directions(self) -> torch.Tensor:
        return self._fixed("decoder_directions")

    def decoder_bias(self) -> torch.Tensor:
        return self._fixed("decoder_bias")

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        found: torch.Tensor | None = self._call("skip", x)
        return found

    def output_scale(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self._call("output_scale", x)
        return scale

    def decoded_bias(self, x: torch.Tensor) -> torch.Tensor:
        bias: torch.Tensor = self._call("decoded_bias", x)
        return bias
