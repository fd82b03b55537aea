"""Jobs that are never lost, and followed from any replica.

The job stores (SQLite in memory or in a file, Redis) behave alike; real `interpql serve`
processes share a real redis-server and a fake OpenAI server; SIGTERM and SIGKILL leave no job
running and silent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets.sync.client
from websockets.sync.client import ClientConnection

from interpql.bootstrap import ServeOptions, build_services
from interpql.errors import InterpqlError, NotFoundError
from interpql.loaders.jobs import (
    STOPPED,
    Job,
    JobChange,
    JobEvent,
    JobManager,
    JobStatus,
    JobStore,
    KeyUsage,
    Limits,
    RedisJobStore,
    SharedStateUnavailable,
    SqliteJobStore,
    owners,
)
from interpql.loaders.jobs.base import new_job_id
from interpql.loaders.jobs.manager import NOT_STARTED
from interpql.loaders.sources import ExplanationData, StoredExplanation
from interpql.specs import parse_node_id
from tests.conftest import error_codes
from tests.fake_openai import FakeOpenAI, chat_answer
from tests.processes import redis_server, serve, serve_process
from tests.test_explaining import AUTH, EXPLAIN, EXPLANATION, KEY, simulation_rule
from tests.test_node_sources import neuron_record

NODE_ID = "tiny/mlp_neuron/0/5"
QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED = JobStatus.SUCCEEDED, JobStatus.FAILED
RESULT = [
    StoredExplanation(
        7,
        parse_node_id(NODE_ID),
        ExplanationData("generated", "def statements", 0.25, "sim (json)", "explainer", "2025-01"),
        "request-key",
        {"examples": 1, "calibrated_rsquared": -0.5},
    )
]


# Stores -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


StoreOpener = Callable[[], JobStore]


def opener(kind: str, tmp_path: Path, redis_url: str) -> StoreOpener:
    """Opens the same store again each call, as a restarted server or another replica would."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    if kind == "memory":
        return SqliteJobStore
    if kind == "sqlite":
        return lambda: SqliteJobStore(tmp_path / "jobs.sqlite")
    return lambda: RedisJobStore(redis_url, prefix=prefix)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> StoreOpener:
    return opener(request.param, tmp_path, redis_url)


