"""Jobs in Redis, shared by every replica: a hash per job, a stream of its events, and per-key
usage, each check-and-write one Lua script (atomic across replicas).

    {prefix}job:{id}             hash: the job as last written (expires RETENTION_S after)
    {prefix}job:{id}:events      stream: its events, read with XREAD BLOCK by any replica
    {prefix}active               set: ids of unfinished jobs (for finding dead owners' jobs)
    {prefix}key:{key}:running    set: a key's unfinished jobs (the jobs-at-once limit)
    {prefix}key:{key}:tokens     integer: tokens a key has spent
    {prefix}owner:{owner}        a server's lease, renewed while it runs
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection
from typing import Any, cast
from urllib.parse import urlparse

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

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

# KEYS: job, events, active, key's running, key's tokens
# ARGV: max running, max tokens, ttl, job id, status, progress, message, field, value, ...
_CREATE = """
local running = redis.call('SCARD', KEYS[4])
if running >= tonumber(ARGV[1]) then return {'RATE_LIMITED', running} end
local spent = tonumber(redis.call('GET', KEYS[5]) or '0')
if spent >= tonumber(ARGV[2]) then return {'QUOTA_EXCEEDED', spent} end
redis.call('HSET', KEYS[1], 'status', ARGV[5], 'progress', ARGV[6], 'message', ARGV[7],
           'events', 1, unpack(ARGV, 8))
