"""Long-running jobs (explaining and scoring nodes): status, progress and results, and the
events that subscriptions stream.

A job is an asyncio task owned by the server. Every change is an event, kept in order, so a
subscriber that arrives late first gets what it missed and then waits for the rest. Limits are
per API key: jobs at once (RATE_LIMITED) and tokens spent (QUOTA_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from interpql.errors import InterpqlError, NotFoundError

log = logging.getLogger(__name__)


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


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
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    message: str = "queued"
    result: Any = None  # what the job produced (stored explanations)
    from_store: bool = False  # answered from the explanation store, nothing paid
    error: str | None = None
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    events: list[JobEvent] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.status in (JobStatus.SUCCEEDED, JobStatus.FAILED)

    def report(self, status: JobStatus, progress: float, message: str) -> None:
        self.status, self.progress, self.message = status, progress, message
        self.events.append(JobEvent(len(self.events), status, progress, message))
        self._changed.set()
        self._changed = asyncio.Event()


Progress = Callable[[float, str], None]
Work = Callable[[Job, Progress], Awaitable[Any]]


@dataclass
class KeyUsage:
    running: int = 0
    tokens: int = 0


class JobManager:
    def __init__(self, max_jobs_per_key: int = 2, max_tokens_per_key: int = 2_000_000) -> None:
        self.max_jobs_per_key = max_jobs_per_key
        self.max_tokens_per_key = max_tokens_per_key
        self._jobs: dict[str, Job] = {}
        self._usage: dict[str, KeyUsage] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    def usage(self, key_id: str) -> KeyUsage:
        return self._usage.setdefault(key_id, KeyUsage())

    def spend(self, key_id: str, tokens: int) -> None:
        self.usage(key_id).tokens += tokens

    def submit(self, kind: str, node_id: str, key_id: str, work: Work) -> Job:
        usage = self.usage(key_id)
        if usage.running >= self.max_jobs_per_key:
            raise InterpqlError(
                f"This API key already runs {usage.running} jobs (at most "
                f"{self.max_jobs_per_key} at once).",
                code="RATE_LIMITED",
            )
        if usage.tokens >= self.max_tokens_per_key:
            raise InterpqlError(
                f"This API key has spent its {self.max_tokens_per_key} tokens.",
                code="QUOTA_EXCEEDED",
            )
        job = Job(id=f"job-{next(self._ids)}", kind=kind, node_id=node_id, key_id=key_id)
        job.report(JobStatus.QUEUED, 0.0, "queued")
        self._jobs[job.id] = job
        usage.running += 1
        task = asyncio.create_task(self._run(job, work, usage))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, work: Work, usage: KeyUsage) -> None:
        def progress(fraction: float, message: str) -> None:
            job.report(JobStatus.RUNNING, fraction, message)

        try:
            progress(0.0, "started")
            job.result = await work(job, progress)
            job.report(JobStatus.SUCCEEDED, 1.0, "done")
        except asyncio.CancelledError:
            job.error = "The server stopped before the job finished."
            job.report(JobStatus.FAILED, job.progress, job.error)
            raise
        except Exception as exc:
            job.error = describe_failure(exc)
            log.warning("job %s failed: %s", job.id, job.error, exc_info=exc)
            job.report(JobStatus.FAILED, job.progress, job.error)
        finally:
            usage.running -= 1

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"No job {job_id!r}.", code="JOB_NOT_FOUND")
        return job

    async def follow(self, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event of the job, past ones first, until it is done."""
        job = self.get(job_id)
        seen = 0
        while True:
            changed = job._changed
            while seen < len(job.events):
                yield job.events[seen]
                seen += 1
            if job.done:
                return
            await changed.wait()

    async def shutdown(self) -> None:
        """Fails what still runs (never left half-done and silent), then waits for it."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def describe_failure(exc: BaseException) -> str:
    """Why a job failed, in words a client can act on (no stack traces, no secrets)."""
    import openai

    if isinstance(exc, InterpqlError):
        return exc.message
    if isinstance(exc, openai.APITimeoutError):
        return "The explainer API timed out (after retries)."
    if isinstance(exc, openai.RateLimitError):
        return "The explainer API kept answering 429 Too Many Requests (after retries)."
    if isinstance(exc, openai.APIStatusError):
        return f"The explainer API answered HTTP {exc.status_code} (after retries)."
    if isinstance(exc, openai.APIConnectionError):
        return "The explainer API could not be reached (after retries)."
    return f"{type(exc).__name__}: {exc}"[:300]