@pytest.fixture(params=["sqlite", "redis"])
def open_shared(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> StoreOpener:
    return opener(request.param, tmp_path, redis_url)


def new_job(key_id: str = "k", owner: str = "o") -> tuple[Job, JobEvent]:
    job = Job(id=new_job_id(), kind="explain", node_id=NODE_ID, key_id=key_id, owner=owner)
    return job, job.report(QUEUED, 0.0, "queued")


async def until_finished(events: AsyncGenerator[JobEvent, None]) -> list[JobEvent]:
    seen = []
    async for event in events:
        seen.append(event)
        if event.status.finished:
            break
    await events.aclose()
    return seen


async def test_a_job_and_its_events_round_trip(open_store: StoreOpener) -> None:
    store = open_store()
    job, first = new_job()
    await store.create(job, first, Limits(2, 100))
    assert await store.update(job.id, "k", JobChange(RUNNING, 0.0, "started", sequence=1))
    assert await store.update(job.id, "k", JobChange(RUNNING, 0.5, "halfway", sequence=2))
    # A write retried after a timeout that had reached the store is not written twice.
    assert await store.update(job.id, "k", JobChange(RUNNING, 0.5, "halfway", sequence=2))
    done = JobChange(SUCCEEDED, 1.0, "done", RESULT, True, None, 3)
    assert await store.update(job.id, "k", done)
    # Finished is final.
    assert not await store.update(job.id, "k", JobChange(FAILED, 1.0, "late", error="late"))

    stored = await store.get(job.id)
    assert stored is not None
    assert (stored.status, stored.progress, stored.message, stored.error) == (
        SUCCEEDED,
        1.0,
        "done",
        None,
    )
    assert (stored.result, stored.from_store) == (RESULT, True)
    assert (stored.kind, stored.node_id, stored.key_id, stored.owner, stored.created) == (
        "explain",
        NODE_ID,
        "k",
        "o",
        job.created,
    )
    assert await until_finished(store.events(job.id)) == [
        JobEvent(0, QUEUED, 0.0, "queued"),
        JobEvent(1, RUNNING, 0.0, "started"),
        JobEvent(2, RUNNING, 0.5, "halfway"),
        JobEvent(3, SUCCEEDED, 1.0, "done"),
    ]
    assert await store.get("job-unknown") is None
    assert not await store.update("job-unknown", "k", JobChange(RUNNING, 0.1, "x"))
    await store.close()


async def test_a_full_job_store_says_the_disk_is_full(tmp_path: Path) -> None:
    """SQLite rolls a transaction back itself when the disk fills: our ROLLBACK after it raised
    "no transaction is active", and that hid why."""
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # as a disk with no page more
    with pytest.raises(SharedStateUnavailable) as refused:
        for _ in range(1000):
            job, first = new_job()
            await store.create(job, first, Limits(10_000, 10**9))
    assert (
        refused.value.message
        == "The job store is unavailable (the disk is full); try again shortly."
    )
    await store.close()


async def test_a_late_subscriber_gets_past_events_then_new_ones(open_store: StoreOpener) -> None:
    store = open_store()
    job, first = new_job()
    await store.create(job, first, Limits(2, 100))
    await store.update(job.id, "k", JobChange(RUNNING, 0.0, "started", sequence=1))
    received: asyncio.Queue[JobEvent] = asyncio.Queue()

    async def follow() -> None:
        events = store.events(job.id)
        async for event in events:
            await received.put(event)
            if event.status.finished:
                break
        await events.aclose()

    follower = asyncio.create_task(follow())

    async def next_event() -> JobEvent:
        return await asyncio.wait_for(received.get(), 10)

    assert [await next_event(), await next_event()] == [
        JobEvent(0, QUEUED, 0.0, "queued"),
        JobEvent(1, RUNNING, 0.0, "started"),
    ]
    await store.update(job.id, "k", JobChange(RUNNING, 0.7, "later", sequence=2))
    assert await next_event() == JobEvent(2, RUNNING, 0.7, "later")
    await store.update(job.id, "k", JobChange(FAILED, 0.7, "broke", error="broke", sequence=3))
    assert await next_event() == JobEvent(3, FAILED, 0.7, "broke")
    await asyncio.wait_for(follower, 10)
    await store.close()


async def test_limits_per_key(open_store: StoreOpener) -> None:
    store = open_store()
    limits = Limits(running=1, tokens=100)

    async def refused(key_id: str) -> str:
        job, first = new_job(key_id)
        with pytest.raises(InterpqlError) as refusal:
            await store.create(job, first, limits)
        return refusal.value.code

    a, first = new_job("k1")
    await store.create(a, first, limits)
    assert await refused("k1") == "RATE_LIMITED"
    other, first = new_job("k2")
    await store.create(other, first, limits)  # another key's jobs do not count
    await store.update(a.id, "k1", JobChange(SUCCEEDED, 1.0, "done", sequence=1))
    b, first = new_job("k1")
    await store.create(b, first, limits)
    await store.spend("k1", 60)
    await store.spend("k1", 40)
    assert await store.usage("k1") == KeyUsage(running=1, tokens=100)
    await store.update(b.id, "k1", JobChange(FAILED, 0.0, "x", error="x", sequence=1))
    assert await refused("k1") == "QUOTA_EXCEEDED"
    assert await store.usage("k2") == KeyUsage(running=1, tokens=0)
    await store.close()


# Managers sharing a store -----------------------------------------------------------------


async def test_a_job_run_by_one_manager_is_followed_through_another(
    open_shared: StoreOpener,
) -> None:
    runner, follower = JobManager(store=open_shared()), JobManager(store=open_shared())
    release = asyncio.Event()

    async def work(job: Job, progress: Callable[[float, str], None]) -> Any:
        progress(0.5, "waiting")
        await release.wait()
        job.from_store = True
        return RESULT

    job = await runner.submit("explain", NODE_ID, "k", work)
    events = follower.follow(job.id)
    seen = [await anext(events) for _ in range(3)]
    assert seen == [
        JobEvent(0, QUEUED, 0.0, "queued"),
        JobEvent(1, RUNNING, 0.0, "started"),
        JobEvent(2, RUNNING, 0.5, "waiting"),
    ]
    assert (await follower.get(job.id)).status is RUNNING
    assert await follower.usage("k") == KeyUsage(running=1, tokens=0)
    release.set()
    assert [event async for event in events] == [JobEvent(3, SUCCEEDED, 1.0, "done")]
    answer = await follower.get(job.id)
    assert (answer.status, answer.result, answer.from_store) == (SUCCEEDED, RESULT, True)
    assert await follower.usage("k") == KeyUsage(running=0, tokens=0)
    for unknown in ("job-" + "0" * 32, "job-" + "x" * 5000):
        with pytest.raises(NotFoundError, match="No job"):
            await follower.get(unknown)
        with pytest.raises(NotFoundError, match="No job"):
            await anext(follower.follow(unknown))
    await runner.shutdown()
    await follower.shutdown()


async def test_shutdown_fails_what_runs_and_the_next_server_reads_it(
    open_shared: StoreOpener,
) -> None:
    first = JobManager(store=open_shared())
    started = asyncio.Event()

    async def work(job: Job, progress: Callable[[float, str], None]) -> Any:
        progress(0.3, "working")
        started.set()
        await asyncio.Event().wait()  # never done: only a stop ends it

    job = await first.submit("score", NODE_ID, "k", work)
    await started.wait()
    not_yet_run = await first.submit("score", NODE_ID, "k", work)  # its task has not run yet
    await first.shutdown()
    with pytest.raises(SharedStateUnavailable):
        await first.submit("score", NODE_ID, "k", work)
    following = JobManager(store=open_shared())
    stopped = await following.get(job.id)
    assert (stopped.status, stopped.progress, stopped.message, stopped.error) == (
        FAILED,
        0.3,
        STOPPED,
        STOPPED,
    )
    events = [event async for event in following.follow(job.id)]
    assert events[-1] == JobEvent(3, FAILED, 0.3, STOPPED)
    events = [event async for event in following.follow(not_yet_run.id)]
    assert events == [JobEvent(0, QUEUED, 0.0, "queued"), JobEvent(1, FAILED, 0.0, STOPPED)]
    assert await following.usage("k") == KeyUsage(running=0, tokens=0)
    await following.shutdown()


async def test_jobs_of_servers_that_stopped_are_failed(open_shared: StoreOpener) -> None:
    store = open_shared()
    manager = JobManager(store=store)
    host, namespace, _, _ = manager.owner.rsplit("|", 3)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    cases = {
        # another host whose lease lapsed
        "elsewhere|pid:[1]|42|aaaaaaaa": (False, FAILED, STOPPED),
        # another host, leased
        "elsewhere|pid:[1]|43|bbbbbbbb": (True, RUNNING, "started"),
        # this host: a process that exited, although its lease still runs (killed, restarted)
        f"{host}|{namespace}|{exited.pid}|cccccccc": (True, FAILED, STOPPED),
        # this host, a process that runs, leased
        f"{host}|{namespace}|{os.getppid()}|dddddddd": (True, RUNNING, "started"),
        # this manager, but a job it does not know: its submit gave up waiting for the store
        manager.owner: (False, FAILED, NOT_STARTED),
    }
    jobs = {}
    for owner, (leased, _, _) in cases.items():
        job, first = new_job(owner=owner)
        await store.create(job, first, Limits(10, 100))
        await store.update(job.id, "k", JobChange(RUNNING, 0.0, "started", sequence=1))
        if leased:
            await store.renew(owner, 60)
        jobs[owner] = job.id
    assert await manager.recover() == 3
    for owner, (_, status, message) in cases.items():
        found = await store.get(jobs[owner])
        assert found is not None and (found.status, found.message) == (status, message), owner
    await manager.shutdown()


def test_owners_are_unique_and_name_this_process() -> None:
    me, other = owners.new_owner(), owners.new_owner()
    assert me != other
    assert me.rsplit("|", 3)[2] == str(os.getpid())
    assert not owners.stopped(me, set(), me)
    # A server that took over this process's pid (a restarted container) replaces its owner.
    assert owners.stopped(other, {other}, me)


async def test_writes_wait_while_redis_is_paused_and_are_written_once_after(
    tmp_path: Path,
) -> None:
    with redis_server(tmp_path) as (url, process):
        prefix = "paused:"
        store = RedisJobStore(url, prefix=prefix, timeout_s=0.3, block_ms=100)
        manager = JobManager(store=store, write_timeout_s=0.5)
        release = asyncio.Event()

        async def work(job: Job, progress: Callable[[float, str], None]) -> Any:
            await release.wait()
            return RESULT

        job = await manager.submit("explain", NODE_ID, "k", work)
        process.send_signal(signal.SIGSTOP)
        try:
            release.set()
            # The job finishes all the same, and its server answers for it from memory.
            local = [event.status async for event in manager.follow(job.id)]
            assert local == [QUEUED, RUNNING, SUCCEEDED]
            assert (await manager.get(job.id)).result == RESULT
            with pytest.raises(SharedStateUnavailable):
                await manager.submit("explain", NODE_ID, "k", work)
        finally:
            process.send_signal(signal.SIGCONT)
        assert await manager.flush(30)
        reader = RedisJobStore(url, prefix=prefix)
        stored = await reader.get(job.id)
        assert stored is not None and (stored.status, stored.result) == (SUCCEEDED, RESULT)
        events = await until_finished(reader.events(job.id))
        assert [(e.sequence, e.status) for e in events] == [
            (0, QUEUED),
            (1, RUNNING),
            (2, SUCCEEDED),
        ]
        await reader.close()
        await manager.shutdown()


def test_redis_is_the_shared_state_and_the_cache(tmp_path: Path, redis_url: str) -> None:
    def services(**given: Any) -> Any:
        store = str(tmp_path / "explanations.sqlite")
        return build_services(
            ServeOptions(model="random:tiny", no_model=True, explanation_store=store, **given)
        )

    shared = services(redis=redis_url)
    assert isinstance(shared.jobs.store, RedisJobStore) and shared.cache.url == redis_url
    assert services(redis=redis_url, cache="memory").cache.url == "memory"
    local = services()
    assert isinstance(local.jobs.store, SqliteJobStore) and local.cache.url is None
    assert local.jobs.store.path == str(tmp_path / "explanations.jobs.sqlite")
    with pytest.raises(ValueError, match="--redis"):
        services(redis="http://localhost:6379")
    for opened in (shared, local):
        asyncio.run(opened.jobs.store.close())


# Real servers ----------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(default_chat=simulation_rule) as server:
        yield server


@pytest.fixture
def held_explainer(fake: FakeOpenAI) -> Iterator[threading.Event]:
    """The next explanation is answered once the event is set (set at the end in any case)."""
    release = threading.Event()
    fake.then("chat", lambda body: (200, chat_answer(EXPLANATION), release))
    yield release
    release.set()


def serve_args(tmp_path: Path, fake: FakeOpenAI, name: str, *more: str) -> list[str]:
    records = tmp_path / "records"
    if not records.exists():
        (records / "0").mkdir(parents=True)
        (records / "0" / "5.json").write_text(json.dumps(neuron_record(0, 5)))
    return [
        "--model",
        "random:tiny",
        "--name",
        "tiny",
        "--no-model",
        "--source",
        f"name=folder,kind=mlp_neuron,records={records}",
        "--api-key",
        KEY,
        "--openai-base-url",
        fake.base_url,
        "--openai-api-key",
        "sk-fake",
        "--simulator",
        "json",
        "--explanation-store",
        str(tmp_path / f"{name}.sqlite"),
        *more,
    ]


def post(
    url: str,
    query: str,
    variables: dict[str, Any] | None = None,
    headers: dict[str, str] = AUTH,
) -> dict[str, Any]:
    response = httpx.post(
        url + "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def start_explaining(url: str) -> str:
    body = post(url, EXPLAIN, {"n": NODE_ID})
    assert "errors" not in body, body
    return str(body["data"]["explainNode"]["id"])


JOB = (
    "query($id: ID!) { job(id: $id) { status message error fromStore "
    "result { text score scorer explainerModel } } }"
)


def job_state(url: str, job_id: str) -> dict[str, Any]:
    body = post(url, JOB, {"id": job_id})
    assert "errors" not in body, body
    job: dict[str, Any] = body["data"]["job"]
    return job


class JobUpdates:
    """`jobUpdates` over a WebSocket (graphql-transport-ws), one event at a time."""

    def __init__(self, ws: ClientConnection, job_id: str, key: str | None = KEY) -> None:
        self.ws = ws
        init: dict[str, Any] = {"type": "connection_init"}
        if key is not None:  # browsers cannot set headers: the key comes in the payload
            init["payload"] = {"Authorization": f"Bearer {key}"}
        self.ws.send(json.dumps(init))
        assert json.loads(self.ws.recv(timeout=10))["type"] == "connection_ack"
        query = (
            "subscription($id: ID!) { jobUpdates(id: $id) { sequence status progress message } }"
        )
        payload = {"query": query, "variables": {"id": job_id}}
        self.ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))

    def next(self) -> dict[str, Any] | None:
        """The next event, or None when the stream is complete."""
        message = json.loads(self.ws.recv(timeout=30))
        if message["type"] == "complete":
            return None
        assert message["type"] == "next" and "errors" not in message["payload"], message
        event: dict[str, Any] = message["payload"]["data"]["jobUpdates"]
        return event

    def until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
            if done(event):
                break
        return events


