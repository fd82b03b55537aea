"""Jobs in one SQLite file (a restarted server still answers for them), or in memory.

Every write is one `BEGIN IMMEDIATE` transaction, so processes sharing the file see each limit
check and its job as one step. Subscribers of this process are woken by its own writes; those
of other processes sharing the file poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

from interpql.file_errors import immediate_transaction, open_sqlite, reading
from interpql.loaders.jobs.base import (
    RETENTION_S,
    Job,
    JobChange,
    JobEvent,
    JobStatus,
    KeyUsage,
    Limits,
    decode_result,
    encode_result,
    quota_exceeded,
    rate_limited,
    shared_state_unavailable,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    node_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL,
    message TEXT NOT NULL,
    result TEXT,
    from_store INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created TEXT NOT NULL,
    changed REAL NOT NULL,
    events INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_key ON jobs (key_id, status);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_usage (key_id TEXT PRIMARY KEY, tokens INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, expires REAL NOT NULL);
"""

_UNFINISHED = ("queued", "running")
_JOB_COLUMNS = (
    "id, kind, node_id, key_id, owner, status, progress, message, result, from_store, error, "
    "created"
)


class SqliteJobStore:
    def __init__(self, path: str | Path = ":memory:", poll_s: float = 0.2) -> None:
        self.path = str(path)
        self.shared = self.path != ":memory:"
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._changed = asyncio.Event()
        if self.shared:
            self._db = open_sqlite(self.path, "the job store")
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with reading(self.path, "the job store"):
            self._db.execute("PRAGMA busy_timeout = 5000")
            if self.shared:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._prune()

    def _prune(self) -> None:
        horizon = time.time() - RETENTION_S
        with immediate_transaction(self._db):
            old = "SELECT id FROM jobs WHERE status NOT IN (?, ?) AND changed < ?"
            self._db.execute(
                f"DELETE FROM job_events WHERE job_id IN ({old})", (*_UNFINISHED, horizon)
            )
            self._db.execute(f"DELETE FROM jobs WHERE id IN ({old})", (*_UNFINISHED, horizon))
            self._db.execute("DELETE FROM owners WHERE expires < ?", (horizon,))

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._lock:
                return function(*args)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise shared_state_unavailable(exc) from exc

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def create(self, job: Job, first: JobEvent, limits: Limits) -> None:
        await self._call(self._create, job, first, limits)
        self._notify()

    def _create(self, job: Job, first: JobEvent, limits: Limits) -> None:
        with immediate_transaction(self._db):
            [running] = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?)",
                (job.key_id, *_UNFINISHED),
            ).fetchone()
            if running >= limits.running:
                raise rate_limited(running, limits)
            if self._tokens(job.key_id) >= limits.tokens:
                raise quota_exceeded(limits)
            self._db.execute(
                f"INSERT INTO jobs ({_JOB_COLUMNS}, changed, events) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    job.id,
                    job.kind,
                    job.node_id,
                    job.key_id,
                    job.owner,
                    first.status.value,
                    first.progress,
                    first.message,
                    None,
                    0,
                    None,
                    job.created,
                    time.time(),
                ),
            )
            self._insert_event(job.id, first)

    def _insert_event(self, job_id: str, event: JobEvent) -> None:
        self._db.execute(
            "INSERT INTO job_events (job_id, sequence, status, progress, message) "
            "VALUES (?, ?, ?, ?, ?)",
            (job_id, event.sequence, event.status.value, event.progress, event.message),
        )

    def _tokens(self, key_id: str) -> int:
        row = self._db.execute("SELECT tokens FROM key_usage WHERE key_id = ?", (key_id,))
        found = row.fetchone()
        return 0 if found is None else int(found[0])

    async def update(self, job_id: str, key_id: str, change: JobChange) -> bool:
        written = await self._call(self._update, job_id, change)
        if written:
            self._notify()
        return written

    def _update(self, job_id: str, change: JobChange) -> bool:
        with immediate_transaction(self._db):
            row = self._db.execute(
                "SELECT status, events FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return False
            sequence = int(row[1]) if change.sequence is None else change.sequence
            if sequence < int(row[1]):
                return True  # a retried write that had been written
            if JobStatus(row[0]).finished:
                return False
            self._db.execute(
                "UPDATE jobs SET status = ?, progress = ?, message = ?, changed = ?, events = ? "
                "WHERE id = ?",
                (
                    change.status.value,
                    change.progress,
                    change.message,
                    time.time(),
                    sequence + 1,
                    job_id,
                ),
            )
            if change.status.finished:
                self._db.execute(
                    "UPDATE jobs SET result = ?, from_store = ?, error = ? WHERE id = ?",
                    (encode_result(change.result), change.from_store, change.error, job_id),
                )
            event = JobEvent(sequence, change.status, change.progress, change.message)
            self._insert_event(job_id, event)
        return True

    async def get(self, job_id: str) -> Job | None:
        rows = await self._call(self._jobs, "WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def _jobs(self, where: str, args: tuple[Any, ...]) -> list[Job]:
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs {where}", args).fetchall()
        return [
            Job(
                id=row[0],
                kind=row[1],
                node_id=row[2],
                key_id=row[3],
                owner=row[4],
                status=JobStatus(row[5]),
                progress=row[6],
                message=row[7],
                result=decode_result(row[8]),
                from_store=bool(row[9]),
                error=row[10],
                created=row[11],
            )
            for row in rows
        ]

    async def events(self, job_id: str) -> AsyncGenerator[JobEvent, None]:
        seen = 0
        while True:
            changed = self._changed
            rows = await self._call(self._events_from, job_id, seen)
            for sequence, status, progress, message in rows:
                yield JobEvent(sequence, JobStatus(status), progress, message)
                seen = sequence + 1
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.poll_s)

    def _events_from(self, job_id: str, sequence: int) -> list[tuple[int, str, float, str]]:
        return self._db.execute(
            "SELECT sequence, status, progress, message FROM job_events "
            "WHERE job_id = ? AND sequence >= ? ORDER BY sequence",
            (job_id, sequence),
        ).fetchall()

    async def spend(self, key_id: str, tokens: int) -> None:
        await self._call(self._spend, key_id, tokens)

    def _spend(self, key_id: str, tokens: int) -> None:
        self._db.execute(
            "INSERT INTO key_usage (key_id, tokens) VALUES (?, ?) "
            "ON CONFLICT (key_id) DO UPDATE SET tokens = tokens + excluded.tokens",
            (key_id, tokens),
        )

    async def usage(self, key_id: str) -> KeyUsage:
        return await self._call(self._usage, key_id)

    def _usage(self, key_id: str) -> KeyUsage:
        [running] = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?)",
            (key_id, *_UNFINISHED),
        ).fetchone()
        return KeyUsage(int(running), self._tokens(key_id))

    async def unfinished(self) -> list[Job]:
        return await self._call(self._jobs, "WHERE status IN (?, ?)", _UNFINISHED)

    async def renew(self, owner: str, ttl_s: float) -> None:
        await self._call(
            self._db.execute,
            "INSERT INTO owners (owner, expires) VALUES (?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET expires = excluded.expires",
            (owner, time.time() + ttl_s),
        )

    async def live_owners(self, owners: Collection[str]) -> set[str]:
        if not owners:
            return set()
        marks = ",".join("?" * len(owners))
        rows = await self._call(
            lambda: self._db.execute(
                f"SELECT owner FROM owners WHERE owner IN ({marks}) AND expires > ?",
                (*owners, time.time()),
            ).fetchall()
        )
        return {row[0] for row in rows}

    async def forget(self, owner: str) -> None:
        await self._call(self._db.execute, "DELETE FROM owners WHERE owner = ?", (owner,))

    async def close(self) -> None:
        with self._lock:
            self._db.close()