redis.call('XADD', KEYS[2], '*', 'sequence', 0, 'status', ARGV[5], 'progress', ARGV[6],
           'message', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
return {'OK', 0}
"""

# KEYS: job, events, active, key's running
# ARGV: ttl, job id, status, progress, message, finishes ('1' or '0'), sequence ('' for the
# next), field, value, ...
_UPDATE = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return -1 end
local count = tonumber(redis.call('HGET', KEYS[1], 'events'))
local sequence = count
if ARGV[7] ~= '' then
    sequence = tonumber(ARGV[7])
    if sequence < count then return 2 end
end
if current == 'succeeded' or current == 'failed' then return 0 end
redis.call('HSET', KEYS[1], 'events', sequence + 1, 'status', ARGV[3], 'progress', ARGV[4],
           'message', ARGV[5], unpack(ARGV, 8))
redis.call('XADD', KEYS[2], '*', 'sequence', sequence, 'status', ARGV[3], 'progress', ARGV[4],
           'message', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
if ARGV[6] == '1' then
    redis.call('SREM', KEYS[3], ARGV[2])
    redis.call('SREM', KEYS[4], ARGV[2])
end
return 1
"""


def check_redis_url(url: str) -> str:
    if urlparse(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"--redis must be redis://host:port[/db], not {url!r}")
    return url


def redis_client(
    url: str, timeout_s: float, read_timeout_s: float, decode_responses: bool = True
) -> redis.asyncio.Redis:
    """A client that answers at once when Redis cannot be reached: no retries inside it (the
    callers retry what they must, or refuse with a typed error)."""
    return redis.asyncio.Redis.from_url(
        check_redis_url(url),
        decode_responses=decode_responses,
        socket_connect_timeout=timeout_s,
        socket_timeout=read_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class RedisJobStore:
    shared = True

    def __init__(
        self,
        url: str,
        prefix: str = "interpql:jobs:",
        timeout_s: float = 2.0,
        block_ms: int = 1000,
    ) -> None:
        self.url = check_redis_url(url)
        self.prefix = prefix
        self.block_ms = block_ms
        # The job manager retries its own writes.
        self._client = redis_client(url, timeout_s, timeout_s + block_ms / 1000)
        self._create = self._client.register_script(_CREATE)
        self._update = self._client.register_script(_UPDATE)

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _events_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:events"

    def _key(self, key_id: str, what: str) -> str:
        return f"{self.prefix}key:{key_id}:{what}"

    async def create(self, job: Job, first: JobEvent, limits: Limits) -> None:
        fields = {
            "id": job.id,
            "kind": job.kind,
            "node_id": job.node_id,
            "key_id": job.key_id,
            "owner": job.owner,
            "created": job.created,
        }
        try:
            verdict, count = await self._create(
                keys=[
                    self._job_key(job.id),
                    self._events_key(job.id),
                    self.prefix + "active",
                    self._key(job.key_id, "running"),
                    self._key(job.key_id, "tokens"),
                ],
                args=[
                    limits.running,
                    limits.tokens,
                    RETENTION_S,
                    job.id,
                    first.status.value,
                    repr(first.progress),
                    first.message,
                    *_flatten(fields),
                ],
            )
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        if verdict == "RATE_LIMITED":
            raise rate_limited(int(count), limits)
        if verdict == "QUOTA_EXCEEDED":
            raise quota_exceeded(limits)

    async def update(self, job_id: str, key_id: str, change: JobChange) -> bool:
        finishes = change.status.finished
        outcome: dict[str, str] = {}
        if finishes:
            outcome = {
                "result": encode_result(change.result),
                "from_store": "1" if change.from_store else "0",
            }
            if change.error is not None:
                outcome["error"] = change.error
        try:
            written = await self._update(
                keys=[
                    self._job_key(job_id),
                    self._events_key(job_id),
                    self.prefix + "active",
                    self._key(key_id, "running"),
                ],
                args=[
                    RETENTION_S,
                    job_id,
                    change.status.value,
                    repr(change.progress),
                    change.message,
                    "1" if finishes else "0",
                    "" if change.sequence is None else str(change.sequence),
                    *_flatten(outcome),
                ],
            )
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        return int(written) > 0  # 2: a retried write that had been written

    async def get(self, job_id: str) -> Job | None:
        try:
            # Strings, not bytes: the client decodes responses.
            fields = cast(dict[str, str], await self._client.hgetall(self._job_key(job_id)))  # type: ignore[misc]
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        return _job(fields) if fields else None

    async def events(self, job_id: str) -> AsyncGenerator[JobEvent, None]:
        stream = self._events_key(job_id)
        last = "0-0"
        while True:
            try:
                # [[stream, [(entry id, fields), ...]]], or None when BLOCK ran out
                answer: Any = await self._client.xread(
                    {stream: last}, count=100, block=self.block_ms
                )
            except RedisError as exc:
                raise shared_state_unavailable(exc) from exc
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield JobEvent(
                        int(fields["sequence"]),
                        JobStatus(fields["status"]),
                        float(fields["progress"]),
                        fields["message"],
                    )

    async def spend(self, key_id: str, tokens: int) -> None:
        try:
            await self._client.incrby(self._key(key_id, "tokens"), tokens)
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc

    async def usage(self, key_id: str) -> KeyUsage:
        try:
            running = await self._client.scard(self._key(key_id, "running"))  # type: ignore[misc]
            tokens = await self._client.get(self._key(key_id, "tokens"))
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        return KeyUsage(int(running), int(tokens or 0))

    async def unfinished(self) -> list[Job]:
        active = self.prefix + "active"
        try:
            ids = sorted(cast(set[str], await self._client.smembers(active)))  # type: ignore[misc]
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._job_key(job_id))
                found: list[dict[str, str]] = await pipe.execute()
            # A job whose record expired is no one's to finish.
            vanished = [job_id for job_id, fields in zip(ids, found, strict=True) if not fields]
            if vanished:
                await self._client.srem(active, *vanished)  # type: ignore[misc]
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        return [_job(fields) for fields in found if fields]

    async def renew(self, owner: str, ttl_s: float) -> None:
        try:
            await self._client.set(self.prefix + "owner:" + owner, "1", px=int(ttl_s * 1000))
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc

    async def live_owners(self, owners: Collection[str]) -> set[str]:
        ordered = sorted(owners)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for owner in ordered:
                    pipe.exists(self.prefix + "owner:" + owner)
                found = await pipe.execute()
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc
        return {owner for owner, exists in zip(ordered, found, strict=True) if exists}

    async def forget(self, owner: str) -> None:
        try:
            await self._client.delete(self.prefix + "owner:" + owner)
        except RedisError as exc:
            raise shared_state_unavailable(exc) from exc

    async def close(self) -> None:
        await self._client.aclose()


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _job(fields: dict[str, Any]) -> Job:
    return Job(
        id=fields["id"],
        kind=fields["kind"],
        node_id=fields["node_id"],
        key_id=fields["key_id"],
        owner=fields["owner"],
        status=JobStatus(fields["status"]),
        progress=float(fields["progress"]),
        message=fields["message"],
        result=decode_result(fields.get("result")),
        from_store=fields.get("from_store") == "1",
        error=fields.get("error"),
        created=fields["created"],
    )