@contextmanager
def job_updates(url: str, job_id: str, key: str | None = KEY) -> Iterator[JobUpdates]:
    with websockets.sync.client.connect(
        url.replace("http://", "ws://") + "/graphql", subprotocols=["graphql-transport-ws"]
    ) as ws:
        yield JobUpdates(ws, job_id, key)


def explaining(event: dict[str, Any]) -> bool:
    return str(event["message"]).startswith("explaining")


def expected_score() -> float:
    """The fake simulator predicts i % 11 at token i; held out: odd top records, then random."""
    record = neuron_record(0, 5)
    held = record["most_positive_activation_records"][1::2] + record["random_sample"][:5]
    truth = np.concatenate([r["activations"] for r in held])
    simulated = np.concatenate([np.arange(len(r["tokens"])) % 11 for r in held])
    return float(np.corrcoef(truth, simulated)[0, 1])


def test_a_job_started_on_one_server_is_followed_on_another(
    tmp_path: Path, redis_url: str, fake: FakeOpenAI, held_explainer: threading.Event
) -> None:
    shared = ("--redis", redis_url)
    with (
        serve(*serve_args(tmp_path, fake, "a", *shared)) as a,
        serve(*serve_args(tmp_path, fake, "b", *shared)) as b,
    ):
        job_id = start_explaining(a)
        with job_updates(b, job_id) as updates:
            events = updates.until(explaining)
            # The job still runs on A (its explainer is held), and B follows it live.
            assert job_state(b, job_id)["status"] == "RUNNING"
            held_explainer.set()
            events += updates.until(lambda event: event["status"] in ("SUCCEEDED", "FAILED"))
            assert updates.next() is None

        assert [e["sequence"] for e in events] == list(range(len(events)))
        assert events[0]["status"] == "QUEUED" and events[-1]["status"] == "SUCCEEDED", events
        assert [e["progress"] for e in events] == sorted(e["progress"] for e in events)
        on_b, on_a = job_state(b, job_id), job_state(a, job_id)
        assert on_b == on_a
        [result] = on_b["result"]
        assert result["text"] == EXPLANATION and on_b["fromStore"] is False
        assert result["score"] == pytest.approx(expected_score(), abs=1e-9)
        # A stored it in its own explanation store, which B does not read: B's answer came
        # through Redis.
        node = post(
            a, "query($n: ID!) { node(id: $n) { explanations { text score } } }", {"n": NODE_ID}
        )
        assert {"text": EXPLANATION, "score": result["score"]} in node["data"]["node"][
            "explanations"
        ]


