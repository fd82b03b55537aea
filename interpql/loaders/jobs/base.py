"""What a job is, and the one page a job-store author reads: the JobStore protocol."""

from __future__ import annotations

import asyncio
import datetime
import enum
import json
import sqlite3
import uuid
from collections.abc import AsyncGenerator, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from interpql.errors import InterpqlError, UnavailableError
from interpql.file_errors import sqlite_reason
from interpql.loaders.sources import ExplanationData, StoredExplanation
from interpql.specs import parse_node_id

# Said of every job a stopping server leaves unfinished, by that server or, when it was killed,
# by the next one to look: the work is lost, the request is not.
STOPPED = (
    "The server stopped before the job finished; submit it again (an identical request that "
    "had finished is answered from the explanation store)."
)


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


@dataclass(frozen=True)
class JobEvent:
    sequence: int
    status: JobStatus
    progress: float  # 0-1
    message: str


@dataclass
class Job:
    id: str
    kind: str  # "explain" | "score"
    node_id: str
    key_id: str
    owner: str = ""  # the server instance that runs it (see owners.py)
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    message: str = "queued"
    result: Any = None  # what the job produced (stored explanations)
    from_store: bool = False  # answered from the explanation store, nothing paid
    error: str | None = None
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    # Only the process running the job keeps its events here; stores keep them for everyone.
    events: list[JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.status.finished

    def report(self, status: JobStatus, progress: float, message: str) -> JobEvent:
        self.status, self.progress, self.message = status, progress, message
        event = JobEvent(len(self.events), status, progress, message)
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()
        return event


@dataclass(frozen=True)
class JobChange:
    """One event of a job as a store writes it; the outcome fields count once it is finished.

    `sequence` is the event's number as its server counted it (None: whatever comes next), so
    that a write retried after a timeout, which may have been applied after all, is not applied
    twice."""

    status: JobStatus
    progress: float
    message: str
    result: Any = None
    from_store: bool = False
    error: str | None = None
    sequence: int | None = None


@dataclass(frozen=True)
class Limits:
    running: int  # jobs at once per key
    tokens: int  # tokens spent per key, ever


@dataclass
class KeyUsage:
    running: int = 0
    tokens: int = 0


# How long a store keeps a job after its last change.
RETENTION_S = 7 * 24 * 3600


def new_job_id() -> str:
    """Unique across processes and restarts, so one store can hold every replica's jobs."""
    return f"job-{uuid.uuid4().hex}"


class SharedStateUnavailable(UnavailableError):
    """The job store (Redis, or the SQLite file) cannot be reached."""

    default_code = "SHARED_STATE_UNAVAILABLE"


def shared_state_unavailable(cause: BaseException | str) -> SharedStateUnavailable:
    # The cause's type only: its text names hosts and ports clients have no business knowing.
    # (SQLite's codes name neither, and say what an operator must do: free disk space, ...)
    if isinstance(cause, sqlite3.Error):
        why = sqlite_reason(cause)
    else:
        why = cause if isinstance(cause, str) else type(cause).__name__
    return SharedStateUnavailable(f"The job store is unavailable ({why}); try again shortly.")


def rate_limited(running: int, limits: Limits) -> InterpqlError:
    return InterpqlError(
        f"This API key already runs {running} jobs (at most {limits.running} at once).",
        code="RATE_LIMITED",
    )


def quota_exceeded(limits: Limits) -> InterpqlError:
    return InterpqlError(
        f"This API key has spent its {limits.tokens} tokens.", code="QUOTA_EXCEEDED"
    )


class JobStore(Protocol):
    """Where jobs, their events and per-key usage live, for every server that shares it.

    A store is what makes a job outlive the request that started it: any server sharing the
    store answers `get` and `events` for a job another one runs, and a job a dead server left
    unfinished can be found (`unfinished`) and failed by the next. Two implementations:
    SqliteJobStore (one file, or memory) and RedisJobStore (replicas).

    Every method raises `shared_state_unavailable(...)` (SHARED_STATE_UNAVAILABLE) when the
    store cannot be reached, and nothing else for that reason; the manager retries writes.

    - `create(job, first, limits)`: atomically checks `limits` for `job.key_id` (RATE_LIMITED
      when `limits.running` of its jobs are unfinished, QUOTA_EXCEEDED when it has spent
      `limits.tokens`), then records the job and its first event (sequence 0).
    - `update(job_id, key_id, change)`: appends `change` as the job's next event and sets the
      job's status, progress and message; a finishing change also sets result, from_store and
      error. A change whose `sequence` the job already has was written before: nothing is
      written and `update` answers True. Finished is final: a change to a finished job is
      dropped and `update` answers False (a job failed for its dead owner stays failed). False
      too for an unknown job.
    - `get(job_id)`: the job as last written (its `events` empty), or None.
    - `events(job_id)`: every event of the job from sequence 0, then each new one as it is
      written, forever; the caller stops at a finished one. Past events come first, so a
      subscriber that arrives late misses nothing.
    - `spend(key_id, tokens)` and `usage(key_id)`: tokens spent, and unfinished jobs, per key.
    - `unfinished()`: every queued or running job, with its owner.
    - `renew(owner, ttl_s)`, `live_owners(owners)`, `forget(owner)`: owners' leases. A server
      renews its own while it runs and forgets it when it stops; an owner whose lease lapsed
      is gone.
    - `close()`.
    """

    async def create(self, job: Job, first: JobEvent, limits: Limits) -> None: ...

    async def update(self, job_id: str, key_id: str, change: JobChange) -> bool: ...

    async def get(self, job_id: str) -> Job | None: ...

    def events(self, job_id: str) -> AsyncGenerator[JobEvent, None]: ...

    async def spend(self, key_id: str, tokens: int) -> None: ...

    async def usage(self, key_id: str) -> KeyUsage: ...

    async def unfinished(self) -> list[Job]: ...

    async def renew(self, owner: str, ttl_s: float) -> None: ...

    async def live_owners(self, owners: Collection[str]) -> set[str]: ...

    async def forget(self, owner: str) -> None: ...

    async def close(self) -> None: ...

    @property
    def shared(self) -> bool:
        """Whether other processes may use it (then owners' leases matter)."""
        ...


# Stored results are JSON, so that a replica without the producing server's explanation store
# (another host, another file) still answers Job.result.


def encode_result(result: Any) -> str:
    stored: list[StoredExplanation] = result or []
    return json.dumps(
        [
            {
                "id": s.id,
                "node": s.node.id,
                "source": s.data.source,
                "text": s.data.text,
                "score": s.data.score,
                "scorer": s.data.scorer,
                "explainer": s.data.explainer,
                "created": s.data.created,
                "request_key": s.request_key,
                "provenance": s.provenance,
            }
            for s in stored
        ]
    )


def decode_result(text: str | None) -> list[StoredExplanation] | None:
    if not text:
        return None
    return [
        StoredExplanation(
            id=item["id"],
            node=parse_node_id(item["node"]),
            data=ExplanationData(
                item["source"],
                item["text"],
                item["score"],
                item["scorer"],
                item["explainer"],
                item["created"],
            ),
            request_key=item["request_key"],
            provenance=item["provenance"],
        )
        for item in json.loads(text)
    ]
