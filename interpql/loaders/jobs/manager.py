"""Running jobs: the asyncio tasks of this server, their events, and their writes to the store.

The process running a job keeps it in memory until the store holds its end: its own clients
follow it from memory, everyone else from the store. Writes go to the store in order, one at a
time, and are retried while the store is unavailable, so a running job never waits for the
store and loses none of its events once the store is back. Starting a job writes at once (that
is where the per-key limits are checked, in the store, across replicas) and answers
SHARED_STATE_UNAVAILABLE when it cannot.

No job is left unfinished and silent: a stopping server fails its jobs and writes that before
it exits, and a server that was killed is found out by the others (or its successor) through
its lease (owners.py), which then fail its jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

from interpql.backends.explanations.base import ExplanationError, SimulationError
from interpql.errors import InterpqlError, NotFoundError
from interpql.file_errors import sqlite_reason
from interpql.loaders.cache import OutageLog
from interpql.loaders.jobs import owners
from interpql.loaders.jobs.base import (
    STOPPED,
    Job,
    JobChange,
    JobEvent,
    JobStatus,
    JobStore,
    KeyUsage,
    Limits,
    SharedStateUnavailable,
    new_job_id,
)
from interpql.loaders.jobs.redis_store import RedisJobStore
from interpql.loaders.jobs.sqlite_store import SqliteJobStore

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
Work = Callable[[Job, Progress], Awaitable[Any]]
Write = Callable[[], Awaitable[None]]

NOT_STARTED = "The job could not be started: the job store did not answer in time."

_MAX_ID_LENGTH = 100


def open_store(redis_url: str | None, explanation_store: str) -> JobStore:
    """Redis when given, else a SQLite file beside the explanation store (memory beside none)."""
    if redis_url is not None:
        return RedisJobStore(redis_url)
    if explanation_store == ":memory:":
        return SqliteJobStore()
    path = Path(explanation_store)
    return SqliteJobStore(path.with_name(path.stem + ".jobs.sqlite"))


class JobManager:
    def __init__(
        self,
        max_jobs_per_key: int = 2,
        max_tokens_per_key: int = 2_000_000,
        store: JobStore | None = None,
        lease_s: float = 30.0,
        write_timeout_s: float = 2.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.max_jobs_per_key = max_jobs_per_key
        self.max_tokens_per_key = max_tokens_per_key
        self.store: JobStore = store if store is not None else SqliteJobStore()
        self.lease_s = lease_s
        self.write_timeout_s = write_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.owner = owners.new_owner()
        self._local: dict[str, Job] = {}
        self._starting: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: deque[Write] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._enqueued = 0
        self._written = 0
        self._wrote = asyncio.Event()
        self._writes = OutageLog(
            "job store", "job changes wait", "is back; the waiting changes follow"
        )
        self._heartbeat: asyncio.Task[None] | None = None
        self._renewed_at = -float("inf")
        self._lease = OutageLog(
            "job store lease renewal", "other servers may take this one for stopped", "works again"
        )
        self._stopped = False
        self._finished: Counter[JobStatus] = Counter()

    @property
    def limits(self) -> Limits:
        return Limits(self.max_jobs_per_key, self.max_tokens_per_key)

    async def start(self) -> None:
        """Takes this server's lease and fails what stopped servers left unfinished; then keeps
        doing both while it runs. Only stores other processes share need it."""
        if self._heartbeat is not None or not self.store.shared or self._stopped:
            return
        self._heartbeat = asyncio.create_task(self._beat_forever())
        await self._beat()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self._beat()

    async def _beat(self) -> None:
        try:
            await self._renew()
            await self.recover()
        except SharedStateUnavailable as exc:
            self._lease.failed(exc.__cause__ or exc)
            return
        except Exception:
            log.exception("job store: renewing the lease or recovering jobs failed")
        self._lease.answered()

    async def _renew(self) -> None:
        await self.store.renew(self.owner, self.lease_s)
        self._renewed_at = asyncio.get_running_loop().time()

    async def recover(self) -> int:
        """Fails the unfinished jobs of servers that stopped; returns how many."""
        unfinished = await self.store.unfinished()
        others = {job.owner for job in unfinished if job.owner != self.owner}
        live = await self.store.live_owners(others) if others else set()
        failed = 0
        for job in unfinished:
            if job.owner == self.owner:
                if job.id in self._local or job.id in self._starting:
                    continue
                # Written by a submit that timed out waiting for the store's answer.
                why = NOT_STARTED
            elif owners.stopped(job.owner, live, self.owner):
                why = STOPPED
            else:
                continue
            change = JobChange(JobStatus.FAILED, job.progress, why, error=why)
            if await self.store.update(job.id, job.key_id, change):
                log.warning("job %s failed: %s (owner %s)", job.id, why, job.owner)
                failed += 1
        return failed

    async def submit(self, kind: str, node_id: str, key_id: str, work: Work) -> Job:
        if self._stopped:
            raise SharedStateUnavailable("The job store is closed: this server is stopping.")
        await self.start()  # servers without a lifespan (tests through ASGITransport)
        if self.store.shared:
            loop = asyncio.get_running_loop()
            if loop.time() - self._renewed_at > self.lease_s / 2:
                # Never a job without a fresh lease: others would take it for a dead server's.
                await self._renew()
        if self._writes.failing:
            raise SharedStateUnavailable(
                "The job store is unavailable (earlier changes are still waiting to be "
                "written); try again shortly."
            )
        if not await self.flush(self.write_timeout_s):
            raise SharedStateUnavailable(
                "The job store is unavailable (it did not take earlier changes in "
                f"{self.write_timeout_s:g} s); try again shortly."
            )
        job = Job(id=new_job_id(), kind=kind, node_id=node_id, key_id=key_id, owner=self.owner)
        first = job.report(JobStatus.QUEUED, 0.0, "queued")
        self._starting.add(job.id)
        try:
            await self.store.create(job, first, self.limits)
            self._local[job.id] = job
        finally:
            self._starting.discard(job.id)
        task = asyncio.create_task(self._run(job, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, work: Work) -> None:
        def progress(fraction: float, message: str) -> None:
            self._report(job, JobStatus.RUNNING, fraction, message)

        try:
            progress(0.0, "started")
            job.result = await work(job, progress)
            self._report(job, JobStatus.SUCCEEDED, 1.0, "done")
        except asyncio.CancelledError:
            job.error = STOPPED
            self._report(job, JobStatus.FAILED, job.progress, STOPPED)
            raise
        except Exception as exc:
            job.error = describe_failure(exc)
            log.warning("job %s failed: %s", job.id, job.error, exc_info=exc)
            self._report(job, JobStatus.FAILED, job.progress, job.error)

    def counts(self) -> dict[JobStatus, int]:
        """This server's jobs: those unfinished now, and those finished since it started."""
        counts = {status: self._finished[status] for status in JobStatus}
        for job in self._local.values():
            if not job.done:
                counts[job.status] += 1
        return counts

    def _report(self, job: Job, status: JobStatus, progress: float, message: str) -> None:
        event = job.report(status, progress, message)
        if status.finished:
            self._finished[status] += 1
        change = JobChange(
            status, progress, message, job.result, job.from_store, job.error, event.sequence
        )

        async def write() -> None:
            written = await self.store.update(job.id, job.key_id, change)
            if not written:
                log.warning("job %s: the store refused %s (finished elsewhere?)", job.id, status)
            elif status.finished:
                self._local.pop(job.id, None)  # the store answers for it from now on

        self._enqueue(write)

    def spend(self, key_id: str, tokens: int) -> None:
        """Counts tokens a key spent (written in order with the jobs' changes)."""
        if tokens > 0:
            self._enqueue(lambda: self.store.spend(key_id, tokens))

    async def usage(self, key_id: str) -> KeyUsage:
        await self.flush(self.write_timeout_s)
        return await self.store.usage(key_id)

    def _enqueue(self, write: Write) -> None:
        self._pending.append(write)
        self._enqueued += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        delay = 0.05
        while self._pending:
            try:
                await self._pending[0]()
            except SharedStateUnavailable as exc:
                self._writes.failed(exc.__cause__ or exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            except Exception:
                log.exception("a job change could not be written; dropped")
            self._writes.answered()
            delay = 0.05
            self._pending.popleft()
            self._written += 1
            self._wrote.set()
            self._wrote = asyncio.Event()

    async def flush(self, timeout_s: float) -> bool:
        """Waits until every change made so far is written; False after `timeout_s`."""
        target = self._enqueued
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._written < target:
            wrote = self._wrote
            try:
                await asyncio.wait_for(wrote.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return False
        return True

    async def get(self, job_id: str, key_id: str | None = None) -> Job:
        """The job; with `key_id`, only if that key created it. Another key's job is answered
        exactly as a job that does not exist: a caller learns nothing of others' jobs."""
        job = self._local.get(job_id)
        if job is None and len(job_id) <= _MAX_ID_LENGTH:
            job = await self.store.get(job_id)
        if job is None or (key_id is not None and job.key_id != key_id):
            raise job_not_found(job_id)
        return job

    async def follow(
        self, job_id: str, key_id: str | None = None
    ) -> AsyncGenerator[JobEvent, None]:
        """Every event of the job, past ones first, until it is done (`key_id` as for
        `get`)."""
        job = self._local.get(job_id)
        if job is not None and (key_id is None or job.key_id == key_id):
            async for event in _follow_in_memory(job):
                yield event
            return
        await self.get(job_id, key_id)
        events = self.store.events(job_id)
        try:
            async for event in events:
                yield event
                if event.status.finished:
                    return
        finally:
            await events.aclose()

    async def shutdown(self) -> None:
        """Fails what still runs (never left half-done and silent), writes that, then lets go of
        the store."""
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in list(self._local.values()):
            if not job.done:  # cancelled before its task first ran
                job.error = STOPPED
                self._report(job, JobStatus.FAILED, job.progress, STOPPED)
        if not await self.flush(self.stop_timeout_s):
            log.error(
                "%d job changes could not be written before stopping (job store unavailable)",
                len(self._pending),
            )
        for background in (self._writer, self._heartbeat):
            if background is not None and not background.done():
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        if self.store.shared:
            with contextlib.suppress(SharedStateUnavailable):
                await self.store.forget(self.owner)
        await self.store.close()


async def _follow_in_memory(job: Job) -> AsyncGenerator[JobEvent, None]:
    seen = 0
    while True:
        changed = job._changed
        while seen < len(job.events):
            yield job.events[seen]
            seen += 1
        if job.done:
            return
        await changed.wait()


def job_not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"No job {job_id[:_MAX_ID_LENGTH]!r}.", code="JOB_NOT_FOUND")


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
    if isinstance(exc, SimulationError | ExplanationError):
        return f"The explainer API's answers could not be used: {exc}"[:300]
    if isinstance(exc, sqlite3.Error):
        return (
            f"The explanation store could not be written ({sqlite_reason(exc)}); nothing was "
            "stored. The server's log has the details."
        )
    return (
        "The job failed on an internal error; nothing was stored. The server's log has the "
        "details: submit it again, or tell the server's operator."
    )