def stop_while_running(
    tmp_path: Path, fake: FakeOpenAI, sig: signal.Signals
) -> tuple[str, int, float]:
    """Starts a job that waits for its explainer, signals the server; returns the job's id, the
    server's exit status and how long it took to exit."""
    with serve_process(*serve_args(tmp_path, fake, "store")) as (url, process):
        job_id = start_explaining(url)
        with job_updates(url, job_id) as updates:
            updates.until(explaining)
        began = time.monotonic()
        process.send_signal(sig)
        status = process.wait(timeout=60)
        return job_id, status, time.monotonic() - began


def assert_failed_as_stopped(url: str, job_id: str) -> None:
    job = job_state(url, job_id)
    assert (job["status"], job["message"], job["error"]) == ("FAILED", STOPPED, STOPPED)
    with job_updates(url, job_id) as updates:
        events = updates.until(lambda event: event["status"] == "FAILED")
    assert events[-1]["message"] == STOPPED
    assert [e["sequence"] for e in events] == list(range(len(events)))


def test_sigterm_fails_the_running_job_and_the_restarted_server_says_so(
    tmp_path: Path, fake: FakeOpenAI, held_explainer: threading.Event
) -> None:
    job_id, status, seconds = stop_while_running(tmp_path, fake, signal.SIGTERM)
    assert status == 0 and seconds < 15
    with serve(*serve_args(tmp_path, fake, "store")) as url:
        assert_failed_as_stopped(url, job_id)


