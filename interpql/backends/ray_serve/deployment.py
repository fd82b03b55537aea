"""The Ray Serve deployment that owns the model, and `deploy`/`delete` of its application.

Each replica loads the model once (`LoadModel`, the same loading `interpql serve` does) and
answers `RemoteCall`s. `@serve.batch` gathers the calls that arrive together, from every GraphQL
server; those whose switches agree run as one forward pass (`merging.py`) on the replica's one
model thread, and each caller gets its own part back, on the CPU. The replica counts the passes
and who shared them (`stats`). GraphQL servers reach the application through a DeploymentHandle
only: Serve's HTTP proxy is not started.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from ray import serve
from ray.serve.config import ProxyLocation
from ray.serve.handle import DeploymentHandle

from interpql.backends.base import ForwardRequest, ForwardResult, HookPoint
from interpql.backends.ray_serve import merging
from interpql.backends.ray_serve.client import join
from interpql.backends.ray_serve.protocol import (
    DEFAULT_APP,
    REMOTE_METHODS,
    Description,
    DictionaryShape,
    LoadModel,
    PassRecord,
    RemoteCall,
    ReplicaStats,
    ServedModel,
    this_process,
)

DEPLOYMENT = "backend"
_RECENT_PASSES = 1000
_T = TypeVar("_T")


@dataclass(frozen=True)
class DeploySettings:
    app: str = DEFAULT_APP
    replicas: int = 1
    num_cpus: float = 1.0  # per replica; Ray also sets its torch threads to this
    num_gpus: float = 0.0  # per replica; fractions share a GPU
    max_batch_size: int = 16  # calls gathered into one batch
    batch_wait_s: float = 0.005  # how long the first call of a batch waits for others
    ready_timeout_s: float = 600.0  # for every replica to have loaded the model


class BackendReplica:
    def __init__(self, load: LoadModel, max_batch_size: int, batch_wait_s: float) -> None:
        served = load()
        self._backend = served.backend
        self._description = describe(served)
        # The model runs on one thread, so the replica's event loop stays free to gather the
        # next batch while this one runs.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica")
        self._recent: deque[PassRecord] = deque(maxlen=_RECENT_PASSES)
        self._passes = self._calls = self._rows = 0
        batching: Any = self.forward_batch  # serve.batch's setters are not part of its type
        batching.set_max_batch_size(max_batch_size)
        batching.set_batch_wait_timeout_s(batch_wait_s)

    async def describe(self) -> Description:
        return self._description

    async def forward(self, call: RemoteCall) -> ForwardResult:
        outcome = await self.forward_batch(call)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def forward_batch(self, calls: list[RemoteCall]) -> list[ForwardResult | Exception]:
        return await self._on_worker(self._run_calls, calls)

    async def weight(self, name: str) -> torch.Tensor:
        return await self._on_worker(lambda: merging.owned(self._backend.weight(name)))

    async def dictionary(self, latents_point: HookPoint, method: str, *args: Any) -> Any:
        """One of an attached dictionary's methods (`REMOTE_METHODS`), on the replica."""
        if method not in REMOTE_METHODS:
            raise ValueError(f"{method!r} is not a dictionary method served remotely")
        found = getattr(self._backend.dictionaries[latents_point].dictionary, method)
        return await self._on_worker(lambda: self._apply(found, *args))

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(
            this_process(), self._passes, self._calls, self._rows, tuple(self._recent)
        )

    async def _on_worker(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _apply(
        self, fn: Callable[..., torch.Tensor | None], *args: torch.Tensor
    ) -> torch.Tensor | None:
        with torch.inference_mode():
            out = fn(*(x.to(self._backend.device, torch.float32) for x in args))
            return None if out is None else merging.owned(out)

    def _run_calls(self, calls: Sequence[RemoteCall]) -> list[ForwardResult | Exception]:
        outcomes: dict[int, ForwardResult | Exception] = {}
        for members in merging.plan([call.request for call in calls]):
            shared = self._run_pass([calls[i] for i in members])
            outcomes.update(zip(members, shared, strict=True))
        self._calls += len(calls)
        return [outcomes[i] for i in range(len(calls))]

    def _run_pass(self, calls: Sequence[RemoteCall]) -> list[ForwardResult | Exception]:
        if len(calls) > 1:
            requests = [call.request for call in calls]
            try:
                merged = self._forward(tuple(c.caller for c in calls), merging.merge(requests))
                return list(merging.split(merged, requests))
            except Exception:
                # One caller's bad request, or a pass too large for memory, must not fail the
                # others: each runs alone and meets its own fate.
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return [self._alone(call) for call in calls]

    def _alone(self, call: RemoteCall) -> ForwardResult | Exception:
        try:
            return merging.on_cpu(self._forward((call.caller,), call.request))
        except Exception as exc:
            return exc

    def _forward(self, callers: tuple[str, ...], request: ForwardRequest) -> ForwardResult:
        started = time.perf_counter()
        result = self._backend.forward(request)
        self._passes += 1
        self._rows += len(request.tokens)
        self._recent.append(PassRecord(callers, len(request.tokens), time.perf_counter() - started))
        return result


def describe(served: ServedModel) -> Description:
    backend = served.backend
    return Description(
        model=served.model,
        backend=backend.name,
        architecture=backend.architecture,
        tokenizer=backend.tokenizer,
        locations=backend.locations,
        dictionaries=tuple(
            DictionaryShape(
                name=a.name,
                layer=a.layer,
                input=a.input,
                output=a.output,
                architecture=a.dictionary.architecture,
                d_in=a.dictionary.d_in,
                d_out=a.dictionary.d_out,
                n_latents=a.dictionary.n_latents,
                rescales=a.dictionary.rescales,
            )
            for _, a in sorted(backend.dictionaries.items())
        ),
        dictionary_sources=dict(served.dictionary_sources),
        device=str(backend.device),
        dtype=backend.dtype,
        torch_threads=torch.get_num_threads(),
    )


def deploy(address: str, load: LoadModel, settings: DeploySettings) -> Description:
    """Starts, or updates in place, the application `settings.app` on the cluster at `address`;
    returns once every replica has loaded the model. The application outlives this process."""
    join(address)
    serve.start(proxy_location=ProxyLocation.Disabled)
    deployment = serve.deployment(name=DEPLOYMENT)(BackendReplica).options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        # Room for a full batch queued behind the running one, and for describe/weight calls.
        max_ongoing_requests=2 * settings.max_batch_size + 4,
        # A model that fails to load fails the same way again: say so now, not after 20 tries.
        max_constructor_retry_count=1,
    )
    app = deployment.bind(load, settings.max_batch_size, settings.batch_wait_s)
    # serve.run waits without end for replicas the cluster has no room for; it waits on a
    # thread here, so that a deploy that cannot finish says why.
    outcome: list[DeploymentHandle[Any] | Exception] = []

    def run() -> None:
        try:
            outcome.append(serve.run(app, name=settings.app, route_prefix=None))
        except Exception as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=run, name="serve-run", daemon=True)
    waiting.start()
    waiting.join(settings.ready_timeout_s)
    if not outcome:
        raise ValueError(
            f"the Ray Serve application {settings.app!r} was not running after "
            f"{settings.ready_timeout_s:g} s; it keeps trying (`--delete` removes it)"
            f"{_why(settings.app)}"
        )
    handle = outcome[0]
    if isinstance(handle, Exception):
        raise ValueError(
            f"the Ray Serve application {settings.app!r} did not start: {handle}"
            f"{_why(settings.app)}"
        )
    description: Description = handle.describe.remote().result()
    return description


def _why(app: str) -> str:
    """The replicas' own reason: the last line of their traceback, e.g. the exception the
    model's loading raised."""
    status = serve.status().applications.get(app)
    if status is None:
        return ""
    messages = [status.message] + [d.message for d in status.deployments.values()]
    return "".join(f"\n{m.strip().splitlines()[-1]}" for m in messages if m.strip())


def delete(address: str, app: str) -> None:
    join(address)
    serve.delete(app)