def test_sigkill_leaves_a_job_that_the_next_server_fails_at_start_up(
    tmp_path: Path, fake: FakeOpenAI, held_explainer: threading.Event
) -> None:
    job_id, status, _ = stop_while_running(tmp_path, fake, signal.SIGKILL)
    assert status == -signal.SIGKILL
    with serve(*serve_args(tmp_path, fake, "store")) as url:
        assert_failed_as_stopped(url, job_id)


def test_without_redis_starting_a_job_is_a_typed_error(tmp_path: Path, fake: FakeOpenAI) -> None:
    with redis_server(tmp_path) as (redis_url, redis_process):
        args = serve_args(tmp_path, fake, "store", "--redis", redis_url)
        with serve_process(*args) as (url, process):
            finished = start_explaining(url)
            with job_updates(url, finished) as updates:
                assert updates.until(lambda event: event["status"] == "SUCCEEDED")
            redis_process.terminate()
            redis_process.wait(timeout=10)
            refused = post(url, EXPLAIN, {"n": NODE_ID})
            assert error_codes(refused) == ["SHARED_STATE_UNAVAILABLE"]
            assert "Traceback" not in json.dumps(refused)
            unknown = post(url, JOB, {"id": "job-elsewhere"})
            assert error_codes(unknown) == ["SHARED_STATE_UNAVAILABLE"]
            # Finished jobs live in Redis only.
            assert error_codes(post(url, JOB, {"id": finished})) == ["SHARED_STATE_UNAVAILABLE"]
            # Everything else still answers.
            models = httpx.post(url + "/graphql", json={"query": "{ models { name } }"})
            assert models.json()["data"]["models"] == [{"name": "tiny"}]
            assert httpx.get(url + "/healthz").status_code == 200
            assert process.poll() is None


OTHER_KEY = "the-other-key"


def test_a_job_is_seen_by_the_key_that_made_it_alone(tmp_path: Path, fake: FakeOpenAI) -> None:
    """Over HTTP and over a WebSocket, another key's job and a key-less caller get exactly what
    an unknown job gets."""
    with serve(*serve_args(tmp_path, fake, "store", "--api-key", OTHER_KEY)) as url:
        job_id = start_explaining(url)  # with KEY
        with job_updates(url, job_id) as updates:
            assert updates.until(lambda event: event["status"] == "SUCCEEDED")
        assert job_state(url, job_id)["status"] == "SUCCEEDED"
        unknown = post(url, JOB, {"id": "job-" + "0" * 32})
        assert error_codes(unknown) == ["JOB_NOT_FOUND"]
        for headers in ({"Authorization": f"Bearer {OTHER_KEY}"}, {}):
            refused = post(url, JOB, {"id": job_id}, headers=headers)
            assert refused["data"] is None and error_codes(refused) == ["JOB_NOT_FOUND"]
            assert refused["errors"][0]["message"] == f"No job {job_id!r}."
        for key in (OTHER_KEY, None):
            with job_updates(url, job_id, key) as updates:
                message = json.loads(updates.ws.recv(timeout=10))
            assert message["type"] == "next", message
            [error] = message["payload"]["errors"]
            assert error["extensions"]["code"] == "JOB_NOT_FOUND"
            assert message["payload"]["data"] is None
